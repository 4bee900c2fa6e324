package checkpoint

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/rs/zerolog"

	"github.com/outboxd/outboxd/internal/backoff"
	"github.com/outboxd/outboxd/store"
)

// Writer writes durably what the flusher decides; *store.SlotStore is the
// production one.
type Writer interface {
	// Write writes a batch of settled work and the checkpoint.
	Write(ctx context.Context, b store.Batch) error
	// Resolve records the outcomes of parked deliveries' retries, together.
	Resolve(ctx context.Context, rs ...store.Resolution) error
	// Committed reports whether a write whose commit answer was lost (an
	// *store.InDoubtError from Write or Resolve) committed.
	Committed(ctx context.Context, d *store.InDoubtError) (bool, error)
}

// Flusher moves settled work from a Tracker into the database, and records
// what the retrier made of parked deliveries: it is the one writer of the
// outbox rows' marks (streamed events in the checkpoint transaction, parked
// ones in their resolution's transaction; both fenced by the slot).
type Flusher struct {
	Tracker  *Tracker
	Writer   Writer
	Interval time.Duration // time trigger; default 200ms
	// FinalTimeout bounds the last flush after Run's context ends, unless
	// the write needs more (see WriteTimeout); default 10s.
	FinalTimeout time.Duration
	// WriteTimeout bounds each write: a connection that went silent (a
	// black-holed network) is given up and the batch retried on a fresh one;
	// default max(10s, 10 × Interval). A write gets a second more per MiB of
	// routing state it carries and 20 s more per million rows it marks.
	WriteTimeout time.Duration
	// OnFlush, when set, is called after each successful write (metrics).
	OnFlush func(b store.Batch, took time.Duration)
	Log     zerolog.Logger

	pending store.Batch
	// doubt, when set, is the unknown outcome of the last write of pending:
	// nothing is merged into pending or written until Committed answers.
	doubt *store.InDoubtError
	// timedOut counts the writes in a row that ran out of their time: each
	// retry is given twice the time of the one before.
	timedOut int
}

// Run flushes on every size kick or interval until ctx ends, then flushes one
// last time with a context that outlives ctx, so the work settled during the
// shutdown drain is recorded. A database that cannot be reached is retried
// with backoff; an error that retrying cannot fix (permissions, a missing
// checkpoint row) ends Run.
func (f *Flusher) Run(ctx context.Context) error {
	interval := f.Interval
	if interval <= 0 {
		interval = 200 * time.Millisecond
	}
	timer := time.NewTimer(interval)
	defer timer.Stop()
	failures := 0
	retry := backoff.New(2*interval, 5*time.Second)
	for {
		select {
		case <-ctx.Done():
			return f.final(ctx)
		case <-timer.C:
		case <-f.Tracker.Kicked():
			if failures > 0 {
				continue // wait for the backoff timer
			}
		}
		err := f.flush(ctx, 0)
		wait := interval
		switch {
		case err == nil:
			failures = 0
			retry.Reset()
		case ctx.Err() != nil:
			return f.final(ctx)
		case permanent(err):
			return err
		default:
			failures++
			wait = retry.Next()
			f.Log.Warn().Err(err).Int("failures", failures).Dur("retry_in", wait).Msg("checkpoint flush failed; retrying")
		}
		if !timer.Stop() {
			select {
			case <-timer.C:
			default:
			}
		}
		timer.Reset(wait)
	}
}

func (f *Flusher) final(ctx context.Context) error {
	timeout := f.FinalTimeout
	if timeout <= 0 {
		timeout = 10 * time.Second
	}
	// The last write gets what its size needs, FinalTimeout at least: a
	// stop right after a million-row transaction settled used to give up
	// its marks after 10 s, exit 1, and have all its events delivered again.
	if err := f.flush(context.WithoutCancel(ctx), timeout); err != nil {
		if errors.Is(err, store.ErrNotLeader) {
			// The slot has another holder: what this instance settled but
			// did not record is delivered again by it (at least once).
			f.Log.Warn().Err(err).Msg("final checkpoint flush skipped: this instance no longer holds the slot")
			return nil
		}
		return fmt.Errorf("final checkpoint flush: %w", err)
	}
	return nil
}

// flush drains the tracker into the pending batch and writes it; on failure the
// batch is kept and retried, merged with whatever settles meanwhile.
func (f *Flusher) flush(ctx context.Context, atLeast time.Duration) error {
	start := time.Now()
	if f.doubt != nil {
		if err := f.settleDoubt(ctx, atLeast); err != nil {
			return err
		}
	}
	f.pending.Merge(f.Tracker.Drain())
	if f.pending.Empty() {
		return nil
	}
	wctx, cancel := context.WithTimeout(ctx, max(atLeast, f.writeTimeout(f.pending)))
	err := f.Writer.Write(wctx, f.pending)
	timedOut := wctx.Err() != nil && ctx.Err() == nil
	cancel()
	if err != nil {
		if timedOut {
			f.timedOut++
		}
		if d := (*store.InDoubtError)(nil); errors.As(err, &d) {
			f.doubt = d
		}
		return err
	}
	f.written(time.Since(start))
	return nil
}

// settleDoubt finds out whether the last write of pending, whose commit
// answer was lost, committed: if it did, pending is written (a write of it
// again would count its attempts, park its deliveries and add to its dead
// letters twice); if not, it is written again with what settled since.
func (f *Flusher) settleDoubt(ctx context.Context, atLeast time.Duration) error {
	wctx, cancel := context.WithTimeout(ctx, max(atLeast, f.writeTimeout(store.Batch{})))
	committed, err := f.Writer.Committed(wctx, f.doubt)
	cancel()
	if err != nil {
		// Never permanent: a server restarting while it is asked answers
		// with errors of any class; the question is asked again.
		return fmt.Errorf("checkpoint write in doubt: %v", err)
	}
	f.Log.Info().Uint64("transaction", f.doubt.XID).Bool("committed", committed).
		Msg("outcome of a checkpoint write whose commit answer was lost")
	f.doubt = nil
	if committed {
		f.written(0)
	}
	return nil
}

// written records that pending is in the database.
func (f *Flusher) written(took time.Duration) {
	f.timedOut = 0
	f.Tracker.Written(f.pending.LSN)
	if f.OnFlush != nil {
		f.OnFlush(f.pending, took)
	}
	f.Log.Debug().Int("marked", len(f.pending.Marks)).Int("dead", len(f.pending.Dead)).
		Stringer("lsn", f.pending.LSN).Dur("took", took).Msg("checkpoint flushed")
	f.pending = store.Batch{}
}

// writeTimeout is the time a write of b is given: WriteTimeout, plus a second
// per MiB of routing state and writePerRow per row it marks. The state is the
// whole subscription registry: a platform's 100,000 subscriptions make about
// 19 MB, whose write alone took 3 to 5 s on a 2-core machine; the marks of a
// million-row transaction are one UPDATE of a million rows, 8 to 10 s there.
// Under a fixed timeout, a batch that outgrew it would fail every write, each
// retry carrying the same work, and the checkpoint would never move again;
// each write that runs out of time doubles the next one's.
func (f *Flusher) writeTimeout(b store.Batch) time.Duration {
	timeout := f.WriteTimeout
	if timeout <= 0 {
		timeout = max(10*time.Second, 10*f.Interval)
	}
	timeout += time.Duration(len(b.State))*time.Second/(1<<20) + time.Duration(b.Events())*writePerRow
	// A write that ran out of time may only have been slow, not stuck (a
	// machine busier than the allowances assume): the retry, which carries
	// the same work and more, gets twice the time, up to 64 times.
	return timeout << min(f.timedOut, 6)
}

// writePerRow is the time a write is given per row it marks, on top of
// WriteTimeout: 20 s more for a million rows.
const writePerRow = 20 * time.Microsecond

// permanent reports errors that a retry cannot fix.
func permanent(err error) bool {
	if errors.Is(err, store.ErrNoCheckpoint) {
		return true
	}
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		switch pgErr.Code[:2] {
		case "42", // syntax error or access rule violation (missing table, no privilege)
			"22", // data exception
			"23": // integrity constraint violation
			return true
		}
	}
	return false
}

// Resolve records the outcomes of retries of parked deliveries, in one
// transaction (the retrier's way to mark rows).
func (f *Flusher) Resolve(ctx context.Context, rs ...store.Resolution) error {
	return f.Writer.Resolve(ctx, rs...)
}

// Committed reports whether a resolution whose commit answer was lost
// committed.
func (f *Flusher) Committed(ctx context.Context, d *store.InDoubtError) (bool, error) {
	return f.Writer.Committed(ctx, d)
}
