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
	return New(cfg, "fake", func() sink.Sink { return s }, st, zerolog.Nop(), nil, nil, nil)
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
