package deliver

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rs/zerolog"

	"github.com/outboxd/outboxd/checkpoint"
	"github.com/outboxd/outboxd/decode"
	"github.com/outboxd/outboxd/sink"
	"github.com/outboxd/outboxd/store"
)

// RouterConfig configures a Router.
type RouterConfig struct {
	Deliver Config
	// Default is the default target's sink (the env-configured webhook, or
	// another sink kind); DefaultEvents filters it by event-name globs. They
	// are used only when Destinations is empty: the one destination named
	// DefaultTarget.
	Default       sink.Sink
	DefaultEvents []string
	// DefaultGuard guards the default target (Destination.Guard).
	DefaultGuard *Guard
	// DefaultFilter is the default target's property filter, DefaultMask
	// its masking (nil: none).
	DefaultFilter *Filter
	DefaultMask   *sink.Mask
	// Destinations are the process's own targets, each with its own
	// dispatcher, filter, parked rows and dead letters (OUTBOXD_SINKS). An
	// event is settled once every destination it was routed to settled it.
	Destinations []Destination
	// Subscription builds the webhook sink of a subscription.
	Subscription func(s Subscription) (sink.Sink, error)
	// SubscriptionCallsPerHost bounds the sink calls of the webhook
	// subscriptions in progress at once to one host (scheme, host and
	// port), all subscriptions together; the others wait in a queue, in
	// the order they were handed out. 0: no bound.
	SubscriptionCallsPerHost int
	// Routing is the registry snapshot kept with the checkpoint (nil: none).
	Routing []byte
	// Secrets looks up the secrets the snapshot names by fingerprint.
	Secrets SecretLookup
	// Parked are the parked deliveries already in the table, per target and
	// ordering key.
	Parked map[string]map[uint64]int
	// DeadLettered are the targets with dead letters in the table: an idle
	// subscription target among them is kept, never dropped, so that the
	// retrier delivers what `outboxd dlq retry` puts back while this process
	// runs.
	DeadLettered []string
	// OnGone is told when a target answered 410 Gone.
	OnGone func(target string)
	// OnResult receives every sink call's result (metrics); may be nil.
	OnResult func(Result)
	// OnEvent is told of every event the router reads, before it is routed
	// (metrics); may be nil.
	OnEvent func(*decode.Event)
	// Contract validates events against the tracking plan and says what
	// each target does with an invalid one.
	Contract ContractConfig
	// OnFilterError is told when a target's property filter could not be
	// evaluated on an event, which then does not go to it (metrics); may be
	// nil.
	OnFilterError func(target string)
}

// Destination is one of the process's own targets (not a subscription).
type Destination struct {
	// Name is the target's name: parked rows, dead letters, metrics and
	// logs key on it, so it must stay the same across restarts.
	Name string
	Sink sink.Sink
	// Events filters the destination by event-name globs (none: every
	// event).
	Events []string
	// Filter selects the events it gets by their content, beside Events
	// (nil: every event Events lets through); see CompileFilter.
	Filter *Filter
	// Mask masks the properties of the copies of the events Sink is given
	// (nil: none); the other targets get the events as they are.
	Mask *sink.Mask
	// Concurrency, BatchSize and BatchWait tune its dispatcher; when
	// Concurrency is 0 the three are RouterConfig.Deliver's. Ordering,
	// MaxInFlight and FirstRetry are always RouterConfig.Deliver's: one
	// ordering key for the stream, whatever the destination.
	Concurrency int
	BatchSize   int
	BatchWait   time.Duration
	// Guard, when set, adds the destination's headers, rate limit and
	// circuit breaker to every call of its dispatcher and of the retrier.
	Guard *Guard
}

// destinations returns the destinations the router runs: the configured
// ones, or the single default target.
func (c RouterConfig) destinations() []Destination {
	if len(c.Destinations) > 0 {
		return c.Destinations
	}
	return []Destination{{Name: DefaultTarget, Sink: c.Default, Events: c.DefaultEvents, Guard: c.DefaultGuard,
		Filter: c.DefaultFilter, Mask: c.DefaultMask}}
}

// config returns the dispatcher configuration of d.
func (c RouterConfig) config(d Destination) Config {
	dc := c.Deliver
	if d.Concurrency > 0 {
		dc.Concurrency, dc.BatchSize, dc.BatchWait = d.Concurrency, d.BatchSize, d.BatchWait
	}
	return dc
}

// validateDestinations checks the destinations' names and settings.
func (c RouterConfig) validateDestinations() error {
	seen := map[string]bool{}
	for _, d := range c.destinations() {
		switch {
		case d.Name == "":
			return errors.New("a destination has no name")
		case strings.HasPrefix(d.Name, "subscription:"):
			return fmt.Errorf("destination %q: the subscription: prefix is the subscriptions' own", d.Name)
		case seen[d.Name]:
			return fmt.Errorf("destination %q given twice", d.Name)
		case d.Sink == nil:
			return fmt.Errorf("destination %q has no sink", d.Name)
		}
		seen[d.Name] = true
		if err := c.config(d).Validate(); err != nil {
			return fmt.Errorf("destination %q: %w", d.Name, err)
		}
	}
	return nil
}

// Router routes events to their targets in commit order and runs one
// Dispatcher per target.
type Router struct {
	cfg     RouterConfig
	settler Settler
	log     zerolog.Logger
	reg     *Registry
	// contract is the tracking plan as of the router's position; it
	// belongs to the router's goroutine once Run starts.
	contract contract

	mu      sync.Mutex
	targets map[string]*target
	// closers are the subscription sinks of other kinds than webhook, by
	// target, closed when replaced and when Run ends.
	closers map[string]func()
	// closing are the closes under way (closeSink).
	closing sync.WaitGroup
	// loops is the number of targets whose loop runs now.
	loops atomic.Int32
	// calls runs the subscriptions' webhook calls (nil: no bound).
	calls *CallLimiter
	// maxLoops bounds the subscription loops that run at once
	// (maxSubscriptionLoops; tests lower it).
	maxLoops int
	// kept (under mu) are the targets never dropped when idle: those with
	// dead letters, in the table at start or made since (by a dispatcher,
	// the retrier or the router's contract policy), so that the retrier
	// delivers what `outboxd dlq retry` puts back while this process runs.
	kept map[string]bool
}

// keep records that target has dead letters (Router.kept).
func (r *Router) keep(target string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.kept[target] = true
}

// Loops returns the number of targets whose delivery loop runs now: those
// with deliveries in hand, not every subscription.
func (r *Router) Loops() int { return int(r.loops.Load()) }

type target struct {
	disp *Dispatcher
	// in, running and sent belong to the router's goroutine: a target's
	// loop runs while it has deliveries to settle, and stops when it has
	// settled everything it was sent (an idle target holds no goroutine and
	// no channel; a platform has thousands of subscriptions).
	in      chan *Delivery
	running bool
	sent    int64
	// idle is set while the target is in the router's idle channel.
	idle atomic.Bool
	sink atomic.Pointer[sinkBox]
	sub  *Subscription // nil for the default target
}

// maxSubscriptionLoops bounds the subscription targets whose loop runs at
// once, those with deliveries in hand: each holds a goroutine and its
// channels, and a backlog spread over thousands of tenants would otherwise
// start a loop for each of them (memory grows with tenants, not with the
// deliveries being made). Past it the router waits, as for a full target:
// 256 tenants delivering at once (each key one request at a time) is 16
// times the default target's concurrency, and it kept the tenants bench
// (10,000 events to as many subscriptions) at 58 MB, against 69 MB with
// 1,024.
const maxSubscriptionLoops = 256

// inputSize is the capacity of t's input channel: a subscription, one of
// thousands, has a small one; its loop reads its input as it comes.
func inputSize(t *target) int {
	if t.sub != nil {
		return 16
	}
	return 256
}

// sinkBox is a target's current sink and, for a webhook subscription, the
// host its calls are limited under (CallLimiter; "": none).
type sinkBox struct {
	s    sink.Sink
	host string
}

// subscriptionBox boxes the sink of s.
func subscriptionBox(snk sink.Sink, s *Subscription) *sinkBox {
	b := &sinkBox{s: snk}
	if s.IsWebhook() {
		b.host = webhookHost(s.URL)
	}
	return b
}

// NewRouter returns a router; cfg.Deliver must have been validated.
func NewRouter(cfg RouterConfig, settler Settler, log zerolog.Logger) (*Router, error) {
	if len(cfg.Destinations) > 0 {
		if err := cfg.validateDestinations(); err != nil {
			return nil, err
		}
	}
	subs, planState, planKnown, err := splitRouting(cfg.Routing)
	if err != nil {
		return nil, err
	}
	reg, err := NewRegistry(subs, cfg.Secrets)
	if err != nil {
		return nil, err
	}
	reg.Each(func(s *Subscription) { logBadFilter(log, s) })
	r := &Router{cfg: cfg, settler: settler, log: log, reg: reg, targets: map[string]*target{}, closers: map[string]func(){},
		maxLoops: maxSubscriptionLoops, kept: map[string]bool{}}
	for _, name := range cfg.DeadLettered {
		r.kept[name] = true
	}
	if cfg.SubscriptionCallsPerHost > 0 {
		r.calls = NewCallLimiter(cfg.SubscriptionCallsPerHost)
	}
	if err := r.loadContract(planState, planKnown); err != nil {
		return nil, err
	}
	return r, nil
}

// DefaultTarget is the name of the default target: the one destination of
// OUTBOXD_SINK, whatever its kind (parked rows and dead letters of earlier
// versions carry it).
const DefaultTarget = "webhook"

// Lookup returns the dispatcher and current sink of a target, and whether it
// is enabled (a disabled or deleted subscription is not).
func (r *Router) Lookup(name string) (*Dispatcher, sink.Sink, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	t := r.targets[name]
	if t == nil {
		return nil, nil, false
	}
	enabled := t.sub == nil || t.sub.Enabled
	return t.disp, t.sink.Load().s, enabled
}

// LiveTargets returns the names of the targets that can deliver now: started
// and, for a subscription, enabled. The retrier looks only for their parked
// deliveries.
func (r *Router) LiveTargets() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make([]string, 0, len(r.targets))
	for name, t := range r.targets {
		if t.disp != nil && (t.sub == nil || t.sub.Enabled) {
			out = append(out, name)
		}
	}
	return out
}

// Run routes events from in until it is closed (then waits for every target
// to settle what it holds) or ctx ends.
func (r *Router) Run(ctx context.Context, in <-chan *decode.Event) error {
	failed := make(chan error, 1)
	// idle receives the targets whose loop holds nothing; the router stops
	// those that settled everything it sent them. A target is in it at most
	// once (target.idle) and only while its loop runs, and at most
	// r.maxLoops subscription loops run: a send never waits and
	// no notice is lost, so an idle loop always stops and frees its place.
	idle := make(chan *target, r.maxLoops)
	var wg sync.WaitGroup
	// subLoops is the number of subscription targets whose loop runs.
	subLoops := 0
	var stopIdle func(t *target)
	run := func(t *target) {
		if t.sub != nil {
			// At most r.maxLoops subscriptions hold deliveries
			// at once: past it, the router waits for one to settle all it
			// was sent, as it waits for a full target (G6). Each delivery
			// settles on its own, whatever the router does, so one does.
		wait:
			for subLoops >= r.maxLoops {
				select {
				case i := <-idle:
					stopIdle(i)
				case err := <-failed:
					// Left for the router's loop, which stops on it.
					select {
					case failed <- err:
					default:
					}
					break wait
				case <-ctx.Done():
					break wait
				}
			}
			subLoops++
			// The wait may have dropped t itself (idle, before the
			// router sent it the event it is routed): registered again,
			// it stays the subscription's one target, which the
			// retrier finds and the next event reuses.
			r.mu.Lock()
			if r.targets[t.disp.Target()] == nil {
				r.targets[t.disp.Target()] = t
			}
			r.mu.Unlock()
		}
		t.in, t.running = make(chan *Delivery, inputSize(t)), true
		wg.Add(1)
		r.loops.Add(1)
		go func(in chan *Delivery) {
			defer wg.Done()
			defer r.loops.Add(-1)
			if err := t.disp.Run(ctx, in); err != nil && !errors.Is(err, context.Canceled) {
				select {
				case failed <- fmt.Errorf("target %s: %w", t.disp.Target(), err):
				default:
				}
			}
		}(t.in)
	}
	start := func(name string, s sink.Sink, sub *Subscription, dc Config) *target {
		t := &target{sub: sub}
		if sub != nil {
			t.sink.Store(subscriptionBox(s, sub))
		} else {
			t.sink.Store(&sinkBox{s: s})
		}
		p := Params{Config: dc, Target: name, Sink: func() sink.Sink { return t.sink.Load().s },
			Settler: r.settler, Log: r.log, Parked: r.cfg.Parked[name], OnResult: r.cfg.OnResult, OnGone: r.cfg.OnGone,
			OnDeadLetter: func() { r.keep(name) }}
		if sub != nil {
			p.Calls, p.CallKey = r.calls, func() string { return t.sink.Load().host }
			// Subscriptions are many, the default target is one: only a
			// subscription's loop stops when idle.
			p.OnIdle = func() {
				if t.idle.CompareAndSwap(false, true) {
					select {
					case idle <- t:
					default:
						// Only past the bound, which a router that
						// stops on an error may leave; its loops end.
					}
				}
			}
		}
		t.disp = New(p)
		r.mu.Lock()
		r.targets[name] = t
		r.mu.Unlock()
		if sub == nil {
			// A subscription's loop starts when it is sent a delivery:
			// one started for the retrier (parked deliveries) or ahead
			// of its event would only go idle and stop.
			run(t)
		}
		return t
	}
	stopIdle = func(t *target) {
		// Cleared before the check: a loop that idles again after it sends
		// a notice of its own.
		t.idle.Store(false)
		// Only the router sends to t, so once t settled all it was sent,
		// its input is empty and nothing else can arrive: closing it ends
		// the loop, which holds nothing.
		if t.running && t.disp.Settled() == t.sent {
			close(t.in)
			t.running = false
			if t.sub != nil {
				subLoops--
				if t.sub.IsWebhook() && t.disp.ParkedKeys() == 0 {
					// Nothing in hand, nothing parked: the retrier has no
					// use of it, and the next event builds it again (a
					// webhook holds no connection of its own). Memory
					// follows the targets in use, not every subscription
					// that ever had an event. One with dead letters stays
					// (Router.kept).
					name := t.disp.Target()
					r.mu.Lock()
					if r.targets[name] == t && !r.kept[name] {
						delete(r.targets, name)
					}
					r.mu.Unlock()
				}
			}
			if t.sub != nil && r.reg.Get(t.sub.ID) == nil {
				// A deleted subscription, idle: nothing is in flight, and
				// its parked deliveries are not retried (disabled).
				r.closeSink(t.sub.TargetName(), nil)
			}
		}
	}
	type destination struct {
		t      *target
		events []string
		policy ContractPolicy
		filter *Filter
	}
	var dests []destination
	own := map[string]bool{}
	for _, d := range r.cfg.destinations() {
		// The mask is outermost: the guard (breaker, rate limit) sees
		// only events that were masked and are sent.
		dests = append(dests, destination{start(d.Name, sink.Masked(d.Guard.Wrap(d.Sink), d.Mask), nil, r.cfg.config(d)), d.Events,
			r.cfg.Contract.policy(d.Name), d.Filter})
		own[d.Name] = true
	}
	for name, keys := range r.cfg.Parked {
		if !own[name] && !strings.HasPrefix(name, "subscription:") {
			// Parked under a name no destination has now (OUTBOXD_SINK=
			// posthog parks under "webhook", OUTBOXD_SINKS=posthog under
			// "posthog"): nothing retries them until a destination of that
			// name runs again, or an operator moves them.
			n := 0
			for _, c := range keys {
				n += c
			}
			r.log.Warn().Str("target", name).Int("parked", n).
				Msg("deliveries are parked for a target this outboxd does not deliver to; they are not retried (README.md, Destinations)")
		}
	}
	// Targets with parked deliveries need a dispatcher for the retrier even
	// before an event is routed to them.
	r.reg.Each(func(s *Subscription) {
		if _, ok := r.cfg.Parked[s.TargetName()]; ok {
			r.startSubscription(start, s)
		}
	})

	defer func() {
		r.mu.Lock()
		for _, t := range r.targets {
			if t.running {
				close(t.in)
			}
		}
		r.mu.Unlock()
		wg.Wait()
		r.mu.Lock()
		for name := range r.closers {
			r.closeLocked(name, nil)
		}
		r.mu.Unlock()
		r.closing.Wait()
	}()

	var (
		routes []*target
		// stateOf is the last subscription change applied whose routing
		// state is not settled yet: changes that follow it in the same
		// transaction settle it without a state, and only the last one
		// snapshots the registry (a transaction that inserts 10,000
		// subscriptions takes one snapshot, not 10,000 of a growing
		// registry). The checkpoint can only be between transactions, so
		// the state of a transaction's last change is all it keeps.
		stateOf *decode.Event
		// held are the targets an invalid event is settled for without
		// being sent (their contract policy).
		held []contractSettled
	)
	settleState := func() error {
		if stateOf == nil {
			return nil
		}
		e := stateOf
		stateOf = nil
		return r.settler.Settle(e.TxnSeq, checkpoint.Settlement{State: r.snapshot()})
	}
	for {
		var e *decode.Event
		var ok, got bool
		if stateOf != nil {
			// Settle the state now unless the next event is already here.
			select {
			case e, ok = <-in:
				got = true
			default:
				if err := settleState(); err != nil {
					return err
				}
			}
		}
		if !got {
		wait:
			for {
				select {
				case e, ok = <-in:
					break wait
				case t := <-idle:
					stopIdle(t)
				case err := <-failed:
					return err
				case <-ctx.Done():
					return ctx.Err()
				}
			}
		}
		if !ok {
			return settleState()
		}
		if r.cfg.OnEvent != nil {
			r.cfg.OnEvent(e)
		}
		if stateOf != nil {
			if e.Change != nil && e.TxnSeq == stateOf.TxnSeq {
				// A later change of the same transaction carries the state.
				if err := r.settler.Settle(stateOf.TxnSeq, checkpoint.Settlement{}); err != nil {
					return err
				}
				stateOf = nil
			} else if err := settleState(); err != nil {
				return err
			}
		}
		if e.Change != nil {
			if isPlanChange(e.Change) {
				if err := r.applyPlan(e.Change); err != nil {
					r.log.Error().Err(err).Msg("tracking plan change ignored")
				}
			} else if err := r.change(start, e); err != nil {
				return err
			}
			stateOf = e
			continue
		}
		routes, held = routes[:0], held[:0]
		verdict, checked := r.check(e)
		invalid := checked && !verdict.Valid
		// env is the event's parsed envelope, made only if a property
		// filter looks at it, and then once for all of them. A target
		// whose filter leaves the event out does not get it, valid or not;
		// the others' contract policy applies to an invalid one.
		var env *EventEnv
		for _, d := range dests {
			if MatchGlobs(d.events, e.Name) && r.filterMatches(d.t.disp.Target(), d.filter, nil, e, &env) {
				if invalid && d.policy != ContractDeliver {
					held = append(held, contractSettled{d.t.disp.Target(), d.t.disp.Target(), d.policy})
					continue
				}
				routes = append(routes, d.t)
			}
		}
		var routeErr error
		subPolicy := r.cfg.Contract.subscriptionPolicy()
		r.reg.EachCandidate(e, func(s *Subscription) {
			if s.Matches(e) && r.filterMatches(s.TargetName(), s.filter, s.filterErr, e, &env) {
				if invalid {
					if p := s.contractPolicy(subPolicy); p != ContractDeliver {
						held = append(held, contractSettled{s.TargetName(), "subscription", p})
						return
					}
				}
				t, err := r.startSubscription(start, s)
				if err != nil {
					routeErr = err
					return
				}
				routes = append(routes, t)
			}
		})
		if routeErr != nil {
			return routeErr
		}
		if len(routes) == 0 && len(held) == 0 {
			// Routed nowhere: every routed sink (none) acknowledged it.
			if err := r.settler.Settle(e.TxnSeq, checkpoint.Settlement{EventID: e.ID, Mark: &store.Mark{ID: e.ID}}); err != nil {
				return err
			}
			continue
		}
		dl := NewDelivery(e, r.cfg.Deliver.Ordering.Key(e), len(routes)+len(held))
		if err := r.settleContract(dl, held, verdict); err != nil {
			return err
		}
		for _, t := range routes {
			if !t.running {
				run(t)
			}
			t.sent++
			select {
			case t.in <- dl:
			case err := <-failed:
				return err
			case <-ctx.Done():
				return ctx.Err()
			}
		}
	}
}

// filterMatches reports whether the property filter f of target lets e
// through (f nil: it does). A filter that could not be compiled (bad, a
// subscription's stored filter) lets nothing through; it was logged when
// read. An evaluation error on an odd row (a missing property compared, a
// property of another type) is "not matched": logged at debug level and
// counted, never fatal. An event filtered out of a target is not routed to it,
// which settles it there without sending.
func (r *Router) filterMatches(target string, f *Filter, bad error, e *decode.Event, env **EventEnv) bool {
	if bad != nil {
		return false
	}
	if f == nil {
		return true
	}
	if *env == nil {
		*env = NewEventEnv(e)
	}
	ok, err := f.Match(*env)
	if err != nil {
		r.log.Debug().Err(err).Str("target", target).Int64("event_id", e.ID).Msg("property filter could not be evaluated; the event does not go to this target")
		if r.cfg.OnFilterError != nil {
			r.cfg.OnFilterError(target)
		}
		return false
	}
	return ok
}

// logBadFilter logs that subscription s gets nothing because its stored
// filter does not compile.
func logBadFilter(log zerolog.Logger, s *Subscription) {
	if s.filterErr != nil {
		log.Error().Err(s.filterErr).Str("target", s.TargetName()).
			Msg("subscription filter does not compile; the subscription gets no event until it is fixed (outboxd subscription update --filter)")
	}
}

// startSubscription returns the running target of s, starting it if needed.
func (r *Router) startSubscription(start startFunc, s *Subscription) (*target, error) {
	name := s.TargetName()
	r.mu.Lock()
	t := r.targets[name]
	r.mu.Unlock()
	if t != nil {
		return t, nil
	}
	snk, err := r.subscriptionSink(*s)
	if err != nil {
		return nil, err
	}
	return start(name, snk, s, r.cfg.Deliver), nil
}

// startFunc starts the dispatcher of a target.
type startFunc = func(name string, s sink.Sink, sub *Subscription, dc Config) *target

// subscriptionSink builds the sink of s; a subscription that cannot be used
// (a malformed URL or secret) gets a sink that refuses permanently, so its
// events are dead-lettered with the reason instead of silently skipped.
//
// A subscription without a signing secret is unusable too: a tenant endpoint
// never gets an unsigned request (docs/DESIGN.md G8), whatever emptied the
// list (an operator's UPDATE, a row inserted with the default '{}'). Its
// deliveries are dead-lettered with "subscription N has no signing secret"
// rather than the subscription being skipped: the events stay visible in
// outboxd_dead_letter and `outboxd dlq retry` delivers them once a secret is
// set. Parked deliveries of it go through the same sink, so the retrier
// dead-letters them as well.
func (r *Router) subscriptionSink(s Subscription) (sink.Sink, error) {
	snk, err := r.buildSubscriptionSink(s)
	// A sink of another kind holds a connection (Kafka, NATS) or a client:
	// the one it replaces is closed (a delivery in flight on it fails and
	// is retried on the new one), and the last ones when Run ends.
	var c func()
	if !s.IsWebhook() {
		c = closerOf(snk)
	}
	r.closeSink(s.TargetName(), c)
	return snk, err
}

// closeSink closes the subscription sink of target that needs it, if any,
// and keeps next (nil: none) as the one to close later. The close runs
// aside (a Kafka client's may take its timeout; a delivery in flight on it
// fails and is retried) and Run waits for it before it returns.
func (r *Router) closeSink(target string, next func()) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.closeLocked(target, next)
}

func (r *Router) closeLocked(target string, next func()) {
	if old := r.closers[target]; old != nil {
		r.closing.Go(old)
	}
	if next != nil {
		r.closers[target] = next
	} else {
		delete(r.closers, target)
	}
}

// closerOf returns s's Close (with or without an error result), or nil.
func closerOf(s sink.Sink) func() {
	switch c := s.(type) {
	case interface{ Close() }:
		return c.Close
	case interface{ Close() error }:
		return func() { c.Close() } //nolint:errcheck // closing: nothing to do with its error
	}
	return nil
}

func (r *Router) buildSubscriptionSink(s Subscription) (sink.Sink, error) {
	if err := s.signingError(); err != nil {
		r.log.Error().Err(err).Str("target", s.TargetName()).Msg("subscription is unusable; its events are dead-lettered")
		return refusingSink{name: s.TargetName(), err: fmt.Errorf("%w: %w", err, sink.ErrPermanent)}, nil
	}
	if s.settingsErr != nil {
		r.log.Error().Err(s.settingsErr).Str("target", s.TargetName()).Msg("subscription is unusable; its events are dead-lettered")
		return refusingSink{name: s.TargetName(), err: fmt.Errorf("subscription %d is unusable: %w: %w", s.ID, s.settingsErr, sink.ErrPermanent)}, nil
	}
	if !s.IsWebhook() {
		// Built at its first delivery, off this loop, and built again
		// after a failure that may pass (lazySink).
		log := r.log.With().Str("target", s.TargetName()).Logger()
		return &lazySink{name: s.TargetName(), build: func() (sink.Sink, error) {
			snk, err := r.cfg.Subscription(s)
			if err != nil {
				if errors.Is(err, sink.ErrPermanent) {
					log.Error().Err(err).Msg("subscription is unusable; its events are dead-lettered")
					return nil, fmt.Errorf("subscription %d is unusable: %w", s.ID, err)
				}
				log.Warn().Err(err).Msg("subscription sink not ready; its events are parked and retried")
				return nil, fmt.Errorf("subscription %d: %w", s.ID, err)
			}
			return snk, nil
		}}, nil
	}
	snk, err := r.cfg.Subscription(s)
	if err != nil {
		r.log.Error().Err(err).Str("target", s.TargetName()).Msg("subscription is unusable; its events are dead-lettered")
		return refusingSink{name: s.TargetName(), err: fmt.Errorf("subscription %d is unusable: %w: %w", s.ID, err, sink.ErrPermanent)}, nil
	}
	return snk, nil
}

// change applies a subscription change; the caller settles it with the
// routing state.
func (r *Router) change(start startFunc, e *decode.Event) error {
	s, err := r.reg.Apply(e.Change)
	if err != nil {
		r.log.Error().Err(err).Msg("subscription change ignored")
	}
	if errors.Is(err, ErrUnknownUnchanged) {
		// The registry dropped the subscription rather than guess its
		// unchanged columns; a running target of it (the retrier's way to
		// its parked deliveries) stops too, as for a delete.
		if id, err := rowID(e.Change.Row); err == nil {
			r.disableTarget(id)
		}
	}
	if e.Change.Kind == decode.KindDelete && e.Change.Row != nil {
		// A deleted subscription's target stops: its parked deliveries stay
		// in the table (an operator may dead-letter or purge them).
		if id, err := rowID(e.Change.Row); err == nil {
			// Its connection (Kafka, NATS) is closed once its loop has
			// settled what it was sent (stopIdle): the events committed
			// before the delete are still its own.
			r.disableTarget(id)
			r.log.Info().Str("target", SubscriptionTarget(id)).Msg("subscription deleted")
		}
	}
	if s != nil {
		r.mu.Lock()
		t := r.targets[s.TargetName()]
		var old *Subscription
		if t != nil {
			old, t.sub = t.sub, s
		}
		r.mu.Unlock()
		if t != nil {
			// An insert is a subscription anew (one deleted and inserted
			// again with its id: its sink was closed when it went idle).
			if old == nil || e.Change.Kind == decode.KindInsert || old.URL != s.URL || !slices.Equal(old.Secrets, s.Secrets) ||
				old.Kind != s.Kind || !maps.Equal(old.Settings, s.Settings) {
				snk, _ := r.subscriptionSink(*s)
				t.sink.Store(subscriptionBox(snk, s))
			}
		}
		r.log.Info().Str("target", s.TargetName()).Bool("enabled", s.Enabled).Bool("filtered", s.Filter != "").Msg("subscription changed")
		logBadFilter(r.log, s)
		if _, parked := r.cfg.Parked[s.TargetName()]; t == nil && parked {
			// A subscription the registry learns only now (a catch-up
			// seeds the registry after a slot reset) with deliveries
			// parked in the table: the retrier reaches them through its
			// target, which no event may ever start (the catch-up skips
			// parked rows; the tenant may be quiet).
			if _, err := r.startSubscription(start, s); err != nil {
				return err
			}
		}
	}
	return nil
}

// disableTarget marks the running target of subscription id, if any, as
// disabled.
func (r *Router) disableTarget(id int64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if t := r.targets[SubscriptionTarget(id)]; t != nil && t.sub != nil {
		gone := *t.sub
		gone.Enabled = false
		t.sub = &gone
	}
}

// lazySink is the sink of a subscription of another kind than webhook
// (Kafka, NATS, PostHog, GA4), built at its first delivery rather than on
// the router's loop, where a broker that does not answer would hold every
// target's routing for the build's timeout. A build that fails for a
// reason that may pass (a broker down, a secret file not mounted yet) fails
// those deliveries retryably, so they park, and the next delivery (a retry
// of a parked one) builds again; one refused for the row's own settings
// (sink.ErrPermanent) dead-letters them with the reason. Closed, it
// closes the sink it built and fails deliveries retryably.
type lazySink struct {
	name   string
	build  func() (sink.Sink, error)
	mu     sync.Mutex
	s      sink.Sink
	closed bool
}

func (l *lazySink) Name() string { return l.name }

func (l *lazySink) Deliver(ctx context.Context, events []*decode.Event) []sink.Outcome {
	l.mu.Lock()
	var err error
	switch {
	case l.closed:
		err = errors.New("subscription sink closed (the subscription changed or was deleted)")
	case l.s == nil:
		l.s, err = l.build()
	}
	s := l.s
	l.mu.Unlock()
	if err != nil {
		return refusingSink{name: l.name, err: err}.Deliver(ctx, events)
	}
	return s.Deliver(ctx, events)
}

// Close closes the sink built, if any.
func (l *lazySink) Close() {
	l.mu.Lock()
	l.closed = true
	s := l.s
	l.mu.Unlock()
	if c := closerOf(s); c != nil {
		c()
	}
}

// refusingSink fails every delivery with err (for good when it wraps
// sink.ErrPermanent).
type refusingSink struct {
	name string
	err  error
}

func (s refusingSink) Name() string { return s.name }
func (s refusingSink) Deliver(_ context.Context, events []*decode.Event) []sink.Outcome {
	out := make([]sink.Outcome, len(events))
	for i := range out {
		out[i].Err = s.err
	}
	return out
}
