package cmdline

import (
	"reflect"
	"strings"
	"testing"
)

// FuzzParseSubOptions checks the sub-option parser on arbitrary text: it never panics,
// and what it accepts contains only known names, each once, with values that re-parse
// to the same result.
func FuzzParseSubOptions(f *testing.F) {
	for _, s := range []string{
		"type=unixio,path=/run/x.sock,mode=0600,terminate",
		"type=tcp,port=2321,bindaddr=::1,disconnect",
		"type=unixio,clientfd=6",
		"type=tcp,fd=5",
		"uid=libvirt-qemu,gid=kvm,path=/s",
		"terminate=false,fd=-1",
		",", "=", "path", "mode=", "mode=0999", "port=99999999999",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		vs, err := parseSubOptions("ctrl", s, ctrlSubOpts)
		if err != nil {
			if !strings.HasPrefix(err.Error(), "--ctrl") {
				t.Fatalf("error %q does not name the option", err)
			}
			return
		}
		seen := map[string]bool{}
		var items []string
		for _, v := range vs {
			known := false
			for _, d := range ctrlSubOpts {
				if d.name == v.name {
					known = true
				}
			}
			if !known || seen[v.name] {
				t.Fatalf("accepted unknown or repeated sub-option %q in %q", v.name, s)
			}
			seen[v.name] = true
			if v.name == "mode" && (v.num < 0 || v.num > 0o777) {
				t.Fatalf("mode %o out of range from %q", v.num, s)
			}
			items = append(items, v.name+"="+v.raw)
		}
		again, err := parseSubOptions("ctrl", strings.Join(items, ","), ctrlSubOpts)
		if err != nil {
			t.Fatalf("re-parse of %q (from %q): %v", strings.Join(items, ","), s, err)
		}
		if len(again) != len(vs) {
			t.Fatalf("re-parse gave %d values, want %d", len(again), len(vs))
		}
		for i := range vs {
			if again[i] != vs[i] {
				t.Fatalf("re-parse changed %+v to %+v", vs[i], again[i])
			}
		}
	})
}

// FuzzParse checks the whole command-line parser on arguments split from arbitrary
// text: it never panics and every error is a sentence naming what is wrong.
func FuzzParse(f *testing.F) {
	f.Add("--tpm2 --ctrl type=unixio,path=/s,mode=0600 --tpmstate dir=/d,mode=0600 --log file=/l --terminate")
	f.Add("--flags not-need-init,startup-clear --tpmstate backend-uri=dir:///d --tpm2 --server type=tcp,fd=5 --ctrl type=unixio,clientfd=6")
	f.Add("-dtp2321 --tpm2 --tpmstate dir=/d")
	f.Add("--print-capabilities")
	f.Fuzz(func(t *testing.T, s string) {
		o, err := Parse(strings.Fields(s))
		if err != nil {
			if err.Error() == "" {
				t.Fatal("empty error")
			}
			return
		}
		if o == nil {
			t.Fatal("nil options without error")
		}
		for _, c := range []*Channel{o.Ctrl, o.Server} {
			if c == nil {
				continue
			}
			if c.Type != TypeUnixIO && c.Type != TypeTCP {
				t.Fatalf("channel type %q accepted from %q", c.Type, s)
			}
			if c.ListenFD >= 0 && c.ConnFD >= 0 {
				t.Fatalf("both listen and conn fd from %q", s)
			}
		}
	})
}

// FuzzBuild checks Build against Parse on arguments split from arbitrary text: for
// every command line Parse accepts, Build succeeds and its argv parses back to the same
// Options. (A file mode of 0 is the one thing Build cannot say: it means "default".)
func FuzzBuild(f *testing.F) {
	f.Add("--tpm2 --ctrl type=unixio,path=/s,mode=0660,gid=kvm --tpmstate dir=/d,mode=0600 --key fd=3,format=binary,mode=aes-256-gcm")
	f.Add("--flags not-need-init,startup-clear --tpmstate backend-uri=dir:///d,lock --tpm2 --server type=tcp,fd=5 --ctrl type=unixio,clientfd=6")
	f.Add("-dtp2321 -f 9 --tpm2 --tpmstate dir=/d --log fd=1,prefix=a=b")
	f.Add("--tpm2 --ctrl=type=tcp,port=0,bindaddr=::1 --server type=unixio,fd=4 --key pwdfd=5,kdf=sha512")
	f.Fuzz(func(t *testing.T, s string) {
		want, err := Parse(strings.Fields(s))
		if err != nil {
			return
		}
		for _, c := range []*Channel{want.Ctrl, want.Server} {
			if c != nil && c.Path != "" && c.Mode == 0 {
				return
			}
		}
		if want.State != nil && !want.State.ModeDefault && want.State.Mode == 0 {
			return
		}
		args, err := Build(want)
		if err != nil {
			t.Fatalf("Parse accepted %q but Build refused it: %v", s, err)
		}
		got, err := Parse(args)
		if err != nil {
			t.Fatalf("Build(Parse(%q)) = %q, which Parse refuses: %v", s, args, err)
		}
		if !reflect.DeepEqual(got, want) {
			t.Fatalf("Build(Parse(%q)) = %q, which parses to %+v, want %+v", s, args, got, want)
		}
	})
}
