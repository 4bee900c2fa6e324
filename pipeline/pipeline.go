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
	"github.com/outboxd/outboxd/migrations"
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

	Deliver deliver.Config
	// Sink delivers the events to the default target; when nil, a webhook
	// sink is built from Webhook.
	Sink    sink.Sink
	Webhook sink.WebhookConfig
	// DefaultEvents filters the default target by event-name globs (none:
	// every event).
	DefaultEvents []string
	// Schedule is the retry schedule of parked deliveries; default
	// deliver.DefaultSchedule.
	Schedule []time.Duration
	// RetryInterval is how often parked deliveries are looked at; default 1s.
	RetryInterval time.Duration

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
	if c.Sink == nil {
		if err := c.Webhook.WithDefaults().Validate(); err != nil {
			return err
		}
	}
	return c.readerConfig().WithDefaults().Validate()
}

func (c *Config) readerConfig() cdc.Config {
	rc := cdc.Config{
		ConnString: c.DatabaseURL, Slot: c.Slot, Publication: c.Publication, Table: c.Table,
		SubscriptionPublication: migrations.SubscriptionPublication(c.Publication),
		SlotRecreate:            c.SlotRecreate, StatusInterval: c.StatusInterval,
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

	s := cfg.Sink
	if s == nil {
		w, err := sink.NewWebhook(cfg.Webhook, log)
		if err != nil {
			return err
		}
		defer w.Close()
		s = w
	}

	tracker := checkpoint.NewTracker(0, cfg.FlushSize)
	// Every subscription's webhook sends through one client: one keep-alive
	// pool however many tenants there are.
	subClient := sink.NewSharedClient(cfg.Webhook.ForSubscription("", "", nil).HTTPConfig)
	defer subClient.Close()
	slotStore := store.NewSlotStore(pool, store.SlotConfig{Schema: cfg.Table.Schema, Table: cfg.Table.Name, Slot: cfg.Slot})
	slotStore.SetLogger(log.With().Str("component", "checkpoint").Str("slot", cfg.Slot).Logger())
	rcfg := cfg.readerConfig().WithDefaults() // checked by cfg.Validate
	var reader *cdc.Reader
	flusher := &checkpoint.Flusher{Tracker: tracker, Writer: slotStore, Interval: cfg.FlushInterval,
		Log: log.With().Str("component", "checkpoint").Str("slot", cfg.Slot).Logger()}
	var onResult func(deliver.Result)
	if o := cfg.Observer; o != nil {
		onResult = o.Delivered
		flusher.OnFlush = o.Flushed
	}
	// Only the slot holder acts (G9): the store's writes are fenced by this
	// instance's walsender, and the router (with the routing state and the
	// parked deliveries), the retrier and the flusher are made when the slot
	// is taken, from the database as it is then, not as it was when this
	// process started: a standby that waited for an hour acts on the
	// subscriptions and parked deliveries of now.
	dlog := log.With().Str("component", "deliver").Logger()
	var (
		router  *deliver.Router
		retrier *deliver.Retrier
		leading = make(chan struct{}) // closed when the slot is first taken
	)
	rcfg.OnTake = func(takeCtx context.Context) error {
		if router != nil {
			// The slot again, after a cut, with nobody in between (the reader
			// stops when another instance held it): the state in memory is
			// the state of the stream we continue.
			return nil
		}
		var err error
		router, err = newRouter(ctx, takeCtx, cfg, slotStore, s, subClient, tracker, onResult, pool, log, dlog)
		if err != nil {
			return err
		}
		retrier = &deliver.Retrier{Store: slotStore, Resolver: flusher, Router: router, Schedule: cfg.Schedule, Interval: cfg.RetryInterval,
			Leader:    func() bool { return reader.WalsenderPID() != 0 },
			Namespace: cfg.Table.MessageNamespace,
			Log:       log.With().Str("component", "retrier").Logger()}
		close(leading)
		return nil
	}
	reader = cdc.NewReader(rcfg, tracker, slotStore, log)
	slotStore.SetFence(reader.WalsenderPID)

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
	readCtx, stopReading := context.WithCancel(ctx)
	defer stopReading()
	deliverCtx, stopDelivering := context.WithCancel(context.WithoutCancel(ctx))
	defer stopDelivering()
	flushCtx, stopFlushing := context.WithCancel(context.WithoutCancel(ctx))
	defer stopFlushing()
	// The drain deadline starts when reading stops.
	stopDrain := context.AfterFunc(readCtx, func() {
		time.AfterFunc(cfg.ShutdownTimeout, stopDelivering)
	})
	defer stopDrain()

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
		readerErr = reader.Run(readCtx, events, drained)
		if errors.Is(readerErr, cdc.ErrTakenOver) || errors.Is(readerErr, cdc.ErrReset) {
			// Another instance holds the slot and acts now (G9): what this
			// one still holds is past the checkpoint and is the new holder's
			// to deliver. Stop at once instead of draining.
			stopDelivering()
		}
		if readerErr != nil {
			stopReading()
		}
	}()
	// The slot holder's components start when the slot is first taken; a
	// standby that never takes it starts none of them.
	go func() {
		defer wg.Done()
		select {
		case <-leading:
		case <-readerDone:
			close(drained)
			return
		}
		var lwg sync.WaitGroup
		lwg.Add(3)
		go func() {
			defer lwg.Done()
			if err := retrier.Run(readCtx); err != nil {
				fail(fmt.Errorf("retry parked deliveries: %w", err))
			}
		}()
		go func() {
			defer lwg.Done()
			defer stopFlushing()
			if err := router.Run(deliverCtx, events); err != nil && !errors.Is(err, context.Canceled) {
				fail(fmt.Errorf("deliver: %w", err))
				stopReading()
			}
		}()
		go func() {
			defer lwg.Done()
			defer close(drained)
			if err := flusher.Run(flushCtx); err != nil {
				fail(err)
				stopReading()
				stopDelivering()
			}
		}()
		lwg.Wait()
	}()
	wg.Wait()
	if readerErr != nil {
		return readerErr
	}
	return firstErr
}

// newRouter builds the router with the routing state and the parked
// deliveries as they are stored now: routing resumes exactly where the
// checkpoint is (if the reader recreates the slot, the catch-up seeds the
// routing state again).
//
// The state is read with loadCtx (the session that took the slot); the
// router lives as long as ctx (the pipeline), which its 410 handler uses.
func newRouter(ctx, loadCtx context.Context, cfg Config, slotStore *store.SlotStore, s sink.Sink, subClient *sink.SharedClient, tracker *checkpoint.Tracker,
	onResult func(deliver.Result), pool *pgxpool.Pool, log, dlog zerolog.Logger) (*deliver.Router, error) {
	var routing []byte
	if cp, err := slotStore.Load(loadCtx); err == nil {
		routing = cp.Routing
	} else if !errors.Is(err, store.ErrNoCheckpoint) {
		return nil, err
	}
	parked, err := slotStore.ParkedCounts(loadCtx)
	if err != nil {
		return nil, err
	}
	var onEvent func(*decode.Event)
	if o := cfg.Observer; o != nil {
		onEvent = o.Received
	}
	return deliver.NewRouter(deliver.RouterConfig{
		Deliver: cfg.Deliver, Default: s, DefaultEvents: cfg.DefaultEvents, OnEvent: onEvent,
		Subscription: func(sub deliver.Subscription) (sink.Sink, error) {
			// The subscriptions' own address guard, never the default
			// webhook's (G8): a URL it refuses is never connected to, and
			// the deliveries are dead-lettered with the guard's reason,
			// however the subscription was added or changed.
			wc := cfg.Webhook.ForSubscription(sub.TargetName(), sub.URL, sub.Secrets)
			wc.Client = subClient
			if err := wc.Validate(); err != nil {
				return nil, err
			}
			return sink.NewWebhook(wc, log)
		},
		Routing: routing, Parked: parked, OnResult: onResult,
		Secrets: func(ids []int64) (map[int64]deliver.Stored, error) {
			return slotStore.SubscriptionSecrets(loadCtx, ids)
		},
		OnGone: func(target string) { disableGone(ctx, pool, cfg, target, dlog) },
	}, tracker, dlog)
}

// disableGone disables a subscription whose endpoint answered 410 Gone. The
// change reaches the router through the stream, in commit order; until then
// its deliveries are parked, so nothing is lost, and an operator re-enables it
// with `outboxd subscription enable`.
func disableGone(ctx context.Context, pool *pgxpool.Pool, cfg Config, target string, log zerolog.Logger) {
	id, ok := strings.CutPrefix(target, "subscription:")
	if !ok {
		log.Error().Str("target", target).Msg("the default webhook answered 410 Gone; its events are parked and retried on the schedule")
		return
	}
	table := pgx.Identifier{cfg.Table.Schema, cdc.SubscriptionTable}.Sanitize()
	// Called from a dispatcher: bounded, so a stuck database cannot hold the
	// dispatcher's loop.
	uctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	defer cancel()
	tag, err := pool.Exec(uctx, `UPDATE `+table+` SET enabled = false,
  disabled_reason = '410 Gone at ' || now()::text, updated_at = now() WHERE id = $1 AND enabled`, id)
	if err != nil {
		log.Error().Err(err).Str("target", target).Msg("disable subscription after 410 Gone")
		return
	}
	if tag.RowsAffected() > 0 {
		log.Warn().Str("target", target).Msg("subscription disabled: its endpoint answered 410 Gone; its events are parked until it is re-enabled")
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
