package cdc

import (
	"context"
	"net"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"
	"github.com/stretchr/testify/require"

	"github.com/outboxd/outboxd/decode"
)

// These tests run streaming sessions of a Reader on fake connections that
// replay pgoutput messages captured from a real server (fake_test.go).

func connReset() error { return &net.OpError{Op: "read", Net: "tcp", Err: syscall.ECONNRESET} }

func ids(es ...*decode.Event) (out []int64) {
	for _, e := range es {
		out = append(out, e.ID)
	}
	return out
}

// A transaction cut by a broken connection is sent again from its start on
// the next session: the rows handed downstream before the cut are skipped,
// the rest follow with their indexes in the transaction, and no standby
// status confirms the transaction before its last event settled.
func TestCutTransactionResumesWithoutRedispatch(t *testing.T) {
	t.Parallel()
	g := loadGolden(t)
	x, start := g.t3, g.t1.end
	h := newHarness(t, g, start, 16, Config{})
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()

	// Session 1: cut after rows 42, 44 (is_processed: not handed on) and 43.
	c1 := newFakeConn()
	c1.push(x.beginMsg(), g.relationMsg(x), g.insert(x, 42), g.insert(x, 44), g.insert(x, 43))
	c1.fail(connReset())
	require.ErrorIs(t, end(t, h.stream(ctx, c1)), syscall.ECONNRESET)
	e42, e43 := h.next(t), h.next(t)
	require.Equal(t, []int64{42, 43}, ids(e42, e43))
	require.Equal(t, []int{0, 1}, []int{e42.Index, e43.Index})
	require.Equal(t, []pglogrepl.LSN{x.final, x.final}, []pglogrepl.LSN{e42.CommitLSN, e43.CommitLSN})
	require.Equal(t, e42.TxnSeq, e43.TxnSeq)
	require.Empty(t, h.out)
	require.Equal(t, start, h.r.resume, "the next session must start before the cut transaction")

	// What was handed on settles; the transaction is not closed, so the
	// durable position stays.
	h.ledger.settle(t, e42)
	h.ledger.settle(t, e43)
	h.ledger.flush()
	require.Equal(t, start, h.ledger.Flushed())

	// Session 2: the server sends the transaction again, whole, then a
	// keepalive beyond it while row 45 is unsettled.
	c2 := newFakeConn()
	c2.push(x.beginMsg(), g.relationMsg(x), g.insert(x, 42), g.insert(x, 44), g.insert(x, 43), g.insert(x, 45), x.commitMsg(),
		keepalive(x.end+0x1000, true))
	done := h.stream(ctx, c2)
	e45 := h.next(t)
	require.Equal(t, int64(45), e45.ID, "rows handed on before the cut were handed on again")
	require.Equal(t, 2, e45.Index)
	require.Equal(t, e42.TxnSeq, e45.TxnSeq)
	require.Equal(t, x.final, e45.CommitLSN)
	c2.waitFor(t, "the session handled the resent transaction and the keepalive", c2.caughtUp)
	h.ledger.flush() // the flusher may run at any time
	require.Equal(t, start, h.ledger.Flushed(), "a keepalive advanced the position past an unsettled event")
	require.NotEmpty(t, c1.sent())
	for i, s := range append(c1.sent(), c2.sent()...) {
		require.Equal(t, start, s.WALFlushPosition, "status %d confirmed beyond the last settled transaction", i)
		require.Equal(t, start, s.WALApplyPosition, "status %d", i)
	}

	h.ledger.settle(t, e45)
	h.ledger.flush()
	require.Equal(t, x.end, h.ledger.Flushed())
	c2.waitFor(t, "a status confirming the transaction", func() bool {
		s := c2.sent()
		return s[len(s)-1].WALFlushPosition == x.end
	})
	cancel()
	require.NoError(t, end(t, done))
	require.Empty(t, h.out, "an event was handed on twice")
	require.Equal(t, x.end, h.r.resume)
	require.Nil(t, h.r.open)
	for _, s := range c2.sent() {
		require.LessOrEqual(t, s.WALFlushPosition, x.end)
	}
}

// A keepalive's WAL end becomes the durable position (recorded, then
// confirmed) only when nothing is in flight: not in the middle of a
// transaction, not while an event of a closed one is unsettled.
func TestIdleAdvanceOnlyWhenNothingInFlight(t *testing.T) {
	t.Parallel()
	g := loadGolden(t)
	x := g.t1
	start, w1, w2 := x.final-0x1000, x.final-0x800, x.end+0x800
	h := newHarness(t, g, start, 16, Config{})
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	c := newFakeConn()
	done := h.stream(ctx, c)
	confirmed := func(lsn pglogrepl.LSN) func() bool {
		return func() bool {
			s := c.sent()
			return len(s) > 0 && s[len(s)-1].WALFlushPosition == lsn
		}
	}

	// Idle: the keepalive's WAL end is recorded, and confirmed once written.
	c.push(keepalive(w1, true))
	c.waitFor(t, "the keepalive handled", c.caughtUp)
	require.Equal(t, []idleCall{{lsn: w1, advanced: true}}, h.ledger.idleCalls())
	require.Equal(t, start, h.ledger.Flushed(), "confirmed before it was written")
	h.ledger.flush()
	require.Equal(t, w1, h.ledger.Flushed())
	c.waitFor(t, "the idle position confirmed", confirmed(w1))

	// In the middle of a transaction, and after its commit while row 42 is
	// unsettled: no idle advance is asked for.
	c.push(x.beginMsg(), g.relationMsg(x), g.insert(x, 42), keepalive(w2, true))
	e42 := h.next(t)
	c.waitFor(t, "the keepalive inside the transaction handled", c.caughtUp)
	c.push(x.commitMsg(), keepalive(w2, true))
	c.waitFor(t, "the keepalive after the commit handled", c.caughtUp)
	require.Len(t, h.ledger.idleCalls(), 1, "idle advance asked for with something in flight: %v", h.ledger.idleCalls())
	h.ledger.flush()
	require.Equal(t, w1, h.ledger.Flushed())
	beforeSettle := c.sent()

	// Settled and written: the next keepalive advances again.
	h.ledger.settle(t, e42)
	h.ledger.flush()
	require.Equal(t, x.end, h.ledger.Flushed())
	c.push(keepalive(w2, true))
	c.waitFor(t, "the keepalive after the settle handled", c.caughtUp)
	require.Equal(t, []idleCall{{lsn: w1, advanced: true}, {lsn: w2, advanced: true}}, h.ledger.idleCalls())
	h.ledger.flush()
	require.Equal(t, w2, h.ledger.Flushed())
	c.waitFor(t, "the second idle position confirmed", confirmed(w2))

	cancel()
	require.NoError(t, end(t, done))
	require.Equal(t, w2, h.r.resume, "a reconnect starts from the idle position")
	for i, s := range beforeSettle {
		require.LessOrEqual(t, s.WALFlushPosition, w1, "status %d confirmed an unsettled transaction", i)
	}
}

// The reader's heartbeat message, decoded with nothing in flight, gives a
// position to record and confirm, as a keepalive does; with a transaction
// unsettled it gives none.
func TestHeartbeatAdvancesOnlyWhenNothingInFlight(t *testing.T) {
	t.Parallel()
	g := loadGolden(t)
	x := g.t1
	start, h1, h2 := x.final-0x1000, x.final-0x800, x.end+0x800
	h := newHarness(t, g, start, 16, Config{})
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	c := newFakeConn()
	done := h.stream(ctx, c)

	c.push(g.heartbeatMsg(h1))
	c.waitFor(t, "the heartbeat handled", c.caughtUp)
	require.Equal(t, []idleCall{{lsn: h1, advanced: true}}, h.ledger.idleCalls())
	h.ledger.flush()
	require.Equal(t, h1, h.ledger.Flushed())

	c.push(x.beginMsg(), g.relationMsg(x), g.insert(x, 42), x.commitMsg(), g.heartbeatMsg(h2))
	e42 := h.next(t)
	c.waitFor(t, "the heartbeat after the transaction handled", c.caughtUp)
	require.Len(t, h.ledger.idleCalls(), 1, "idle advance asked for with something in flight: %v", h.ledger.idleCalls())
	h.ledger.flush()
	require.Equal(t, h1, h.ledger.Flushed())

	h.ledger.settle(t, e42)
	h.ledger.flush()
	c.push(g.heartbeatMsg(h2))
	c.waitFor(t, "the heartbeat after the settle handled", c.caughtUp)
	require.Equal(t, []idleCall{{lsn: h1, advanced: true}, {lsn: h2, advanced: true}}, h.ledger.idleCalls())
	h.ledger.flush()
	require.Equal(t, h2, h.ledger.Flushed())
	c.waitFor(t, "the heartbeat's position confirmed", func() bool {
		s := c.sent()
		return s[len(s)-1].WALFlushPosition == h2
	})
	cancel()
	require.NoError(t, end(t, done))
	require.Equal(t, h2, h.r.resume, "a reconnect starts from the heartbeat's position")
}

// While the consumer does not read, the session keeps sending standby status
// updates (the walsender would otherwise time out), does not take the
// server's silence meanwhile for a dead connection, and loses nothing.
func TestBackpressureKeepsSendingStatus(t *testing.T) {
	t.Parallel()
	g := loadGolden(t)
	x, start := g.t3, g.t1.end
	const status, silence = 50 * time.Millisecond, 500 * time.Millisecond
	h := newHarness(t, g, start, 1, Config{StatusInterval: status, SilenceTimeout: silence})
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	c := newFakeConn()
	c.push(x.beginMsg(), g.relationMsg(x), g.insert(x, 42), g.insert(x, 44), g.insert(x, 43), g.insert(x, 45), x.commitMsg())
	done := h.stream(ctx, c)

	// Row 42 fills the output; the session took row 43 and waits to hand it on.
	c.waitFor(t, "the output full with row 43 waiting", func() bool { return len(h.out) == 1 && c.queued() == 2 })
	blocked := len(c.sent())
	// More status intervals than the silence timeout: wal_sender_timeout
	// would need them, and the silence check must not count them.
	n := int(silence/status) + 2
	c.waitFor(t, "status updates while the output is full", func() bool { return len(c.sent()) >= blocked+n })
	require.Equal(t, 2, c.queued(), "the session read from the server while blocked")
	for _, s := range c.sent()[blocked:] {
		require.Equal(t, start, s.WALFlushPosition)
	}

	require.Equal(t, []int64{42, 43, 45}, ids(h.next(t), h.next(t), h.next(t)))
	c.waitFor(t, "the commit handled", c.caughtUp)
	cancel()
	require.NoError(t, end(t, done), "the session broke after the wait")
	require.Equal(t, x.end, h.r.resume)
}

// A server that sends nothing, although replies were asked for, is taken for
// a dead connection: the session ends with an error and the reader
// reconnects.
func TestSilentServerEndsTheSession(t *testing.T) {
	t.Parallel()
	g := loadGolden(t)
	h := newHarness(t, g, g.t1.end, 16, Config{StatusInterval: 20 * time.Millisecond, SilenceTimeout: 500 * time.Millisecond})
	c := newFakeConn()
	err := end(t, h.stream(t.Context(), c))
	require.ErrorContains(t, err, "no message from the server")
	asked := false
	for _, s := range c.sent() {
		asked = asked || s.ReplyRequested
	}
	require.True(t, asked, "no status asked the server for a reply")
}

// No standby status is sent while the durable position is unknown (zero):
// pglogrepl would turn a zero flush position into the write position and
// confirm what was only received.
func TestNoStatusWithoutADurablePosition(t *testing.T) {
	t.Parallel()
	g := loadGolden(t)
	x := g.t1
	h := newHarness(t, g, 0, 16, Config{})
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	c := newFakeConn()
	c.push(x.beginMsg(), g.relationMsg(x), g.insert(x, 42), x.commitMsg(), keepalive(x.end+0x800, true))
	done := h.stream(ctx, c)
	require.Equal(t, int64(42), h.next(t).ID)
	c.waitFor(t, "the transaction and the keepalive handled", c.caughtUp)
	cancel()
	require.NoError(t, end(t, done))
	require.Empty(t, c.sent())
}

// The stream ends with an error when the server reports one or ends the
// copy: the reader then reconnects.
func TestServerEndingTheStreamEndsTheSession(t *testing.T) {
	t.Parallel()
	g := loadGolden(t)
	for _, tc := range []struct {
		msg  pgproto3.BackendMessage
		want string
	}{
		{&pgproto3.ErrorResponse{Severity: "FATAL", Code: "57P01", Message: "terminating connection due to administrator command"}, "57P01"},
		{&pgproto3.CopyDone{}, "server ended the replication stream"},
	} {
		h := newHarness(t, g, g.t1.end, 16, Config{})
		c := newFakeConn()
		c.push(fakeMsg{msg: tc.msg})
		err := end(t, h.stream(t.Context(), c))
		require.ErrorContains(t, err, tc.want)
		require.NotErrorIs(t, err, errFatal)
		if _, ok := tc.msg.(*pgproto3.ErrorResponse); ok {
			require.True(t, ConnectionLost(err), "an admin shutdown is a lost connection: %v", err)
			var pgErr *pgconn.PgError
			require.ErrorAs(t, err, &pgErr)
		}
	}
}

// After a reconnect the server may send again a transaction this reader
// received whole before: it is skipped, and the next one is handed on.
func TestResentCommittedTransactionIsSkipped(t *testing.T) {
	t.Parallel()
	g := loadGolden(t)
	h := newHarness(t, g, g.t1.final-0x1000, 16, Config{})
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	c1 := newFakeConn()
	c1.push(g.t1.beginMsg(), g.relationMsg(g.t1), g.insert(g.t1, 42), g.t1.commitMsg())
	c1.fail(connReset())
	require.ErrorIs(t, end(t, h.stream(ctx, c1)), syscall.ECONNRESET)
	e42 := h.next(t)
	require.Equal(t, int64(42), e42.ID)
	require.Equal(t, g.t1.end, h.r.resume)
	h.ledger.settle(t, e42)

	c2 := newFakeConn()
	c2.push(g.t1.beginMsg(), g.relationMsg(g.t1), g.insert(g.t1, 42), g.t1.commitMsg(),
		g.t3.beginMsg(), g.insert(g.t3, 44), g.insert(g.t3, 45), g.t3.commitMsg())
	done := h.stream(ctx, c2)
	require.Equal(t, int64(45), h.next(t).ID, "a transaction received before was handed on again")
	c2.waitFor(t, "both transactions handled", c2.caughtUp)
	cancel()
	require.NoError(t, end(t, done))
	require.Empty(t, h.out)
	require.Equal(t, 1, h.ledger.InFlight(), "the resent transaction was opened again")
	require.Equal(t, g.t3.end, h.r.resume)
}

// A cut transaction must come again first: another one in its place means the
// stream is not what this reader thinks it is, which no reconnect fixes.
func TestOtherTransactionAfterCutIsFatal(t *testing.T) {
	t.Parallel()
	g := loadGolden(t)
	h := newHarness(t, g, g.t1.final-0x1000, 16, Config{})
	c1 := newFakeConn()
	c1.push(g.t1.beginMsg(), g.relationMsg(g.t1), g.insert(g.t1, 42))
	c1.fail(connReset())
	require.ErrorIs(t, end(t, h.stream(t.Context(), c1)), syscall.ECONNRESET)
	require.Equal(t, int64(42), h.next(t).ID)

	c2 := newFakeConn()
	c2.push(g.t3.beginMsg())
	err := end(t, h.stream(t.Context(), c2))
	require.ErrorIs(t, err, errFatal)
	require.ErrorContains(t, err, "expected transaction "+g.t1.final.String()+" to be resent")
}
