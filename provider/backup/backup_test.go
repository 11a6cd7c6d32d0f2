package backup

import (
	"bytes"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/nkp-dev/nkp/provider/ca"
)

const (
	testWorkFactor = 10
	testPass       = "correct horse battery"
)

func sampleDoc(t testing.TB) *Document {
	t.Helper()
	now := time.Date(2026, 11, 28, 8, 0, 0, 0, time.UTC)
	pid := uuid.NewString()
	c, err := ca.New(pid, now, 24*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := c.MarshalKey()
	if err != nil {
		t.Fatal(err)
	}
	key := make([]byte, KeySize)
	rand.Read(key)
	retired := now.Add(time.Minute)
	kdk1, kdk2 := uuid.NewString(), uuid.NewString()
	return &Document{
		Format: Format, Version: Version, Created: now, ProviderID: pid, ProviderCreated: now,
		Policy: Policy{TPMRequired: true},
		KDKs: []KDK{
			{ID: kdk1, Version: 1, Created: now, Retired: &retired},
			{ID: kdk2, Version: 2, Created: now, Primary: true, Key: key},
		},
		CA:      CA{Cert: c.Certificate().Raw, Key: keyDER},
		Hosts:   []Host{{ID: uuid.NewString(), Hostname: "kvm-01", Enrolled: now, CertSerial: "ab12", CertNotAfter: now.Add(time.Hour)}},
		Objects: []Object{{VMUUID: uuid.NewString(), Name: "vtpm", KeyID: uuid.NewString(), KDKID: kdk2, KDKVersion: 2, Registered: now}},
	}
}

func archive(t testing.TB, d *Document, pass string) []byte {
	t.Helper()
	var buf bytes.Buffer
	n, err := write(&buf, []byte(pass), d, testWorkFactor)
	if err != nil {
		t.Fatal(err)
	}
	if n != int64(buf.Len()) {
		t.Fatalf("Write reported %d bytes, wrote %d", n, buf.Len())
	}
	return buf.Bytes()
}

func TestRoundTrip(t *testing.T) {
	d := sampleDoc(t)
	a := archive(t, d, "correct horse battery")
	if bytes.Contains(a, d.KDKs[1].Key) || bytes.Contains(a, []byte(Format)) {
		t.Fatal("archive holds plaintext")
	}
	got, n, err := Read(bytes.NewReader(a), []byte("correct horse battery"))
	if err != nil {
		t.Fatal(err)
	}
	if n != int64(len(a)) {
		t.Fatalf("Read counted %d bytes of %d", n, len(a))
	}
	if !bytes.Equal(got.KDKs[1].Key, d.KDKs[1].Key) || got.ProviderID != d.ProviderID || !got.Policy.TPMRequired ||
		len(got.Hosts) != 1 || len(got.Objects) != 1 || got.KDKs[0].Retired == nil {
		t.Fatalf("round trip changed the document: %+v", got)
	}
	in := got.Info()
	if in.Primary != 2 || len(in.KDKVersions) != 1 || in.Hosts != 1 || in.Objects != 1 {
		t.Fatalf("Info = %+v", in)
	}
	got.Wipe()
	if !bytes.Equal(got.KDKs[1].Key, make([]byte, KeySize)) {
		t.Fatal("Wipe left key bytes")
	}
}

func TestReadRefuses(t *testing.T) {
	a := archive(t, sampleDoc(t), testPass)
	flip := func(i int) []byte {
		b := bytes.Clone(a)
		b[i] ^= 0x01
		return b
	}
	tests := []struct {
		name string
		data []byte
		pass string
		want error
	}{
		{"wrong passphrase", a, "Correct horse battery", ErrBadPassphrase},
		{"empty passphrase", a, "", ErrBadPassphrase},
		{"empty file", nil, testPass, ErrBadArchive},
		{"not age", []byte("{\"format\":\"nkp-provider-backup\"}"), testPass, ErrBadArchive},
		{"header only", a[:bytes.Index(a, []byte("\n---"))+1], testPass, ErrBadArchive},
		{"truncated by one byte", a[:len(a)-1], testPass, ErrBadArchive},
		{"truncated in the payload", a[:len(a)-40], testPass, ErrBadArchive},
		{"payload bit flipped", flip(len(a) - 20), testPass, ErrBadArchive},
		{"header MAC bit flipped", flip(bytes.Index(a, []byte("\n---")) + 6), testPass, ErrBadArchive},
		{"trailing garbage", append(bytes.Clone(a), 'x'), testPass, ErrBadArchive},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, _, err := Read(bytes.NewReader(tt.data), []byte(tt.pass))
			if !errors.Is(err, tt.want) {
				t.Fatalf("Read: %v, want %v", err, tt.want)
			}
		})
	}
}

func TestValidate(t *testing.T) {
	tests := []struct {
		name   string
		mutate func(d *Document)
		want   string
	}{
		{"format", func(d *Document) { d.Format = "other" }, "format"},
		{"version", func(d *Document) { d.Version = 2 }, "version 2"},
		{"provider id", func(d *Document) { d.ProviderID = "x" }, "provider_id"},
		{"no kdks", func(d *Document) { d.KDKs = nil }, "no KDK"},
		{"short key", func(d *Document) { d.KDKs[1].Key = d.KDKs[1].Key[:31] }, "31 bytes"},
		{"two primaries", func(d *Document) { d.KDKs[0].Retired = nil; d.KDKs[0].Key = make([]byte, 32); d.KDKs[0].Primary = true }, "2 primary"},
		{"repeated version", func(d *Document) { d.KDKs[0].Version = 2 }, "repeats"},
		{"retired with key", func(d *Document) { d.KDKs[0].Key = make([]byte, 32) }, "retired"},
		{"bad ca", func(d *Document) { d.CA.Key = []byte("x") }, "ca"},
		{"dangling object", func(d *Document) { d.Objects[0].KDKVersion = 7 }, "not in the archive"},
		{"duplicate host", func(d *Document) { d.Hosts = append(d.Hosts, d.Hosts[0]) }, "repeats"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d := sampleDoc(t)
			tt.mutate(d)
			err := d.Validate()
			if !errors.Is(err, ErrBadArchive) || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("Validate: %v, want ErrBadArchive mentioning %q", err, tt.want)
			}
			if _, err := write(&bytes.Buffer{}, []byte(testPass), d, testWorkFactor); err == nil {
				t.Fatal("Write accepted an invalid document")
			}
		})
	}
}

func TestParseRefusesUnknownFieldsAndTrailingData(t *testing.T) {
	plain, err := Marshal(sampleDoc(t))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Parse(plain); err != nil {
		t.Fatalf("Parse of Marshal output: %v", err)
	}
	unknown := bytes.Replace(plain, []byte(`"format"`), []byte(`"extra": 1, "format"`), 1)
	if _, err := Parse(unknown); !errors.Is(err, ErrBadArchive) {
		t.Fatalf("unknown field: %v", err)
	}
	if _, err := Parse(append(bytes.Clone(plain), []byte("{}")...)); !errors.Is(err, ErrBadArchive) {
		t.Fatalf("trailing data: %v", err)
	}
}

// TestAdmins: "admins" is optional (archives written before it still parse), round-trips
// when present, and is checked.
func TestAdmins(t *testing.T) {
	now := time.Date(2026, 11, 28, 8, 0, 0, 0, time.UTC)
	tests := []struct {
		name    string
		admins  []Admin
		wantErr bool
	}{
		{"none (an archive from before the field)", nil, false},
		{"live and revoked", []Admin{{Name: "alice", Serial: "0a1b", Issued: now, NotAfter: now.Add(time.Hour)},
			{Name: "bob", Serial: "ff", Issued: now, NotAfter: now.Add(time.Hour), Revoked: &now}}, false},
		{"revoked serial without a record", []Admin{{Serial: "1234", Revoked: &now}}, false},
		{"serial not hex", []Admin{{Name: "alice", Serial: "xyz"}}, true},
		{"serial upper case", []Admin{{Name: "alice", Serial: "AB"}}, true},
		{"serial empty", []Admin{{Name: "alice"}}, true},
		{"serial repeats", []Admin{{Name: "a", Serial: "ab"}, {Name: "b", Serial: "ab"}}, true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			d := sampleDoc(t)
			d.Admins = tc.admins
			plain, err := json.Marshal(d)
			if err != nil {
				t.Fatal(err)
			}
			if tc.admins == nil && bytes.Contains(plain, []byte(`"admins"`)) {
				t.Fatalf("a document without admins still names the field: %s", plain)
			}
			got, err := Parse(plain)
			if tc.wantErr {
				if !errors.Is(err, ErrBadArchive) {
					t.Fatalf("Parse = %v, want ErrBadArchive", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if len(got.Admins) != len(tc.admins) {
				t.Fatalf("admins %+v, want %+v", got.Admins, tc.admins)
			}
			for i := range tc.admins {
				if got.Admins[i].Serial != tc.admins[i].Serial || (got.Admins[i].Revoked == nil) != (tc.admins[i].Revoked == nil) {
					t.Fatalf("admins[%d] = %+v, want %+v", i, got.Admins[i], tc.admins[i])
				}
			}
		})
	}
}

// TestWriteCost: Write always uses age's default scrypt cost; nothing lets a caller ask
// for less (the work factor is the last field of the archive's scrypt stanza).
func TestWriteCost(t *testing.T) {
	var buf bytes.Buffer
	if _, err := Write(&buf, []byte(testPass), sampleDoc(t)); err != nil {
		t.Fatal(err)
	}
	line, _, _ := strings.Cut(strings.SplitN(buf.String(), "\n", 3)[1], "\n")
	f := strings.Fields(line)
	if len(f) != 4 || f[0] != "->" || f[1] != "scrypt" {
		t.Fatalf("first stanza %q, want -> scrypt SALT WORKFACTOR", line)
	}
	if f[3] != fmt.Sprint(DefaultWorkFactor) {
		t.Fatalf("archive written at scrypt work factor %s, want age's default %d", f[3], DefaultWorkFactor)
	}
}

// TestPassphraseRule: Write refuses passphrases that break the rule, saying it; reading
// applies no rule (older archives still open).
func TestPassphraseRule(t *testing.T) {
	tests := []struct {
		pass string
		ok   bool
	}{
		{"", false},
		{"p", false},
		{"hunter2", false},
		{"fifteen chars!!", false},         // 15 characters
		{"aaaaaaaaaaaaaaaaaaaaaaa", false}, // long, one character
		{"abababababababababababab", false},
		{"1212121234343434", false}, // 16 characters, 4 different
		{"correct horse battery", true},
		{"ünïcödé pässphräsé", true},
		{"sixteen chars ok", true},
		{"\xff\xfe not utf-8 at all....", false},
	}
	for _, tt := range tests {
		t.Run(tt.pass, func(t *testing.T) {
			_, err := write(&bytes.Buffer{}, []byte(tt.pass), sampleDoc(t), testWorkFactor)
			if tt.ok {
				if err != nil {
					t.Fatalf("write: %v", err)
				}
				return
			}
			if !errors.Is(err, ErrWeakPassphrase) || !strings.Contains(err.Error(), PassphraseRule) {
				t.Fatalf("write: %v, want ErrWeakPassphrase stating the rule", err)
			}
		})
	}
}
