package etcdstore

import (
	"bytes"
	"encoding/json"
	"log/slog"
	"strings"
	"testing"

	"go.uber.org/zap"
)

func TestZapToSlog(t *testing.T) {
	var buf bytes.Buffer
	lg := zapToSlog(slog.New(slog.NewJSONHandler(&buf, nil))).With(zap.String("client", "c1"))
	lg.Info("dropped: below warn")
	lg.Warn("retrying of unary invoker failed", zap.String("target", "etcd-endpoints://x"), zap.Int("attempt", 2))
	lg.Error("giving up")
	lines := strings.Split(strings.TrimSpace(buf.String()), "\n")
	if len(lines) != 2 {
		t.Fatalf("%d lines, want 2 (warn and error):\n%s", len(lines), buf.String())
	}
	var warn map[string]any
	if err := json.Unmarshal([]byte(lines[0]), &warn); err != nil {
		t.Fatal(err)
	}
	if warn["level"] != "WARN" || warn["msg"] != "retrying of unary invoker failed" || warn["component"] != "etcd-client" ||
		warn["client"] != "c1" || warn["target"] != "etcd-endpoints://x" || warn["attempt"] != float64(2) {
		t.Fatalf("warn line = %s", lines[0])
	}
	if !strings.Contains(lines[1], `"level":"ERROR"`) {
		t.Fatalf("error line = %s", lines[1])
	}
	if zapToSlog(nil).Core().Enabled(zap.ErrorLevel) {
		t.Fatal("a nil slog logger must give a no-op zap logger")
	}
}
