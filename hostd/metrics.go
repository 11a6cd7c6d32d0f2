package hostd

import (
	"github.com/prometheus/client_golang/prometheus"
)

type metrics struct {
	hookSeconds *prometheus.HistogramVec
	reachable   prometheus.Gauge
	revoked     prometheus.Gauge
	certExpiry  prometheus.Gauge
}

func newMetrics(reg *prometheus.Registry, d *Daemon) *metrics {
	m := &metrics{
		hookSeconds: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "nkp_hostd_hook_duration_seconds", Help: "Time hostd spent answering a libvirt hook call, by operation and result (allow, refuse).",
			Buckets: []float64{.0005, .001, .002, .005, .01, .02, .05, .1, .2, .5, 1, 2, 5, 10, 30},
		}, []string{"op", "result"}),
		reachable:  prometheus.NewGauge(prometheus.GaugeOpts{Name: "nkp_hostd_provider_reachable", Help: "1 when the last request reached the provider, 0 while hostd works offline from its KDK cache."}),
		revoked:    prometheus.NewGauge(prometheus.GaugeOpts{Name: "nkp_hostd_host_revoked", Help: "1 when the provider revoked this host (its KDK cache is deleted)."}),
		certExpiry: prometheus.NewGauge(prometheus.GaugeOpts{Name: "nkp_hostd_certificate_expiry_timestamp_seconds", Help: "When the host certificate expires (Unix time)."}),
	}
	m.reachable.Set(1)
	d.mu.Lock()
	m.certExpiry.Set(float64(d.id.cert.Leaf.NotAfter.Unix()))
	if d.id.info.Revoked != nil {
		m.revoked.Set(1)
	}
	d.mu.Unlock()
	reg.MustRegister(m.hookSeconds, m.reachable, m.revoked, m.certExpiry,
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "nkp_hostd_disk_secrets_defined", Help: "libvirt secrets of protected disks that nkp-hostd holds defined now."},
			func() float64 {
				if s := d.secrets.Load(); s != nil {
					return float64(s.Stats().Defined)
				}
				return 0
			}),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "nkp_hostd_disk_secret_reconcile_errors_total", Help: "Reconciles of disk secrets (all domains, one domain, a hook's request) that failed in part or whole."},
			func() float64 {
				if s := d.secrets.Load(); s != nil {
					return float64(s.Stats().ReconcileErrors)
				}
				return 0
			}),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "nkp_hostd_vtpms_running", Help: "nkp-swtpm processes running for VMs."},
			func() float64 { return float64(d.sup.Running()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "nkp_hostd_kdk_versions_cached", Help: "KDK versions this host holds (usable or not)."},
			func() float64 { return float64(len(d.cache.Versions())) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "nkp_hostd_kdk_cache_tpm_bound", Help: "1 when the KDK cache is kept as TPM import blobs (survives restarts), 0 when in memory only."},
			func() float64 {
				if d.cache.Persistent() {
					return 1
				}
				return 0
			}),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "nkp_hostd_provider_last_sync_timestamp_seconds", Help: "When KDKs were last fetched from the provider (Unix time, 0 never)."},
			func() float64 {
				d.mu.Lock()
				defer d.mu.Unlock()
				if d.lastOK.IsZero() {
					return 0
				}
				return float64(d.lastOK.Unix())
			}),
	)
	return m
}

func (m *metrics) setOnline(on bool) {
	if on {
		m.reachable.Set(1)
	} else {
		m.reachable.Set(0)
	}
}
