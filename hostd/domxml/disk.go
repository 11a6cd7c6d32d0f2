package domxml

import (
	"encoding/xml"
	"fmt"
	"path/filepath"
	"slices"
	"strings"

	"github.com/google/uuid"
)

// ObjectDiskPrefix starts the object name of a disk: "disk:" + its target dev.
const ObjectDiskPrefix = "disk:"

// DiskObject is the object name of the disk with target dev target ("disk:vda").
func DiskObject(target string) string { return ObjectDiskPrefix + target }

// MaxDisks bounds the <disk> elements Parse reads; libvirt itself allows a few hundred.
const MaxDisks = 1024

// Disk is one <disk> device of a domain, as far as nkp uses it.
type Disk struct {
	Type   string // "file", "block", "network", "volume", "dir", "nvme", "vhostuser"
	Device string // "disk" (libvirt's default when absent), "cdrom", "floppy", "lun"
	Target string // <target dev>
	Bus    string // <target bus>
	// Alias is the live XML's <alias name> (libvirt's device ID in QEMU), "" when inactive.
	Alias string
	// Source is <source file> of a file disk, <source dev> of a block disk, else "".
	Source string
	// DriverName and DriverType are <driver name> ("qemu") and <driver type> ("raw",
	// "qcow2"; "" when absent: libvirt then probes or assumes raw).
	DriverName, DriverType string
	ReadOnly, Shareable    bool
	// Encryption is the disk's <encryption>, inside <source> or (libvirt's older
	// place) directly inside <disk>; nil for none.
	Encryption *DiskEncryption
	// BackingStore is the first backing file named by a non-empty <backingStore>
	// ("" if none, or if the backing store is not a file).
	BackingStore string
	// HasBackingStore says whether the disk has a non-empty <backingStore> element.
	HasBackingStore bool
}

// DiskEncryption is a disk's <encryption format=…><secret type=… uuid=…/>.
type DiskEncryption struct {
	Format     string // "luks" (nkp writes only this), "qcow" (legacy)
	SecretType string // "passphrase"
	SecretUUID string // lower case
}

// LUKS is the protected form's <encryption>: LUKS with the passphrase in the libvirt
// secret secretUUID.
func LUKS(secretUUID string) *DiskEncryption {
	return &DiskEncryption{Format: "luks", SecretType: "passphrase", SecretUUID: strings.ToLower(secretUUID)}
}

// Disk returns the disk with target dev target.
func (d *Domain) Disk(target string) (*Disk, bool) {
	for i := range d.Disks {
		if d.Disks[i].Target == target {
			return &d.Disks[i], true
		}
	}
	return nil, false
}

// DiskEdit is what SetDisk writes into one file disk.
type DiskEdit struct {
	// Source is the new <source file> (absolute).
	Source string
	// DriverType is the new <driver type>: "raw" or "qcow2".
	DriverType string
	// Encryption is the new <encryption> inside <source>; nil removes any.
	Encryption *DiskEncryption
}

func (e *DiskEdit) validate() error {
	if !filepath.IsAbs(e.Source) || !printable(e.Source) {
		return fmt.Errorf("%w: <disk>: the source must be an absolute path without control characters, got %q", ErrInvalid, e.Source)
	}
	if e.DriverType != "raw" && e.DriverType != "qcow2" {
		return fmt.Errorf("%w: <disk>: nkp writes driver types raw and qcow2, not %q", ErrInvalid, e.DriverType)
	}
	if c := e.Encryption; c != nil {
		if c.Format != "luks" || c.SecretType != "passphrase" {
			return fmt.Errorf("%w: <disk>: nkp writes only LUKS encryption with a passphrase secret, not %q/%q", ErrInvalid, c.Format, c.SecretType)
		}
		if _, err := uuid.Parse(c.SecretUUID); err != nil || len(c.SecretUUID) != 36 {
			return fmt.Errorf("%w: <disk>: secret %q is not a UUID", ErrInvalid, c.SecretUUID)
		}
	}
	return nil
}

// element returns the <encryption> element, its children indented by indent+"  ".
func (c *DiskEncryption) element(indent string) string {
	return fmt.Sprintf("<encryption format='%s'>\n%s  <secret type='%s' uuid='%s'/>\n%s</encryption>",
		escape(c.Format), indent, escape(c.SecretType), escape(c.SecretUUID), indent)
}

// SetDisk returns doc with the file disk whose target dev is target changed as e says:
// its <source file> (other attributes of <source> and its other children kept), its
// <driver type> (other driver attributes kept; a <driver name='qemu'> is added when
// there is none), its <encryption> (any old one removed, from <source> or <disk>; the
// new one inside <source>), and every <backingStore> removed: the new file stands alone
// (nkp converts a chain into one image). Every other byte of doc is kept.
func SetDisk(doc []byte, target string, e DiskEdit) ([]byte, error) {
	if err := e.validate(); err != nil {
		return nil, err
	}
	l, err := scan(doc)
	if err != nil {
		return nil, err
	}
	i := slices.IndexFunc(l.dom.Disks, func(d Disk) bool { return d.Target == target })
	if i < 0 {
		return nil, fmt.Errorf("domain %q: %w: no disk with target %q", l.dom.Name, ErrInvalid, target)
	}
	dk, sp := l.dom.Disks[i], l.disks[i]
	if dk.Type != "file" {
		return nil, fmt.Errorf("domain %q: %w: disk %s is of type %q; nkp edits file disks only", l.dom.Name, ErrInvalid, target, dk.Type)
	}
	if sp.foreignAttr {
		return nil, fmt.Errorf("domain %q: %w: disk %s: its <driver> or <source> has attributes in another namespace, which nkp would lose: remove them with virsh edit", l.dom.Name, ErrInvalid, target)
	}
	ind := indentAt(doc, sp.start) + "  "
	var edits []splice
	// <driver>
	if sp.driver.end > 0 {
		edits = append(edits, splice{sp.driver.start, sp.driver.end, startTag("driver", sp.driverAttrs, map[string]string{"type": e.DriverType}, sp.driverSelf)})
	} else {
		edits = append(edits, splice{sp.startTagEnd, sp.startTagEnd, "\n" + ind + "<driver name='qemu' type='" + e.DriverType + "'/>"})
	}
	// <source> and its <encryption>
	enc := ""
	if e.Encryption != nil {
		enc = e.Encryption.element(ind + "  ")
	}
	switch {
	case sp.source.end == 0:
		s := "\n" + ind + "<source file='" + escape(e.Source) + "'"
		if enc != "" {
			s += ">\n" + ind + "  " + enc + "\n" + ind + "</source>"
		} else {
			s += "/>"
		}
		edits = append(edits, splice{sp.driverOrStartEnd(), sp.driverOrStartEnd(), s})
	case sp.sourceSelf:
		s := startTag("source", sp.sourceAttrs, map[string]string{"file": e.Source}, true)
		if enc != "" {
			s = strings.TrimSuffix(s, "/>") + ">\n" + ind + "  " + enc + "\n" + ind + "</source>"
		}
		edits = append(edits, splice{sp.source.start, sp.source.end, s})
	default:
		s := startTag("source", sp.sourceAttrs, map[string]string{"file": e.Source}, false)
		if enc != "" {
			s += "\n" + ind + "  " + enc
		}
		edits = append(edits, splice{sp.source.start, sp.sourceTagEnd, s})
		for _, x := range sp.sourceEnc {
			edits = append(edits, splice{x.start, x.end, ""})
		}
	}
	for _, x := range sp.diskEnc {
		edits = append(edits, splice{x.start, x.end, ""})
	}
	for _, x := range sp.backing {
		edits = append(edits, splice{x.start, x.end, ""})
	}
	return apply(doc, edits), nil
}

// startTag writes a start tag with attrs in their order, values replaced or appended
// from set (sorted by name for a stable result).
func startTag(name string, attrs []xml.Attr, set map[string]string, self bool) string {
	var b strings.Builder
	b.WriteString("<" + name)
	done := map[string]bool{}
	for _, a := range attrs {
		v := a.Value
		if nv, ok := set[a.Name.Local]; ok && a.Name.Space == "" {
			v, done[a.Name.Local] = nv, true
		}
		n := a.Name.Local
		if a.Name.Space != "" {
			continue // checked by scanDisk: never present in an editable disk
		}
		fmt.Fprintf(&b, " %s='%s'", n, escape(v))
	}
	keys := make([]string, 0, len(set))
	for k := range set {
		if !done[k] {
			keys = append(keys, k)
		}
	}
	slices.Sort(keys)
	for _, k := range keys {
		fmt.Fprintf(&b, " %s='%s'", k, escape(set[k]))
	}
	if self {
		b.WriteString("/>")
	} else {
		b.WriteString(">")
	}
	return b.String()
}

// diskSpans are the byte ranges of one <disk> element and the children SetDisk edits.
type diskSpans struct {
	start, end  int
	startTagEnd int
	driver      span
	driverSelf  bool
	driverAttrs []xml.Attr
	source      span
	sourceSelf  bool
	// sourceTagEnd is where <source …>'s start tag ends.
	sourceTagEnd int
	sourceAttrs  []xml.Attr
	sourceEnc    []span // <encryption> inside <source>
	diskEnc      []span // <encryption> directly inside <disk>
	backing      []span // <backingStore> children of <disk>
	foreignAttr  bool
}

func (s *diskSpans) driverOrStartEnd() int {
	if s.driver.end > 0 {
		return s.driver.end
	}
	return s.startTagEnd
}

type encXML struct {
	Format string `xml:"format,attr"`
	Secret []struct {
		Type string `xml:"type,attr"`
		UUID string `xml:"uuid,attr"`
	} `xml:"secret"`
}

func (x *encXML) enc() *DiskEncryption {
	e := &DiskEncryption{Format: x.Format}
	if len(x.Secret) > 0 {
		e.SecretType, e.SecretUUID = x.Secret[0].Type, strings.ToLower(x.Secret[0].UUID)
	}
	return e
}

func attr(t xml.StartElement, name string) string {
	for _, a := range t.Attr {
		if a.Name.Local == name && a.Name.Space == "" {
			return a.Value
		}
	}
	return ""
}

// scanDisk reads a <disk> element whose start tag (at pos) was just read.
func scanDisk(doc []byte, d *xml.Decoder, t xml.StartElement, pos int) (Disk, diskSpans, error) {
	dk := Disk{Type: attr(t, "type"), Device: attr(t, "device")}
	if dk.Device == "" {
		dk.Device = "disk"
	}
	sp := diskSpans{start: pos, startTagEnd: int(d.InputOffset())}
	fail := func(err error) (Disk, diskSpans, error) {
		return Disk{}, diskSpans{}, fmt.Errorf("%w: <disk>: %v", ErrInvalid, err)
	}
	depth := 1
	for depth > 0 {
		p := int(d.InputOffset())
		tok, err := d.Token()
		if err != nil {
			return fail(err)
		}
		switch c := tok.(type) {
		case xml.StartElement:
			end := int(d.InputOffset())
			self := end >= 2 && string(doc[end-2:end]) == "/>"
			if depth != 1 || c.Name.Space != "" {
				if err := d.Skip(); err != nil {
					return fail(err)
				}
				continue
			}
			switch c.Name.Local {
			case "driver":
				dk.DriverName, dk.DriverType = attr(c, "name"), attr(c, "type")
				if sp.driver.end == 0 {
					sp.driver, sp.driverSelf, sp.driverAttrs = span{p, end}, self, slices.Clone(c.Attr)
				}
				// Only the start tag is rewritten; content (<metadata_cache>) stays.
				if err := d.Skip(); err != nil {
					return fail(err)
				}
			case "source":
				if sp.source.end != 0 {
					if err := d.Skip(); err != nil {
						return fail(err)
					}
					continue
				}
				switch dk.Type {
				case "file":
					dk.Source = attr(c, "file")
				case "block":
					dk.Source = attr(c, "dev")
				}
				sp.sourceSelf, sp.sourceAttrs, sp.sourceTagEnd = self, slices.Clone(c.Attr), end
				for _, a := range c.Attr {
					if a.Name.Space != "" {
						sp.foreignAttr = true
					}
				}
				// children of <source>: <encryption>, others kept
				sd := 1
				for sd > 0 {
					q := int(d.InputOffset())
					tk, err := d.Token()
					if err != nil {
						return fail(err)
					}
					switch cc := tk.(type) {
					case xml.StartElement:
						if sd == 1 && cc.Name.Space == "" && cc.Name.Local == "encryption" {
							var x encXML
							if err := d.DecodeElement(&x, &cc); err != nil {
								return fail(err)
							}
							if dk.Encryption == nil {
								dk.Encryption = x.enc()
							}
							sp.sourceEnc = append(sp.sourceEnc, span{q, int(d.InputOffset())})
							continue
						}
						sd++
					case xml.EndElement:
						sd--
					}
				}
				sp.source = span{p, int(d.InputOffset())}
			case "target":
				dk.Target, dk.Bus = attr(c, "dev"), attr(c, "bus")
				if err := d.Skip(); err != nil {
					return fail(err)
				}
			case "alias":
				dk.Alias = attr(c, "name")
				if err := d.Skip(); err != nil {
					return fail(err)
				}
			case "readonly", "shareable":
				if c.Name.Local == "readonly" {
					dk.ReadOnly = true
				} else {
					dk.Shareable = true
				}
				if err := d.Skip(); err != nil {
					return fail(err)
				}
			case "encryption":
				var x encXML
				if err := d.DecodeElement(&x, &c); err != nil {
					return fail(err)
				}
				if dk.Encryption == nil {
					dk.Encryption = x.enc()
				}
				sp.diskEnc = append(sp.diskEnc, span{p, int(d.InputOffset())})
			case "backingStore":
				var x struct {
					Type   string `xml:"type,attr"`
					Source []struct {
						File string `xml:"file,attr"`
					} `xml:"source"`
					Inner []xml.Name `xml:",any"`
				}
				if err := d.DecodeElement(&x, &c); err != nil {
					return fail(err)
				}
				if !self && (x.Type != "" || len(x.Source) > 0) {
					dk.HasBackingStore = true
					if x.Type == "file" && len(x.Source) > 0 && dk.BackingStore == "" {
						dk.BackingStore = x.Source[0].File
					}
				}
				sp.backing = append(sp.backing, span{p, int(d.InputOffset())})
			default:
				if err := d.Skip(); err != nil {
					return fail(err)
				}
			}
		case xml.EndElement:
			depth--
		}
	}
	sp.end = int(d.InputOffset())
	for _, a := range sp.driverAttrs {
		if a.Name.Space != "" {
			sp.foreignAttr = true
		}
	}
	return dk, sp, nil
}

// check checks what a parsed disk must hold for nkp to use it.
func (dk *Disk) check() error {
	if dk.Target != "" && !validTarget(dk.Target) {
		return fmt.Errorf("%w: <disk>: target dev %q: want letters, digits, _ - . (like vda)", ErrInvalid, dk.Target)
	}
	if !printable(dk.Source) || !printable(dk.Type) || !printable(dk.Device) || !printable(dk.DriverType) {
		return fmt.Errorf("%w: <disk> %s: control characters in an attribute", ErrInvalid, dk.Target)
	}
	return nil
}
