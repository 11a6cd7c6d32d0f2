package state

import (
	"bytes"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/nkp-dev/nkp/internal/atomicfile"
)

// sealSlotV2 writes a format version 2 record as nkp-swtpm did before the state ID (48
// header bytes, the AEAD's additional data), for the compatibility tests.
func sealSlotV2(t *testing.T, s *sealer, typ byte, seq uint64, size int, payload []byte) []byte {
	t.Helper()
	out := make([]byte, slotHeaderV2, slotHeaderV2+len(payload)+16)
	copy(out, fileMagic)
	out[8] = fileVersionSlots
	out[9] = typ
	copy(out[12:], s.keyID[:])
	rand.Read(out[20:32])
	binary.BigEndian.PutUint64(out[32:], seq)
	binary.BigEndian.PutUint32(out[40:], uint32(size))
	binary.BigEndian.PutUint32(out[44:], uint32(len(payload)))
	return s.aead.Seal(out, out[20:32], payload, out[:slotHeaderV2])
}

// TestStateID: the first keyed Store gives the directory a state ID and binds its
// records to it; a file copied in from another directory under the same key is refused
// (ErrForeign) and left as it is, also when the directory lost its ID file; a file of
// format version 2 (no ID) loads and is bound at its next write.
func TestStateID(t *testing.T) {
	key := testKey(t, 8, 32)
	vmA, vmB := t.TempDir(), t.TempDir()
	for _, dir := range []string{vmA, vmB} {
		d := mustOpen(t, dir, Options{Key: key})
		if err := d.Store("permall", []byte("state of "+dir)); err != nil {
			t.Fatal(err)
		}
		d.Close()
	}
	idA, _ := os.ReadFile(filepath.Join(vmA, stateIDFile))
	idB, _ := os.ReadFile(filepath.Join(vmB, stateIDFile))
	if len(idA) != 33 || bytes.Equal(idA, idB) {
		t.Fatalf("state IDs %q and %q: want two different ones", idA, idB)
	}
	fromB, _ := os.ReadFile(filepath.Join(vmB, FileName("permall")))

	for _, tt := range []struct {
		name    string
		noIDA   bool // vmA lost its .nkp-state-id
		wantMsg string
	}{
		{"copied from another VM", false, "copied from another VM's state directory"},
		{"copied, and the ID file removed", true, "this directory has no " + stateIDFile},
	} {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			if !tt.noIDA {
				os.WriteFile(filepath.Join(dir, stateIDFile), idA, 0o600)
			}
			p := filepath.Join(dir, FileName("permall"))
			os.WriteFile(p, fromB, 0o600)
			d := mustOpen(t, dir, Options{Key: key})
			_, err := d.Load("permall")
			if !errors.Is(err, ErrForeign) || !strings.Contains(err.Error(), tt.wantMsg) || !strings.Contains(err.Error(), p) {
				t.Fatalf("Load = %v; want ErrForeign saying %q", err, tt.wantMsg)
			}
			if err := d.Store("permall", []byte("overwrite")); err == nil {
				t.Fatal("Store overwrote the refused file")
			}
			if now, _ := os.ReadFile(p); !bytes.Equal(now, fromB) {
				t.Fatal("the refused file changed")
			}
		})
	}

	t.Run("version 2 file is bound at its next write", func(t *testing.T) {
		dir := t.TempDir()
		os.WriteFile(filepath.Join(dir, stateIDFile), idA, 0o600)
		s, _ := newSealer(key.Bytes())
		size := slotSizeFor(100)
		p := filepath.Join(dir, FileName("permall"))
		os.WriteFile(p, newSlotFile(sealSlotV2(t, s, 1, 4, size, []byte("v2 state")), size), 0o600)
		d := mustOpen(t, dir, Options{Key: key})
		if got, err := d.Load("permall"); err != nil || string(got) != "v2 state" {
			t.Fatalf("Load of a version 2 file = %q, %v", got, err)
		}
		if err := d.Store("permall", []byte("v3 state")); err != nil {
			t.Fatal(err)
		}
		f, _ := os.ReadFile(p)
		if f[size+8] != fileVersionBound || !bytes.Equal(f[size+48:size+64], mustHex(t, idA)) || binary.BigEndian.Uint64(f[size+32:]) != 5 {
			t.Fatalf("the in-place write is not a bound version 3 record with sequence 5: % x", f[size:size+64])
		}
		d.Close()
		if got, err := mustOpen(t, dir, Options{Key: key}).Load("permall"); err != nil || string(got) != "v3 state" {
			t.Fatalf("Load after binding = %q, %v", got, err)
		}
	})

	t.Run("version 2 file, newest slot damaged: previous record, loudly", func(t *testing.T) {
		dir := t.TempDir()
		s, _ := newSealer(key.Bytes())
		size := slotSizeFor(100)
		f := make([]byte, 2*size)
		copy(f, sealSlotV2(t, s, 1, 4, size, []byte("older")))
		copy(f[size:], sealSlotV2(t, s, 1, 5, size, []byte("newer")))
		f[size+slotHeaderV2+2] ^= 1
		os.WriteFile(filepath.Join(dir, FileName("permall")), f, 0o600)
		var logBuf bytes.Buffer
		d := mustOpen(t, dir, Options{Key: key, Log: slog.New(slog.NewTextHandler(&logBuf, nil))})
		if got, err := d.Load("permall"); err != nil || string(got) != "older" {
			t.Fatalf("Load = %q, %v", got, err)
		}
		if st := d.Stats(); st != (Stats{DamagedSlots: 1, Rollbacks: 1}) {
			t.Errorf("Stats = %+v", st)
		}
		for _, want := range []string{"level=ERROR", "slot=1", "slot_sequence=5", "loaded_sequence=4", "nkp_swtpm_state_rollbacks_total=1", "nkp_swtpm_state_damaged_slots_total=1"} {
			if !strings.Contains(logBuf.String(), want) {
				t.Errorf("log lacks %q:\n%s", want, logBuf.String())
			}
		}
	})
}

func mustHex(t *testing.T, line []byte) []byte {
	t.Helper()
	id, err := readStateIDBytes(line)
	if err != nil {
		t.Fatal(err)
	}
	return id
}

// TestDirPermissions: a world-writable state directory is refused with the fix in the
// message; .lock is created with the files' mode (not a fixed 0660); an existing .lock
// keeps its own.
func TestDirPermissions(t *testing.T) {
	dir := t.TempDir()
	if err := os.Chmod(dir, 0o777); err != nil {
		t.Fatal(err)
	}
	_, err := Open(dir, Options{})
	if err == nil || !strings.Contains(err.Error(), "writable by every user") || !strings.Contains(err.Error(), "chmod o-w "+dir) {
		t.Fatalf("Open of a 0777 directory = %v", err)
	}
	if _, err := os.Stat(filepath.Join(dir, lockFile)); err == nil {
		t.Errorf("the refused Open created .lock")
	}
	for _, tt := range []struct {
		mode, want os.FileMode
	}{{0, DefaultMode}, {0o600, 0o600}, {0o640, 0o640}} {
		dir := t.TempDir()
		d := mustOpen(t, dir, Options{Mode: tt.mode})
		fi, err := os.Stat(filepath.Join(dir, lockFile))
		if err != nil || fi.Mode().Perm() != tt.want {
			t.Errorf("mode %#o: .lock is %v, %v; want %#o", tt.mode, fi.Mode().Perm(), err, tt.want)
		}
		d.Close()
		os.Chmod(filepath.Join(dir, lockFile), 0o604)
		mustOpen(t, dir, Options{Mode: tt.mode}).Close()
		if fi, _ := os.Stat(filepath.Join(dir, lockFile)); fi.Mode().Perm() != 0o604 {
			t.Errorf("an existing .lock changed mode to %#o", fi.Mode().Perm())
		}
	}
}

// TestOpenCleansTemps: the temporary file a process killed in the middle of writing a
// new state file left behind (internal/atomicfile's name) is removed when the next Dir
// takes the lock, and nothing else is.
func TestOpenCleansTemps(t *testing.T) {
	dir := t.TempDir()
	left := []string{
		filepath.Join(dir, ".tpm2-00.permall.tmp-123456"),
		filepath.Join(dir, ".tpm2-00.savestate.tmp-7"),
		filepath.Join(dir, "."+stateIDFile+".tmp-42"),
	}
	others := []string{filepath.Join(dir, "notes.txt"), filepath.Join(dir, ".notes.txt.tmp-1")}
	for _, p := range append(slices.Clone(left), others...) {
		os.WriteFile(p, []byte("x"), 0o600)
	}
	for _, p := range left {
		if !atomicfile.IsTemp(filepath.Base(p)) {
			t.Fatalf("%s is not an atomicfile temporary name; fix the test", p)
		}
	}
	mustOpen(t, dir, Options{}).Close()
	for _, p := range left {
		if _, err := os.Stat(p); err == nil {
			t.Errorf("the leftover temporary file %s is still there", p)
		}
	}
	for _, p := range others {
		if _, err := os.Stat(p); err != nil {
			t.Errorf("another file was removed: %v", err)
		}
	}
}
