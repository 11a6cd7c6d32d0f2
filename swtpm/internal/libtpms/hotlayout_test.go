package libtpms

import (
	"os"
	"os/exec"
	"regexp"
	"slices"
	"strings"
	"testing"
)

// hot.ld names objects of the installed libcrypto.a and libtpms.a (make build links
// them first); a pattern that matches no member is silently useless, so an OpenSSL or
// libtpms update that renames objects must show here: regenerate hot.ld with
// hotlayout.sh. The three sections list the same objects.
func TestHotLayout(t *testing.T) {
	script, err := os.ReadFile("hot.ld")
	if err != nil {
		t.Fatal(err)
	}
	members := map[string]map[string]bool{}
	for _, ar := range []string{"libcrypto.a", "libtpms.a"} {
		path, err := exec.Command("gcc", "-print-file-name="+ar).Output()
		if err != nil || !strings.Contains(string(path), "/") {
			t.Skipf("gcc does not find %s (%v): the static archives are not installed", ar, err)
		}
		out, err := exec.Command("ar", "t", strings.TrimSpace(string(path))).Output()
		if err != nil {
			t.Skipf("ar t %s: %v", strings.TrimSpace(string(path)), err)
		}
		members[ar] = map[string]bool{}
		for _, m := range strings.Fields(string(out)) {
			members[ar][m] = true
		}
	}
	re := regexp.MustCompile(`(?m)^\s*\*(libcrypto\.a|libtpms\.a):(\S+)\((\.[a-z.]+) `)
	bySection := map[string][]string{}
	for _, m := range re.FindAllStringSubmatch(string(script), -1) {
		if !members[m[1]][m[2]] {
			t.Errorf("hot.ld names %s:%s, which the installed %s does not have: regenerate hot.ld (swtpm/internal/libtpms/hotlayout.sh)", m[1], m[2], m[1])
		}
		bySection[m[3]] = append(bySection[m[3]], m[1]+":"+m[2])
	}
	text := bySection[".text"]
	if len(text) < 50 {
		t.Fatalf("hot.ld lists %d objects for .text, want the ~200 a vTPM runs until idle", len(text))
	}
	for _, sec := range []string{".rodata", ".data.rel.ro"} {
		if !slices.Equal(bySection[sec], text) {
			t.Errorf("hot.ld: the %s objects differ from the .text ones", sec)
		}
	}
}
