// Package nkp_test enforces the import rules of DESIGN.md ("Packages and who may
// import whom", also drawn in docs/DEVELOPING.md). Rules name packages by pattern; a
// rule whose packages do not exist yet applies as soon as they appear. Only non-test
// imports count: a test may link anything.
package nkp_test

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"slices"
	"strings"
	"testing"
)

const module = "github.com/nkp-dev/nkp"

// pkg is what `go list -deps -json` says about one package.
type pkg struct {
	ImportPath string
	Deps       []string // transitive, sorted
	CgoFiles   []string
	Standard   bool
}

// rule constrains the packages matching Of (patterns relative to the module: "a/b"
// is that package, "a/..." is a and everything below it).
type rule struct {
	Of  []string
	Why string
	// StdlibOnly: no dependency outside the standard library.
	StdlibOnly bool
	// NKP, if not nil: the module packages it may depend on (transitively), besides
	// the packages matching Of.
	NKP []string
	// NoCgo: nothing it links has cgo files, the standard library's included (net and
	// os/user use cgo when it is enabled).
	NoCgo bool
	// NoNKP: module packages it must never depend on.
	NoNKP []string
}

var rules = []rule{
	{
		Of:         []string{"provider/apiv1"},
		Why:        "the wire contract (types, paths, error codes) that server and client share: standard library only",
		StdlibOnly: true,
	},
	{
		Of:         []string{"provider/kdk"},
		Why:        "KDK and HKDF derivation: pure, importable by hostd, a break-glass tool and tests",
		StdlibOnly: true,
	},
	{
		Of:  []string{"provider/client"},
		Why: "hostd and nkpctl link no server code: the client imports only the wire package",
		NKP: []string{"provider/apiv1"},
	},
	{
		Of:    []string{"swtpm/cmdline"},
		Why:   "the swtpm command line without cgo, so hostd does not link libtpms",
		NoCgo: true,
	},
	{
		Of:  []string{"hostd/...", "cmd/nkp-hostd"},
		Why: "hostd may use the provider's client, wire and derivation packages, never the provider's domain or stores",
		NKP: []string{
			"provider/client", "provider/apiv1", "provider/kdk",
			"swtpm/cmdline", "swtpm/ctrl",
			// Shallow rekey re-encrypts a stopped VM's vTPM state files in hostd/vm,
			// without running nkp-swtpm: the state store and its envelope, which link no
			// cgo (the cgo rule below keeps libtpms out of hostd).
			"swtpm/state", "swtpm/envelope",
			"hooks/hookproto", // the protocol hostd answers the hook with
			"qemuimg/...", "systemd/...", "internal/...",
		},
	},
	{
		Of:    []string{"hooks"},
		Why:   "the libvirt hook runs at every domain start: its protocol package and the scheduler hint (internal/schedslice, x/sys only), no cgo",
		NKP:   []string{"hooks/hookproto", "internal/schedslice"},
		NoCgo: true,
	},
	{
		Of:    []string{"hooks/hookproto"},
		Why:   "the hook's protocol, shared by the hook and hostd: nothing of nkp, no cgo",
		NKP:   []string{},
		NoCgo: true,
	},
	{
		Of:    []string{"cmd/nkp-hook"},
		Why:   "the hook program: the hook, its protocol and the scheduler hint only, no cgo",
		NKP:   []string{"hooks", "hooks/hookproto", "internal/schedslice"},
		NoCgo: true,
	},
	{
		Of:    []string{"provider/...", "swtpm/...", "qemuimg/...", "cmd/nkp-provider", "cmd/nkp-swtpm"},
		Why:   "provider, swtpm and qemuimg are below hostd and never import it",
		NoNKP: []string{"hostd/..."},
	},
}

// cgoAllowed says which packages may link a non-standard package with cgo files:
// libtpms (inside swtpm/) only swtpm's own packages and its program; libvirt's Go
// binding anyone who drives libvirt. Any other cgo dependency needs a rule here.
var cgoAllowed = map[string][]string{
	module + "/swtpm/internal/libtpms": {"swtpm/...", "cmd/nkp-swtpm"},
	// An ELF constructor that makes nkp-swtpm's Go runtime start with one P (it must
	// run before the runtime, so it is C); linked by swtpm/cli for nkp-swtpm only.
	module + "/swtpm/internal/oneproc": {"swtpm/...", "cmd/nkp-swtpm"},
	// A C handler for SIGTERM, SIGINT and SIGHUP instead of os/signal, which keeps two
	// OS threads per process; linked by swtpm/cli for nkp-swtpm only.
	module + "/swtpm/internal/termsig": {"swtpm/...", "cmd/nkp-swtpm"},
	"libvirt.org/go/libvirt":           {"..."},
	// hostd's libvirt adapter calls virSecretSetValue itself: the binding's SetValue
	// copies a disk's passphrase into a Go buffer it never wipes.
	module + "/hostd/virt": {"hostd/...", "cmd/nkp-hostd"},
}

// match reports whether the module package path p (relative) matches pattern.
func match(pattern, p string) bool {
	if pattern == "..." {
		return true
	}
	if base, ok := strings.CutSuffix(pattern, "/..."); ok {
		return p == base || strings.HasPrefix(p, base+"/")
	}
	return p == pattern
}

func matchAny(patterns []string, p string) bool {
	return slices.ContainsFunc(patterns, func(pat string) bool { return match(pat, p) })
}

// rel returns p relative to the module, and whether it is in the module.
func rel(p string) (string, bool) {
	if p == module {
		return ".", true
	}
	r, ok := strings.CutPrefix(p, module+"/")
	return r, ok
}

// listPackages runs go list once over the module (with cgo on, so that cgo files show).
func listPackages(t *testing.T) map[string]*pkg {
	t.Helper()
	goTool, err := exec.LookPath("go")
	if err != nil {
		t.Skip("no go command in PATH")
	}
	cmd := exec.Command(goTool, "list", "-deps", "-json=ImportPath,Deps,CgoFiles,Standard", "./...")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=1")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("go list -deps ./...: %v\n%s", err, stderr.String())
	}
	pkgs := map[string]*pkg{}
	dec := json.NewDecoder(bytes.NewReader(out))
	for {
		var p pkg
		if err := dec.Decode(&p); errors.Is(err, io.EOF) {
			break
		} else if err != nil {
			t.Fatalf("go list output: %v", err)
		}
		pkgs[p.ImportPath] = &p
	}
	return pkgs
}

func TestImportRules(t *testing.T) {
	pkgs := listPackages(t)
	n := 0
	for path := range pkgs {
		if _, ok := rel(path); ok {
			n++
		}
	}
	if n < 10 {
		t.Fatalf("go list found only %d packages of %s", n, module)
	}
	for _, v := range violations(pkgs) {
		t.Error(v)
	}
}

// violations checks every module package in pkgs against the rules.
func violations(pkgs map[string]*pkg) []string {
	var mine []string
	for path := range pkgs {
		if _, ok := rel(path); ok {
			mine = append(mine, path)
		}
	}
	slices.Sort(mine)
	var out []string
	for _, path := range mine {
		p := pkgs[path]
		r, _ := rel(path)
		for _, ru := range rules {
			if !matchAny(ru.Of, r) {
				continue
			}
			for _, d := range p.Deps {
				dp := pkgs[d]
				dr, inModule := rel(d)
				switch {
				case ru.StdlibOnly && dp != nil && !dp.Standard:
					out = append(out, fmt.Sprintf("%s imports %s, but it may import the standard library only: %s", r, d, ru.Why))
				case inModule && ru.NKP != nil && !matchAny(ru.Of, dr) && !matchAny(ru.NKP, dr):
					out = append(out, fmt.Sprintf("%s imports %s, but of nkp it may import only %s: %s", r, dr, strings.Join(ru.NKP, ", "), ru.Why))
				case inModule && matchAny(ru.NoNKP, dr):
					out = append(out, fmt.Sprintf("%s imports %s: %s", r, dr, ru.Why))
				case ru.NoCgo && dp != nil && len(dp.CgoFiles) > 0:
					out = append(out, fmt.Sprintf("%s links %s, which has cgo files (%s): %s", r, d, strings.Join(dp.CgoFiles, " "), ru.Why))
				}
			}
			if ru.NoCgo && len(p.CgoFiles) > 0 {
				out = append(out, fmt.Sprintf("%s has cgo files (%s): %s", r, strings.Join(p.CgoFiles, " "), ru.Why))
			}
		}
		// cgo stays inside swtpm/ (libtpms) and with libvirt's binding.
		for _, d := range append(slices.Clone(p.Deps), path) {
			dp := pkgs[d]
			if dp == nil || dp.Standard || len(dp.CgoFiles) == 0 {
				continue
			}
			who, ok := cgoAllowed[d]
			if !ok {
				out = append(out, fmt.Sprintf("%s links %s, a package with cgo files; cgo stays inside swtpm/ and libvirt's binding (add a rule to deps_test.go only with a reason)", r, d))
				continue
			}
			if !matchAny(who, r) {
				out = append(out, fmt.Sprintf("%s links %s (cgo), which only %s may link", r, d, strings.Join(who, ", ")))
			}
		}
	}
	return out
}

// TestRulesCatch runs the rules over a made-up graph with one break of each kind.
func TestRulesCatch(t *testing.T) {
	m := func(p string) string { return module + "/" + p }
	std := func(p string, cgo ...string) *pkg { return &pkg{ImportPath: p, Standard: true, CgoFiles: cgo} }
	pkgs := map[string]*pkg{}
	for _, p := range []*pkg{
		std("fmt"), std("net", "cgo_linux.go"),
		{ImportPath: "github.com/google/uuid"},
		{ImportPath: "libvirt.org/go/libvirt", CgoFiles: []string{"connect.go"}},
		{ImportPath: "example.com/sim", CgoFiles: []string{"sim.go"}},
		{ImportPath: m("swtpm/internal/libtpms"), CgoFiles: []string{"libtpms.go"}},
		{ImportPath: m("provider/store")},
		{ImportPath: m("provider/apiv1"), Deps: []string{"fmt", "github.com/google/uuid"}},
		{ImportPath: m("provider/client"), Deps: []string{m("provider/apiv1"), m("provider/store")}},
		{ImportPath: m("hooks/hookproto"), Deps: []string{"fmt"}},
		{ImportPath: m("hooks"), Deps: []string{m("hooks/hookproto"), "net"}},
		{ImportPath: m("hostd/vm"), Deps: []string{m("provider/apiv1"), m("provider/store"), "libvirt.org/go/libvirt"}},
		{ImportPath: m("hostd/vtpm"), Deps: []string{m("swtpm/internal/libtpms")}},
		{ImportPath: m("qemuimg"), Deps: []string{m("hostd/vm")}},
		{ImportPath: m("test/bench/x"), Deps: []string{"example.com/sim"}},
		{ImportPath: m("swtpm/cli"), Deps: []string{m("swtpm/internal/libtpms")}},
	} {
		pkgs[p.ImportPath] = p
	}
	got := strings.Join(violations(pkgs), "\n")
	for _, want := range []string{
		"provider/apiv1 imports github.com/google/uuid, but it may import the standard library only",
		"provider/client imports provider/store, but of nkp it may import only provider/apiv1",
		"hooks links net, which has cgo files",
		"hostd/vm imports provider/store, but of nkp it may import only",
		"hostd/vtpm links github.com/nkp-dev/nkp/swtpm/internal/libtpms (cgo), which only swtpm/..., cmd/nkp-swtpm may link",
		"qemuimg imports hostd/vm: provider, swtpm and qemuimg are below hostd",
		"test/bench/x links example.com/sim, a package with cgo files",
	} {
		if !strings.Contains(got, want) {
			t.Errorf("no violation %q in:\n%s", want, got)
		}
	}
	for _, line := range strings.Split(got, "\n") {
		for _, allowed := range []string{"hostd/vm links libvirt.org", "swtpm/cli ", "hooks/hookproto "} {
			if strings.HasPrefix(line, allowed) {
				t.Errorf("violation reported for an allowed import: %s", line)
			}
		}
	}
}

// TestRulesMatch keeps the rules honest: every pattern matches the packages meant, and
// a package that moves does not silently escape its rule.
func TestRulesMatch(t *testing.T) {
	tests := []struct {
		pattern, path string
		want          bool
	}{
		{"hostd/...", "hostd", true},
		{"hostd/...", "hostd/vm/vmapi", true},
		{"hostd/...", "hostdx", false},
		{"provider/apiv1", "provider/apiv1", true},
		{"provider/apiv1", "provider/apiv1/x", false},
		{"...", "anything", true},
	}
	for _, tt := range tests {
		if got := match(tt.pattern, tt.path); got != tt.want {
			t.Errorf("match(%q, %q) = %v, want %v", tt.pattern, tt.path, got, tt.want)
		}
	}
	for _, ru := range rules {
		if ru.Why == "" || len(ru.Of) == 0 {
			t.Errorf("rule %+v needs packages and a reason", ru)
		}
	}
}
