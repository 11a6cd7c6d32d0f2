package logflag

import (
	"bytes"
	"strings"
	"testing"
)

func TestNew(t *testing.T) {
	tests := []struct {
		level, format, want, wantErr string
	}{
		{"info", "json", `"msg":"hello"`, ""},
		{"debug", "text", "msg=hello", ""},
		{"warn", "text", "", ""}, // info is below warn: nothing written
		{"loud", "text", "", `--log-level "loud"`},
		{"info", "xml", "", `--log-format "xml"`},
	}
	for _, tt := range tests {
		var buf bytes.Buffer
		l, err := New(&buf, tt.level, tt.format)
		if tt.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("New(%q, %q) = %v, want an error with %q", tt.level, tt.format, err, tt.wantErr)
			}
			continue
		}
		if err != nil {
			t.Fatal(err)
		}
		l.Info("hello")
		if tt.want == "" && buf.Len() != 0 || !strings.Contains(buf.String(), tt.want) {
			t.Errorf("New(%q, %q) wrote %q, want %q", tt.level, tt.format, buf.String(), tt.want)
		}
	}
}
