package checkpoint

import (
	"fmt"
	"sync"
	"sync/atomic"

	"github.com/jackc/pglogrepl"

	"github.com/outboxd/outboxd/store"
)

// Settlement is the fate of one event once every sink it was routed to has
// settled it: Mark when all acknowledged it (the row becomes processed);
// otherwise Attempts counts the attempts made and Dead and Parked say why.
type Settlement struct {
	// EventID is the event's id (Mark.ID when Mark is set).
	EventID  int64
	Mark     *store.Mark
	Attempts int32
	Dead     []store.DeadLetter
	Parked   []store.Park
	// State, when set, is the routing state after this event (a subscription
	// change); the checkpoint keeps the state of its position.
	State []byte
}

// compactFrom is the number of mark ranges from which a full slice of them
// is compacted before it grows.
const compactFrom = 1024

// appendMark adds m to rs, extending the last range when m continues it.
// Events settle out of id order (keys interleave, calls run concurrently),
// so a large transaction would hold a range per event until it settles
// whole: a full slice is compacted first (sorted and merged), and its
// ranges then number about the events still in flight, not the rows of the
// transaction.
func appendMark(rs []store.Range, m store.Mark) []store.Range {
	if len(rs) >= compactFrom && len(rs) == cap(rs) {
		rs = store.CompactRanges(rs)
	}
	if k := len(rs) - 1; k >= 0 && rs[k].Hi+1 == m.ID && rs[k].Attempts == m.Attempts {
		rs[k].Hi = m.ID
		return rs
	}
	return append(rs, store.Range{Lo: m.ID, Hi: m.ID, Attempts: m.Attempts})
}

// addSettlement adds a settled event's work to b.
func addSettlement(b *store.Batch, s Settlement) {
	if s.Mark != nil {
		b.Marks = appendMark(b.Marks, *s.Mark)
	} else if s.Attempts > 0 {
		b.Attempts = append(b.Attempts, store.Mark{ID: s.EventID, Attempts: s.Attempts})
	}
	b.Dead = append(b.Dead, s.Dead...)
	b.Parked = append(b.Parked, s.Parked...)
	if s.State != nil {
		b.State = s.State
	}
}

type txn struct {
	commitLSN pglogrepl.LSN
	endLSN    pglogrepl.LSN
	total     int
	settled   int
	closed    bool
	catchup   bool
	work      store.Batch // settled events, written when the transaction leaves the prefix
}

func (x *txn) done() bool { return x.closed && x.settled == x.total }

// Tracker follows in-flight transactions and their settled events. It is safe
// for concurrent use: the reader opens and closes transactions, delivery
// workers settle events, the flusher drains.
type Tracker struct {
	mu        sync.Mutex
	base      uint64        // sequence number of txns[0]
	txns      []txn         // open or unsettled transactions, in commit order
	next      uint64        // sequence number the next Open returns
	work      store.Batch   // of transactions that left the prefix, not yet drained
	ready     int           // events in work
	prefix    pglogrepl.LSN // end LSN of the settled prefix, not yet drained
	catchup   bool          // the catch-up pseudo-transaction left the prefix
	unwritten bool          // a drained batch is not yet written
	flushSize int

	flushed atomic.Uint64
	kick    chan struct{}
}

// NewTracker returns a tracker whose durable position starts at start (the
// stored checkpoint, or the slot's consistent point). flushSize is the number of
// settled events after which Kick fires.
func NewTracker(start pglogrepl.LSN, flushSize int) *Tracker {
	if flushSize <= 0 {
		flushSize = 1000
	}
	t := &Tracker{flushSize: flushSize, kick: make(chan struct{}, 1)}
	t.flushed.Store(uint64(start))
	return t
}

// Open registers a transaction whose commit record is at commitLSN and returns
// its sequence number. Transactions must be opened in commit order. catchup
// marks the pseudo-transaction of rows read from the table.
func (t *Tracker) Open(commitLSN pglogrepl.LSN, catchup bool) uint64 {
	t.mu.Lock()
	defer t.mu.Unlock()
	seq := t.next
	t.next++
	if len(t.txns) == 0 {
		t.base = seq
	}
	t.txns = append(t.txns, txn{commitLSN: commitLSN, catchup: catchup})
	return seq
}

// Close records that transaction seq ended at endLSN after dispatching events
// events. A transaction with no events settles at once.
func (t *Tracker) Close(seq uint64, endLSN pglogrepl.LSN, events int) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	x, err := t.get(seq)
	if err != nil {
		return err
	}
	if x.closed {
		return fmt.Errorf("close transaction %d: already closed", seq)
	}
	x.closed, x.endLSN, x.total = true, endLSN, events
	t.advance()
	return nil
}

// Settle records the fate of an event of transaction seq. Its row is marked
// when the whole transaction has settled, in the flush that also moves the
// checkpoint past it: a row marked processed is never streamed again.
func (t *Tracker) Settle(seq uint64, s Settlement) error {
	t.mu.Lock()
	x, err := t.get(seq)
	if err != nil {
		t.mu.Unlock()
		return err
	}
	x.settled++
	if x.catchup {
		// Catch-up rows are not in the slot's stream, so marking them before
		// the whole catch-up settles cannot cause a second delivery, and a
		// crash in a long catch-up keeps its progress.
		addSettlement(&t.work, s)
		t.ready++
	} else {
		addSettlement(&x.work, s)
	}
	if x.done() {
		t.advance()
	}
	full := t.ready >= t.flushSize
	t.mu.Unlock()
	if full {
		t.Kick()
	}
	return nil
}

// Kick asks the flusher to flush now.
func (t *Tracker) Kick() {
	select {
	case t.kick <- struct{}{}:
	default:
	}
}

// Kicked fires when enough events settled for a flush, or Kick was called.
func (t *Tracker) Kicked() <-chan struct{} { return t.kick }

// advance pops the settled prefix. Caller holds mu.
func (t *Tracker) advance() {
	i := 0
	for i < len(t.txns) && t.txns[i].done() {
		x := &t.txns[i]
		if x.endLSN > t.prefix {
			t.prefix = x.endLSN
		}
		t.catchup = t.catchup || x.catchup
		if !x.catchup {
			t.work.Merge(x.work)
			t.ready += x.total
		}
		i++
	}
	if i == 0 {
		return
	}
	t.base += uint64(i)
	// Drop the head without moving the rest: with thousands of single-row
	// transactions in flight, copying them down on every pop dominated
	// Settle. append reallocates (copying only live entries) when the
	// capacity runs out, so this stays amortised O(1).
	clear(t.txns[:i])
	t.txns = t.txns[i:]
}

func (t *Tracker) get(seq uint64) (*txn, error) {
	if seq < t.base || seq-t.base >= uint64(len(t.txns)) {
		return nil, fmt.Errorf("transaction %d is not in flight", seq)
	}
	return &t.txns[seq-t.base], nil
}

// InFlight returns the number of transactions that are open or not fully
// settled. Every unsettled event belongs to one of them, so zero means nothing
// is in flight.
func (t *Tracker) InFlight() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.txns)
}

// AdvanceIdle moves the durable position to lsn when nothing is in flight,
// everything settled is already written, and lsn is ahead; it reports whether
// it did. The reader calls it with a keepalive's server WAL end: with no
// transaction of ours before lsn left unrecorded, confirming it loses nothing,
// and an idle outbox on a busy server does not pin WAL (G7).
func (t *Tracker) AdvanceIdle(lsn pglogrepl.LSN) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	flushed := t.flushed.Load()
	if len(t.txns) != 0 || t.unwritten || uint64(t.prefix) > flushed || t.ready != 0 || t.work.State != nil || t.catchup {
		return false
	}
	if uint64(lsn) <= flushed {
		return false
	}
	// Recorded first, confirmed after: the position goes to the flusher like
	// a settled transaction's, and Flushed moves only once it is written. A
	// slot is then never confirmed past the checkpoint, and a slot found
	// ahead of it at start was advanced by someone else.
	t.prefix = lsn
	t.Kick() // a non-blocking send: safe under mu
	return true
}

// Drain takes what settled since the last drain. The returned batch must be
// written by the flusher and then reported with Written.
func (t *Tracker) Drain() store.Batch {
	t.mu.Lock()
	defer t.mu.Unlock()
	b := t.work // work never carries an LSN or CatchupDone: the tracker decides those
	b.CatchupDone = t.catchup
	if uint64(t.prefix) > t.flushed.Load() {
		b.LSN = t.prefix
	}
	t.work, t.catchup, t.ready = store.Batch{}, false, 0
	t.unwritten = t.unwritten || !b.Empty()
	return b
}

// Written reports that everything drained so far is durable, up to lsn
// (zero when the batches did not move the position).
func (t *Tracker) Written(lsn pglogrepl.LSN) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.unwritten = false
	t.setFlushed(lsn)
}

// Resume records the durable position the stream resumes from: the stored
// checkpoint, or the consistent point of a slot just created (whose
// checkpoint row says so). It never moves the position backwards. Besides
// it, only a written batch (Written) moves the position: nothing else tells
// Postgres what is durable.
func (t *Tracker) Resume(lsn pglogrepl.LSN) { t.setFlushed(lsn) }

// setFlushed publishes lsn as durable. It never moves backwards.
func (t *Tracker) setFlushed(lsn pglogrepl.LSN) {
	for {
		cur := t.flushed.Load()
		if uint64(lsn) <= cur || t.flushed.CompareAndSwap(cur, uint64(lsn)) {
			return
		}
	}
}

// Flushed returns the durable position: every transaction ending at or before
// it is settled and recorded in the database.
func (t *Tracker) Flushed() pglogrepl.LSN { return pglogrepl.LSN(t.flushed.Load()) }
