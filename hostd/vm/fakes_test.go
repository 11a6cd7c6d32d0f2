package vm

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/nkp-dev/nkp/hostd/domxml"
	"github.com/nkp-dev/nkp/internal/atomicfile"
	"github.com/nkp-dev/nkp/provider/apiv1"
	"github.com/nkp-dev/nkp/provider/client"
	"github.com/nkp-dev/nkp/provider/kdk"
)

// fakeKeys is a KDK cache with versions derived from their number (deterministic across
// processes, for the crash tests).
type fakeKeys struct {
	provider string
	primary  int // 0: none
	known    int // versions 1..known are held
	failWith error
}

func kdkID(v int) string { return fmt.Sprintf("00000000-0000-4000-8000-%012d", v) }

func kdkBytes(v int) []byte {
	s := sha256.Sum256([]byte(fmt.Sprintf("test KDK %d", v)))
	return s[:]
}

func (k *fakeKeys) ProviderID() string { return k.provider }

func (k *fakeKeys) Primary(context.Context) (KDK, error) {
	if k.failWith != nil {
		return KDK{}, k.failWith
	}
	if k.primary == 0 {
		return KDK{}, errors.New("no KDK cached")
	}
	return KDK{ID: kdkID(k.primary), Version: k.primary}, nil
}

func (k *fakeKeys) Derive(_ context.Context, v KDK, purpose, vmUUID, keyID string) ([]byte, error) {
	if k.failWith != nil {
		return nil, k.failWith
	}
	if v.Version < 1 || v.Version > k.known || v.ID != kdkID(v.Version) {
		return nil, fmt.Errorf("KDK version %d (%s) is not cached on this host", v.Version, v.ID)
	}
	return kdk.Derive(kdkBytes(v.Version), purpose, vmUUID, keyID)
}

// fileCatalog is the provider's catalog kept in a JSON file, so that a crashed child
// process's registrations are seen by the parent.
type fileCatalog struct {
	path string
	mu   sync.Mutex
	down bool
	// revoked: the provider answers that it revoked this host; calls counts ForgetVM.
	revoked bool
	calls   int
	// foreign VMs' objects belong to another host until MoveVM (moves counts them).
	foreign map[string]bool
	moves   int
}

// notOwner is the provider's answer for another host's objects.
func (c *fileCatalog) notOwner(vmUUID string) error {
	if c.foreign[vmUUID] {
		return &client.APIError{Status: 403, Code: apiv1.CodeNotOwner, Message: "VM " + vmUUID + " belongs to host h-other"}
	}
	return nil
}

func (c *fileCatalog) MoveVM(_ context.Context, vmUUID string) ([]apiv1.Object, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.down {
		return nil, errors.New("dial tcp 127.0.0.1:8443: connection refused")
	}
	delete(c.foreign, vmUUID)
	c.moves++
	var objs []apiv1.Object
	for k, o := range c.load() {
		if strings.HasPrefix(k, vmUUID+"/") {
			objs = append(objs, o)
		}
	}
	return objs, nil
}

// ForgetVM removes the VM's objects unless another host owns them (foreign).
func (c *fileCatalog) ForgetVM(_ context.Context, vmUUID string) (apiv1.ForgetResponse, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.calls++
	if c.down {
		return apiv1.ForgetResponse{}, errors.New("dial tcp 127.0.0.1:8443: connection refused")
	}
	if c.revoked {
		return apiv1.ForgetResponse{}, &client.APIError{Status: 403, Code: apiv1.CodeHostRevoked, Message: "host h-this is revoked"}
	}
	m := c.load()
	var r apiv1.ForgetResponse
	for _, k := range slices.Sorted(maps.Keys(m)) {
		o := m[k]
		if !strings.HasPrefix(k, vmUUID+"/") {
			continue
		}
		if c.foreign[vmUUID] {
			o.HostID = "h-other"
			r.Others = append(r.Others, o)
			continue
		}
		r.Removed = append(r.Removed, o)
		delete(m, k)
	}
	return r, c.save(m)
}

func (c *fileCatalog) load() map[string]apiv1.Object {
	m := map[string]apiv1.Object{}
	if b, err := os.ReadFile(c.path); err == nil {
		json.Unmarshal(b, &m)
	}
	return m
}

func (c *fileCatalog) save(m map[string]apiv1.Object) error {
	b, _ := json.Marshal(m)
	return atomicfile.WriteFile(c.path, b, 0o600)
}

func (c *fileCatalog) RegisterObject(_ context.Context, o apiv1.Object) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.down {
		return errors.New("dial tcp 127.0.0.1:8443: connection refused")
	}
	if err := c.notOwner(o.VMUUID); err != nil {
		return err
	}
	m := c.load()
	m[o.VMUUID+"/"+o.Name] = o
	return c.save(m)
}

func (c *fileCatalog) UnregisterObject(_ context.Context, vmUUID, name string) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.down {
		return errors.New("dial tcp 127.0.0.1:8443: connection refused")
	}
	if err := c.notOwner(vmUUID); err != nil {
		return err
	}
	m := c.load()
	if _, ok := m[vmUUID+"/"+name]; !ok {
		return &client.APIError{Status: 404, Code: apiv1.CodeNotFound, Message: "no such object"}
	}
	delete(m, vmUUID+"/"+name)
	return c.save(m)
}

func (c *fileCatalog) get(vmUUID, name string) (apiv1.Object, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	o, ok := c.load()[vmUUID+"/"+name]
	return o, ok
}

// fakeLibvirt keeps domain definitions in memory.
type fakeLibvirt struct {
	mu      sync.Mutex
	doms    map[string][]byte // by UUID
	active  map[string]bool
	secrets map[string][]byte
	// transient and saved name domains (by UUID) that are transient or have a managed
	// save image.
	transient, saved map[string]bool
	tpmErr           error
	defines          int
	// openedPlain names disks DiskEncryption reports as opened unencrypted.
	openedPlain map[string]bool
}

func newFakeLibvirt() *fakeLibvirt {
	return &fakeLibvirt{doms: map[string][]byte{}, active: map[string]bool{}, secrets: map[string][]byte{},
		transient: map[string]bool{}, saved: map[string]bool{}}
}

func (f *fakeLibvirt) find(domain string) (string, error) {
	if _, ok := f.doms[domain]; ok {
		return domain, nil
	}
	for u, x := range f.doms {
		if d, err := domxml.Parse(x); err == nil && d.Name == domain {
			return u, nil
		}
	}
	return "", fmt.Errorf("domain %q: %w", domain, ErrNoDomain)
}

func (f *fakeLibvirt) DomainXML(_ context.Context, domain string) ([]byte, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	u, err := f.find(domain)
	if err != nil {
		return nil, err
	}
	return bytes.Clone(f.doms[u]), nil
}

func (f *fakeLibvirt) DefineXML(_ context.Context, x []byte) error {
	d, err := domxml.Parse(x)
	if err != nil {
		return err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.doms[d.UUID] = bytes.Clone(x)
	f.defines++
	return nil
}

func (f *fakeLibvirt) Lifecycle(_ context.Context, domain string) (Lifecycle, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	u, err := f.find(domain)
	if err != nil {
		return Lifecycle{}, err
	}
	return Lifecycle{Active: f.active[u], Persistent: !f.transient[u], ManagedSave: f.saved[u]}, nil
}

func (f *fakeLibvirt) Domains(context.Context) ([]string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []string
	for u := range f.doms {
		out = append(out, u)
	}
	return out, nil
}

func (f *fakeLibvirt) SecretValue(_ context.Context, u string) ([]byte, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	v, ok := f.secrets[u]
	if !ok {
		return nil, fmt.Errorf("secret %s not found", u)
	}
	return bytes.Clone(v), nil
}

func (f *fakeLibvirt) TPMCheck(context.Context, string) error { return f.tpmErr }

// DiskEncryption answers from the definition: a disk with <encryption> is opened
// encrypted (what QEMU does when libvirt gives it the secret), unless openedPlain names it.
func (f *fakeLibvirt) DiskEncryption(_ context.Context, domain string) (map[string]bool, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	u, err := f.find(domain)
	if err != nil {
		return nil, err
	}
	d, err := domxml.Parse(f.doms[u])
	if err != nil {
		return nil, err
	}
	out := map[string]bool{}
	for _, dk := range d.Disks {
		out[dk.Target] = dk.Encryption != nil && !f.openedPlain[dk.Target]
	}
	return out, nil
}

// fileSecrets is hostd's secrets manager kept in a JSON file (VM UUID/key ID → defined),
// so that a crashed child's definitions are seen by the parent.
type fileSecrets struct {
	path string
	mu   sync.Mutex
	down bool
	// revoked: the provider answers that it revoked this host; calls counts ForgetVM.
	revoked bool
	calls   int
}

func (s *fileSecrets) load() map[string]bool {
	m := map[string]bool{}
	if b, err := os.ReadFile(s.path); err == nil {
		json.Unmarshal(b, &m)
	}
	return m
}

func (s *fileSecrets) Ensure(_ context.Context, vmUUID string, disks []domxml.Object) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.down {
		return errors.New("libvirt: cannot define secret")
	}
	m := s.load()
	for _, o := range disks {
		m[vmUUID+"/"+o.KeyID] = true
	}
	b, _ := json.Marshal(m)
	return atomicfile.WriteFile(s.path, b, 0o600)
}

func (s *fileSecrets) Remove(_ context.Context, vmUUID string, disks []domxml.Object) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	m := s.load()
	for _, o := range disks {
		delete(m, vmUUID+"/"+o.KeyID)
	}
	b, _ := json.Marshal(m)
	return atomicfile.WriteFile(s.path, b, 0o600)
}

// defined lists the defined secrets' "uuid/keyID".
func (s *fileSecrets) defined() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []string
	for k := range s.load() {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}

func (f *fakeLibvirt) domain(t *testing.T, u string) *domxml.Domain {
	t.Helper()
	f.mu.Lock()
	x := f.doms[u]
	f.mu.Unlock()
	d, err := domxml.Parse(x)
	if err != nil {
		t.Fatal(err)
	}
	return d
}

// domainXML is a small TCG domain; tpm is a <tpm> element or "".
func domainXML(name, uuid, tpm string) []byte {
	return []byte(`<domain type='qemu'>
  <name>` + name + `</name>
  <uuid>` + uuid + `</uuid>
  <memory unit='MiB'>64</memory>
  <os><type arch='x86_64'>hvm</type></os>
  <devices>
    <controller type='usb' model='none'/>
    ` + tpm + `
    <memballoon model='none'/>
  </devices>
</domain>
`)
}

// swtpmSetup makes a libvirt-style swtpm state directory with the real swtpm_setup (an
// EK is created, so the state is what a used libvirt vTPM holds); pwd non-nil encrypts
// it as libvirt does (--pwdfile, aes-256-cbc).
func swtpmSetup(t *testing.T, dir string, pwd []byte) {
	t.Helper()
	if _, err := exec.LookPath("swtpm_setup"); err != nil {
		if os.Getenv("NKP_E2E") == "required" {
			t.Fatal("swtpm_setup not on PATH and NKP_E2E=required: install swtpm-tools")
		}
		t.Skip("swtpm_setup not on PATH (Debian package swtpm-tools)")
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	args := []string{"--tpm2", "--tpmstate", dir, "--createek", "--overwrite", "--config", "/dev/null"}
	if pwd != nil {
		pf := filepath.Join(t.TempDir(), "pwd")
		if err := os.WriteFile(pf, pwd, 0o600); err != nil {
			t.Fatal(err)
		}
		args = append(args, "--pwdfile", pf, "--cipher", "aes-256-cbc")
	}
	if out, err := exec.Command("swtpm_setup", args...).CombinedOutput(); err != nil {
		t.Fatalf("swtpm_setup %v: %v\n%s", args, err, out)
	}
}
