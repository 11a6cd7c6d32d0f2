package api

import (
	"fmt"

	"github.com/prometheus/client_golang/prometheus"
)

type metrics struct {
	requests *prometheus.CounterVec
	duration *prometheus.HistogramVec
	releases *prometheus.CounterVec
	enrolls  *prometheus.CounterVec
	refusals *prometheus.CounterVec
}

func newMetrics(reg prometheus.Registerer) (metrics, error) {
	m := metrics{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "nkp_provider_http_requests_total",
			Help: "HTTP requests by route and status code.",
		}, []string{"route", "code"}),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "nkp_provider_http_request_duration_seconds",
			Help:    "HTTP request latency by route.",
			Buckets: []float64{.0005, .001, .002, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5},
		}, []string{"route"}),
		releases: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "nkp_provider_kdk_releases_total",
			Help: "KDK versions released to hosts, by form (import_blob or bare).",
		}, []string{"form"}),
		enrolls: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "nkp_provider_enrollments_total",
			Help: "Enrollment attempts by result (ok or the refusal code).",
		}, []string{"result"}),
		refusals: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "nkp_provider_refusals_total",
			Help: "Refused requests by error code.",
		}, []string{"code"}),
	}
	for _, c := range []prometheus.Collector{m.requests, m.duration, m.releases, m.enrolls, m.refusals} {
		if err := reg.Register(c); err != nil {
			return metrics{}, fmt.Errorf("api: registering metrics: %w (one Server per registry)", err)
		}
	}
	return m, nil
}
