package cmdline

import (
	"fmt"
	"strconv"
	"strings"
)

// kind is the type of a sub-option's value, as swtpm's option templates name them.
type kind int

const (
	kindString kind = iota // any text (may be empty only if given as name=)
	kindInt                // decimal integer, may be negative (fds: -1 means none)
	kindUint               // decimal unsigned integer
	kindBool               // bare name, or name=true|false|1|0
	kindMode               // octal file mode, at most 0777
	kindOwner              // uid/gid: a number or a user/group name (resolved later)
)

// subOpt describes one accepted sub-option of a command-line option such as --ctrl.
type subOpt struct {
	name string
	kind kind
}

// subValue is one parsed sub-option.
type subValue struct {
	name string
	raw  string // the text after '=' ("true" for a bare boolean)
	num  int64  // for kindInt, kindUint, kindMode
	flag bool   // for kindBool
}

// subValues is the result of parsing one option's value, in command-line order.
type subValues []subValue

// get returns the value of name, if it was given.
func (vs subValues) get(name string) (subValue, bool) {
	for _, v := range vs {
		if v.name == name {
			return v, true
		}
	}
	return subValue{}, false
}

func (vs subValues) has(name string) bool { _, ok := vs.get(name); return ok }

func (vs subValues) str(name, def string) string {
	if v, ok := vs.get(name); ok {
		return v.raw
	}
	return def
}

func (vs subValues) num(name string, def int64) int64 {
	if v, ok := vs.get(name); ok {
		return v.num
	}
	return def
}

func (vs subValues) flag(name string) bool {
	v, ok := vs.get(name)
	return ok && v.flag
}

// names lists the accepted sub-option names, for error messages.
func names(descs []subOpt) string {
	s := make([]string, len(descs))
	for i, d := range descs {
		s[i] = d.name
	}
	return strings.Join(s, ", ")
}

// parseSubOptions splits the value of a command-line option (e.g. the text after
// --ctrl) into comma-separated sub-options "name=value" or bare "name" (a boolean set
// to true), and checks each against descs the way swtpm's options_parse does, but
// stricter: an unknown name, a value of the wrong type, a value given to a boolean that
// is not true/false/1/0, an empty item, and a name given twice are all refused with an
// error naming the option and what it accepts. Names are case-sensitive.
func parseSubOptions(option, s string, descs []subOpt) (subValues, error) {
	if s == "" {
		return nil, fmt.Errorf("--%s needs a value; accepted sub-options: %s", option, names(descs))
	}
	var out subValues
	for _, item := range strings.Split(s, ",") {
		if item == "" {
			return nil, fmt.Errorf("--%s %q: empty sub-option (a stray comma?); accepted sub-options: %s", option, s, names(descs))
		}
		name, val, hasVal := strings.Cut(item, "=")
		var d *subOpt
		for i := range descs {
			if descs[i].name == name {
				d = &descs[i]
				break
			}
		}
		if d == nil {
			return nil, fmt.Errorf("--%s: unknown sub-option %q; accepted sub-options: %s", option, name, names(descs))
		}
		if out.has(name) {
			return nil, fmt.Errorf("--%s: sub-option %q given twice", option, name)
		}
		v, err := parseSubValue(option, d, val, hasVal)
		if err != nil {
			return nil, err
		}
		out = append(out, v)
	}
	return out, nil
}

func parseSubValue(option string, d *subOpt, val string, hasVal bool) (subValue, error) {
	v := subValue{name: d.name, raw: val}
	if d.kind == kindBool {
		if !hasVal {
			v.raw, v.flag = "true", true
			return v, nil
		}
		switch strings.ToLower(val) {
		case "true", "1":
			v.flag = true
		case "false", "0":
		default:
			return v, fmt.Errorf("--%s: %s=%q: a boolean sub-option takes true, false, 1 or 0 (or no value, meaning true)", option, d.name, val)
		}
		return v, nil
	}
	if !hasVal || val == "" {
		return v, fmt.Errorf("--%s: sub-option %q needs a value (%s=...)", option, d.name, d.name)
	}
	var err error
	switch d.kind {
	case kindInt:
		v.num, err = strconv.ParseInt(val, 10, 32)
		if err != nil {
			return v, fmt.Errorf("--%s: %s=%q is not a decimal integer", option, d.name, val)
		}
	case kindUint:
		var u uint64
		u, err = strconv.ParseUint(val, 10, 32)
		if err != nil {
			return v, fmt.Errorf("--%s: %s=%q is not an unsigned decimal integer", option, d.name, val)
		}
		v.num = int64(u)
	case kindMode:
		var u uint64
		u, err = strconv.ParseUint(val, 8, 32)
		if err != nil || u > 0o777 {
			return v, fmt.Errorf("--%s: %s=%q is not an octal file mode between 0 and 0777", option, d.name, val)
		}
		v.num = int64(u)
	case kindOwner:
		if n, err := strconv.ParseUint(val, 10, 32); err == nil {
			v.num = int64(n)
		} else {
			v.num = -1 // a name, looked up when the socket is created
		}
	}
	return v, nil
}
