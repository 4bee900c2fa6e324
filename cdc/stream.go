package cdc

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/outboxd/outboxd/decode"
)

// sendStatus reports write = last received, flush = apply = durable position.
func (r *Reader) sendStatus(conn replConn, reply bool) error {
	flush := r.ledger.Flushed()
	if flush == 0 {
		// pglogrepl would turn a zero flush into the write position: never
		// let it confirm what is not durable.
		return nil
	}
	write := max(r.received, flush)
	err := conn.sendStatus(context.Background(), pglogrepl.StandbyStatusUpdate{
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
	conn       replConn
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
	// A receive waits until the next status is due; the end of rctx cuts it
	// short. The connection is reset for its next user when the session
	// ends, never interrupted after that.
	var (
		intrMu sync.Mutex
		ended  bool
	)
	stopInterrupt := context.AfterFunc(rctx, func() {
		intrMu.Lock()
		defer intrMu.Unlock()
		if !ended {
			s.conn.interrupt()
		}
	})
	defer func() {
		stopInterrupt()
		intrMu.Lock()
		ended = true
		intrMu.Unlock()
		s.conn.reset()
	}()

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
		msg, err := s.conn.receive(s.nextStatus)
		if err != nil {
			if rctx.Err() != nil {
				return context.Cause(rctx)
			}
			return fmt.Errorf("receive: %w", err)
		}
		if msg == nil {
			// The status deadline passed, or rctx ended.
			if rctx.Err() != nil {
				return context.Cause(rctx)
			}
			continue
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
		if id := m.Row.Relation.ID; (id != r.rels.subscription || id == 0) && (id != r.rels.plan || id == 0) {
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
