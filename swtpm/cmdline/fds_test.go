package cmdline

import (
	"reflect"
	"strings"
	"testing"
)

func TestInheritedFDs(t *testing.T) {
	o, err := Parse(strings.Fields("--tpm2 --tpmstate dir=/s --ctrl type=unixio,clientfd=6 --server type=tcp,fd=5 --key pwdfd=7 --migration-key fd=8 --log fd=9 --pid fd=10"))
	if err != nil {
		t.Fatal(err)
	}
	if got, want := o.InheritedFDs(), []int{6, 5, 7, 8, 9, 10}; !reflect.DeepEqual(got, want) {
		t.Errorf("InheritedFDs = %v, want %v", got, want)
	}
	o, _ = Parse(strings.Fields("--tpm2 --tpmstate dir=/s --ctrl type=unixio,path=/c --log fd=2"))
	if got := o.InheritedFDs(); len(got) != 0 {
		t.Errorf("InheritedFDs = %v, want none (stderr is not passed as an extra file)", got)
	}
}
