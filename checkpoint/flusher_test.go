package checkpoint

import (
	"bytes"
	"context"
	"errors"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/outboxd/outboxd/store"
)

// slowWriter is a database whose writes take perMiB per MiB of routing
// state and perRow per row marked: a write whose context leaves less than
// that fails at its deadline, as a write cut by it would.
type slowWriter struct {
	perMiB, perRow time.Duration
	written        []store.Batch
}

func (w *slowWriter) Write(ctx context.Context, b store.Batch) error {
	need := time.Duration(len(b.State))*w.perMiB/(1<<20) + time.Duration(b.Events())*w.perRow
	if d, ok := ctx.Deadline(); ok && time.Until(d) < need {
		<-ctx.Done() // cut by its deadline, as a write over a connection is
		return ctx.Err()
	}
	w.written = append(w.written, b)
	return nil
}

func (w *slowWriter) Resolve(context.Context, ...store.Resolution) error { return nil }

func (w *slowWriter) Committed(context.Context, *store.InDoubtError) (bool, error) {
	return false, errors.New("slowWriter: no write is in doubt")
}

// A routing state large enough that its write outlasts WriteTimeout must
// still be written: with a fixed timeout, every retry carried the same state
// and failed the same way, and the checkpoint never moved again.
func TestFlushGivesALargeRoutingStateTime(t *testing.T) {
	tr := NewTracker(0, 1)
	// Half a second a MiB against a 100 ms timeout: 4 MiB need 2 s.
	w := &slowWriter{perMiB: 500 * time.Millisecond}
	f := &Flusher{Tracker: tr, Writer: w, WriteTimeout: 100 * time.Millisecond, Log: zerolog.Nop()}
	seq := tr.Open(100, false)
	state := bytes.Repeat([]byte{'x'}, 4<<20)
	if err := tr.Settle(seq, Settlement{State: state}); err != nil {
		t.Fatal(err)
	}
	if err := tr.Close(seq, 200, 1); err != nil {
		t.Fatal(err)
	}
	if err := f.flush(context.Background(), 0); err != nil {
		if errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("the write of a %d MiB routing state was given too little time: %v", len(state)>>20, err)
		}
		t.Fatal(err)
	}
	if len(w.written) != 1 || !bytes.Equal(w.written[0].State, state) || w.written[0].LSN != 200 {
		t.Fatalf("written %d batches; want the state and the checkpoint at 0/C8", len(w.written))
	}
}

// The marks of a million-row transaction are one long UPDATE: the write that
// carries them, in a flush and in the last flush at a stop, must be given the
// time its rows need (a stop used to give up the marks after FinalTimeout,
// exit 1, and have every event delivered again).
func TestFlushGivesManyMarksTime(t *testing.T) {
	for _, final := range []bool{false, true} {
		tr := NewTracker(0, 1)
		// 5 µs a row against 100 ms: 2,000,000 rows need 10 s.
		w := &slowWriter{perRow: 5 * time.Microsecond}
		f := &Flusher{Tracker: tr, Writer: w, WriteTimeout: 100 * time.Millisecond, FinalTimeout: 100 * time.Millisecond, Log: zerolog.Nop()}
		f.pending = store.Batch{Marks: []store.Range{{Lo: 1, Hi: 2_000_000, Attempts: 1}}, LSN: 200}
		var err error
		if final {
			ctx, cancel := context.WithCancel(context.Background())
			cancel() // Run's context ended: the last flush outlives it
			err = f.final(ctx)
		} else {
			err = f.flush(context.Background(), 0)
		}
		if err != nil {
			t.Fatalf("final %v: the write of 2,000,000 marks was given too little time: %v", final, err)
		}
		if len(w.written) != 1 || w.written[0].Events() != 2_000_000 {
			t.Fatalf("final %v: written %d batches", final, len(w.written))
		}
	}
}

// A write slower than every allowance (a loaded machine: the million-row
// marking took over 30 s on one) must get through on a retry: each retry
// after a timeout gets twice the time, where a fixed timeout failed it
// forever.
func TestFlushRetriesATimedOutWriteWithMoreTime(t *testing.T) {
	tr := NewTracker(0, 1)
	// 1,000 rows at 60 times the allowance per row: 1.2 s needed, 70 ms
	// given at first; the sixth try gets 2.24 s.
	w := &slowWriter{perRow: 60 * writePerRow}
	f := &Flusher{Tracker: tr, Writer: w, WriteTimeout: 50 * time.Millisecond, Log: zerolog.Nop()}
	f.pending = store.Batch{Marks: []store.Range{{Lo: 1, Hi: 1000, Attempts: 1}}, LSN: 200}
	tries := 0
	for ; tries < 10; tries++ {
		if err := f.flush(context.Background(), 0); err == nil {
			break
		} else if !errors.Is(err, context.DeadlineExceeded) {
			t.Fatal(err)
		}
	}
	if len(w.written) != 1 {
		t.Fatalf("the write never got through in %d tries", tries)
	}
	if f.timedOut != 0 {
		t.Fatalf("timeouts counted after a success: %d", f.timedOut)
	}
}
