package cdc

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"regexp"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"
	"github.com/rs/zerolog"

	"github.com/outboxd/outboxd/checkpoint"
	"github.com/outboxd/outboxd/decode"
	"github.com/outboxd/outboxd/internal/backoff"
	"github.com/outboxd/outboxd/store"
)

// Ledger is the part of the checkpoint tracker the reader drives.
type Ledger interface {
	Open(commitLSN pglogrepl.LSN, catchup bool) uint64
	Close(seq uint64, endLSN pglogrepl.LSN, events int) error
	AdvanceIdle(lsn pglogrepl.LSN) bool
	SetFlushed(lsn pglogrepl.LSN)
	Flushed() pglogrepl.LSN
	InFlight() int
}

// CheckpointStore loads and saves the durable checkpoint.
type CheckpointStore interface {
	Load(ctx context.Context) (checkpoint.Checkpoint, error)
	Save(ctx context.Context, cp checkpoint.Checkpoint) error
}

// Config configures a Reader.
type Config struct {
	// ConnString is the libpq URL or key/value string of the database.
	ConnString  string
	Slot        string
	Publication string
	// SubscriptionPublication, when set, is read too: it publishes the
	// subscription table, whose changes are handed downstream in commit order.
	SubscriptionPublication string
	Table                   decode.Table
	// SlotRecreate allows recreating a lost or dropped slot (with a catch-up
	// from the table) when a checkpoint says one existed before.
	SlotRecreate bool
	// StatusInterval is how often standby status is sent; default 1s. It must
	// be well below the server's wal_sender_timeout.
	StatusInterval time.Duration
	// SilenceTimeout declares the connection dead when the server sends
	// nothing for this long although replies were requested; default 10s.
	SilenceTimeout time.Duration
	// IdleAdvanceBytes and IdleAdvanceInterval throttle idle advances: a
	// keepalive's WAL end is recorded (one checkpoint write) and then
	// confirmed when it is at least IdleAdvanceBytes ahead of the durable
	// position, when IdleAdvanceInterval passed since the last idle advance,
	// or when the server asks for a reply. Without a throttle an idle
	// outboxd would write the checkpoint at every keepalive, each write
	// making the WAL end move again. Defaults 1 MiB and 10s.
	IdleAdvanceBytes    uint64
	IdleAdvanceInterval time.Duration
	// ReconnectMin and ReconnectMax bound the jittered reconnect backoff;
	// defaults 100ms and 10s.
	ReconnectMin, ReconnectMax time.Duration
	// CatchupFetch is the number of rows fetched per round trip during
	// catch-up; default 1000.
	CatchupFetch int
	// HeartbeatInterval, when positive, emits a logical decoding message
	// (pg_logical_emit_message, not transactional, prefix outboxd_heartbeat)
	// on a regular connection whenever the stream has carried no data for
	// that long, so that the slot has something of its own database to decode
	// and confirm even when the outbox is idle (G7). It needs PostgreSQL 14 or
	// later (pgoutput's messages option); on older servers it is off, with a
	// warning. Zero disables it.
	HeartbeatInterval time.Duration
	// OnStreaming, when set, is called with true when streaming from the slot
	// starts (this process holds the slot) and with false when that session
	// ends. A standby waiting for the slot never gets true.
	OnStreaming func(active bool)
	// OnPosition, when set, is called after each standby status update with
	// the highest WAL position received and the durable position confirmed.
	OnPosition func(received, flushed pglogrepl.LSN)
	// OnTake, when set, is called each time this instance has taken the slot
	// (START_REPLICATION succeeded), before the session hands anything
	// downstream: the place to load what the slot holder acts on (routing
	// state, parked deliveries) as of now, not as of the process start. A
	// lost connection (ConnectionLost) is retried with the session; any
	// other error stops the reader. It is called again after such a retry,
	// so it must not keep half-done work.
	OnTake func(ctx context.Context) error
}

// HeartbeatPrefix is the prefix of the logical decoding messages the
// heartbeat emits.
const HeartbeatPrefix = "outboxd_heartbeat"

var slotNameRE = regexp.MustCompile(`^[a-z0-9_]{1,63}$`)

// Validate fills defaults and checks the configuration.
func (c *Config) Validate() error {
	if c.ConnString == "" {
		return errors.New("database URL is empty")
	}
	if !slotNameRE.MatchString(c.Slot) {
		return fmt.Errorf("slot name %q must be 1-63 characters of a-z, 0-9 and _", c.Slot)
	}
	if c.Publication == "" {
		return errors.New("publication name is empty")
	}
	if c.StatusInterval == 0 {
		c.StatusInterval = time.Second
	}
	if c.SilenceTimeout == 0 {
		c.SilenceTimeout = 10 * time.Second
	}
	if c.SilenceTimeout < 2*c.StatusInterval {
		return fmt.Errorf("silence timeout %s must be at least twice the status interval %s", c.SilenceTimeout, c.StatusInterval)
	}
	if c.IdleAdvanceBytes == 0 {
		c.IdleAdvanceBytes = 1 << 20
	}
	if c.IdleAdvanceInterval == 0 {
		c.IdleAdvanceInterval = 10 * time.Second
	}
	if c.ReconnectMin == 0 {
		c.ReconnectMin = 100 * time.Millisecond
	}
	if c.ReconnectMax == 0 {
		c.ReconnectMax = 10 * time.Second
	}
	if c.CatchupFetch == 0 {
		c.CatchupFetch = 1000
	}
	if c.HeartbeatInterval < 0 {
		return fmt.Errorf("heartbeat interval %s is negative", c.HeartbeatInterval)
	}
	return nil
}

// ConnectionLost reports whether err says a database connection broke or
// could not be kept (reset, closed mid-answer, the server shutting down or
// starting up): a transient failure, retried wherever it happens. A
// connection never made (nothing listening, no route, unknown host) is not
// one of them: a *pgconn.ConnectError counts only when something accepted
// the connection and then dropped it (a pooler or proxy in front of a
// Postgres that is down).
func ConnectionLost(err error) bool {
	if err == nil {
		return false
	}
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		switch pgErr.Code {
		case "57P01", "57P02", "57P03": // admin_shutdown, crash_shutdown, cannot_connect_now
			return true
		}
		return strings.HasPrefix(pgErr.Code, "08") // connection_exception
	}
	dropped := errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, syscall.ECONNRESET)
	var connErr *pgconn.ConnectError
	if errors.As(err, &connErr) {
		return dropped
	}
	var netErr net.Error
	return dropped || errors.As(err, &netErr)
}

// ErrReset ends a session whose slot and checkpoint an operator removed
// (`outboxd slot reset --force` does so when it terminates a running
// instance): what this instance holds belongs to a stream that is over. The
// caller drops it and starts again as on a first start: slot creation and a
// catch-up of every unprocessed row from the table.
var ErrReset = errors.New("slot reset by an operator")

// ErrTakenOver ends a session whose slot another instance took while this one
// was disconnected: the other acts now (G9). What this instance still holds
// is past the checkpoint, so the new holder delivers it; the caller drops it
// and starts again as a standby.
var ErrTakenOver = errors.New("slot taken over by another instance")

// ErrIrreconcilable marks start-up states that need an operator: the slot and
// the checkpoint disagree in a way that could lose or re-send events.
var ErrIrreconcilable = errors.New("slot and checkpoint cannot be reconciled")

// Reader streams outbox events from the replication slot.
type Reader struct {
	cfg    Config
	ledger Ledger
	store  CheckpointStore
	log    zerolog.Logger

	// State that survives reconnects.
	resume   pglogrepl.LSN // end of the last fully received transaction (or the start point)
	received pglogrepl.LSN // highest WAL position received
	open     *openTxn      // a transaction cut by a disconnect
	started  bool          // the slot was prepared once
	copying  bool          // the connection is in copy-both mode (streaming)
	sysID    string
	timeline int32
	// rels identifies the outbox and subscription tables in the stream by
	// relation OID, looked up at the start of each session.
	rels tableOIDs
	// pid is the process id of this instance's walsender while it holds the
	// slot (0 otherwise), the fence of the checkpoint store's writes; lastPID
	// is that of the last one, to tell our own lingering walsender from
	// another instance's after a cut.
	pid     atomic.Uint32
	lastPID uint32
}

// WalsenderPID returns the process id of the walsender streaming the slot
// for this instance, or 0 when this instance does not hold the slot (not yet,
// between sessions, or after Run returned).
func (r *Reader) WalsenderPID() uint32 { return r.pid.Load() }

type openTxn struct {
	seq      uint64
	finalLSN pglogrepl.LSN
	events   int  // events dispatched so far
	rows     int  // outbox rows handled so far (dispatched or skipped), over all sessions
	skip     bool // the whole transaction is before the start point
}

// NewReader returns a reader; cfg must have been validated.
func NewReader(cfg Config, ledger Ledger, store CheckpointStore, log zerolog.Logger) *Reader {
	return &Reader{cfg: cfg, ledger: ledger, store: store, log: log.With().Str("component", "cdc").Str("slot", cfg.Slot).Logger()}
}

// SubscriptionTable is the table of webhook subscriptions, in the outbox
// table's schema.
const SubscriptionTable = store.SubscriptionTable

// SlotLockKey is the key (for hashtext) of the advisory lock held while a
// slot is prepared and started, by the daemon and by the slot commands.
func SlotLockKey(slot string) string { return "outboxd slot " + slot }

// ErrSlotLost is returned by Run when the slot disappeared or was
// invalidated while streaming and OUTBOXD_SLOT_RECREATE allows recreating it:
// the caller drains what it holds and runs the pipeline again, which
// recreates the slot and catches up from the table.
var ErrSlotLost = errors.New("slot lost while streaming")

// ErrCatchupInterrupted is returned by Run when the connection broke during
// the catch-up of a slot created in this process: like ErrSlotLost, the
// caller drains what it holds and runs the pipeline again, which recreates
// the slot (the checkpoint's catch-up is still pending) and catches up.
var ErrCatchupInterrupted = errors.New("catch-up interrupted")

func (r *Reader) slotLost(what string) error {
	if r.cfg.SlotRecreate {
		return fmt.Errorf("%w: slot %q %s", ErrSlotLost, r.cfg.Slot, what)
	}
	return fmt.Errorf("%w: slot %q %s while streaming; restart outboxd with OUTBOXD_SLOT_RECREATE=true or run `outboxd slot reset --yes`", errFatal, r.cfg.Slot, what)
}

// errFatal marks errors a reconnect cannot fix.
var errFatal = errors.New("fatal")

// errRetry marks start-up conditions worth waiting out (the slot is active in
// another process: a standby waits for the active instance to go away).
type errRetry struct{ msg string }

func (e errRetry) Error() string { return e.msg }

// Run streams events into out until ctx ends or an error needs an operator.
// Connection failures are retried with capped, jittered backoff. When ctx
// ends, Run stops reading (finishing the transaction in progress if that takes
// less than a few seconds), closes out, keeps the connection alive with status
// updates until drained is closed (the pipeline has delivered and flushed what
// it had), then sends a final status update with the durable position.
func (r *Reader) Run(ctx context.Context, out chan<- *decode.Event, drained <-chan struct{}) error {
	var conn *pgconn.PgConn
	err := r.loop(ctx, out, &conn)
	close(out)
	if conn != nil && !conn.IsClosed() && r.copying {
		r.finish(conn, drained)
	}
	r.pid.Store(0)
	if conn != nil {
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		conn.Close(cctx) //nolint:errcheck // closing; the error changes nothing
		cancel()
	}
	return err
}

func (r *Reader) loop(ctx context.Context, out chan<- *decode.Event, connp **pgconn.PgConn) error {
	reconnect := backoff.New(r.cfg.ReconnectMin, r.cfg.ReconnectMax)
	for {
		healthy, err := r.session(ctx, out, connp)
		if ctx.Err() != nil {
			return nil
		}
		if errors.Is(err, ErrIrreconcilable) || errors.Is(err, errFatal) || errors.Is(err, ErrSlotLost) || errors.Is(err, ErrCatchupInterrupted) || errors.Is(err, ErrTakenOver) || errors.Is(err, ErrReset) {
			return err
		}
		if *connp != nil {
			(*connp).Close(context.Background()) //nolint:errcheck // the connection is broken anyway
			*connp = nil
		}
		if healthy {
			reconnect.Reset()
		}
		wait := reconnect.Next()
		var retry errRetry
		if errors.As(err, &retry) {
			// A standby polls the slot at a steady pace, so it takes over
			// within about a second of the active instance going away.
			wait = standbyPoll/2 + rand.N(standbyPoll/2+1)
			r.log.Info().Str("reason", retry.msg).Dur("retry_in", wait).Msg("waiting for the slot")
		} else {
			r.log.Warn().Err(err).Dur("retry_in", wait).Msg("replication stream interrupted; reconnecting")
		}
		if backoff.Sleep(ctx, wait) != nil {
			return nil
		}
	}
}

// finish keeps the stopped connection alive until the pipeline has drained,
// then reports the final durable position.
func (r *Reader) finish(conn *pgconn.PgConn, drained <-chan struct{}) {
	tick := time.NewTicker(r.cfg.StatusInterval)
	defer tick.Stop()
	limit := time.NewTimer(5 * time.Minute)
	defer limit.Stop()
	for {
		select {
		case <-drained:
			if err := r.sendStatus(conn, false); err != nil {
				r.log.Warn().Err(err).Msg("final standby status not sent")
				return
			}
			r.log.Info().Stringer("flush_lsn", r.ledger.Flushed()).Msg("final standby status sent")
			r.endStream(conn)
			return
		case <-tick.C:
			if err := r.sendStatus(conn, false); err != nil {
				return
			}
		case <-limit.C:
			return
		}
	}
}

// endStream ends copy-both mode and reads what the server still sends until
// it is ready for a query. Closing a socket with unread data in it makes the
// kernel reset the connection, and the walsender could then lose the final
// status update it has not read yet.
func (r *Reader) endStream(conn *pgconn.PgConn) {
	conn.Frontend().Send(&pgproto3.CopyDone{})
	if err := conn.Frontend().Flush(); err != nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	for {
		msg, err := conn.ReceiveMessage(ctx)
		if err != nil {
			return
		}
		switch msg.(type) {
		case *pgproto3.ReadyForQuery, *pgproto3.ErrorResponse:
			return
		}
	}
}

// session connects, prepares the slot on first use, and streams until an
// error or ctx ends. healthy reports whether streaming got going, which resets
// the reconnect backoff.
func (r *Reader) session(ctx context.Context, out chan<- *decode.Event, connp **pgconn.PgConn) (healthy bool, err error) {
	r.copying = false
	r.pid.Store(0) // the previous session's walsender, if any, is gone or going
	conn, err := r.connect(ctx, true)
	if err != nil {
		return false, err
	}
	*connp = conn

	sys, err := pglogrepl.IdentifySystem(ctx, conn)
	if err != nil {
		return false, fmt.Errorf("identify system: %w", err)
	}
	// Instances sharing the slot prepare and start it one at a time, until
	// the slot is active: without this, a standby could see a slot another
	// instance has just created, or whose catch-up is about to start, and
	// recreate it under it.
	lock, err := r.connect(ctx, false)
	if err != nil {
		return false, err
	}
	unlock := func() {
		if lock != nil {
			lock.Close(context.WithoutCancel(ctx)) //nolint:errcheck // closing releases the lock
			lock = nil
		}
	}
	defer unlock()
	if _, err := lock.Exec(ctx, "SELECT pg_advisory_lock(hashtext('"+SlotLockKey(r.cfg.Slot)+"'))").ReadAll(); err != nil {
		return false, fmt.Errorf("lock slot %q: %w", r.cfg.Slot, err)
	}

	if r.rels, err = lookupTables(ctx, lock, r.cfg); err != nil {
		return false, err
	}

	var snap *snapshot
	if !r.started {
		start, s, err := r.prepare(ctx, conn, sys)
		if err != nil {
			return false, err
		}
		r.ledger.SetFlushed(start)
		r.resume, r.received, snap = start, start, s
		// A slot created now is prepared for good only once its catch-up
		// from the exported snapshot is done: a session that breaks before
		// that (a cut at START_REPLICATION, say) leaves the checkpoint's
		// catch-up pending, and the next session prepares again, which
		// recreates the slot and catches up from a new snapshot. Marking it
		// prepared at once would stream without ever reading the rows
		// committed before the slot.
		r.started = snap == nil
	} else {
		if sys.SystemID != r.sysID {
			return false, fmt.Errorf("%w: reconnected to cluster %s, streaming started on cluster %s", ErrIrreconcilable, sys.SystemID, r.sysID)
		}
		slot, err := querySlot(ctx, conn, r.cfg.Slot)
		if err != nil {
			return false, err
		}
		switch {
		case slot == nil:
			switch _, err := r.store.Load(ctx); {
			case errors.Is(err, checkpoint.ErrNoCheckpoint):
				// Slot and checkpoint both gone: `outboxd slot reset
				// --force` terminated us and left a first start behind.
				return false, fmt.Errorf("%w: slot %q and its checkpoint were removed (outboxd slot reset --force)", ErrReset, r.cfg.Slot)
			case err != nil:
				// Which of the two it is cannot be told yet: a
				// connection lost here is retried like any other.
				return false, fmt.Errorf("slot %q is missing; read its checkpoint: %w", r.cfg.Slot, err)
			}
			return false, r.slotLost("disappeared")
		case slot.walStatus == "lost":
			return false, r.slotLost("was invalidated (wal_status lost)")
		case slot.active && uint32(slot.activePID) == r.lastPID:
			// Our own walsender of before the cut, not yet gone.
			return false, errRetry{fmt.Sprintf("slot %q is still active in this instance's previous walsender %d", r.cfg.Slot, slot.activePID)}
		case slot.active:
			// Another instance took the slot while we were cut off: it acts
			// now (G9). Stop, rather than wait as a standby with the routing
			// state and deliveries of a leadership that is over.
			return false, fmt.Errorf("%w: slot %q was taken over by process %d while this instance was disconnected",
				ErrTakenOver, r.cfg.Slot, slot.activePID)
		case slot.confirmedFlush > r.ledger.Flushed():
			// We never confirm beyond our durable position: someone reset or
			// advanced the slot while we were away.
			return false, fmt.Errorf("%w: slot %q confirms %s, beyond this instance's checkpoint %s: it was reset or advanced by someone else; restart outboxd",
				errFatal, r.cfg.Slot, slot.confirmedFlush, r.ledger.Flushed())
		}
	}

	// A regular connection that only waits: when the server terminates it
	// (fast shutdown terminates backends before it stops walsenders), drop the
	// replication connection too, so that Postgres can stop promptly instead of
	// waiting for us to confirm events still in flight.
	sctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	if sentinel, err := r.connect(ctx, false); err == nil {
		watched := make(chan struct{})
		defer func() {
			// Stop the watcher before closing its connection: the two must
			// not use the connection at once.
			cancel(nil)
			<-watched
			sentinel.Close(context.Background()) //nolint:errcheck // best effort
		}()
		go func() {
			defer close(watched)
			err := sentinel.WaitForNotification(sctx)
			if sctx.Err() == nil {
				cancel(fmt.Errorf("server connection lost: %w", err))
			}
		}()
	} else {
		r.log.Debug().Err(err).Msg("no sentinel connection")
	}

	if snap != nil {
		// The snapshot must be imported before the next command on the
		// replication connection invalidates it.
		if err := snap.begin(sctx); err != nil {
			snap.close()
			// Retried: the next session recreates the slot (see above).
			return false, err
		}
		defer snap.close()
	}

	pluginArgs := []string{"proto_version '1'", "publication_names " + publicationNames(r.cfg.Publication, r.cfg.SubscriptionPublication)}
	heartbeat := r.heartbeatOn(conn)
	if heartbeat {
		pluginArgs = append(pluginArgs, "messages 'true'")
	}
	err = pglogrepl.StartReplication(sctx, conn, r.cfg.Slot, r.resume, pglogrepl.StartReplicationOptions{
		PluginArgs: pluginArgs,
	})
	if err != nil {
		return false, fmt.Errorf("start replication on slot %q at %s: %w", r.cfg.Slot, r.resume, err)
	}
	unlock() // the slot is active now: others see it in use
	r.copying = true
	r.lastPID = conn.PID()
	r.pid.Store(conn.PID())
	if r.cfg.OnTake != nil {
		if err := r.cfg.OnTake(sctx); err != nil {
			if sctx.Err() != nil || ConnectionLost(err) {
				// The session's connections went while loading (Postgres
				// restarting, a cut): reconnect and take the slot again.
				return false, fmt.Errorf("take the slot: %w", err)
			}
			return true, fmt.Errorf("%w: take the slot: %w", errFatal, err)
		}
	}
	r.log.Info().Stringer("start_lsn", r.resume).Stringer("flush_lsn", r.ledger.Flushed()).Msg("streaming")
	if r.cfg.OnStreaming != nil {
		r.cfg.OnStreaming(true)
		defer r.cfg.OnStreaming(false)
	}

	st := &stream{r: r, conn: conn, out: out, stop: ctx, nextStatus: time.Now()}
	st.lastData.Store(time.Now().UnixNano())
	if heartbeat {
		hctx, stopHeartbeat := context.WithCancel(sctx)
		done := make(chan struct{})
		go func() {
			defer close(done)
			r.heartbeat(hctx, &st.lastData)
		}()
		defer func() {
			stopHeartbeat()
			<-done
		}()
	}
	if snap != nil {
		if err := r.catchup(sctx, st, snap); err != nil {
			if ctx.Err() != nil {
				return true, nil
			}
			var pgErr *pgconn.PgError
			if errors.As(err, &pgErr) {
				// The server refused (privileges, a changed table): no retry
				// fixes it.
				return true, fmt.Errorf("%w: catch-up from the table: %w (a restart recreates the slot and catches up again)", errFatal, err)
			}
			// The connection broke half-way (a Postgres restart, a cut):
			// the pipeline drains what the partial catch-up handed over,
			// which leaves the checkpoint's catch-up pending, and runs
			// again, which recreates the slot and catches up from the start.
			return true, fmt.Errorf("%w: catch-up from the table interrupted: %w", ErrCatchupInterrupted, err)
		}
		snap.close()
		r.started = true
	}
	err = st.run(sctx)
	if c := context.Cause(sctx); c != nil && ctx.Err() == nil && err != nil {
		err = fmt.Errorf("%w (%w)", err, c)
	}
	return true, err
}

// connect opens a replication (or a regular) connection with the session
// settings decode relies on: UTC timestamps in ISO format.
func (r *Reader) connect(ctx context.Context, replication bool) (*pgconn.PgConn, error) {
	cfg, err := pgconn.ParseConfig(r.cfg.ConnString)
	if err != nil {
		return nil, fmt.Errorf("parse database URL: %w", redactParseError(err))
	}
	if replication {
		cfg.RuntimeParams["replication"] = "database"
	}
	cfg.RuntimeParams["application_name"] = "outboxd"
	cfg.RuntimeParams["TimeZone"] = "UTC"
	cfg.RuntimeParams["DateStyle"] = "ISO, YMD"
	cfg.RuntimeParams["extra_float_digits"] = "1"
	if cfg.ConnectTimeout == 0 {
		cfg.ConnectTimeout = 10 * time.Second
	}
	conn, err := pgconn.ConnectConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("connect: %w", err)
	}
	return conn, nil
}

// redactParseError drops the connection string pgconn may quote when it
// cannot parse it: it can hold a password.
func redactParseError(err error) error {
	var pe *pgconn.ParseConfigError
	if errors.As(err, &pe) {
		return errors.New("invalid connection string")
	}
	return err
}

type slotInfo struct {
	plugin         string
	database       string
	active         bool
	activePID      int
	confirmedFlush pglogrepl.LSN
	walStatus      string
}

// querySlot reads the slot's row; nil when there is none. Replication
// connections in database mode accept simple SQL queries.
func querySlot(ctx context.Context, conn *pgconn.PgConn, slot string) (*slotInfo, error) {
	res, err := conn.Exec(ctx, `SELECT coalesce(plugin, ''), coalesce(database, ''), active, coalesce(active_pid, 0),
 coalesce(confirmed_flush_lsn, '0/0'), coalesce(wal_status, ''), current_database()
FROM pg_replication_slots WHERE slot_name = '`+slot+`'`).ReadAll()
	if err != nil {
		return nil, fmt.Errorf("query slot %q: %w", slot, err)
	}
	if len(res) != 1 || len(res[0].Rows) == 0 {
		return nil, nil
	}
	row := res[0].Rows[0]
	s := &slotInfo{plugin: string(row[0]), database: string(row[1]), active: string(row[2]) == "t", walStatus: string(row[5])}
	fmt.Sscan(string(row[3]), &s.activePID) //nolint:errcheck // an int from the server
	if s.confirmedFlush, err = pglogrepl.ParseLSN(string(row[4])); err != nil {
		return nil, fmt.Errorf("parse confirmed_flush_lsn of slot %q: %w", slot, err)
	}
	if s.database != string(row[6]) {
		return nil, fmt.Errorf("%w: slot %q belongs to database %q, connected to %q", ErrIrreconcilable, slot, s.database, string(row[6]))
	}
	return s, nil
}

// prepare reconciles the slot with the stored checkpoint and returns where to
// start streaming, plus a snapshot to catch up from when the slot was created.
func (r *Reader) prepare(ctx context.Context, conn *pgconn.PgConn, sys pglogrepl.IdentifySystemResult) (pglogrepl.LSN, *snapshot, error) {
	r.sysID, r.timeline = sys.SystemID, sys.Timeline
	// Instances sharing the slot prepare it one at a time: without this, a
	// standby could see a slot another instance has just created (and not
	// yet recorded) and recreate it under it.
	slot, err := querySlot(ctx, conn, r.cfg.Slot)
	if err != nil {
		return 0, nil, err
	}
	if slot != nil && slot.active {
		return 0, nil, errRetry{fmt.Sprintf("slot %q is active in process %d", r.cfg.Slot, slot.activePID)}
	}
	cp, err := r.store.Load(ctx)
	haveCP := err == nil
	if err != nil && !errors.Is(err, checkpoint.ErrNoCheckpoint) {
		return 0, nil, err
	}
	if haveCP && cp.SystemID != sys.SystemID {
		return 0, nil, fmt.Errorf("%w: the checkpoint of slot %q was written on cluster %s but this server is cluster %s; run `outboxd slot reset --yes` to recreate the slot and deliver every unprocessed row from the table",
			ErrIrreconcilable, r.cfg.Slot, cp.SystemID, sys.SystemID)
	}
	log := r.log.With().Bool("checkpoint", haveCP).Stringer("checkpoint_lsn", cp.LSN).Logger()
	switch {
	case slot == nil && !haveCP:
		log.Info().Msg("creating slot (first start)")
	case slot == nil || slot.walStatus == "lost":
		what := "is missing"
		if slot != nil {
			what = "was invalidated (wal_status lost)"
		}
		if !r.cfg.SlotRecreate {
			return 0, nil, fmt.Errorf("%w: slot %q %s although a checkpoint exists; set OUTBOXD_SLOT_RECREATE=true or run `outboxd slot reset --yes` to recreate it and deliver every unprocessed row from the table",
				ErrIrreconcilable, r.cfg.Slot, what)
		}
		log.Warn().Str("slot_state", what).Msg("recreating slot; unprocessed rows will be caught up from the table")
	case slot.plugin != "pgoutput":
		return 0, nil, fmt.Errorf("%w: slot %q uses plugin %q, outboxd needs pgoutput", ErrIrreconcilable, r.cfg.Slot, slot.plugin)
	case !haveCP:
		log.Warn().Msg("slot exists without a checkpoint; recreating it and catching up from the table")
	case cp.CatchupPending:
		log.Warn().Msg("the previous catch-up did not finish; recreating the slot and catching up again")
	case cp.ConfirmsRecorded && slot.confirmedFlush > cp.LSN:
		// outboxd records every position before confirming it: a slot ahead
		// of the checkpoint was advanced by someone else (pg_replication_slot_advance,
		// another consumer), and whatever it passed may never have been
		// delivered. Streaming from there would skip those rows silently.
		what := fmt.Sprintf("confirms %s, beyond the checkpoint %s: it was advanced outside outboxd, past rows that may not have been delivered", slot.confirmedFlush, cp.LSN)
		if !r.cfg.SlotRecreate {
			return 0, nil, fmt.Errorf("%w: slot %q %s; run `outboxd slot reset --yes` (or set OUTBOXD_SLOT_RECREATE=true) to recreate it and deliver every unprocessed row from the table",
				ErrIrreconcilable, r.cfg.Slot, what)
		}
		log.Warn().Str("slot_state", what).Msg("recreating slot; unprocessed rows will be caught up from the table")
	default:
		if cp.Timeline != sys.Timeline {
			log.Warn().Int32("checkpoint_timeline", cp.Timeline).Int32("timeline", sys.Timeline).Msg("timeline changed since the checkpoint")
		}
		start := max(cp.LSN, slot.confirmedFlush)
		log.Info().Stringer("confirmed_flush_lsn", slot.confirmedFlush).Str("wal_status", slot.walStatus).Stringer("start_lsn", start).Msg("slot and checkpoint reconciled")
		return start, nil, nil
	}
	if slot != nil {
		if err := pglogrepl.DropReplicationSlot(ctx, conn, r.cfg.Slot, pglogrepl.DropReplicationSlotOptions{Wait: true}); err != nil {
			return 0, nil, fmt.Errorf("drop slot %q: %w", r.cfg.Slot, err)
		}
	}
	// Creating a logical slot waits for every transaction running in the
	// cluster to end: say so while it waits, rather than look stuck.
	waiting := time.AfterFunc(5*time.Second, func() {
		r.log.Warn().Msg("creating the slot waits for transactions still running in the cluster (see pg_stat_activity: idle in transaction)")
	})
	res, err := pglogrepl.CreateReplicationSlot(ctx, conn, r.cfg.Slot, "pgoutput",
		pglogrepl.CreateReplicationSlotOptions{SnapshotAction: "EXPORT_SNAPSHOT", Mode: pglogrepl.LogicalReplication})
	waiting.Stop()
	if err != nil {
		return 0, nil, fmt.Errorf("create slot %q: %w", r.cfg.Slot, err)
	}
	consistent, err := pglogrepl.ParseLSN(res.ConsistentPoint)
	if err != nil {
		return 0, nil, fmt.Errorf("parse consistent point of slot %q: %w", r.cfg.Slot, err)
	}
	if err := r.store.Save(ctx, checkpoint.Checkpoint{LSN: consistent, SystemID: sys.SystemID, Timeline: sys.Timeline, CatchupPending: true}); err != nil {
		return 0, nil, err
	}
	r.log.Info().Stringer("consistent_lsn", consistent).Msg("slot created")
	return consistent, &snapshot{r: r, name: res.SnapshotName, lsn: consistent}, nil
}

// sendStatus reports write = last received, flush = apply = durable position.
func (r *Reader) sendStatus(conn *pgconn.PgConn, reply bool) error {
	flush := r.ledger.Flushed()
	if flush == 0 {
		// pglogrepl would turn a zero flush into the write position: never
		// let it confirm what is not durable.
		return nil
	}
	write := max(r.received, flush)
	err := pglogrepl.SendStandbyStatusUpdate(context.Background(), conn, pglogrepl.StandbyStatusUpdate{
		WALWritePosition: write, WALFlushPosition: flush, WALApplyPosition: flush, ReplyRequested: reply,
	})
	if err != nil {
		return fmt.Errorf("send standby status: %w", err)
	}
	if r.cfg.OnPosition != nil {
		r.cfg.OnPosition(write, flush)
	}
	return nil
}

// stream is one streaming session.
type stream struct {
	r          *Reader
	conn       *pgconn.PgConn
	out        chan<- *decode.Event
	stop       context.Context // the caller's context: when it ends, stop at a transaction boundary
	dec        *decode.Decoder
	nextStatus time.Time
	lastFlush  pglogrepl.LSN
	lastHeard  time.Time
	seen       int // outbox rows of the current transaction seen in this session
	// lastData is when the last XLogData arrived (unix nanoseconds), for
	// the heartbeat goroutine.
	lastData atomic.Int64
	// lastIdle is when the last idle advance was recorded.
	lastIdle time.Time
}

// idleDue reports whether a keepalive's WAL end is worth an idle advance now
// (see Config.IdleAdvanceBytes).
func (s *stream) idleDue(ka pglogrepl.PrimaryKeepaliveMessage) bool {
	c := s.r.cfg
	return ka.ReplyRequested ||
		uint64(ka.ServerWALEnd-s.r.ledger.Flushed()) >= c.IdleAdvanceBytes ||
		time.Since(s.lastIdle) >= c.IdleAdvanceInterval
}

// status sends a standby status update when one is due: every status
// interval, or at once when asked.
func (s *stream) status(force, reply bool) error {
	now := time.Now()
	if !force && now.Before(s.nextStatus) {
		return nil
	}
	s.nextStatus = now.Add(s.r.cfg.StatusInterval)
	s.lastFlush = s.r.ledger.Flushed()
	return s.r.sendStatus(s.conn, reply)
}

// emit hands one event downstream; while the output is full it keeps the
// walsender satisfied with status updates.
func (s *stream) emit(ctx context.Context, e *decode.Event) error {
	select {
	case s.out <- e:
		return nil
	default:
	}
	tick := time.NewTicker(s.r.cfg.StatusInterval)
	defer tick.Stop()
	// We are not reading while we wait: the server's silence meanwhile says
	// nothing about the connection.
	defer func() { s.lastHeard = time.Now() }()
	for {
		select {
		case s.out <- e:
			return nil
		case <-tick.C:
			if err := s.status(true, false); err != nil {
				return err
			}
		case <-ctx.Done():
			return context.Cause(ctx)
		}
	}
}

// standbyPoll is how often a standby checks whether the slot is free.
const standbyPoll = time.Second

// stopGrace is how long a stopping reader keeps reading to finish the
// transaction in progress.
const stopGrace = 5 * time.Second

func (s *stream) run(ctx context.Context) error {
	r := s.r
	if s.dec == nil {
		t := r.cfg.Table
		t.OID = r.rels.outbox
		s.dec = decode.NewDecoder(t)
	}
	s.lastHeard = time.Now()
	// After the caller stops us, keep going for a moment to finish the
	// transaction in progress; rctx bounds that.
	rctx, cancel := context.WithCancelCause(context.WithoutCancel(ctx))
	defer cancel(nil)
	stopAfter := context.AfterFunc(ctx, func() {
		if s.stop.Err() == nil {
			cancel(context.Cause(ctx)) // not a stop: the session broke
			return
		}
		time.AfterFunc(stopGrace, func() { cancel(errors.New("stop grace elapsed")) })
	})
	defer stopAfter()

	for {
		if s.stop.Err() != nil && r.open == nil {
			return nil
		}
		if err := rctx.Err(); err != nil {
			return context.Cause(rctx)
		}
		silent := time.Since(s.lastHeard)
		if silent > r.cfg.SilenceTimeout {
			return fmt.Errorf("no message from the server for %s", silent.Round(time.Millisecond))
		}
		flushed := r.ledger.Flushed()
		if err := s.status(flushed != s.lastFlush, silent > r.cfg.StatusInterval); err != nil {
			return err
		}
		dctx, dcancel := context.WithDeadline(rctx, s.nextStatus)
		msg, err := s.conn.ReceiveMessage(dctx)
		dcancel()
		if err != nil {
			if pgconn.Timeout(err) && rctx.Err() == nil {
				continue
			}
			if rctx.Err() != nil {
				return context.Cause(rctx)
			}
			return fmt.Errorf("receive: %w", err)
		}
		s.lastHeard = time.Now()
		switch msg := msg.(type) {
		case *pgproto3.CopyData:
			if err := s.copyData(rctx, msg.Data); err != nil {
				return err
			}
		case *pgproto3.ErrorResponse:
			return fmt.Errorf("replication stream: %w", pgconn.ErrorResponseToPgError(msg))
		case *pgproto3.CopyDone:
			return errors.New("server ended the replication stream")
		default:
			// Notices and the like.
		}
	}
}

func (s *stream) copyData(ctx context.Context, data []byte) error {
	if len(data) == 0 {
		return nil
	}
	r := s.r
	switch data[0] {
	case pglogrepl.PrimaryKeepaliveMessageByteID:
		ka, err := pglogrepl.ParsePrimaryKeepaliveMessage(data[1:])
		if err != nil {
			return fmt.Errorf("parse keepalive: %w", err)
		}
		r.received = max(r.received, ka.ServerWALEnd)
		if r.open == nil && r.ledger.InFlight() == 0 && ka.ServerWALEnd > r.ledger.Flushed() && s.idleDue(ka) {
			// Nothing is in flight and everything received is durable: the
			// server's WAL end can be recorded and then confirmed, so an idle
			// outbox does not pin WAL (G7) and a stopping server is not kept
			// waiting.
			if r.ledger.AdvanceIdle(ka.ServerWALEnd) {
				r.resume = max(r.resume, ka.ServerWALEnd)
				s.lastIdle = time.Now()
			}
		}
		if ka.ReplyRequested || r.ledger.Flushed() != s.lastFlush {
			return s.status(true, false)
		}
		return nil
	case pglogrepl.XLogDataByteID:
		xld, err := pglogrepl.ParseXLogData(data[1:])
		if err != nil {
			return fmt.Errorf("parse xlogdata: %w", err)
		}
		r.received = max(r.received, xld.WALStart)
		s.lastData.Store(time.Now().UnixNano())
		return s.message(ctx, xld)
	}
	return nil
}

// newRow counts a row of the current transaction in this session and reports
// whether it was not handled yet: a transaction cut by a disconnect is sent
// again from its start, and its rows already handed downstream are skipped.
// The caller records the row with handled once it is really done with it.
func (s *stream) newRow() bool {
	s.seen++
	return s.r.open == nil || s.seen > s.r.open.rows
}

// handled records that the row counted last is done with (handed downstream
// or skipped for good).
func (s *stream) handled() {
	if o := s.r.open; o != nil {
		o.rows = s.seen
	}
}

// dispatch hands e, the current row, downstream as the transaction's next
// event; only once that succeeded is the row handled.
func (s *stream) dispatch(ctx context.Context, e *decode.Event) error {
	o := s.r.open
	e.CommitLSN, e.TxnSeq, e.Index = o.finalLSN, o.seq, o.events
	if err := s.emit(ctx, e); err != nil {
		return err
	}
	o.events++
	s.handled()
	return nil
}

func (s *stream) message(ctx context.Context, xld pglogrepl.XLogData) error {
	r := s.r
	m, err := s.dec.Decode(xld.WALData)
	if err != nil {
		var bad *decode.BadRowError
		if errors.As(err, &bad) {
			if s.newRow() {
				r.log.Error().Err(err).Stringer("lsn", xld.WALStart).Msg("row skipped: it cannot be delivered or marked")
				s.handled()
			}
			return nil
		}
		return fmt.Errorf("%w: decode message at %s: %w", errFatal, xld.WALStart, err)
	}
	switch m.Kind {
	case decode.KindBegin:
		if o := r.open; o != nil {
			// A transaction cut by a disconnect is sent again from its start.
			if o.finalLSN != m.Begin.FinalLSN {
				return fmt.Errorf("%w: expected transaction %s to be resent, got %s", errFatal, o.finalLSN, m.Begin.FinalLSN)
			}
			s.seen = 0
			return nil
		}
		s.seen = 0
		if m.Begin.FinalLSN < r.resume {
			r.open = &openTxn{finalLSN: m.Begin.FinalLSN, skip: true}
			return nil
		}
		r.open = &openTxn{seq: r.ledger.Open(m.Begin.FinalLSN, false), finalLSN: m.Begin.FinalLSN}
	case decode.KindEvent:
		o := r.open
		if o == nil {
			return fmt.Errorf("%w: insert at %s outside a transaction", errFatal, xld.WALStart)
		}
		if !s.newRow() {
			return nil
		}
		if o.skip || m.Event.Processed {
			s.handled()
			return nil
		}
		return s.dispatch(ctx, m.Event)
	case decode.KindInsert, decode.KindUpdate, decode.KindDelete:
		if m.Row.Relation.ID != r.rels.subscription || r.rels.subscription == 0 {
			// An insert into a published relation that is neither the outbox
			// nor the subscription table is not skipped (G10): it may be the
			// outbox under a form we do not recognise, and skipping it would
			// let the checkpoint pass a row that was never delivered.
			if m.Kind == decode.KindInsert && r.open != nil && !r.open.skip {
				rel := m.Row.Relation
				return fmt.Errorf("%w: insert at %s into %s.%s (relation %d), which publication %q publishes, is not the outbox table %s (relation %d): stopping rather than skip it; remove that table from the publication, or point OUTBOXD_TABLE at it",
					errFatal, xld.WALStart, rel.Namespace, rel.Name, rel.ID, r.cfg.Publication, r.cfg.Table, r.rels.outbox)
			}
			return nil
		}
		o := r.open
		if o == nil {
			return fmt.Errorf("%w: change at %s outside a transaction", errFatal, xld.WALStart)
		}
		if !s.newRow() {
			return nil
		}
		if o.skip {
			s.handled()
			return nil
		}
		return s.dispatch(ctx, &decode.Event{Change: &decode.Change{Kind: m.Kind, Row: m.Row}})
	case decode.KindCommit:
		o := r.open
		if o == nil {
			return fmt.Errorf("%w: commit at %s outside a transaction", errFatal, xld.WALStart)
		}
		r.open = nil
		if !o.skip {
			if err := r.ledger.Close(o.seq, m.Commit.EndLSN, o.events); err != nil {
				return fmt.Errorf("%w: %w", errFatal, err)
			}
		}
		r.resume = max(r.resume, m.Commit.EndLSN)
	case decode.KindRelation:
		// The decoder keeps its cache; a relation that no longer fits is
		// reported by the decoder on the next insert.
	case decode.KindLogical:
		// Our heartbeat, outside any transaction: everything before it was
		// decoded and sent, so with nothing in flight its position can be
		// confirmed, as with a keepalive's WAL end.
		l := m.Logical
		if l.Transactional || l.Prefix != HeartbeatPrefix || r.open != nil || r.ledger.InFlight() != 0 {
			return nil
		}
		if r.ledger.AdvanceIdle(xld.WALStart) {
			r.resume = max(r.resume, xld.WALStart)
		}
		r.log.Debug().Stringer("lsn", xld.WALStart).Stringer("flush_lsn", r.ledger.Flushed()).Msg("heartbeat received")
	}
	return nil
}

// heartbeatOn reports whether the heartbeat runs in this session: asked for,
// and the server is PostgreSQL 14 or later.
func (r *Reader) heartbeatOn(conn *pgconn.PgConn) bool {
	if r.cfg.HeartbeatInterval <= 0 {
		return false
	}
	var major int
	fmt.Sscanf(conn.ParameterStatus("server_version"), "%d", &major) //nolint:errcheck // 0 when unparsable
	if major < 14 {
		r.log.Warn().Str("server_version", conn.ParameterStatus("server_version")).
			Msg("heartbeat off: logical decoding messages need PostgreSQL 14 or later")
		return false
	}
	return true
}

// heartbeat emits a logical decoding message whenever the stream has carried
// no data for HeartbeatInterval, until ctx ends. It uses its own regular
// connection (a replication connection cannot run it while streaming);
// failures are logged and retried at the next interval.
func (r *Reader) heartbeat(ctx context.Context, lastData *atomic.Int64) {
	every := r.cfg.HeartbeatInterval
	var conn *pgconn.PgConn
	defer func() {
		if conn != nil {
			conn.Close(context.Background()) //nolint:errcheck // best effort
		}
	}()
	var last time.Time // last heartbeat emitted
	timer := time.NewTimer(every)
	defer timer.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-timer.C:
		}
		quiet := time.Unix(0, lastData.Load())
		if last.After(quiet) {
			quiet = last
		}
		if wait := time.Until(quiet.Add(every)); wait > 0 {
			timer.Reset(wait)
			continue
		}
		timer.Reset(every)
		if conn == nil || conn.IsClosed() {
			c, err := r.connect(ctx, false)
			if err != nil {
				r.log.Warn().Err(err).Msg("heartbeat not sent")
				continue
			}
			conn = c
		}
		last = time.Now()
		ectx, cancel := context.WithTimeout(ctx, every)
		_, err := conn.Exec(ectx, `SELECT pg_logical_emit_message(false, '`+HeartbeatPrefix+`', '')`).ReadAll()
		cancel()
		if err != nil {
			if ctx.Err() == nil {
				r.log.Warn().Err(err).Msg("heartbeat not sent")
			}
			conn.Close(context.Background()) //nolint:errcheck // reconnect next time
			conn = nil
			continue
		}
		r.log.Debug().Msg("heartbeat sent")
	}
}
