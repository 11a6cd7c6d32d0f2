//go:build !cgo

package libtpms

// TPM would be the process' libtpms TPM 2.0; without cgo every method fails
// with ErrNoCgo.
type TPM struct{}

// Open fails with ErrNoCgo: libtpms is reached through cgo.
func Open(nv NVRAM) (*TPM, error) { return nil, ErrNoCgo }

// Close does nothing.
func (t *TPM) Close() error { return nil }

// SetState fails with ErrNoCgo.
func (t *TPM) SetState(typ StateType, blob []byte) error { return ErrNoCgo }

// GetState fails with ErrNoCgo.
func (t *TPM) GetState(typ StateType) ([]byte, error) { return nil, ErrNoCgo }

// MainInit fails with ErrNoCgo.
func (t *TPM) MainInit() error { return ErrNoCgo }

// Terminate does nothing.
func (t *TPM) Terminate() {}

// Process fails with ErrNoCgo.
func (t *TPM) Process(cmd []byte) ([]byte, error) { return nil, ErrNoCgo }

// SetLocality does nothing.
func (t *TPM) SetLocality(loc uint8) {}

// VolatileAllStore fails with ErrNoCgo.
func (t *TPM) VolatileAllStore() ([]byte, error) { return nil, ErrNoCgo }

// SetBufferSize fails with ErrNoCgo.
func (t *TPM) SetBufferSize(want uint32) (actual, min, max uint32, err error) {
	return 0, 0, 0, ErrNoCgo
}

// Info fails with ErrNoCgo.
func (t *TPM) Info(flags uint64) (string, error) { return "", ErrNoCgo }

// HashStart fails with ErrNoCgo.
func (t *TPM) HashStart() error { return ErrNoCgo }

// HashData fails with ErrNoCgo.
func (t *TPM) HashData(p []byte) error { return ErrNoCgo }

// HashEnd fails with ErrNoCgo.
func (t *TPM) HashEnd() error { return ErrNoCgo }

// Established fails with ErrNoCgo.
func (t *TPM) Established() (bool, error) { return false, ErrNoCgo }

// ResetEstablished fails with ErrNoCgo.
func (t *TPM) ResetEstablished(loc uint8) error { return ErrNoCgo }

// Cancel fails with ErrNoCgo.
func (t *TPM) Cancel() error { return ErrNoCgo }
