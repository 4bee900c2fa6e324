// Package pipeline wires the stages of outboxd's main job: the replication
// reader (cdc), the dispatcher and its sink (deliver, sink) and the checkpoint
// (checkpoint), and runs them with the shutdown order the guarantees need.
//
// Shutdown: stop reading (at a transaction boundary when that is quick), let
// the dispatcher deliver what it holds until the drain deadline, flush the
// checkpoint one last time, send the final standby status, close connections.
package pipeline

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/rs/zerolog"

	"github.com/outboxd/outboxd/cdc"
	"github.com/outboxd/outboxd/checkpoint"
	"github.com/outboxd/outboxd/decode"
	"github.com/outboxd/outboxd/deliver"
	"github.com/outboxd/outboxd/internal/telemetry"
	"github.com/outboxd/outboxd/migrations"
	"github.com/outboxd/outboxd/plan"
	"github.com/outboxd/outboxd/sink"
	"github.com/outboxd/outboxd/store"
)

// Config is everything the main job needs.
type Config struct {
	DatabaseURL  string
	Table        decode.Table
	Slot         string
	Publication  string
	SlotRecreate bool
	// SlotFailover sets failover on the slot on PostgreSQL 17 and later
	// (cdc.Config.SlotFailover).
	SlotFailover bool

	Deliver deliver.Config
	// Sink delivers the events to the default target; when nil, a webhook
	// sink is built from Webhook.
	Sink    sink.Sink
	Webhook sink.WebhookConfig
	// DefaultEvents filters the default target by event-name globs (none:
	// every event).
	DefaultEvents []string
	// DefaultGuard guards the default target: headers, rate limit, circuit
	// breaker (deliver.Guard); nil: none.
	DefaultGuard *deliver.Guard
	// DefaultFilter and DefaultMask are the default target's property
	// filter and masking (nil: none).
	DefaultFilter *deliver.Filter
	DefaultMask   *sink.Mask
	// Destinations, when set, replace the default target (Sink,
	// DefaultEvents): one target each (OUTBOXD_SINKS). A destination
	// without a Sink is the webhook built from Webhook.
	Destinations []deliver.Destination
	// Contract says what each target does with an event that breaks the
	// tracking plan (its Load and observers are set by the pipeline).
	Contract deliver.ContractConfig
	// Schedule is the retry schedule of parked deliveries; default
	// deliver.DefaultSchedule.
	Schedule []time.Duration
	// RetryInterval is how often parked deliveries are looked at; default 1s.
	RetryInterval time.Duration
	// SubscriptionDisableAfter disables a tenant subscription whose oldest
	// undelivered event has been failing for that long, with an
	// outboxd_subscription_disabled event in the outbox (0: never).
	SubscriptionDisableAfter time.Duration
	// SubscriptionSink builds the sink of a subscription of another kind
	// than webhook (posthog, ga4, kafka, nats) from its settings; nil: such
	// a subscription's deliveries are dead-lettered with the reason.
	SubscriptionSink func(sub deliver.Subscription) (sink.Sink, error)

	// FlushInterval and FlushSize trigger checkpoint flushes; defaults 200ms
	// and 1000 events.
	FlushInterval time.Duration
	FlushSize     int
	// ShutdownTimeout bounds the drain of in-flight deliveries on stop;
	// default 10s.
	ShutdownTimeout time.Duration
	// StatusInterval is the standby status period; default 1s.
	StatusInterval time.Duration
	// HeartbeatInterval enables the reader's heartbeat (cdc.Config); zero
	// disables it.
	HeartbeatInterval time.Duration
	// ReplicationTimeout declares the replication connection dead when the
	// server sends nothing for this long (cdc.Config.SilenceTimeout).
	ReplicationTimeout time.Duration

	// Observer receives counts for metrics; may be nil.
	Observer Observer
}

// Observer is told what happens, for metrics.
type Observer interface {
	Delivered(r deliver.Result)
	Flushed(b store.Batch, took time.Duration)
	Received(e *decode.Event)
	// Streaming is told true when this instance starts streaming from the
	// slot (it is the leader) and false when it stops.
	Streaming(active bool)
	// Position is told, about every status interval, the highest WAL
	// position received and the durable position confirmed to the slot.
	Position(received, flushed pglogrepl.LSN)
}

// ContractObserver is told of the tracking plan's validation, for metrics;
// an Observer that implements it is told.
type ContractObserver interface {
	// ContractChecked is told each validated event's verdict and the time
	// the validation took.
	ContractChecked(v plan.Verdict, took time.Duration)
	// ContractSettled is told each target an invalid event was settled for
	// without being sent (skip or dead-letter).
	ContractSettled(target string, policy deliver.ContractPolicy)
}

// FilterObserver is an Observer that also counts the events a property
// filter could not be evaluated on (deliver.RouterConfig.OnFilterError).
type FilterObserver interface {
	FilterError(target string)
}

// WithDefaults returns a copy of c with unset fields given their defaults.
// The first retry of a parked delivery is the schedule's first step,
// always (Deliver.FirstRetry may hold deliver's own 5s default).
func (c Config) WithDefaults() Config {
	c.Table.Schema = cmp.Or(c.Table.Schema, "public")
	c.Table.Name = cmp.Or(c.Table.Name, "domain_event")
	c.Slot = cmp.Or(c.Slot, "outboxd")
	c.Publication = cmp.Or(c.Publication, "outboxd")
	c.FlushInterval = cmp.Or(c.FlushInterval, 200*time.Millisecond)
	c.FlushSize = cmp.Or(c.FlushSize, 1000)
	c.ShutdownTimeout = cmp.Or(c.ShutdownTimeout, 10*time.Second)
	if len(c.Schedule) == 0 {
		c.Schedule = deliver.DefaultSchedule
	}
	c.Deliver = c.Deliver.WithDefaults()
	c.Deliver.FirstRetry = c.Schedule[0]
	return c
}

// Validate checks a configuration with its defaults (WithDefaults) and
// changes nothing.
func (c Config) Validate() error {
	if c.DatabaseURL == "" {
		return errors.New("database URL is empty")
	}
	if len(c.Schedule) == 0 || c.Deliver.FirstRetry != c.Schedule[0] {
		return errors.New("the first retry is not the retry schedule's first step (fill the defaults with WithDefaults)")
	}
	if err := c.Deliver.Validate(); err != nil {
		return err
	}
	if c.needsWebhook() {
		if err := c.Webhook.WithDefaults().Validate(); err != nil {
			return err
		}
	}
	return c.readerConfig().WithDefaults().Validate()
}

// needsWebhook reports whether a target's sink is the webhook built from
// Webhook.
func (c Config) needsWebhook() bool {
	if len(c.Destinations) == 0 {
		return c.Sink == nil
	}
	for _, d := range c.Destinations {
		if d.Sink == nil {
			return true
		}
	}
	return false
}

func (c *Config) readerConfig() cdc.Config {
	rc := cdc.Config{
		ConnString: c.DatabaseURL, Slot: c.Slot, Publication: c.Publication, Table: c.Table,
		SubscriptionPublication: migrations.SubscriptionPublication(c.Publication),
		SlotRecreate:            c.SlotRecreate, SlotFailover: c.SlotFailover, StatusInterval: c.StatusInterval,
		HeartbeatInterval: c.HeartbeatInterval, SilenceTimeout: c.ReplicationTimeout,
	}
	if o := c.Observer; o != nil {
		rc.OnStreaming, rc.OnPosition = o.Streaming, o.Position
	}
	return rc
}

// Run runs the main job until ctx ends (a clean stop returns nil) or a
// component fails.
func Run(ctx context.Context, cfg Config, log zerolog.Logger) error {
	cfg = cfg.WithDefaults()
	if err := cfg.Validate(); err != nil {
		return err
	}
	poolCfg, err := pgxpool.ParseConfig(cfg.DatabaseURL)
	if err != nil {
		return errors.New("parse database URL: invalid connection string")
	}
	poolCfg.MaxConns = 4
	poolCfg.ConnConfig.RuntimeParams["application_name"] = "outboxd"
	// A flush whose connection went silent mid-transaction (a black-holed
	// network path: the server hears nothing, not even a reset) leaves a
	// backend holding the row locks of the rows it was marking, and every
	// later flush waits on them until the server's TCP keepalive gives up,
	// hours later. Our own transactions are never idle for long between
	// statements: let the server end such a zombie within half a minute.
	poolCfg.ConnConfig.RuntimeParams["idle_in_transaction_session_timeout"] = "30s"
	pool, err := pgxpool.NewWithConfig(ctx, poolCfg)
	if err != nil {
		return fmt.Errorf("open database pool: %w", err)
	}
	defer pool.Close()

	if err := checkSchema(ctx, pool, cfg); err != nil {
		return err
	}
	// Every message id is made in the outbox's namespace (docs/DESIGN.md
	// §4): by the decoder and the catch-up (through Table) and the retrier.
	ns, err := migrations.Namespace(ctx, pool, cfg.Table.Schema)
	if err != nil {
		return err
	}
	cfg.Table.MessageNamespace = ns

	j, err := newJob(ctx, cfg, pool, log)
	if err != nil {
		return err
	}
	defer j.close()
	return j.run(ctx)
}

// job is one run of the main job: the components every instance runs (the
// reader, the tracker, the flusher and its store) and those only the slot
// holder runs (the router and the retrier), made when the slot is first
// taken.
type job struct {
	ctx       context.Context // the pipeline's, for the router's 410 handler
	cfg       Config
	pool      *pgxpool.Pool
	log, dlog zerolog.Logger
	sink      sink.Sink
	subClient *sink.SharedClient // every subscription's webhook sends through it
	closers   []func()

	tracker   *checkpoint.Tracker
	ledger    telemetry.Ledger // the tracker, with transaction spans when tracing is on
	slotStore *store.SlotStore
	flusher   *checkpoint.Flusher
	reader    *cdc.Reader

	router  *deliver.Router
	retrier *deliver.Retrier
	leading chan struct{} // closed when the slot is first taken
}

func newJob(ctx context.Context, cfg Config, pool *pgxpool.Pool, log zerolog.Logger) (*job, error) {
	j := &job{ctx: ctx, cfg: cfg, pool: pool, log: log, dlog: log.With().Str("component", "deliver").Logger(),
		sink: cfg.Sink, leading: make(chan struct{})}
	if cfg.needsWebhook() {
		w, err := sink.NewWebhook(cfg.Webhook, log)
		if err != nil {
			return nil, err
		}
		j.closers = append(j.closers, w.Close)
		if j.sink == nil {
			j.sink = w
		}
		// A copy: the caller's configuration is not changed.
		j.cfg.Destinations = slices.Clone(j.cfg.Destinations)
		for i, d := range j.cfg.Destinations {
			if d.Sink == nil {
				j.cfg.Destinations[i].Sink = w
			}
		}
	}
	// One keep-alive pool however many tenants there are.
	j.subClient = sink.NewSharedClient(cfg.Webhook.ForSubscription("", "", nil).HTTPConfig)
	j.closers = append(j.closers, j.subClient.Close)

	clog := log.With().Str("component", "checkpoint").Str("slot", cfg.Slot).Logger()
	j.tracker = checkpoint.NewTracker(0, cfg.FlushSize)
	j.slotStore = store.NewSlotStore(pool, store.SlotConfig{Schema: cfg.Table.Schema, Table: cfg.Table.Name, Slot: cfg.Slot})
	j.slotStore.SetLogger(clog)
	j.flusher = &checkpoint.Flusher{Tracker: j.tracker, Writer: j.slotStore, Interval: cfg.FlushInterval, Log: clog}
	if o := cfg.Observer; o != nil {
		j.flusher.OnFlush = o.Flushed
	}
	rcfg := cfg.readerConfig().WithDefaults() // checked by cfg.Validate
	rcfg.OnTake = j.take
	// The ledger makes the transactions' spans when tracing is on.
	ledger, stopSpans := telemetry.Transactions(j.tracker)
	j.ledger = ledger
	j.closers = append(j.closers, stopSpans)
	j.reader = cdc.NewReader(rcfg, ledger, j.slotStore, log)
	// Only the slot holder acts (G9): the store's writes are fenced by this
	// instance's walsender.
	j.slotStore.SetFence(j.reader.WalsenderPID)
	return j, nil
}

func (j *job) close() {
	for _, c := range slices.Backward(j.closers) {
		c()
	}
}

// take makes the slot holder's components when the slot is first taken, from
// the database as it is then, not as it was when this process started: a
// standby that waited for an hour acts on the subscriptions and parked
// deliveries of now.
func (j *job) take(takeCtx context.Context) error {
	if j.router != nil {
		// The slot again, after a cut, with nobody in between (the reader
		// stops when another instance held it): the state in memory is
		// the state of the stream we continue.
		return nil
	}
	router, err := j.newRouter(takeCtx)
	if err != nil {
		return err
	}
	j.router = router
	j.retrier = &deliver.Retrier{Store: j.slotStore, Resolver: j.flusher, Router: router,
		Schedule: j.cfg.Schedule, Interval: j.cfg.RetryInterval,
		Leader:    func() bool { return j.reader.WalsenderPID() != 0 },
		Namespace: j.cfg.Table.MessageNamespace,
		OnFailing: j.disableFailing,
		Log:       j.log.With().Str("component", "retrier").Logger()}
	close(j.leading)
	return nil
}

// stops are the phases of a stop, each a context its components run under:
// reading ends first (the caller's context, or a failure); deliveries then
// drain for at most ShutdownTimeout (or end at once when another instance
// took the slot); the flusher ends last, after the router, with a final
// flush.
type stops struct {
	read, deliver, flush                      context.Context
	stopReading, stopDelivering, stopFlushing context.CancelFunc
	release                                   func() bool
}

func newStops(ctx context.Context, drain time.Duration) *stops {
	s := &stops{}
	s.read, s.stopReading = context.WithCancel(ctx)
	s.deliver, s.stopDelivering = context.WithCancel(context.WithoutCancel(ctx))
	s.flush, s.stopFlushing = context.WithCancel(context.WithoutCancel(ctx))
	// The drain deadline starts when reading stops.
	s.release = context.AfterFunc(s.read, func() { time.AfterFunc(drain, s.stopDelivering) })
	return s
}

func (s *stops) close() {
	s.release()
	s.stopFlushing()
	s.stopDelivering()
	s.stopReading()
}

// run runs the reader and, once the slot is taken, the slot holder's
// components, until a stop; the reader's error comes first (it is the
// cause), then the first failure of the others.
func (j *job) run(ctx context.Context) error {
	st := newStops(ctx, j.cfg.ShutdownTimeout)
	defer st.close()
	var (
		mu       sync.Mutex
		firstErr error
	)
	fail := func(err error) {
		mu.Lock()
		defer mu.Unlock()
		if firstErr == nil {
			firstErr = err
		}
	}

	events := make(chan *decode.Event, 1024)
	drained := make(chan struct{})
	readerDone := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(2)
	var readerErr error
	go func() {
		defer wg.Done()
		defer close(readerDone)
		// Run returns only after the drain (the final flush included), so
		// its error is kept apart: it is the cause, and must not be hidden by
		// a failure of that final flush which it brought about.
		readerErr = j.reader.Run(st.read, events, drained)
		if errors.Is(readerErr, cdc.ErrTakenOver) || errors.Is(readerErr, cdc.ErrReset) || errors.Is(readerErr, cdc.ErrDiverged) {
			// Another instance holds the slot and acts now (G9): what this
			// one still holds is past the checkpoint and is the new holder's
			// to deliver. Stop at once instead of draining.
			st.stopDelivering()
		}
		if readerErr != nil {
			st.stopReading()
		}
	}()
	go func() {
		defer wg.Done()
		// A standby that never takes the slot starts none of the slot
		// holder's components.
		select {
		case <-j.leading:
		case <-readerDone:
			close(drained)
			return
		}
		j.lead(st, events, drained, fail)
	}()
	wg.Wait()
	if readerErr != nil {
		return readerErr
	}
	return firstErr
}

// lead runs the slot holder's components until they stop: the retrier with
// reading, the router until it drained (or the drain deadline), the flusher
// last; drained is closed after the final flush.
func (j *job) lead(st *stops, events <-chan *decode.Event, drained chan<- struct{}, fail func(error)) {
	var wg sync.WaitGroup
	wg.Add(3)
	go func() {
		defer wg.Done()
		if err := j.retrier.Run(st.read); err != nil {
			fail(fmt.Errorf("retry parked deliveries: %w", err))
		}
	}()
	go func() {
		defer wg.Done()
		defer st.stopFlushing()
		if err := j.router.Run(st.deliver, events); err != nil && !errors.Is(err, context.Canceled) {
			fail(fmt.Errorf("deliver: %w", err))
			st.stopReading()
		}
	}()
	go func() {
		defer wg.Done()
		defer close(drained)
		if err := j.flusher.Run(st.flush); err != nil {
			fail(err)
			st.stopReading()
			st.stopDelivering()
		}
	}()
	wg.Wait()
}

// newRouter builds the router with the routing state and the parked
// deliveries as they are stored now: routing resumes exactly where the
// checkpoint is (if the reader recreates the slot, the catch-up seeds the
// routing state again). The state is read with loadCtx (the session that took
// the slot).
func (j *job) newRouter(loadCtx context.Context) (*deliver.Router, error) {
	cfg := j.cfg
	// A former holder's write that passed its fence may still be running:
	// what it parks must be counted here.
	if err := j.slotStore.Barrier(loadCtx); err != nil {
		return nil, err
	}
	var routing []byte
	if cp, err := j.slotStore.Load(loadCtx); err == nil {
		routing = cp.Routing
	} else if !errors.Is(err, store.ErrNoCheckpoint) {
		return nil, err
	}
	parked, err := j.slotStore.ParkedCounts(loadCtx)
	if err != nil {
		return nil, err
	}
	deadLettered, err := j.slotStore.DeadLetterTargets(loadCtx)
	if err != nil {
		return nil, err
	}
	rc := deliver.RouterConfig{
		Deliver: cfg.Deliver, Default: j.sink, DefaultEvents: cfg.DefaultEvents, DefaultGuard: cfg.DefaultGuard, Destinations: cfg.Destinations,
		DefaultFilter: cfg.DefaultFilter, DefaultMask: cfg.DefaultMask,
		Subscription: func(sub deliver.Subscription) (sink.Sink, error) {
			if !sub.IsWebhook() {
				if cfg.SubscriptionSink == nil {
					return nil, fmt.Errorf("this outboxd delivers no subscription of kind %s", sub.Kind)
				}
				return cfg.SubscriptionSink(sub)
			}
			// The subscriptions' own address guard, never the default
			// webhook's (G8): a URL it refuses is never connected to, and
			// the deliveries are dead-lettered with the guard's reason,
			// however the subscription was added or changed.
			wc := cfg.Webhook.ForSubscription(sub.TargetName(), sub.URL, sub.Secrets)
			wc.Client = j.subClient
			return sink.NewWebhook(wc, j.log) // it validates wc
		},
		// Twice the connections: a call waiting out a retry's backoff holds
		// none, so a host takes that many calls before they queue in
		// outboxd rather than as goroutines waiting for a connection.
		SubscriptionCallsPerHost: 2 * cfg.Webhook.SubscriptionMaxConnsPerHost,
		Routing:                  routing, Parked: parked, DeadLettered: deadLettered,
		Secrets: func(ids []int64) (map[int64]deliver.Stored, error) {
			return j.slotStore.SubscriptionSecrets(loadCtx, ids)
		},
		OnGone:   j.disableGone,
		Contract: cfg.Contract,
	}
	rc.Contract.Load = func() ([]byte, string, bool, error) {
		return plan.Stored(loadCtx, j.pool, cfg.Table.Schema)
	}
	if o := cfg.Observer; o != nil {
		rc.OnResult, rc.OnEvent = o.Delivered, o.Received
		if co, ok := o.(ContractObserver); ok {
			rc.Contract.OnCheck, rc.Contract.OnSettled = co.ContractChecked, co.ContractSettled
		}
		if fo, ok := o.(FilterObserver); ok {
			rc.OnFilterError = fo.FilterError
		}
	}
	return deliver.NewRouter(rc, j.ledger, j.dlog)
}

// disableGone disables a subscription whose endpoint answered 410 Gone. The
// change reaches the router through the stream, in commit order; until then
// its deliveries are parked, so nothing is lost, and an operator re-enables it
// with `outboxd subscription enable`.
func (j *job) disableGone(target string) {
	raw, ok := strings.CutPrefix(target, "subscription:")
	id, err := strconv.ParseInt(raw, 10, 64)
	if !ok || err != nil {
		j.dlog.Error().Str("target", target).Msg("the destination answered 410 Gone; its events are parked and retried on the schedule")
		return
	}
	// Called from a dispatcher: bounded, so a stuck database cannot hold the
	// dispatcher's loop.
	uctx, cancel := context.WithTimeout(context.WithoutCancel(j.ctx), 10*time.Second)
	defer cancel()
	disabled, err := store.On(j.pool, j.cfg.Table.Schema, j.cfg.Table.Name).DisableGone(uctx, id)
	if err != nil {
		j.dlog.Error().Err(err).Str("target", target).Msg("disable subscription after 410 Gone")
		return
	}
	if disabled {
		j.dlog.Warn().Str("target", target).Msg("subscription disabled: its endpoint answered 410 Gone; its events are parked until it is re-enabled")
	}
}

// disableFailing disables a subscription target whose oldest undelivered
// event has been failing for SubscriptionDisableAfter (store.DisableFailing).
// The router learns it from the stream, in commit order, like any change.
func (j *job) disableFailing(ctx context.Context, target string, status int) {
	if j.cfg.SubscriptionDisableAfter <= 0 {
		return
	}
	raw, ok := strings.CutPrefix(target, "subscription:")
	id, err := strconv.ParseInt(raw, 10, 64)
	if !ok || err != nil {
		return // the process's own destinations are never disabled
	}
	uctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	defer cancel()
	d, err := store.On(j.pool, j.cfg.Table.Schema, j.cfg.Table.Name).DisableFailing(uctx, target, id, j.cfg.SubscriptionDisableAfter, status)
	switch {
	case err != nil:
		j.dlog.Error().Err(err).Str("target", target).Msg("disable failing subscription")
	case !d.Disabled:
	case d.EventErr != nil:
		j.dlog.Warn().Str("target", target).Time("failing_since", d.FailingSince).AnErr("event_error", d.EventErr).
			Msg("subscription disabled: failing for longer than OUTBOXD_SUBSCRIPTION_DISABLE_AFTER; its events are parked until it is re-enabled; the " + store.SubscriptionDisabledEvent + " event could not be inserted")
	default:
		j.dlog.Warn().Str("target", target).Time("failing_since", d.FailingSince).Int64("event_id", d.EventID).
			Msg("subscription disabled: failing for longer than OUTBOXD_SUBSCRIPTION_DISABLE_AFTER; its events are parked until it is re-enabled; " + store.SubscriptionDisabledEvent + " inserted")
	}
}

// checkSchema verifies the migrations ran, with a message that says what to do.
func checkSchema(ctx context.Context, pool *pgxpool.Pool, cfg Config) error {
	return pool.AcquireFunc(ctx, func(c *pgxpool.Conn) error {
		return checkConn(ctx, c.Conn(), cfg)
	})
}

func checkConn(ctx context.Context, conn *pgx.Conn, cfg Config) error {
	err := migrations.Check(ctx, conn, migrations.Options{Schema: cfg.Table.Schema, Table: cfg.Table.Name, Publication: cfg.Publication})
	if err != nil {
		return fmt.Errorf("check schema: %w", err)
	}
	return nil
}
