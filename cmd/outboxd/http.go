package main

import (
	"context"
	"errors"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"

	"github.com/outboxd/outboxd/metrics"
	"github.com/outboxd/outboxd/ops"
	"github.com/outboxd/outboxd/pipeline"
	"github.com/outboxd/outboxd/sink"
)

// opsServer is the health and metrics side of `outboxd run`: the HTTP server
// on OUTBOXD_HTTP_ADDR, the metrics the pipeline feeds and the monitor that
// polls the slot. It does not exist when OUTBOXD_HTTP_ADDR is empty.
type opsServer struct {
	metrics *metrics.Metrics
	srv     *http.Server
	cancel  context.CancelFunc
	wg      sync.WaitGroup
}

// monitorConfig converts the monitor's settings; errors name the variable.
func (c config) monitorConfig(pc pipeline.Config) (metrics.MonitorConfig, error) {
	checks := []struct {
		name string
		err  error
	}{
		{"SLOT_POLL_INTERVAL", positiveDur(c.SlotPollInterval)},
		{"SLOT_STALL_TIMEOUT", positiveDur(c.SlotStallTimeout)},
	}
	for _, ch := range checks {
		if ch.err != nil {
			return metrics.MonitorConfig{}, badVar(ch.name, "%v", ch.err)
		}
	}
	// The same parser as `outboxd status`, so both agree on the threshold.
	lag, err := ops.ParseBytes(c.LagAlertBytes)
	if err != nil || lag <= 0 {
		return metrics.MonitorConfig{}, badVar("LAG_ALERT_BYTES", "%q is not a positive size (bytes, or with a unit: 512MiB, 1GiB)", c.LagAlertBytes)
	}
	backlog := c.BacklogPollInterval
	switch {
	case backlog < 0:
		return metrics.MonitorConfig{}, badVar("BACKLOG_POLL_INTERVAL", "must not be negative, got %s (0 disables the count)", backlog)
	case backlog == 0:
		backlog = -1 // off
	}
	return metrics.MonitorConfig{
		DatabaseURL: pc.DatabaseURL, Slot: pc.Slot, Table: pc.Table,
		PollInterval: c.SlotPollInterval, BacklogInterval: backlog,
		LagAlertBytes: lag, StallTimeout: c.SlotStallTimeout,
	}, nil
}

// startOps starts the metrics, the slot monitor and the HTTP server when
// OUTBOXD_HTTP_ADDR is set; otherwise it returns nil and nothing runs. The
// monitor stops, and the server closes, at stop or when ctx ends.
func startOps(ctx context.Context, c config, pc pipeline.Config, log zerolog.Logger) (*opsServer, error) {
	if c.HTTPAddr == "" {
		return nil, nil
	}
	mc, err := c.monitorConfig(pc)
	if err != nil {
		return nil, err
	}
	m := metrics.New(metrics.Options{Version: version})
	if dc, ok := pc.Sink.(sink.DuplicateCounter); ok && len(pc.Destinations) == 0 {
		m.SinkDuplicates(c.Sink, dc.DuplicatesAcknowledged)
	}
	for _, d := range pc.Destinations {
		if dc, ok := d.Sink.(sink.DuplicateCounter); ok {
			m.SinkDuplicates(d.Name, dc.DuplicatesAcknowledged)
		}
	}
	guards := pipelineGuards(pc)
	m.Guards(guards)
	mon, err := metrics.NewMonitor(mc, m, log)
	if err != nil {
		return nil, err
	}
	srv, err := startHTTP(ctx, c.HTTPAddr, guardsHandler(metrics.Handler(m, mon), guards), log)
	if err != nil {
		return nil, err
	}
	mctx, cancel := context.WithCancel(ctx)
	o := &opsServer{metrics: m, srv: srv, cancel: cancel}
	o.wg.Add(1)
	go func() {
		defer o.wg.Done()
		mon.Run(mctx) //nolint:errcheck // Run only ends with ctx
	}()
	return o, nil
}

// stop stops the monitor and closes the server; a nil opsServer does nothing.
func (o *opsServer) stop() {
	if o == nil {
		return
	}
	o.cancel()
	o.wg.Wait()
	o.srv.Close() //nolint:errcheck // closing listeners; nothing to do about an error
}

// observer is the pipeline observer, nil when metrics are off (never a nil
// *metrics.Metrics in a non-nil interface).
func (o *opsServer) observer() pipeline.Observer {
	if o == nil {
		return nil
	}
	return o.metrics
}

// gatherer is the metrics' registry, nil when metrics are off.
func (o *opsServer) gatherer() prometheus.Gatherer {
	if o == nil {
		return nil
	}
	return o.metrics.Registry()
}

// startHTTP serves h on addr until the server is closed. The address bound is
// logged (addr may have port 0).
func startHTTP(ctx context.Context, addr string, h http.Handler, log zerolog.Logger) (*http.Server, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, badVar("HTTP_ADDR", "listen on %s: %v", addr, err)
	}
	srv := &http.Server{
		Handler:           h,
		ReadHeaderTimeout: 5 * time.Second,
		ReadTimeout:       10 * time.Second,
		WriteTimeout:      30 * time.Second,
		IdleTimeout:       2 * time.Minute,
		BaseContext:       func(net.Listener) context.Context { return ctx },
	}
	log.Info().Str("component", "http").Str("addr", ln.Addr().String()).Msg("serving /metrics, /healthz, /readyz, /health/replication")
	go func() {
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error().Str("component", "http").Err(err).Msg("http server stopped")
		}
	}()
	return srv, nil
}
