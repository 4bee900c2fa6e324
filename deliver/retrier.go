package deliver

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/rs/zerolog"

	"github.com/outboxd/outboxd/decode"
	"github.com/outboxd/outboxd/internal/backoff"
	"github.com/outboxd/outboxd/internal/telemetry"
	"github.com/outboxd/outboxd/sink"
	"github.com/outboxd/outboxd/store"
)

// DefaultSchedule is the retry schedule of parked deliveries, in the spirit
// of Standard Webhooks: the wait before each scheduled attempt. After the last
// one fails, the delivery is dead-lettered.
var DefaultSchedule = []time.Duration{
	5 * time.Second, 5 * time.Minute, 30 * time.Minute, 2 * time.Hour, 5 * time.Hour,
	10 * time.Hour, 14 * time.Hour, 20 * time.Hour, 24 * time.Hour,
}

// ParseSchedule parses a comma list of durations.
func ParseSchedule(s string) ([]time.Duration, error) {
	var out []time.Duration
	for _, part := range strings.Split(s, ",") {
		part = strings.TrimSpace(part)
		if part == "" {
			continue
		}
		d, err := time.ParseDuration(part)
		if err != nil || d <= 0 {
			return nil, fmt.Errorf("retry schedule step %q is not a positive duration", part)
		}
		out = append(out, d)
	}
	if len(out) == 0 {
		return nil, errors.New("retry schedule is empty")
	}
	return out, nil
}

// ParkStore reads the parked deliveries; *store.SlotStore is one.
type ParkStore interface {
	DueHeads(ctx context.Context, targets []string, limit int) ([]store.ParkedHead, error)
	ParkedRun(ctx context.Context, target string, key int64, limit int) ([]store.ParkedRow, error)
}

// Resolver records what became of parked deliveries' retries, together;
// *checkpoint.Flusher is the one that does (it alone writes marks).
type Resolver interface {
	Resolve(ctx context.Context, rs ...store.Resolution) error
	// Committed reports whether a resolution whose commit answer was lost
	// (an *store.InDoubtError) committed.
	Committed(ctx context.Context, d *store.InDoubtError) (bool, error)
}

// Retrier retries parked deliveries from the table on the schedule, one key
// at a time per target and in commit order within a key, then dead-letters
// those whose schedule ran out. Its state is the table: it survives restarts
// of outboxd and of Postgres.
type Retrier struct {
	Store    ParkStore
	Resolver Resolver
	Router   *Router
	Schedule []time.Duration
	// Interval is how often due deliveries are looked for; default 1s.
	Interval time.Duration
	// Workers is how many keys are retried at once; default 8.
	Workers int
	// Leader, when set, reports whether this instance holds the slot now;
	// rounds are skipped while it does not (between two sessions of the
	// reader), so that only the slot holder delivers parked events (G9).
	Leader func() bool
	// OnFailing, when set, is told each time a retry of a parked delivery
	// fails again with an answer worth retrying (status 0: no answer), after
	// its outcome is noted; the pipeline disables a subscription failing for
	// too long there. It is called from the key's worker.
	OnFailing func(ctx context.Context, target string, status int)
	// Namespace is the outbox's message namespace (decode.Table's
	// MessageNamespace): a parked event is sent with the message id its
	// first attempt had.
	Namespace string
	Log       zerolog.Logger
}

// Run retries until ctx ends. Database errors are logged and retried on the
// next tick.
func (r *Retrier) Run(ctx context.Context) error {
	interval := r.Interval
	if interval <= 0 {
		interval = time.Second
	}
	tick := time.NewTicker(interval)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-tick.C:
		}
		if err := r.Round(ctx); err != nil && ctx.Err() == nil {
			r.Log.Warn().Err(err).Msg("retry of parked deliveries failed; trying again")
		}
	}
}

// Round retries every key whose first parked delivery is due.
func (r *Retrier) Round(ctx context.Context) error {
	if r.Leader != nil && !r.Leader() {
		return nil
	}
	// Only targets that can deliver: the heads of the others would take the
	// places of live ones at every round (they stay due).
	heads, err := r.Store.DueHeads(ctx, r.Router.LiveTargets(), 1000)
	if err != nil {
		return err
	}
	workers := r.Workers
	if workers <= 0 {
		workers = 8
	}
	sem := make(chan struct{}, workers)
	var wg sync.WaitGroup
	var mu sync.Mutex
	var firstErr error
	for _, h := range heads {
		disp, snk, enabled := r.Router.Lookup(h.Target)
		if disp == nil || !enabled {
			continue // a disabled subscription keeps its parked deliveries until re-enabled
		}
		sem <- struct{}{}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			if err := r.key(ctx, disp, snk, h); err != nil {
				mu.Lock()
				if firstErr == nil {
					firstErr = err
				}
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	return firstErr
}

// key works through the parked deliveries of one key in order until one
// fails (it is rescheduled, and the rest wait behind it).
//
// The outcomes of a page of the run are recorded together, in one
// transaction: a commit per row held a drain after an outage to a few hundred
// rows a second. Only once they are recorded does the dispatcher learn that
// the key has fewer deliveries parked, so a streamed event of the key never
// overtakes a parked one whose delivery is not yet recorded; a crash before
// the record sends the page's delivered events again (at least once).
func (r *Retrier) key(ctx context.Context, disp *Dispatcher, snk sink.Sink, h store.ParkedHead) error {
	k := keyRun{r: r, disp: disp, h: h, log: r.Log.With().Str("target", h.Target).Logger()}
	for {
		rows, err := r.Store.ParkedRun(ctx, h.Target, h.Key, keyPage)
		if err != nil || len(rows) == 0 {
			return err
		}
		more := true
		for _, row := range rows {
			if more = k.retry(ctx, snk, row); !more {
				break
			}
		}
		if err := k.record(ctx); err != nil || !more {
			return err
		}
	}
}

// keyPage is how many parked deliveries of a key are read, retried and
// recorded at a time.
const keyPage = 100

// keyRun is the retry of one key's parked deliveries: the outcomes not yet
// recorded.
type keyRun struct {
	r       *Retrier
	disp    *Dispatcher
	h       store.ParkedHead
	log     zerolog.Logger
	pending []store.Resolution
	// settled counts the pending outcomes that end a parked delivery (all
	// but RetryLater); delivered, those that delivered it.
	settled, delivered int
}

// retry makes one attempt at row and notes its outcome; it reports whether
// the run goes on to the next row.
func (k *keyRun) retry(ctx context.Context, snk sink.Sink, row store.ParkedRow) bool {
	if row.Values == nil {
		k.note(store.GiveUp, row.EventID, 0, sink.Outcome{}, "the event's row no longer exists")
		return true
	}
	e, err := decode.EventFromText(k.r.Namespace, row.Relation, row.Values)
	if err != nil {
		k.note(store.GiveUp, row.EventID, 0, sink.Outcome{}, "row cannot be delivered: "+err.Error())
		return true
	}
	// One attempt per step of the schedule: the schedule is the retry
	// policy here.
	events := []*decode.Event{e}
	tctx, span := telemetry.StartRetry(ctx, k.h.Target, snk.Name(), events)
	out := snk.Deliver(sink.WithMaxAttempts(tctx, 1), events)
	span.End(out)
	o := out[0]
	switch {
	case o.Err == nil:
		k.note(store.Delivered, row.EventID, 0, o, "")
		return true
	case errors.Is(o.Err, context.Canceled) || errors.Is(o.Err, context.DeadlineExceeded):
		return false
	case errors.Is(o.Err, sink.ErrPermanent):
		k.note(store.GiveUp, row.EventID, 0, o, o.Err.Error())
		k.log.Warn().Int64("event_id", row.EventID).Err(o.Err).Msg("parked delivery dead-lettered")
		return true
	}
	if errors.Is(o.Err, sink.ErrGone) && k.disp.onGone != nil {
		k.disp.onGone(k.h.Target)
	} else if k.r.OnFailing != nil {
		k.r.OnFailing(ctx, k.h.Target, o.Status)
	}
	round := int(row.Rounds) + 1
	if round >= len(k.r.Schedule) {
		k.note(store.GiveUp, row.EventID, 0, o, "retry schedule exhausted: "+o.Err.Error())
		k.log.Warn().Int64("event_id", row.EventID).Int("rounds", round).Err(o.Err).Msg("parked delivery dead-lettered")
		return true
	}
	// The database's clock alone times the schedule: it stores now() + the
	// step and compares next_attempt_at with now().
	wait := k.r.Schedule[round]
	k.note(store.RetryLater, row.EventID, wait, o, o.Err.Error())
	k.log.Info().Int64("event_id", row.EventID).Int("round", round).Dur("retry_in", wait).
		Str("key", strconv.FormatInt(k.h.Key, 10)).Err(o.Err).Msg("parked delivery failed again")
	return false
}

// note adds an outcome to record (attempts and status from o).
func (k *keyRun) note(kind store.ResolutionKind, eventID int64, retryIn time.Duration, o sink.Outcome, reason string) {
	k.pending = append(k.pending, store.Resolution{Kind: kind, Target: k.h.Target, EventID: eventID,
		Attempts: int32(o.Attempts), RetryIn: retryIn, Status: o.Status, Reason: reason})
	if kind != store.RetryLater {
		k.settled++
	}
	if kind == store.GiveUp {
		// Its target stays live (Router: dropped targets), so that what
		// `outboxd dlq retry` puts back is delivered.
		k.disp.deadLettered()
	}
	if kind == store.Delivered {
		k.delivered++
	}
}

// record writes the pending outcomes in one transaction, then tells the
// dispatcher how many of the key's parked deliveries ended. Outcomes of a
// run cut short by the end of ctx are recorded still: their attempts were
// made.
func (k *keyRun) record(ctx context.Context) error {
	if len(k.pending) == 0 {
		return nil
	}
	wctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), recordTimeout)
	defer cancel()
	if err := k.r.Resolver.Resolve(wctx, k.pending...); err != nil {
		if d := (*store.InDoubtError)(nil); !errors.As(err, &d) || !k.committed(ctx, d) {
			return err
		}
	}
	if k.settled > 0 {
		k.disp.Unparked(uint64(k.h.Key), k.settled)
	}
	if k.delivered > 0 {
		k.log.Info().Int("delivered", k.delivered).Int64("first_event_id", k.pending[0].EventID).
			Str("key", strconv.FormatInt(k.h.Key, 10)).Msg("parked deliveries delivered")
	}
	k.pending, k.settled, k.delivered = k.pending[:0], 0, 0
	return nil
}

// committed waits, until ctx ends, for the outcome of a record whose commit
// answer was lost. Recorded, the page's settled deliveries are gone from the
// database and the dispatcher must learn so, or it would hold the key's
// streamed events behind deliveries no longer parked; not recorded, the
// page is read and retried again (at least once).
func (k *keyRun) committed(ctx context.Context, d *store.InDoubtError) bool {
	wait := backoff.New(50*time.Millisecond, 2*time.Second)
	for {
		committed, err := k.r.Resolver.Committed(ctx, d)
		if err == nil {
			return committed
		}
		k.log.Warn().Err(err).Msg("outcome of recording parked deliveries unknown; asking again")
		if backoff.Sleep(ctx, wait.Next()) != nil {
			return false
		}
	}
}

// recordTimeout bounds the recording of a page's outcomes, which goes on
// after the retrier is stopped.
const recordTimeout = 10 * time.Second
