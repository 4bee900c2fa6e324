package checkpoint

import (
	"math/rand/v2"
	"testing"

	"github.com/jackc/pglogrepl"
	"github.com/stretchr/testify/require"

	"github.com/outboxd/outboxd/store"
)

func TestTrackerAdvancesOnlyOverSettledPrefix(t *testing.T) {
	t.Parallel()
	tr := NewTracker(100, 1000)
	a := tr.Open(110, false)
	b := tr.Open(210, false)
	c := tr.Open(310, false)
	require.NoError(t, tr.Close(a, 120, 2))
	require.NoError(t, tr.Close(b, 220, 1))
	require.NoError(t, tr.Close(c, 320, 1))

	// Later transactions settle first: the mark must not move.
	require.NoError(t, tr.Settle(c, Settlement{Mark: &store.Mark{ID: 4, Attempts: 1}}))
	require.NoError(t, tr.Settle(b, Settlement{Mark: &store.Mark{ID: 3, Attempts: 1}}))
	require.NoError(t, tr.Settle(a, Settlement{Mark: &store.Mark{ID: 1, Attempts: 1}}))
	batch := tr.Drain()
	require.Zero(t, batch.LSN, "transaction a still has an unsettled event")
	require.Empty(t, batch.Marks, "rows are marked with the checkpoint that passes their transaction")
	require.Equal(t, 3, tr.InFlight())

	// The last event of a settles, now all three are done.
	require.NoError(t, tr.Settle(a, Settlement{EventID: 2, Attempts: 1, Dead: []store.DeadLetter{{EventID: 2, Sink: "webhook", Reason: "400"}}}))
	batch = tr.Drain()
	require.Equal(t, pglogrepl.LSN(320), batch.LSN)
	require.Len(t, batch.Dead, 1)
	require.Equal(t, []store.Mark{{ID: 2, Attempts: 1}}, batch.Attempts)
	require.Equal(t, 4, batch.Events())
	lo, hi, _ := store.Ranges(batch.Marks)
	require.Equal(t, []int64{1, 3}, lo)
	require.Equal(t, []int64{1, 4}, hi)
	require.Zero(t, tr.InFlight())

	// Flushed only moves when told, and never backwards.
	require.Equal(t, pglogrepl.LSN(100), tr.Flushed())
	tr.setFlushed(320)
	tr.setFlushed(200)
	require.Equal(t, pglogrepl.LSN(320), tr.Flushed())
}

func TestTrackerOpenTransactionBlocksPrefix(t *testing.T) {
	t.Parallel()
	tr := NewTracker(1, 1000)
	a := tr.Open(10, false)
	require.NoError(t, tr.Settle(a, Settlement{Mark: &store.Mark{ID: 1, Attempts: 1}}))
	// All dispatched events settled, but the commit has not been read yet.
	require.Zero(t, tr.Drain().LSN)
	require.False(t, tr.AdvanceIdle(50), "an open transaction is in flight")
	require.NoError(t, tr.Close(a, 20, 1))
	require.Equal(t, pglogrepl.LSN(20), tr.Drain().LSN)
}

func TestTrackerEmptyTransactionSettlesAtClose(t *testing.T) {
	t.Parallel()
	tr := NewTracker(1, 1000)
	a := tr.Open(10, false)
	require.NoError(t, tr.Close(a, 20, 0))
	require.Equal(t, pglogrepl.LSN(20), tr.Drain().LSN)
	require.Error(t, tr.Close(a, 20, 0), "closing twice is a bug")
	require.Error(t, tr.Settle(a, Settlement{Mark: &store.Mark{ID: 1}}), "settling a finished transaction is a bug")
}

func TestTrackerIdleAdvanceWaitsForDurability(t *testing.T) {
	t.Parallel()
	tr := NewTracker(1, 1000)
	a := tr.Open(10, false)
	require.NoError(t, tr.Close(a, 20, 1))
	require.NoError(t, tr.Settle(a, Settlement{Mark: &store.Mark{ID: 1, Attempts: 1}}))
	// Settled but not yet written: a keepalive must not be confirmed.
	require.False(t, tr.AdvanceIdle(500))
	b := tr.Drain()
	require.False(t, tr.AdvanceIdle(500), "drained but not yet written")
	tr.Written(b.LSN)
	require.True(t, tr.AdvanceIdle(500))
	// Recorded before confirmed: the idle position is written by the next
	// flush like a transaction's end, and only then is it durable.
	require.Equal(t, pglogrepl.LSN(20), tr.Flushed(), "not confirmed before it is written")
	require.False(t, tr.AdvanceIdle(600), "one idle position in flight at a time")
	b = tr.Drain()
	require.Equal(t, pglogrepl.LSN(500), b.LSN)
	tr.Written(b.LSN)
	require.Equal(t, pglogrepl.LSN(500), tr.Flushed())
	require.False(t, tr.AdvanceIdle(400), "never backwards")
}

func TestTrackerCatchupFlag(t *testing.T) {
	t.Parallel()
	tr := NewTracker(5, 1000)
	c := tr.Open(0, true)
	require.NoError(t, tr.Settle(c, Settlement{Mark: &store.Mark{ID: 8, Attempts: 1}}))
	b := tr.Drain()
	require.False(t, b.CatchupDone)
	require.Len(t, b.Marks, 1, "catch-up rows are marked as they settle: they are not in the stream")
	tr.Written(b.LSN)
	require.NoError(t, tr.Close(c, 5, 2))
	require.False(t, tr.Drain().CatchupDone)
	require.NoError(t, tr.Settle(c, Settlement{Mark: &store.Mark{ID: 9, Attempts: 1}}))
	b = tr.Drain()
	require.True(t, b.CatchupDone)
	require.Zero(t, b.LSN, "the catch-up ends at the start position")
	require.False(t, tr.AdvanceIdle(50), "catch-up marks are not written yet")
	tr.Written(b.LSN)
	require.True(t, tr.AdvanceIdle(50))
}

// TestTrackerRandomSettleOrder settles many transactions in random order and
// checks after every step that the drained LSN never passes a transaction
// with an unsettled event.
func TestTrackerRandomSettleOrder(t *testing.T) {
	t.Parallel()
	rng := rand.New(rand.NewPCG(1, 2))
	tr := NewTracker(1, 1<<30)
	type ev struct {
		seq uint64
		id  int64
	}
	var events []ev
	end := map[uint64]pglogrepl.LSN{}
	remaining := map[uint64]int{}
	id := int64(0)
	for i := range 200 {
		n := rng.IntN(4)
		seq := tr.Open(pglogrepl.LSN(i*100+10), false)
		for range n {
			id++
			events = append(events, ev{seq, id})
		}
		end[seq] = pglogrepl.LSN(i*100 + 20)
		remaining[seq] = n
		require.NoError(t, tr.Close(seq, end[seq], n))
	}
	rng.Shuffle(len(events), func(i, j int) { events[i], events[j] = events[j], events[i] })
	var flushed pglogrepl.LSN
	for _, e := range events {
		require.NoError(t, tr.Settle(e.seq, Settlement{Mark: &store.Mark{ID: e.id, Attempts: 1}}))
		remaining[e.seq]--
		if b := tr.Drain(); b.LSN != 0 {
			flushed = b.LSN
			tr.setFlushed(b.LSN)
		}
		for seq, n := range remaining {
			if n > 0 {
				require.Less(t, flushed, end[seq], "mark passed transaction %d with %d unsettled events", seq, n)
			}
		}
	}
	require.Equal(t, end[199], flushed)
}

func TestRanges(t *testing.T) {
	t.Parallel()
	var rs []store.Range
	for _, m := range []store.Mark{{ID: 5, Attempts: 1}, {ID: 3, Attempts: 1}, {ID: 4, Attempts: 1}, {ID: 7, Attempts: 1}, {ID: 8, Attempts: 2}, {ID: 9, Attempts: 2}, {ID: 4, Attempts: 1}, {ID: 1, Attempts: 3}, {ID: 10, Attempts: 2}} {
		rs = appendMark(rs, m)
	}
	lo, hi, n := store.Ranges(rs)
	require.Equal(t, []int64{1, 3, 7, 8}, lo)
	require.Equal(t, []int64{1, 5, 7, 10}, hi)
	require.Equal(t, []int32{3, 1, 1, 2}, n)
}

// A large transaction whose events settle out of id order (eight keys
// interleaved, each settled in runs of 50 as concurrent batches do) holds
// mark ranges in proportion to the events in flight, not to its rows, and
// marks every row once.
func TestLargeTransactionKeepsFewRanges(t *testing.T) {
	t.Parallel()
	const n, keys, run = 200000, 8, 50
	tr := NewTracker(1, 1<<30)
	seq := tr.Open(10, false)
	require.NoError(t, tr.Close(seq, 20, n))
	most := 0
	for base := int64(1); base <= n; base += keys * run {
		for k := range int64(keys) {
			for i := range int64(run) {
				if id := base + k + i*keys; id <= n {
					require.NoError(t, tr.Settle(seq, Settlement{Mark: &store.Mark{ID: id, Attempts: 1}}))
				}
			}
			tr.mu.Lock()
			if x, err := tr.get(seq); err == nil {
				most = max(most, cap(x.work.Marks))
			}
			tr.mu.Unlock()
		}
	}
	require.LessOrEqual(t, most, 4*compactFrom, "ranges held for %d rows", n)
	b := tr.Drain()
	require.Equal(t, pglogrepl.LSN(20), b.LSN)
	require.Equal(t, n, b.Events())
	lo, hi, att := store.Ranges(b.Marks)
	require.Equal(t, []int64{1}, lo)
	require.Equal(t, []int64{n}, hi)
	require.Equal(t, []int32{1}, att)
}
