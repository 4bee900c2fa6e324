package cdc

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5/pgproto3"
	"github.com/rs/zerolog"
	"github.com/stretchr/testify/require"

	"github.com/outboxd/outboxd/checkpoint"
	"github.com/outboxd/outboxd/decode"
	"github.com/outboxd/outboxd/store"
)

// This file holds what the stream tests run on: a fake replication
// connection, pgoutput messages captured from a real server, a ledger that
// records the reader's idle-advance requests, and a harness that runs one
// streaming session after another on one Reader, as reconnects do.

// fakeWait bounds every wait of these tests. Each condition they wait for
// holds within a second; the bound only turns a broken behaviour into a
// failure instead of a hang.
const fakeWait = 20 * time.Second

// fakeConn is a replConn whose server side the test scripts: the messages it
// pushes are received in order, and the standby status updates the stream
// sends are recorded.
type fakeConn struct {
	mu       sync.Mutex
	queue    []fakeMsg
	busy     bool // the stream took a message and has not asked for the next one yet
	statuses []pglogrepl.StandbyStatusUpdate
	wake     chan struct{} // a message was pushed
	intr     chan struct{} // closed by interrupt, until reset
	changed  chan struct{} // a message was taken, the stream came back for more, or a status was sent
}

type fakeMsg struct {
	msg pgproto3.BackendMessage
	err error
}

func newFakeConn() *fakeConn {
	return &fakeConn{wake: make(chan struct{}, 1), changed: make(chan struct{}, 1), intr: make(chan struct{})}
}

func notify(c chan struct{}) {
	select {
	case c <- struct{}{}:
	default:
	}
}

func (f *fakeConn) receive(deadline time.Time) (pgproto3.BackendMessage, error) {
	f.mu.Lock()
	intr := f.intr
	f.mu.Unlock()
	timer := time.NewTimer(time.Until(deadline))
	defer timer.Stop()
	for {
		select {
		case <-intr:
			return nil, nil
		default:
		}
		f.mu.Lock()
		if len(f.queue) > 0 {
			m := f.queue[0]
			f.queue = f.queue[1:]
			f.busy = true
			f.mu.Unlock()
			notify(f.changed)
			return m.msg, m.err
		}
		f.busy = false
		f.mu.Unlock()
		notify(f.changed)
		select {
		case <-f.wake:
		case <-timer.C:
			return nil, nil // as pgReplConn does on pgconn.Timeout
		case <-intr:
			return nil, nil
		}
	}
}

func (f *fakeConn) interrupt() {
	f.mu.Lock()
	defer f.mu.Unlock()
	select {
	case <-f.intr:
	default:
		close(f.intr)
	}
}

func (f *fakeConn) reset() {
	f.mu.Lock()
	defer f.mu.Unlock()
	select {
	case <-f.intr:
		f.intr = make(chan struct{})
	default:
	}
}

func (f *fakeConn) sendStatus(_ context.Context, s pglogrepl.StandbyStatusUpdate) error {
	f.mu.Lock()
	f.statuses = append(f.statuses, s)
	f.mu.Unlock()
	notify(f.changed)
	return nil
}

func (f *fakeConn) push(ms ...fakeMsg) {
	f.mu.Lock()
	f.queue = append(f.queue, ms...)
	f.mu.Unlock()
	notify(f.wake)
}

// fail makes the connection break once everything pushed before is received.
func (f *fakeConn) fail(err error) { f.push(fakeMsg{err: err}) }

// sent returns the status updates sent so far.
func (f *fakeConn) sent() []pglogrepl.StandbyStatusUpdate {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]pglogrepl.StandbyStatusUpdate(nil), f.statuses...)
}

// queued returns the number of pushed messages not received yet.
func (f *fakeConn) queued() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.queue)
}

// caughtUp reports whether the stream received and handled everything pushed:
// it is back waiting for the next message.
func (f *fakeConn) caughtUp() bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.queue) == 0 && !f.busy
}

// waitFor waits until cond holds, checking it whenever the stream does
// something on the connection.
func (f *fakeConn) waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	limit := time.NewTimer(fakeWait)
	defer limit.Stop()
	for !cond() {
		select {
		case <-f.changed:
		case <-limit.C:
			t.Fatalf("waited %s for: %s", fakeWait, what)
		}
	}
}

// The replication protocol's CopyData payloads, as in
// https://www.postgresql.org/docs/current/protocol-replication.html (section
// "START_REPLICATION"): XLogData ('w') around each pgoutput message, and the
// primary keepalive ('k').

func xlog(walStart pglogrepl.LSN, data []byte) fakeMsg {
	b := []byte{pglogrepl.XLogDataByteID}
	b = binary.BigEndian.AppendUint64(b, uint64(walStart))
	b = binary.BigEndian.AppendUint64(b, uint64(walStart)) // server WAL end
	b = binary.BigEndian.AppendUint64(b, 0)                // server clock: unused
	return fakeMsg{msg: &pgproto3.CopyData{Data: append(b, data...)}}
}

func keepalive(walEnd pglogrepl.LSN, reply bool) fakeMsg {
	b := []byte{pglogrepl.PrimaryKeepaliveMessageByteID}
	b = binary.BigEndian.AppendUint64(b, uint64(walEnd))
	b = binary.BigEndian.AppendUint64(b, 0)
	if reply {
		return fakeMsg{msg: &pgproto3.CopyData{Data: append(b, 1)}}
	}
	return fakeMsg{msg: &pgproto3.CopyData{Data: append(b, 0)}}
}

// golden holds pgoutput messages captured from a real Postgres by
// decode/internal/capture (decode/testdata): the outbox's relation message
// and inserts of rows 42 to 45, the Begin and Commit of two of its
// transactions, and a logical decoding message. Row 44 has is_processed =
// true.
type golden struct {
	relID  uint32
	rel    []byte
	ins    map[int64][]byte
	t1, t3 txnMsgs // transactions 1 (row 42) and 3 (rows 44, 45)
	// heartbeat is a non-transactional logical decoding message with the
	// reader's heartbeat prefix.
	heartbeat []byte
}

type txnMsgs struct {
	begin, commit []byte
	final, end    pglogrepl.LSN
}

func loadGolden(t *testing.T) golden {
	t.Helper()
	file := func(n int) []byte {
		m, err := filepath.Glob(fmt.Sprintf("../decode/testdata/wal_%03d_*.bin", n))
		require.NoError(t, err)
		require.Len(t, m, 1, "golden message %d", n)
		b, err := os.ReadFile(m[0])
		require.NoError(t, err)
		return b
	}
	d := decode.NewDecoder(decode.Table{Schema: "public", Name: "domain_event"})
	decodeAs := func(b []byte, kind decode.Kind) decode.Message {
		m, err := d.Decode(b)
		require.NoError(t, err)
		require.Equal(t, kind, m.Kind)
		return m
	}
	txn := func(begin, commit int) txnMsgs {
		x := txnMsgs{begin: file(begin), commit: file(commit)}
		x.final = decodeAs(x.begin, decode.KindBegin).Begin.FinalLSN
		c := decodeAs(x.commit, decode.KindCommit).Commit
		require.Equal(t, x.final, c.CommitLSN)
		x.end = c.EndLSN
		return x
	}
	g := golden{rel: file(1), ins: map[int64][]byte{}}
	g.relID = decodeAs(g.rel, decode.KindRelation).Relation.ID
	d = decode.NewDecoder(decode.Table{Schema: "public", Name: "domain_event", OID: g.relID})
	decodeAs(g.rel, decode.KindRelation)
	for n, id := range map[int]int64{2: 42, 5: 43, 8: 44, 9: 45} {
		g.ins[id] = file(n)
		e := decodeAs(g.ins[id], decode.KindEvent).Event
		require.Equal(t, id, e.ID)
		require.Equal(t, id == 44, e.Processed)
	}
	g.t1, g.t3 = txn(0, 3), txn(7, 10)
	// The capture emitted its non-transactional message with the prefix
	// outboxd-heartbeat; the reader's heartbeat uses outboxd_heartbeat, of
	// the same length: one byte makes it ours.
	g.heartbeat = bytes.Replace(file(32), []byte("outboxd-heartbeat\x00"), []byte(HeartbeatPrefix+"\x00"), 1)
	l := decodeAs(g.heartbeat, decode.KindLogical).Logical
	require.Equal(t, HeartbeatPrefix, l.Prefix)
	require.False(t, l.Transactional)
	require.Less(t, g.t1.end, g.t3.final)
	return g
}

// heartbeatMsg wraps the heartbeat message in XLogData at lsn.
func (g golden) heartbeatMsg(lsn pglogrepl.LSN) fakeMsg { return xlog(lsn, g.heartbeat) }

// beginMsg, commitMsg, relationMsg and insert wrap the golden messages in
// XLogData as the server sends them within transaction x.
func (x txnMsgs) beginMsg() fakeMsg                 { return xlog(x.final, x.begin) }
func (x txnMsgs) commitMsg() fakeMsg                { return xlog(x.end, x.commit) }
func (g golden) relationMsg(x txnMsgs) fakeMsg      { return xlog(x.final, g.rel) }
func (g golden) insert(x txnMsgs, id int64) fakeMsg { return xlog(x.final, g.ins[id]) }

// spyLedger is the real tracker, recording the reader's idle-advance
// requests with what was in flight when each came.
type spyLedger struct {
	*checkpoint.Tracker
	mu   sync.Mutex
	idle []idleCall
}

type idleCall struct {
	lsn      pglogrepl.LSN
	inFlight int
	advanced bool
}

func (l *spyLedger) AdvanceIdle(lsn pglogrepl.LSN) bool {
	n := l.InFlight()
	ok := l.Tracker.AdvanceIdle(lsn)
	l.mu.Lock()
	l.idle = append(l.idle, idleCall{lsn: lsn, inFlight: n, advanced: ok})
	l.mu.Unlock()
	return ok
}

func (l *spyLedger) idleCalls() []idleCall {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]idleCall(nil), l.idle...)
}

// settle settles e as delivered, as the dispatcher does.
func (l *spyLedger) settle(t *testing.T, e *decode.Event) {
	t.Helper()
	require.NoError(t, l.Settle(e.TxnSeq, checkpoint.Settlement{EventID: e.ID, Mark: &store.Mark{ID: e.ID, Attempts: 1}}))
}

// flush writes what settled, as the flusher does after its database
// transaction committed.
func (l *spyLedger) flush() {
	b := l.Drain()
	l.Written(b.LSN)
}

// harness is a Reader without a database: its streaming sessions run on fake
// connections, from start, as after a prepare that returned start.
type harness struct {
	r      *Reader
	ledger *spyLedger
	out    chan *decode.Event
}

func newHarness(t *testing.T, g golden, start pglogrepl.LSN, outCap int, cfg Config) *harness {
	t.Helper()
	cfg.ConnString, cfg.Slot, cfg.Publication = "postgres://unused", "test", "outboxd"
	cfg.Table = decode.Table{Schema: "public", Name: "domain_event", MessageNamespace: "0a1b2c3d4e5f6789"}
	if cfg.StatusInterval == 0 {
		cfg.StatusInterval = 10 * time.Millisecond
	}
	if cfg.SilenceTimeout == 0 {
		cfg.SilenceTimeout = time.Hour
	}
	cfg = cfg.WithDefaults()
	require.NoError(t, cfg.Validate())
	l := &spyLedger{Tracker: checkpoint.NewTracker(start, 1000)}
	r := NewReader(cfg, l, nil, zerolog.Nop())
	r.rels = tableOIDs{outbox: g.relID}
	r.resume, r.received = start, start
	return &harness{r: r, ledger: l, out: make(chan *decode.Event, outCap)}
}

// stream runs a streaming session on conn until it breaks or stop ends.
func (h *harness) stream(stop context.Context, conn replConn) <-chan error {
	st := &stream{r: h.r, conn: conn, out: h.out, stop: stop, nextStatus: time.Now()}
	done := make(chan error, 1)
	go func() { done <- st.run(stop) }()
	return done
}

// next returns the next event handed downstream.
func (h *harness) next(t *testing.T) *decode.Event {
	t.Helper()
	select {
	case e := <-h.out:
		return e
	case <-time.After(fakeWait):
		t.Fatalf("no event handed downstream within %s", fakeWait)
		return nil
	}
}

// end waits for a session to end and returns its error.
func end(t *testing.T, done <-chan error) error {
	t.Helper()
	select {
	case err := <-done:
		return err
	case <-time.After(fakeWait):
		t.Fatalf("the session did not end within %s", fakeWait)
		return nil
	}
}
