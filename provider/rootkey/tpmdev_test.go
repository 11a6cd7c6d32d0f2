package rootkey_test

import (
	"strings"
	"testing"

	"github.com/nkp-dev/nkp/provider/rootkey"
)

func TestParseTPMSpec(t *testing.T) {
	tests := []struct {
		spec, kind, path, wantErr string
	}{
		{"/dev/tpmrm0", "device", "/dev/tpmrm0", ""},
		{"swtpm:path=/run/swtpm/data.sock", "swtpm", "/run/swtpm/data.sock", ""},
		{"swtpm:/run/x", "", "", "swtpm:path=SOCKET"},
		{"swtpm:path=", "", "", "swtpm:path=SOCKET"},
		{"swtpm:path=/a,mode=0600", "", "", "swtpm:path=SOCKET"},
		{"tpmrm0", "", "", "/dev/tpmrm0"},
		{"", "", "", "/dev/tpmrm0"},
	}
	for _, tc := range tests {
		t.Run(tc.spec, func(t *testing.T) {
			kind, path, err := rootkey.ParseTPMSpec(tc.spec)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("ParseTPMSpec(%q) = %q, %q, %v; want an error naming %q", tc.spec, kind, path, err, tc.wantErr)
				}
				return
			}
			if err != nil || kind != tc.kind || path != tc.path {
				t.Fatalf("ParseTPMSpec(%q) = %q, %q, %v; want %q, %q", tc.spec, kind, path, err, tc.kind, tc.path)
			}
		})
	}
}

func TestOpenTPMMissingSocket(t *testing.T) {
	_, err := rootkey.OpenTPM("swtpm:path=" + t.TempDir() + "/none.sock")
	if err == nil || !strings.Contains(err.Error(), "is swtpm running") {
		t.Fatalf("OpenTPM of a missing socket: %v, want an error asking whether swtpm runs", err)
	}
}
