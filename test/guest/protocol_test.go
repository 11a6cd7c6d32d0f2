package guest

import (
	"reflect"
	"strings"
	"testing"
)

func TestKernelArgsRoundTrip(t *testing.T) {
	tests := []struct {
		name    string
		cfg     Config
		wantErr string
	}{
		{name: "info only", cfg: Config{}},
		{name: "nv write", cfg: Config{Actions: []string{ActionNVWrite}, NV: "v-1.2_x"}},
		{name: "everything", cfg: Config{Actions: []string{ActionNVWrite, ActionNVRead, ActionExtend, ActionLoop}, NV: "a", Extend: "b", Loop: 30}},
		{name: "unknown action", cfg: Config{Actions: []string{"format-disk"}}, wantErr: "unknown action"},
		{name: "nv missing", cfg: Config{Actions: []string{ActionNVWrite}}, wantErr: "nv value"},
		{name: "nv too long", cfg: Config{Actions: []string{ActionNVWrite}, NV: strings.Repeat("x", NVSize+1)}, wantErr: "1..64"},
		{name: "nv with space", cfg: Config{Actions: []string{ActionNVWrite}, NV: "a b"}, wantErr: "not in"},
		{name: "nv with equals", cfg: Config{Actions: []string{ActionNVWrite}, NV: "a=b"}, wantErr: "not in"},
		{name: "loop without seconds", cfg: Config{Actions: []string{ActionLoop}}, wantErr: "Loop > 0"},
		{name: "loop too long", cfg: Config{Actions: []string{ActionLoop}, Loop: 4000}, wantErr: "out of range"},
		{name: "disk write", cfg: Config{Actions: []string{ActionDiskWrite}, Disk: "m-1"}},
		{name: "disk write two devices and loop", cfg: Config{Actions: []string{ActionDiskWrite, ActionLoop}, Disk: "m", Devices: []string{"vda", "vdc"}, Loop: 5}},
		{name: "disk read", cfg: Config{Actions: []string{ActionDiskRead}, Devices: []string{"vdb"}}},
		{name: "disk write without marker", cfg: Config{Actions: []string{ActionDiskWrite}}, wantErr: "disk value must have"},
		{name: "disk marker too long", cfg: Config{Actions: []string{ActionDiskWrite}, Disk: strings.Repeat("d", MarkerSize+1)}, wantErr: "1..64"},
		{name: "disk marker with slash", cfg: Config{Actions: []string{ActionDiskWrite}, Disk: "a/b"}, wantErr: "not in"},
		{name: "marker without diskwrite", cfg: Config{Actions: []string{ActionDiskRead}, Disk: "m"}, wantErr: "without action diskwrite"},
		{name: "devices without disk action", cfg: Config{Devices: []string{"vda"}}, wantErr: "without action"},
		{name: "device not virtio", cfg: Config{Actions: []string{ActionDiskRead}, Devices: []string{"sda"}}, wantErr: "not a virtio disk"},
		{name: "device path", cfg: Config{Actions: []string{ActionDiskRead}, Devices: []string{"../vda"}}, wantErr: "not a virtio disk"},
		{name: "device twice", cfg: Config{Actions: []string{ActionDiskRead}, Devices: []string{"vdb", "vdb"}}, wantErr: "listed twice"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			args, err := tc.cfg.KernelArgs()
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("KernelArgs: err %v, want one containing %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("KernelArgs: %v", err)
			}
			if !strings.Contains(args, "console=ttyS0") {
				t.Errorf("KernelArgs %q lacks the serial console", args)
			}
			got, err := ParseArgs("BOOT_IMAGE=x root=/dev/vda " + args + " other=1")
			if err != nil {
				t.Fatalf("ParseArgs(%q): %v", args, err)
			}
			if !reflect.DeepEqual(got, tc.cfg) {
				t.Errorf("ParseArgs(KernelArgs(c)) = %+v, want %+v", got, tc.cfg)
			}
		})
	}
}

func TestParseArgsErrors(t *testing.T) {
	tests := []struct {
		cmdline, wantErr string
	}{
		{"nkp.loop=ten", "nkp.loop"},
		{"nkp.bogus=1", "unknown parameter"},
		{"nkp.do=nvwrite", "nv value"},
		{"nkp.do=loop nkp.loop=-1", "out of range"},
		{"nkp.do=diskread nkp.dev=", "not a virtio disk"},
		{"nkp.do=diskread nkp.dev=vda,,vdb", "not a virtio disk"},
		{"nkp.do=diskwrite", "disk value"},
		{"nkp.disk=x", "without action"},
	}
	for _, tc := range tests {
		if _, err := ParseArgs(tc.cmdline); err == nil || !strings.Contains(err.Error(), tc.wantErr) {
			t.Errorf("ParseArgs(%q): err %v, want one containing %q", tc.cmdline, err, tc.wantErr)
		}
	}
}

func TestParseConsole(t *testing.T) {
	tests := []struct {
		name string
		in   string
		want []Record
	}{
		{name: "empty", in: "", want: nil},
		{name: "kernel noise only", in: "[    0.000000] Linux version 6.1\r\nreboot: Power down\r\n", want: nil},
		{name: "records with CRLF", in: "NKP-GUEST tpm=2.0 tpm-manufacturer=IBM\r\nNKP-GUEST pcr0=00ff\r\n",
			want: []Record{{"tpm": "2.0", "tpm-manufacturer": "IBM"}, {"pcr0": "00ff"}}},
		{name: "prefix after kernel text", in: "[ 1.2] random: crng init done NKP-GUEST nv=x\n", want: []Record{{"nv": "x"}}},
		{name: "quoted value", in: `NKP-GUEST error="open /dev/tpm0: no such file" done=fail` + "\n",
			want: []Record{{"error": "open /dev/tpm0: no such file", "done": "fail"}}},
		{name: "malformed pair stops the line", in: "NKP-GUEST a=1 junk b=2\n", want: []Record{{"a": "1"}}},
		{name: "bad quote stops the line", in: "NKP-GUEST a=1 b=\"open\n", want: []Record{{"a": "1"}}},
		{name: "prefix without pairs", in: "NKP-GUEST \nNKP-GUESTX a=1\n", want: nil},
		{name: "unterminated last line is still being written", in: "NKP-GUEST a=1\nNKP-GUEST loop=3 pcr0=e2", want: []Record{{"a": "1"}}},
		{name: "unterminated only line", in: "NKP-GUEST done=ok", want: nil},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got := ParseConsole([]byte(tc.in))
			if !reflect.DeepEqual(got, tc.want) {
				t.Errorf("ParseConsole(%q) = %v, want %v", tc.in, got, tc.want)
			}
		})
	}
}

func TestFormatRecordParses(t *testing.T) {
	tests := [][]string{
		{"tpm", "2.0"},
		{"error", `TPM2_NV_Read(0x1800100): "bad" = worse`, "done", "fail"},
		{"empty", ""},
		{"tab", "a\tb", "nl", "x\ny", "utf8", "é"},
	}
	for _, pairs := range tests {
		line := FormatRecord(pairs...)
		recs := ParseConsole([]byte(line + "\r\n"))
		if len(recs) != 1 {
			t.Fatalf("FormatRecord(%q) = %q parses to %d records, want 1", pairs, line, len(recs))
		}
		for i := 0; i < len(pairs); i += 2 {
			if got := recs[0][pairs[i]]; got != pairs[i+1] {
				t.Errorf("FormatRecord(%q) = %q: %s parses back as %q", pairs, line, pairs[i], got)
			}
		}
	}
}

func TestDiskBlock(t *testing.T) {
	tests := []struct {
		name   string
		block  []byte
		want   string
		wantOK bool
	}{
		{"round trip", DiskBlock("m-42"), "m-42", true},
		{"zeros", make([]byte, DiskBlockSize), "", false},
		{"magic without newline", []byte("NKP-DISK-MARKER abc"), "", false},
		{"bad byte in value", []byte("NKP-DISK-MARKER a b\n"), "", false},
		{"empty value", []byte("NKP-DISK-MARKER \n"), "", false},
	}
	for _, tc := range tests {
		got, ok := ParseDiskBlock(tc.block)
		if got != tc.want || ok != tc.wantOK {
			t.Errorf("%s: ParseDiskBlock = %q, %v; want %q, %v", tc.name, got, ok, tc.want, tc.wantOK)
		}
	}
	if b := DiskBlock("x"); len(b) != DiskBlockSize || !strings.HasPrefix(string(b), "NKP-DISK-MARKER x\n") {
		t.Errorf("DiskBlock(x) = %q..., len %d", b[:24], len(b))
	}
}

func TestLast(t *testing.T) {
	recs := []Record{{"a": "1"}, {"b": "2"}, {"a": "3"}}
	tests := []struct {
		key, want string
		ok        bool
	}{{"a", "3", true}, {"b", "2", true}, {"c", "", false}}
	for _, tc := range tests {
		if got, ok := Last(recs, tc.key); got != tc.want || ok != tc.ok {
			t.Errorf("Last(%q) = %q, %v; want %q, %v", tc.key, got, ok, tc.want, tc.ok)
		}
	}
}

// FuzzParseConsole feeds arbitrary console bytes (the guest is untrusted) to the parser:
// it must not panic, and every record it returns has non-empty keys without spaces.
func FuzzParseConsole(f *testing.F) {
	f.Add([]byte("NKP-GUEST tpm=2.0\r\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		for _, r := range ParseConsole(data) {
			if len(r) == 0 {
				t.Fatalf("empty record from %q", data)
			}
			for k := range r {
				if k == "" || strings.ContainsAny(k, " \n") {
					t.Fatalf("bad key %q from %q", k, data)
				}
			}
		}
	})
}

func TestParseDepends(t *testing.T) {
	tests := []struct {
		in, want string
		ok       bool
	}{
		{"linux-image-cloud-amd64\n  Depends: linux-image-6.1.0-56-cloud-amd64\n", "linux-image-6.1.0-56-cloud-amd64", true},
		{"linux-image-cloud-amd64\n  Depends: <linux-image-6.1>\n", "", false},
		{"linux-image-cloud-amd64\n  Recommends: firmware\n", "", false},
		{"", "", false},
	}
	for _, tc := range tests {
		got, err := parseDepends(tc.in)
		if got != tc.want || (err == nil) != tc.ok {
			t.Errorf("parseDepends(%q) = %q, %v; want %q, ok=%v", tc.in, got, err, tc.want, tc.ok)
		}
	}
}

// FuzzParseArgs checks that any command line ParseArgs accepts survives a round trip
// through KernelArgs.
func FuzzParseArgs(f *testing.F) {
	f.Add("console=ttyS0 nkp.do=nvwrite,loop nkp.nv=abc nkp.loop=5")
	f.Fuzz(func(t *testing.T, cmdline string) {
		c, err := ParseArgs(cmdline)
		if err != nil {
			return
		}
		args, err := c.KernelArgs()
		if err != nil {
			t.Fatalf("ParseArgs(%q) accepted %+v but KernelArgs refuses it: %v", cmdline, c, err)
		}
		back, err := ParseArgs(args)
		if err != nil || !reflect.DeepEqual(back, c) {
			t.Fatalf("round trip of %+v through %q gave %+v, %v", c, args, back, err)
		}
	})
}
