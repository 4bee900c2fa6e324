// Package otlptest is an in-process OTLP/HTTP receiver for tests: it decodes
// the protobuf export requests of traces and metrics and keeps what they
// carried.
package otlptest

import (
	"compress/gzip"
	"encoding/hex"
	"io"
	"net/http"
	"net/http/httptest"
	"slices"
	"sync"
	"testing"

	colmetricpb "go.opentelemetry.io/proto/otlp/collector/metrics/v1"
	coltracepb "go.opentelemetry.io/proto/otlp/collector/trace/v1"
	commonpb "go.opentelemetry.io/proto/otlp/common/v1"
	tracepb "go.opentelemetry.io/proto/otlp/trace/v1"
	"google.golang.org/protobuf/proto"
)

// Span is a received span, its ids in lowercase hex.
type Span struct {
	Name                          string
	TraceID, SpanID, ParentSpanID string
	Attrs                         map[string]any
	// Error is true when the span's status is Error; Message is its
	// description.
	Error   bool
	Message string
	// Links are the linked spans, as "traceid-spanid".
	Links []string
	// Resource holds the resource's string attributes.
	Resource map[string]string
	Kind     tracepb.Span_SpanKind
}

// Collector records what it is sent. Its methods are safe for concurrent use.
type Collector struct {
	*httptest.Server
	mu          sync.Mutex
	spans       []Span
	metrics     map[string]int // metric name -> data points received
	requests    int
	headers     []http.Header
	badRequests int
}

// New starts a collector, closed at cleanup.
func New(t testing.TB) *Collector {
	c := &Collector{metrics: map[string]int{}}
	mux := http.NewServeMux()
	mux.HandleFunc("POST /v1/traces", c.traces)
	mux.HandleFunc("POST /v1/metrics", c.metricsReq)
	c.Server = httptest.NewServer(mux)
	t.Cleanup(c.Close)
	return c
}

func (c *Collector) read(w http.ResponseWriter, r *http.Request, into proto.Message) bool {
	var body io.Reader = r.Body
	if r.Header.Get("Content-Encoding") == "gzip" {
		zr, err := gzip.NewReader(r.Body)
		if err != nil {
			c.bad(w)
			return false
		}
		body = zr
	}
	b, err := io.ReadAll(body)
	if err != nil || r.Header.Get("Content-Type") != "application/x-protobuf" || proto.Unmarshal(b, into) != nil {
		c.bad(w)
		return false
	}
	c.mu.Lock()
	c.requests++
	c.headers = append(c.headers, r.Header.Clone())
	c.mu.Unlock()
	return true
}

func (c *Collector) bad(w http.ResponseWriter) {
	c.mu.Lock()
	c.badRequests++
	c.mu.Unlock()
	http.Error(w, "bad request", http.StatusBadRequest)
}

func reply(w http.ResponseWriter, m proto.Message) {
	b, _ := proto.Marshal(m)
	w.Header().Set("Content-Type", "application/x-protobuf")
	_, _ = w.Write(b)
}

func (c *Collector) traces(w http.ResponseWriter, r *http.Request) {
	var req coltracepb.ExportTraceServiceRequest
	if !c.read(w, r, &req) {
		return
	}
	var got []Span
	for _, rs := range req.GetResourceSpans() {
		res := map[string]string{}
		for _, kv := range rs.GetResource().GetAttributes() {
			if s, ok := kv.GetValue().GetValue().(*commonpb.AnyValue_StringValue); ok {
				res[kv.GetKey()] = s.StringValue
			}
		}
		for _, ss := range rs.GetScopeSpans() {
			for _, sp := range ss.GetSpans() {
				s := Span{
					Name: sp.GetName(), TraceID: hex.EncodeToString(sp.GetTraceId()), SpanID: hex.EncodeToString(sp.GetSpanId()),
					ParentSpanID: hex.EncodeToString(sp.GetParentSpanId()), Attrs: attrs(sp.GetAttributes()),
					Error: sp.GetStatus().GetCode() == tracepb.Status_STATUS_CODE_ERROR, Message: sp.GetStatus().GetMessage(),
					Resource: res, Kind: sp.GetKind(),
				}
				for _, l := range sp.GetLinks() {
					s.Links = append(s.Links, hex.EncodeToString(l.GetTraceId())+"-"+hex.EncodeToString(l.GetSpanId()))
				}
				got = append(got, s)
			}
		}
	}
	c.mu.Lock()
	c.spans = append(c.spans, got...)
	c.mu.Unlock()
	reply(w, &coltracepb.ExportTraceServiceResponse{})
}

func (c *Collector) metricsReq(w http.ResponseWriter, r *http.Request) {
	var req colmetricpb.ExportMetricsServiceRequest
	if !c.read(w, r, &req) {
		return
	}
	c.mu.Lock()
	for _, rm := range req.GetResourceMetrics() {
		for _, sm := range rm.GetScopeMetrics() {
			for _, m := range sm.GetMetrics() {
				n := len(m.GetSum().GetDataPoints()) + len(m.GetGauge().GetDataPoints()) + len(m.GetHistogram().GetDataPoints()) +
					len(m.GetSummary().GetDataPoints()) + len(m.GetExponentialHistogram().GetDataPoints())
				c.metrics[m.GetName()] += n
			}
		}
	}
	c.mu.Unlock()
	reply(w, &colmetricpb.ExportMetricsServiceResponse{})
}

// attrs turns OTLP attributes into Go values: string, bool, int64, float64
// or []any.
func attrs(kvs []*commonpb.KeyValue) map[string]any {
	out := make(map[string]any, len(kvs))
	for _, kv := range kvs {
		out[kv.GetKey()] = value(kv.GetValue())
	}
	return out
}

func value(v *commonpb.AnyValue) any {
	switch x := v.GetValue().(type) {
	case *commonpb.AnyValue_StringValue:
		return x.StringValue
	case *commonpb.AnyValue_BoolValue:
		return x.BoolValue
	case *commonpb.AnyValue_IntValue:
		return x.IntValue
	case *commonpb.AnyValue_DoubleValue:
		return x.DoubleValue
	case *commonpb.AnyValue_ArrayValue:
		var out []any
		for _, e := range x.ArrayValue.GetValues() {
			out = append(out, value(e))
		}
		return out
	}
	return nil
}

// Spans returns the spans received so far.
func (c *Collector) Spans() []Span {
	c.mu.Lock()
	defer c.mu.Unlock()
	return slices.Clone(c.spans)
}

// Metrics returns, per metric name, the data points received so far.
func (c *Collector) Metrics() map[string]int {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make(map[string]int, len(c.metrics))
	for k, v := range c.metrics {
		out[k] = v
	}
	return out
}

// Requests returns the number of export requests decoded, and of requests
// refused as not OTLP/HTTP protobuf.
func (c *Collector) Requests() (ok, bad int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.requests, c.badRequests
}

// Headers returns the headers of the export requests decoded so far.
func (c *Collector) Headers() []http.Header {
	c.mu.Lock()
	defer c.mu.Unlock()
	return slices.Clone(c.headers)
}
