package hooks

import (
	"bytes"
	"path/filepath"
	"strings"
	"testing"

	"github.com/nkp-dev/nkp/hooks/hookproto"
)

// FuzzMain feeds the hook arbitrary argv and stdin with hostd absent. It must never panic;
// a domain without nkp's namespace always passes silently; a protected one is refused,
// naming the domain, whenever the operation is required.
func FuzzMain(f *testing.F) {
	f.Add("vm1\x00prepare\x00begin\x00-", []byte(protectedXML))
	f.Add("vm1\x00release\x00end\x00-", []byte(protectedXML))
	f.Add("plain\x00prepare\x00begin\x00-", []byte(plainXML))
	f.Add("--socket=/nonexistent\x00vm\x00prepare\x00begin\x00-", []byte("<x xmlns='https://nkp.dev/ns/vm/1'>"))
	f.Add("", []byte{})
	f.Fuzz(func(t *testing.T, argv string, stdin []byte) {
		args := strings.Split(argv, "\x00")
		sock := filepath.Join(t.TempDir(), "absent.sock")
		var stderr bytes.Buffer
		code := Main(args, bytes.NewReader(stdin), &stderr, env(map[string]string{"NKP_HOOK_SOCKET": sock, "NKP_HOOK_CONFIG": "/dev/null"}))
		if !hookproto.Protected(stdin) {
			if code != 0 || stderr.Len() != 0 {
				t.Fatalf("unprotected domain: exit %d, stderr %q", code, stderr.String())
			}
			return
		}
		if len(args) == 4 && !strings.HasPrefix(args[0], "--") && hookproto.Required(args[1]) {
			if code != 1 || !strings.Contains(stderr.String(), "nkp: VM") {
				t.Fatalf("protected domain, hostd absent, op %q: exit %d, stderr %q", args[1], code, stderr.String())
			}
		}
	})
}
