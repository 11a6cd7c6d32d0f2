package swtpmtools

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nkp-dev/nkp/test/e2e"
)

// EnvSwtpmSource names the environment variable that points at an unpacked swtpm
// source tree; when set, TestUpstreamSuite runs the scripts of its tests/ directory
// instead of the copy in testdata.
const EnvSwtpmSource = "NKP_SWTPM_SRC"

// vendoredTests is the copy of swtpm's test scripts that TestUpstreamSuite runs by
// default (see its README.md for where they come from and what was changed).
const vendoredTests = "testdata/swtpm-tests"

// upstreamScript is one of swtpm's own test scripts (tests/ of its source).
type upstreamScript struct {
	// file is the script's name in tests/.
	file string
	// perInterface runs the script once per socket interface pair with
	// SWTPM_INTERFACE set, as upstream's wrapper test_tpm2_X does for _test_tpm2_X;
	// otherwise it runs once and sets up its own sockets.
	perInterface bool
	// env is added to the script's environment.
	env []string
	// feature, when set, is a --print-capabilities feature the script needs: a
	// backend without it (swtpm 0.7.1 lacks some that nkp-swtpm has) skips it.
	feature string
	// interfaces, when set, are the interface pairs of a perInterface script, as its
	// upstream wrapper chooses them (otherwise upstreamInterfaces).
	interfaces []string
	// testUser runs the script as root with TESTUSER and TESTGROUP (nobody and its
	// group) set, as its upstream wrapper does, and SWTPM_EXE a copy of the backend
	// that user can run.
	testUser bool
	// root says the script needs root (swtpm_localca keeps its CA in
	// /var/lib/swtpm-localca).
	root bool
	// skip, when set, says why the script is not run at all.
	skip string
}

// upstreamScripts are the TPM 2.0 scripts of swtpm's test suite that apply to a
// socket-only TPM 2.0 server, and the ones left out with the reason.
var upstreamScripts = []upstreamScript{
	{file: "_test_tpm2_init", perInterface: true},
	{file: "_test_tpm2_getcap", perInterface: true},
	{file: "_test_tpm2_probe", perInterface: true},
	{file: "_test_tpm2_wrongorder", perInterface: true},
	{file: "_test_tpm2_locality", perInterface: true},
	{file: "_test_tpm2_hashing", perInterface: true},
	{file: "_test_tpm2_savestate", perInterface: true},
	{file: "_test_tpm2_volatilestate", perInterface: true},
	{file: "_test_tpm2_save_load_state", perInterface: true},
	{file: "_test_tpm2_save_load_encrypted_state", perInterface: true},
	// 15 s of waiting out lockouts per run; the interface does not matter to what it
	// checks (dictionary-attack lockout kept across --save/--load of the state).
	{file: "_test_tpm2_save_load_state_da_timeout", perInterface: true, interfaces: []string{"unix+unix"}},
	{file: "_test_tpm2_setbuffersize", perInterface: true},
	{file: "_test_tpm2_swtpm_bios", perInterface: true},
	{file: "_test_tpm2_hashing2", perInterface: true},
	{file: "_test_tpm2_hashing3", perInterface: true},
	{file: "_test_tpm2_encrypted_state", perInterface: true},
	{file: "_test_tpm2_avoid_da_lockout", perInterface: true, feature: "flags-opt-disable-auto-shutdown"},
	{file: "_test_tpm2_print_states", env: []string{"SWTPM_IFACE=socket"}},
	{file: "test_tpm2_ctrlchannel2"},
	{file: "_test_tpm2_resume_volatile", perInterface: true},
	{file: "_test_tpm2_migration_key", perInterface: true},
	{file: "_test_tpm2_file_permissions", perInterface: true, interfaces: []string{"socket+socket"}, testUser: true},
	{file: "test_tpm2_parameters", root: true},
	{file: "_test_tpm2_derived_keys", skip: "checks that keys derived from upstream's tests/data/tpm2state3 (made by an older libtpms) match signatures stored with it; a state made here could not show that"},
	{file: "test_tpm2_save_load_state_2", skip: "needs IBM's TSS tools (SWTPM_TEST_IBMTSS2) and upstream's binary tpm2state3-5 with their keys and signatures"},
	{file: "test_tpm2_save_load_state_3", skip: "needs IBM's TSS tools (SWTPM_TEST_IBMTSS2) and upstream's binary tpm2state3-5 with their keys and signatures"},
	{file: "test_tpm2_ibmtss2", skip: "runs IBM TSS's own regression suite from its source tree (SWTPM_TEST_EXPENSIVE), which is not here"},
	{file: "_test_tpm2_swtpm_cert", skip: "tests swtpm_cert alone (no TPM server); in TestSwtpmSetup, swtpm_localca (which runs swtpm_cert) makes the EK and platform certificates stored in nkp-swtpm"},
	{file: "_test_tpm2_print_capabilities", skip: "expects swtpm's exact feature list; nkp-swtpm lists the features it implements (some from swtpm 0.8 to 0.10), pinned by TestPrintCapabilitiesAndStates"},
	{file: "_test_tpm2_save_load_state_locking", skip: "needs swtpm_ioctl --lock-storage (swtpm 0.8+; Debian 12's is 0.7.1), and expects no lock before INIT where nkp-swtpm locks its state from the start; TestSharedStorageMigration covers the lock and release-lock-outgoing"},
	{file: "test_ctrlchannel3", skip: "TPM 1.2 only (the script itself skips without a TPM 1.2)"},
	{file: "test_ctrlchannel4", skip: "TPM 1.2 and chardev only"},
	{file: "test_tpm2_vtpm_proxy", skip: "nkp-swtpm has no chardev or vtpm-proxy mode (socket only)"},
	{file: "test_tpm2_cuse", skip: "nkp-swtpm has no CUSE mode (socket only)"},
}

// upstreamInterfaces are the interface pairs upstream's wrappers run a _test_tpm2_X
// script with, less CUSE.
var upstreamInterfaces = []string{"socket+socket", "socket+unix", "unix+unix"}

// TestUpstreamSuite runs swtpm's own test scripts against Debian's swtpm and
// nkp-swtpm: by default the copy in testdata/swtpm-tests, or the tests/ directory of
// the swtpm source tree that $NKP_SWTPM_SRC names. Every script must pass on swtpm
// too, which shows that the harness and the script's expectations fit swtpm 0.7.1 with
// this libtpms.
func TestUpstreamSuite(t *testing.T) {
	dir, vendored := vendoredTests, true
	if src := os.Getenv(EnvSwtpmSource); src != "" {
		dir, vendored = filepath.Join(src, "tests"), false
	}
	if _, err := os.Stat(filepath.Join(dir, "common")); err != nil {
		t.Fatalf("swtpm's test scripts are not in %s (%v); unset %s to run the copy in %s, or point it at an unpacked swtpm source tree", dir, err, EnvSwtpmSource, vendoredTests)
	}
	e2e.Require(t, "bash", "socat", "swtpm_ioctl", "swtpm_bios", "ss", "tpm2_pcrextend", "swtpm_setup")
	if vendored {
		// The scripts copy state files from tests/data: make them in a copy of the
		// scripts (the source tree stays as it is).
		work := t.TempDir()
		if err := os.CopyFS(work, os.DirFS(dir)); err != nil {
			t.Fatalf("copying %s: %v", dir, err)
		}
		makeUpstreamData(t, filepath.Join(work, "data"))
		dir = work
	}
	ioctl, _ := exec.LookPath("swtpm_ioctl")
	bios, _ := exec.LookPath("swtpm_bios")
	forEachBackend(t, func(t *testing.T, be backend) {
		exe := be.get(t).Path
		for _, s := range upstreamScripts {
			t.Run(s.file, func(t *testing.T) {
				if s.skip != "" {
					t.Skip(s.skip)
				}
				if _, err := os.Stat(filepath.Join(dir, s.file)); err != nil {
					if vendored {
						t.Fatalf("%s is listed but not in %s: %v", s.file, dir, err)
					}
					t.Skipf("%s is not in %s: %v", s.file, dir, err)
				}
				if s.root {
					e2e.RequireRoot(t)
				}
				if s.feature != "" && !hasFeature(t, be, s.feature) {
					t.Skipf("%s does not list %q in --print-capabilities", be.name, s.feature)
				}
				env := append([]string{"SWTPM_IOCTL=" + ioctl, "SWTPM_BIOS=" + bios}, s.env...)
				if s.testUser {
					env = append(env, testUserEnv(t, exe)...)
				} else {
					env = append(env, "SWTPM_EXE="+exe)
				}
				if !s.perInterface {
					runUpstreamScript(t, dir, s.file, env)
					return
				}
				ifaces := upstreamInterfaces
				if s.interfaces != nil {
					ifaces = s.interfaces
				}
				for _, iface := range ifaces {
					t.Run(iface, func(t *testing.T) {
						port := freePortPair(t)
						e := append(env, "SWTPM_INTERFACE="+iface, "SWTPM_SERVER_NAME=localhost",
							fmt.Sprintf("SWTPM_SERVER_PORT=%d", port), fmt.Sprintf("SWTPM_CTRL_PORT=%d", port+1))
						runUpstreamScript(t, dir, s.file, e)
					})
				}
			})
		}
	})
}

// testUserEnv returns the environment of a script that drops privileges to TESTUSER
// (nobody): TESTUSER, TESTGROUP, and SWTPM_EXE a copy of exe in a directory that user
// may traverse (a built nkp-swtpm lies in a 0700 temporary directory). It needs root.
func testUserEnv(t *testing.T, exe string) []string {
	t.Helper()
	e2e.RequireRoot(t)
	e2e.Require(t, "su", "file", "swtpm_setup")
	u, err := user.Lookup("nobody")
	if err != nil {
		e2e.Unavailable(t, fmt.Sprintf("no user nobody to run as: %v", err))
	}
	g, err := user.LookupGroupId(u.Gid)
	if err != nil {
		e2e.Unavailable(t, fmt.Sprintf("no group %s for user nobody: %v", u.Gid, err))
	}
	b, err := os.ReadFile(exe)
	if err != nil {
		t.Fatal(err)
	}
	copied := filepath.Join(e2e.TraversableDir(t, "nkp-upstream-exe-"), filepath.Base(exe))
	if err := os.WriteFile(copied, b, 0o755); err != nil {
		t.Fatal(err)
	}
	// su -m keeps $SHELL; nobody's own shell is nologin.
	return []string{"TESTUSER=" + u.Username, "TESTGROUP=" + g.Name, "SWTPM_EXE=" + copied, "SHELL=/bin/bash"}
}

// runUpstreamScript runs one script with bash in dir (bounded), passes on exit 0
// (logging the script's "OK" lines), skips on 77 (automake's "skipped"; a failure
// under NKP_E2E=required, as every listed script can run where the tools are), and
// fails with the script's output otherwise.
func runUpstreamScript(t *testing.T, dir, file string, env []string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "bash", file)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), env...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	cmd.WaitDelay = 5 * time.Second
	err := cmd.Run()
	var exit *exec.ExitError
	switch {
	case err == nil:
		t.Logf("%s passed: %s", file, okLines(out.String()))
	case errors.As(err, &exit) && exit.ExitCode() == 77:
		e2e.Unavailable(t, fmt.Sprintf("%s skipped itself: %s", file, lastLines(out.String(), 3)))
	case ctx.Err() != nil:
		t.Fatalf("%s did not finish within 3 minutes; output:\n%s", file, lastLines(out.String(), 40))
	default:
		t.Fatalf("%s failed (%v); output:\n%s", file, err, lastLines(out.String(), 40))
	}
}

// okLines returns the lines of a script's output that report a passed part ("Test 2:
// OK", "OK", "Test 7: SUCCESS" without the rest of the line), joined by "; ".
func okLines(s string) string {
	var ok []string
	for _, l := range strings.Split(s, "\n") {
		l = strings.TrimSpace(l)
		if i := strings.Index(l, ": SUCCESS"); i >= 0 {
			ok = append(ok, l[:i+len(": SUCCESS")])
		} else if strings.HasSuffix(strings.ToUpper(l), "OK") && len(l) < 40 {
			ok = append(ok, l)
		}
	}
	return strings.Join(ok, "; ")
}

// lastLines returns the last n lines of s.
func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
