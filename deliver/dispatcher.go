// Package deliver hands decoded events to a sink with per-key ordering and
// parallelism across keys (G5), and settles each event with the checkpoint
// tracker once the sink acknowledged it or gave up on it.
//
// Invariants: events of one ordering key are handed to the sink in the order
// they arrive (commit order), and an event is given to the sink only after every
// earlier event of its key has settled; events of different keys are delivered
// concurrently, up to Concurrency requests at once. The number of events held in
// memory is bounded by MaxInFlight: a full dispatcher stops reading its input,
// which is the reader's backpressure.
package deliver

import (
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"time"

	"github.com/rs/zerolog"

	"github.com/outboxd/outboxd/checkpoint"
	"github.com/outboxd/outboxd/decode"
	"github.com/outboxd/outboxd/sink"
)

// Ordering selects the key whose events are delivered in commit order.
type Ordering string

// Orderings.
const (
	OrderOrganization Ordering = "organization"
	OrderEntity       Ordering = "entity"
	OrderNone         Ordering = "none"
)

// ParseOrdering validates an ordering name.
func ParseOrdering(s string) (Ordering, error) {
	switch o := Ordering(s); o {
	case OrderOrganization, OrderEntity, OrderNone:
		return o, nil
	}
	return "", fmt.Errorf("unknown ordering key %q (want organization, entity or none)", s)
}

// Key returns the ordering key of e. Keys only need to be equal for events that
// must stay ordered: a hash collision merges two keys, which keeps order and
// costs some parallelism.
func (o Ordering) Key(e *decode.Event) uint64 {
	switch o {
	case OrderEntity:
		h := fnv.New64a()
		h.Write([]byte(e.EntityType))
		h.Write([]byte{0})
		h.Write([]byte(e.EntityID))
		return h.Sum64()
	case OrderNone:
		return uint64(e.ID)
	default:
		if !e.HasOrganization {
			return 0
		}
		return uint64(e.OrganizationID)<<1 | 1
	}
}

// Settler receives the fate of each event; *checkpoint.Tracker is one.
type Settler interface {
	Settle(seq uint64, m *checkpoint.Mark, dead []checkpoint.DeadLetter) error
}

// Config tunes a Dispatcher.
type Config struct {
	Ordering    Ordering
	Concurrency int           // concurrent sink calls; default 16
	BatchSize   int           // events per sink call; default 1
	BatchWait   time.Duration // how long a short batch may wait for more events; default 0
	MaxInFlight int           // events held in memory; default 10000
}

// Validate fills defaults and checks ranges.
func (c *Config) Validate() error {
	if c.Ordering == "" {
		c.Ordering = OrderOrganization
	}
	if _, err := ParseOrdering(string(c.Ordering)); err != nil {
		return err
	}
	if c.Concurrency == 0 {
		c.Concurrency = 16
	}
	if c.BatchSize == 0 {
		c.BatchSize = 1
	}
	if c.MaxInFlight == 0 {
		c.MaxInFlight = 10000
	}
	switch {
	case c.Concurrency < 1 || c.Concurrency > 1024:
		return fmt.Errorf("concurrency %d out of range 1..1024", c.Concurrency)
	case c.BatchSize < 1 || c.BatchSize > 10000:
		return fmt.Errorf("batch size %d out of range 1..10000", c.BatchSize)
	case c.BatchWait < 0:
		return fmt.Errorf("batch wait %s is negative", c.BatchWait)
	case c.MaxInFlight < c.BatchSize:
		return fmt.Errorf("max in flight %d is below the batch size %d", c.MaxInFlight, c.BatchSize)
	}
	return nil
}

// Result is reported for every sink call (metrics, logs).
type Result struct {
	Sink    string
	Events  []*decode.Event
	Outcome sink.Outcome
	Took    time.Duration
}

// Dispatcher delivers events from its input to one sink.
type Dispatcher struct {
	cfg      Config
	sink     sink.Sink
	settler  Settler
	log      zerolog.Logger
	onResult func(Result)
}

// New returns a dispatcher; cfg must have been validated. onResult may be nil.
func New(cfg Config, s sink.Sink, settler Settler, log zerolog.Logger, onResult func(Result)) *Dispatcher {
	return &Dispatcher{cfg: cfg, sink: s, settler: settler, log: log.With().Str("sink", s.Name()).Logger(), onResult: onResult}
}

type keyQueue struct {
	events []*decode.Event
	busy   bool
	ready  bool // in the ready list
}

type job struct {
	events []*decode.Event
	keys   []uint64
}

type done struct {
	job
	outcomes []sink.Outcome
	took     time.Duration
}

// Run delivers until in is closed and everything read has settled, or ctx ends.
// Cancelling ctx abandons deliveries in progress: their events stay unsettled,
// so the checkpoint never passes them and they are delivered again later.
func (d *Dispatcher) Run(ctx context.Context, in <-chan *decode.Event) error {
	var (
		queues   = make(map[uint64]*keyQueue)
		ready    []uint64 // keys with queued events and no delivery in progress
		held     int      // events read and not settled
		queued   int      // events waiting in key queues
		inflight int      // sink calls in progress
		closed   bool
		work     = make(chan job, d.cfg.Concurrency)
		results  = make(chan done, d.cfg.Concurrency)
		waitFrom time.Time // when the current short batch started waiting
		timer    *time.Timer
		timerC   <-chan time.Time
		runErr   error
	)
	for range d.cfg.Concurrency {
		go func() {
			for j := range work {
				start := time.Now()
				out := d.sink.Deliver(ctx, j.events)
				results <- done{job: j, outcomes: out, took: time.Since(start)}
			}
		}()
	}
	defer func() {
		close(work)
		for ; inflight > 0; inflight-- {
			<-results
		}
		if timer != nil {
			timer.Stop()
		}
	}()

	enqueue := func(e *decode.Event) {
		k := d.cfg.Ordering.Key(e)
		q := queues[k]
		if q == nil {
			q = &keyQueue{}
			queues[k] = q
		}
		q.events = append(q.events, e)
		held++
		queued++
		if !q.busy && !q.ready {
			q.ready = true
			ready = append(ready, k)
		}
	}
	// take builds one sink call from the heads of ready keys: a prefix of each
	// key's queue, so a batch can never reorder a key.
	take := func() job {
		var j job
		for len(ready) > 0 && len(j.events) < d.cfg.BatchSize {
			k := ready[0]
			ready = ready[1:]
			q := queues[k]
			q.ready = false
			n := min(len(q.events), d.cfg.BatchSize-len(j.events))
			j.events = append(j.events, q.events[:n]...)
			clear(q.events[:n])
			q.events = q.events[n:]
			queued -= n
			q.busy = true
			j.keys = append(j.keys, k)
		}
		return j
	}
	release := func(keys []uint64) {
		for _, k := range keys {
			q := queues[k]
			q.busy = false
			if len(q.events) == 0 {
				delete(queues, k)
				continue
			}
			q.ready = true
			ready = append(ready, k)
		}
	}

	for {
		// Hand out work while workers are free.
		for inflight < d.cfg.Concurrency && len(ready) > 0 && ctx.Err() == nil && runErr == nil {
			if d.cfg.BatchSize > 1 && d.cfg.BatchWait > 0 && queued < d.cfg.BatchSize && !closed {
				if waitFrom.IsZero() {
					waitFrom = time.Now()
				}
				if left := d.cfg.BatchWait - time.Since(waitFrom); left > 0 {
					if timer == nil {
						timer = time.NewTimer(left)
					} else {
						timer.Reset(left)
					}
					timerC = timer.C
					break
				}
			}
			waitFrom = time.Time{}
			work <- take()
			inflight++
		}
		if runErr != nil || ctx.Err() != nil {
			if runErr == nil {
				runErr = ctx.Err()
			}
			if inflight == 0 {
				return runErr
			}
		} else if closed && held == 0 {
			return nil
		}

		input := in
		if closed || held >= d.cfg.MaxInFlight || runErr != nil || ctx.Err() != nil {
			input = nil
		}
		var ctxDone <-chan struct{}
		if runErr == nil {
			ctxDone = ctx.Done()
		}
		select {
		case e, ok := <-input:
			if !ok {
				closed = true
				continue
			}
			enqueue(e)
			// Take what else is already waiting without another trip round the loop.
			for more := true; more && held < d.cfg.MaxInFlight; {
				select {
				case e, ok := <-input:
					if !ok {
						closed, more = true, false
						break
					}
					enqueue(e)
				default:
					more = false
				}
			}
		case r := <-results:
			inflight--
			settled, err := d.settle(r)
			held -= settled
			if err != nil && runErr == nil {
				runErr = err
			}
			if settled == len(r.events) {
				release(r.keys)
			}
		case <-timerC:
			timerC = nil
		case <-ctxDone:
		}
	}
}

// settle records the outcomes of one sink call. Events whose delivery was
// abandoned because ctx ended are not settled. It returns how many were.
func (d *Dispatcher) settle(r done) (int, error) {
	if d.onResult != nil && len(r.outcomes) > 0 {
		d.onResult(Result{Sink: d.sink.Name(), Events: r.events, Outcome: r.outcomes[0], Took: r.took})
	}
	settled := 0
	for i, e := range r.events {
		var o sink.Outcome
		if i < len(r.outcomes) {
			o = r.outcomes[i]
		} else {
			o = sink.Outcome{Err: fmt.Errorf("sink %s returned %d outcomes for %d events", d.sink.Name(), len(r.outcomes), len(r.events))}
		}
		if errors.Is(o.Err, context.Canceled) || errors.Is(o.Err, context.DeadlineExceeded) {
			continue
		}
		var err error
		if o.Err == nil {
			err = d.settler.Settle(e.TxnSeq, &checkpoint.Mark{ID: e.ID, Attempts: int32(o.Attempts)}, nil)
		} else {
			d.log.Warn().Int64("event_id", e.ID).Str("event_name", e.Name).Int("status", o.Status).
				Int("attempts", o.Attempts).Err(o.Err).Msg("event dead-lettered")
			err = d.settler.Settle(e.TxnSeq, nil, []checkpoint.DeadLetter{{
				EventID: e.ID, Sink: d.sink.Name(), Status: o.Status, Reason: o.Err.Error(), Attempts: int32(o.Attempts),
			}})
		}
		if err != nil {
			return settled, fmt.Errorf("settle event %d: %w", e.ID, err)
		}
		settled++
	}
	return settled, nil
}
