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
// state: it refuses a write whose context leaves less than that, as a
// write cut by its deadline would fail.
type slowWriter struct {
	perMiB  time.Duration
	written []store.Batch
}

func (w *slowWriter) Write(ctx context.Context, b store.Batch) error {
	need := time.Duration(len(b.State)) * w.perMiB / (1 << 20)
	if d, ok := ctx.Deadline(); ok && time.Until(d) < need {
		return context.DeadlineExceeded
	}
	w.written = append(w.written, b)
	return nil
}

func (w *slowWriter) Resolve(context.Context, ...store.Resolution) error { return nil }

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
	if err := f.flush(context.Background()); err != nil {
		if errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("the write of a %d MiB routing state was given too little time: %v", len(state)>>20, err)
		}
		t.Fatal(err)
	}
	if len(w.written) != 1 || !bytes.Equal(w.written[0].State, state) || w.written[0].LSN != 200 {
		t.Fatalf("written %d batches; want the state and the checkpoint at 0/C8", len(w.written))
	}
}
