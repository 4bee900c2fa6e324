package deliver

import (
	"context"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"github.com/stretchr/testify/require"

	"github.com/outboxd/outboxd/decode"
	"github.com/outboxd/outboxd/sink"
)

// recorder is a destination's sink: it records the ids it got, after its
// gate (if any) opens, and fails permanently for the ids in fail.
type recorder struct {
	mu   sync.Mutex
	got  []int64
	gate chan struct{}
	fail map[int64]bool
}

func (r *recorder) Name() string { return "recorder" }

func (r *recorder) Deliver(ctx context.Context, evs []*decode.Event) []sink.Outcome {
	if r.gate != nil {
		select {
		case <-r.gate:
		case <-ctx.Done():
		}
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make([]sink.Outcome, len(evs))
	for i, e := range evs {
		out[i].Attempts = 1
		if r.fail[e.ID] {
			out[i].Err = errors.Join(errors.New("refused"), sink.ErrPermanent)
			continue
		}
		r.got = append(r.got, e.ID)
	}
	return out
}

func (r *recorder) ids() []int64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]int64(nil), r.got...)
}

// Several destinations in one router: each gets the events its filter
// selects, in order; an event settles only when every destination it was
// routed to settled it; one outside a held destination's filter does not
// wait for it; a dead letter names the destination that refused.
func TestRouterDestinations(t *testing.T) {
	t.Parallel()
	cfg := Config{Concurrency: 4}.WithDefaults()
	require.NoError(t, cfg.Validate())
	a := &recorder{}
	b := &recorder{gate: make(chan struct{}), fail: map[int64]bool{4: true}}
	st := newSettler(16)
	r, err := NewRouter(RouterConfig{Deliver: cfg, Destinations: []Destination{
		{Name: "webhook", Sink: a},
		{Name: "posthog", Sink: b, Events: []string{"recipe_*"}, Concurrency: 1, BatchSize: 1},
	}}, st, zerolog.Nop())
	require.NoError(t, err)
	in := make(chan *decode.Event, 8)
	in <- orgEvent(1, "recipe_saved")
	in <- orgEvent(2, "batch_started")
	in <- orgEvent(3, "recipe_saved")
	in <- orgEvent(4, "recipe_deleted")
	close(in)
	done := make(chan error, 1)
	go func() { done <- r.Run(context.Background(), in) }()

	// Event 2 goes to the webhook only: it settles while posthog is held.
	select {
	case id := <-st.settled:
		require.Equal(t, int64(2), id, "only the event outside posthog's filter settles while posthog is held")
	case <-time.After(10 * time.Second):
		t.Fatal("event 2 did not settle while posthog was held")
	}
	require.Eventually(t, func() bool { return len(a.ids()) == 4 }, 10*time.Second, 5*time.Millisecond)
	st.mu.Lock()
	require.NotContains(t, st.marks, int64(1), "event 1 marked before posthog settled it")
	st.mu.Unlock()

	close(b.gate)
	require.NoError(t, <-done)
	require.Equal(t, []int64{1, 2, 3, 4}, a.ids())
	require.Equal(t, []int64{1, 3}, b.ids())
	st.mu.Lock()
	defer st.mu.Unlock()
	for _, id := range []int64{1, 2, 3} {
		require.Contains(t, st.marks, id)
	}
	require.NotContains(t, st.marks, int64(4), "a dead letter at one destination leaves the row unprocessed")
	require.Equal(t, "posthog", st.dead[4].Sink)
}

func TestRouterDestinationsAreChecked(t *testing.T) {
	t.Parallel()
	cfg := Config{}.WithDefaults()
	s := &recorder{}
	for name, dests := range map[string][]Destination{
		"twice":        {{Name: "kafka", Sink: s}, {Name: "kafka", Sink: s}},
		"subscription": {{Name: "subscription:3", Sink: s}},
		"unnamed":      {{Sink: s}},
		"no sink":      {{Name: "ga4"}},
		"bad batch":    {{Name: "ga4", Sink: s, Concurrency: 1, BatchSize: -1}},
	} {
		_, err := NewRouter(RouterConfig{Deliver: cfg, Destinations: dests}, newSettler(1), zerolog.Nop())
		require.Error(t, err, name)
	}
}

// Deliveries parked under a name no destination has now (OUTBOXD_SINK=posthog
// parked under "webhook"; OUTBOXD_SINKS=posthog delivers as "posthog") are
// not retried: the router says so at start, naming the target and count.
func TestRouterWarnsOfParkedRowsOfNoDestination(t *testing.T) {
	t.Parallel()
	var logs strings.Builder
	var mu sync.Mutex
	log := zerolog.New(zerolog.SyncWriter(writerFunc(func(p []byte) (int, error) {
		mu.Lock()
		defer mu.Unlock()
		return logs.Write(p)
	})))
	cfg := Config{}.WithDefaults()
	r, err := NewRouter(RouterConfig{Deliver: cfg, Destinations: []Destination{{Name: "posthog", Sink: &recorder{}}},
		Parked: map[string]map[uint64]int{"webhook": {3: 2, 5: 1}, "posthog": {3: 1}, "subscription:4": {7: 1}}}, newSettler(1), log)
	require.NoError(t, err)
	in := make(chan *decode.Event)
	close(in)
	require.NoError(t, r.Run(context.Background(), in))
	mu.Lock()
	defer mu.Unlock()
	require.Contains(t, logs.String(), `"target":"webhook","parked":3`)
	require.Equal(t, 1, strings.Count(logs.String(), "not deliver to"), logs.String())
}

type writerFunc func([]byte) (int, error)

func (f writerFunc) Write(p []byte) (int, error) { return f(p) }
