package domxml

import (
	"bytes"
	"encoding/xml"
	"errors"
	"fmt"
	"io"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"github.com/google/uuid"
)

// Namespace is the XML namespace of nkp's metadata element; Prefix is the prefix Edit
// writes it with (libvirt keeps the prefix it was given).
const (
	Namespace = "https://nkp.dev/ns/vm/1"
	Prefix    = "nkp"
)

// MaxSize bounds the documents Parse and the Set functions read. libvirt's own domain
// XML is a few KiB; 8 MiB leaves room for very large device lists.
const MaxSize = 8 << 20

// ObjectVTPM is the object name of a domain's vTPM. Disks are "disk:<target>".
const ObjectVTPM = "vtpm"

// TPM backend types as libvirt names them.
const (
	BackendExternal    = "external"
	BackendEmulator    = "emulator"
	BackendPassthrough = "passthrough"
)

// ErrInvalid marks a document or a metadata value that is not acceptable; the error's
// text says which element and why.
var ErrInvalid = errors.New("invalid domain XML")

// Domain is what nkp reads from a domain XML.
type Domain struct {
	Name string
	UUID string
	Type string // "qemu", "kvm"
	// Metadata is nkp's element, nil when the domain has none (not protected).
	Metadata *Metadata
	// TPMs are the <tpm> devices in document order (libvirt allows one, plus a proxy).
	TPMs []TPM
	// Disks are the <disk> devices in document order.
	Disks []Disk
}

// TPM returns the domain's one TPM device, nil when it has none, or an error when it
// has more than one (nkp does not decide between them).
func (d *Domain) TPM() (*TPM, error) {
	switch len(d.TPMs) {
	case 0:
		return nil, nil
	case 1:
		return &d.TPMs[0], nil
	}
	return nil, fmt.Errorf("domain %q: %w: %d <tpm> devices; nkp handles a domain with at most one (remove the others with virsh edit)", d.Name, ErrInvalid, len(d.TPMs))
}

// Metadata is nkp's <nkp:vm> element: which provider the domain's keys come from and,
// per protected object, which key.
type Metadata struct {
	ProviderID string
	Objects    []Object
}

// Object is one protected object of a domain (its vTPM, each disk).
type Object struct {
	Name       string // ObjectVTPM or "disk:<target>"
	KeyID      string // random UUID, the HKDF key ID
	KDKID      string // UUID of the KDK version the key derives from
	KDKVersion int    // that KDK's version number (≥ 1)
	// SwtpmSecret (vTPM only) is the libvirt secret under which libvirt's swtpm kept the
	// state that protect adopted (<encryption secret=…/>); unprotect --tpm keep encrypts
	// the state under it again. "" when the adopted state was plaintext, or none.
	SwtpmSecret string
	// PCRBanks (vTPM only) keeps the <active_pcr_banks> of the emulator TPM that protect
	// replaced (comma-separated, e.g. "sha256,sha384"; "" when it had none), which the
	// external backend has no place for; unprotect --tpm keep gives it back.
	PCRBanks string
}

// Object returns the object called name.
func (m *Metadata) Object(name string) (Object, bool) {
	if m == nil {
		return Object{}, false
	}
	i := slices.IndexFunc(m.Objects, func(o Object) bool { return o.Name == name })
	if i < 0 {
		return Object{}, false
	}
	return m.Objects[i], true
}

// SetObject replaces the object of the same name, or appends o.
func (m *Metadata) SetObject(o Object) {
	if i := slices.IndexFunc(m.Objects, func(x Object) bool { return x.Name == o.Name }); i >= 0 {
		m.Objects[i] = o
		return
	}
	m.Objects = append(m.Objects, o)
}

// RemoveObject removes the object called name and says whether there was one.
func (m *Metadata) RemoveObject(name string) bool {
	n := len(m.Objects)
	m.Objects = slices.DeleteFunc(m.Objects, func(o Object) bool { return o.Name == name })
	return len(m.Objects) != n
}

// Clone returns a deep copy (nil for nil).
func (m *Metadata) Clone() *Metadata {
	if m == nil {
		return nil
	}
	return &Metadata{ProviderID: m.ProviderID, Objects: slices.Clone(m.Objects)}
}

// Validate checks what Parse and the writers require: a provider ID, at least one
// object, names "vtpm" or "disk:<target>" without repeats, UUID key and KDK IDs and
// KDK versions from 1.
func (m *Metadata) Validate() error {
	if m.ProviderID == "" || len(m.ProviderID) > 128 || !printable(m.ProviderID) {
		return fmt.Errorf("%w: nkp metadata: provider ID %q must be 1 to 128 printable characters", ErrInvalid, m.ProviderID)
	}
	if len(m.Objects) == 0 {
		return fmt.Errorf("%w: nkp metadata: no protected objects (remove the <nkp:vm> element instead)", ErrInvalid)
	}
	seen := map[string]bool{}
	for _, o := range m.Objects {
		if err := o.validate(); err != nil {
			return fmt.Errorf("%w: nkp metadata: %w", ErrInvalid, err)
		}
		if seen[o.Name] {
			return fmt.Errorf("%w: nkp metadata: object %q appears twice", ErrInvalid, o.Name)
		}
		seen[o.Name] = true
	}
	return nil
}

func (o Object) validate() error {
	switch {
	case o.Name == ObjectVTPM:
	case strings.HasPrefix(o.Name, "disk:") && validTarget(o.Name[len("disk:"):]):
	default:
		return fmt.Errorf("object name %q: want %q or \"disk:<target>\" (target like vda)", o.Name, ObjectVTPM)
	}
	if _, err := uuid.Parse(o.KeyID); err != nil || len(o.KeyID) != 36 {
		return fmt.Errorf("object %q: key ID %q is not a UUID", o.Name, o.KeyID)
	}
	if _, err := uuid.Parse(o.KDKID); err != nil || len(o.KDKID) != 36 {
		return fmt.Errorf("object %q: KDK ID %q is not a UUID", o.Name, o.KDKID)
	}
	if o.KDKVersion < 1 {
		return fmt.Errorf("object %q: KDK version %d: versions start at 1", o.Name, o.KDKVersion)
	}
	if o.SwtpmSecret != "" {
		if _, err := uuid.Parse(o.SwtpmSecret); err != nil || len(o.SwtpmSecret) != 36 || o.Name != ObjectVTPM {
			return fmt.Errorf("object %q: libvirt-secret %q: want a secret's UUID, on the vtpm object only", o.Name, o.SwtpmSecret)
		}
	}
	if o.PCRBanks != "" {
		for _, b := range strings.Split(o.PCRBanks, ",") {
			if !slices.Contains(PCRBanks, b) || o.Name != ObjectVTPM {
				return fmt.Errorf("object %q: pcr-banks %q: want a comma-separated list of %s, on the vtpm object only", o.Name, o.PCRBanks, strings.Join(PCRBanks, ", "))
			}
		}
	}
	return nil
}

func validTarget(t string) bool {
	if t == "" || len(t) > 32 {
		return false
	}
	for _, c := range t {
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '_' || c == '-' || c == '.') {
			return false
		}
	}
	return true
}

func printable(s string) bool {
	for _, c := range s {
		if c < 0x20 || c == 0x7f {
			return false
		}
	}
	return strings.ToValidUTF8(s, "") == s
}

// Element returns the metadata as the XML element Edit writes (with its namespace
// declaration), e.g. for virDomainSetMetadata with key "nkp" and uri Namespace.
func (m *Metadata) Element(indent string) string {
	var b strings.Builder
	fmt.Fprintf(&b, "<%s:vm xmlns:%s=%q provider=\"%s\">\n", Prefix, Prefix, Namespace, escape(m.ProviderID))
	for _, o := range m.Objects {
		secret := ""
		if o.SwtpmSecret != "" {
			secret = fmt.Sprintf(" libvirt-secret=\"%s\"", escape(o.SwtpmSecret))
		}
		if o.PCRBanks != "" {
			secret += fmt.Sprintf(" pcr-banks=\"%s\"", escape(o.PCRBanks))
		}
		fmt.Fprintf(&b, "%s  <%s:object name=\"%s\" key-id=\"%s\" kdk-id=\"%s\" kdk-version=\"%d\"%s/>\n",
			indent, Prefix, escape(o.Name), escape(o.KeyID), escape(o.KDKID), o.KDKVersion, secret)
	}
	fmt.Fprintf(&b, "%s</%s:vm>", indent, Prefix)
	return b.String()
}

// TPM is a domain's <tpm> device, as far as nkp uses it.
type TPM struct {
	Model   string // "tpm-crb", "tpm-tis", ... ("" = libvirt's default)
	Backend string // BackendExternal, BackendEmulator, BackendPassthrough, or another
	// SocketPath is the external backend's <source type='unix' path=…>.
	SocketPath string
	// Version is the emulator's version attribute ("2.0", "1.2", "" = libvirt's default).
	Version string
	// EncryptionSecret is the UUID of the libvirt secret under which libvirt's swtpm
	// keeps the emulator's state (<encryption secret=…/>), "" for plaintext state.
	EncryptionSecret string
	// PersistentState is the emulator's persistent_state='yes' (state kept on undefine).
	PersistentState bool
	// StateDir is the emulator's <source type='dir' path=…> if given; "" means libvirt's
	// default directory (EmulatorStateDir).
	StateDir string
	// ActivePCRBanks are the emulator's <active_pcr_banks> children in document order
	// ("sha256", "sha384", ...), nil when the element is absent (swtpm_setup's default).
	ActivePCRBanks []string
}

// PCRBanks are the PCR banks libvirt's <active_pcr_banks> may name (and swtpm_setup's
// --pcr-banks activates).
var PCRBanks = []string{"sha1", "sha256", "sha384", "sha512"}

// External returns nkp's vTPM device for a domain: <backend type='external'> connecting
// to socketPath, with model tpm-crb unless the domain's TPM had another (tpm-tis).
func External(oldModel, socketPath string) TPM {
	model := "tpm-crb"
	if oldModel != "" {
		model = oldModel
	}
	return TPM{Model: model, Backend: BackendExternal, SocketPath: socketPath}
}

// SocketPath is where hostd serves a VM's vTPM: DIR/<uuid>.sock.
func SocketPath(runDir, vmUUID string) string {
	return filepath.Join(runDir, vmUUID+".sock")
}

// DefaultSwtpmRoot is where libvirt keeps its swtpm's state (swtpm_storage in qemu.conf's
// terms): DefaultSwtpmRoot/<uuid>/tpm2 for a TPM 2.0.
const DefaultSwtpmRoot = "/var/lib/libvirt/swtpm"

// EmulatorStateDir is the directory of a libvirt-managed swtpm's state: the TPM's
// StateDir when the domain names one, else root/<uuid>/tpm2 (tpm1.2 for version 1.2).
func (t *TPM) EmulatorStateDir(root, vmUUID string) string {
	if t.StateDir != "" {
		return t.StateDir
	}
	if t.Version == "1.2" {
		return filepath.Join(root, vmUUID, "tpm1.2")
	}
	return filepath.Join(root, vmUUID, "tpm2")
}

// Element returns the <tpm> element for t.
func (t *TPM) Element(indent string) string {
	var b strings.Builder
	b.WriteString("<tpm")
	if t.Model != "" {
		fmt.Fprintf(&b, " model='%s'", escape(t.Model))
	}
	b.WriteString(">\n")
	in := indent + "  "
	fmt.Fprintf(&b, "%s<backend type='%s'", in, escape(t.Backend))
	switch t.Backend {
	case BackendExternal:
		fmt.Fprintf(&b, ">\n%s  <source type='unix' mode='connect' path='%s'/>\n%s</backend>\n", in, escape(t.SocketPath), in)
	case BackendEmulator:
		if t.Version != "" {
			fmt.Fprintf(&b, " version='%s'", escape(t.Version))
		}
		if t.PersistentState {
			b.WriteString(" persistent_state='yes'")
		}
		if t.EncryptionSecret == "" && t.StateDir == "" && t.ActivePCRBanks == nil {
			b.WriteString("/>\n")
			break
		}
		b.WriteString(">\n")
		if t.StateDir != "" {
			fmt.Fprintf(&b, "%s  <source type='dir' path='%s'/>\n", in, escape(t.StateDir))
		}
		if t.EncryptionSecret != "" {
			fmt.Fprintf(&b, "%s  <encryption secret='%s'/>\n", in, escape(t.EncryptionSecret))
		}
		if t.ActivePCRBanks != nil {
			fmt.Fprintf(&b, "%s  <active_pcr_banks>\n", in)
			for _, bank := range t.ActivePCRBanks {
				fmt.Fprintf(&b, "%s    <%s/>\n", in, bank)
			}
			fmt.Fprintf(&b, "%s  </active_pcr_banks>\n", in)
		}
		fmt.Fprintf(&b, "%s</backend>\n", in)
	default:
		b.WriteString("/>\n")
	}
	fmt.Fprintf(&b, "%s</tpm>", indent)
	return b.String()
}

func (t *TPM) validate() error {
	for _, b := range t.ActivePCRBanks {
		if !slices.Contains(PCRBanks, b) {
			return fmt.Errorf("%w: <tpm>: <active_pcr_banks> names %q; want some of %s", ErrInvalid, b, strings.Join(PCRBanks, ", "))
		}
	}
	switch t.Backend {
	case BackendExternal:
		if !filepath.IsAbs(t.SocketPath) || !printable(t.SocketPath) {
			return fmt.Errorf("%w: <tpm>: external backend needs an absolute socket path, got %q", ErrInvalid, t.SocketPath)
		}
	case BackendEmulator:
		if t.EncryptionSecret != "" {
			if _, err := uuid.Parse(t.EncryptionSecret); err != nil {
				return fmt.Errorf("%w: <tpm>: encryption secret %q is not a UUID", ErrInvalid, t.EncryptionSecret)
			}
		}
	default:
		return fmt.Errorf("%w: <tpm>: nkp writes only the external and emulator backends, not %q", ErrInvalid, t.Backend)
	}
	if !printable(t.Model) || !printable(t.Version) || !printable(t.StateDir) {
		return fmt.Errorf("%w: <tpm>: control characters in an attribute", ErrInvalid)
	}
	return nil
}

func escape(s string) string {
	var b bytes.Buffer
	xml.EscapeText(&b, []byte(s)) // escapes & < > ' " and control characters
	return b.String()
}

// Parse reads a domain XML. It fails on malformed XML, a root that is not <domain>,
// a document over MaxSize, more than one nkp metadata element or an invalid one.
func Parse(doc []byte) (*Domain, error) {
	l, err := scan(doc)
	if err != nil {
		return nil, err
	}
	return &l.dom, nil
}

// SetMetadata returns doc with nkp's metadata element replaced by m (inserted into
// <metadata>, which is created if needed), or removed when m is nil. Every other byte of
// doc is kept.
func SetMetadata(doc []byte, m *Metadata) ([]byte, error) {
	if m != nil {
		if err := m.Validate(); err != nil {
			return nil, err
		}
	}
	l, err := scan(doc)
	if err != nil {
		return nil, err
	}
	var edits []splice
	if m == nil {
		for _, s := range l.nkp {
			edits = append(edits, splice{s.start, s.end, ""})
		}
		return apply(doc, edits), nil
	}
	switch {
	case len(l.nkp) > 0:
		ind := indentAt(doc, l.nkp[0].start)
		edits = append(edits, splice{l.nkp[0].start, l.nkp[0].end, m.Element(ind)})
	case l.metadata.found && l.metadata.selfClosing:
		ind := indentAt(doc, l.metadata.start)
		edits = append(edits, splice{l.metadata.start, l.metadata.end,
			"<metadata>\n" + ind + "  " + m.Element(ind+"  ") + "\n" + ind + "</metadata>"})
	case l.metadata.found:
		ind := indentAt(doc, l.metadata.start)
		edits = append(edits, splice{l.metadata.innerEnd, l.metadata.innerEnd,
			"  " + m.Element(ind+"  ") + "\n" + ind})
	default:
		at, ind, err := l.childInsertPoint(doc)
		if err != nil {
			return nil, err
		}
		edits = append(edits, splice{at, at, "<metadata>\n" + ind + "  " + m.Element(ind+"  ") + "\n" + ind + "</metadata>\n" + ind})
	}
	return apply(doc, edits), nil
}

// SetTPM returns doc with its <tpm> devices replaced by t (inserted where the first one
// was, else at the end of <devices>, which is created if needed), or removed when t is
// nil. Every other byte of doc is kept.
func SetTPM(doc []byte, t *TPM) ([]byte, error) {
	if t != nil {
		if err := t.validate(); err != nil {
			return nil, err
		}
	}
	l, err := scan(doc)
	if err != nil {
		return nil, err
	}
	var edits []splice
	for i, s := range l.tpms {
		repl := ""
		if i == 0 && t != nil {
			repl = t.Element(indentAt(doc, s.start))
		}
		edits = append(edits, splice{s.start, s.end, repl})
	}
	if t != nil && len(l.tpms) == 0 {
		switch {
		case l.devices.found && l.devices.selfClosing:
			ind := indentAt(doc, l.devices.start)
			edits = append(edits, splice{l.devices.start, l.devices.end,
				"<devices>\n" + ind + "  " + t.Element(ind+"  ") + "\n" + ind + "</devices>"})
		case l.devices.found:
			ind := indentAt(doc, l.devices.start)
			edits = append(edits, splice{l.devices.innerEnd, l.devices.innerEnd, "  " + t.Element(ind+"  ") + "\n" + ind})
		default:
			at, ind, err := l.childInsertPoint(doc)
			if err != nil {
				return nil, err
			}
			edits = append(edits, splice{at, at, "<devices>\n" + ind + "  " + t.Element(ind+"  ") + "\n" + ind + "</devices>\n" + ind})
		}
	}
	return apply(doc, edits), nil
}

type span struct{ start, end int }

// container is an element whose content Edit may change.
type container struct {
	found       bool
	selfClosing bool
	start, end  int // the whole element
	innerEnd    int // where its end tag starts
}

type layout struct {
	doc      []byte
	dom      Domain
	rootEnd  int // offset of </domain>
	rootSelf bool
	metadata container
	devices  container
	nkp      []span
	tpms     []span
	disks    []diskSpans
}

// childInsertPoint is where a new child of <domain> goes: before </domain>, indented
// like a child.
func (l *layout) childInsertPoint(doc []byte) (int, string, error) {
	if l.rootSelf {
		return 0, "", fmt.Errorf("domain %q: %w: <domain/> is empty; nkp edits only a full domain definition", l.dom.Name, ErrInvalid)
	}
	return l.rootEnd, indentAt(doc, l.rootEnd) + "  ", nil
}

type splice struct {
	start, end int
	text       string
}

func apply(doc []byte, edits []splice) []byte {
	slices.SortFunc(edits, func(a, b splice) int { return a.start - b.start })
	var out bytes.Buffer
	out.Grow(len(doc) + 512)
	pos := 0
	for _, e := range edits {
		out.Write(doc[pos:e.start])
		if e.text == "" {
			// A removed element takes its own line with it when it had one.
			ls := lineStart(doc, e.start)
			if ls >= pos && isBlank(doc[ls:e.start]) && out.Len() >= e.start-ls {
				out.Truncate(out.Len() - (e.start - ls))
				if e.end < len(doc) && doc[e.end] == '\n' {
					e.end++
				}
			}
		}
		out.WriteString(e.text)
		pos = e.end
	}
	out.Write(doc[pos:])
	return out.Bytes()
}

func lineStart(doc []byte, off int) int {
	return bytes.LastIndexByte(doc[:off], '\n') + 1
}

func isBlank(b []byte) bool {
	return len(bytes.TrimLeft(b, " \t")) == 0
}

// indentAt is the whitespace before off on its line, or "" if other text precedes it.
func indentAt(doc []byte, off int) string {
	ls := lineStart(doc, off)
	if !isBlank(doc[ls:off]) {
		return ""
	}
	return string(doc[ls:off])
}

type vmXML struct {
	Provider string   `xml:"provider,attr"`
	Objects  []objXML `xml:"https://nkp.dev/ns/vm/1 object"`
}

type objXML struct {
	Name       string `xml:"name,attr"`
	KeyID      string `xml:"key-id,attr"`
	KDKID      string `xml:"kdk-id,attr"`
	KDKVersion string `xml:"kdk-version,attr"`
	Secret     string `xml:"libvirt-secret,attr"`
	PCRBanks   string `xml:"pcr-banks,attr"`
}

type tpmXML struct {
	Model   string `xml:"model,attr"`
	Backend struct {
		Type            string `xml:"type,attr"`
		Version         string `xml:"version,attr"`
		PersistentState string `xml:"persistent_state,attr"`
		Source          []struct {
			Type string `xml:"type,attr"`
			Path string `xml:"path,attr"`
		} `xml:"source"`
		Encryption []struct {
			Secret string `xml:"secret,attr"`
		} `xml:"encryption"`
		ActivePCRBanks []struct {
			Banks []struct {
				XMLName xml.Name
			} `xml:",any"`
		} `xml:"active_pcr_banks"`
	} `xml:"backend"`
}

func scan(doc []byte) (*layout, error) {
	if len(doc) > MaxSize {
		return nil, fmt.Errorf("%w: %d bytes, more than the %d nkp reads", ErrInvalid, len(doc), MaxSize)
	}
	l := &layout{rootEnd: -1, doc: doc}
	d := xml.NewDecoder(bytes.NewReader(doc))
	depth := 0
	rootSeen := false
	section := "" // the child of <domain> being read
	for {
		pos := int(d.InputOffset())
		tok, err := d.Token()
		if err == io.EOF {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("%w: %v", ErrInvalid, err)
		}
		switch t := tok.(type) {
		case xml.StartElement:
			end := int(d.InputOffset())
			self := end >= 2 && end > pos && string(doc[end-2:end]) == "/>"
			depth++
			switch depth {
			case 1:
				if t.Name.Local != "domain" || t.Name.Space != "" {
					return nil, fmt.Errorf("%w: the root element is <%s>, not <domain>", ErrInvalid, t.Name.Local)
				}
				if rootSeen {
					return nil, fmt.Errorf("%w: more than one root element", ErrInvalid)
				}
				rootSeen = true
				l.rootSelf = self
				for _, a := range t.Attr {
					if a.Name.Local == "type" && a.Name.Space == "" {
						l.dom.Type = a.Value
					}
				}
			case 2:
				if t.Name.Space != "" {
					if err := d.Skip(); err != nil {
						return nil, fmt.Errorf("%w: %v", ErrInvalid, err)
					}
					depth--
					continue
				}
				section = t.Name.Local
				switch section {
				case "name", "uuid":
					var s string
					if err := d.DecodeElement(&s, &t); err != nil {
						return nil, fmt.Errorf("%w: <%s>: %v", ErrInvalid, section, err)
					}
					depth--
					if section == "name" {
						l.dom.Name = strings.TrimSpace(s)
					} else {
						l.dom.UUID = strings.ToLower(strings.TrimSpace(s))
					}
				case "metadata", "devices":
					c := &l.metadata
					if section == "devices" {
						c = &l.devices
					}
					if c.found {
						return nil, fmt.Errorf("%w: two <%s> elements", ErrInvalid, section)
					}
					*c = container{found: true, selfClosing: self, start: pos, end: end, innerEnd: end}
				default:
					if err := d.Skip(); err != nil {
						return nil, fmt.Errorf("%w: %v", ErrInvalid, err)
					}
					depth--
				}
			case 3:
				if err := l.child(d, t, section, pos); err != nil {
					return nil, err
				}
				depth--
			}
		case xml.EndElement:
			switch depth {
			case 1:
				l.rootEnd = pos
			case 2:
				c := &l.metadata
				if section == "devices" {
					c = &l.devices
				}
				if section == "metadata" || section == "devices" {
					if !c.selfClosing {
						c.innerEnd = pos
					}
					c.end = int(d.InputOffset())
				}
				section = ""
			}
			depth--
		}
	}
	if l.rootEnd < 0 {
		return nil, fmt.Errorf("%w: no <domain> element", ErrInvalid)
	}
	if len(l.nkp) > 1 {
		return nil, fmt.Errorf("domain %q: %w: %d nkp metadata elements (keep one with virsh edit)", l.dom.Name, ErrInvalid, len(l.nkp))
	}
	return l, nil
}

// child reads a grandchild of <domain> whose start tag was just read.
func (l *layout) child(d *xml.Decoder, t xml.StartElement, section string, pos int) error {
	switch {
	case section == "metadata" && t.Name.Space == Namespace && t.Name.Local == "vm":
		var v vmXML
		if err := d.DecodeElement(&v, &t); err != nil {
			return fmt.Errorf("%w: nkp metadata: %v", ErrInvalid, err)
		}
		m := &Metadata{ProviderID: v.Provider}
		for _, o := range v.Objects {
			n, err := strconv.Atoi(o.KDKVersion)
			if err != nil {
				return fmt.Errorf("domain %q: %w: nkp metadata: object %q: kdk-version %q is not a number", l.dom.Name, ErrInvalid, o.Name, o.KDKVersion)
			}
			m.Objects = append(m.Objects, Object{Name: o.Name, KeyID: strings.ToLower(o.KeyID), KDKID: strings.ToLower(o.KDKID), KDKVersion: n, SwtpmSecret: strings.ToLower(o.Secret), PCRBanks: o.PCRBanks})
		}
		if err := m.Validate(); err != nil {
			return fmt.Errorf("domain %q: %w", l.dom.Name, err)
		}
		l.dom.Metadata = m
		l.nkp = append(l.nkp, span{pos, int(d.InputOffset())})
	case section == "devices" && t.Name.Space == "" && t.Name.Local == "tpm":
		var x tpmXML
		if err := d.DecodeElement(&x, &t); err != nil {
			return fmt.Errorf("%w: <tpm>: %v", ErrInvalid, err)
		}
		tp := TPM{Model: x.Model, Backend: x.Backend.Type, Version: x.Backend.Version,
			PersistentState: x.Backend.PersistentState == "yes"}
		for _, s := range x.Backend.Source {
			switch {
			case x.Backend.Type == BackendExternal && s.Type == "unix":
				tp.SocketPath = s.Path
			case x.Backend.Type == BackendEmulator && s.Type == "dir":
				tp.StateDir = s.Path
			}
		}
		if len(x.Backend.Encryption) > 0 {
			tp.EncryptionSecret = strings.ToLower(x.Backend.Encryption[0].Secret)
		}
		if len(x.Backend.ActivePCRBanks) > 0 {
			tp.ActivePCRBanks = []string{}
			for _, b := range x.Backend.ActivePCRBanks[0].Banks {
				tp.ActivePCRBanks = append(tp.ActivePCRBanks, b.XMLName.Local)
			}
		}
		l.dom.TPMs = append(l.dom.TPMs, tp)
		l.tpms = append(l.tpms, span{pos, int(d.InputOffset())})
	case section == "devices" && t.Name.Space == "" && t.Name.Local == "disk":
		if len(l.disks) >= MaxDisks {
			return fmt.Errorf("domain %q: %w: more than %d disks", l.dom.Name, ErrInvalid, MaxDisks)
		}
		dk, sp, err := scanDisk(l.doc, d, t, pos)
		if err != nil {
			return err
		}
		if err := dk.check(); err != nil {
			return err
		}
		for _, o := range l.dom.Disks {
			if dk.Target != "" && o.Target == dk.Target {
				return fmt.Errorf("domain %q: %w: two disks with target %s", l.dom.Name, ErrInvalid, dk.Target)
			}
		}
		l.dom.Disks = append(l.dom.Disks, dk)
		l.disks = append(l.disks, sp)
	default:
		return d.Skip()
	}
	return nil
}

// secretNamespace is the UUIDv5 namespace of nkp's disk secrets (a fixed random UUID).
var secretNamespace = uuid.MustParse("6f1d3c2a-8b7e-4f55-9a0c-2d4e6b8f1a37")

// SecretUUID is the UUID of the libvirt secret that holds the LUKS passphrase of the
// disk object keyID of VM vmUUID: a name-based UUID (version 5) of both, so that every
// host computes the same UUID from the domain XML alone, and a disk's <encryption>
// element never has to change when hostd defines the secret again (after a libvirtd
// restart, on another host after a migration).
func SecretUUID(vmUUID, keyID string) string {
	return uuid.NewSHA1(secretNamespace, []byte("nkp-disk-secret\x00"+strings.ToLower(vmUUID)+"\x00"+strings.ToLower(keyID))).String()
}
