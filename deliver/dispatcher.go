// Package deliver routes decoded events to their targets (the default sink
// and webhook subscriptions), delivers them with per-key ordering and
// parallelism across keys (G5), parks deliveries that outlast their in-memory
// retries for a durable retry schedule, and settles each event with the
// checkpoint tracker once every target it was routed to has settled it.
//
// Invariants:
//   - Per target, events of one ordering key are handed to the sink in commit
//     order, and an event is given to the sink only after every earlier event
//     of its key has settled; different keys are delivered concurrently, up to
//     Concurrency requests at once.
//   - Once a delivery of a key is parked, later events of that key for that
//     target are parked behind it, until the retrier has resolved them all:
//     order holds across the durable retries too.
//   - Events held in memory are bounded by MaxInFlight per target: a full
//     dispatcher stops reading its input, which is the reader's backpressure.
//   - An event is routed with the subscriptions as they were at its commit:
//     subscription changes travel in the same ordered stream as events.
package deliver

import (
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"sync"
	"time"

	"github.com/rs/zerolog"

	"github.com/outboxd/outboxd/checkpoint"
	"github.com/outboxd/outboxd/decode"
	"github.com/outboxd/outboxd/sink"
	"github.com/outboxd/outboxd/store"
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
	Settle(seq uint64, s checkpoint.Settlement) error
}

// Config tunes a Dispatcher.
type Config struct {
	Ordering    Ordering
	Concurrency int           // concurrent sink calls; default 16
	BatchSize   int           // events per sink call; default 1
	BatchWait   time.Duration // how long a short batch may wait for more events; default 0
	MaxInFlight int           // events held in memory; default 10000
	// FirstRetry is when a parked delivery is first retried (the retry
	// schedule's first step); default 5s.
	FirstRetry time.Duration
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
	if c.FirstRetry == 0 {
		c.FirstRetry = 5 * time.Second
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

// Dispatcher delivers the deliveries of one target.
type Dispatcher struct {
	cfg      Config
	target   string
	sink     func() sink.Sink
	settler  Settler
	log      zerolog.Logger
	onResult func(Result)
	// onGone is told when the target answered 410 Gone.
	onGone func(target string)

	parkMu sync.Mutex
	parked map[uint64]int // ordering key -> parked deliveries not yet resolved
}

// New returns a dispatcher for target; cfg must have been validated.
// currentSink returns the sink to use (it may change when a subscription is
// updated). parked are the parked deliveries per key already in the table.
// onResult and onGone may be nil.
func New(cfg Config, target string, currentSink func() sink.Sink, settler Settler, log zerolog.Logger,
	parked map[uint64]int, onResult func(Result), onGone func(string)) *Dispatcher {
	if parked == nil {
		parked = map[uint64]int{}
	}
	return &Dispatcher{cfg: cfg, target: target, sink: currentSink, settler: settler,
		log: log.With().Str("target", target).Logger(), parked: parked, onResult: onResult, onGone: onGone}
}

// Target is the name of the dispatcher's target.
func (d *Dispatcher) Target() string { return d.target }

// Unparked tells the dispatcher that n parked deliveries of key were
// resolved (delivered or dead-lettered) by the retrier.
func (d *Dispatcher) Unparked(key uint64, n int) {
	d.parkMu.Lock()
	defer d.parkMu.Unlock()
	if d.parked[key] -= n; d.parked[key] <= 0 {
		delete(d.parked, key)
	}
}

// ParkedKeys returns the number of ordering keys with parked deliveries.
func (d *Dispatcher) ParkedKeys() int {
	d.parkMu.Lock()
	defer d.parkMu.Unlock()
	return len(d.parked)
}

// holdIfParked parks dl behind the key's parked deliveries when there are any.
func (d *Dispatcher) holdIfParked(dl *Delivery) (bool, error) {
	d.parkMu.Lock()
	held := d.parked[dl.Key] > 0
	if held {
		d.parked[dl.Key]++
	}
	d.parkMu.Unlock()
	if !held {
		return false, nil
	}
	return true, d.park(dl, sink.Outcome{}, "held behind an earlier parked event of the same ordering key")
}

type keyQueue struct {
	items []*Delivery
	busy  bool
	ready bool // in the ready list
}

type job struct {
	items []*Delivery
	keys  []uint64
}

type done struct {
	job
	outcomes []sink.Outcome
	took     time.Duration
}

// Run delivers until in is closed and everything read has settled, or ctx ends.
// Cancelling ctx abandons deliveries in progress: their events stay unsettled,
// so the checkpoint never passes them and they are delivered again later.
func (d *Dispatcher) Run(ctx context.Context, in <-chan *Delivery) error {
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
				events := make([]*decode.Event, len(j.items))
				for i, it := range j.items {
					events[i] = it.Event
				}
				start := time.Now()
				out := d.sink().Deliver(ctx, events)
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

	enqueue := func(dl *Delivery) {
		if hold, err := d.holdIfParked(dl); hold {
			if err != nil && runErr == nil {
				runErr = err
			}
			return
		}
		q := queues[dl.Key]
		if q == nil {
			q = &keyQueue{}
			queues[dl.Key] = q
		}
		q.items = append(q.items, dl)
		held++
		queued++
		if !q.busy && !q.ready {
			q.ready = true
			ready = append(ready, dl.Key)
		}
	}
	// take builds one sink call from the heads of ready keys: a prefix of each
	// key's queue, so a batch can never reorder a key.
	take := func() job {
		var j job
		for len(ready) > 0 && len(j.items) < d.cfg.BatchSize {
			k := ready[0]
			ready = ready[1:]
			q := queues[k]
			q.ready = false
			n := min(len(q.items), d.cfg.BatchSize-len(j.items))
			j.items = append(j.items, q.items[:n]...)
			clear(q.items[:n])
			q.items = q.items[n:]
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
			if len(q.items) == 0 {
				delete(queues, k)
				continue
			}
			// The key's delivery was parked: everything queued behind it is
			// parked behind it, in order.
			d.parkMu.Lock()
			parked := d.parked[k] > 0
			if parked {
				d.parked[k] += len(q.items)
			}
			d.parkMu.Unlock()
			if parked {
				for _, dl := range q.items {
					if err := d.park(dl, sink.Outcome{}, "held behind an earlier parked event of the same ordering key"); err != nil && runErr == nil {
						runErr = err
					}
				}
				held -= len(q.items)
				queued -= len(q.items)
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
		case dl, ok := <-input:
			if !ok {
				closed = true
				continue
			}
			enqueue(dl)
			// Take what else is already waiting without another trip round the loop.
			for more := true; more && held < d.cfg.MaxInFlight; {
				select {
				case dl, ok := <-input:
					if !ok {
						closed, more = true, false
						break
					}
					enqueue(dl)
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
			if settled == len(r.items) {
				release(r.keys)
			}
		case <-timerC:
			timerC = nil
		case <-ctxDone:
		}
	}
}

// settle records the outcomes of one sink call. Deliveries abandoned because
// ctx ended are not settled. It returns how many were.
func (d *Dispatcher) settle(r done) (int, error) {
	if d.onResult != nil && len(r.outcomes) > 0 {
		events := make([]*decode.Event, len(r.items))
		for i, it := range r.items {
			events[i] = it.Event
		}
		d.onResult(Result{Sink: d.target, Events: events, Outcome: r.outcomes[0], Took: r.took})
	}
	settled := 0
	for i, dl := range r.items {
		var o sink.Outcome
		if i < len(r.outcomes) {
			o = r.outcomes[i]
		} else {
			o = sink.Outcome{Err: fmt.Errorf("sink %s returned %d outcomes for %d events", d.target, len(r.outcomes), len(r.items))}
		}
		if errors.Is(o.Err, context.Canceled) || errors.Is(o.Err, context.DeadlineExceeded) {
			continue
		}
		var err error
		switch {
		case o.Err == nil:
			err = d.finish(dl, int32(o.Attempts), nil, nil)
		case errors.Is(o.Err, sink.ErrPermanent):
			d.log.Warn().Int64("event_id", dl.Event.ID).Str("event_name", dl.Event.Name).Int("status", o.Status).
				Int("attempts", o.Attempts).Err(o.Err).Msg("event dead-lettered")
			err = d.finish(dl, int32(o.Attempts), &store.DeadLetter{
				EventID: dl.Event.ID, Sink: d.target, Status: o.Status, Reason: o.Err.Error(), Attempts: int32(o.Attempts),
			}, nil)
		default:
			if errors.Is(o.Err, sink.ErrGone) && d.onGone != nil {
				d.onGone(d.target)
			}
			d.parkMu.Lock()
			d.parked[dl.Key]++
			d.parkMu.Unlock()
			d.log.Warn().Int64("event_id", dl.Event.ID).Int("status", o.Status).Int("attempts", o.Attempts).
				Err(o.Err).Dur("retry_in", d.cfg.FirstRetry).Msg("delivery parked for a later retry")
			err = d.park(dl, o, o.Err.Error())
		}
		if err != nil {
			return settled, fmt.Errorf("settle event %d: %w", dl.Event.ID, err)
		}
		settled++
	}
	return settled, nil
}

// park settles dl for this target as parked. The caller counted it in parked.
func (d *Dispatcher) park(dl *Delivery, o sink.Outcome, reason string) error {
	e := dl.Event
	return d.finish(dl, int32(o.Attempts), nil, &store.Park{
		EventID: e.ID, Target: d.target, Key: int64(dl.Key), CommitLSN: e.CommitLSN, Index: int32(e.Index),
		Attempts: int32(o.Attempts), RetryIn: d.cfg.FirstRetry, Status: o.Status, Reason: reason,
	})
}

// finish records this target's settlement of dl and settles the event with
// the tracker when it was the last of its targets.
func (d *Dispatcher) finish(dl *Delivery, attempts int32, dead *store.DeadLetter, park *store.Park) error {
	s, last := dl.settledBy(attempts, dead, park)
	if !last {
		return nil
	}
	return d.settler.Settle(dl.Event.TxnSeq, s)
}
