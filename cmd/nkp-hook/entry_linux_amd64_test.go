package main

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nkp-dev/nkp/hooks/hookproto"
)

// FuzzHasNamespace checks the entry's byte search against hookproto.Protected, which
// hooks.Main uses: they must agree on every input, or a protected domain could take the
// fast path.
func FuzzHasNamespace(f *testing.F) {
	ns := hookproto.Namespace
	for _, s := range []string{"", "h", ns, ns[:len(ns)-1], "x" + ns, ns + "x", "https://nkp.dev/ns/vm/2" + ns[1:], strings.Repeat("https://nkp.dev/ns/vm/", 3) + "1"} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		if got, want := hasNamespace(b), hookproto.Protected(b); got != want {
			t.Fatalf("hasNamespace(%q) = %v, hookproto.Protected says %v", b, got, want)
		}
	})
}

// TestEntry builds nkp-hook with and without its entry point and runs both on the same
// inputs: they must exit with the same status and print the same sentences, and the
// entry must answer a domain that is not nkp's without starting the Go runtime (with
// GODEBUG=inittrace=1 the runtime prints a line per package it initialises).
func TestEntry(t *testing.T) {
	if testing.Short() {
		t.Skip("builds nkp-hook twice")
	}
	goTool, err := exec.LookPath("go")
	if err != nil {
		t.Skip("no go tool to build nkp-hook with")
	}
	dir := t.TempDir()
	withEntry, plain := filepath.Join(dir, "nkp-hook-entry"), filepath.Join(dir, "nkp-hook-plain")
	for _, b := range []struct {
		out   string
		flags []string
	}{{withEntry, []string{"-ldflags=-E=main.entry"}}, {plain, nil}} {
		cmd := exec.Command(goTool, append(append([]string{"build"}, b.flags...), "-o", b.out, ".")...)
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("go build %v: %v\n%s", b.flags, err, out)
		}
	}
	conf := filepath.Join(dir, "hook.conf")
	if err := os.WriteFile(conf, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	plainXML := "<domain type='kvm'><name>web</name><devices/></domain>"
	protXML := `<domain type='kvm'><name>db</name><metadata><nkp:vm xmlns:nkp="` + hookproto.Namespace + `"><nkp:object name="vtpm" key-id="k-123"/></nkp:vm></metadata></domain>`
	pad := func(n int) string { return "<!--" + strings.Repeat("x", n-7) + "-->" }
	ns := hookproto.Namespace
	args := []string{"db", "prepare", "begin", "-"}
	tests := []struct {
		name    string
		stdin   []string // written in these chunks, a pause between them; nil: /dev/null
		dir     bool     // stdin is a directory (read fails)
		args    []string
		status  int
		runtime bool // the Go runtime must start (else it must not)
	}{
		{name: "plain", stdin: []string{plainXML}, args: args},
		{name: "plain in chunks", stdin: []string{plainXML[:10], plainXML[10:20], plainXML[20:]}, args: args},
		{name: "empty", stdin: []string{""}, args: args},
		{name: "plain, wrong arguments", stdin: []string{plainXML}, args: []string{"x"}},
		{name: "protected, no hostd", stdin: []string{protXML}, args: args, status: 1, runtime: true},
		{name: "protected, released", stdin: []string{protXML}, args: []string{"db", "release", "end", "-"}, runtime: true},
		{name: "protected in chunks", stdin: []string{protXML[:60], protXML[60:80], protXML[80:]}, args: args, status: 1, runtime: true},
		{name: "namespace split across the first MiB", stdin: []string{pad(prefixSize-10) + ns + plainXML}, args: args, status: 1, runtime: true},
		{name: "namespace past the first MiB", stdin: []string{pad(prefixSize+100) + protXML}, args: args, status: 1, runtime: true},
		{name: "plain of exactly 1 MiB", stdin: []string{plainXML + pad(prefixSize-len(plainXML))}, args: args, runtime: true},
		{name: "plain over 1 MiB", stdin: []string{plainXML + pad(prefixSize+1)}, args: args, runtime: true},
		{name: "stdin a directory", dir: true, args: args, status: 1, runtime: true},
		{name: "stdin a directory, stopped", dir: true, args: []string{"db", "stopped", "end", "-"}, runtime: true},
		{name: "stdin /dev/null", args: args},
	}
	run := func(t *testing.T, bin string, tc int) (int, string, bool) {
		tt := tests[tc]
		cmd := exec.Command(bin, tt.args...)
		cmd.Env = []string{"GODEBUG=inittrace=1", "NKP_HOOK_CONFIG=" + conf, "NKP_HOOK_SOCKET=" + filepath.Join(dir, "none.sock"), "NKP_HOOK_TIMEOUT=2s"}
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		var w *os.File
		switch {
		case tt.dir:
			d, err := os.Open(dir)
			if err != nil {
				t.Fatal(err)
			}
			defer d.Close()
			cmd.Stdin = d
		case tt.stdin != nil:
			r, pw, err := os.Pipe()
			if err != nil {
				t.Fatal(err)
			}
			defer r.Close()
			cmd.Stdin, w = r, pw
		}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		if w != nil {
			for i, c := range tt.stdin {
				if i > 0 {
					time.Sleep(20 * time.Millisecond)
				}
				w.WriteString(c) // an early exit closes the pipe: EPIPE is fine
			}
			w.Close()
		}
		err := cmd.Wait()
		status := cmd.ProcessState.ExitCode()
		if status < 0 {
			t.Fatalf("%s: %v\n%s", bin, err, stderr.String())
		}
		var lines []string
		started := false
		for _, l := range strings.Split(stderr.String(), "\n") {
			if strings.HasPrefix(l, "init ") {
				started = true
			} else if l != "" {
				lines = append(lines, l)
			}
		}
		return status, strings.Join(lines, "\n"), started
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			status, msg, started := run(t, withEntry, i)
			pStatus, pMsg, _ := run(t, plain, i)
			if status != tt.status || pStatus != tt.status {
				t.Errorf("exit status %d with the entry, %d without, want %d\n%s\n%s", status, pStatus, tt.status, msg, pMsg)
			}
			if msg != pMsg {
				t.Errorf("stderr with the entry:\n%s\nwithout:\n%s", msg, pMsg)
			}
			if tt.status == 1 && !strings.Contains(msg, "db") {
				t.Errorf("refusal does not name the VM:\n%s", msg)
			}
			if started != tt.runtime {
				t.Errorf("Go runtime started: %v, want %v", started, tt.runtime)
			}
		})
	}
}
