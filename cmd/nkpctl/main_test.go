package main

import (
	"bytes"
	"strings"
	"testing"
)

func TestUnknownCommands(t *testing.T) {
	tests := []struct {
		args    []string
		wantErr string // "" for success
	}{
		{[]string{"vm", "protet", "vm1"}, `unknown command "protet" for "nkpctl vm"`},
		{[]string{"vm", "bogus"}, `unknown command "bogus" for "nkpctl vm"`},
		{[]string{"provider", "bogus"}, `unknown command "bogus" for "nkpctl provider"`},
		{[]string{"bogus"}, `unknown command "bogus" for "nkpctl"`},
		{[]string{"vm"}, ""},
		{[]string{"provider"}, ""},
		{[]string{"vm", "--help"}, ""},
	}
	for _, tt := range tests {
		t.Run(strings.Join(tt.args, " "), func(t *testing.T) {
			root := newRoot()
			var out bytes.Buffer
			root.SetOut(&out)
			root.SetErr(&out)
			root.SetArgs(tt.args)
			err := root.Execute()
			switch {
			case tt.wantErr == "" && err != nil:
				t.Fatalf("error %v", err)
			case tt.wantErr == "" && !strings.Contains(out.String(), "Usage:"):
				t.Fatalf("no help printed: %q", out.String())
			case tt.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tt.wantErr)):
				t.Fatalf("error %v, want %q", err, tt.wantErr)
			}
		})
	}
}
