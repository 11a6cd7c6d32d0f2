package hostd

import (
	"io"

	"github.com/nkp-dev/nkp/internal/tpmdev"
)

// openTPMSpec opens the host TPM named by spec (internal/tpmdev: "" is /dev/tpmrm0,
// swtpm:path=DATA[,ctrl=CTRL] a socket TPM).
func openTPMSpec(spec string) (io.ReadWriter, io.Closer, error) {
	t, err := tpmdev.Open(spec)
	if err != nil {
		return nil, nil, err
	}
	return tpmdev.ReadWriter(t), t, nil
}
