package main

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"strings"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2/transport/simulator"

	"github.com/nkp-dev/nkp/test/guest"
)

// TestAgentAgainstSimulator runs the agent's steps, in order, against one TPM simulator
// (one per process), the way successive boots of the guest use one vTPM state.
func TestAgentAgainstSimulator(t *testing.T) {
	tpm, err := simulator.OpenSimulator()
	if err != nil {
		t.Skipf("TPM simulator unavailable (needs cgo): %v", err)
	}
	defer tpm.Close()

	pcr16 := func(data string) string {
		// PCR16 starts at zero in the simulator: extend = sha256(zero || sha256(data)).
		d := sha256.Sum256([]byte(data))
		v := sha256.Sum256(append(make([]byte, 32), d[:]...))
		return hex.EncodeToString(v[:])
	}
	steps := []struct {
		name    string
		cfg     guest.Config
		wantErr string            // substring of the error; "" means success
		want    map[string]string // key -> value expected in the last record with that key
		loops   int               // records with key "loop"
	}{
		{name: "info only", want: map[string]string{"tpm": "2.0", "tpm-manufacturer": "MSFT"}},
		{name: "read before any write", cfg: guest.Config{Actions: []string{guest.ActionNVRead}}, wantErr: "not defined"},
		{name: "first write defines", cfg: guest.Config{Actions: []string{guest.ActionNVWrite}, NV: "first"},
			want: map[string]string{"nvdefine": "ok", "nvwrite": "ok", "nv": "first"}},
		{name: "second write overwrites, shorter", cfg: guest.Config{Actions: []string{guest.ActionNVWrite}, NV: "2nd"},
			want: map[string]string{"nvwrite": "ok", "nv": "2nd"}},
		{name: "read", cfg: guest.Config{Actions: []string{guest.ActionNVRead}}, want: map[string]string{"nv": "2nd"}},
		{name: "extend then loop", cfg: guest.Config{Actions: []string{guest.ActionExtend, guest.ActionLoop}, Extend: "hello", Loop: 3},
			want: map[string]string{"pcr16": pcr16("hello"), "nv": "2nd"}, loops: 3},
	}
	for _, st := range steps {
		t.Run(st.name, func(t *testing.T) {
			var out bytes.Buffer
			slept := 0
			a := &agent{out: &out, tpm: tpm, sleep: func(time.Duration) { slept++ }}
			err := a.run(st.cfg)
			if st.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), st.wantErr) {
					t.Fatalf("run: err %v, want one containing %q", err, st.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("run: %v\noutput:\n%s", err, out.String())
			}
			recs := guest.ParseConsole(out.Bytes())
			if v, _ := guest.Last(recs, "pcr0"); len(v) != 64 {
				t.Errorf("pcr0 = %q, want 64 hex digits", v)
			}
			for k, want := range st.want {
				if got, _ := guest.Last(recs, k); got != want {
					t.Errorf("%s = %q, want %q\noutput:\n%s", k, got, want, out.String())
				}
			}
			n := 0
			for _, r := range recs {
				if _, ok := r["loop"]; ok {
					n++
				}
			}
			if n != st.loops || slept != st.loops {
				t.Errorf("loop records %d and sleeps %d, want %d each", n, slept, st.loops)
			}
		})
	}
}

func TestFourCC(t *testing.T) {
	tests := []struct {
		v    uint32
		want string
	}{
		{0x322e3000, "2.0"},
		{0x49424d00, "IBM"},
		{0x494e5443, "INTC"},
		{0x414d4420, "AMD"},
		{0, ""},
	}
	for _, tc := range tests {
		if got := fourCC(tc.v); got != tc.want {
			t.Errorf("fourCC(%#x) = %q, want %q", tc.v, got, tc.want)
		}
	}
}
