// Package metrics exposes what outboxd does to operators: Prometheus metrics
// on /metrics and the health endpoints /healthz, /readyz and
// /health/replication (README.md, "Operating outboxd").
//
// Metrics implements pipeline.Observer: the pipeline tells it what happens
// (events received, sink calls and their outcomes, checkpoint flushes, the
// streaming state and positions); Monitor polls the replication slot and the
// outbox backlog from the database on its own small pool.
//
// Invariants:
//   - Every metric is in a private registry (plus the Go and process
//     collectors), never the global one, and is prefixed outboxd_, in base
//     units (seconds, bytes), with _total on counters.
//   - Labels carry no tenant data and no secret: sink is the sink's name, or
//     "subscription" for every webhook subscription together; reason and
//     status_class are small fixed sets.
//   - Nothing here blocks the pipeline: observer methods only update
//     in-memory metrics.
//   - When metrics are off (OUTBOXD_HTTP_ADDR empty) nothing of this package
//     runs: no registry, no pool, no goroutine.
package metrics

import (
	"context"
	"errors"
	"runtime/debug"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/outboxd/outboxd/decode"
	"github.com/outboxd/outboxd/deliver"
	"github.com/outboxd/outboxd/sink"
	"github.com/outboxd/outboxd/store"
)

// Namespace prefixes every metric name.
const Namespace = "outboxd"

// Failure reasons, the values of the reason label of
// outboxd_events_failed_total.
const (
	// ReasonPermanent: the sink refused the event for good (a 4xx other than
	// 408, 410, 425 and 429, a redirect, a refused address); it is
	// dead-lettered.
	ReasonPermanent = "permanent"
	// ReasonGone: the endpoint answered 410 Gone.
	ReasonGone = "gone"
	// ReasonExhausted: the in-memory retries of one sink call ran out; the
	// delivery is retried later.
	ReasonExhausted = "exhausted"
)

// Status classes, the values of the status_class label of
// outboxd_delivery_attempts_total.
const (
	Class2xx       = "2xx"
	Class3xx       = "3xx"
	Class4xx       = "4xx"
	Class5xx       = "5xx"
	ClassTransport = "transport"
	// ClassRetried counts the attempts before the last one of a sink call
	// when the sink reports only the last status (sink.Outcome): they were
	// retried, so each was a 408, 425, 429, 5xx or transport error.
	ClassRetried = "retried"
)

// Metrics holds outboxd's metrics. Its methods are safe for concurrent use,
// and a nil *Metrics does nothing.
type Metrics struct {
	reg *prometheus.Registry

	received         prometheus.Counter
	delivered        *prometheus.CounterVec
	failed           *prometheus.CounterVec
	attempts         *prometheus.CounterVec
	deliveryDuration *prometheus.HistogramVec
	latency          *prometheus.HistogramVec
	lastDelivered    prometheus.Gauge
	flushes          prometheus.Histogram
	checkpointLSN    prometheus.Gauge
	receivedLSN      prometheus.Gauge
	receivedVal      atomic.Uint64 // the value of receivedLSN
	leader           prometheus.Gauge

	slotExists    prometheus.Gauge
	slotActive    prometheus.Gauge
	lagBytes      prometheus.Gauge
	retainedBytes prometheus.Gauge
	safeWALBytes  prometheus.Gauge
	backlogRows   prometheus.Gauge
	// parkedByTarget and deadByTarget are polled with the backlog, per sink
	// label (each destination of OUTBOXD_SINKS has its own).
	parkedByTarget *prometheus.GaugeVec
	deadByTarget   *prometheus.GaugeVec
	// lagByTarget is the age of each target's oldest parked event.
	lagByTarget *prometheus.GaugeVec
	backlogOnce sync.Once
	pollErrors  *prometheus.CounterVec

	streaming atomic.Bool
	// changed is signalled when this instance starts or stops streaming,
	// so the monitor reads the slot again at once (a first start creates it).
	changed chan struct{}
	// exactAttempts is set when attempts are reported one by one (Attempt),
	// so that Delivered does not count them again from the outcome.
	exactAttempts atomic.Bool

	contract contractMetrics
	// filterErrors counts property filters that could not be evaluated.
	filterErrors *prometheus.CounterVec
}

// Options configures New.
type Options struct {
	// Version is outboxd's version, for outboxd_build_info.
	Version string
}

// New returns the metrics in a new private registry, with the Go runtime and
// process collectors.
func New(opts Options) *Metrics {
	reg := prometheus.NewRegistry()
	f := factory{reg}
	m := &Metrics{reg: reg, changed: make(chan struct{}, 1)}
	m.received = f.counter("events_received_total", "Outbox events received from the replication stream or the catch-up.")
	m.delivered = f.counterVec("events_delivered_total", "Events a sink acknowledged (a 2xx for webhooks).", "sink")
	m.failed = f.counterVec("events_failed_total",
		"Events a sink call did not deliver, by reason: permanent (dead-lettered), gone (410), exhausted (in-memory retries ran out; retried later).",
		"sink", "reason")
	m.attempts = f.counterVec("delivery_attempts_total",
		"Delivery attempts (HTTP requests for webhooks) by status class: 2xx, 3xx, 4xx, 5xx, transport (no answer), retried (an earlier attempt of a call, when only the last status is known).",
		"sink", "status_class")
	m.deliveryDuration = f.histogramVec("delivery_duration_seconds",
		"Duration of one sink call, retries included.",
		[]float64{.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 300}, "sink")
	m.latency = f.histogramVec("end_to_end_latency_seconds",
		"Time from an event's occurred_at to its acknowledgement by the sink.",
		[]float64{.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 21600, 86400}, "sink")
	m.lastDelivered = f.gauge("last_delivered_event_timestamp_seconds", "Unix time at which a sink last acknowledged an event.")
	m.flushes = f.histogram("checkpoint_flush_duration_seconds",
		"Duration of one checkpoint flush (marking rows processed and storing the LSN, one transaction).",
		[]float64{.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5})
	m.checkpointLSN = f.gauge("checkpoint_lsn",
		"Durable position confirmed to the slot, as the LSN's 64-bit number (every transaction before it is settled and recorded).")
	m.receivedLSN = f.gauge("received_lsn", "Highest WAL position received from the replication stream, as the LSN's 64-bit number.")
	m.leader = f.gauge("leader", "1 on the instance streaming from the slot, 0 on a standby waiting for it.")

	m.slotExists = f.gauge("slot_exists", "1 when the replication slot exists (polled from pg_replication_slots).")
	m.slotActive = f.gauge("slot_active", "1 when some process streams from the replication slot (polled).")
	m.lagBytes = f.gauge("replication_lag_bytes", "pg_current_wal_lsn() minus the slot's confirmed_flush_lsn (polled).")
	m.retainedBytes = f.gauge("retained_wal_bytes", "pg_current_wal_lsn() minus the slot's restart_lsn: WAL the slot keeps from being removed (polled).")
	m.safeWALBytes = f.gauge("slot_safe_wal_bytes",
		"safe_wal_size of the slot: WAL that can still be written before the slot is invalidated by max_slot_wal_keep_size; +Inf when unlimited (polled).")
	// Registered on the first count: no series at all when counting is off.
	m.backlogRows = prometheus.NewGauge(prometheus.GaugeOpts{Namespace: Namespace, Name: "backlog_rows",
		Help: "Unprocessed outbox rows, dead-lettered ones excepted (polled, every 30s by default; a sequential scan of the table)."})
	m.pollErrors = f.counterVec("poll_errors_total", "Failed polls of the slot or the backlog.", "query")
	// Registered on the first count too.
	m.parkedByTarget = prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: Namespace, Name: "parked_deliveries",
		Help: "Parked deliveries waiting for a durable retry, per target (polled with the backlog)."}, []string{"sink"})
	m.deadByTarget = prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: Namespace, Name: "dead_letters",
		Help: "Dead letters, per target (polled with the backlog)."}, []string{"sink"})
	m.lagByTarget = prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: Namespace, Name: "parked_lag_seconds",
		Help: "Age of the oldest parked event, per target (the oldest among all subscriptions for sink=\"subscription\"); 0 when nothing is parked (polled with the backlog)."}, []string{"sink"})

	m.contract = newContractMetrics(f)
	m.filterErrors = f.counterVec("filter_errors_total",
		"Events a target's property filter could not be evaluated on (a missing property compared, a property of another type); they do not go to that target.",
		"sink")
	bi := f.gaugeVec("build_info", "Always 1; the labels give outboxd's version and the Go version it was built with.", "version", "goversion")
	goVersion := "unknown"
	if info, ok := debug.ReadBuildInfo(); ok {
		goVersion = info.GoVersion
	}
	bi.WithLabelValues(opts.Version, goVersion).Set(1)

	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// Registry returns the registry holding the metrics.
func (m *Metrics) Registry() *prometheus.Registry { return m.reg }

// SinkDuplicates exports count, the deliveries sink's destination
// acknowledged as copies it already had (NATS JetStream's duplicate window),
// as outboxd_sink_duplicates_acknowledged_total{sink}.
func (m *Metrics) SinkDuplicates(sink string, count func() uint64) {
	m.reg.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts{
		Namespace: Namespace, Name: "sink_duplicates_acknowledged_total",
		Help:        "Deliveries the destination acknowledged as copies of messages it already had (NATS: PubAck.Duplicate within the stream's duplicate window).",
		ConstLabels: prometheus.Labels{"sink": sink},
	}, func() float64 { return float64(count()) }))
}

// Received counts an outbox event taken from the stream or the catch-up;
// changes of other published tables (subscriptions) are not events.
func (m *Metrics) Received(e *decode.Event) {
	if m == nil || e == nil || e.Change != nil {
		return
	}
	m.received.Inc()
}

// Delivered records one sink call: its duration, its attempts and the fate of
// its events. A call abandoned because outboxd is stopping counts nothing but
// its duration and attempts.
func (m *Metrics) Delivered(r deliver.Result) {
	if m == nil {
		return
	}
	name := SinkLabel(r.Sink)
	o := r.Outcome
	m.deliveryDuration.WithLabelValues(name).Observe(r.Took.Seconds())
	if !m.exactAttempts.Load() && o.Attempts > 0 {
		m.attempts.WithLabelValues(name, lastClass(o)).Inc()
		if o.Attempts > 1 {
			m.attempts.WithLabelValues(name, ClassRetried).Add(float64(o.Attempts - 1))
		}
	}
	n := float64(len(r.Events))
	switch {
	case o.Err == nil:
		now := time.Now()
		m.delivered.WithLabelValues(name).Add(n)
		m.lastDelivered.Set(float64(now.UnixNano()) / 1e9)
		h := m.latency.WithLabelValues(name)
		for _, e := range r.Events {
			if e != nil && !e.OccurredAt.IsZero() {
				h.Observe(max(now.Sub(e.OccurredAt).Seconds(), 0))
			}
		}
	case errors.Is(o.Err, context.Canceled), errors.Is(o.Err, context.DeadlineExceeded):
		// Stopping: the events are delivered again after the restart.
	case errors.Is(o.Err, sink.ErrGone):
		m.failed.WithLabelValues(name, ReasonGone).Add(n)
	case errors.Is(o.Err, sink.ErrPermanent):
		m.failed.WithLabelValues(name, ReasonPermanent).Add(n)
	default:
		m.failed.WithLabelValues(name, ReasonExhausted).Add(n)
	}
}

// Attempt counts one delivery attempt exactly (status 0: no answer). Once it has been called, Delivered no longer derives attempts from
// the outcome of the call. It is meant for a sink hook that sees every
// attempt.
func (m *Metrics) Attempt(sinkName string, status int) {
	if m == nil {
		return
	}
	m.exactAttempts.Store(true)
	m.attempts.WithLabelValues(SinkLabel(sinkName), statusClass(status)).Inc()
}

// Flushed records a checkpoint flush.
func (m *Metrics) Flushed(b store.Batch, took time.Duration) {
	if m == nil {
		return
	}
	m.flushes.Observe(took.Seconds())
	if b.LSN != 0 {
		m.checkpointLSN.Set(lsnFloat(b.LSN))
		// Nothing is checkpointed before it was received, but the received
		// gauge is set at the next standby status: an idle advance written
		// now would show the checkpoint ahead of it until then.
		m.raiseReceived(b.LSN)
	}
}

// raiseReceived sets the received gauge to lsn unless it is already higher.
func (m *Metrics) raiseReceived(lsn pglogrepl.LSN) {
	for {
		cur := m.receivedVal.Load()
		if uint64(lsn) <= cur {
			return
		}
		if m.receivedVal.CompareAndSwap(cur, uint64(lsn)) {
			m.receivedLSN.Set(lsnFloat(lsn))
			return
		}
	}
}

// Streaming records whether this instance streams from the slot (the leader)
// or waits for it (a standby).
func (m *Metrics) Streaming(active bool) {
	if m == nil {
		return
	}
	m.streaming.Store(active)
	select {
	case m.changed <- struct{}{}:
	default:
	}
	if active {
		m.leader.Set(1)
	} else {
		m.leader.Set(0)
	}
}

// Leader reports whether this instance is streaming from the slot.
func (m *Metrics) Leader() bool { return m != nil && m.streaming.Load() }

// Position records the highest WAL position received and the durable
// position confirmed to the slot.
func (m *Metrics) Position(received, flushed pglogrepl.LSN) {
	if m == nil {
		return
	}
	if received != 0 {
		// The reader's own figure: authoritative.
		m.receivedVal.Store(uint64(received))
		m.receivedLSN.Set(lsnFloat(received))
	}
	if flushed != 0 {
		m.checkpointLSN.Set(lsnFloat(flushed))
	}
}

func (m *Metrics) setBacklog(n int64) {
	m.register()
	m.backlogRows.Set(float64(n))
}

// register registers the polled backlog series, once.
func (m *Metrics) register() {
	m.backlogOnce.Do(func() { m.reg.MustRegister(m.backlogRows, m.parkedByTarget, m.deadByTarget, m.lagByTarget) })
}

// setTargets sets the parked, dead-letter and lag gauges from a poll: a
// target with none has no series (its earlier ones are dropped). The
// subscriptions share one series: counts add up, the lag is the largest.
func (m *Metrics) setTargets(counts []store.TargetCount) {
	m.register()
	parked, dead, lag := map[string]int64{}, map[string]int64{}, map[string]float64{}
	for _, c := range counts {
		label := SinkLabel(c.Target)
		parked[label] += c.Parked
		dead[label] += c.DeadLetters
		lag[label] = max(lag[label], c.LagSeconds)
	}
	m.parkedByTarget.Reset()
	m.deadByTarget.Reset()
	m.lagByTarget.Reset()
	for label, n := range parked {
		m.parkedByTarget.WithLabelValues(label).Set(float64(n))
		m.deadByTarget.WithLabelValues(label).Set(float64(dead[label]))
		m.lagByTarget.WithLabelValues(label).Set(lag[label])
	}
}

// FilterError counts an event target's property filter could not be
// evaluated on (pipeline.FilterObserver).
func (m *Metrics) FilterError(target string) {
	if m == nil {
		return
	}
	m.filterErrors.WithLabelValues(SinkLabel(target)).Inc()
}

// SinkLabel is the sink label for a delivery target: its name, or
// "subscription" for every webhook subscription (one label value per
// subscription would be one per tenant).
func SinkLabel(target string) string {
	if strings.HasPrefix(target, "subscription:") {
		return "subscription"
	}
	return target
}

func lastClass(o sink.Outcome) string {
	if o.Err == nil {
		return Class2xx
	}
	return statusClass(o.Status)
}

// statusClass is the class of one attempt's answer; no status is a
// transport failure (no answer: connection refused, timeout, reset).
func statusClass(status int) string {
	switch {
	case status >= 200 && status < 300:
		return Class2xx
	case status >= 300 && status < 400:
		return Class3xx
	case status >= 400 && status < 500:
		return Class4xx
	case status >= 500 && status < 600:
		return Class5xx
	}
	return ClassTransport
}

// lsnFloat converts an LSN for a gauge; float64 holds LSNs exactly up to 2^53
// bytes (8 PiB of WAL).
func lsnFloat(lsn pglogrepl.LSN) float64 { return float64(uint64(lsn)) }

type factory struct{ reg *prometheus.Registry }

func (f factory) counter(name, help string) prometheus.Counter {
	c := prometheus.NewCounter(prometheus.CounterOpts{Namespace: Namespace, Name: name, Help: help})
	f.reg.MustRegister(c)
	return c
}

func (f factory) counterVec(name, help string, labels ...string) *prometheus.CounterVec {
	c := prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: Namespace, Name: name, Help: help}, labels)
	f.reg.MustRegister(c)
	return c
}

func (f factory) gauge(name, help string) prometheus.Gauge {
	g := prometheus.NewGauge(prometheus.GaugeOpts{Namespace: Namespace, Name: name, Help: help})
	f.reg.MustRegister(g)
	return g
}

func (f factory) gaugeVec(name, help string, labels ...string) *prometheus.GaugeVec {
	g := prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: Namespace, Name: name, Help: help}, labels)
	f.reg.MustRegister(g)
	return g
}

func (f factory) histogram(name, help string, buckets []float64) prometheus.Histogram {
	h := prometheus.NewHistogram(prometheus.HistogramOpts{Namespace: Namespace, Name: name, Help: help, Buckets: buckets})
	f.reg.MustRegister(h)
	return h
}

func (f factory) histogramVec(name, help string, buckets []float64, labels ...string) *prometheus.HistogramVec {
	h := prometheus.NewHistogramVec(prometheus.HistogramOpts{Namespace: Namespace, Name: name, Help: help, Buckets: buckets}, labels)
	f.reg.MustRegister(h)
	return h
}
