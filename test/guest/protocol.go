package guest

import (
	"bufio"
	"bytes"
	"fmt"
	"strconv"
	"strings"
)

// Prefix starts every line the guest agent prints on the serial console.
const Prefix = "NKP-GUEST"

// Actions the agent knows, run in this order whatever order the kernel command line
// lists them in. The agent always prints the TPM version, PCR0 and the PCR banks the
// kernel lists (pcr-banks=sha1,sha256,...) first ("info"), and
// the firmware's event log as the kernel exposes it at EventLogPath: eventlog=BYTES
// eventlog-events=N eventlog-pcr0=HEX (PCR 0 replayed from the log, see ReplaySHA256),
// eventlog-secureboot=V (the SecureBoot variable the firmware measured into PCR 7, see
// MeasuredSecureBoot; absent when it measured none), eventlog=absent, or
// eventlog-error=SENTENCE; then efi=yes or efi=no (the kernel was started by UEFI
// firmware or not).
const (
	// ActionEK creates the TCG reference ECC P-256 EK (TPM2_CreatePrimary in the
	// endorsement hierarchy, flushed at once) and prints ek=HEX, the SHA-256 of its public
	// point: it depends on the TPM's endorsement seed only, not on PCRs or NV, so it
	// tells whether two boots ran on the same vTPM state. Then ek-certs=rsa:SIZE,ecc:SIZE
	// or none: the EK certificates in the TPM's NV (0x01c00002, 0x01c0000a).
	ActionEK      = "ek"
	ActionNVWrite = "nvwrite" // define the test NV index if absent, write Config.NV, read it back
	ActionNVRead  = "nvread"  // read the test NV index
	ActionExtend  = "extend"  // extend PCR 16 (sha256) with sha256(Config.Extend)
	ActionLoop    = "loop"    // print PCR0, PCR16 and the NV value (and disk markers) every second for Config.Loop seconds
	// ActionDiskWrite writes Config.Disk as a marker block at DiskOffset of each of
	// Config.Devices (O_DIRECT and O_SYNC: it reaches QEMU, and through it the image, at
	// once) and reads it back.
	ActionDiskWrite = "diskwrite"
	// ActionDiskRead reads the marker block of each of Config.Devices; a device without
	// one fails the agent.
	ActionDiskRead = "diskread"
)

// DiskOffset is where the agent writes its marker block on a data disk (1 MiB: clear
// of any partition table, inside the smallest test disk).
const DiskOffset = 1 << 20

// DiskBlockSize is the size of the marker block (one 4 KiB sector for O_DIRECT).
const DiskBlockSize = 4096

// DefaultDevice is the disk the disk actions use when Config.Devices is empty.
const DefaultDevice = "vda"

// diskMagic starts a marker block.
const diskMagic = "NKP-DISK-MARKER "

// DiskBlock is the marker block the agent writes for value: "NKP-DISK-MARKER VALUE\n",
// zero-padded to DiskBlockSize. Its first line is what a host searches an image file for.
func DiskBlock(value string) []byte {
	b := make([]byte, DiskBlockSize)
	copy(b, diskMagic+value+"\n")
	return b
}

// ParseDiskBlock returns the marker value of a block DiskBlock made, or ok=false.
func ParseDiskBlock(b []byte) (value string, ok bool) {
	rest, found := bytes.CutPrefix(b, []byte(diskMagic))
	if !found {
		return "", false
	}
	v, _, found := bytes.Cut(rest, []byte("\n"))
	if !found || checkValue("disk", string(v), MarkerSize) != nil {
		return "", false
	}
	return string(v), true
}

// MarkerSize is the longest disk marker value.
const MarkerSize = 64

// DiskKey is the record key under which the agent prints the marker it read from (or
// wrote to) device dev: "disk-vda".
func DiskKey(dev string) string { return "disk-" + dev }

// NVIndex is the owner-range NV index the agent defines and writes.
const NVIndex = 0x01800100

// NVSize is the size of NVIndex; values are zero-padded to it.
const NVSize = 64

// ExtendPCR is the PCR that ActionExtend extends (the resettable debug PCR).
const ExtendPCR = 16

// Config is what one boot of the guest does; KernelArgs encodes it on the kernel command
// line and ParseArgs decodes it inside the guest.
type Config struct {
	Actions []string // ActionNVWrite, ActionNVRead, ActionExtend, ActionLoop, ActionDiskWrite, ActionDiskRead, ActionEK
	NV      string   // value for ActionNVWrite: 1..NVSize bytes of [A-Za-z0-9._-]
	Extend  string   // data for ActionExtend, same alphabet
	Loop    int      // seconds ActionLoop runs before the guest powers off (bounded)
	Disk    string   // marker for ActionDiskWrite: 1..MarkerSize bytes of [A-Za-z0-9._-]
	// Devices are the virtio disks the disk actions use ("vda", "vdb", ...; distinct);
	// empty means DefaultDevice.
	Devices []string
}

// DiskDevices is c.Devices, or DefaultDevice when it is empty.
func (c Config) DiskDevices() []string {
	if len(c.Devices) == 0 {
		return []string{DefaultDevice}
	}
	return c.Devices
}

// NeedsTPM reports whether c lists an action that uses the TPM (every one but the disk
// actions); a job that does not runs in a VM without a TPM too.
func (c Config) NeedsTPM() bool {
	return c.Has(ActionNVWrite) || c.Has(ActionNVRead) || c.Has(ActionExtend) || c.Has(ActionLoop) || c.Has(ActionEK)
}

// HasDisk reports whether c lists a disk action.
func (c Config) HasDisk() bool { return c.Has(ActionDiskWrite) || c.Has(ActionDiskRead) }

// Has reports whether c lists action.
func (c Config) Has(action string) bool {
	for _, a := range c.Actions {
		if a == action {
			return true
		}
	}
	return false
}

// Validate checks the values the kernel command line can carry.
func (c Config) Validate() error {
	for _, a := range c.Actions {
		switch a {
		case ActionNVWrite, ActionNVRead, ActionExtend, ActionLoop, ActionDiskWrite, ActionDiskRead, ActionEK:
		default:
			return fmt.Errorf("guest config: unknown action %q (want %s, %s, %s, %s, %s, %s or %s)", a,
				ActionNVWrite, ActionNVRead, ActionExtend, ActionLoop, ActionDiskWrite, ActionDiskRead, ActionEK)
		}
	}
	if c.Has(ActionDiskWrite) {
		if err := checkValue("disk", c.Disk, MarkerSize); err != nil {
			return err
		}
	} else if c.Disk != "" {
		return fmt.Errorf("guest config: a disk marker %q without action %s", c.Disk, ActionDiskWrite)
	}
	if len(c.Devices) > 0 && !c.HasDisk() {
		return fmt.Errorf("guest config: devices %v without action %s or %s", c.Devices, ActionDiskWrite, ActionDiskRead)
	}
	seen := map[string]bool{}
	for _, d := range c.Devices {
		if len(d) != 3 || d[0] != 'v' || d[1] != 'd' || d[2] < 'a' || d[2] > 'z' {
			return fmt.Errorf("guest config: device %q is not a virtio disk name vda..vdz", d)
		}
		if seen[d] {
			return fmt.Errorf("guest config: device %s listed twice", d)
		}
		seen[d] = true
	}
	if c.Has(ActionNVWrite) {
		if err := checkValue("nv", c.NV, NVSize); err != nil {
			return err
		}
	}
	if c.Has(ActionExtend) {
		if err := checkValue("extend", c.Extend, 128); err != nil {
			return err
		}
	}
	if c.Loop < 0 || c.Loop > 3600 {
		return fmt.Errorf("guest config: loop %d s out of range 0..3600", c.Loop)
	}
	if c.Has(ActionLoop) && c.Loop == 0 {
		return fmt.Errorf("guest config: action %s needs Loop > 0 seconds", ActionLoop)
	}
	return nil
}

func checkValue(name, v string, max int) error {
	if len(v) == 0 || len(v) > max {
		return fmt.Errorf("guest config: %s value must have 1..%d bytes, has %d", name, max, len(v))
	}
	for i := 0; i < len(v); i++ {
		c := v[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '.' || c == '_' || c == '-') {
			return fmt.Errorf("guest config: %s value %q: byte %d is not in [A-Za-z0-9._-]", name, v, i)
		}
	}
	return nil
}

// KernelArgs returns the whole kernel command line for c: serial console, quiet kernel,
// reboot on panic, and the nkp.* parameters the agent reads.
func (c Config) KernelArgs() (string, error) {
	if err := c.Validate(); err != nil {
		return "", err
	}
	// oops=panic and panic=-1: a guest whose kernel oopses reboots at once, and QEMU
	// (-no-reboot) exits, so a test sees the crash instead of waiting on a dead guest.
	args := []string{"console=ttyS0", "quiet", "loglevel=1", "oops=panic", "panic=-1"}
	if len(c.Actions) > 0 {
		args = append(args, "nkp.do="+strings.Join(c.Actions, ","))
	}
	if c.NV != "" {
		args = append(args, "nkp.nv="+c.NV)
	}
	if c.Extend != "" {
		args = append(args, "nkp.extend="+c.Extend)
	}
	if c.Loop > 0 {
		args = append(args, "nkp.loop="+strconv.Itoa(c.Loop))
	}
	if c.Disk != "" {
		args = append(args, "nkp.disk="+c.Disk)
	}
	if len(c.Devices) > 0 {
		args = append(args, "nkp.dev="+strings.Join(c.Devices, ","))
	}
	return strings.Join(args, " "), nil
}

// ParseArgs reads the nkp.* parameters from a kernel command line (/proc/cmdline) and
// ignores every other word.
func ParseArgs(cmdline string) (Config, error) {
	var c Config
	for _, w := range strings.Fields(cmdline) {
		k, v, ok := strings.Cut(w, "=")
		if !ok || !strings.HasPrefix(k, "nkp.") {
			continue
		}
		switch k {
		case "nkp.do":
			c.Actions = strings.Split(v, ",")
		case "nkp.nv":
			c.NV = v
		case "nkp.extend":
			c.Extend = v
		case "nkp.loop":
			n, err := strconv.Atoi(v)
			if err != nil {
				return Config{}, fmt.Errorf("guest config: nkp.loop=%q: %w", v, err)
			}
			c.Loop = n
		case "nkp.disk":
			c.Disk = v
		case "nkp.dev":
			c.Devices = strings.Split(v, ",")
		default:
			return Config{}, fmt.Errorf("guest config: unknown parameter %q", k)
		}
	}
	if err := c.Validate(); err != nil {
		return Config{}, err
	}
	return c, nil
}

// Record is one agent line: its key=value pairs.
type Record map[string]string

// FormatRecord renders pairs (key, value, key, value, ...) as one agent line without the
// trailing newline. Keys and values must not contain spaces or '='; values that do are
// quoted with strconv.Quote and ParseConsole unquotes them.
func FormatRecord(pairs ...string) string {
	var b strings.Builder
	b.WriteString(Prefix)
	for i := 0; i+1 < len(pairs); i += 2 {
		v := pairs[i+1]
		if needsQuote(v) {
			v = strconv.Quote(v)
		}
		b.WriteString(" " + pairs[i] + "=" + v)
	}
	return b.String()
}

func needsQuote(v string) bool {
	if v == "" {
		return true
	}
	for i := 0; i < len(v); i++ {
		if c := v[i]; c <= ' ' || c >= 0x7f || c == '"' || c == '=' {
			return true
		}
	}
	return false
}

// ParseConsole extracts the agent's records from a serial console capture, in order.
// Kernel messages may precede the prefix on a line (they share the console); anything
// before the prefix is ignored, and so are malformed pairs. A last line without its
// newline is ignored: the serial port delivers a line byte by byte, so a capture read
// while the guest runs may end in the middle of one.
func ParseConsole(data []byte) []Record {
	var out []Record
	data = data[:bytes.LastIndexByte(data, '\n')+1]
	sc := bufio.NewScanner(bytes.NewReader(data))
	sc.Buffer(make([]byte, 0, 4096), 1<<20)
	sc.Split(scanLinesAnyLength)
	for sc.Scan() {
		line := strings.TrimRight(sc.Text(), "\r")
		i := strings.Index(line, Prefix+" ")
		if i < 0 {
			continue
		}
		rec := Record{}
		rest := line[i+len(Prefix)+1:]
		for len(rest) > 0 {
			rest = strings.TrimLeft(rest, " ")
			k, after, ok := strings.Cut(rest, "=")
			if !ok || k == "" || strings.Contains(k, " ") {
				break
			}
			var v string
			if strings.HasPrefix(after, `"`) {
				q, err := strconv.QuotedPrefix(after)
				if err != nil {
					break
				}
				v, _ = strconv.Unquote(q)
				after = after[len(q):]
			} else {
				v, after, _ = strings.Cut(after, " ")
			}
			rec[k] = v
			rest = after
		}
		if len(rec) > 0 {
			out = append(out, rec)
		}
	}
	return out
}

// scanLinesAnyLength is bufio.ScanLines that also hands over an over-long line in pieces
// instead of failing the scan.
func scanLinesAnyLength(data []byte, atEOF bool) (int, []byte, error) {
	adv, tok, err := bufio.ScanLines(data, atEOF)
	if adv == 0 && tok == nil && err == nil && len(data) >= 1<<20-1 {
		return len(data), data, nil
	}
	return adv, tok, err
}

// Last returns the value of key in the last record that has it.
func Last(recs []Record, key string) (string, bool) {
	for i := len(recs) - 1; i >= 0; i-- {
		if v, ok := recs[i][key]; ok {
			return v, true
		}
	}
	return "", false
}
