package metrics

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/outboxd/outboxd/deliver"
)

// Guards exports the circuit breaker of each of the process's own
// destinations: outboxd_breaker_state{target} (0 closed, 1 half-open, 2
// open; always 0 without a breaker) and outboxd_breaker_openings_total{target}.
// Both are read from the guards at scrape time: the guards outlive the
// pipeline's runs, and a scrape sees the state an operator would act on.
func (m *Metrics) Guards(guards []*deliver.Guard) {
	if m == nil {
		return
	}
	for _, g := range guards {
		labels := prometheus.Labels{"target": g.Target()}
		m.reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Namespace: Namespace, Name: "breaker_state",
			Help:        "Circuit breaker of the destination: 0 closed (calls flow), 1 half-open (a probe may go), 2 open (calls refused, events parked).",
			ConstLabels: labels,
		}, func() float64 { return float64(g.State()) }))
		m.reg.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts{
			Namespace: Namespace, Name: "breaker_openings_total",
			Help:        "Times the destination's circuit breaker opened (a failed half-open probe opens it again and counts).",
			ConstLabels: labels,
		}, func() float64 { return float64(g.Openings()) }))
	}
}
