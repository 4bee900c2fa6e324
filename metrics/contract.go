package metrics

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/outboxd/outboxd/deliver"
	"github.com/outboxd/outboxd/plan"
)

// contractMetrics count the tracking plan's validation of events (README
// "Tracking plan"). Their series appear once a plan is stored: with none,
// nothing is validated.
type contractMetrics struct {
	events   *prometheus.CounterVec
	duration prometheus.Histogram
	settled  *prometheus.CounterVec
}

func newContractMetrics(f factory) contractMetrics {
	return contractMetrics{
		events: f.counterVec("contract_events_total",
			"Events validated against the tracking plan, by event_name and schema_version (\"other\" for a name or version the plan lacks) and result (valid, invalid).",
			"event_name", "schema_version", "result"),
		duration: f.histogram("contract_validation_seconds",
			"Time to validate one event against the tracking plan (JSON Schema and envelope rules).",
			[]float64{1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 1e-3, 1e-2}),
		settled: f.counterVec("contract_settled_total",
			"Invalid events a target settled without sending them, by its contract policy (skip, dead-letter); sink is the destination's name, or subscription for every webhook subscription.",
			"sink", "policy"),
	}
}

// ContractChecked counts one validated event (pipeline.ContractObserver).
func (m *Metrics) ContractChecked(v plan.Verdict, took time.Duration) {
	if m == nil {
		return
	}
	result := "invalid"
	if v.Valid {
		result = "valid"
	}
	m.contract.events.WithLabelValues(v.EventLabel, v.VersionLabel, result).Inc()
	m.contract.duration.Observe(took.Seconds())
}

// ContractSettled counts an invalid event a target settled without sending
// it (pipeline.ContractObserver).
func (m *Metrics) ContractSettled(target string, policy deliver.ContractPolicy) {
	if m == nil {
		return
	}
	m.contract.settled.WithLabelValues(SinkLabel(target), string(policy)).Inc()
}
