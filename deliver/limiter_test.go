package deliver

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"github.com/stretchr/testify/require"

	"github.com/outboxd/outboxd/decode"
	"github.com/outboxd/outboxd/sink"
	"github.com/outboxd/outboxd/store"
)

// gatedSink holds every call until its gate opens, counting the calls in
// progress (per host and in all) and the most seen at once, and records the
// events each target was given, in order.
type gatedSink struct {
	gate    chan struct{}
	mu      sync.Mutex
	running map[string]int // host -> calls in progress
	most    map[string]int
	total   atomic.Int32
	got     map[string][]int64 // target -> event ids
}

func newGatedSink() *gatedSink {
	return &gatedSink{gate: make(chan struct{}), running: map[string]int{}, most: map[string]int{}, got: map[string][]int64{}}
}

func (g *gatedSink) running1(host string) int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.running[host]
}

func (g *gatedSink) delivered() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	n := 0
	for _, ids := range g.got {
		n += len(ids)
	}
	return n
}

// sink returns the sink of target, which posts to host.
func (g *gatedSink) sink(target, host string) sink.Sink {
	return &fakeSink{DeliverFunc: func(_ context.Context, evs []*decode.Event) []sink.Outcome {
		g.mu.Lock()
		g.running[host]++
		g.most[host] = max(g.most[host], g.running[host])
		g.total.Add(1)
		g.mu.Unlock()
		<-g.gate
		g.mu.Lock()
		g.running[host]--
		g.total.Add(-1)
		for _, e := range evs {
			g.got[target] = append(g.got[target], e.ID)
		}
		g.mu.Unlock()
		out := make([]sink.Outcome, len(evs))
		for i := range out {
			out[i].Attempts = 1
		}
		return out
	}}
}

// Dispatchers sharing a CallLimiter make at most its limit of sink calls at
// once to one host, all of them together, however many dispatchers and
// keys have deliveries in hand; the calls of another host are not held
// back by them; every delivery arrives, in order per key.
func TestCallLimiterBoundsCallsPerHost(t *testing.T) {
	t.Parallel()
	const targets, perTarget, limit = 40, 12, 3
	cfg := Config{Concurrency: 4}.WithDefaults()
	require.NoError(t, cfg.Validate())
	calls := NewCallLimiter(limit)
	g := newGatedSink()
	st := newSettler(targets * perTarget)
	ctx := context.Background()
	var wg sync.WaitGroup
	errs := make(chan error, targets)
	for i := range targets {
		name, host := "t"+strconv.Itoa(i), []string{"https://a:443", "https://b:443"}[i%2]
		snk := g.sink(name, host)
		d := New(Params{Config: cfg, Target: name, Sink: func() sink.Sink { return snk }, Settler: st, Log: zerolog.Nop(),
			Calls: calls, CallKey: func() string { return host }})
		in := make(chan *Delivery, perTarget)
		for j := range perTarget {
			// Three keys per target: four calls at once without the
			// limiter.
			e := &decode.Event{ID: int64(i*perTarget + j + 1), OrganizationID: int64(j % 3), HasOrganization: true}
			in <- NewDelivery(e, cfg.Ordering.Key(e), 1)
		}
		close(in)
		wg.Go(func() { errs <- d.Run(ctx, in) })
	}
	require.Eventually(t, func() bool { return g.running1("https://a:443") == limit && g.running1("https://b:443") == limit },
		10*time.Second, time.Millisecond, "each host has its limit of calls in progress")
	require.EqualValues(t, 2*limit, g.total.Load())
	close(g.gate)
	wg.Wait()
	for range targets {
		require.NoError(t, <-errs)
	}
	require.Equal(t, targets*perTarget, g.delivered())
	require.Equal(t, map[string]int{"https://a:443": limit, "https://b:443": limit}, g.most, "never more than the limit at once per host")
	for name, ids := range g.got {
		byKey := map[int64][]int64{}
		for _, id := range ids {
			byKey[(id-1)%perTarget%3] = append(byKey[(id-1)%perTarget%3], id)
		}
		for k, ids := range byKey {
			require.True(t, slices.IsSorted(ids), "target %s key %d out of order: %v", name, k, ids)
		}
	}
	calls.mu.Lock()
	require.Empty(t, calls.keys, "a host without calls holds nothing")
	calls.mu.Unlock()
}

func TestWebhookHost(t *testing.T) {
	t.Parallel()
	for raw, want := range map[string]string{
		"https://Hooks.Example.com/a?x=1":   "https://hooks.example.com:443",
		"https://u:p@hooks.example.com:443": "https://hooks.example.com:443",
		"http://hooks.example.com/x":        "http://hooks.example.com:80",
		"http://10.0.0.1:8080/x":            "http://10.0.0.1:8080",
		"HTTPS://[::1]/x":                   "https://[::1]:443",
		"http://[::1]:8080":                 "http://[::1]:8080",
		"http://h?q=a@b":                    "http://h:80",
		"not a url":                         "",
		"https:///x":                        "",
		"%zz":                               "",
	} {
		require.Equal(t, want, webhookHost(raw), raw)
	}
}

// At most maxLoops subscription targets have their loop running at once:
// a backlog spread over many tenants waits for running ones to settle
// before more start, every event is delivered once, and every loop stops
// when idle.
func TestSubscriptionLoopsBounded(t *testing.T) {
	t.Parallel()
	const n, loops = 60, 3
	cfg := Config{Concurrency: 2}.WithDefaults()
	require.NoError(t, cfg.Validate())
	g := newGatedSink()
	st := newSettler(2 * n)
	build := func(s Subscription) (sink.Sink, error) { return g.sink(s.TargetName(), "h"), nil }
	r, err := NewRouter(RouterConfig{Deliver: cfg, Default: &fakeSink{}, DefaultEvents: []string{"none"}, Subscription: build}, st, zerolog.Nop())
	require.NoError(t, err)
	r.maxLoops = loops
	in := make(chan *decode.Event, 2*n)
	for i := range n {
		c := change(decode.KindInsert, subRow(strconv.Itoa(i+1), strconv.Itoa(i+1), "https://a", "{whsec_x}", "{}", "t", "NULL", "2026-01-01", "2026-01-01"))
		c.TxnSeq = 1
		in <- c
	}
	for i := range n {
		in <- &decode.Event{ID: int64(i + 1), Name: "e", OrganizationID: int64(i + 1), HasOrganization: true, TxnSeq: 2}
	}
	done := make(chan error, 1)
	go func() { done <- r.Run(context.Background(), in) }()
	require.Eventually(t, func() bool { return g.total.Load() == loops }, 10*time.Second, time.Millisecond)
	require.Equal(t, 1+loops, r.Loops(), "the default target's loop and the bound of subscription loops")
	close(g.gate)
	require.Eventually(t, func() bool { return g.delivered() == n && r.Loops() == 1 }, 30*time.Second, time.Millisecond,
		"every event delivered and every subscription loop stopped")
	require.Equal(t, loops, g.most["h"], "never more subscription loops delivering at once than the bound")
	for i := range n {
		require.Equal(t, []int64{int64(i + 1)}, g.got[SubscriptionTarget(int64(i+1))])
	}
	close(in)
	require.NoError(t, <-done)
}

// A webhook subscription's target that settled everything it was sent and
// has nothing parked is dropped when its loop stops: the router holds
// targets for the subscriptions in use, not for every one that ever had an
// event. One with parked deliveries stays, for the retrier, and so does one
// that dead-lettered (the retrier delivers what `dlq retry` puts back); a
// dropped one is built again by its next event.
func TestIdleSubscriptionTargetsDropped(t *testing.T) {
	t.Parallel()
	cfg := Config{Concurrency: 2}.WithDefaults()
	require.NoError(t, cfg.Validate())
	st := newSettler(16)
	var mu sync.Mutex
	built := map[int64]int{}
	got := map[int64][]int64{}
	build := func(s Subscription) (sink.Sink, error) {
		mu.Lock()
		built[s.ID]++
		mu.Unlock()
		return &fakeSink{DeliverFunc: func(_ context.Context, evs []*decode.Event) []sink.Outcome {
			out := make([]sink.Outcome, len(evs))
			mu.Lock()
			defer mu.Unlock()
			for i, e := range evs {
				got[s.ID] = append(got[s.ID], e.ID)
				out[i].Attempts = 1
				switch s.ID {
				case 2:
					out[i].Err = errors.New("status 503") // parked
				case 3:
					out[i].Err = fmt.Errorf("status 422: %w", sink.ErrPermanent) // dead-lettered
				}
			}
			return out
		}}, nil
	}
	r, err := NewRouter(RouterConfig{Deliver: cfg, Default: &fakeSink{}, DefaultEvents: []string{"none"}, Subscription: build}, st, zerolog.Nop())
	require.NoError(t, err)
	in := make(chan *decode.Event, 8)
	for i := 1; i <= 3; i++ {
		c := change(decode.KindInsert, subRow(strconv.Itoa(i), strconv.Itoa(i), "https://a", "{whsec_x}", "{}", "t", "NULL", "2026-01-01", "2026-01-01"))
		c.TxnSeq = 1
		in <- c
	}
	in <- &decode.Event{ID: 1, Name: "e", OrganizationID: 1, HasOrganization: true, TxnSeq: 2}
	in <- &decode.Event{ID: 2, Name: "e", OrganizationID: 2, HasOrganization: true, TxnSeq: 3}
	in <- &decode.Event{ID: 4, Name: "e", OrganizationID: 3, HasOrganization: true, TxnSeq: 3}
	done := make(chan error, 1)
	go func() { done <- r.Run(context.Background(), in) }()
	gone := func(name string) bool { d, _, _ := r.Lookup(name); return d == nil }
	require.Eventually(t, func() bool {
		st.mu.Lock()
		defer st.mu.Unlock()
		return len(st.marks) == 1 && len(st.parked) == 1 && len(st.dead) == 1 && r.Loops() == 1 && gone("subscription:1")
	}, 10*time.Second, time.Millisecond, "delivered, parked, dead-lettered, loops stopped, the idle target dropped")
	d, _, enabled := r.Lookup("subscription:2")
	require.NotNil(t, d, "the target with a parked delivery stays for the retrier")
	require.True(t, enabled)
	require.Equal(t, 1, d.ParkedKeys())
	require.False(t, gone("subscription:3"), "the target that dead-lettered stays")
	require.ElementsMatch(t, []string{DefaultTarget, "subscription:2", "subscription:3"}, r.LiveTargets())

	in <- &decode.Event{ID: 3, Name: "e", OrganizationID: 1, HasOrganization: true, TxnSeq: 4}
	require.Eventually(t, func() bool {
		mu.Lock()
		defer mu.Unlock()
		return slices.Equal(got[1], []int64{1, 3}) && r.Loops() == 1 && gone("subscription:1")
	}, 10*time.Second, time.Millisecond)
	mu.Lock()
	require.Equal(t, map[int64]int{1: 2, 2: 1, 3: 1}, built, "subscription 1's sink built again for its next event")
	mu.Unlock()
	close(in)
	require.NoError(t, <-done)
}

// A parked delivery the retrier gives up on marks its target as one that
// dead-lettered, which the router keeps when idle; one rescheduled does
// not.
func TestRetrierGiveUpMarksTheTargetDeadLettered(t *testing.T) {
	t.Parallel()
	deadLettered := false
	disp := New(Params{Target: "subscription:3", Log: zerolog.Nop(), OnDeadLetter: func() { deadLettered = true }})
	k := keyRun{r: &Retrier{}, disp: disp, h: store.ParkedHead{Target: "subscription:3", Key: 7}, log: zerolog.Nop()}
	k.note(store.RetryLater, 1, time.Minute, sink.Outcome{Attempts: 1}, "503")
	require.False(t, deadLettered)
	k.note(store.GiveUp, 1, 0, sink.Outcome{Attempts: 1}, "retry schedule exhausted")
	require.True(t, deadLettered)
}

// A target the router stops and drops while it waits for a loop's place,
// between routing an event to it and sending it the event, is registered
// again when its loop runs: the one target of its subscription, which the
// retrier finds and the next event reuses (not a second dispatcher
// delivering the same key beside it).
func TestTargetDroppedWhileRoutedIsRegisteredAgain(t *testing.T) {
	t.Parallel()
	cfg := Config{Concurrency: 2}.WithDefaults()
	require.NoError(t, cfg.Validate())
	started, release := make(chan int64, 4), make(chan struct{})
	ack := func(evs []*decode.Event) []sink.Outcome {
		out := make([]sink.Outcome, len(evs))
		for i := range out {
			out[i].Attempts = 1
		}
		return out
	}
	build := func(s Subscription) (sink.Sink, error) {
		return &fakeSink{DeliverFunc: func(_ context.Context, evs []*decode.Event) []sink.Outcome {
			if s.ID == 2 { // held until released
				started <- evs[0].ID
				<-release
			}
			return ack(evs)
		}}, nil
	}
	r, err := NewRouter(RouterConfig{Deliver: cfg, Default: &fakeSink{}, DefaultEvents: []string{"none"}, Subscription: build}, newSettler(8), zerolog.Nop())
	require.NoError(t, err)
	r.maxLoops = 1
	in := make(chan *decode.Event, 4)
	// Subscription 1 is platform-wide for events b, 2 organization 1's
	// for every event: event b of organization 1 is routed to 1 (new),
	// then to 2 (running).
	for _, row := range [][]string{
		{"1", "NULL", "https://a", "{whsec_x}", "{b}", "t", "NULL", "2026-01-01", "2026-01-01"},
		{"2", "1", "https://a", "{whsec_x}", "{}", "t", "NULL", "2026-01-01", "2026-01-01"},
	} {
		c := change(decode.KindInsert, subRow(row...))
		c.TxnSeq = 1
		in <- c
	}
	in <- &decode.Event{ID: 1, Name: "a", OrganizationID: 1, HasOrganization: true, TxnSeq: 2}
	in <- &decode.Event{ID: 2, Name: "b", OrganizationID: 1, HasOrganization: true, TxnSeq: 3}
	done := make(chan error, 1)
	go func() { done <- r.Run(context.Background(), in) }()
	require.Equal(t, int64(1), <-started)
	// Event 2 is routed (subscription 1's target exists): the router
	// waits for subscription 2's loop, the one running, to give its place
	// to subscription 1's, and only there learns that it went idle.
	require.Eventually(t, func() bool { d, _, _ := r.Lookup("subscription:1"); return d != nil }, 10*time.Second, time.Millisecond)
	release <- struct{}{}
	require.Equal(t, int64(2), <-started, "subscription 2 delivers event 2 after 1 did")
	d, _, _ := r.Lookup("subscription:2")
	require.NotNil(t, d, "the target delivering is registered")
	release <- struct{}{}
	require.Eventually(t, func() bool { return r.Loops() == 1 }, 10*time.Second, time.Millisecond)
	close(in)
	require.NoError(t, <-done)
}

// An idle subscription target with dead letters — in the table when the
// router started, or dead-lettered since by its contract policy — is kept,
// so that what `outboxd dlq retry` puts back is retried while the process
// runs; one without is dropped.
func TestIdleSubscriptionTargetsWithDeadLettersKept(t *testing.T) {
	t.Parallel()
	cfg := Config{Concurrency: 2}.WithDefaults()
	require.NoError(t, cfg.Validate())
	st := newSettler(16)
	build := func(s Subscription) (sink.Sink, error) { return &recorder{}, nil }
	r, err := NewRouter(RouterConfig{Deliver: cfg, Default: &fakeSink{}, DefaultEvents: []string{"none"}, Subscription: build,
		DeadLettered: []string{"subscription:1"}, Contract: ContractConfig{Subscriptions: ContractDeadLetter}}, st, zerolog.Nop())
	require.NoError(t, err)
	in := make(chan *decode.Event, 16)
	for id, org := range map[int]int{1: 1, 2: 7, 3: 3} {
		c := change(decode.KindInsert, subRow(strconv.Itoa(id), strconv.Itoa(org), "https://a", "{whsec_x}", "{}", "t", "NULL", "2026-01-01", "2026-01-01"))
		c.TxnSeq = 1
		in <- c
	}
	in <- planChangeEvent(2, decode.KindInsert, examplePlan(t), false)
	in <- contractEvent(10, 3, false) // subscription 2's: dead-lettered by the router
	in <- contractEvent(11, 4, true)  // delivered to subscription 2
	for id, org := range map[int64]int64{12: 1, 13: 3} {
		e := contractEvent(id, uint64(id), true)
		e.OrganizationID = org // routed by it
		in <- e
	}
	done := make(chan error, 1)
	go func() { done <- r.Run(context.Background(), in) }()
	gone := func(name string) bool { d, _, _ := r.Lookup(name); return d == nil }
	require.Eventually(t, func() bool {
		st.mu.Lock()
		defer st.mu.Unlock()
		return len(st.marks) == 3 && len(st.dead) == 1 && r.Loops() == 1 && gone("subscription:3")
	}, 10*time.Second, time.Millisecond, "delivered, dead-lettered, loops stopped, the plain idle target dropped")
	require.False(t, gone("subscription:1"), "a target with dead letters in the table stays")
	require.False(t, gone("subscription:2"), "a target the router dead-lettered for stays")
	close(in)
	require.NoError(t, <-done)
}
