// Package deliver routes decoded events to their targets (the default sink
// and webhook subscriptions), delivers them with per-key ordering and
// parallelism across keys (G5), parks deliveries that outlast their in-memory
// retries for a durable retry schedule, and settles each event with the
// checkpoint tracker once every target it was routed to has settled it.
//
// Invariants:
//   - Per target, events of one ordering key are handed to the sink in commit
//     order (for a sink with several destinations, sink.Scoped: of one key
//     and destination; the key is then ScopedKey), and an event is given to
//     the sink only after every earlier event of its key has settled;
//     different keys are delivered concurrently, up to
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
	"encoding/binary"
	"errors"
	"fmt"
	"hash/fnv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rs/zerolog"

	"github.com/outboxd/outboxd/checkpoint"
	"github.com/outboxd/outboxd/decode"
	"github.com/outboxd/outboxd/internal/telemetry"
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

// WithDefaults returns a copy of c with unset fields given their defaults.
func (c Config) WithDefaults() Config {
	if c.Ordering == "" {
		c.Ordering = OrderOrganization
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
	return c
}

// Validate checks the ranges of a config with its defaults filled.
func (c Config) Validate() error {
	if _, err := ParseOrdering(string(c.Ordering)); err != nil {
		return err
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
	cfg     Config
	target  string
	sink    func() sink.Sink
	settler Settler
	// log has no context of its own: a target is one of thousands, and
	// its lines name it as they are written.
	log      zerolog.Logger
	onResult func(Result)
	// onGone is told when the target answered 410 Gone.
	onGone func(target string)

	parkMu sync.Mutex
	parked map[uint64]int // ordering key -> parked deliveries not yet resolved

	onIdle  func()
	settled atomic.Int64 // deliveries this target settled, over all runs
	// onDeadLetter is told when the target dead-letters a delivery, here
	// or in the retrier.
	onDeadLetter func()

	calls   *CallLimiter
	callKey func() string
}

// deadLettered tells the dispatcher's owner that the target dead-lettered a
// delivery.
func (d *Dispatcher) deadLettered() {
	if d.onDeadLetter != nil {
		d.onDeadLetter()
	}
}

// Settled returns how many deliveries the dispatcher has settled (delivered,
// dead-lettered or parked), over all its runs.
func (d *Dispatcher) Settled() int64 { return d.settled.Load() }

// Params are what a dispatcher is built from.
type Params struct {
	// Config tunes the dispatcher; it must have been validated.
	Config Config
	// Target is the target's name (logs, parked rows, dead letters).
	Target string
	// Sink returns the sink to use (it may change when a subscription is
	// updated).
	Sink func() sink.Sink
	// Settler is told each event's fate.
	Settler Settler
	Log     zerolog.Logger
	// Parked are the parked deliveries per key already in the table.
	Parked map[uint64]int
	// OnResult receives every sink call's result; may be nil.
	OnResult func(Result)
	// OnGone is told when the target answered 410 Gone; may be nil.
	OnGone func(target string)
	// OnIdle is told, from Run, each time the dispatcher comes to hold
	// nothing with nothing waiting on its input; may be nil.
	OnIdle func()
	// OnDeadLetter is told each time the target dead-letters a delivery,
	// here or in the retrier; may be nil.
	OnDeadLetter func()
	// Calls, when set, runs the sink calls, shared with other dispatchers:
	// at most its limit at once per CallKey, the others queued (the
	// subscriptions' webhooks, many of them posting to one host). CallKey
	// returns the key of the current sink; "" runs the call unbounded.
	Calls   *CallLimiter
	CallKey func() string
}

// New returns a dispatcher.
func New(p Params) *Dispatcher {
	parked := p.Parked
	if parked == nil {
		parked = map[uint64]int{}
	}
	return &Dispatcher{cfg: p.Config, target: p.Target, sink: p.Sink, settler: p.Settler,
		log: p.Log, parked: parked, onResult: p.OnResult, onGone: p.OnGone, onIdle: p.OnIdle,
		onDeadLetter: p.OnDeadLetter, calls: p.Calls, callKey: p.CallKey}
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

// ScopedKey returns the ordering key of key on one destination of a sink
// with several (sink.Scoped); on scope "" it is key itself. Scoped keys are
// never negative: negative keys belong to revived dead letters.
func ScopedKey(key uint64, scope string) uint64 {
	if scope == "" {
		return key
	}
	h := fnv.New64a()
	var b [8]byte
	binary.BigEndian.PutUint64(b[:], key)
	h.Write(b[:])
	h.Write([]byte(scope))
	return h.Sum64() &^ (1 << 63)
}

// item is a delivery with its ordering key on this dispatcher's target: the
// delivery's key, scoped by the destination when the sink has several.
type item struct {
	dl  *Delivery
	key uint64
}

func (d *Dispatcher) item(dl *Delivery) item {
	if sc, ok := d.sink().(sink.Scoped); ok {
		return item{dl, ScopedKey(dl.Key, sc.Scope(dl.Event))}
	}
	return item{dl, dl.Key}
}

// holdIfParked parks it behind its key's parked deliveries when there are
// any. A key scoped by destination is held behind the unscoped key's parked
// deliveries too, and joins their run: those were parked before the key was
// scoped (by an earlier version), and the event may be bound for the same
// destination as any of them.
func (d *Dispatcher) holdIfParked(it item) (bool, error) {
	d.parkMu.Lock()
	if it.key != it.dl.Key && d.parked[it.dl.Key] > 0 {
		it.key = it.dl.Key
	}
	held := d.parked[it.key] > 0
	if held {
		d.parked[it.key]++
	}
	d.parkMu.Unlock()
	if !held {
		return false, nil
	}
	return true, d.park(it, sink.Outcome{}, "held behind an earlier parked event of the same ordering key")
}

type keyQueue struct {
	items []item
	busy  bool
	ready bool // in the ready list
}

type job struct {
	items []item
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
	r := &run{d: d, queues: make(map[uint64]*keyQueue), results: make(chan *done, d.cfg.Concurrency)}
	defer r.stop()
	for {
		r.handOut(ctx)
		if r.err != nil || ctx.Err() != nil {
			r.fail(ctx.Err())
			if r.inflight == 0 {
				return r.err
			}
		} else if r.closed && r.held == 0 {
			return nil
		} else if r.held == 0 && len(in) == 0 && !r.idle && d.onIdle != nil {
			r.idle = true
			d.onIdle()
		}

		input := in
		if r.closed || r.held >= d.cfg.MaxInFlight || r.err != nil || ctx.Err() != nil {
			input = nil
		}
		var ctxDone <-chan struct{}
		if r.err == nil {
			ctxDone = ctx.Done()
		}
		select {
		case dl, ok := <-input:
			r.received(dl, ok, input)
		case res := <-r.results:
			r.inflight--
			settled, err := d.settle(res)
			r.held -= settled
			r.fail(err)
			if settled == len(res.items) {
				r.release(res.keys)
			}
		case <-r.timerC:
			r.timerC = nil
		case <-ctxDone:
		}
	}
}

// call makes the sink call of j and hands its result to results, which has
// room for it: at most Concurrency calls are in progress, and an idle
// target holds no goroutine but its loop's (a platform with thousands of
// subscriptions has thousands of targets).
func (d *Dispatcher) call(ctx context.Context, j job, results chan<- *done) {
	events := make([]*decode.Event, len(j.items))
	for i, it := range j.items {
		events[i] = it.dl.Event
	}
	snk := d.sink()
	ctx, span := telemetry.StartDelivery(ctx, d.target, snk.Name(), events)
	start := time.Now()
	out := snk.Deliver(ctx, events)
	took := time.Since(start)
	span.End(out)
	results <- &done{job: j, outcomes: out, took: took}
}

// run is the state of one Run, owned by its loop.
type run struct {
	d        *Dispatcher
	queues   map[uint64]*keyQueue
	ready    []uint64 // keys with queued events and no delivery in progress
	held     int      // events read and not settled
	queued   int      // events waiting in key queues
	inflight int      // sink calls in progress
	closed   bool     // the input is closed
	// results holds pointers: its room is Concurrency results, made for
	// every run of a loop, thousands of them with subscriptions.
	results  chan *done
	waitFrom time.Time // when the current short batch started waiting
	timer    *time.Timer
	timerC   <-chan time.Time
	err      error // the first error; the loop stops reading and winds down
	idle     bool  // OnIdle was told since the last event read
}

// fail records err unless an earlier error was recorded.
func (r *run) fail(err error) {
	if err != nil && r.err == nil {
		r.err = err
	}
}

// stop waits for the calls in progress to return.
func (r *run) stop() {
	for ; r.inflight > 0; r.inflight-- {
		<-r.results
	}
	if r.timer != nil {
		r.timer.Stop()
	}
}

// enqueue queues dl behind its key, or parks it behind the key's parked
// deliveries.
func (r *run) enqueue(dl *Delivery) {
	r.idle = false
	it := r.d.item(dl)
	if hold, err := r.d.holdIfParked(it); hold {
		r.fail(err)
		return
	}
	q := r.queues[it.key]
	if q == nil {
		q = &keyQueue{}
		r.queues[it.key] = q
	}
	q.items = append(q.items, it)
	r.held++
	r.queued++
	if !q.busy && !q.ready {
		q.ready = true
		r.ready = append(r.ready, it.key)
	}
}

// received takes dl (ok false: the input is closed), then what else is
// already waiting on input, without another trip round the loop.
func (r *run) received(dl *Delivery, ok bool, input <-chan *Delivery) {
	for {
		if !ok {
			r.closed = true
			return
		}
		r.enqueue(dl)
		if r.held >= r.d.cfg.MaxInFlight {
			return
		}
		select {
		case dl, ok = <-input:
		default:
			return
		}
	}
}

// handOut starts sink calls while fewer than Concurrency are in progress,
// unless a short batch should wait for more events.
func (r *run) handOut(ctx context.Context) {
	cfg := r.d.cfg
	for r.inflight < cfg.Concurrency && len(r.ready) > 0 && ctx.Err() == nil && r.err == nil {
		if cfg.BatchSize > 1 && cfg.BatchWait > 0 && r.queued < cfg.BatchSize && !r.closed {
			if r.waitFrom.IsZero() {
				r.waitFrom = time.Now()
			}
			if left := cfg.BatchWait - time.Since(r.waitFrom); left > 0 {
				if r.timer == nil {
					r.timer = time.NewTimer(left)
				} else {
					r.timer.Reset(left)
				}
				r.timerC = r.timer.C
				return
			}
		}
		r.waitFrom = time.Time{}
		r.start(ctx, r.take())
		r.inflight++
	}
}

// start makes the sink call of j on a goroutine of its own or, when the
// dispatcher shares a CallLimiter, through it: a call beyond its limit waits
// in its queue, counted in flight like the others.
func (r *run) start(ctx context.Context, j job) {
	d := r.d
	if d.calls != nil && d.callKey != nil {
		if key := d.callKey(); key != "" {
			results := r.results
			d.calls.Go(key, func() { d.call(ctx, j, results) })
			return
		}
	}
	go d.call(ctx, j, r.results)
}

// take builds one sink call from the heads of ready keys: a prefix of each
// key's queue, so a batch can never reorder a key.
func (r *run) take() job {
	var j job
	for len(r.ready) > 0 && len(j.items) < r.d.cfg.BatchSize {
		k := r.ready[0]
		r.ready = r.ready[1:]
		q := r.queues[k]
		q.ready = false
		n := min(len(q.items), r.d.cfg.BatchSize-len(j.items))
		j.items = append(j.items, q.items[:n]...)
		clear(q.items[:n])
		q.items = q.items[n:]
		r.queued -= n
		q.busy = true
		j.keys = append(j.keys, k)
	}
	return j
}

// release makes the keys of a settled call ready again, or parks what is
// queued behind a key whose delivery was parked.
func (r *run) release(keys []uint64) {
	d := r.d
	for _, k := range keys {
		q := r.queues[k]
		q.busy = false
		if len(q.items) == 0 {
			delete(r.queues, k)
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
			for _, it := range q.items {
				r.fail(d.park(it, sink.Outcome{}, "held behind an earlier parked event of the same ordering key"))
			}
			r.held -= len(q.items)
			r.queued -= len(q.items)
			delete(r.queues, k)
			continue
		}
		q.ready = true
		r.ready = append(r.ready, k)
	}
}

// settle records the outcomes of one sink call. Deliveries abandoned because
// ctx ended are not settled. It returns how many were.
func (d *Dispatcher) settle(r *done) (int, error) {
	if d.onResult != nil && len(r.outcomes) > 0 {
		events := make([]*decode.Event, len(r.items))
		for i, it := range r.items {
			events[i] = it.dl.Event
		}
		d.onResult(Result{Sink: d.target, Events: events, Outcome: r.outcomes[0], Took: r.took})
	}
	settled := 0
	for i, it := range r.items {
		dl := it.dl
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
			d.deadLettered()
			d.log.Warn().Str("target", d.target).Int64("event_id", dl.Event.ID).Str("event_name", dl.Event.Name).Int("status", o.Status).
				Int("attempts", o.Attempts).Err(o.Err).Msg("event dead-lettered")
			err = d.finish(dl, int32(o.Attempts), &store.DeadLetter{
				EventID: dl.Event.ID, Sink: d.target, Status: o.Status, Reason: o.Err.Error(), Attempts: int32(o.Attempts),
			}, nil)
		default:
			if errors.Is(o.Err, sink.ErrGone) && d.onGone != nil {
				d.onGone(d.target)
			}
			d.parkMu.Lock()
			d.parked[it.key]++
			d.parkMu.Unlock()
			d.log.Warn().Str("target", d.target).Int64("event_id", dl.Event.ID).Int("status", o.Status).Int("attempts", o.Attempts).
				Err(o.Err).Dur("retry_in", d.cfg.FirstRetry).Msg("delivery parked for a later retry")
			err = d.park(it, o, o.Err.Error())
		}
		if err != nil {
			return settled, fmt.Errorf("settle event %d: %w", dl.Event.ID, err)
		}
		settled++
	}
	return settled, nil
}

// park settles it for this target as parked. The caller counted it in parked.
func (d *Dispatcher) park(it item, o sink.Outcome, reason string) error {
	e := it.dl.Event
	return d.finish(it.dl, int32(o.Attempts), nil, &store.Park{
		EventID: e.ID, Target: d.target, Key: int64(it.key), CommitLSN: e.CommitLSN, Index: int32(e.Index),
		Attempts: int32(o.Attempts), RetryIn: d.cfg.FirstRetry, Status: o.Status, Reason: reason,
	})
}

// finish records this target's settlement of dl and settles the event with
// the tracker when it was the last of its targets.
func (d *Dispatcher) finish(dl *Delivery, attempts int32, dead *store.DeadLetter, park *store.Park) error {
	d.settled.Add(1)
	s, last := dl.settledBy(attempts, dead, park)
	if !last {
		return nil
	}
	return d.settler.Settle(dl.Event.TxnSeq, s)
}
