package deliver

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"github.com/stretchr/testify/require"

	"github.com/outboxd/outboxd/checkpoint"
	"github.com/outboxd/outboxd/decode"
	"github.com/outboxd/outboxd/sink"
	"github.com/outboxd/outboxd/store"
)

// fakeSink is a hand-written sink whose behaviour each test sets.
type fakeSink struct {
	DeliverFunc func(ctx context.Context, events []*decode.Event) []sink.Outcome
}

func (f *fakeSink) Name() string { return "fake" }
func (f *fakeSink) Deliver(ctx context.Context, events []*decode.Event) []sink.Outcome {
	return f.DeliverFunc(ctx, events)
}

// fakeSettler records settles.
type fakeSettler struct {
	mu      sync.Mutex
	marks   map[int64]int32
	dead    map[int64]store.DeadLetter
	parked  []store.Park
	settled chan int64
}

func newSettler(n int) *fakeSettler {
	return &fakeSettler{marks: map[int64]int32{}, dead: map[int64]store.DeadLetter{}, settled: make(chan int64, n)}
}

func (s *fakeSettler) Settle(_ uint64, st checkpoint.Settlement) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if st.Mark != nil {
		s.marks[st.Mark.ID] = st.Mark.Attempts
	}
	for _, d := range st.Dead {
		s.dead[d.EventID] = d
	}
	for _, p := range st.Parked {
		s.parked = append(s.parked, p)
	}
	s.settled <- st.EventID
	return nil
}

func events(n, keys int) []*decode.Event {
	out := make([]*decode.Event, n)
	for i := range out {
		out[i] = &decode.Event{ID: int64(i + 1), OrganizationID: int64(i % keys), HasOrganization: true, EntityType: "batch", EntityID: fmt.Sprint(i % 7)}
	}
	return out
}

func feed(cfg Config, evs []*decode.Event) <-chan *Delivery {
	ch := make(chan *Delivery, len(evs))
	for _, e := range evs {
		ch <- NewDelivery(e, cfg.Ordering.Key(e), 1)
	}
	close(ch)
	return ch
}

func newDispatcher(cfg Config, s sink.Sink, st Settler) *Dispatcher {
	return New(Params{Config: cfg, Target: "fake", Sink: func() sink.Sink { return s }, Settler: st, Log: zerolog.Nop()})
}

func TestPerKeyOrderWithConcurrency(t *testing.T) {
	t.Parallel()
	for _, batch := range []int{1, 5} {
		t.Run(fmt.Sprintf("batch=%d", batch), func(t *testing.T) {
			t.Parallel()
			const n, keys = 3000, 13
			var (
				mu         sync.Mutex
				lastByKey  = map[int64]int64{}
				active     atomic.Int32
				maxActive  atomic.Int32
				violations []string
			)
			rng := rand.New(rand.NewPCG(3, 4))
			var rngMu sync.Mutex
			s := &fakeSink{DeliverFunc: func(_ context.Context, evs []*decode.Event) []sink.Outcome {
				cur := active.Add(1)
				for old := maxActive.Load(); cur > old && !maxActive.CompareAndSwap(old, cur); old = maxActive.Load() {
				}
				rngMu.Lock()
				d := time.Duration(rng.IntN(200)) * time.Microsecond
				rngMu.Unlock()
				time.Sleep(d) // the receiver's latency, not synchronisation
				mu.Lock()
				for _, e := range evs {
					if last := lastByKey[e.OrganizationID]; last > e.ID {
						violations = append(violations, fmt.Sprintf("key %d: %d after %d", e.OrganizationID, e.ID, last))
					}
					lastByKey[e.OrganizationID] = e.ID
				}
				mu.Unlock()
				active.Add(-1)
				out := make([]sink.Outcome, len(evs))
				for i := range out {
					out[i].Attempts = 1
				}
				return out
			}}
			cfg := Config{Concurrency: 8, BatchSize: batch, MaxInFlight: 100}
			cfg = cfg.WithDefaults()
			require.NoError(t, cfg.Validate())
			st := newSettler(n)
			d := newDispatcher(cfg, s, st)
			require.NoError(t, d.Run(context.Background(), feed(cfg, events(n, keys))))
			require.Empty(t, violations)
			require.Len(t, st.marks, n)
			require.Greater(t, maxActive.Load(), int32(1), "different keys must be delivered in parallel")
		})
	}
}

func TestFailingKeyDoesNotBlockOthersAndDeadLetters(t *testing.T) {
	t.Parallel()
	release := make(chan struct{})
	s := &fakeSink{DeliverFunc: func(_ context.Context, evs []*decode.Event) []sink.Outcome {
		out := make([]sink.Outcome, len(evs))
		for i, e := range evs {
			if e.OrganizationID == 0 {
				<-release // key 0 is slow
				out[i] = sink.Outcome{Err: fmt.Errorf("status 400: %w", sink.ErrPermanent), Status: 400, Attempts: 1}
				continue
			}
			out[i] = sink.Outcome{Attempts: 1}
		}
		return out
	}}
	cfg := Config{Concurrency: 4}
	cfg = cfg.WithDefaults()
	require.NoError(t, cfg.Validate())
	st := newSettler(100)
	d := newDispatcher(cfg, s, st)
	evs := events(40, 4) // keys 0..3, 10 events each
	done := make(chan error, 1)
	go func() { done <- d.Run(context.Background(), feed(cfg, evs)) }()
	// Every event of keys 1..3 settles while key 0 is stuck on its first event.
	for range 30 {
		select {
		case id := <-st.settled:
			require.NotZero(t, (id-1)%4, "key 0 must still be blocked")
		case <-time.After(10 * time.Second):
			t.Fatal("other keys did not flow while one key was blocked")
		}
	}
	close(release)
	require.NoError(t, <-done)
	require.Len(t, st.dead, 10)
	require.Equal(t, 400, st.dead[1].Status)
}

func TestCancelLeavesEventsUnsettled(t *testing.T) {
	t.Parallel()
	started := make(chan struct{})
	s := &fakeSink{DeliverFunc: func(ctx context.Context, evs []*decode.Event) []sink.Outcome {
		close(started)
		<-ctx.Done()
		out := make([]sink.Outcome, len(evs))
		for i := range out {
			out[i].Err = ctx.Err()
		}
		return out
	}}
	cfg := Config{Concurrency: 1}
	cfg = cfg.WithDefaults()
	require.NoError(t, cfg.Validate())
	st := newSettler(10)
	d := newDispatcher(cfg, s, st)
	ctx, cancel := context.WithCancel(context.Background())
	in := make(chan *Delivery, 1)
	in <- NewDelivery(events(1, 1)[0], 0, 1)
	done := make(chan error, 1)
	go func() { done <- d.Run(ctx, in) }()
	<-started
	cancel()
	err := <-done
	require.True(t, errors.Is(err, context.Canceled))
	require.Empty(t, st.marks)
	require.Empty(t, st.dead)
}

func TestBatchNeverReordersAKey(t *testing.T) {
	t.Parallel()
	var mu sync.Mutex
	var batches [][]int64
	s := &fakeSink{DeliverFunc: func(_ context.Context, evs []*decode.Event) []sink.Outcome {
		ids := make([]int64, len(evs))
		for i, e := range evs {
			ids[i] = e.ID
		}
		mu.Lock()
		batches = append(batches, ids)
		mu.Unlock()
		return make([]sink.Outcome, len(evs))
	}}
	cfg := Config{Concurrency: 1, BatchSize: 10, BatchWait: 50 * time.Millisecond}
	cfg = cfg.WithDefaults()
	require.NoError(t, cfg.Validate())
	st := newSettler(100)
	d := newDispatcher(cfg, s, st)
	require.NoError(t, d.Run(context.Background(), feed(cfg, events(95, 3))))
	total := 0
	for _, b := range batches {
		require.LessOrEqual(t, len(b), 10)
		total += len(b)
	}
	require.Equal(t, 95, total)
	require.Len(t, st.marks, 95)
}

func TestOrderingKeys(t *testing.T) {
	t.Parallel()
	a := &decode.Event{ID: 1, OrganizationID: 7, HasOrganization: true, EntityType: "batch", EntityID: "B-1"}
	b := &decode.Event{ID: 2, OrganizationID: 7, HasOrganization: true, EntityType: "batch", EntityID: "B-2"}
	c := &decode.Event{ID: 3, EntityType: "batch", EntityID: "B-1"}
	require.Equal(t, OrderOrganization.Key(a), OrderOrganization.Key(b))
	require.NotEqual(t, OrderOrganization.Key(a), OrderOrganization.Key(c), "NULL organization is its own key")
	require.NotEqual(t, OrderEntity.Key(a), OrderEntity.Key(b))
	require.Equal(t, OrderEntity.Key(a), OrderEntity.Key(c))
	require.NotEqual(t, OrderNone.Key(a), OrderNone.Key(b))
	_, err := ParseOrdering("tenant")
	require.Error(t, err)
}

// scopedSink sends each event to the destination named by its event name
// (a Kafka topic template) and refuses, retryably, everything sent to
// "missing".
type scopedSink struct{ fakeSink }

func (scopedSink) Scope(e *decode.Event) string { return e.Name }

// A sink with several destinations keeps order per key and destination: an
// event its destination refuses (a topic not created yet) parks only the
// events of its key bound for that destination, not those for the others.
func TestParkedDestinationDoesNotHoldBackTheKeyElsewhere(t *testing.T) {
	t.Parallel()
	s := &scopedSink{fakeSink{DeliverFunc: func(_ context.Context, evs []*decode.Event) []sink.Outcome {
		out := make([]sink.Outcome, len(evs))
		for i, e := range evs {
			out[i] = sink.Outcome{Attempts: 1}
			if e.Name == "missing" {
				out[i] = sink.Outcome{Attempts: 1, Err: errors.New("UNKNOWN_TOPIC_OR_PARTITION")}
			}
		}
		return out
	}}}
	cfg := Config{Concurrency: 2}.WithDefaults()
	require.NoError(t, cfg.Validate())
	st := newSettler(10)
	d := newDispatcher(cfg, s, st)
	// One organization: missing, present, missing, present.
	var evs []*decode.Event
	for i, name := range []string{"missing", "present", "missing", "present"} {
		evs = append(evs, &decode.Event{ID: int64(i + 1), Name: name, OrganizationID: 7, HasOrganization: true})
	}
	require.NoError(t, d.Run(context.Background(), feed(cfg, evs)))

	require.Equal(t, map[int64]int32{2: 1, 4: 1}, st.marks, "the events for the working destination are delivered")
	require.Len(t, st.parked, 2)
	require.Equal(t, []int64{1, 3}, []int64{st.parked[0].EventID, st.parked[1].EventID})
	require.Equal(t, st.parked[0].Key, st.parked[1].Key, "one parked run: the refused destination's events stay in order")
	base := cfg.Ordering.Key(evs[0])
	require.NotEqual(t, int64(base), st.parked[0].Key, "the run is the key's on that destination only")
	require.Positive(t, st.parked[0].Key, "scoped keys stay out of the negative space of revived dead letters")
	require.Equal(t, 1, d.ParkedKeys())
}

// A destination scope of "" (a sink with one destination) leaves the key as
// it is, so parked runs written before keep matching.
func TestEmptyScopeKeepsTheKey(t *testing.T) {
	t.Parallel()
	for _, k := range []uint64{0, 1, 15, 1<<40 | 1} {
		require.Equal(t, k, ScopedKey(k, ""))
		require.NotEqual(t, ScopedKey(k, "a"), ScopedKey(k, "b"))
		require.Equal(t, ScopedKey(k, "a"), ScopedKey(k, "a"))
	}
}

// Deliveries parked before keys were scoped by destination (an upgrade)
// carry the unscoped key: a new event of that key is held behind them, in
// their run, whatever its destination.
func TestScopedKeyHeldBehindUnscopedParkedRun(t *testing.T) {
	t.Parallel()
	s := &scopedSink{fakeSink{DeliverFunc: func(_ context.Context, evs []*decode.Event) []sink.Outcome {
		return make([]sink.Outcome, len(evs))
	}}}
	cfg := Config{Concurrency: 2}.WithDefaults()
	require.NoError(t, cfg.Validate())
	e := &decode.Event{ID: 10, Name: "present", OrganizationID: 7, HasOrganization: true}
	base := cfg.Ordering.Key(e)
	other := &decode.Event{ID: 11, Name: "present", OrganizationID: 8, HasOrganization: true}
	st := newSettler(10)
	d := New(Params{Config: cfg, Target: "fake", Sink: func() sink.Sink { return s }, Settler: st, Log: zerolog.Nop(),
		Parked: map[uint64]int{base: 1}})
	require.NoError(t, d.Run(context.Background(), feed(cfg, []*decode.Event{e, other})))
	require.Equal(t, map[int64]int32{11: 0}, st.marks, "the other key is delivered")
	require.Len(t, st.parked, 1)
	require.Equal(t, int64(10), st.parked[0].EventID)
	require.Equal(t, int64(base), st.parked[0].Key, "held in the unscoped run")
	d.Unparked(base, 2)
	require.Zero(t, d.ParkedKeys())
}
