package apiv1_test

import (
	"bytes"
	"encoding/json"
	"errors"
	"reflect"
	"testing"

	"github.com/nkp-dev/nkp/provider/apiv1"
)

// fuzzDecode checks the contract of apiv1.Decode on arbitrary bytes: no panic; a refusal
// always wraps ErrBadRequest; an accepted value survives a JSON round trip unchanged
// (nothing dropped, nothing invented).
func fuzzDecode[T any](t *testing.T, data []byte) {
	v, err := apiv1.Decode[T](bytes.NewReader(data), apiv1.MaxBodyBytes)
	if err != nil {
		if !errors.Is(err, apiv1.ErrBadRequest) {
			t.Fatalf("refusal %v does not wrap ErrBadRequest", err)
		}
		return
	}
	again, err := json.Marshal(v)
	if err != nil {
		t.Fatalf("accepted value does not marshal: %v", err)
	}
	w, err := apiv1.Decode[T](bytes.NewReader(again), apiv1.MaxBodyBytes)
	if err != nil {
		t.Fatalf("re-encoded value %s refused: %v", again, err)
	}
	if !reflect.DeepEqual(normalise(v), normalise(w)) {
		t.Fatalf("round trip changed the value:\n%#v\n%#v", v, w)
	}
}

// normalise maps empty and nil slices together (JSON cannot tell them apart after omitempty).
func normalise(v any) string {
	b, _ := json.Marshal(v)
	return string(b)
}

func FuzzEnrollRequest(f *testing.F) {
	f.Add([]byte(`{"token":"t","csr":"MIIB","hostname":"kvm-01","ek_public":"AAEC"}`))
	f.Fuzz(func(t *testing.T, data []byte) { fuzzDecode[apiv1.EnrollRequest](t, data) })
}

func FuzzObject(f *testing.F) {
	f.Add([]byte(`{"vm_uuid":"u","name":"vtpm","key_id":"k","kdk_id":"d"}`))
	f.Fuzz(func(t *testing.T, data []byte) { fuzzDecode[apiv1.Object](t, data) })
}

func FuzzArchiveRequest(f *testing.F) {
	f.Add([]byte(`{"passphrase":"cGFzcw==","archive":"YWdl","force":true}`))
	f.Fuzz(func(t *testing.T, data []byte) { fuzzDecode[apiv1.ArchiveRequest](t, data) })
}

func FuzzBackupRequest(f *testing.F) {
	f.Add([]byte(`{"passphrase":"cGFzcw=="}`))
	f.Fuzz(func(t *testing.T, data []byte) { fuzzDecode[apiv1.BackupRequest](t, data) })
}

func FuzzBackupConfirmRequest(f *testing.F) {
	f.Add([]byte(`{"sha256":"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"}`))
	f.Fuzz(func(t *testing.T, data []byte) { fuzzDecode[apiv1.BackupConfirmRequest](t, data) })
}

func FuzzTokenRequest(f *testing.F) {
	f.Add([]byte(`{"ttl_seconds":3600}`))
	f.Fuzz(func(t *testing.T, data []byte) { fuzzDecode[apiv1.TokenRequest](t, data) })
}

func FuzzPolicy(f *testing.F) {
	f.Add([]byte(`{"tpm_required":true}`))
	f.Fuzz(func(t *testing.T, data []byte) { fuzzDecode[apiv1.Policy](t, data) })
}

func FuzzAdminCertRequest(f *testing.F) {
	f.Add([]byte(`{"csr":"MIIB"}`))
	f.Fuzz(func(t *testing.T, data []byte) { fuzzDecode[apiv1.AdminCertRequest](t, data) })
}

func FuzzAdminRevokeRequest(f *testing.F) {
	f.Add([]byte(`{"admin":"bob"}`))
	f.Fuzz(func(t *testing.T, data []byte) { fuzzDecode[apiv1.AdminRevokeRequest](t, data) })
}

func FuzzHostRenewRequest(f *testing.F) {
	f.Add([]byte(`{"csr":"MIIB"}`))
	f.Fuzz(func(t *testing.T, data []byte) { fuzzDecode[apiv1.HostRenewRequest](t, data) })
}

func FuzzAuditPruneRequest(f *testing.F) {
	f.Add([]byte(`{"before":"2026-11-01T00:00:00Z","dry_run":true}`))
	f.Fuzz(func(t *testing.T, data []byte) { fuzzDecode[apiv1.AuditPruneRequest](t, data) })
}

func FuzzForgetRequest(f *testing.F) {
	f.Add([]byte(`{"vm_uuid":"5f0c1c9e-8a43-4c57-9d0e-0b8f6a1f2c33","name":"disk:vda"}`))
	f.Fuzz(func(t *testing.T, data []byte) { fuzzDecode[apiv1.ForgetRequest](t, data) })
}
