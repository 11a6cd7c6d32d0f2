package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/google/uuid"

	"github.com/nkp-dev/nkp/hostd/domxml"
	"github.com/nkp-dev/nkp/test/libvirtns"
)

// nkpHost is a provider (in the root network namespace, on the Host's uplink) and an
// nkp-hostd joined to it inside the Host, with nkp-swtpm as the host TPM.
type nkpHost struct {
	h          *libvirtns.Host
	bin        string // where nkpctl and the other programs are
	dir        string
	diskDir    string // the disk images, where QEMU's user may reach them
	procs      []*exec.Cmd
	hostd      *exec.Cmd
	providerID string
	kdkID      string
	kdkVersion int
}

func (n *nkpHost) close() {
	for i := len(n.procs) - 1; i >= 0; i-- {
		n.procs[i].Process.Kill()
		n.procs[i].Wait()
	}
	if n.diskDir != "" {
		os.RemoveAll(n.diskDir)
	}
}

// diskXML is a tiny domain with count plain 8 MiB qcow2 disks (vda, vdb, ...), made now.
func (n *nkpHost) diskXML(ctx context.Context, name, id string, count int) ([]byte, error) {
	if n.diskDir == "" {
		d, err := os.MkdirTemp("", "hookbench-disks-")
		if err != nil {
			return nil, err
		}
		n.diskDir = d
		if err := os.Chmod(d, 0o711); err != nil {
			return nil, err
		}
	}
	var disks strings.Builder
	for i := range count {
		f := filepath.Join(n.diskDir, fmt.Sprintf("%s-%d.qcow2", name, i))
		if out, err := exec.CommandContext(ctx, "qemu-img", "create", "-q", "-f", "qcow2", f, "8M").CombinedOutput(); err != nil {
			return nil, fmt.Errorf("qemu-img create %s: %w: %s", f, err, out)
		}
		fmt.Fprintf(&disks, "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='%s'/><target dev='vd%c' bus='virtio'/></disk>", f, 'a'+i)
	}
	return []byte(strings.Replace(tinyXML(name, id), "<devices>", "<devices>"+disks.String(), 1)), nil
}

// protect runs `nkpctl vm protect NAME` (vTPM and every disk) against the Host's hostd.
func (n *nkpHost) protect(ctx context.Context, name string) error {
	out, err := exec.CommandContext(ctx, filepath.Join(n.bin, "nkpctl"), "vm", "--socket", n.h.Path("/run/nkp/hostd.sock"), "protect", name).CombinedOutput()
	if err != nil {
		return fmt.Errorf("nkpctl vm protect %s: %w: %s", name, err, out)
	}
	return nil
}

// waitSecrets waits until the Host's libvirtd lists at least count secrets (nkp-hostd
// defines them after protect and on the DEFINED events).
func (n *nkpHost) waitSecrets(ctx context.Context, count int) error {
	deadline := time.Now().Add(5 * time.Minute)
	for {
		out, err := n.h.Virsh(ctx, "secret-list")
		got := 0
		if err == nil {
			for _, line := range strings.Split(out, "\n") {
				if f := strings.Fields(line); len(f) > 0 && uuid.Validate(f[0]) == nil {
					got++ // only nkp defines secrets in this private libvirtd
				}
			}
		}
		if got >= count {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("libvirtd holds %d nkp secrets after 5 minutes, want %d: %v", got, count, err)
		}
		time.Sleep(500 * time.Millisecond)
	}
}

func startNKP(ctx context.Context, h *libvirtns.Host, bin string, hostdEnv []string) (*nkpHost, error) {
	n := &nkpHost{h: h, bin: bin, dir: filepath.Join(h.Dir, "nkp")}
	ok := false
	defer func() {
		if !ok {
			n.close()
		}
	}()
	if err := os.MkdirAll(n.dir, 0o711); err != nil {
		return nil, err
	}
	if err := libvirtns.Uplink(ctx, h, 99); err != nil {
		return nil, err
	}
	pdir := filepath.Join(n.dir, "provider")
	if out, err := exec.CommandContext(ctx, filepath.Join(bin, "nkp-provider"), "init", "--dir", pdir).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("nkp-provider init: %w: %s", err, out)
	}
	prov := exec.Command(filepath.Join(bin, "nkp-provider"), "serve", "--dir", pdir, "--listen", h.Gateway+":0", "--san", h.Gateway, "--log-format", "json")
	prov.Env = append(os.Environ(), "NOTIFY_SOCKET=")
	stderr, _ := prov.StderrPipe()
	if err := prov.Start(); err != nil {
		return nil, err
	}
	n.procs = append(n.procs, prov)
	addr := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			var rec struct{ Msg, Addr string }
			if json.Unmarshal(sc.Bytes(), &rec) == nil && rec.Msg == "provider serving" {
				addr <- rec.Addr
			}
		}
	}()
	var url string
	select {
	case a := <-addr:
		url = "https://" + a
	case <-time.After(60 * time.Second):
		return nil, fmt.Errorf("nkp-provider did not serve within 60 s")
	}
	ctl := func(args ...string) ([]byte, error) {
		cmd := exec.CommandContext(ctx, filepath.Join(bin, "nkpctl"), append(append([]string{"provider", "--dir", pdir}, args...), "--provider", url)...)
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		out, err := cmd.Output()
		if err != nil {
			return nil, fmt.Errorf("nkpctl provider %v: %w: %s", args, err, bytes.TrimSpace(stderr.Bytes()))
		}
		return out, nil
	}
	pass := filepath.Join(n.dir, "pass")
	os.WriteFile(pass, []byte("hookbench backup passphrase "+uuid.NewString()), 0o600)
	var berr error
	for range 3 { // the backup's scrypt can outlast nkpctl's timeout on a loaded machine
		if _, berr = ctl("backup", "--passphrase-file", pass, "--out", filepath.Join(n.dir, "backup.age")); berr == nil {
			break
		}
	}
	if berr != nil {
		return nil, berr
	}
	out, err := ctl("token", "create", "--ttl", "10m", "--json")
	if err != nil {
		return nil, err
	}
	var tok struct {
		Secret string `json:"secret"`
		CAHash string `json:"ca_hash"`
	}
	if err := json.Unmarshal(out, &tok); err != nil {
		return nil, err
	}
	tokFile := filepath.Join(n.dir, "token")
	os.WriteFile(tokFile, []byte(tok.Secret), 0o600)
	os.Mkdir(filepath.Join(n.dir, "tpm"), 0o700)
	tpm := exec.Command(filepath.Join(bin, "nkp-swtpm"), "socket", "--tpm2",
		"--server", "type=unixio,path="+filepath.Join(n.dir, "tpm.sock"), "--ctrl", "type=unixio,path="+filepath.Join(n.dir, "tpm.ctrl"),
		"--tpmstate", "dir="+filepath.Join(n.dir, "tpm"), "--flags", "not-need-init,startup-clear")
	if err := tpm.Start(); err != nil {
		return nil, err
	}
	n.procs = append(n.procs, tpm)
	for i := 0; i < 300; i++ {
		if _, err := os.Stat(filepath.Join(n.dir, "tpm.sock")); err == nil {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	spec := "swtpm:path=" + filepath.Join(n.dir, "tpm.sock") + ",ctrl=" + filepath.Join(n.dir, "tpm.ctrl")
	hostd := filepath.Join(bin, "nkp-hostd")
	if out, err := h.Command(ctx, hostd, "join", "--provider", url, "--ca-hash", tok.CAHash, "--token-file", tokFile, "--tpm", spec, "--hostname", "hookbench").CombinedOutput(); err != nil {
		return nil, fmt.Errorf("nkp-hostd join: %w: %s", err, out)
	}
	n.hostd = h.Command(context.Background(), hostd, "serve", "--tpm", spec, "--swtpm", filepath.Join(bin, "nkp-swtpm"), "--log-level", "warn")
	n.hostd.Env = append(append(os.Environ(), "NOTIFY_SOCKET="), hostdEnv...)
	n.hostd.Stderr = os.Stderr
	if err := n.hostd.Start(); err != nil {
		return nil, err
	}
	n.procs = append(n.procs, n.hostd)
	var st struct {
		ProviderID string `json:"provider_id"`
		KDKs       []struct {
			ID      string `json:"id"`
			Version int    `json:"version"`
			Primary bool   `json:"primary"`
		} `json:"kdks"`
	}
	deadline := time.Now().Add(90 * time.Second)
	for n.kdkID == "" {
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("nkp-hostd has no primary KDK after 90 s")
		}
		time.Sleep(200 * time.Millisecond)
		b, err := n.get("/v1/host")
		if err != nil || json.Unmarshal(b, &st) != nil {
			continue
		}
		for _, k := range st.KDKs {
			if k.Primary {
				n.providerID, n.kdkID, n.kdkVersion = st.ProviderID, k.ID, k.Version
			}
		}
	}
	ok = true
	return n, nil
}

func (n *nkpHost) get(path string) ([]byte, error) {
	sock := n.h.Path("/run/nkp/hostd.sock")
	hc := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", sock)
		}}}
	resp, err := hc.Get("http://hostd" + path)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		return nil, fmt.Errorf("GET %s: %s", path, resp.Status)
	}
	return io.ReadAll(resp.Body)
}

// protectedXML is a tiny domain with nkp's metadata (a new vTPM key under the primary
// KDK) and its external vTPM.
func (n *nkpHost) protectedXML(name, id string) ([]byte, error) {
	doc := []byte(tinyXML(name, id))
	doc, err := domxml.SetMetadata(doc, &domxml.Metadata{ProviderID: n.providerID, Objects: []domxml.Object{
		{Name: domxml.ObjectVTPM, KeyID: uuid.NewString(), KDKID: n.kdkID, KDKVersion: n.kdkVersion}}})
	if err != nil {
		return nil, err
	}
	tpm := domxml.External("tpm-tis", domxml.SocketPath("/run/nkp/vtpm", id))
	return domxml.SetTPM(doc, &tpm)
}

// memory is a process's RSS and PSS in KiB (/proc/PID/smaps_rollup).
func memory(pid int) (rss, pss int, err error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/smaps_rollup", pid))
	if err != nil {
		return 0, 0, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) < 2 {
			continue
		}
		v, _ := strconv.Atoi(f[1])
		switch f[0] {
		case "Rss:":
			rss = v
		case "Pss:":
			pss = v
		}
	}
	return rss, pss, nil
}

// vtpmMemory prepares count vTPMs through the hook path (nkp-hook prepare and start with
// the XML of a protected domain, as libvirtd runs them; no QEMU connects) and reports hostd's memory
// before and after, and the vTPM processes' total PSS.
func vtpmMemory(ctx context.Context, n *nkpHost, count int) (string, error) {
	pid := n.hostd.Process.Pid
	rss0, pss0, err := memory(pid)
	if err != nil {
		return "", err
	}
	for i := range count {
		id := uuid.NewString()
		doc, err := n.protectedXML(fmt.Sprintf("hookbench-mem-%03d", i), id)
		if err != nil {
			return "", err
		}
		for _, op := range []string{"prepare", "start"} { // prepare launches, start waits until it serves
			cmd := n.h.Command(ctx, "/etc/libvirt/hooks/nkp-hook", fmt.Sprintf("hookbench-mem-%03d", i), op, "begin", "-")
			cmd.Stdin = bytes.NewReader(doc)
			if out, err := cmd.CombinedOutput(); err != nil {
				return "", fmt.Errorf("%s vTPM %d: %w: %s", op, i, err, out)
			}
		}
	}
	time.Sleep(2 * time.Second) // let the vTPMs settle; memory is a level, not an event
	rss1, pss1, err := memory(pid)
	if err != nil {
		return "", err
	}
	pids, _ := n.h.Pids()
	var swtpms, swPSS int
	for _, p := range pids {
		exe, _ := os.Readlink(fmt.Sprintf("/proc/%d/exe", p))
		if filepath.Base(exe) == "nkp-swtpm" && p != n.procs[1].Process.Pid {
			if _, pss, err := memory(p); err == nil {
				swtpms++
				swPSS += pss
			}
		}
	}
	var b strings.Builder
	fmt.Fprintf(&b, "\n| nkp-hostd | vTPMs | RSS KiB | PSS KiB |\n|---|---:|---:|---:|\n")
	fmt.Fprintf(&b, "| before | 0 | %d | %d |\n| after the hook path prepared them | %d | %d | %d |\n", rss0, pss0, count, rss1, pss1)
	fmt.Fprintf(&b, "| growth per vTPM | | %.1f | %.1f |\n", float64(rss1-rss0)/float64(count), float64(pss1-pss0)/float64(count))
	fmt.Fprintf(&b, "\nnkp-swtpm processes found: %d, total PSS %d KiB (%.0f KiB each)\n", swtpms, swPSS, float64(swPSS)/float64(max(swtpms, 1)))
	return b.String(), nil
}

// hist is a cumulative histogram: bucket upper bound (seconds) → count, as Prometheus
// exposes it.
type hist map[float64]float64

// hookHist reads nkp-hostd's nkp_hostd_hook_duration_seconds buckets for op (all results).
func (n *nkpHost) hookHist(op string) (hist, error) {
	b, err := n.get("/metrics")
	if err != nil {
		return nil, fmt.Errorf("nkp-hostd's metrics: %w", err)
	}
	out := hist{}
	prefix := `nkp_hostd_hook_duration_seconds_bucket{`
	for _, line := range strings.Split(string(b), "\n") {
		if !strings.HasPrefix(line, prefix) || !strings.Contains(line, `op="`+op+`"`) {
			continue
		}
		_, le, ok := strings.Cut(line, `le="`)
		le, rest, ok2 := strings.Cut(le, `"}`)
		if !ok || !ok2 {
			continue
		}
		bound, err1 := strconv.ParseFloat(le, 64)
		count, err2 := strconv.ParseFloat(strings.TrimSpace(rest), 64)
		if err1 != nil || err2 != nil {
			return nil, fmt.Errorf("nkp-hostd's metrics: bad line %q", line)
		}
		out[bound] += count
	}
	return out, nil
}

// sub returns h − old, bucket by bucket.
func (h hist) sub(old hist) hist {
	out := hist{}
	for b, c := range h {
		out[b] = c - old[b]
	}
	return out
}

// add adds o to h, bucket by bucket.
func (h hist) add(o hist) {
	for b, c := range o {
		h[b] += c
	}
}

// quantile returns the upper bound of the bucket that holds quantile q, and the count;
// 0 if empty.
func (h hist) quantile(q float64) (bound, total float64) {
	bounds := make([]float64, 0, len(h))
	for b := range h {
		bounds = append(bounds, b)
	}
	slices.Sort(bounds)
	if len(bounds) == 0 {
		return 0, 0
	}
	total = h[bounds[len(bounds)-1]] // +Inf
	for _, b := range bounds {
		if h[b] >= q*total {
			return b, total
		}
	}
	return bounds[len(bounds)-1], total
}

// checkTPMs asks nkp-hostd for the status of each running domain (GET /v1/vms/NAME) and
// fails unless every one's TPM is "ok": libvirt's query-tpm finds QEMU's TPM and the
// vTPM answers GET_TPMESTABLISHED with success, which it does only once QEMU has
// connected and initialised it. So a round whose vTPMs never started, or that QEMU
// never reached, is an error, not a fast sample.
func (n *nkpHost) checkTPMs(ctx context.Context, names []string) error {
	var bad []string
	for _, name := range names {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		b, err := n.get("/v1/vms/" + name)
		var st struct {
			TPM string `json:"tpm"`
		}
		if err == nil {
			err = json.Unmarshal(b, &st)
		}
		switch {
		case err != nil:
			bad = append(bad, fmt.Sprintf("%s: nkp-hostd's status: %v", name, err))
		case st.TPM != "ok":
			bad = append(bad, fmt.Sprintf("%s: TPM %q", name, st.TPM))
		}
	}
	if len(bad) > 0 {
		return fmt.Errorf("%d of %d protected domains' vTPMs do not answer after the start (%s): the bench would time a broken path; nkp-hostd's log and /var/lib/nkp/vtpm/*.log inside the Host say why", len(bad), len(names), strings.Join(bad[:min(len(bad), 3)], "; "))
	}
	return nil
}

// vtpmCPU sums the CPU run time of every live nkp-swtpm in the Host (the vTPMs of the
// round's running domains; the host TPM runs outside the Host), and counts them.
func (n *nkpHost) vtpmCPU() (time.Duration, int) {
	pids, _ := n.h.Pids()
	var sum time.Duration
	count := 0
	for _, p := range pids {
		exe, _ := os.Readlink(fmt.Sprintf("/proc/%d/exe", p))
		if filepath.Base(exe) != "nkp-swtpm" || p == n.procs[1].Process.Pid {
			continue
		}
		if d, err := processCPU(p); err == nil {
			sum += d
			count++
		}
	}
	return sum, count
}
