package vtpm

import (
	"context"
	"fmt"
	"net"
	"time"

	"github.com/nkp-dev/nkp/swtpm/ctrl"
)

// Probe asks vm's running vTPM, on its status channel (a root-only socket beside the
// control socket QEMU holds, NKP_SWTPM_STATUS_FD), for GET_TPMESTABLISHED: the request
// goes through nkp-swtpm's engine lock into the TPM and changes nothing the guest sees.
// nil means the vTPM answered with success; an error says what failed (no vTPM, no
// answer within ctx, or the TPM's result code, such as a TPM not initialised by QEMU).
func (s *Supervisor) Probe(ctx context.Context, vmUUID string) error {
	if _, ok := s.Get(vmUUID); !ok {
		return fmt.Errorf("vTPM of %s: %w", vmUUID, ErrNotRunning)
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", s.statusPath(vmUUID))
	if err != nil {
		return fmt.Errorf("vTPM of %s: its status channel: %w (a vTPM started by an nkp-hostd without it has none; it gets one at the VM's next start)", vmUUID, err)
	}
	defer c.Close()
	dl, _ := ctx.Deadline()
	c.SetDeadline(dl)
	if _, err := c.Write(ctrl.GetEstablished{}.Marshal()); err != nil {
		return fmt.Errorf("vTPM of %s: asking: %w", vmUUID, err)
	}
	resp, err := ctrl.ReadResponse(c, ctrl.CmdGetEstablished)
	if err != nil {
		return fmt.Errorf("vTPM of %s: no answer: %w", vmUUID, err)
	}
	var res ctrl.Result
	switch r := resp.(type) {
	case ctrl.EstablishedResponse:
		res = r.Result
	case ctrl.ResultResponse:
		res = r.Result
	}
	if res != ctrl.ResSuccess {
		return fmt.Errorf("vTPM of %s: it answers, but its TPM reports %v (not started by QEMU yet, or failed)", vmUUID, res)
	}
	return nil
}
