package metrics

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"math"
	"sync"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/rs/zerolog"

	"github.com/outboxd/outboxd/decode"
	"github.com/outboxd/outboxd/store"
)

// Defaults of MonitorConfig.
const (
	DefaultPollInterval    = 5 * time.Second
	DefaultBacklogInterval = 30 * time.Second
	DefaultLagAlertBytes   = 1 << 30 // 1 GiB
	DefaultStallTimeout    = 5 * time.Minute
	DefaultPingTimeout     = 2 * time.Second
	DefaultReadyCache      = time.Second
	// backlogTimeout bounds the backlog count, a sequential scan of the
	// outbox table: on a huge table the gauge goes stale rather than the
	// query running for minutes.
	backlogTimeout = 10 * time.Second
)

// MonitorConfig configures a Monitor.
type MonitorConfig struct {
	// DatabaseURL is the libpq URL or key/value string of the database.
	DatabaseURL string
	Slot        string
	Table       decode.Table
	// PollInterval is how often pg_replication_slots is read; default 5s.
	PollInterval time.Duration
	// BacklogInterval is how often unprocessed rows are counted; default
	// 30s; negative disables the count. The count is a sequential scan of the
	// outbox table (there is deliberately no index on unprocessed rows), so
	// its cost grows with the table: keep the table pruned, or disable it.
	BacklogInterval time.Duration
	// LagAlertBytes is the replication lag above which /health/replication
	// answers 503; default 1 GiB.
	LagAlertBytes int64
	// StallTimeout is how long confirmed_flush_lsn may stay still while the
	// lag is above zero before the slot counts as stalled; default 5m.
	StallTimeout time.Duration
	// PingTimeout bounds the database ping of /readyz; default 2s.
	PingTimeout time.Duration
	// ReadyCache is how long a ping result is reused; default 1s.
	ReadyCache time.Duration
}

// Validate checks c with its defaults (WithDefaults) and changes nothing.
func (c MonitorConfig) Validate() error {
	c = c.WithDefaults()
	if c.DatabaseURL == "" {
		return errors.New("database URL is empty")
	}
	if c.Slot == "" {
		return errors.New("slot name is empty")
	}
	switch {
	case c.PollInterval < 0:
		return fmt.Errorf("slot poll interval %s is negative", c.PollInterval)
	case c.LagAlertBytes < 0:
		return fmt.Errorf("lag alert threshold %d is negative", c.LagAlertBytes)
	case c.StallTimeout < 0:
		return fmt.Errorf("stall timeout %s is negative", c.StallTimeout)
	}
	return nil
}

// WithDefaults returns a copy of c with the defaults filled in.
func (c MonitorConfig) WithDefaults() MonitorConfig {
	if c.Table.Name == "" {
		c.Table = decode.Table{Schema: "public", Name: "domain_event"}
	}
	c.PollInterval = cmp.Or(c.PollInterval, DefaultPollInterval)
	c.BacklogInterval = cmp.Or(c.BacklogInterval, DefaultBacklogInterval)
	c.LagAlertBytes = cmp.Or(c.LagAlertBytes, DefaultLagAlertBytes)
	c.StallTimeout = cmp.Or(c.StallTimeout, DefaultStallTimeout)
	c.PingTimeout = cmp.Or(c.PingTimeout, DefaultPingTimeout)
	c.ReadyCache = cmp.Or(c.ReadyCache, DefaultReadyCache)
	return c
}

// SlotSample is one reading of the slot's row in pg_replication_slots.
type SlotSample struct {
	Exists         bool
	Active         bool
	ActivePID      int
	WALStatus      string
	ConfirmedFlush pglogrepl.LSN
	RestartLSN     pglogrepl.LSN
	CurrentLSN     pglogrepl.LSN
	// LagBytes is CurrentLSN - ConfirmedFlush; RetainedBytes is CurrentLSN
	// - RestartLSN (0 when the slot has no restart_lsn, e.g. once lost).
	LagBytes      int64
	RetainedBytes int64
	// SafeWALBytes is safe_wal_size; nil when unlimited
	// (max_slot_wal_keep_size = -1).
	SafeWALBytes *int64
	At           time.Time
}

// Monitor polls the slot and the backlog for the metrics and the health
// endpoints, on its own pool (at most two connections).
type Monitor struct {
	cfg  MonitorConfig
	m    *Metrics
	pool *pgxpool.Pool
	log  zerolog.Logger

	mu            sync.Mutex
	sample        *SlotSample
	pollErr       error
	lastConfirmed pglogrepl.LSN
	lastAdvance   time.Time // when confirmed_flush_lsn last moved, or the lag was 0

	readyMu  sync.Mutex
	readyAt  time.Time
	readyErr error
}

// NewMonitor validates cfg, with its defaults, and returns a monitor feeding
// m (which may be nil). It does not connect: Run and the health checks do.
func NewMonitor(cfg MonitorConfig, m *Metrics, log zerolog.Logger) (*Monitor, error) {
	cfg = cfg.WithDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	pc, err := pgxpool.ParseConfig(cfg.DatabaseURL)
	if err != nil {
		// The parse error may quote the connection string, password included.
		return nil, errors.New("parse database URL: invalid connection string")
	}
	pc.MaxConns = 2
	pc.MinConns = 0
	pc.MaxConnIdleTime = time.Minute
	pc.ConnConfig.RuntimeParams["application_name"] = "outboxd-monitor"
	if pc.ConnConfig.ConnectTimeout == 0 || pc.ConnConfig.ConnectTimeout > 5*time.Second {
		pc.ConnConfig.ConnectTimeout = 5 * time.Second
	}
	pool, err := pgxpool.NewWithConfig(context.Background(), pc)
	if err != nil {
		return nil, fmt.Errorf("open monitor pool: %w", err)
	}
	return &Monitor{cfg: cfg, m: m, pool: pool, log: log.With().Str("component", "monitor").Str("slot", cfg.Slot).Logger()}, nil
}

// Run polls the slot every PollInterval and the backlog every
// BacklogInterval until ctx ends, then closes the pool.
func (mon *Monitor) Run(ctx context.Context) error {
	defer mon.pool.Close()
	slotTick := time.NewTicker(mon.cfg.PollInterval)
	defer slotTick.Stop()
	var backlogC <-chan time.Time
	if mon.cfg.BacklogInterval > 0 {
		t := time.NewTicker(mon.cfg.BacklogInterval)
		defer t.Stop()
		backlogC = t.C
	}
	var changed <-chan struct{}
	if mon.m != nil {
		changed = mon.m.changed
	}
	mon.pollSlot(ctx)
	if backlogC != nil {
		mon.pollBacklog(ctx)
	}
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-changed:
			// Streaming started or stopped: the slot may have just been
			// created or released; do not report a stale state for a poll
			// interval.
			mon.pollSlot(ctx)
		case <-slotTick.C:
			mon.pollSlot(ctx)
		case <-backlogC:
			mon.pollBacklog(ctx)
		}
	}
}

// ReadSlot reads the slot's row; Exists is false when there is none.
func ReadSlot(ctx context.Context, q store.Querier, slot string) (SlotSample, error) {
	s := SlotSample{At: time.Now()}
	row, current, err := store.ReadSlot(ctx, q, slot)
	if err != nil {
		return s, err
	}
	s.CurrentLSN = current
	if row == nil {
		return s, nil
	}
	s.Exists, s.Active, s.ActivePID, s.WALStatus = true, row.Active, int(row.ActivePID), row.WALStatus
	s.ConfirmedFlush, s.SafeWALBytes = row.Confirmed(), row.SafeWALBytes
	if row.RestartLSN != nil {
		s.RestartLSN = *row.RestartLSN
	}
	if s.ConfirmedFlush != 0 && current > s.ConfirmedFlush {
		s.LagBytes = int64(current - s.ConfirmedFlush)
	}
	if s.RestartLSN != 0 && current > s.RestartLSN {
		s.RetainedBytes = int64(current - s.RestartLSN)
	}
	return s, nil
}

func (mon *Monitor) pollSlot(ctx context.Context) {
	qctx, cancel := context.WithTimeout(ctx, max(mon.cfg.PollInterval, 5*time.Second))
	defer cancel()
	s, err := ReadSlot(qctx, mon.pool, mon.cfg.Slot)
	if ctx.Err() != nil {
		return
	}
	mon.record(s, err)
}

// record stores a poll result, tracks how long confirmed_flush_lsn has stood
// still and updates the gauges.
func (mon *Monitor) record(s SlotSample, err error) {
	mon.mu.Lock()
	if err != nil {
		if mon.pollErr == nil {
			mon.log.Warn().Err(err).Msg("cannot read the replication slot; health reports unknown")
		}
		mon.pollErr = err
		mon.mu.Unlock()
		if mon.m != nil {
			mon.m.pollErrors.WithLabelValues("slot").Inc()
		}
		return
	}
	if mon.sample == nil || s.ConfirmedFlush != mon.lastConfirmed || s.LagBytes == 0 {
		mon.lastAdvance = s.At
	}
	mon.lastConfirmed = s.ConfirmedFlush
	mon.pollErr = nil
	mon.sample = &s
	mon.mu.Unlock()

	m := mon.m
	if m == nil {
		return
	}
	m.slotExists.Set(b2f(s.Exists))
	m.slotActive.Set(b2f(s.Active))
	m.lagBytes.Set(float64(s.LagBytes))
	m.retainedBytes.Set(float64(s.RetainedBytes))
	if s.SafeWALBytes == nil {
		m.safeWALBytes.Set(math.Inf(1))
	} else {
		m.safeWALBytes.Set(float64(*s.SafeWALBytes))
	}
}

// CountBacklog counts the pending rows of the outbox table (store's
// predicate: what a catch-up would read): a sequential scan of the table.
func CountBacklog(ctx context.Context, q store.Querier, table decode.Table) (int64, error) {
	n, err := store.On(q, table.Schema, table.Name).CountPending(ctx, store.All)
	if err != nil {
		return 0, fmt.Errorf("count unprocessed rows of %s: %w", store.Ident(table.Schema, table.Name), err)
	}
	return n, nil
}

func (mon *Monitor) pollBacklog(ctx context.Context) {
	qctx, cancel := context.WithTimeout(ctx, backlogTimeout)
	defer cancel()
	n, err := CountBacklog(qctx, mon.pool, mon.cfg.Table)
	if ctx.Err() != nil || mon.m == nil {
		return
	}
	if err != nil {
		mon.log.Warn().Err(err).Msg("backlog not counted")
		mon.m.pollErrors.WithLabelValues("backlog").Inc()
		return
	}
	mon.m.setBacklog(n)
	counts, err := store.On(mon.pool, mon.cfg.Table.Schema, mon.cfg.Table.Name).TargetCounts(qctx)
	if err != nil {
		mon.log.Warn().Err(err).Msg("parked deliveries and dead letters not counted")
		mon.m.pollErrors.WithLabelValues("targets").Inc()
		return
	}
	mon.m.setTargets(counts)
}

// Ready pings the database, reusing a result younger than ReadyCache, so
// that probes never pile up on the database.
func (mon *Monitor) Ready(ctx context.Context) error {
	mon.readyMu.Lock()
	defer mon.readyMu.Unlock()
	if !mon.readyAt.IsZero() && time.Since(mon.readyAt) < mon.cfg.ReadyCache {
		return mon.readyErr
	}
	pctx, cancel := context.WithTimeout(ctx, mon.cfg.PingTimeout)
	defer cancel()
	err := mon.pool.Ping(pctx)
	if err != nil {
		err = fmt.Errorf("database unreachable: %w", err)
	}
	mon.readyAt, mon.readyErr = time.Now(), err
	return err
}

// Health is the state of the replication slot, as /health/replication
// reports it.
type Health struct {
	// Healthy is false when an operator should look: see Reasons.
	Healthy bool     `json:"healthy"`
	Reasons []string `json:"reasons,omitempty"`

	Slot              string  `json:"slot"`
	Exists            bool    `json:"exists"`
	Active            bool    `json:"active"`
	ActivePID         int     `json:"active_pid,omitempty"`
	WALStatus         string  `json:"wal_status,omitempty"`
	ConfirmedFlushLSN string  `json:"confirmed_flush_lsn,omitempty"`
	RestartLSN        string  `json:"restart_lsn,omitempty"`
	LagBytes          int64   `json:"lag_bytes"`
	RetainedWALBytes  int64   `json:"retained_wal_bytes"`
	SafeWALBytes      *int64  `json:"safe_wal_bytes,omitempty"`
	LagAlertBytes     int64   `json:"lag_alert_bytes"`
	StalledSeconds    float64 `json:"stalled_seconds"`
	CheckedAt         string  `json:"checked_at,omitempty"`
	// Leader is whether this instance streams from the slot.
	Leader bool `json:"leader"`
}

// Replication evaluates the last poll of the slot.
func (mon *Monitor) Replication() Health {
	mon.mu.Lock()
	s, pollErr, since := mon.sample, mon.pollErr, mon.lastAdvance
	mon.mu.Unlock()
	h := Evaluate(mon.cfg, s, pollErr, time.Now(), since)
	h.Leader = mon.m.Leader()
	return h
}

// Evaluate turns a slot sample into a Health: unhealthy when the sample is
// missing or failed, the slot does not exist, its WAL is unreserved or lost,
// the lag exceeds LagAlertBytes, or confirmed_flush_lsn has not moved since
// lastAdvance for longer than StallTimeout while the lag is above zero.
func Evaluate(cfg MonitorConfig, s *SlotSample, pollErr error, now, lastAdvance time.Time) Health {
	h := Health{Slot: cfg.Slot, LagAlertBytes: cfg.LagAlertBytes, Healthy: true}
	bad := func(format string, args ...any) {
		h.Healthy = false
		h.Reasons = append(h.Reasons, fmt.Sprintf(format, args...))
	}
	if pollErr != nil {
		bad("slot state unknown: %v", pollErr)
	}
	if s == nil {
		if pollErr == nil {
			bad("slot not checked yet")
		}
		return h
	}
	h.Exists, h.Active, h.ActivePID, h.WALStatus = s.Exists, s.Active, s.ActivePID, s.WALStatus
	h.LagBytes, h.RetainedWALBytes, h.SafeWALBytes = s.LagBytes, s.RetainedBytes, s.SafeWALBytes
	h.CheckedAt = s.At.UTC().Format(time.RFC3339Nano)
	if s.ConfirmedFlush != 0 {
		h.ConfirmedFlushLSN = s.ConfirmedFlush.String()
	}
	if s.RestartLSN != 0 {
		h.RestartLSN = s.RestartLSN.String()
	}
	if !s.Exists {
		bad("slot %q does not exist: outboxd creates it at start; if it was dropped, run `outboxd slot reset --yes` or restart with OUTBOXD_SLOT_RECREATE=true", cfg.Slot)
		return h
	}
	switch s.WALStatus {
	case "lost":
		bad("slot %q was invalidated (wal_status lost): run `outboxd slot reset --yes` or restart with OUTBOXD_SLOT_RECREATE=true; unprocessed rows are caught up from the table", cfg.Slot)
	case "unreserved":
		bad("slot %q holds WAL beyond max_slot_wal_keep_size (wal_status unreserved): it will be invalidated at the next checkpoint unless it catches up", cfg.Slot)
	}
	if s.LagBytes > cfg.LagAlertBytes {
		bad("replication lag %d bytes exceeds OUTBOXD_LAG_ALERT_BYTES (%d)", s.LagBytes, cfg.LagAlertBytes)
	}
	if s.LagBytes > 0 && !lastAdvance.IsZero() {
		stalled := now.Sub(lastAdvance)
		h.StalledSeconds = stalled.Seconds()
		if stalled > cfg.StallTimeout {
			bad("slot stalled: confirmed_flush_lsn %s has not advanced for %s while the lag is %d bytes",
				s.ConfirmedFlush, stalled.Round(time.Second), s.LagBytes)
		}
	}
	return h
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}
