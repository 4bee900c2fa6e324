// Package telemetry exports outboxd's traces and metrics over OTLP/HTTP with
// the OpenTelemetry SDK, when the standard OTEL_* variables ask for it.
//
// It is off unless an OTLP endpoint is configured: then Start returns nil,
// no exporter runs, and the hooks the pipeline calls (StartDelivery,
// StartRetry, Transactions) do nothing and allocate nothing. When on, it
// makes one span per replicated transaction ("outboxd.transaction") and one
// per delivery attempt ("outboxd.delivery.attempt"), parented to the row's
// W3C traceparent when it has a valid one, else to its transaction's span;
// and it exports the Prometheus registry that /metrics serves, unchanged,
// through the OTLP metric exporter.
//
// Exporting never holds up delivery: spans go through the SDK's batch
// processor, which drops spans when its queue is full, and export failures
// are logged at most once a minute.
package telemetry

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"
	prombridge "go.opentelemetry.io/contrib/bridges/prometheus"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/exporters/otlp/otlpmetric/otlpmetrichttp"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracehttp"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/resource"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/trace"
	"golang.org/x/time/rate"
)

// ScopeName is the instrumentation scope of outboxd's spans.
const ScopeName = "github.com/outboxd/outboxd"

// ShutdownTimeout bounds the final flush of the exporters at stop.
const ShutdownTimeout = 5 * time.Second

// Options configures Start.
type Options struct {
	// Getenv reads the OTEL_* variables outboxd decides on (whether to export
	// at all, and which signals). The SDK reads the rest of them (endpoint,
	// headers, timeout, sampler, resource) from the process environment.
	Getenv func(string) string
	// Gatherer is the Prometheus registry exported as OTLP metrics; nil:
	// no metrics are exported (the metrics are off).
	Gatherer prometheus.Gatherer
	// Version is outboxd's version, the resource's service.version.
	Version string
	Log     zerolog.Logger
}

// Telemetry is the running exporters. A nil *Telemetry is off.
type Telemetry struct {
	tp *sdktrace.TracerProvider
	mp *sdkmetric.MeterProvider
	st *state // what active holds while t makes spans
}

// active holds the tracer the hooks use; nil when tracing is off.
var active atomic.Pointer[state]

type state struct {
	tracer trace.Tracer
}

// Enabled reports whether spans are being made.
func Enabled() bool { return active.Load() != nil }

// Settings are what the OTEL_* variables ask for, as outboxd reads them.
type Settings struct {
	Traces, Metrics bool
}

// Read decides from the variables whether traces and metrics are exported:
// each when an OTLP endpoint is set for it (OTEL_EXPORTER_OTLP_ENDPOINT, or
// the signal's own OTEL_EXPORTER_OTLP_{TRACES,METRICS}_ENDPOINT) and its
// exporter variable (OTEL_TRACES_EXPORTER, OTEL_METRICS_EXPORTER) is unset,
// "otlp" or "none"; neither when OTEL_SDK_DISABLED is true. A protocol other
// than http/protobuf, or an exporter other than otlp or none, is an error
// naming the variable.
func Read(getenv func(string) string) (Settings, error) {
	var s Settings
	if v := strings.TrimSpace(getenv("OTEL_SDK_DISABLED")); v != "" {
		switch strings.ToLower(v) {
		case "true":
			return s, nil
		case "false":
		default:
			return s, fmt.Errorf("OTEL_SDK_DISABLED: want true or false, got %q", v)
		}
	}
	for _, name := range []string{"OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL"} {
		if v := strings.TrimSpace(getenv(name)); v != "" && v != "http/protobuf" {
			return s, fmt.Errorf("%s: outboxd exports OTLP over HTTP only: want http/protobuf, got %q", name, v)
		}
	}
	common := strings.TrimSpace(getenv("OTEL_EXPORTER_OTLP_ENDPOINT")) != ""
	var err error
	if s.Traces, err = signal(getenv, "TRACES", common); err != nil {
		return s, err
	}
	if s.Metrics, err = signal(getenv, "METRICS", common); err != nil {
		return s, err
	}
	return s, nil
}

// signal reports whether the signal (TRACES, METRICS) is exported.
func signal(getenv func(string) string, name string, common bool) (bool, error) {
	exporter := "OTEL_" + name + "_EXPORTER"
	switch v := strings.TrimSpace(getenv(exporter)); v {
	case "", "otlp":
	case "none":
		return false, nil
	default:
		return false, fmt.Errorf("%s: want otlp or none, got %q", exporter, v)
	}
	return common || strings.TrimSpace(getenv("OTEL_EXPORTER_OTLP_"+name+"_ENDPOINT")) != "", nil
}

// Start starts the exporters the variables ask for and returns them, or nil
// when none is asked for (nothing runs then). Only one Telemetry runs at a
// time: the delivery hooks use the one started last.
func Start(ctx context.Context, o Options) (*Telemetry, error) {
	s, err := Read(o.Getenv)
	if err != nil {
		return nil, err
	}
	if o.Gatherer == nil {
		s.Metrics = false
	}
	if !s.Traces && !s.Metrics {
		return nil, nil
	}
	// service.name defaults to outboxd; OTEL_SERVICE_NAME and
	// OTEL_RESOURCE_ATTRIBUTES, read by WithFromEnv, override it.
	res, err := resource.New(ctx,
		resource.WithAttributes(attribute.String("service.name", "outboxd"), attribute.String("service.version", o.Version)),
		resource.WithFromEnv(), resource.WithTelemetrySDK())
	if err != nil && res == nil {
		return nil, fmt.Errorf("OTEL_RESOURCE_ATTRIBUTES: %w", err)
	}
	log := o.Log.With().Str("component", "telemetry").Logger()
	otel.SetErrorHandler(errorLogger(log))
	t := &Telemetry{}
	if s.Traces {
		// The exporter reads OTEL_EXPORTER_OTLP_{,TRACES_}{ENDPOINT,HEADERS,
		// TIMEOUT,COMPRESSION,CERTIFICATE,...}; the provider
		// OTEL_TRACES_SAMPLER{,_ARG} and OTEL_BSP_*.
		exp, err := otlptracehttp.New(ctx)
		if err != nil {
			return nil, fmt.Errorf("OTLP trace exporter: %w", err)
		}
		t.tp = sdktrace.NewTracerProvider(sdktrace.WithBatcher(exp), sdktrace.WithResource(res))
		t.st = &state{tracer: t.tp.Tracer(ScopeName, trace.WithInstrumentationVersion(o.Version))}
		active.Store(t.st)
	}
	if s.Metrics {
		exp, err := otlpmetrichttp.New(ctx)
		if err != nil {
			t.Shutdown()
			return nil, fmt.Errorf("OTLP metric exporter: %w", err)
		}
		// The reader reads OTEL_METRIC_EXPORT_INTERVAL and _TIMEOUT.
		reader := sdkmetric.NewPeriodicReader(exp, sdkmetric.WithProducer(prombridge.NewMetricProducer(prombridge.WithGatherer(o.Gatherer))))
		t.mp = sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader), sdkmetric.WithResource(res))
	}
	log.Info().Bool("traces", s.Traces).Bool("metrics", s.Metrics).Msg("exporting OpenTelemetry over OTLP/HTTP")
	return t, nil
}

// Shutdown stops making spans, and flushes and stops the exporters within
// ShutdownTimeout. A nil Telemetry does nothing.
func (t *Telemetry) Shutdown() {
	if t == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), ShutdownTimeout)
	defer cancel()
	if t.tp != nil {
		active.CompareAndSwap(t.st, nil)
		otel.Handle(t.tp.Shutdown(ctx))
	}
	if t.mp != nil {
		otel.Handle(t.mp.Shutdown(ctx))
	}
}

// errorLogger logs the SDK's errors (failed exports, mostly) at most once a
// minute, with the number left out since the last line. The exporters'
// errors name the endpoint, never the headers.
func errorLogger(log zerolog.Logger) otel.ErrorHandler {
	var (
		every   = rate.Sometimes{First: 1, Interval: time.Minute}
		dropped atomic.Int64
	)
	return otel.ErrorHandlerFunc(func(err error) {
		if err == nil || errors.Is(err, context.Canceled) {
			return
		}
		logged := false
		every.Do(func() {
			logged = true
			log.Warn().Err(err).Int64("errors_not_logged", dropped.Swap(0)).Msg("OpenTelemetry export failed")
		})
		if !logged {
			dropped.Add(1)
		}
	})
}
