package cdc

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"
	"github.com/rs/zerolog"

	"github.com/outboxd/outboxd/decode"
	"github.com/outboxd/outboxd/internal/backoff"
	"github.com/outboxd/outboxd/store"
)

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
	// failoverNoted is set once the info that failover slots need
	// PostgreSQL 17 was logged.
	failoverNoted bool
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

// PlanTable is the tracking plan's table (README "Tracking plan"), in the
// outbox table's schema; its changes reach the router in commit order with
// the subscriptions', through the same publication.
const PlanTable = "outboxd_plan"

// SlotLockKey is the key (for hashtext) of the advisory lock held while a
// slot is prepared and started, by the daemon and by the slot commands.
func SlotLockKey(slot string) string { return "outboxd slot " + slot }

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
		if errors.Is(err, ErrIrreconcilable) || errors.Is(err, errFatal) || errors.Is(err, ErrSlotLost) || errors.Is(err, ErrCatchupInterrupted) || errors.Is(err, ErrTakenOver) || errors.Is(err, ErrReset) || errors.Is(err, ErrDiverged) {
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
		} else if errors.Is(err, pgconn.ErrReadOnlyConnection) {
			// target_session_attrs=read-write found only read-only
			// servers: a standby not promoted yet. Poll at the same steady
			// pace rather than back off, so that the promotion is followed
			// within about a second of it.
			wait = min(wait, standbyPoll/2+rand.N(standbyPoll/2+1))
			r.log.Warn().Err(err).Dur("retry_in", wait).Msg("only read-only servers answered (a failover in progress?); reconnecting")
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
			if err := r.sendStatus(&pgReplConn{conn: conn}, false); err != nil {
				r.log.Warn().Err(err).Msg("final standby status not sent")
				return
			}
			r.log.Info().Stringer("flush_lsn", r.ledger.Flushed()).Msg("final standby status sent")
			r.endStream(conn)
			return
		case <-tick.C:
			if err := r.sendStatus(&pgReplConn{conn: conn}, false); err != nil {
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
		r.ledger.Resume(start)
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
		if sys.Timeline < r.timeline {
			// The same cluster on an earlier timeline: a former primary
			// that a standby was promoted over (both accept writes now).
			// Its WAL after the fork is not the cluster's history.
			return false, fmt.Errorf("%w: reconnected to a server of cluster %s on timeline %d, but streaming was on timeline %d: a former primary after a failover; point OUTBOXD_DATABASE_URL at the current primary (target_session_attrs=read-write lists both) and retire the old one",
				ErrIrreconcilable, sys.SystemID, sys.Timeline, r.timeline)
		}
		promoted := sys.Timeline > r.timeline
		slot, err := querySlot(ctx, conn, r.cfg.Slot)
		if err != nil {
			return false, err
		}
		if promoted {
			r.log.Warn().Int32("previous_timeline", r.timeline).Int32("timeline", sys.Timeline).Bool("slot_present", slot != nil).
				Msg("reconnected to a promoted server (same system identifier, later timeline)")
			if err := r.checkFork(ctx, conn, sys.Timeline); err != nil {
				return false, err
			}
			if slot != nil && slot.WALStatus != "lost" {
				// Record the timeline now: the slot is on this server.
				if err := r.store.SetTimeline(ctx, sys.SystemID, sys.Timeline); err != nil {
					return false, err
				}
				r.timeline = sys.Timeline
			}
		}
		switch {
		case slot == nil && promoted:
			// Failover slots (PostgreSQL 17) were not in place, or the
			// standby had not synchronized the slot yet.
			return false, r.slotLost(fmt.Sprintf("is missing on the promoted server (timeline %d): it was not synchronized to the standby", sys.Timeline))
		case slot == nil:
			switch _, err := r.store.Load(ctx); {
			case errors.Is(err, store.ErrNoCheckpoint):
				// Slot and checkpoint both gone: `outboxd slot reset
				// --force` terminated us and left a first start behind.
				return false, fmt.Errorf("%w: slot %q and its checkpoint were removed (outboxd slot reset --force)", ErrReset, r.cfg.Slot)
			case err != nil:
				// Which of the two it is cannot be told yet: a
				// connection lost here is retried like any other.
				return false, fmt.Errorf("slot %q is missing; read its checkpoint: %w", r.cfg.Slot, err)
			}
			return false, r.slotLost("disappeared")
		case slot.WALStatus == "lost":
			return false, r.slotLost("was invalidated (wal_status lost)")
		case slot.Active && uint32(slot.ActivePID) == r.lastPID:
			// Our own walsender of before the cut, not yet gone.
			return false, errRetry{fmt.Sprintf("slot %q is still active in this instance's previous walsender %d", r.cfg.Slot, slot.ActivePID)}
		case slot.Active:
			// Another instance took the slot while we were cut off: it acts
			// now (G9). Stop, rather than wait as a standby with the routing
			// state and deliveries of a leadership that is over.
			return false, fmt.Errorf("%w: slot %q was taken over by process %d while this instance was disconnected",
				ErrTakenOver, r.cfg.Slot, slot.ActivePID)
		case slot.Confirmed() > r.ledger.Flushed():
			// We never confirm beyond our durable position: someone reset or
			// advanced the slot while we were away.
			return false, fmt.Errorf("%w: slot %q confirms %s, beyond this instance's checkpoint %s: it was reset or advanced by someone else; restart outboxd",
				errFatal, r.cfg.Slot, slot.Confirmed(), r.ledger.Flushed())
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
			// Nothing was handed downstream in this session and nothing
			// will drain: end the stream here, so that Run does not wait
			// for a drain that never comes (a SIGTERM during the take
			// used to hang the shutdown for minutes).
			r.copying = false
			r.pid.Store(0)
			conn.Close(context.WithoutCancel(sctx)) //nolint:errcheck // abandoning the session
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

	st := &stream{r: r, conn: &pgReplConn{conn: conn}, out: out, stop: ctx, nextStatus: time.Now()}
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

// checkFork checks that what this instance received from the old timeline
// is part of the promoted server's history: the old timeline ends, in the
// new one's history (TIMELINE_HISTORY), at the fork point, and the position
// streaming would resume from, the durable position and a transaction cut
// by the disconnect must not be beyond it.
func (r *Reader) checkFork(ctx context.Context, conn *pgconn.PgConn, timeline int32) error {
	hist, err := pglogrepl.TimelineHistory(ctx, conn, timeline)
	if err != nil {
		return fmt.Errorf("timeline history of timeline %d: %w", timeline, err)
	}
	fork, ok := forkPoint(hist.Content, r.timeline)
	if !ok {
		return fmt.Errorf("%w: the history of timeline %d does not show where timeline %d ended", ErrDiverged, timeline, r.timeline)
	}
	held := max(r.resume, r.ledger.Flushed())
	if r.open != nil {
		held = max(held, r.open.finalLSN)
	}
	if held > fork {
		return fmt.Errorf("%w: timeline %d ended at %s on the promoted server, but this instance received up to %s from it (a standby behind the old primary: set synchronized_standby_slots there); starting again from the checkpoint",
			ErrDiverged, r.timeline, fork, held)
	}
	r.log.Info().Stringer("fork_lsn", fork).Stringer("resume_lsn", r.resume).Msg("what was received from the old primary is in the promoted server's history")
	return nil
}

// forkPoint returns where timeline tli ended in a timeline history file:
// lines of "parent timeline, switch point, reason", tab-separated.
func forkPoint(history []byte, tli int32) (pglogrepl.LSN, bool) {
	for line := range strings.SplitSeq(string(history), "\n") {
		f := strings.Fields(line)
		if len(f) < 2 || f[0] != strconv.Itoa(int(tli)) {
			continue
		}
		lsn, err := pglogrepl.ParseLSN(f[1])
		if err != nil {
			return 0, false
		}
		return lsn, true
	}
	return 0, false
}
