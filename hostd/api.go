package hostd

import (
	"encoding/json"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/nkp-dev/nkp/hostd/kdkcache"
	"github.com/nkp-dev/nkp/hostd/vm/vmapi"
	"github.com/nkp-dev/nkp/hostd/vtpm"
)

// Paths of the local API.
const (
	PathHealthz = "/healthz"
	PathReadyz  = "/readyz"
	PathMetrics = "/metrics"
	PathHost    = "/v1/host"
)

// HostStatus is GET /v1/host.
type HostStatus struct {
	HostID          string             `json:"host_id"`
	ProviderID      string             `json:"provider_id,omitempty"`
	ProviderURLs    []string           `json:"provider_urls"`
	ProviderOnline  bool               `json:"provider_reachable"`
	Since           time.Time          `json:"since,omitzero"` // of the reachable state
	LastSync        time.Time          `json:"last_sync,omitzero"`
	TPMBound        bool               `json:"tpm_bound"`
	Revoked         *time.Time         `json:"revoked,omitempty"`
	CertificateEnds time.Time          `json:"certificate_not_after"`
	KDKs            []kdkcache.Version `json:"kdks"`
	VTPMs           []vtpm.Instance    `json:"vtpms"`
	// DiskSecrets is how many protected disks' libvirt secrets hostd holds defined.
	DiskSecrets int `json:"disk_secrets"`
}

// Status is what GET /v1/host returns.
func (d *Daemon) Status() HostStatus {
	d.mu.Lock()
	s := HostStatus{
		HostID: d.id.info.HostID, ProviderID: d.id.info.ProviderID, ProviderURLs: d.id.info.ProviderURLs,
		ProviderOnline: d.online, Since: d.since, LastSync: d.lastOK, Revoked: d.id.info.Revoked,
		CertificateEnds: d.id.cert.Leaf.NotAfter,
	}
	d.mu.Unlock()
	s.TPMBound = d.cache.Persistent()
	s.KDKs = d.cache.Versions()
	s.VTPMs = d.sup.List()
	if m := d.secrets.Load(); m != nil {
		s.DiskSecrets = m.Stats().Defined
	}
	if s.VTPMs == nil {
		s.VTPMs = []vtpm.Instance{}
	}
	return s
}

func (d *Daemon) apiMux() *http.ServeMux {
	mux := http.NewServeMux()
	mux.HandleFunc("GET "+PathHealthz, func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-d.done:
			http.Error(w, "stopping", http.StatusServiceUnavailable)
		default:
			w.Write([]byte("ok\n"))
		}
	})
	mux.HandleFunc("GET "+PathReadyz, func(w http.ResponseWriter, r *http.Request) {
		if why := d.notReady(); why != "" {
			http.Error(w, why, http.StatusServiceUnavailable)
			return
		}
		w.Write([]byte("ok\n"))
	})
	mux.Handle("GET "+PathMetrics, promhttp.HandlerFor(d.cfg.Registry, promhttp.HandlerOpts{}))
	mux.Handle(vmapi.PathVMs, &d.vmAPI)
	mux.Handle(vmapi.PathVMs+"/", &d.vmAPI)
	mux.HandleFunc("GET "+PathHost, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(d.Status())
	})
	return mux
}

// notReady says why protected VMs cannot start now, "" when they can.
func (d *Daemon) notReady() string {
	d.mu.Lock()
	revoked := d.id.info.Revoked != nil
	d.mu.Unlock()
	if revoked {
		return "this host was revoked by the provider"
	}
	if _, ok := d.cache.Primary(); !ok {
		return "no KDK cached yet: the provider has not released one to this host"
	}
	return ""
}
