package cli

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"

	"golang.org/x/term"
)

// passphraseSource says where a passphrase comes from; never argv.
type passphraseSource struct {
	file  string // --passphrase-file
	stdin bool   // --passphrase-stdin
}

// read returns the passphrase: the first line of the file or of stdin, or what the user
// types at the terminal (twice when confirm is set). The caller wipes it.
func (s passphraseSource) read(stdin io.Reader, stderr io.Writer, confirm bool) ([]byte, error) {
	switch {
	case s.file != "" && s.stdin:
		return nil, errors.New("--passphrase-file and --passphrase-stdin: choose one")
	case s.file != "":
		data, err := readPrivateFile(s.file)
		if err != nil {
			return nil, err
		}
		defer clear(data)
		return firstLine(data, "--passphrase-file "+s.file)
	case s.stdin:
		r := bufio.NewReader(io.LimitReader(stdin, 64<<10))
		data, err := r.ReadBytes('\n')
		if err != nil && err != io.EOF {
			return nil, fmt.Errorf("--passphrase-stdin: %w", err)
		}
		defer clear(data)
		return firstLine(data, "standard input")
	}
	f, ok := stdin.(*os.File)
	if !ok || !term.IsTerminal(int(f.Fd())) {
		return nil, errors.New("no passphrase: pass --passphrase-file FILE or --passphrase-stdin, or run on a terminal to be prompted")
	}
	fmt.Fprint(stderr, "Backup passphrase: ")
	p, err := term.ReadPassword(int(f.Fd()))
	fmt.Fprintln(stderr)
	if err != nil {
		return nil, fmt.Errorf("reading the passphrase from the terminal: %w", err)
	}
	if len(p) == 0 {
		return nil, errors.New("empty passphrase")
	}
	if confirm {
		fmt.Fprint(stderr, "Again: ")
		q, err := term.ReadPassword(int(f.Fd()))
		fmt.Fprintln(stderr)
		defer clear(q)
		if err != nil {
			clear(p)
			return nil, fmt.Errorf("reading the passphrase from the terminal: %w", err)
		}
		if !bytes.Equal(p, q) {
			clear(p)
			return nil, errors.New("the two passphrases differ")
		}
	}
	return p, nil
}

// readPrivateFile reads a passphrase file. A regular file must be closed to group and
// others (the passphrase opens every KDK and the CA key); pipes such as
// --passphrase-file <(pass show nkp) are read as they are.
func readPrivateFile(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("--passphrase-file: %w", err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("--passphrase-file %s: %w", path, err)
	}
	if perm := st.Mode().Perm(); st.Mode().IsRegular() && perm&0o077 != 0 {
		return nil, fmt.Errorf("--passphrase-file %s: mode %04o lets group or others read or change the backup passphrase; run chmod 600 %s (and choose a new passphrase if others could read it)", path, perm, path)
	}
	data, err := io.ReadAll(io.LimitReader(f, 64<<10))
	if err != nil {
		return nil, fmt.Errorf("--passphrase-file %s: %w", path, err)
	}
	return data, nil
}

func firstLine(data []byte, from string) ([]byte, error) {
	line, _, _ := bytes.Cut(data, []byte("\n"))
	line = bytes.TrimSuffix(line, []byte("\r"))
	if len(line) == 0 {
		return nil, fmt.Errorf("empty passphrase in %s", from)
	}
	return bytes.Clone(line), nil
}
