package main

import (
	"bytes"
	"context"
	"fmt"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/outboxd/outboxd/internal/e2e"
	"github.com/outboxd/outboxd/internal/pgtest"
	"github.com/outboxd/outboxd/internal/telemetry"
	"github.com/outboxd/outboxd/internal/telemetry/otlptest"
)

// otelEnv points the daemon's exporters at col, exporting often.
func otelEnv(col *otlptest.Collector, extra map[string]string) map[string]string {
	env := map[string]string{
		"OTEL_EXPORTER_OTLP_ENDPOINT": col.URL,
		"OTEL_BSP_SCHEDULE_DELAY":     "100",
		"OTEL_METRIC_EXPORT_INTERVAL": "300",
	}
	for k, v := range extra {
		env[k] = v
	}
	return env
}

// attemptsOf returns the attempt spans of event id, by attempt number.
func attemptsOf(spans []otlptest.Span, id int64) map[int64]otlptest.Span {
	out := map[int64]otlptest.Span{}
	for _, s := range spans {
		if s.Name == telemetry.SpanAttempt && s.Attrs[telemetry.AttrEventID] == id {
			out[s.Attrs[telemetry.AttrAttempt].(int64)] = s
		}
	}
	return out
}

// txnSpan returns the transaction span whose span id is id.
func spanByID(spans []otlptest.Span, id string) (otlptest.Span, bool) {
	for _, s := range spans {
		if s.SpanID == id {
			return s, true
		}
	}
	return otlptest.Span{}, false
}

// With an OTLP endpoint set, outboxd sends a span per replicated
// transaction and one per delivery attempt: an event carrying a
// traceparent has its attempt in that trace, under that span; the others
// are under their transaction's span; a 503 then a 200 are two attempts.
// The Prometheus metrics arrive as OTLP metrics, with the headers of
// OTEL_EXPORTER_OTLP_HEADERS, which are never logged.
func TestOTelSpansArriveWithTheirParents(t *testing.T) {
	t.Parallel()
	col := otlptest.New(t)
	b := newBundle(t, pgtest.Shared(t), nil)
	ctx := context.Background()
	_, err := b.pool.Exec(ctx, `ALTER TABLE domain_event ADD COLUMN traceparent text`)
	require.NoError(t, err)
	var flaky atomic.Int32
	b.recv.Respond = func(d *e2e.Delivery) int {
		if bytes.Contains(d.Body, []byte(`"flaky"`)) && flaky.Add(1) == 1 {
			return http.StatusServiceUnavailable
		}
		return http.StatusOK
	}
	const token = "s3cr3t-otlp-token"
	env := b.env
	for k, v := range otelEnv(col, map[string]string{
		"OTEL_SERVICE_NAME":          "outboxd-e2e",
		"OTEL_RESOURCE_ATTRIBUTES":   "deployment.environment=test",
		"OTEL_EXPORTER_OTLP_HEADERS": "authorization=Bearer%20" + token,
	}) {
		env[k] = v
	}
	d := e2e.StartDaemon(t, env)
	waitStreaming(t, d)

	const (
		traceID  = "4bf92f3577b34da6a3ce929d0e0e4736"
		parentID = "00f067aa0ba902b7"
	)
	tx, err := b.pool.Begin(ctx)
	require.NoError(t, err)
	var traced, plain, flakyID int64
	require.NoError(t, tx.QueryRow(ctx, `INSERT INTO domain_event (event_name, traceparent) VALUES ('traced', $1) RETURNING id`,
		"00-"+traceID+"-"+parentID+"-01").Scan(&traced))
	require.NoError(t, tx.QueryRow(ctx, `INSERT INTO domain_event (event_name) VALUES ('plain') RETURNING id`).Scan(&plain))
	require.NoError(t, tx.Commit(ctx))
	require.NoError(t, b.pool.QueryRow(ctx, `INSERT INTO domain_event (event_name) VALUES ('flaky') RETURNING id`).Scan(&flakyID))
	b.recv.WaitAccepted(t, []int64{traced, plain, flakyID}, time.Minute)

	// Transaction spans end when their events settled; spans are exported
	// in batches: wait for what is expected.
	var spans []otlptest.Span
	e2e.WaitFor(t, time.Minute, func() bool {
		spans = col.Spans()
		txns := 0
		for _, s := range spans {
			if s.Name == telemetry.SpanTransaction && s.Attrs[telemetry.AttrCatchup] == false {
				txns++
			}
		}
		return txns >= 2 && len(attemptsOf(spans, traced)) == 1 && len(attemptsOf(spans, plain)) == 1 && len(attemptsOf(spans, flakyID)) == 2
	}, func() string { return fmt.Sprintf("spans so far: %+v", col.Spans()) })

	// The plain event: under its transaction's span, which has the
	// transaction's commit LSN and its two events.
	p := attemptsOf(spans, plain)[1]
	txn, ok := spanByID(spans, p.ParentSpanID)
	require.True(t, ok, "the plain event's attempt has its transaction's span as parent: %+v", p)
	require.Equal(t, telemetry.SpanTransaction, txn.Name)
	require.Equal(t, txn.TraceID, p.TraceID)
	require.Equal(t, int64(2), txn.Attrs[telemetry.AttrEventCount])
	require.NotEmpty(t, txn.Attrs[telemetry.AttrCommitLSN])
	require.Empty(t, txn.ParentSpanID, "a transaction span is a root")
	require.Equal(t, map[string]any{
		telemetry.AttrTarget: "webhook", telemetry.AttrSink: "webhook", telemetry.AttrEventID: plain, telemetry.AttrEventName: "plain",
		telemetry.AttrAttempt: int64(1), telemetry.AttrHTTPStatus: int64(200), telemetry.AttrOutcome: telemetry.OutcomeDelivered,
	}, p.Attrs)
	require.False(t, p.Error)
	require.Equal(t, "outboxd-e2e", p.Resource["service.name"])
	require.Equal(t, "test", p.Resource["deployment.environment"])

	// The traced event: in the row's trace, under the row's span, linked to
	// its transaction's span.
	tr := attemptsOf(spans, traced)[1]
	require.Equal(t, traceID, tr.TraceID)
	require.Equal(t, parentID, tr.ParentSpanID)
	require.Equal(t, []string{txn.TraceID + "-" + txn.SpanID}, tr.Links)
	require.Equal(t, telemetry.OutcomeDelivered, tr.Attrs[telemetry.AttrOutcome])

	// The flaky event: a 503, retried, then a 200, both under the second
	// transaction's span.
	fl := attemptsOf(spans, flakyID)
	require.Equal(t, int64(503), fl[1].Attrs[telemetry.AttrHTTPStatus])
	require.Equal(t, telemetry.OutcomeRetried, fl[1].Attrs[telemetry.AttrOutcome])
	require.True(t, fl[1].Error)
	require.Equal(t, int64(200), fl[2].Attrs[telemetry.AttrHTTPStatus])
	require.Equal(t, telemetry.OutcomeDelivered, fl[2].Attrs[telemetry.AttrOutcome])
	require.False(t, fl[2].Error)
	require.Equal(t, fl[1].ParentSpanID, fl[2].ParentSpanID)
	txn2, ok := spanByID(spans, fl[1].ParentSpanID)
	require.True(t, ok)
	require.Equal(t, telemetry.SpanTransaction, txn2.Name)
	require.Equal(t, int64(1), txn2.Attrs[telemetry.AttrEventCount])
	require.NotEqual(t, txn.TraceID, txn2.TraceID, "a trace per transaction")

	// Metrics: the Prometheus counters, through OTLP.
	e2e.WaitFor(t, time.Minute, func() bool {
		return col.Metrics()["outboxd_events_delivered_total"] > 0 && col.Metrics()["outboxd_delivery_attempts_total"] > 0
	}, func() string { return fmt.Sprintf("metrics so far: %v", col.Metrics()) })

	require.Equal(t, 0, d.Stop(30*time.Second))
	_, bad := col.Requests()
	require.Zero(t, bad, "every export request is OTLP/HTTP protobuf")
	for _, h := range col.Headers() {
		require.Equal(t, "Bearer "+token, h.Get("Authorization"))
	}
	require.NotContains(t, d.Log(), token, "the headers never reach the log")
	require.Contains(t, d.Log(), "exporting OpenTelemetry")
}

// Without an OTLP endpoint nothing is exported and no exporter starts; with
// one but OTEL_SDK_DISABLED=true, neither.
func TestOTelOffUnlessConfigured(t *testing.T) {
	t.Parallel()
	for name, extra := range map[string]map[string]string{
		"no endpoint":  {"OTEL_SERVICE_NAME": "outboxd-e2e", "OTEL_TRACES_SAMPLER": "always_on"},
		"sdk disabled": {"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:1/v1/traces"},
	} {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			col := otlptest.New(t)
			b := newBundle(t, pgtest.Shared(t), nil)
			env := b.env
			for k, v := range extra {
				env[k] = v
			}
			if name == "sdk disabled" {
				env["OTEL_EXPORTER_OTLP_ENDPOINT"] = col.URL
			}
			d := e2e.StartDaemon(t, env)
			ids := e2e.Insert(t, b.pool, 3, 1, one)
			b.recv.WaitAccepted(t, ids, time.Minute)
			b.waitProcessed(t, int64(len(ids)), time.Minute)
			// The stop flushes what exporters hold: after it, nothing
			// more can come.
			require.Equal(t, 0, d.Stop(30*time.Second))
			ok, bad := col.Requests()
			require.Zero(t, ok+bad, "nothing exported")
			require.NotContains(t, d.Log(), "exporting OpenTelemetry")
		})
	}
}

// A setting outboxd cannot honour is refused at start, naming the variable.
func TestOTelConfigErrorsNameTheVariable(t *testing.T) {
	t.Parallel()
	for _, kv := range []string{
		"OTEL_EXPORTER_OTLP_PROTOCOL=grpc",
		"OTEL_TRACES_EXPORTER=zipkin",
		"OTEL_SDK_DISABLED=maybe",
	} {
		t.Run(kv, func(t *testing.T) {
			t.Parallel()
			environ := []string{kv, "OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:1",
				"OUTBOXD_DATABASE_URL=postgres://u:hunter2@127.0.0.1:1/db", "OUTBOXD_WEBHOOK_URL=https://example.com/hook",
				"OUTBOXD_WEBHOOK_SECRET=" + e2e.Secret, "OUTBOXD_HTTP_ADDR="}
			var stdout, stderr strings.Builder
			err := run(context.Background(), []string{"run"}, nil, environ, &stdout, &stderr)
			require.Error(t, err)
			require.Equal(t, 2, exitCode(err, &stderr), stderr.String())
			name, _, _ := strings.Cut(kv, "=")
			require.Contains(t, stderr.String(), name)
			require.NotContains(t, stderr.String(), "hunter2")
		})
	}
}
