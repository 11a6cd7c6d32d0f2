package kdk

import (
	"bytes"
	"encoding/hex"
	"encoding/json"
	"errors"
	"os"
	"strings"
	"testing"
)

type vector struct {
	Name    string `json:"name"`
	KDK     string `json:"kdk"`
	Purpose string `json:"purpose"`
	VMUUID  string `json:"vm_uuid"`
	KeyID   string `json:"key_id"`
	Info    string `json:"info"`
	Key     string `json:"key"`
}

func loadVectors(t *testing.T) []vector {
	t.Helper()
	raw, err := os.ReadFile("testdata/vectors.json")
	if err != nil {
		t.Fatal(err)
	}
	var doc struct{ Vectors []vector }
	if err := json.Unmarshal(raw, &doc); err != nil {
		t.Fatal(err)
	}
	if len(doc.Vectors) < 5 {
		t.Fatalf("only %d vectors in testdata/vectors.json", len(doc.Vectors))
	}
	return doc.Vectors
}

func TestVectors(t *testing.T) {
	for _, v := range loadVectors(t) {
		t.Run(v.Name, func(t *testing.T) {
			k, _ := hex.DecodeString(v.KDK)
			if got := Info(v.Purpose, v.VMUUID, v.KeyID); got != v.Info {
				t.Errorf("Info = %q, want %q", got, v.Info)
			}
			got, err := Derive(k, v.Purpose, v.VMUUID, v.KeyID)
			if err != nil {
				t.Fatal(err)
			}
			if hex.EncodeToString(got) != v.Key {
				t.Errorf("Derive = %x, want %s", got, v.Key)
			}
			if !bytes.Equal(k, mustHex(v.KDK)) {
				t.Error("Derive modified the KDK")
			}
		})
	}
}

func mustHex(s string) []byte { b, _ := hex.DecodeString(s); return b }

// Every input is bound: changing any one of them changes the key.
func TestDistinct(t *testing.T) {
	seen := map[string]string{}
	for _, v := range loadVectors(t) {
		if prev, ok := seen[v.Key]; ok {
			t.Errorf("vectors %s and %s derive the same key", prev, v.Name)
		}
		seen[v.Key] = v.Name
	}
}

func TestDeriveRefuses(t *testing.T) {
	good := make([]byte, Size)
	const vm, kid = "6f1c2a9e-3b4d-4e5f-8a6b-7c8d9e0f1a2b", "0f8fad5b-d9cb-469f-a165-70867728950e"
	tests := []struct {
		name               string
		kdk                []byte
		purpose, vm, keyID string
		want               string
	}{
		{"short kdk", good[:16], PurposeVTPM, vm, kid, "KDK is 16 bytes"},
		{"nil kdk", nil, PurposeVTPM, vm, kid, "KDK is 0 bytes"},
		{"long kdk", append(good, 0), PurposeVTPM, vm, kid, "KDK is 33 bytes"},
		{"unknown purpose", good, "swap", vm, kid, `purpose "swap"`},
		{"empty purpose", good, "", vm, kid, `purpose ""`},
		{"upper-case vm", good, PurposeVTPM, strings.ToUpper(vm), kid, "vm uuid"},
		{"vm with slash", good, PurposeVTPM, "6f1c2a9e/3b4d-4e5f-8a6b-7c8d9e0f1a2b", kid, "dash expected"},
		{"short key id", good, PurposeDisk, vm, kid[:35], "key id"},
		{"braced key id", good, PurposeDisk, vm, "{" + kid[1:35] + "}", "key id"},
		{"empty key id", good, PurposeDisk, vm, "", "key id"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			k, err := Derive(tt.kdk, tt.purpose, tt.vm, tt.keyID)
			if err == nil || k != nil {
				t.Fatalf("Derive = %x, %v; want an error", k, err)
			}
			if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("error %q: want ErrInvalid mentioning %q", err, tt.want)
			}
		})
	}
}

func TestNewKeyID(t *testing.T) {
	seen := map[string]bool{}
	for range 1000 {
		id := NewKeyID()
		if err := CheckUUID(id); err != nil {
			t.Fatal(err)
		}
		if id[14] != '4' || !strings.ContainsRune("89ab", rune(id[19])) {
			t.Fatalf("%s is not a version 4, RFC 4122 variant UUID", id)
		}
		if seen[id] {
			t.Fatalf("NewKeyID repeated %s", id)
		}
		seen[id] = true
	}
}

func BenchmarkDerive(b *testing.B) {
	k := make([]byte, Size)
	for b.Loop() {
		out, err := Derive(k, PurposeVTPM, "6f1c2a9e-3b4d-4e5f-8a6b-7c8d9e0f1a2b", "0f8fad5b-d9cb-469f-a165-70867728950e")
		if err != nil {
			b.Fatal(err)
		}
		clear(out)
	}
}
