package vm

import (
	"context"
	"encoding/hex"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/nkp-dev/nkp/hostd/domxml"
	"github.com/nkp-dev/nkp/hostd/vm/vmapi"
	"github.com/nkp-dev/nkp/provider/kdk"
	"github.com/nkp-dev/nkp/qemuimg"
	"github.com/nkp-dev/nkp/test/e2e"
)

// qemuIO writes with qemu-io into a plain image.
func qemuIO(t *testing.T, format, path string, cmds ...string) {
	t.Helper()
	args := []string{"-f", format}
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	if out, err := exec.Command("qemu-io", append(args, path)...).CombinedOutput(); err != nil {
		t.Fatalf("qemu-io %v: %v\n%s", args, err, out)
	}
}

// diskImages makes the disks of the disk tests in dir: vda a raw image, vdb a qcow2
// overlay on a qcow2 base (data in both layers), and want-vda/want-vdb, plain raw copies
// of what the guest sees, to compare with at every step.
func diskImages(t *testing.T, dir string) {
	t.Helper()
	e2e.Require(t, "qemu-img", "qemu-io")
	ctx := context.Background()
	qi := &qemuimg.Tool{}
	raw := qemuimg.Image{Path: filepath.Join(dir, "vda.img"), Format: qemuimg.Raw}
	base := qemuimg.Image{Path: filepath.Join(dir, "base.qcow2"), Format: qemuimg.QCOW2}
	top := qemuimg.Image{Path: filepath.Join(dir, "vdb.qcow2"), Format: qemuimg.QCOW2}
	for _, c := range []qemuimg.CreateOptions{{Image: raw, Size: 4 << 20}, {Image: base, Size: 4 << 20}, {Image: top, Backing: &base}} {
		if err := qi.Create(ctx, c); err != nil {
			t.Fatal(err)
		}
	}
	qemuIO(t, "raw", raw.Path, "write -P 0x5a 0 1M", "write -P 0xa5 3M 64k")
	qemuIO(t, "qcow2", base.Path, "write -P 0x11 0 2M")
	qemuIO(t, "qcow2", top.Path, "write -P 0x22 1M 64k")
	for _, x := range []qemuimg.Image{raw, top} {
		want := qemuimg.Image{Path: filepath.Join(dir, "want-"+strings.TrimSuffix(filepath.Base(x.Path), filepath.Ext(x.Path))), Format: qemuimg.Raw}
		if err := qi.Convert(ctx, qemuimg.ConvertOptions{Src: x, Dst: want}); err != nil {
			t.Fatal(err)
		}
	}
}

// diskDevices are the <disk> elements of the disk tests' domain: the two images, a cdrom
// and a read-only disk (both skipped).
func diskDevices(dir string) string {
	return `<disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='` + dir + `/vda.img'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='` + dir + `/vdb.qcow2'/>
      <backingStore type='file'><format type='qcow2'/><source file='` + dir + `/base.qcow2'/><backingStore/></backingStore>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'><driver name='qemu' type='raw'/><target dev='sda' bus='sata'/><readonly/></disk>
    <disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='` + dir + `/want-vda'/><target dev='vdc' bus='virtio'/><readonly/></disk>`
}

func diskKeyBytes(t *testing.T, uuid string, o domxml.Object) []byte {
	t.Helper()
	b, err := kdk.Derive(kdkBytes(o.KDKVersion), kdk.PurposeDisk, uuid, o.KeyID)
	if err != nil {
		t.Fatal(err)
	}
	return []byte(hex.EncodeToString(b))
}

// checkDisk checks one disk against the domain: protected (object on KDK version v, file
// encrypted under the object's derived key with nkp's minimal PBKDF, one keyslot, 0600,
// the guest's data unchanged, catalog and secret in place) or plain (v 0: data unchanged,
// no object, no catalog entry, no secret). It returns the disk's object.
func (e *env) checkDisk(t *testing.T, uuid, target, dir string, v int) (domxml.Object, *domxml.Disk) {
	t.Helper()
	ctx := context.Background()
	d := e.lv.domain(t, uuid)
	dk, ok := d.Disk(target)
	if !ok {
		t.Fatalf("no disk %s", target)
	}
	want := qemuimg.Image{Path: filepath.Join(dir, "want-"+target), Format: qemuimg.Raw}
	o, protected := d.Metadata.Object(domxml.DiskObject(target))
	qi := &qemuimg.Tool{}
	if v == 0 {
		if protected || dk.Encryption != nil {
			t.Fatalf("disk %s: object %+v, encryption %+v; want plain", target, o, dk.Encryption)
		}
		f, _ := imgFormat(dk.DriverType, false)
		if err := qi.Compare(ctx, qemuimg.Image{Path: dk.Source, Format: f}, want); err != nil {
			t.Fatalf("disk %s: %v", target, err)
		}
		if _, ok := e.cat.get(uuid, domxml.DiskObject(target)); ok {
			t.Fatalf("disk %s: catalog entry left", target)
		}
		return o, dk
	}
	if !protected || o.KDKVersion != v || dk.Encryption == nil || dk.Encryption.SecretUUID != domxml.SecretUUID(uuid, o.KeyID) || dk.HasBackingStore {
		t.Fatalf("disk %s: object %+v (%v), disk %+v; want protected on KDK version %d", target, o, protected, dk, v)
	}
	f, _ := imgFormat(dk.DriverType, true)
	img := qemuimg.Image{Path: dk.Source, Format: f, Key: diskKeyBytes(t, uuid, o)}
	info, err := qi.Info(ctx, img)
	if err == nil {
		err = qi.Unlock(ctx, img)
	}
	if err != nil {
		t.Fatalf("disk %s: %v", target, err)
	}
	if !info.Encrypted && info.Format != qemuimg.LUKS || info.LUKS == nil || info.LUKS.ActiveSlots() != 1 || info.BackingFilename != "" {
		t.Fatalf("disk %s: info %+v, LUKS %+v", target, info, info.LUKS)
	}
	if err := qi.Compare(ctx, img, want); err != nil {
		t.Fatalf("disk %s: %v", target, err)
	}
	fi, err := os.Stat(dk.Source)
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("disk %s: %v %v, want mode 0600", target, fi, err)
	}
	if c, ok := e.cat.get(uuid, o.Name); !ok || c.KeyID != o.KeyID || c.KDKVersion != v {
		t.Fatalf("disk %s: catalog %+v %v, want key %s", target, c, ok, o.KeyID)
	}
	if !slices.Contains(e.sec.defined(), uuid+"/"+o.KeyID) {
		t.Fatalf("disk %s: secret of key %s not defined: %v", target, o.KeyID, e.sec.defined())
	}
	return o, dk
}

// TestDisks protects a domain's raw disk and its qcow2 disk with a backing chain, then
// finalizes, rekeys (shallow, then deep), and unprotects it, with real qemu-img: at every
// step the guest's data reads the same, the domain, the catalog and the secrets agree,
// and no key or file is left over.
func TestDisks(t *testing.T) {
	e := newEnv(t)
	dir := t.TempDir()
	diskImages(t, dir)
	e.define(t, "d1", uuid1, diskDevices(dir))
	ctx := context.Background()

	var mu sync.Mutex
	seen := map[string][]vmapi.Progress{}
	progress := func(p vmapi.Progress) {
		mu.Lock()
		defer mu.Unlock()
		seen[p.Disk] = append(seen[p.Disk], p)
	}
	v, err := e.m.ProtectWith(ctx, "d1", vmapi.ProtectRequest{}, progress)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"disk sda skipped: a cdrom", "disk vdc skipped: read-only", "disk vda encrypted into " + dir + "/vda.img.nkp-", "kept until nkpctl vm protect --finalize d1"} {
		if !strings.Contains(v.Note, want) {
			t.Errorf("note %q lacks %q", v.Note, want)
		}
	}
	for _, target := range []string{"vda", "vdb"} {
		ps := seen[target]
		if len(ps) < 3 || ps[0].Phase != "convert" || ps[len(ps)-1].Phase != "done" || ps[len(ps)-1].Done != 1 || ps[0].Size != 4<<20 {
			t.Errorf("progress of %s: %+v", target, ps)
		}
	}
	e.checkProtected(t, uuid1, 1, map[string][]byte{})
	oa, da := e.checkDisk(t, uuid1, "vda", dir, 1)
	ob, db := e.checkDisk(t, uuid1, "vdb", dir, 1)
	if !strings.HasSuffix(da.Source, ".nkp-"+oa.KeyID[:8]+".luks") || da.DriverType != "raw" || !strings.HasSuffix(db.Source, ".nkp-"+ob.KeyID[:8]+".qcow2") || db.DriverType != "qcow2" {
		t.Fatalf("new files %s (%s), %s (%s)", da.Source, da.DriverType, db.Source, db.DriverType)
	}
	if len(v.Disks) != 4 || v.Disks[0].KeyID != oa.KeyID || v.Disks[0].LUKS == nil || v.Disks[0].LUKS.ActiveSlots != 1 || v.Disks[0].LUKS.Cipher != "aes-256-xts" ||
		!slices.Equal(v.Disks[0].Originals, []string{dir + "/vda.img"}) || v.Disks[2].Protected || v.Disks[2].Note != "not encrypted" {
		t.Fatalf("status disks %+v", v.Disks)
	}
	for _, f := range []string{"vda.img", "vdb.qcow2", "base.qcow2"} {
		if _, err := os.Stat(filepath.Join(dir, f)); err != nil {
			t.Fatalf("original %s: %v", f, err)
		}
	}

	// Protect again: nothing left to add.
	if _, err := e.m.Protect(ctx, "d1"); !errors.Is(err, ErrAlreadyProtected) {
		t.Fatalf("protect again: %v", err)
	}
	// Finalize removes the kept originals (top files only; the base may be shared), twice.
	for i := 0; i < 2; i++ {
		v, err = e.m.Finalize(ctx, "d1")
		if err != nil {
			t.Fatal(err)
		}
	}
	if _, err := os.Stat(filepath.Join(dir, "vda.img")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("vda.img after finalize: %v", err)
	}
	if _, err := os.Stat(filepath.Join(dir, "base.qcow2")); err != nil {
		t.Fatalf("base.qcow2 after finalize: %v", err)
	}
	if v.Note != "no kept original disk files to remove" || len(v.Disks[0].Originals) != 0 {
		t.Fatalf("second finalize: %+v", v)
	}

	// Shallow rekey to KDK version 2: same files, new keys; the old keys open nothing.
	e.keys.primary, e.keys.known = 2, 2
	if _, err := e.m.Rekey(ctx, "d1"); err != nil {
		t.Fatal(err)
	}
	e.checkProtected(t, uuid1, 2, map[string][]byte{})
	na, da2 := e.checkDisk(t, uuid1, "vda", dir, 2)
	if da2.Source != da.Source || na.KeyID == oa.KeyID {
		t.Fatalf("shallow rekey: %s key %s, was %s key %s", da2.Source, na.KeyID, da.Source, oa.KeyID)
	}
	if err := (&qemuimg.Tool{}).Unlock(ctx, qemuimg.Image{Path: da.Source, Format: qemuimg.LUKS, Key: diskKeyBytes(t, uuid1, oa)}); !errors.Is(err, qemuimg.ErrWrongKey) {
		t.Fatalf("old key after rekey: %v", err)
	}
	if slices.Contains(e.sec.defined(), uuid1+"/"+oa.KeyID) {
		t.Fatal("old secret still defined")
	}
	// Again: all on the primary version.
	if v, err := e.m.Rekey(ctx, "d1"); err != nil || !strings.Contains(v.Note, "nothing to do") {
		t.Fatalf("second rekey: %+v %v", v, err)
	}

	// Deep rekey: new files under new master keys, the old files kept.
	v, err = e.m.RekeyWith(ctx, "d1", vmapi.RekeyRequest{Deep: true}, nil)
	if err != nil {
		t.Fatal(err)
	}
	da3Obj, da3 := e.checkDisk(t, uuid1, "vda", dir, 2)
	if da3.Source == da.Source || da3Obj.KeyID == na.KeyID || !slices.Equal(v.Disks[0].Originals, []string{da.Source}) {
		t.Fatalf("deep rekey: %s key %s, status %+v", da3.Source, da3Obj.KeyID, v.Disks[0])
	}
	if !strings.HasPrefix(filepath.Base(da3.Source), "vda.img.nkp-") {
		t.Fatalf("deep rekey named the file %s (want it named after the original)", da3.Source)
	}
	e.checkDisk(t, uuid1, "vdb", dir, 2)

	// Unprotect: plain files again, the encrypted ones kept until finalize.
	v, err = e.m.UnprotectWith(ctx, "d1", "keep", progress)
	if err != nil {
		t.Fatal(err)
	}
	for _, target := range []string{"vda", "vdb"} {
		_, dk := e.checkDisk(t, uuid1, target, dir, 0)
		if !strings.Contains(filepath.Base(dk.Source), ".nkp-plain-") {
			t.Fatalf("unprotected %s into %s", target, dk.Source)
		}
	}
	if d := e.lv.domain(t, uuid1); d.Metadata != nil {
		t.Fatalf("metadata left: %+v", d.Metadata)
	}
	if len(e.sec.defined()) != 0 {
		t.Fatalf("secrets left: %v", e.sec.defined())
	}
	if _, err := e.m.Finalize(ctx, "d1"); err != nil {
		t.Fatal(err)
	}
	ents, _ := os.ReadDir(dir)
	var names []string
	for _, x := range ents {
		names = append(names, x.Name())
	}
	if len(names) != 5 { // base.qcow2, the two plain files, want-vda, want-vdb
		t.Fatalf("files left in the disk directory: %v", names)
	}
}

// TestDiskRefusals checks each refusal's sentence and that nothing changed.
func TestDiskRefusals(t *testing.T) {
	ctx := context.Background()
	enc := `<disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='%s/x.luks'><encryption format='luks'><secret type='passphrase' uuid='` + secret + `'/></encryption></source><target dev='vdd' bus='virtio'/></disk>`
	tests := []struct {
		name  string
		extra func(t *testing.T, dir string) string
		req   vmapi.ProtectRequest
		err   error
		want  []string
	}{
		{"disk with encryption", func(t *testing.T, dir string) string { return strings.ReplaceAll(enc, "%s", dir) }, vmapi.ProtectRequest{},
			ErrUnsupported, []string{`vm "r1"`, "disk vdd already has <encryption format='luks'>", "--disks"}},
		{"image already encrypted", func(t *testing.T, dir string) string {
			p := filepath.Join(dir, "enc.qcow2")
			if err := (&qemuimg.Tool{}).Create(ctx, qemuimg.CreateOptions{Image: qemuimg.Image{Path: p, Format: qemuimg.QCOW2, Key: []byte("k")}, Size: 1 << 20}); err != nil {
				t.Fatal(err)
			}
			return `<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='` + p + `'/><target dev='vdd' bus='virtio'/></disk>`
		}, vmapi.ProtectRequest{}, ErrUnsupported, []string{"disk vdd: the image " + "", "is already encrypted"}},
		{"unknown disk", func(*testing.T, string) string { return "" }, vmapi.ProtectRequest{Disks: "vda,vdq"},
			ErrBadArgument, []string{`--disks names "vdq"`, "its disks: vda, vdb, sda, vdc"}},
		{"block disk named", func(*testing.T, string) string {
			return `<disk type='block' device='disk'><source dev='/dev/null'/><target dev='vdd' bus='virtio'/></disk>`
		}, vmapi.ProtectRequest{Disks: "vdd"}, ErrUnsupported, []string{`disk vdd is of type "block"`}},
		// The domain says qcow2, the file is raw: qemu-img's "Image is not in qcow2
		// format" alone leaves the operator guessing.
		{"driver type mismatch", func(t *testing.T, dir string) string {
			return `<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='` + dir + `/vda.img'/><target dev='vdd' bus='virtio'/></disk>`
		}, vmapi.ProtectRequest{Disks: "vdd"}, qemuimg.ErrFailed, []string{"disk vdd", "<driver type='qcow2'>", "the file is not qcow2", "virsh edit", "nothing was changed"}},
		// A qcow2 whose backing file is gone: not the domain XML's path that is wrong.
		{"backing file missing", func(t *testing.T, dir string) string {
			p := filepath.Join(dir, "orphan.qcow2")
			if out, err := exec.Command("qemu-img", "create", "-f", "qcow2", "-u", "-b", filepath.Join(dir, "gone.qcow2"), "-F", "qcow2", p, "1M").CombinedOutput(); err != nil {
				t.Fatalf("qemu-img create: %v %s", err, out)
			}
			return `<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='` + p + `'/><target dev='vdd' bus='virtio'/></disk>`
		}, vmapi.ProtectRequest{Disks: "vdd"}, qemuimg.ErrNotFound, []string{"disk vdd", "a backing file it names is missing", "qemu-img rebase -u"}},
		{"vmdk", func(t *testing.T, dir string) string {
			return `<disk type='file' device='disk'><driver name='qemu' type='vmdk'/><source file='` + dir + `/vda.img'/><target dev='vdd' bus='virtio'/></disk>`
		}, vmapi.ProtectRequest{Disks: "vdd"}, ErrUnsupported, []string{`driver type "vmdk"`, "qemu-img convert -O qcow2"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newEnv(t)
			dir := t.TempDir()
			diskImages(t, dir)
			x := domainXML("r1", uuid1, diskDevices(dir)+"\n    "+tt.extra(t, dir))
			if err := e.lv.DefineXML(ctx, x); err != nil {
				t.Fatal(err)
			}
			_, err := e.m.ProtectWith(ctx, "r1", tt.req, nil)
			if !errors.Is(err, tt.err) {
				t.Fatalf("err = %v, want %v", err, tt.err)
			}
			for _, w := range tt.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("%q lacks %q", err, w)
				}
			}
			after, _ := e.lv.DomainXML(ctx, uuid1)
			if string(after) != string(x) || e.lv.defines != 1 {
				t.Fatalf("the domain changed:\n%s", after)
			}
			ents, _ := os.ReadDir(dir)
			for _, en := range ents {
				if strings.Contains(en.Name(), ".nkp-") {
					t.Fatalf("file %s left", en.Name())
				}
			}
		})
	}
}

// TestDiskNoSpace protects a disk whose encrypted copy does not fit on its filesystem (a
// 6 MiB tmpfs): refused up front with how much is needed where, nothing changed.
func TestDiskNoSpace(t *testing.T) {
	e2e.Require(t, "qemu-img", "qemu-io")
	dir := t.TempDir()
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=6m", "nkp-test", dir).CombinedOutput(); err != nil {
		if e2e.Required() {
			t.Fatalf("mount tmpfs: %v %s", err, out)
		}
		t.Skipf("cannot mount a tmpfs here: %v %s", err, out)
	}
	t.Cleanup(func() { exec.Command("umount", dir).Run() })
	ctx := context.Background()
	p := filepath.Join(dir, "big.img")
	if err := (&qemuimg.Tool{}).Create(ctx, qemuimg.CreateOptions{Image: qemuimg.Image{Path: p, Format: qemuimg.Raw}, Size: 5 << 20}); err != nil {
		t.Fatal(err)
	}
	e := newEnv(t)
	x := domainXML("n1", uuid1, `<disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='`+p+`'/><target dev='vda' bus='virtio'/></disk>`)
	if err := e.lv.DefineXML(ctx, x); err != nil {
		t.Fatal(err)
	}
	_, err := e.m.Protect(ctx, "n1")
	if !errors.Is(err, ErrNoSpace) || !strings.Contains(err.Error(), "converting disk vda needs") || !strings.Contains(err.Error(), "in "+dir) || !strings.Contains(err.Error(), "nothing was changed") {
		t.Fatalf("err = %v", err)
	}
	if after, _ := e.lv.DomainXML(ctx, uuid1); string(after) != string(x) {
		t.Fatal("the domain changed")
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 1 {
		t.Fatalf("files %v", ents)
	}
}

// TestDiskStatusRunning checks that status reports, for a running VM, how QEMU opened
// each protected disk, and names a disk QEMU opened unencrypted.
func TestDiskStatusRunning(t *testing.T) {
	e := newEnv(t)
	dir := t.TempDir()
	diskImages(t, dir)
	e.define(t, "s2", uuid1, diskDevices(dir))
	ctx := context.Background()
	if _, err := e.m.ProtectWith(ctx, "s2", vmapi.ProtectRequest{Disks: "vda"}, nil); err != nil {
		t.Fatal(err)
	}
	e.lv.active[uuid1] = true
	v, err := e.m.Status(ctx, "s2")
	if err != nil {
		t.Fatal(err)
	}
	if v.Disks[0].OpenedEncrypted == nil || !*v.Disks[0].OpenedEncrypted || v.Disks[0].LUKS != nil || v.Disks[1].Protected || len(v.Problems) != 0 {
		t.Fatalf("status %+v %+v", v.Disks, v.Problems)
	}
	e.lv.openedPlain = map[string]bool{"vda": true}
	v, _ = e.m.Status(ctx, "s2")
	if len(v.Problems) != 1 || !strings.Contains(v.Problems[0], "disk vda (key ") || !strings.Contains(v.Problems[0], "unencrypted") {
		t.Fatalf("problems %v", v.Problems)
	}
	// protect on the running VM adds nothing, and says so.
	e.lv.active[uuid1] = false
	v, err = e.m.ProtectWith(ctx, "s2", vmapi.ProtectRequest{Disks: "vdb"}, nil)
	if err != nil || !v.Disks[1].Protected {
		t.Fatalf("adding vdb: %+v %v", v, err)
	}
}

func TestBlockEncrypted(t *testing.T) {
	live := []byte(`<domain><devices>
<disk type='file' device='disk'><source file='/a'/><target dev='vda'/><alias name='virtio-disk0'/></disk>
<disk type='file' device='disk'><source file='/b'/><target dev='sda'/><alias name='sata0-0-0'/></disk>
<disk type='file' device='cdrom'><target dev='sdb'/><alias name='sata0-0-1'/></disk>
</devices></domain>`)
	qb := []byte(`{"return":[{"device":"","qdev":"/machine/peripheral/virtio-disk0/virtio-backend","inserted":{"encrypted":true}},
{"device":"","qdev":"sata0-0-0","inserted":{"encrypted":false}},{"device":"","qdev":"sata0-0-1"}],"id":"x"}`)
	got, err := BlockEncrypted(live, qb)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 2 || !got["vda"] || got["sda"] {
		t.Fatalf("BlockEncrypted = %v", got)
	}
	if _, err := BlockEncrypted(live, []byte("nope")); err == nil {
		t.Fatal("bad JSON accepted")
	}
}

// TestRemoveOriginal protects with --remove-original: the original top file goes once
// the domain uses its copy (its backing file stays), and nothing is kept for finalize.
func TestRemoveOriginal(t *testing.T) {
	e := newEnv(t)
	dir := t.TempDir()
	diskImages(t, dir)
	e.define(t, "ro1", uuid1, diskDevices(dir))
	ctx := context.Background()
	v, err := e.m.ProtectWith(ctx, "ro1", vmapi.ProtectRequest{Disks: "vdb", RemoveOriginal: true}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(v.Note, "the original "+dir+"/vdb.qcow2 removed") || len(v.Disks[1].Originals) != 0 || v.Disks[0].Protected {
		t.Fatalf("note %q, disks %+v", v.Note, v.Disks)
	}
	if _, err := os.Stat(filepath.Join(dir, "vdb.qcow2")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("original: %v", err)
	}
	if _, err := os.Stat(filepath.Join(dir, "base.qcow2")); err != nil {
		t.Fatalf("backing file: %v", err)
	}
	e.checkDisk(t, uuid1, "vdb", dir, 1)
	e.checkDisk(t, uuid1, "vda", dir, 0)
}

// TestDiskConvertFails runs protect with a qemu-img whose convert writes part of the new
// file and fails as on a full disk: the partial file is removed, and the domain, the
// catalog, the secrets and the vTPM state are as before; the sentence says where space
// is needed.
func TestDiskConvertFails(t *testing.T) {
	e2e.Require(t, "qemu-img", "qemu-io")
	real, _ := exec.LookPath("qemu-img")
	wrap := filepath.Join(t.TempDir(), "qemu-img")
	script := "#!/bin/sh\nif [ \"$1\" = convert ]; then\n  for a; do last=\"$a\"; done\n  head -c 65536 /dev/zero > \"$last\"\n  echo \"qemu-img: error while writing at byte 65536: No space left on device\" >&2\n  exit 1\nfi\nexec " + real + " \"$@\"\n"
	if err := os.WriteFile(wrap, []byte(script), 0o700); err != nil {
		t.Fatal(err)
	}
	e := newEnv(t)
	e.m.cfg.QemuImg = &qemuimg.Tool{Path: wrap}
	dir := t.TempDir()
	diskImages(t, dir)
	e.define(t, "f1", uuid1, diskDevices(dir))
	ctx := context.Background()
	before, _ := e.lv.DomainXML(ctx, uuid1)
	_, err := e.m.Protect(ctx, "f1")
	if !errors.Is(err, ErrNoSpace) || !strings.Contains(err.Error(), "disk vda: converting into "+dir+"/vda.img.nkp-") || !strings.Contains(err.Error(), "the partial file is removed and nothing else was changed") {
		t.Fatalf("err = %v", err)
	}
	if after, _ := e.lv.DomainXML(ctx, uuid1); string(after) != string(before) {
		t.Fatal("the domain changed")
	}
	ents, _ := os.ReadDir(dir)
	for _, en := range ents {
		if strings.Contains(en.Name(), ".nkp-") {
			t.Fatalf("partial file %s left", en.Name())
		}
	}
	if len(e.sec.defined()) != 0 {
		t.Fatalf("secrets %v", e.sec.defined())
	}
	if _, ok := e.cat.get(uuid1, domxml.ObjectVTPM); ok {
		t.Fatal("catalog entry left")
	}
	if ents, _ := os.ReadDir(filepath.Join(e.m.cfg.VTPMDir, uuid1)); len(ents) != 0 {
		t.Fatalf("vTPM state left: %v", ents)
	}
	if _, err := os.Stat(e.m.j.path(uuid1)); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("journal left: %v", err)
	}
}

// TestReadOnlyDiskDir: a disk whose directory is read-only (a read-only bind mount, an
// NFS export mounted ro): protect is refused saying why, and leaves no unfinished
// operation behind (unlink on a read-only file system fails with EROFS even for a name
// that does not exist, which kept the rollback from finishing).
func TestReadOnlyDiskDir(t *testing.T) {
	e2e.RequireRoot(t)
	e := newEnv(t)
	dir := t.TempDir()
	diskImages(t, dir)
	if err := unix.Mount(dir, dir, "", unix.MS_BIND, ""); err != nil {
		t.Skipf("bind mount: %v", err)
	}
	t.Cleanup(func() { unix.Unmount(dir, unix.MNT_DETACH) })
	if err := unix.Mount("", dir, "", unix.MS_BIND|unix.MS_REMOUNT|unix.MS_RDONLY, ""); err != nil {
		t.Skipf("read-only remount: %v", err)
	}
	e.define(t, "d1", uuid1, diskDevices(dir))
	ctx := context.Background()
	_, err := e.m.ProtectWith(ctx, "d1", vmapi.ProtectRequest{Disks: "vda"}, nil)
	if err == nil {
		t.Fatal("protect wrote into a read-only directory")
	}
	for _, w := range []string{`vm "d1"`, "disk vda", "read-only file system", "must be writable", "nothing was changed"} {
		if !strings.Contains(err.Error(), w) {
			t.Errorf("error %q does not say %q", err, w)
		}
	}
	if strings.Contains(err.Error(), "move it away") {
		t.Errorf("error %q blames a file that does not exist", err)
	}
	if e.m.j.exists(uuid1) {
		t.Fatal("the rollback left the operation unfinished")
	}
	v, err := e.m.Status(ctx, "d1")
	if err != nil || v.Protected || len(v.Problems) != 0 {
		t.Fatalf("status after the refusal: %+v %v", v, err)
	}
}
