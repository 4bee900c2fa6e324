package sink_test

import (
	"context"
	"errors"
	"net/http"
	"testing"

	"github.com/rs/zerolog"
	"github.com/stretchr/testify/require"

	"github.com/outboxd/outboxd/decode"
	"github.com/outboxd/outboxd/sink"
)

func TestWebhookWithMaxAttemptsLimitsOneCall(t *testing.T) {
	t.Parallel()
	rc := newReceiver(t, status(http.StatusServiceUnavailable, 1000))
	cfg := fastConfig(rc.srv.URL)
	cfg.MaxAttempts = 6
	w := newWebhook(t, cfg, zerolog.Nop())

	out := w.Deliver(sink.WithMaxAttempts(context.Background(), 1), []*decode.Event{event(1)})
	require.Len(t, out, 1)
	require.Error(t, out[0].Err)
	require.False(t, errors.Is(out[0].Err, sink.ErrPermanent), "running out of attempts is retryable")
	require.Equal(t, 1, out[0].Attempts)
	require.Len(t, rc.requests(), 1)

	out = w.Deliver(context.Background(), []*decode.Event{event(2)})
	require.Equal(t, 6, out[0].Attempts, "without the limit the configured budget applies")
}

// The sinks with their own attempt loop (PostHog here; stdout, Kafka and NATS
// share it) honour WithMaxAttempts too: the parked-delivery retrier makes one
// attempt per step of its schedule whatever the sink.
func TestPostHogWithMaxAttemptsLimitsOneCall(t *testing.T) {
	t.Parallel()
	ps := newPostHogServer(t, func(_ int, w http.ResponseWriter, _ *http.Request, _ capturedBatch) {
		w.WriteHeader(http.StatusServiceUnavailable)
	})
	cfg := fastPostHog(ps.srv.URL)
	cfg.MaxAttempts = 6
	p := newPostHog(t, cfg, zerolog.Nop())

	out := p.Deliver(sink.WithMaxAttempts(context.Background(), 1), []*decode.Event{phEvent(1, `{"id":1}`)})
	require.Len(t, out, 1)
	require.Error(t, out[0].Err)
	require.False(t, errors.Is(out[0].Err, sink.ErrPermanent), "running out of attempts is retryable")
	require.Equal(t, 1, out[0].Attempts)
	require.Len(t, ps.requests(), 1)

	out = p.Deliver(context.Background(), []*decode.Event{phEvent(2, `{"id":2}`)})
	require.Equal(t, 6, out[0].Attempts, "without the limit the configured budget applies")
}

// The webhook tells an attempt observer of each request: its number, its
// status, its failure (nil for the 2xx) and its bounds.
func TestWebhookTellsAttemptObserver(t *testing.T) {
	t.Parallel()
	rc := newReceiver(t, status(http.StatusServiceUnavailable, 2))
	w := newWebhook(t, fastConfig(rc.srv.URL), zerolog.Nop())

	var seen []sink.Attempt
	ctx := sink.WithAttemptObserver(context.Background(), func(a sink.Attempt) { seen = append(seen, a) })
	out := w.Deliver(ctx, []*decode.Event{event(1)})
	require.NoError(t, out[0].Err)
	require.Equal(t, 3, out[0].Attempts)
	require.Len(t, seen, 3)
	for i, a := range seen {
		require.Equal(t, i+1, a.Number)
		require.False(t, a.Start.IsZero(), "attempt %d", a.Number)
		require.False(t, a.End.Before(a.Start), "attempt %d", a.Number)
		if i < 2 {
			require.Equal(t, http.StatusServiceUnavailable, a.Status)
			require.ErrorContains(t, a.Err, "status 503")
			continue
		}
		require.Equal(t, http.StatusOK, a.Status)
		require.NoError(t, a.Err)
	}
}
