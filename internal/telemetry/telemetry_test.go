package telemetry_test

import (
	"context"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"github.com/stretchr/testify/require"

	"github.com/outboxd/outboxd/checkpoint"
	"github.com/outboxd/outboxd/decode"
	"github.com/outboxd/outboxd/internal/telemetry"
	"github.com/outboxd/outboxd/internal/telemetry/otlptest"
	"github.com/outboxd/outboxd/sink"
)

func env(m map[string]string) func(string) string { return func(k string) string { return m[k] } }

func TestRead(t *testing.T) {
	for _, tc := range []struct {
		name string
		vars map[string]string
		want telemetry.Settings
		bad  string // the variable the error names
	}{
		{"nothing set", nil, telemetry.Settings{}, ""},
		{"service name alone", map[string]string{"OTEL_SERVICE_NAME": "x"}, telemetry.Settings{}, ""},
		{"common endpoint", map[string]string{"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, telemetry.Settings{Traces: true, Metrics: true}, ""},
		{"traces endpoint", map[string]string{"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}, telemetry.Settings{Traces: true}, ""},
		{"metrics endpoint", map[string]string{"OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "http://c:4318/v1/metrics"}, telemetry.Settings{Metrics: true}, ""},
		{"traces none", map[string]string{"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c", "OTEL_TRACES_EXPORTER": "none"}, telemetry.Settings{Metrics: true}, ""},
		{"metrics none", map[string]string{"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c", "OTEL_METRICS_EXPORTER": "none"}, telemetry.Settings{Traces: true}, ""},
		{"disabled", map[string]string{"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c", "OTEL_SDK_DISABLED": "true"}, telemetry.Settings{}, ""},
		{"not disabled", map[string]string{"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c", "OTEL_SDK_DISABLED": "false"}, telemetry.Settings{Traces: true, Metrics: true}, ""},
		{"http/protobuf", map[string]string{"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}, telemetry.Settings{Traces: true, Metrics: true}, ""},
		{"grpc", map[string]string{"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc"}, telemetry.Settings{}, "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"},
		{"zipkin", map[string]string{"OTEL_TRACES_EXPORTER": "zipkin"}, telemetry.Settings{}, "OTEL_TRACES_EXPORTER"},
		{"disabled maybe", map[string]string{"OTEL_SDK_DISABLED": "maybe"}, telemetry.Settings{}, "OTEL_SDK_DISABLED"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := telemetry.Read(env(tc.vars))
			if tc.bad != "" {
				require.ErrorContains(t, err, tc.bad)
				return
			}
			require.NoError(t, err)
			require.Equal(t, tc.want, got)
		})
	}
}

func TestTraceparent(t *testing.T) {
	sc, ok := telemetry.Traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
	require.True(t, ok)
	require.Equal(t, "4bf92f3577b34da6a3ce929d0e0e4736", sc.TraceID().String())
	require.Equal(t, "00f067aa0ba902b7", sc.SpanID().String())
	require.True(t, sc.IsSampled())
	require.True(t, sc.IsRemote())
	sc, ok = telemetry.Traceparent("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-later-fields")
	require.True(t, ok, "a later version is read as 00")
	require.False(t, sc.IsSampled())
	for _, bad := range []string{
		"", "garbage",
		"00-00000000000000000000000000000000-00f067aa0ba902b7-01", // zero trace id
		"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01", // zero span id
		"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", // version ff
		"00-4bf92f3577b34da6a3ce929d0e0e473x-00f067aa0ba902b7-01",
		"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0x",
		"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
	} {
		_, ok := telemetry.Traceparent(bad)
		require.False(t, ok, bad)
	}
}

// Off, the hooks on the delivery path allocate nothing.
func TestHooksOffAllocateNothing(t *testing.T) {
	require.False(t, telemetry.Enabled())
	events := []*decode.Event{{ID: 1, Traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}}
	out := []sink.Outcome{{Attempts: 1, Status: 200}}
	ctx := context.Background()
	allocs := testing.AllocsPerRun(1000, func() {
		c, d := telemetry.StartDelivery(ctx, "webhook", "webhook", events)
		d.End(out)
		c, d = telemetry.StartRetry(c, "webhook", "webhook", events)
		d.End(out)
	})
	require.Zero(t, allocs)
	tr := checkpoint.NewTracker(0, 10)
	l, stop := telemetry.Transactions(tr)
	require.Same(t, tr, l, "off, the tracker itself")
	stop()
}

// On, a retry of a parked delivery is one attempt span in the row's trace,
// marked as a retry, with the receiver's status and the retryable outcome;
// a batch of a dispatcher with no transaction span is one span per attempt
// naming its events and linking to their traceparents. Not parallel: it
// sets the process environment the SDK reads.
func TestRetryAndBatchSpans(t *testing.T) {
	col := otlptest.New(t)
	t.Setenv("OTEL_EXPORTER_OTLP_ENDPOINT", col.URL)
	tel, err := telemetry.Start(context.Background(), telemetry.Options{Getenv: env(map[string]string{"OTEL_EXPORTER_OTLP_ENDPOINT": col.URL}), Log: zerolog.Nop()})
	require.NoError(t, err)
	require.NotNil(t, tel)
	require.True(t, telemetry.Enabled())

	status := http.StatusServiceUnavailable
	recv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { w.WriteHeader(status) }))
	defer recv.Close()
	w, err := sink.NewWebhook(sink.WebhookConfig{Name: "hook", URL: recv.URL, Secrets: []string{"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"},
		HTTPConfig: sink.HTTPConfig{AllowPrivate: true, RetryConfig: sink.RetryConfig{MaxAttempts: 3, BackoffMin: time.Millisecond, BackoffMax: time.Millisecond}}}, zerolog.Nop())
	require.NoError(t, err)
	defer w.Close()

	const tp1, tp2 = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
	retried := []*decode.Event{{ID: 7, Name: "a", Traceparent: tp1, Body: []byte(`{"id":7}`)}}
	ctx, d := telemetry.StartRetry(context.Background(), "hook", w.Name(), retried)
	d.End(w.Deliver(sink.WithMaxAttempts(ctx, 1), retried))

	status = http.StatusOK
	batch := []*decode.Event{{ID: 8, Traceparent: tp1, Body: []byte(`{"id":8}`)}, {ID: 9, Traceparent: tp2, Body: []byte(`{"id":9}`)}, {ID: 10, Body: []byte(`{"id":10}`)}}
	ctx, d = telemetry.StartDelivery(context.Background(), "hook", w.Name(), batch)
	d.End(w.Deliver(ctx, batch))
	tel.Shutdown() // flushes
	require.False(t, telemetry.Enabled())

	spans := col.Spans()
	require.Len(t, spans, 2)
	r, b := spans[0], spans[1]
	if r.Attrs[telemetry.AttrEventID] == nil {
		r, b = b, r
	}
	require.Equal(t, "4bf92f3577b34da6a3ce929d0e0e4736", r.TraceID)
	require.Equal(t, "00f067aa0ba902b7", r.ParentSpanID)
	require.Equal(t, true, r.Attrs[telemetry.AttrRetry])
	require.Equal(t, int64(503), r.Attrs[telemetry.AttrHTTPStatus])
	require.Equal(t, telemetry.OutcomeRetryable, r.Attrs[telemetry.AttrOutcome])
	require.True(t, r.Error)
	require.Equal(t, "outboxd", r.Resource["service.name"], "the default service name")

	require.Equal(t, []any{int64(8), int64(9), int64(10)}, b.Attrs[telemetry.AttrEventIDs])
	require.Equal(t, int64(3), b.Attrs[telemetry.AttrBatchEvents])
	require.Empty(t, b.ParentSpanID, "no transaction span: a root")
	require.Equal(t, []string{"4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7", "0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331"}, b.Links)
	require.Equal(t, telemetry.OutcomeDelivered, b.Attrs[telemetry.AttrOutcome])
}

// On, a transaction's span ends when its last event settles after its
// Close (not before), with its event count; a delivery of one of its events
// is its child; one still open when the pipeline stops ends abandoned; an
// empty one (pgoutput before PostgreSQL 15 sends them all) has no span.
func TestTransactionSpans(t *testing.T) {
	col := otlptest.New(t)
	t.Setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", col.URL+"/v1/traces")
	tel, err := telemetry.Start(context.Background(), telemetry.Options{
		Getenv: env(map[string]string{"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": col.URL + "/v1/traces"}), Log: zerolog.Nop()})
	require.NoError(t, err)
	tr := checkpoint.NewTracker(0, 10)
	l, stop := telemetry.Transactions(tr)
	require.NotSame(t, tr, l)

	done := l.Open(0x16B3748, false)
	left := l.Open(0x16B3800, false)
	require.NoError(t, l.Settle(done, checkpoint.Settlement{}), "an event settled before the commit is read")
	ev := &decode.Event{ID: 1, TxnSeq: done}
	_, d := telemetry.StartDelivery(context.Background(), "webhook", "webhook", []*decode.Event{ev})
	d.End([]sink.Outcome{{Attempts: 1, Status: 200}})
	require.NoError(t, l.Close(done, 0x16B3790, 2))
	require.NoError(t, l.Settle(done, checkpoint.Settlement{}))
	require.NoError(t, l.Close(left, 0x16B3900, 1))
	empty := l.Open(0x16B3A00, false)
	require.NoError(t, l.Close(empty, 0x16B3A10, 0))
	stop()
	tel.Shutdown()

	spans := col.Spans()
	require.Len(t, spans, 3)
	byLSN := map[any]otlptest.Span{}
	var attempt otlptest.Span
	for _, s := range spans {
		if s.Name == telemetry.SpanTransaction {
			byLSN[s.Attrs[telemetry.AttrCommitLSN]] = s
		} else {
			attempt = s
		}
	}
	a, b := byLSN["0/16B3748"], byLSN["0/16B3800"]
	require.Equal(t, int64(2), a.Attrs[telemetry.AttrEventCount])
	require.Equal(t, "0/16B3790", a.Attrs[telemetry.AttrEndLSN])
	require.Nil(t, a.Attrs[telemetry.AttrAbandoned])
	require.Equal(t, true, b.Attrs[telemetry.AttrAbandoned], "still waiting for its event at the stop")
	require.Equal(t, a.SpanID, attempt.ParentSpanID)
	require.Equal(t, a.TraceID, attempt.TraceID)
	require.Equal(t, int64(1), attempt.Attrs[telemetry.AttrAttempt], "a sink that reports no attempt: one span for the call")
}
