package qemuimg

import (
	"bytes"
	"encoding/json"
	"fmt"
)

// Info is what qemu-img info reports of one image, in the fields nkp uses.
type Info struct {
	Filename        string `json:"filename"`
	Format          Format `json:"format"`
	VirtualSize     int64  `json:"virtual-size"`
	ActualSize      int64  `json:"actual-size"`
	ClusterSize     int64  `json:"cluster-size,omitempty"`
	Encrypted       bool   `json:"encrypted,omitempty"`
	BackingFilename string `json:"backing-filename,omitempty"`
	// FullBackingFilename is the backing file's path as qemu-img resolved it.
	FullBackingFilename string `json:"full-backing-filename,omitempty"`
	BackingFormat       string `json:"backing-filename-format,omitempty"`
	DirtyFlag           bool   `json:"dirty-flag,omitempty"`
	// LUKS describes the encryption of a qcow2-with-LUKS or raw LUKS image; nil if plain.
	LUKS *LUKSInfo `json:"-"`

	FormatSpecific struct {
		Type string          `json:"type"`
		Data json.RawMessage `json:"data"`
	} `json:"format-specific"`
}

// LUKSInfo is a LUKS header as qemu-img shows it.
type LUKSInfo struct {
	CipherAlg  string     `json:"cipher-alg"`
	CipherMode string     `json:"cipher-mode"`
	IVGenAlg   string     `json:"ivgen-alg"`
	HashAlg    string     `json:"hash-alg"`
	UUID       string     `json:"uuid"`
	Slots      []LUKSSlot `json:"slots"`
	// MasterKeyIters is the PBKDF iteration count of the volume key digest.
	MasterKeyIters int64 `json:"master-key-iters"`
}

// ActiveSlots counts the keyslots in use.
func (l *LUKSInfo) ActiveSlots() int {
	n := 0
	for _, s := range l.Slots {
		if s.Active {
			n++
		}
	}
	return n
}

// LUKSSlot is one keyslot.
type LUKSSlot struct {
	Active bool  `json:"active"`
	Iters  int64 `json:"iters,omitempty"`
}

// maxJSON bounds what the parsers accept; qemu-img's report of a long chain is a few KB.
const maxJSON = 4 << 20

// ParseInfo reads the JSON of `qemu-img info --output=json` for one image.
func ParseInfo(b []byte) (*Info, error) {
	if len(b) > maxJSON {
		return nil, fmt.Errorf("image info: %d bytes is more than the %d a report can be", len(b), maxJSON)
	}
	var i Info
	if err := json.Unmarshal(b, &i); err != nil {
		return nil, fmt.Errorf("image info: not qemu-img's JSON: %w", err)
	}
	if err := i.fill(); err != nil {
		return nil, err
	}
	return &i, nil
}

// ParseChain reads the JSON of `qemu-img info --output=json --backing-chain`.
func ParseChain(b []byte) ([]Info, error) {
	if len(b) > maxJSON {
		return nil, fmt.Errorf("image chain: %d bytes is more than the %d a report can be", len(b), maxJSON)
	}
	var is []Info
	if err := json.Unmarshal(b, &is); err != nil {
		return nil, fmt.Errorf("image chain: not qemu-img's JSON: %w", err)
	}
	for k := range is {
		if err := is[k].fill(); err != nil {
			return nil, err
		}
	}
	return is, nil
}

// fill decodes the format-specific LUKS header, if any.
func (i *Info) fill() error {
	if i.Format == "" {
		return fmt.Errorf("image info: no format in qemu-img's report")
	}
	d := i.FormatSpecific.Data
	if len(d) == 0 || bytes.Equal(d, []byte("null")) {
		return nil
	}
	var l *LUKSInfo
	switch i.FormatSpecific.Type {
	case "luks":
		l = new(LUKSInfo)
		if err := json.Unmarshal(d, l); err != nil {
			return fmt.Errorf("image info %s: LUKS header: %w", i.Filename, err)
		}
	case "qcow2":
		var q struct {
			Encrypt *struct {
				Format string `json:"format"`
				LUKSInfo
			} `json:"encrypt"`
		}
		if err := json.Unmarshal(d, &q); err != nil {
			return fmt.Errorf("image info %s: qcow2 details: %w", i.Filename, err)
		}
		if q.Encrypt != nil {
			if q.Encrypt.Format != "luks" {
				return fmt.Errorf("image info %s: encryption format %q: only LUKS is supported (the old qcow2 AES format is insecure: convert it with a key)", i.Filename, q.Encrypt.Format)
			}
			l = &q.Encrypt.LUKSInfo
		}
	}
	if l != nil {
		i.LUKS = l
		i.Encrypted = true
	}
	return nil
}

// CheckReport is what `qemu-img check --output=json` reports.
type CheckReport struct {
	Filename         string `json:"filename"`
	Format           string `json:"format"`
	CheckErrors      int64  `json:"check-errors"`
	Corruptions      int64  `json:"corruptions"`
	Leaks            int64  `json:"leaks"`
	ImageEndOffset   int64  `json:"image-end-offset"`
	TotalClusters    int64  `json:"total-clusters"`
	AllocatedCluster int64  `json:"allocated-clusters"`
}

// ParseCheck reads the JSON of `qemu-img check --output=json`.
func ParseCheck(b []byte) (*CheckReport, error) {
	if len(b) > maxJSON {
		return nil, fmt.Errorf("check report: %d bytes is more than the %d a report can be", len(b), maxJSON)
	}
	var r CheckReport
	if err := json.Unmarshal(b, &r); err != nil {
		return nil, fmt.Errorf("check report: not qemu-img's JSON: %w", err)
	}
	return &r, nil
}
