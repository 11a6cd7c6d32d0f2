package cli

import (
	"strings"
	"testing"
	"time"

	"github.com/nkp-dev/nkp/swtpm"
)

func TestIdleTrimEnv(t *testing.T) {
	tests := []struct {
		v       string
		want    time.Duration
		wantErr string
	}{
		{"", swtpm.DefaultIdleTrim, ""},
		{"off", 0, ""},
		{"0", 0, ""},
		{"10s", 10 * time.Second, ""},
		{"500ms", 500 * time.Millisecond, ""},
		{"2", 0, "want a duration such as 2s, or off"},
		{"-1s", 0, "want a duration such as 2s, or off"},
		{"no", 0, `NKP_SWTPM_IDLE_TRIM="no"`},
	}
	for _, tt := range tests {
		got, err := idleTrim(func(k string) string {
			if k != envIdleTrim {
				t.Errorf("read %s", k)
			}
			return tt.v
		})
		if tt.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("%q: err %v, want one with %q", tt.v, err, tt.wantErr)
			}
			continue
		}
		if err != nil || got != tt.want {
			t.Errorf("%q: %v, %v; want %v", tt.v, got, err, tt.want)
		}
	}
}
