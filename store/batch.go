package store

import (
	"cmp"
	"slices"
	"time"

	"github.com/jackc/pglogrepl"
)

// Checkpoint is the durable position of one slot.
type Checkpoint struct {
	Slot string
	// LSN is the end LSN of the last transaction whose events are all settled
	// and recorded, or an idle position reported by the server, written
	// before it was confirmed to the slot.
	LSN pglogrepl.LSN
	// SystemID and Timeline identify the cluster the LSN belongs to.
	SystemID string
	Timeline int32
	// CatchupPending is true from slot creation until every row that was
	// unprocessed in the slot's snapshot has settled.
	CatchupPending bool
	UpdatedAt      time.Time
	// Routing is the subscription registry as of LSN (JSON), nil when
	// unknown.
	Routing []byte
	// ConfirmsRecorded is true when the checkpoint was written by a version
	// that records every position before confirming it to the slot: the
	// slot's confirmed_flush_lsn is then never ahead of LSN unless someone
	// else advanced it.
	ConfirmsRecorded bool
}

// Mark records that one event was acknowledged by every sink it was routed to.
type Mark struct {
	ID       int64
	Attempts int32
}

// Range is a run of consecutive event ids settled with the same number of
// attempts; marks travel as ranges to keep a huge transaction small.
type Range struct {
	Lo, Hi   int64
	Attempts int32
}

// DeadLetter records that one event was given up on by a sink.
type DeadLetter struct {
	EventID  int64
	Sink     string
	Status   int
	Reason   string
	Attempts int32
}

// Park records a delivery that ran out of in-memory retries (or was held
// behind such a delivery of the same ordering key): it is retried later from
// the table, and counts as settled for the checkpoint.
type Park struct {
	EventID   int64
	Target    string
	Key       int64 // ordering key: parked deliveries of one key are retried in order
	CommitLSN pglogrepl.LSN
	Index     int32 // position in the transaction
	Attempts  int32
	// RetryIn is how long after now (the database's clock, which the
	// retrier compares next_attempt_at with) the first retry is due.
	RetryIn time.Duration
	Status  int
	Reason  string
}

// Batch is what one flush writes: rows to mark processed, attempts of rows
// that stay unprocessed, dead letters, parked deliveries, the routing state
// and the new checkpoint LSN when the settled prefix moved (zero otherwise).
type Batch struct {
	Marks       []Range
	Attempts    []Mark
	Dead        []DeadLetter
	Parked      []Park
	State       []byte
	LSN         pglogrepl.LSN
	CatchupDone bool
}

// Empty reports whether the batch has nothing to write.
func (b *Batch) Empty() bool {
	return len(b.Marks) == 0 && len(b.Attempts) == 0 && len(b.Dead) == 0 && len(b.Parked) == 0 &&
		b.State == nil && b.LSN == 0 && !b.CatchupDone
}

// Events is the number of events the batch settles.
func (b *Batch) Events() int {
	n := len(b.Attempts)
	for _, r := range b.Marks {
		n += int(r.Hi - r.Lo + 1)
	}
	return n
}

// Merge appends a later batch to b (used when a flush failed and is retried).
func (b *Batch) Merge(later Batch) {
	b.Marks = append(b.Marks, later.Marks...)
	b.Attempts = append(b.Attempts, later.Attempts...)
	b.Dead = append(b.Dead, later.Dead...)
	b.Parked = append(b.Parked, later.Parked...)
	if later.State != nil {
		b.State = later.State
	}
	if later.LSN > b.LSN {
		b.LSN = later.LSN
	}
	b.CatchupDone = b.CatchupDone || later.CatchupDone
}

// CompactRanges normalises mark ranges in place and returns them: sorted by
// low id, merged where they touch with the same attempt count. An id in two
// ranges (a duplicate delivery) is kept in the first.
func CompactRanges(rs []Range) []Range {
	slices.SortFunc(rs, func(a, b Range) int { return cmp.Compare(a.Lo, b.Lo) })
	out := rs[:0]
	for _, r := range rs {
		k := len(out) - 1
		if k >= 0 && r.Lo <= out[k].Hi { // overlap: a duplicate delivery
			if r.Hi <= out[k].Hi {
				continue
			}
			r.Lo = out[k].Hi + 1
		}
		if k >= 0 && out[k].Hi+1 == r.Lo && out[k].Attempts == r.Attempts {
			out[k].Hi = r.Hi
			continue
		}
		out = append(out, r)
	}
	return out
}

// Ranges normalises mark ranges for the marking statement (CompactRanges,
// on a copy) as parallel arrays of low id, high id and attempts.
func Ranges(marks []Range) (lo, hi []int64, n []int32) {
	rs := CompactRanges(slices.Clone(marks))
	lo, hi, n = make([]int64, len(rs)), make([]int64, len(rs)), make([]int32, len(rs))
	for i, r := range rs {
		lo[i], hi[i], n[i] = r.Lo, r.Hi, r.Attempts
	}
	return lo, hi, n
}
