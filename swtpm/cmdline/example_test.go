package cmdline_test

import (
	"fmt"
	"strings"

	"github.com/nkp-dev/nkp/swtpm/cmdline"
)

// The command line libvirt 9.0 runs for a vTPM with an encrypted state.
func ExampleParse() {
	o, err := cmdline.Parse(strings.Fields("--ctrl type=unixio,path=/run/vm.sock,mode=0600 --tpmstate dir=/var/lib/vm,mode=0600 --log file=/var/log/vm.log --terminate --tpm2 --key pwdfd=20,mode=aes-256-cbc"))
	if err != nil {
		fmt.Println(err)
		return
	}
	fmt.Println(o.Ctrl.Type, o.Ctrl.Path, o.Ctrl.Mode, o.Terminate)
	fmt.Println(o.State.Dir, o.Key.PwdFD, o.Key.KeyLen, o.Key.KDF)

	_, err = cmdline.Parse(strings.Fields("--tpm2 --ctrl type=unixio,path=/s,owner=qemu"))
	fmt.Println(err)
	// Output:
	// unixio /run/vm.sock -rw------- true
	// /var/lib/vm 20 32 pbkdf2
	// --ctrl: unknown sub-option "owner"; accepted sub-options: type, path, port, bindaddr, ifname, fd, clientfd, mode, uid, gid, terminate
}
