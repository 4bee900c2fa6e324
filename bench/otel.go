package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"sync/atomic"
	"time"

	coltracepb "go.opentelemetry.io/proto/otlp/collector/trace/v1"
	"google.golang.org/protobuf/proto"
)

// otlpSink is the OTLP/HTTP endpoint of the otel mode, in the bench's
// process: it decodes trace export requests to count their spans and
// answers them, and takes metric exports without reading them.
type otlpSink struct {
	srv   *http.Server
	url   string
	spans atomic.Int64
	bad   atomic.Int64
}

func newOTLPSink() (*otlpSink, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	s := &otlpSink{url: "http://" + ln.Addr().String()}
	mux := http.NewServeMux()
	mux.HandleFunc("POST /v1/traces", func(w http.ResponseWriter, r *http.Request) {
		b, err := io.ReadAll(r.Body)
		var req coltracepb.ExportTraceServiceRequest
		if err != nil || proto.Unmarshal(b, &req) != nil {
			s.bad.Add(1)
			http.Error(w, "bad request", http.StatusBadRequest)
			return
		}
		for _, rs := range req.GetResourceSpans() {
			for _, ss := range rs.GetScopeSpans() {
				s.spans.Add(int64(len(ss.GetSpans())))
			}
		}
		w.Header().Set("Content-Type", "application/x-protobuf")
	})
	mux.HandleFunc("POST /v1/metrics", func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		w.Header().Set("Content-Type", "application/x-protobuf")
	})
	s.srv = &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go func() {
		if err := s.srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			s.bad.Add(1)
		}
	}()
	return s, nil
}

func (s *otlpSink) close() { _ = s.srv.Close() }

// otelDrain measures the cost of tracing: the per-event drain of N rows in
// transactions of txnSize, first with no OTEL_* variable (tracing off),
// then exporting traces and metrics to an OTLP/HTTP endpoint in the bench's
// process, every span sampled. The batch span processor's queue is made
// large enough that no span is dropped (spans_received shows it), so
// that the "on" figure is the whole cost, export included.
func (b *bench) otelDrain(ctx context.Context, txnSize int) error {
	sink, err := newOTLPSink()
	if err != nil {
		return err
	}
	defer sink.close()
	for _, on := range []bool{false, true} {
		state := map[bool]string{false: "off", true: "on"}[on]
		name := dbName("t"+strconv.Itoa(txnSize), "otel", state)
		dbURL, err := b.pg.createDB(ctx, name, false, b.cfg.FillFactor)
		if err != nil {
			return err
		}
		batch, conc, label := b.outboxdSettings("perevent")
		env := daemonEnv(dbURL, name, b.recv.url, batch, conc, b.cfg.Extra)
		if on {
			env["OTEL_EXPORTER_OTLP_ENDPOINT"] = sink.url
			env["OTEL_TRACES_SAMPLER"] = "always_on"
			env["OTEL_BSP_MAX_QUEUE_SIZE"] = strconv.Itoa(max(2048, 4*b.cfg.N))
			env["OTEL_BSP_MAX_EXPORT_BATCH_SIZE"] = "2048"
			env["OTEL_BSP_SCHEDULE_DELAY"] = "200"
		}
		err = b.createSlotWithDaemon(ctx, env, dbURL, name)
		var bl backlog
		if err == nil {
			bl, err = b.load(ctx, dbURL, b.cfg.N, txnSize)
		}
		before := sink.spans.Load()
		var r row
		if err == nil {
			r, err = b.outboxdRun(ctx, env, dbURL, name, bl, false)
		}
		b.dropDB(ctx, name)
		if err != nil {
			return fmt.Errorf("tracing %s: %w", state, err)
		}
		r.Mode = "outboxd per-event, OTel tracing " + state + " (" + label + ")"
		r.Detail["cpu_us_per_event"] = r.Detail["cpu_s"].(float64) / float64(bl.rows) * 1e6
		if on {
			// Counted after the stop, which flushes the exporter.
			r.Detail["spans_received"] = sink.spans.Load() - before
			r.Detail["otlp_bad_requests"] = sink.bad.Load()
		}
		b.logf("otel %s: %.1f µs CPU/event", state, r.Detail["cpu_us_per_event"])
		b.add(r)
	}
	return nil
}
