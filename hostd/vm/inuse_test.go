package vm

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nkp-dev/nkp/hostd/vm/vmapi"
	"github.com/nkp-dev/nkp/test/e2e"
)

func TestOpeners(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "disk.img")
	if err := os.WriteFile(path, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	link := filepath.Join(dir, "other-name.img")
	if err := os.Link(path, link); err != nil {
		t.Fatal(err)
	}
	closed, err := openers("/proc", path)
	if err != nil || len(closed) != 0 {
		t.Fatalf("a file nobody has open: %v %v", closed, err)
	}
	f, err := os.Open(link) // another name of the same file
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	ps, err := openers("/proc", path)
	if err != nil {
		t.Fatal(err)
	}
	if len(ps) != 1 || ps[0].PID != os.Getpid() || ps[0].Comm == "" {
		t.Fatalf("openers %v, want this process (%d)", ps, os.Getpid())
	}
	if _, err := openers(filepath.Join(dir, "no-proc"), path); err == nil {
		t.Fatal("no error for an unreadable proc directory")
	}
}

func TestGuestName(t *testing.T) {
	tests := []struct{ cmdline, want string }{
		{"/usr/bin/qemu-system-x86_64\x00-name\x00guest=t20,debug-threads=on\x00-S\x00", "t20"},
		{"qemu\x00-name\x00guest=a,,b c,debug-threads=on\x00", "a,b c"},
		{"qemu\x00-name\x00guest=only\x00", "only"},
		{"qemu\x00-name\x00", ""},
		{"bash\x00-c\x00true\x00", ""},
		{"", ""},
	}
	for _, tt := range tests {
		if got := guestName([]byte(tt.cmdline)); got != tt.want {
			t.Errorf("guestName(%q) = %q, want %q", tt.cmdline, got, tt.want)
		}
	}
	if s := (opener{PID: 7, Comm: "qemu-system-x86", Guest: "t20"}).String(); s != "domain t20's QEMU (process 7 (qemu-system-x86))" {
		t.Errorf("String: %q", s)
	}
}

// TestFinalizeKeepsOpenFile: a VM resumed from a save image (or a snapshot) made before
// protect runs on the original file; finalize must not remove a file a process has open,
// and removes it once it is closed.
func TestFinalizeKeepsOpenFile(t *testing.T) {
	e := newEnv(t)
	dir := t.TempDir()
	diskImages(t, dir)
	e.define(t, "d1", uuid1, diskDevices(dir))
	ctx := context.Background()
	if _, err := e.m.ProtectWith(ctx, "d1", vmapi.ProtectRequest{Disks: "vda"}, nil); err != nil {
		t.Fatal(err)
	}
	orig := filepath.Join(dir, "vda.img")
	f, err := os.OpenFile(orig, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	v, err := e.m.Finalize(ctx, "d1")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(orig); err != nil {
		t.Fatalf("finalize removed %s while this process has it open: %v", orig, err)
	}
	want := []string{orig + " is kept", "process " + strconv.Itoa(os.Getpid()), "has it open", "nkpctl vm protect --finalize d1 again"}
	if len(v.Problems) != 1 {
		t.Fatalf("problems %q, want one saying %q", v.Problems, want)
	}
	for _, w := range want {
		if !strings.Contains(v.Problems[0], w) {
			t.Errorf("problem %q does not say %q", v.Problems[0], w)
		}
	}
	if len(v.Disks) == 0 || len(v.Disks[0].Originals) != 1 {
		t.Fatalf("status after finalize: %+v, want the original still listed", v.Disks)
	}
	f.Close()
	if v, err = e.m.Finalize(ctx, "d1"); err != nil || len(v.Problems) != 0 {
		t.Fatalf("finalize after close: %+v %v", v.Problems, err)
	}
	if _, err := os.Stat(orig); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("%s after finalize: %v", orig, err)
	}
}

// TestSharedOriginal: another domain names the same disk file (a clone, an alternative
// boot configuration). Protect says so; neither finalize nor --remove-original removes the
// original that domain still uses; finalize does once it no longer names it.
func TestSharedOriginal(t *testing.T) {
	for _, removeOriginal := range []bool{false, true} {
		t.Run(fmt.Sprintf("remove-original=%v", removeOriginal), func(t *testing.T) {
			e := newEnv(t)
			dir := t.TempDir()
			diskImages(t, dir)
			e.define(t, "d1", uuid1, diskDevices(dir))
			const uuid2 = "0d6f3c9e-7a1b-4e2d-8c5f-9b0a1d2e3f40"
			orig := filepath.Join(dir, "vda.img")
			e.define(t, "d2", uuid2, `<disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='`+orig+`'/><target dev='vdb' bus='virtio'/></disk>`)
			ctx := context.Background()
			v, err := e.m.ProtectWith(ctx, "d1", vmapi.ProtectRequest{Disks: "vda", RemoveOriginal: removeOriginal}, nil)
			if err != nil {
				t.Fatal(err)
			}
			if !strings.Contains(v.Note, "domain d2 names the same file "+orig) {
				t.Errorf("note %q does not name d2", v.Note)
			}
			if v, err = e.m.Finalize(ctx, "d1"); err != nil {
				t.Fatal(err)
			}
			if _, err := os.Stat(orig); err != nil {
				t.Fatalf("the original d2 uses was removed: %v", err)
			}
			if len(v.Problems) != 1 || !strings.Contains(v.Problems[0], "domain d2 names it too") || !strings.Contains(v.Problems[0], "--finalize d1 again") {
				t.Fatalf("problems %q, want one naming d2", v.Problems)
			}
			e.lv.mu.Lock()
			delete(e.lv.doms, uuid2)
			e.lv.mu.Unlock()
			if v, err = e.m.Finalize(ctx, "d1"); err != nil || len(v.Problems) != 0 {
				t.Fatalf("finalize once d2 is gone: %q %v", v.Problems, err)
			}
			if _, err := os.Stat(orig); !errors.Is(err, os.ErrNotExist) {
				t.Fatalf("%s after finalize: %v", orig, err)
			}
		})
	}
}

// TestWaitForOtherOperation: operations run one at a time; one that has to wait for
// another (a large disk converting for hours) says so first instead of sitting silent.
func TestWaitForOtherOperation(t *testing.T) {
	e := newEnv(t)
	e.define(t, "r1", uuid1, "")
	e.m.lock("protect of big-vm", nil)
	events := make(chan vmapi.Progress, 8)
	done := make(chan error, 1)
	go func() {
		_, err := e.m.ProtectWith(context.Background(), "r1", vmapi.ProtectRequest{Disks: vmapi.DisksNone}, func(p vmapi.Progress) { events <- p })
		done <- err
	}()
	select {
	case p := <-events:
		if p.Phase != vmapi.PhaseWait || p.Note != "protect of big-vm" {
			t.Fatalf("first event %+v, want a wait naming protect of big-vm", p)
		}
	case err := <-done:
		t.Fatalf("protect ran while another operation held the lock: %v", err)
	case <-time.After(30 * time.Second):
		t.Fatal("no wait event within 30 s")
	}
	e.m.unlock()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(60 * time.Second):
		t.Fatal("protect did not finish within 60 s of the lock's release")
	}
	if e.m.busy != "" {
		t.Fatalf("busy %q after the operation", e.m.busy)
	}
}

// TestProtectImageInUse: another VM that names the same file (not marked shareable) runs
// on it, holding QEMU's image locks (here qemu-io holds them): protect is refused naming
// the process, and nothing is left behind.
func TestProtectImageInUse(t *testing.T) {
	e := newEnv(t)
	dir := t.TempDir()
	diskImages(t, dir)
	e.define(t, "d1", uuid1, diskDevices(dir))
	orig := filepath.Join(dir, "vda.img")
	cmd := exec.Command("qemu-io", "-f", "raw", orig)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { stdin.Close(); cmd.Wait() })
	e2e.WaitFor(t, 30*time.Second, "qemu-io to open the image", func() bool {
		ps, _ := openers("/proc", orig)
		return len(ps) > 0
	})
	_, err = e.m.ProtectWith(context.Background(), "d1", vmapi.ProtectRequest{Disks: "vda"}, nil)
	if err == nil {
		t.Fatal("protect converted an image another process holds locked")
	}
	for _, w := range []string{`vm "d1"`, "disk vda", "process " + strconv.Itoa(cmd.Process.Pid) + " (qemu-io)", "shut that down first", "nothing else was changed"} {
		if !strings.Contains(err.Error(), w) {
			t.Errorf("error %q does not say %q", err, w)
		}
	}
	if e.m.j.exists(uuid1) {
		t.Fatal("the operation was left unfinished")
	}
	if d := e.lv.domain(t, uuid1); d.Metadata != nil {
		t.Fatalf("metadata after the refusal: %+v", d.Metadata)
	}
}

// TestFinalizeSymlinkOriginal: a disk named through a symbolic link. Finalize (and
// --remove-original) removed the link and reported the original removed, while the
// plaintext stayed where the link pointed; now the link is kept and the target named.
func TestFinalizeSymlinkOriginal(t *testing.T) {
	for _, removeOriginal := range []bool{false, true} {
		t.Run(fmt.Sprintf("remove-original=%v", removeOriginal), func(t *testing.T) {
			e := newEnv(t)
			dir := t.TempDir()
			diskImages(t, dir)
			real := filepath.Join(dir, "vda.img")
			link := filepath.Join(dir, "vda-link.img")
			if err := os.Symlink(real, link); err != nil {
				t.Fatal(err)
			}
			e.define(t, "d1", uuid1, strings.Replace(diskDevices(dir), dir+"/vda.img", link, 1))
			ctx := context.Background()
			if _, err := e.m.ProtectWith(ctx, "d1", vmapi.ProtectRequest{Disks: "vda", RemoveOriginal: removeOriginal}, nil); err != nil {
				t.Fatal(err)
			}
			v, err := e.m.Finalize(ctx, "d1")
			if err != nil {
				t.Fatal(err)
			}
			if _, err := os.Lstat(link); err != nil {
				t.Fatalf("the link was removed: %v", err)
			}
			if len(v.Problems) != 1 || !strings.Contains(v.Problems[0], "symbolic link to "+real) || !strings.Contains(v.Problems[0], "unencrypted data") {
				t.Fatalf("problems %q, want one naming %s", v.Problems, real)
			}
			if strings.Contains(v.Note, "removed the original") {
				t.Fatalf("note %q claims the original is removed", v.Note)
			}
			os.Remove(real)
			os.Remove(link)
			if v, err = e.m.Finalize(ctx, "d1"); err != nil || len(v.Problems) != 0 || len(v.Disks[0].Originals) != 0 {
				t.Fatalf("finalize after the operator removed both: %q %+v %v", v.Problems, v.Disks, err)
			}
		})
	}
}

// TestFinalizeUndefined: a protected domain undefined before finalize leaves its kept
// plaintext originals known to hostd only by the VM's UUID. Status (List and Status of
// the UUID) reports them as a problem naming the files and the way out; finalize by the
// UUID, and by the name the domain had, removes them; afterwards nothing is reported.
func TestFinalizeUndefined(t *testing.T) {
	for _, by := range []string{"uuid", "name"} {
		t.Run(by, func(t *testing.T) {
			e := newEnv(t)
			dir := t.TempDir()
			diskImages(t, dir)
			e.define(t, "d1", uuid1, diskDevices(dir))
			ctx := context.Background()
			if _, err := e.m.ProtectWith(ctx, "d1", vmapi.ProtectRequest{Disks: "vda"}, nil); err != nil {
				t.Fatal(err)
			}
			orig := filepath.Join(dir, "vda.img")
			e.lv.mu.Lock()
			delete(e.lv.doms, uuid1) // virsh undefine
			e.lv.mu.Unlock()

			l, err := e.m.List(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if len(l) != 1 || l[0].UUID != uuid1 || len(l[0].Problems) == 0 {
				t.Fatalf("List after undefine: %+v; want VM %s with a problem", l, uuid1)
			}
			p := l[0].Problems[len(l[0].Problems)-1]
			for _, w := range []string{"d1 (" + uuid1 + ")", "no longer defined", orig, "unencrypted", "nkpctl vm protect --finalize " + uuid1} {
				if !strings.Contains(p, w) {
					t.Errorf("List's problem %q does not say %q", p, w)
				}
			}
			for _, d := range []string{uuid1, "d1"} {
				if v, err := e.m.Status(ctx, d); err != nil || len(v.Problems) == 0 || !strings.Contains(v.Problems[len(v.Problems)-1], orig) {
					t.Errorf("Status %s after undefine: %+v, %v; want the kept original named", d, v, err)
				}
			}

			arg := map[string]string{"uuid": uuid1, "name": "d1"}[by]
			v, err := e.m.Finalize(ctx, arg)
			if err != nil {
				t.Fatalf("finalize %s of the undefined domain: %v", arg, err)
			}
			if _, err := os.Stat(orig); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("%s after finalize of the undefined domain: %v", orig, err)
			}
			// What is left is the vTPM state (protect gave it one), reported as before.
			keptLeft := func(ps []string) bool {
				return slices.ContainsFunc(ps, func(p string) bool { return strings.Contains(p, orig) || strings.Contains(p, "--finalize") })
			}
			if !strings.Contains(v.Note, orig) || keptLeft(v.Problems) {
				t.Errorf("finalize result: %+v; want the removal noted and no kept file left", v)
			}
			if l, err := e.m.List(ctx); err != nil || len(l) != 1 || keptLeft(l[0].Problems) {
				t.Errorf("List after finalize: %+v, %v; want only the vTPM state's problem", l, err)
			}
			if _, err := e.m.Finalize(ctx, arg); !errors.Is(err, ErrNoDomain) {
				t.Errorf("finalize again: %v; want no such domain", err)
			}
		})
	}
}
