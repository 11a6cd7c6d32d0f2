package main

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"
	"unsafe"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"

	"github.com/nkp-dev/nkp/test/guest"
)

// agent runs one guest.Config against a TPM and prints records to out.
type agent struct {
	out   io.Writer
	tpm   transport.TPM
	sysfs string // /sys/class/tpm/tpm0; "" skips the sysfs version line
	// eventLog is the firmware's event log (guest.EventLogPath); "" skips the eventlog line.
	eventLog string
	// efi is the EFI sysfs directory (/sys/firmware/efi); "" skips the efi line.
	efi   string
	sleep func(time.Duration) // pacing of ActionLoop
	// openDisk opens a data disk by name ("vda") for reading and writing, bypassing the
	// guest's page cache.
	openDisk func(dev string) (*os.File, error)
}

func (a *agent) print(pairs ...string) {
	// One write per line, so that kernel messages cannot split it.
	io.WriteString(a.out, guest.FormatRecord(pairs...)+"\n")
}

func (a *agent) run(cfg guest.Config) error {
	if a.tpm == nil && cfg.NeedsTPM() {
		return errors.New("this job needs a TPM and the VM has none")
	}
	if a.tpm != nil {
		if err := a.info(); err != nil {
			return err
		}
	}
	if cfg.Has(guest.ActionEK) {
		if err := a.ek(); err != nil {
			return err
		}
	}
	if cfg.Has(guest.ActionNVWrite) {
		if err := a.nvWrite(cfg.NV); err != nil {
			return err
		}
	}
	if cfg.Has(guest.ActionNVRead) {
		v, err := a.nvRead()
		if err != nil {
			return err
		}
		a.print("nv", v)
	}
	if cfg.Has(guest.ActionExtend) {
		if err := a.extend(cfg.Extend); err != nil {
			return err
		}
	}
	if cfg.Has(guest.ActionDiskWrite) {
		for _, dev := range cfg.DiskDevices() {
			if err := a.diskWrite(dev, cfg.Disk); err != nil {
				return err
			}
		}
	}
	if cfg.Has(guest.ActionDiskRead) {
		for _, dev := range cfg.DiskDevices() {
			v, err := a.diskRead(dev)
			if err != nil {
				return err
			}
			a.print("diskread", dev, guest.DiskKey(dev), v)
		}
	}
	if cfg.Has(guest.ActionLoop) {
		var devs []string
		if cfg.HasDisk() {
			devs = cfg.DiskDevices()
		}
		return a.loop(cfg.Loop, devs)
	}
	return nil
}

// diskBlock is a DiskBlockSize buffer aligned for O_DIRECT (page-aligned: a slice of a
// larger allocation starting at a page boundary).
func diskBlock() []byte {
	const align = 4096
	raw := make([]byte, guest.DiskBlockSize+align)
	off := 0
	if r := int(uintptr(unsafe.Pointer(&raw[0])) % align); r != 0 {
		off = align - r
	}
	return raw[off : off+guest.DiskBlockSize]
}

// diskWrite writes value's marker block to dev at guest.DiskOffset, syncs, reads it
// back and prints diskwrite=DEV disk-DEV=VALUE.
func (a *agent) diskWrite(dev, value string) error {
	f, err := a.openDisk(dev)
	if err != nil {
		return err
	}
	defer f.Close()
	buf := diskBlock()
	copy(buf, guest.DiskBlock(value))
	if _, err := f.WriteAt(buf, guest.DiskOffset); err != nil {
		return fmt.Errorf("write the marker to %s at offset %d: %w", dev, guest.DiskOffset, err)
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("flush %s: %w", dev, err)
	}
	got, err := readMarker(f, dev)
	if err != nil {
		return err
	}
	if got != value {
		return fmt.Errorf("%s reads marker %q right after writing %q", dev, got, value)
	}
	a.print("diskwrite", dev, guest.DiskKey(dev), got)
	return nil
}

// diskRead returns the marker value on dev.
func (a *agent) diskRead(dev string) (string, error) {
	f, err := a.openDisk(dev)
	if err != nil {
		return "", err
	}
	defer f.Close()
	return readMarker(f, dev)
}

func readMarker(f *os.File, dev string) (string, error) {
	buf := diskBlock()
	if _, err := f.ReadAt(buf, guest.DiskOffset); err != nil {
		return "", fmt.Errorf("read %s at offset %d: %w", dev, guest.DiskOffset, err)
	}
	v, ok := guest.ParseDiskBlock(buf)
	if !ok {
		return "", fmt.Errorf("%s holds no marker at offset %d (it starts %q): the disk was never written by diskwrite, or it is not the disk that was", dev, guest.DiskOffset, buf[:32])
	}
	return v, nil
}

func (a *agent) info() error {
	if a.sysfs != "" {
		if b, err := os.ReadFile(filepath.Join(a.sysfs, "tpm_version_major")); err == nil {
			a.print("tpm-major", strings.TrimSpace(string(b)))
		}
	}
	family, err := a.property(tpm2.TPMPTFamilyIndicator)
	if err != nil {
		return err
	}
	manu, err := a.property(tpm2.TPMPTManufacturer)
	if err != nil {
		return err
	}
	a.print("tpm", fourCC(family), "tpm-manufacturer", fourCC(manu))
	pcr0, err := a.pcr(0)
	if err != nil {
		return err
	}
	a.print("pcr0", hex.EncodeToString(pcr0))
	if a.sysfs != "" {
		// The kernel lists a pcr-<hash> directory per allocated bank.
		var banks []string
		if found, _ := filepath.Glob(filepath.Join(a.sysfs, "pcr-*")); len(found) > 0 {
			for _, f := range found {
				banks = append(banks, strings.TrimPrefix(filepath.Base(f), "pcr-"))
			}
			a.print("pcr-banks", strings.Join(banks, ","))
		}
	}
	if a.eventLog != "" {
		a.printEventLog()
	}
	if a.efi != "" {
		a.printEFI()
	}
	return nil
}

// printEFI prints efi=yes when the kernel was started by UEFI firmware (it has
// /sys/firmware/efi), efi=no otherwise.
func (a *agent) printEFI() {
	if _, err := os.Stat(a.efi); err != nil {
		a.print("efi", "no")
		return
	}
	a.print("efi", "yes")
}

// printEventLog prints the firmware's event log facts: its size, its events and PCR 0
// replayed from it; a missing or unreadable log is reported, not an error of the job.
func (a *agent) printEventLog() {
	b, err := os.ReadFile(a.eventLog)
	switch {
	case errors.Is(err, os.ErrNotExist):
		a.print("eventlog", "absent")
		return
	case err != nil:
		a.print("eventlog-error", err.Error())
		return
	}
	events, err := guest.ParseEventLog(b)
	if err != nil {
		a.print("eventlog", fmt.Sprint(len(b)), "eventlog-error", err.Error())
		return
	}
	sb := "absent"
	if v, ok := guest.MeasuredSecureBoot(events); ok {
		sb = fmt.Sprint(v)
	}
	a.print("eventlog", fmt.Sprint(len(b)), "eventlog-events", fmt.Sprint(len(events)),
		"eventlog-pcr0", hex.EncodeToString(guest.ReplaySHA256(events, 0)), "eventlog-secureboot", sb)
}

// ek creates the ECC reference EK, prints the SHA-256 of its public point and flushes it.
func (a *agent) ek() error {
	rsp, err := tpm2.CreatePrimary{
		PrimaryHandle: tpm2.TPMRHEndorsement,
		InPublic:      tpm2.New2B(tpm2.ECCEKTemplate),
	}.Execute(a.tpm)
	if err != nil {
		return fmt.Errorf("TPM2_CreatePrimary(ECC EK): %w", err)
	}
	defer tpm2.FlushContext{FlushHandle: rsp.ObjectHandle}.Execute(a.tpm)
	pub, err := rsp.OutPublic.Contents()
	if err != nil {
		return fmt.Errorf("TPM2_CreatePrimary(ECC EK): the public area: %w", err)
	}
	ecc, err := pub.Unique.ECC()
	if err != nil {
		return fmt.Errorf("TPM2_CreatePrimary(ECC EK): the public point: %w", err)
	}
	h := sha256.New()
	h.Write(ecc.X.Buffer)
	h.Write(ecc.Y.Buffer)
	a.print("ek", hex.EncodeToString(h.Sum(nil)))
	// The EK certificates swtpm_setup --create-ek-cert writes (TCG EK Credential Profile
	// NV indices); a TPM without them answers TPM_RC_HANDLE.
	var certs []string
	for _, c := range []struct {
		name  string
		index tpm2.TPMHandle
	}{{"rsa", 0x01c00002}, {"ecc", 0x01c0000a}} {
		rsp, err := tpm2.NVReadPublic{NVIndex: c.index}.Execute(a.tpm)
		if err != nil {
			continue
		}
		pub, err := rsp.NVPublic.Contents()
		if err != nil {
			return fmt.Errorf("TPM2_NV_ReadPublic(%#x): %w", uint32(c.index), err)
		}
		certs = append(certs, fmt.Sprintf("%s:%d", c.name, pub.DataSize))
	}
	if len(certs) == 0 {
		certs = []string{"none"}
	}
	a.print("ek-certs", strings.Join(certs, ","))
	return nil
}

// fourCC renders a TPM property that holds up to four ASCII characters ("2.0", "IBM").
func fourCC(v uint32) string {
	b := []byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)}
	return strings.TrimRight(string(bytes.TrimRight(b, "\x00")), " ")
}

func (a *agent) property(p tpm2.TPMPT) (uint32, error) {
	rsp, err := tpm2.GetCapability{Capability: tpm2.TPMCapTPMProperties, Property: uint32(p), PropertyCount: 1}.Execute(a.tpm)
	if err != nil {
		return 0, fmt.Errorf("TPM2_GetCapability(property %#x): %w", uint32(p), err)
	}
	props, err := rsp.CapabilityData.Data.TPMProperties()
	if err != nil {
		return 0, fmt.Errorf("TPM2_GetCapability(property %#x): %w", uint32(p), err)
	}
	for _, tp := range props.TPMProperty {
		if tp.Property == p {
			return tp.Value, nil
		}
	}
	return 0, fmt.Errorf("TPM2_GetCapability: property %#x missing from the reply", uint32(p))
}

func (a *agent) pcr(n uint) ([]byte, error) {
	rsp, err := tpm2.PCRRead{PCRSelectionIn: tpm2.TPMLPCRSelection{PCRSelections: []tpm2.TPMSPCRSelection{{
		Hash: tpm2.TPMAlgSHA256, PCRSelect: tpm2.PCClientCompatible.PCRs(n),
	}}}}.Execute(a.tpm)
	if err != nil {
		return nil, fmt.Errorf("TPM2_PCR_Read(sha256:%d): %w", n, err)
	}
	if len(rsp.PCRValues.Digests) != 1 {
		return nil, fmt.Errorf("TPM2_PCR_Read(sha256:%d): %d digests in the reply, want 1 (is the sha256 bank allocated?)", n, len(rsp.PCRValues.Digests))
	}
	return rsp.PCRValues.Digests[0].Buffer, nil
}

func (a *agent) extend(data string) error {
	d := sha256.Sum256([]byte(data))
	_, err := tpm2.PCRExtend{
		PCRHandle: tpm2.AuthHandle{Handle: tpm2.TPMHandle(guest.ExtendPCR), Auth: tpm2.PasswordAuth(nil)},
		Digests:   tpm2.TPMLDigestValues{Digests: []tpm2.TPMTHA{{HashAlg: tpm2.TPMAlgSHA256, Digest: d[:]}}},
	}.Execute(a.tpm)
	if err != nil {
		return fmt.Errorf("TPM2_PCR_Extend(%d): %w", guest.ExtendPCR, err)
	}
	v, err := a.pcr(guest.ExtendPCR)
	if err != nil {
		return err
	}
	a.print(fmt.Sprintf("pcr%d", guest.ExtendPCR), hex.EncodeToString(v))
	return nil
}

// nvName returns the index's current name, or ok=false when it is not defined.
func (a *agent) nvName() (tpm2.TPM2BName, bool, error) {
	rsp, err := tpm2.NVReadPublic{NVIndex: tpm2.TPMHandle(guest.NVIndex)}.Execute(a.tpm)
	if err != nil {
		if errors.Is(err, tpm2.TPMRCHandle) {
			return tpm2.TPM2BName{}, false, nil
		}
		return tpm2.TPM2BName{}, false, fmt.Errorf("TPM2_NV_ReadPublic(%#x): %w", guest.NVIndex, err)
	}
	return rsp.NVName, true, nil
}

func (a *agent) nvWrite(value string) error {
	_, ok, err := a.nvName()
	if err != nil {
		return err
	}
	if !ok {
		_, err := tpm2.NVDefineSpace{
			AuthHandle: tpm2.TPMRHOwner,
			PublicInfo: tpm2.New2B(tpm2.TPMSNVPublic{
				NVIndex: tpm2.TPMHandle(guest.NVIndex),
				NameAlg: tpm2.TPMAlgSHA256,
				Attributes: tpm2.TPMANV{
					OwnerWrite: true, OwnerRead: true, AuthWrite: true, AuthRead: true,
					NT: tpm2.TPMNTOrdinary, NoDA: true,
				},
				DataSize: guest.NVSize,
			}),
		}.Execute(a.tpm)
		if err != nil {
			return fmt.Errorf("TPM2_NV_DefineSpace(%#x): %w", guest.NVIndex, err)
		}
		a.print("nvdefine", "ok")
	}
	name, _, err := a.nvName()
	if err != nil {
		return err
	}
	buf := make([]byte, guest.NVSize)
	copy(buf, value)
	_, err = tpm2.NVWrite{
		AuthHandle: tpm2.AuthHandle{Handle: tpm2.TPMRHOwner, Auth: tpm2.PasswordAuth(nil)},
		NVIndex:    tpm2.NamedHandle{Handle: tpm2.TPMHandle(guest.NVIndex), Name: name},
		Data:       tpm2.TPM2BMaxNVBuffer{Buffer: buf},
	}.Execute(a.tpm)
	if err != nil {
		return fmt.Errorf("TPM2_NV_Write(%#x): %w", guest.NVIndex, err)
	}
	got, err := a.nvRead()
	if err != nil {
		return err
	}
	if got != value {
		return fmt.Errorf("NV index %#x reads %q right after writing %q", guest.NVIndex, got, value)
	}
	a.print("nvwrite", "ok", "nv", got)
	return nil
}

func (a *agent) nvRead() (string, error) {
	name, ok, err := a.nvName()
	if err != nil {
		return "", err
	}
	if !ok {
		return "", fmt.Errorf("NV index %#x is not defined (was the TPM state lost?)", guest.NVIndex)
	}
	rsp, err := tpm2.NVRead{
		AuthHandle: tpm2.AuthHandle{Handle: tpm2.TPMRHOwner, Auth: tpm2.PasswordAuth(nil)},
		NVIndex:    tpm2.NamedHandle{Handle: tpm2.TPMHandle(guest.NVIndex), Name: name},
		Size:       guest.NVSize,
	}.Execute(a.tpm)
	if err != nil {
		return "", fmt.Errorf("TPM2_NV_Read(%#x): %w", guest.NVIndex, err)
	}
	return string(bytes.TrimRight(rsp.Data.Buffer, "\x00")), nil
}

// loop prints PCR0, the extended PCR, the NV value (when defined) and the marker of each
// of devs every second for the given number of seconds, so that the host can watch the
// TPM and the disks across save/restore and migration; then it returns and the guest
// powers off.
func (a *agent) loop(seconds int, devs []string) error {
	pcrKey := fmt.Sprintf("pcr%d", guest.ExtendPCR)
	for i := 1; i <= seconds; i++ {
		p0, err := a.pcr(0)
		if err != nil {
			return err
		}
		p16, err := a.pcr(guest.ExtendPCR)
		if err != nil {
			return err
		}
		pairs := []string{"loop", fmt.Sprint(i), "pcr0", hex.EncodeToString(p0), pcrKey, hex.EncodeToString(p16)}
		if _, ok, err := a.nvName(); err != nil {
			return err
		} else if ok {
			v, err := a.nvRead()
			if err != nil {
				return err
			}
			pairs = append(pairs, "nv", v)
		}
		for _, dev := range devs {
			v, err := a.diskRead(dev)
			if err != nil {
				return err
			}
			pairs = append(pairs, guest.DiskKey(dev), v)
		}
		a.print(pairs...)
		a.sleep(time.Second)
	}
	return nil
}
