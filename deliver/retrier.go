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

// Resolver records what became of a parked delivery's retry;
// *checkpoint.Flusher is the one that does (it alone writes marks).
type Resolver interface {
	Resolve(ctx context.Context, r store.Resolution) error
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
func (r *Retrier) key(ctx context.Context, disp *Dispatcher, snk sink.Sink, h store.ParkedHead) error {
	log := r.Log.With().Str("target", h.Target).Logger()
	for {
		rows, err := r.Store.ParkedRun(ctx, h.Target, h.Key, 100)
		if err != nil || len(rows) == 0 {
			return err
		}
		for _, row := range rows {
			if row.Values == nil {
				if err := r.resolve(ctx, store.GiveUp, h.Target, row.EventID, 0, sink.Outcome{}, "the event's row no longer exists"); err != nil {
					return err
				}
				disp.Unparked(uint64(h.Key), 1)
				continue
			}
			e, err := decode.EventFromText(r.Namespace, row.Relation, row.Values)
			if err != nil {
				if err := r.resolve(ctx, store.GiveUp, h.Target, row.EventID, 0, sink.Outcome{}, "row cannot be delivered: "+err.Error()); err != nil {
					return err
				}
				disp.Unparked(uint64(h.Key), 1)
				continue
			}
			// One attempt per step of the schedule: the schedule is the
			// retry policy here.
			o := snk.Deliver(sink.WithMaxAttempts(ctx, 1), []*decode.Event{e})[0]
			switch {
			case o.Err == nil:
				if err := r.resolve(ctx, store.Delivered, h.Target, row.EventID, 0, o, ""); err != nil {
					return err
				}
				disp.Unparked(uint64(h.Key), 1)
				log.Info().Int64("event_id", row.EventID).Int32("round", row.Rounds+1).Msg("parked delivery delivered")
				continue
			case errors.Is(o.Err, context.Canceled) || errors.Is(o.Err, context.DeadlineExceeded):
				return nil
			case errors.Is(o.Err, sink.ErrPermanent):
				if err := r.resolve(ctx, store.GiveUp, h.Target, row.EventID, 0, o, o.Err.Error()); err != nil {
					return err
				}
				disp.Unparked(uint64(h.Key), 1)
				log.Warn().Int64("event_id", row.EventID).Err(o.Err).Msg("parked delivery dead-lettered")
				continue
			}
			if errors.Is(o.Err, sink.ErrGone) && disp.onGone != nil {
				disp.onGone(h.Target)
			}
			round := int(row.Rounds) + 1
			if round >= len(r.Schedule) {
				reason := "retry schedule exhausted: " + o.Err.Error()
				if err := r.resolve(ctx, store.GiveUp, h.Target, row.EventID, 0, o, reason); err != nil {
					return err
				}
				disp.Unparked(uint64(h.Key), 1)
				log.Warn().Int64("event_id", row.EventID).Int("rounds", round).Err(o.Err).Msg("parked delivery dead-lettered")
				continue
			}
			// The database's clock alone times the schedule: it stores
			// now() + the step and compares next_attempt_at with now().
			wait := r.Schedule[round]
			if err := r.resolve(ctx, store.RetryLater, h.Target, row.EventID, wait, o, o.Err.Error()); err != nil {
				return err
			}
			log.Info().Int64("event_id", row.EventID).Int("round", round).Dur("retry_in", wait).
				Str("key", strconv.FormatInt(h.Key, 10)).Err(o.Err).Msg("parked delivery failed again")
			return nil
		}
	}
}

// resolve records the outcome o of a retry (attempts and status from o).
func (r *Retrier) resolve(ctx context.Context, kind store.ResolutionKind, target string, eventID int64,
	retryIn time.Duration, o sink.Outcome, reason string) error {
	return r.Resolver.Resolve(ctx, store.Resolution{Kind: kind, Target: target, EventID: eventID,
		Attempts: int32(o.Attempts), RetryIn: retryIn, Status: o.Status, Reason: reason})
}
