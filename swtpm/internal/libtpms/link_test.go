//go:build cgo

package libtpms

import (
	"os"
	"strings"
	"testing"
)

// The test binary is linked as nkp-swtpm is: with -tags nkpstatic libtpms and
// libcrypto are part of it and no shared copy is loaded; by default both are
// Debian's shared libraries. Linked reports the same.
func TestLinked(t *testing.T) {
	maps, err := os.ReadFile("/proc/self/maps")
	if err != nil {
		t.Fatal(err)
	}
	info := Linked()
	for _, lib := range []string{"libtpms.so", "libcrypto.so"} {
		mapped := strings.Contains(string(maps), "/"+lib)
		if mapped == info.Static {
			t.Errorf("%s mapped = %v with Linked().Static = %v: the build tag nkpstatic and the cgo LDFLAGS of engine_cgo.go disagree", lib, mapped, info.Static)
		}
	}
	if !strings.HasPrefix(info.Libtpms, "0.") || strings.Count(info.Libtpms, ".") != 2 {
		t.Errorf("Linked().Libtpms = %q, want a version like 0.9.2", info.Libtpms)
	}
	if !strings.HasPrefix(info.OpenSSL, "OpenSSL 3.") {
		t.Errorf("Linked().OpenSSL = %q, want OpenSSL 3.x", info.OpenSSL)
	}
}
