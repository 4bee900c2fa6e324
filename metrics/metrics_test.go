package metrics_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/rs/zerolog"
	"github.com/stretchr/testify/require"

	"github.com/outboxd/outboxd/decode"
	"github.com/outboxd/outboxd/deliver"
	"github.com/outboxd/outboxd/internal/e2e"
	"github.com/outboxd/outboxd/internal/pgtest"
	"github.com/outboxd/outboxd/metrics"
	"github.com/outboxd/outboxd/migrations"
	"github.com/outboxd/outboxd/pipeline"
	"github.com/outboxd/outboxd/sink"
	"github.com/outboxd/outboxd/store"
)

func TestMain(m *testing.M) { pgtest.Main(m) }

var _ pipeline.Observer = (*metrics.Metrics)(nil)

func events(n int, occurred time.Time) []*decode.Event {
	out := make([]*decode.Event, n)
	for i := range out {
		out[i] = &decode.Event{ID: int64(i + 1), OccurredAt: occurred}
	}
	return out
}

// The observer turns sink calls into the documented series: events by sink and
// reason, attempts by status class, durations and end-to-end latency.
func TestObserverCountsDeliveries(t *testing.T) {
	t.Parallel()
	m := metrics.New(metrics.Options{Version: "v1.2.3"})
	reg := m.Registry()
	now := time.Now()

	for range 3 {
		m.Received(&decode.Event{})
	}
	m.Received(&decode.Event{Change: &decode.Change{}}) // a subscription change, not an event
	// Two events delivered after one 503: 2 delivered, attempts 1 retried + 1 2xx.
	m.Delivered(deliver.Result{Sink: "webhook", Events: events(2, now.Add(-3*time.Second)),
		Outcome: sink.Outcome{Status: 200, Attempts: 2}, Took: 40 * time.Millisecond})
	m.Delivered(deliver.Result{Sink: "webhook", Events: events(1, now),
		Outcome: sink.Outcome{Status: 422, Attempts: 1, Err: fmt.Errorf("x: %w", sink.ErrPermanent)}, Took: time.Millisecond})
	m.Delivered(deliver.Result{Sink: "subscription:42", Events: events(1, now),
		Outcome: sink.Outcome{Status: 410, Attempts: 1, Err: fmt.Errorf("x: %w", sink.ErrGone)}})
	m.Delivered(deliver.Result{Sink: "webhook", Events: events(4, now),
		Outcome: sink.Outcome{Attempts: 8, Err: errors.New("giving up after 8 attempt(s): connection refused")}})
	m.Delivered(deliver.Result{Sink: "webhook", Events: events(1, now),
		Outcome: sink.Outcome{Attempts: 1, Err: fmt.Errorf("stopped: %w", context.Canceled)}})
	m.Flushed(store.Batch{LSN: pglogrepl.LSN(0x16B374D848)}, 3*time.Millisecond)
	m.Streaming(true)

	counter := func(name string, labels ...string) float64 {
		t.Helper()
		mfs, err := reg.Gather()
		require.NoError(t, err)
		for _, mf := range mfs {
			if mf.GetName() != name {
				continue
			}
		metric:
			for _, mt := range mf.GetMetric() {
				got := map[string]string{}
				for _, lp := range mt.GetLabel() {
					got[lp.GetName()] = lp.GetValue()
				}
				for i := 0; i < len(labels); i += 2 {
					if got[labels[i]] != labels[i+1] {
						continue metric
					}
				}
				switch {
				case mt.Counter != nil:
					return mt.Counter.GetValue()
				case mt.Gauge != nil:
					return mt.Gauge.GetValue()
				case mt.Histogram != nil:
					return float64(mt.Histogram.GetSampleCount())
				}
			}
		}
		return -1
	}
	require.EqualValues(t, 3, counter("outboxd_events_received_total"))
	require.EqualValues(t, 2, counter("outboxd_events_delivered_total", "sink", "webhook"))
	require.EqualValues(t, 1, counter("outboxd_events_failed_total", "sink", "webhook", "reason", "permanent"))
	require.EqualValues(t, 1, counter("outboxd_events_failed_total", "sink", "subscription", "reason", "gone"),
		"subscriptions share one label value: no per-tenant series")
	require.EqualValues(t, 4, counter("outboxd_events_failed_total", "sink", "webhook", "reason", "exhausted"))
	require.EqualValues(t, 1, counter("outboxd_delivery_attempts_total", "sink", "webhook", "status_class", "2xx"))
	require.EqualValues(t, 1, counter("outboxd_delivery_attempts_total", "sink", "webhook", "status_class", "4xx"))
	require.EqualValues(t, 2, counter("outboxd_delivery_attempts_total", "sink", "webhook", "status_class", "transport"),
		"the last attempt of the exhausted call and the one cut by the stop got no answer")
	require.EqualValues(t, 1+7, counter("outboxd_delivery_attempts_total", "sink", "webhook", "status_class", "retried"))
	require.EqualValues(t, 4, counter("outboxd_delivery_duration_seconds", "sink", "webhook"), "one observation per sink call")
	require.EqualValues(t, 2, counter("outboxd_end_to_end_latency_seconds", "sink", "webhook"), "one observation per delivered event")
	require.EqualValues(t, 0x16B374D848, counter("outboxd_checkpoint_lsn"))
	require.EqualValues(t, 1, counter("outboxd_leader"))
	require.EqualValues(t, 1, counter("outboxd_build_info", "version", "v1.2.3"))
	// Set from the clock during the calls above: between the test's start and now,
	// however long the machine took (no tolerance window to miss under load).
	last := counter("outboxd_last_delivered_event_timestamp_seconds")
	require.GreaterOrEqual(t, last, float64(now.UnixNano())/1e9)
	require.LessOrEqual(t, last, float64(time.Now().UnixNano())/1e9)

	// A checkpoint written (an idle advance) before the next standby status:
	// the received gauge is never behind it.
	m.Position(pglogrepl.LSN(0x16B374D000), pglogrepl.LSN(0x16B374D000))
	m.Flushed(store.Batch{LSN: pglogrepl.LSN(0x16B374F000)}, time.Millisecond)
	require.EqualValues(t, 0x16B374F000, counter("outboxd_checkpoint_lsn"))
	require.EqualValues(t, 0x16B374F000, counter("outboxd_received_lsn"), "received never behind the checkpoint")

	m.Position(pglogrepl.LSN(0x20000000), pglogrepl.LSN(0x1F000000))
	require.EqualValues(t, 0x1F000000, counter("outboxd_checkpoint_lsn"))
	require.EqualValues(t, 0x20000000, counter("outboxd_received_lsn"))
	m.Streaming(false)
	require.EqualValues(t, 0, counter("outboxd_leader"))

	// Exact attempts, once a sink reports them, replace the estimate.
	m.Attempt("webhook", 503)
	m.Attempt("webhook", 0)
	m.Delivered(deliver.Result{Sink: "webhook", Events: events(1, now), Outcome: sink.Outcome{Status: 200, Attempts: 3}})
	require.EqualValues(t, 1, counter("outboxd_delivery_attempts_total", "sink", "webhook", "status_class", "5xx"))
	require.EqualValues(t, 3, counter("outboxd_delivery_attempts_total", "sink", "webhook", "status_class", "transport"))
	require.EqualValues(t, 1, counter("outboxd_delivery_attempts_total", "sink", "webhook", "status_class", "2xx"),
		"the call's own attempts are not counted again")

	// Naming follows the Prometheus conventions (units, _total, no colons).
	problems, err := testutil.GatherAndLint(reg)
	require.NoError(t, err)
	var ours []string
	for _, p := range problems {
		if strings.HasPrefix(p.Metric, "outboxd_") {
			ours = append(ours, p.Metric+": "+p.Text)
		}
	}
	require.Empty(t, ours)

	mfs, err := reg.Gather()
	require.NoError(t, err)
	var goSeen, processSeen bool
	for _, mf := range mfs {
		goSeen = goSeen || strings.HasPrefix(mf.GetName(), "go_")
		processSeen = processSeen || strings.HasPrefix(mf.GetName(), "process_")
		require.True(t, strings.HasPrefix(mf.GetName(), "outboxd_") || strings.HasPrefix(mf.GetName(), "go_") ||
			strings.HasPrefix(mf.GetName(), "process_"), mf.GetName())
	}
	require.True(t, goSeen, "Go collector registered")
	require.True(t, processSeen, "process collector registered")
}

// A nil *Metrics (metrics off) is a no-op.
func TestNilMetricsIsNoop(t *testing.T) {
	t.Parallel()
	var m *metrics.Metrics
	m.Received(&decode.Event{})
	m.Delivered(deliver.Result{Outcome: sink.Outcome{Attempts: 1}})
	m.Flushed(store.Batch{LSN: 1}, 0)
	m.Streaming(true)
	m.Position(1, 1)
	m.Attempt("webhook", 200)
	require.False(t, m.Leader())
}

func TestEvaluate(t *testing.T) {
	t.Parallel()
	cfg := metrics.MonitorConfig{DatabaseURL: "x", Slot: "s"}.WithDefaults()
	require.NoError(t, cfg.Validate())
	now := time.Now()
	ok := func(mod func(*metrics.SlotSample)) *metrics.SlotSample {
		s := &metrics.SlotSample{Exists: true, Active: true, WALStatus: "reserved", ConfirmedFlush: 100, RestartLSN: 50, CurrentLSN: 100, At: now}
		if mod != nil {
			mod(s)
		}
		return s
	}
	cases := []struct {
		name        string
		sample      *metrics.SlotSample
		pollErr     error
		lastAdvance time.Time
		reason      string // empty: healthy
	}{
		{"healthy", ok(nil), nil, now, ""},
		{"extended is fine", ok(func(s *metrics.SlotSample) { s.WALStatus = "extended" }), nil, now, ""},
		{"inactive standby slot is fine", ok(func(s *metrics.SlotSample) { s.Active = false }), nil, now, ""},
		{"lag below the threshold, moving", ok(func(s *metrics.SlotSample) { s.LagBytes = 1 << 20 }), nil, now.Add(-time.Minute), ""},
		{"not checked", nil, nil, time.Time{}, "not checked yet"},
		{"poll failed", nil, errors.New("connection refused"), time.Time{}, "slot state unknown"},
		{"missing", ok(func(s *metrics.SlotSample) { s.Exists = false }), nil, now, "does not exist"},
		{"lost", ok(func(s *metrics.SlotSample) { s.WALStatus = "lost" }), nil, now, "wal_status lost"},
		{"unreserved", ok(func(s *metrics.SlotSample) { s.WALStatus = "unreserved" }), nil, now, "unreserved"},
		{"lag", ok(func(s *metrics.SlotSample) { s.LagBytes = 2 << 30 }), nil, now, "exceeds OUTBOXD_LAG_ALERT_BYTES"},
		{"stalled", ok(func(s *metrics.SlotSample) { s.LagBytes = 10 }), nil, now.Add(-6 * time.Minute), "slot stalled"},
		{"still with no lag is idle, not stalled", ok(nil), nil, now.Add(-time.Hour), ""},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			h := metrics.Evaluate(cfg, c.sample, c.pollErr, now, c.lastAdvance)
			if c.reason == "" {
				require.True(t, h.Healthy, h.Reasons)
				require.Empty(t, h.Reasons)
				return
			}
			require.False(t, h.Healthy)
			require.Contains(t, strings.Join(h.Reasons, "; "), c.reason)
		})
	}
}

type health struct {
	code int
	body map[string]any
}

func get(t *testing.T, url string) health {
	t.Helper()
	resp, err := http.Get(url)
	require.NoError(t, err)
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	h := health{code: resp.StatusCode}
	if strings.HasPrefix(resp.Header.Get("Content-Type"), "application/json") {
		require.NoError(t, json.Unmarshal(b, &h.body), string(b))
	} else {
		h.body = map[string]any{"text": string(b)}
	}
	return h
}

func waitHealth(t *testing.T, url string, cond func(health) bool, what string) health {
	t.Helper()
	var h health
	e2e.WaitFor(t, 30*time.Second, func() bool { h = get(t, url); return cond(h) },
		func() string { return fmt.Sprintf("%s: last %d %v", what, h.code, h.body) })
	return h
}

// unhealthyFor matches a 503 whose reasons mention reason.
func unhealthyFor(reason string) func(health) bool {
	return func(h health) bool {
		return h.code == http.StatusServiceUnavailable && strings.Contains(fmt.Sprint(h.body["reasons"]), reason)
	}
}

// The health endpoints against a real server, in each state of the slot:
// healthy, stalled, lagging, missing; readiness with the database up and down;
// the backlog gauge counts unprocessed rows that are not dead-lettered.
func TestHealthEndpointsInEachState(t *testing.T) {
	t.Parallel()
	srv := pgtest.Shared(t)
	url := srv.NewDatabase(t)
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, url)
	require.NoError(t, err)
	defer conn.Close(ctx)
	_, err = migrations.Migrate(ctx, conn, migrations.Options{Schema: "public", Table: "domain_event", Publication: "outboxd"})
	require.NoError(t, err)
	slot := "health_" + strings.ToLower(strings.ReplaceAll(time.Now().Format("150405.000000"), ".", "_"))
	_, err = conn.Exec(ctx, `SELECT pg_create_logical_replication_slot($1, 'pgoutput')`, slot)
	require.NoError(t, err)
	t.Cleanup(func() {
		_, _ = conn.Exec(context.Background(), `SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1`, slot)
	})
	_, err = conn.Exec(ctx, `INSERT INTO domain_event (event_name) SELECT 'e' FROM generate_series(1, 7)`)
	require.NoError(t, err)
	_, err = conn.Exec(ctx, `INSERT INTO outboxd_dead_letter (event_id, sink, last_error, attempts)
  SELECT min(id), 'webhook', 'refused', 1 FROM domain_event`)
	require.NoError(t, err)

	m := metrics.New(metrics.Options{Version: "test"})
	mon, err := metrics.NewMonitor(metrics.MonitorConfig{
		DatabaseURL: url, Slot: slot, PollInterval: 50 * time.Millisecond, BacklogInterval: 50 * time.Millisecond,
		// Long enough that a loaded machine reaches the first health check of
		// the fresh slot before other databases' WAL makes it look stalled.
		StallTimeout: 5 * time.Second, LagAlertBytes: 64 << 20,
	}, m, zerolog.Nop())
	require.NoError(t, err)
	mctx, stop := context.WithCancel(ctx)
	done := make(chan error)
	go func() { done <- mon.Run(mctx) }()
	defer func() {
		stop()
		require.NoError(t, <-done)
	}()
	web := httptest.NewServer(metrics.Handler(m, mon))
	defer web.Close()

	require.Equal(t, http.StatusOK, get(t, web.URL+"/healthz").code)
	r := get(t, web.URL+"/readyz")
	require.Equal(t, http.StatusOK, r.code, r.body)
	require.Equal(t, "standby", r.body["role"], "not streaming: a standby, and ready all the same")

	// A fresh slot: nothing to confirm yet.
	h := waitHealth(t, web.URL+"/health/replication", func(h health) bool { return h.code == http.StatusOK }, "healthy slot")
	require.Equal(t, true, h.body["exists"])
	require.Equal(t, false, h.body["active"])

	scrape := waitHealth(t, web.URL+"/metrics", func(h health) bool {
		return strings.Contains(h.body["text"].(string), "outboxd_backlog_rows")
	}, "backlog counted").body["text"].(string)
	require.Contains(t, scrape, "outboxd_slot_exists 1")
	require.Contains(t, scrape, "outboxd_backlog_rows 6", "7 unprocessed rows, one dead-lettered")
	require.Contains(t, scrape, `outboxd_build_info{goversion="go`)

	// WAL written, nobody confirming: stalled after StallTimeout.
	_, err = conn.Exec(ctx, `CREATE TABLE filler AS SELECT g, repeat('x', 100) AS pad FROM generate_series(1, 1000) g`)
	require.NoError(t, err)
	h = waitHealth(t, web.URL+"/health/replication", unhealthyFor("slot stalled"), "stalled slot")
	require.Equal(t, http.StatusServiceUnavailable, h.code)
	require.Greater(t, h.body["lag_bytes"].(float64), 0.0)

	// Advancing the slot clears the stall.
	_, err = conn.Exec(ctx, `SELECT pg_replication_slot_advance($1, pg_current_wal_lsn())`, slot)
	require.NoError(t, err)
	waitHealth(t, web.URL+"/health/replication", func(h health) bool { return h.code == http.StatusOK }, "advanced slot")

	// Gone: 503 naming the repair.
	_, err = conn.Exec(ctx, `SELECT pg_drop_replication_slot($1)`, slot)
	require.NoError(t, err)
	h = waitHealth(t, web.URL+"/health/replication", unhealthyFor("does not exist"), "missing slot")
	require.Contains(t, fmt.Sprint(h.body["reasons"]), "outboxd slot reset")
	scrape = get(t, web.URL+"/metrics").body["text"].(string)
	require.Contains(t, scrape, "outboxd_slot_exists 0")
}

// Lag above OUTBOXD_LAG_ALERT_BYTES is reported at once, without waiting for
// the stall timeout.
func TestHealthReportsLagAboveThreshold(t *testing.T) {
	t.Parallel()
	srv := pgtest.Shared(t)
	url := srv.NewDatabase(t)
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, url)
	require.NoError(t, err)
	defer conn.Close(ctx)
	slot := "lag_" + strings.ToLower(strings.ReplaceAll(time.Now().Format("150405.000000"), ".", "_"))
	_, err = conn.Exec(ctx, `SELECT pg_create_logical_replication_slot($1, 'pgoutput')`, slot)
	require.NoError(t, err)
	t.Cleanup(func() {
		_, _ = conn.Exec(context.Background(), `SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1`, slot)
	})
	m := metrics.New(metrics.Options{Version: "test"})
	mon, err := metrics.NewMonitor(metrics.MonitorConfig{
		DatabaseURL: url, Slot: slot, PollInterval: 50 * time.Millisecond, BacklogInterval: -1,
		StallTimeout: time.Hour, LagAlertBytes: 64 << 10,
	}, m, zerolog.Nop())
	require.NoError(t, err)
	mctx, stop := context.WithCancel(ctx)
	done := make(chan error)
	go func() { done <- mon.Run(mctx) }()
	defer func() {
		stop()
		require.NoError(t, <-done)
	}()
	web := httptest.NewServer(metrics.Handler(m, mon))
	defer web.Close()

	_, err = conn.Exec(ctx, `CREATE TABLE filler AS SELECT g, repeat('x', 200) AS pad FROM generate_series(1, 2000) g`)
	require.NoError(t, err)
	h := waitHealth(t, web.URL+"/health/replication", unhealthyFor("exceeds OUTBOXD_LAG_ALERT_BYTES"), "lagging slot")
	require.NotContains(t, fmt.Sprint(h.body["reasons"]), "stalled")
	scrape := get(t, web.URL+"/metrics").body["text"].(string)
	require.NotContains(t, scrape, "outboxd_replication_lag_bytes 0\n")
	require.NotContains(t, scrape, "outboxd_backlog_rows", "backlog count disabled: no series")
}

// The lag of each target, the age of its oldest parked event, is a gauge
// per own target; the subscriptions share one series (their largest lag),
// never one per subscription.
func TestParkedLagPerTarget(t *testing.T) {
	t.Parallel()
	url := pgtest.Shared(t).NewDatabase(t)
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, url)
	require.NoError(t, err)
	defer conn.Close(ctx)
	_, err = migrations.Migrate(ctx, conn, migrations.Options{Schema: "public", Table: "domain_event", Publication: "outboxd"})
	require.NoError(t, err)
	_, err = conn.Exec(ctx, `INSERT INTO domain_event (event_name, occurred_at) VALUES
  ('a', now() - interval '2 hours'), ('b', now() - interval '3 hours'), ('c', now() - interval '1 minute')`)
	require.NoError(t, err)
	_, err = conn.Exec(ctx, `INSERT INTO outboxd_parked (target, event_id, ordering_key, commit_lsn, commit_index, next_attempt_at)
SELECT t, id, 1, '0/1', 0, now() FROM (VALUES ('webhook', 'a'), ('subscription:1', 'b'), ('subscription:2', 'c')) AS v (t, name)
JOIN domain_event ON event_name = name`)
	require.NoError(t, err)
	_, err = conn.Exec(ctx, `INSERT INTO outboxd_dead_letter (event_id, sink, last_error, attempts) SELECT id, 'posthog', 'refused', 1 FROM domain_event WHERE event_name = 'c'`)
	require.NoError(t, err)

	m := metrics.New(metrics.Options{Version: "test"})
	mon, err := metrics.NewMonitor(metrics.MonitorConfig{DatabaseURL: url, Slot: "none", BacklogInterval: 50 * time.Millisecond}, m, zerolog.Nop())
	require.NoError(t, err)
	mctx, stop := context.WithCancel(ctx)
	done := make(chan error)
	go func() { done <- mon.Run(mctx) }()
	defer func() {
		stop()
		require.NoError(t, <-done)
	}()
	web := httptest.NewServer(metrics.Handler(m, mon))
	defer web.Close()
	scrape := waitHealth(t, web.URL+"/metrics", func(h health) bool {
		return strings.Contains(h.body["text"].(string), "outboxd_parked_lag_seconds")
	}, "targets counted").body["text"].(string)
	gauge := func(series string) float64 {
		t.Helper()
		for line := range strings.SplitSeq(scrape, "\n") {
			if v, ok := strings.CutPrefix(line, series+" "); ok {
				var f float64
				_, err := fmt.Sscan(v, &f)
				require.NoError(t, err, line)
				return f
			}
		}
		require.Fail(t, "no series "+series, scrape)
		return 0
	}
	within := func(series string, lo float64) {
		t.Helper()
		v := gauge(series)
		require.True(t, v >= lo && v < lo+300, "%s = %v, want about %v", series, v, lo)
	}
	within(`outboxd_parked_lag_seconds{sink="webhook"}`, 7200)
	within(`outboxd_parked_lag_seconds{sink="subscription"}`, 10800)
	require.Zero(t, gauge(`outboxd_parked_lag_seconds{sink="posthog"}`), "dead letters only: nothing parked")
	require.Equal(t, 2.0, gauge(`outboxd_parked_deliveries{sink="subscription"}`))
	require.NotContains(t, scrape, "subscription:", "no series per subscription")
}

// /readyz answers 503 when the database cannot be reached, and /healthz stays
// 200: liveness never depends on the database.
func TestReadyzWithoutDatabase(t *testing.T) {
	t.Parallel()
	m := metrics.New(metrics.Options{Version: "test"})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	l := ln.Addr().String()
	require.NoError(t, ln.Close()) // nothing listens there now
	mon, err := metrics.NewMonitor(metrics.MonitorConfig{
		DatabaseURL: "postgres://nobody:secret-pw@" + l + "/db?connect_timeout=1", Slot: "s",
		PingTimeout: time.Second,
	}, m, zerolog.Nop())
	require.NoError(t, err)
	web := httptest.NewServer(metrics.Handler(m, mon))
	defer web.Close()
	require.Equal(t, http.StatusOK, get(t, web.URL+"/healthz").code)
	r := get(t, web.URL+"/readyz")
	require.Equal(t, http.StatusServiceUnavailable, r.code)
	require.NotContains(t, fmt.Sprint(r.body), "secret-pw", "no password in health output")
	h := get(t, web.URL+"/health/replication")
	require.Equal(t, http.StatusServiceUnavailable, h.code, "never polled: unknown is not healthy")
}

// A sink's duplicate acknowledgements (NATS) are exported as a counter that
// reads the sink's count at each scrape.
func TestSinkDuplicatesExported(t *testing.T) {
	t.Parallel()
	m := metrics.New(metrics.Options{Version: "test"})
	var n atomic.Uint64
	m.SinkDuplicates("nats", n.Load)
	n.Add(3)
	want := `# HELP outboxd_sink_duplicates_acknowledged_total Deliveries the destination acknowledged as copies of messages it already had (NATS: PubAck.Duplicate within the stream's duplicate window).
# TYPE outboxd_sink_duplicates_acknowledged_total counter
outboxd_sink_duplicates_acknowledged_total{sink="nats"} 3
`
	require.NoError(t, testutil.GatherAndCompare(m.Registry(), strings.NewReader(want), "outboxd_sink_duplicates_acknowledged_total"))
	problems, err := testutil.GatherAndLint(m.Registry(), "outboxd_sink_duplicates_acknowledged_total")
	require.NoError(t, err)
	require.Empty(t, problems)
}
