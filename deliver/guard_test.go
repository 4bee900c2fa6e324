package deliver

import (
	"context"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"github.com/stretchr/testify/require"

	"github.com/outboxd/outboxd/decode"
	"github.com/outboxd/outboxd/sink"
)

// receiver is an HTTP destination that answers status (503 while failing)
// and records each request's arrival and headers.
type receiver struct {
	srv     *httptest.Server
	failing atomic.Bool
	status  atomic.Int32 // answer while failing
	mu      sync.Mutex
	times   []time.Time
	headers []http.Header
}

func newReceiver(t *testing.T) *receiver {
	r := &receiver{}
	r.status.Store(http.StatusServiceUnavailable)
	r.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		_, _ = io.Copy(io.Discard, req.Body)
		r.mu.Lock()
		r.times = append(r.times, time.Now())
		r.headers = append(r.headers, req.Header.Clone())
		r.mu.Unlock()
		if r.failing.Load() {
			w.WriteHeader(int(r.status.Load()))
			_, _ = w.Write([]byte("refused, you sent " + req.Header.Get("Authorization")))
			return
		}
		w.WriteHeader(http.StatusNoContent)
	}))
	t.Cleanup(r.srv.Close)
	return r
}

func (r *receiver) count() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.times)
}

// webhookTo is a real webhook sink to url making one attempt per call.
func webhookTo(t *testing.T, url string) sink.Sink {
	t.Helper()
	w, err := sink.NewWebhook(sink.WebhookConfig{URL: url, HTTPConfig: sink.HTTPConfig{AllowPrivate: true,
		RetryConfig: sink.RetryConfig{MaxAttempts: 1}}}.WithDefaults(), zerolog.Nop())
	require.NoError(t, err)
	t.Cleanup(w.Close)
	return w
}

func oneEvent(id int64) []*decode.Event {
	return []*decode.Event{{ID: id, Name: "thing_happened", Body: []byte(`{}`), MessageID: "msg_1"}}
}

// waitFor polls cond until it holds or a generous deadline passes.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond) // polling a condition, not synchronising on time
	}
}

func TestGuardBreakerOpensRefusesProbesAndCloses(t *testing.T) {
	rcv := newReceiver(t)
	rcv.failing.Store(true)
	g := NewGuard("webhook", GuardConfig{BreakerFailures: 3, BreakerCooldown: 300 * time.Millisecond}.WithDefaults())
	s := g.Wrap(webhookTo(t, rcv.srv.URL))
	ctx := context.Background()

	for i := range 3 {
		o := s.Deliver(ctx, oneEvent(int64(i)))[0]
		require.Error(t, o.Err)
		require.NotErrorIs(t, o.Err, ErrBreakerOpen)
	}
	require.Equal(t, BreakerOpen, g.State())
	require.EqualValues(t, 1, g.Openings())
	// Open: no call reaches the destination; the refusal is retryable.
	for i := range 5 {
		o := s.Deliver(ctx, oneEvent(int64(10+i)))[0]
		require.ErrorIs(t, o.Err, ErrBreakerOpen)
		require.NotErrorIs(t, o.Err, sink.ErrPermanent)
		require.Zero(t, o.Attempts)
	}
	require.Equal(t, 3, rcv.count(), "an open breaker calls nothing")
	st := g.Status()
	require.Equal(t, "open", st.Breaker)
	require.NotNil(t, st.BreakerSince)
	require.Contains(t, st.LastError, "503")

	// Half-open after the cool-down: a failed probe opens it again.
	waitFor(t, "half-open", func() bool { return g.State() == BreakerHalfOpen })
	require.Error(t, s.Deliver(ctx, oneEvent(20))[0].Err)
	require.Equal(t, 4, rcv.count())
	require.Equal(t, BreakerOpen, g.State())
	require.EqualValues(t, 2, g.Openings())

	// The destination recovers: the next probe closes the breaker.
	rcv.failing.Store(false)
	waitFor(t, "half-open again", func() bool { return g.State() == BreakerHalfOpen })
	require.NoError(t, s.Deliver(ctx, oneEvent(21))[0].Err)
	require.Equal(t, BreakerClosed, g.State())
	require.NoError(t, s.Deliver(ctx, oneEvent(22))[0].Err)
	require.Equal(t, 6, rcv.count())
}

func TestGuardBreakerIgnoresPermanentRefusals(t *testing.T) {
	rcv := newReceiver(t)
	rcv.failing.Store(true)
	rcv.status.Store(http.StatusBadRequest)
	g := NewGuard("webhook", GuardConfig{BreakerFailures: 2}.WithDefaults())
	s := g.Wrap(webhookTo(t, rcv.srv.URL))
	for i := range 5 {
		require.ErrorIs(t, s.Deliver(context.Background(), oneEvent(int64(i)))[0].Err, sink.ErrPermanent)
	}
	require.Equal(t, BreakerClosed, g.State(), "a destination that answers 400 is up")
	require.Equal(t, 5, rcv.count())
}

func TestGuardHeadersSentAndRedacted(t *testing.T) {
	rcv := newReceiver(t)
	const token = "Bearer s3cr3t-t0ken"
	g := NewGuard("webhook", GuardConfig{Headers: []sink.ExtraHeader{{Key: "Authorization", Value: token}, {Key: "X-Tenant", Value: "acme"}}}.WithDefaults())
	s := g.Wrap(webhookTo(t, rcv.srv.URL))
	require.NoError(t, s.Deliver(context.Background(), oneEvent(1))[0].Err)
	require.Equal(t, token, rcv.headers[0].Get("Authorization"))
	require.Equal(t, "acme", rcv.headers[0].Get("X-Tenant"))
	require.Equal(t, []string{"Authorization", "X-Tenant"}, g.Status().Headers)

	// A receiver echoing the token in its error body: the error keeps its
	// class, not the token.
	rcv.failing.Store(true)
	rcv.status.Store(http.StatusBadRequest)
	o := s.Deliver(context.Background(), oneEvent(2))[0]
	require.ErrorIs(t, o.Err, sink.ErrPermanent)
	require.NotContains(t, o.Err.Error(), "s3cr3t")
	require.Contains(t, o.Err.Error(), "[REDACTED]")
}

func TestGuardRateLimitSpacesCalls(t *testing.T) {
	rcv := newReceiver(t)
	g := NewGuard("webhook", GuardConfig{RateLimit: 50, RateBurst: 1}.WithDefaults())
	s := g.Wrap(webhookTo(t, rcv.srv.URL))
	var wg sync.WaitGroup
	for i := range 40 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			require.NoError(t, s.Deliver(context.Background(), oneEvent(int64(i)))[0].Err)
		}()
	}
	wg.Wait()
	require.Equal(t, 40, rcv.count())
	span := rcv.times[len(rcv.times)-1].Sub(rcv.times[0])
	// 40 events at 50/s with a burst of 1: at least 39/50 s = 780ms apart;
	// the tolerance allows for the clock's granularity only.
	require.GreaterOrEqual(t, span, 700*time.Millisecond)
}

func TestGuardRateWaitEndsWithCtxAndIsNoAttempt(t *testing.T) {
	rcv := newReceiver(t)
	g := NewGuard("webhook", GuardConfig{RateLimit: 0.001, RateBurst: 1}.WithDefaults())
	s := g.Wrap(webhookTo(t, rcv.srv.URL))
	require.NoError(t, s.Deliver(context.Background(), oneEvent(1))[0].Err) // spends the one token
	ctx, cancel := context.WithCancel(context.Background())
	got := make(chan sink.Outcome, 1)
	go func() { got <- s.Deliver(ctx, oneEvent(2))[0] }()
	cancel()
	select {
	case o := <-got:
		require.True(t, errors.Is(o.Err, context.Canceled), "got %v", o.Err)
		require.Zero(t, o.Attempts)
	case <-time.After(20 * time.Second):
		t.Fatal("the wait for a token did not end with ctx")
	}
	require.Equal(t, 1, rcv.count())
}

// PostHog and GA4 requests carry the destination's headers too.
func TestGuardHeadersOnPostHogAndGA4(t *testing.T) {
	rcv := newReceiver(t)
	hdr := []sink.ExtraHeader{{Key: "Authorization", Value: "Bearer analytics"}}
	ph, err := sink.NewPostHog(sink.PostHogConfig{Host: rcv.srv.URL, APIKey: "phc_test",
		HTTPConfig: sink.HTTPConfig{AllowPrivate: true}}.WithDefaults(), zerolog.Nop())
	require.NoError(t, err)
	t.Cleanup(ph.Close)
	ga, err := sink.NewGA4(sink.GA4Config{Endpoint: rcv.srv.URL + "/mp/collect", MeasurementID: "G-TEST", APISecret: "s",
		HTTPConfig: sink.HTTPConfig{AllowPrivate: true}}.WithDefaults(), zerolog.Nop())
	require.NoError(t, err)
	t.Cleanup(ga.Close)
	ev := []*decode.Event{{ID: 7, Name: "thing_happened", Body: []byte(`{"user_id":"u1"}`), MessageID: "msg_7",
		OrganizationID: 3, HasOrganization: true, OccurredAt: time.Now().Add(-time.Minute)}}
	for _, s := range []sink.Sink{ph, ga} {
		o := NewGuard(s.Name(), GuardConfig{Headers: hdr}.WithDefaults()).Wrap(s).Deliver(context.Background(), ev)[0]
		require.NoError(t, o.Err, s.Name())
	}
	require.Len(t, rcv.headers, 2)
	for i, h := range rcv.headers {
		require.Equal(t, "Bearer analytics", h.Get("Authorization"), "request %d", i)
	}
}

// A call cut short by shutdown (here while it waits for a token) says
// nothing of the destination: it neither opens the breaker nor reaches it.
func TestGuardAbandonedCallsDoNotTrip(t *testing.T) {
	rcv := newReceiver(t)
	g := NewGuard("webhook", GuardConfig{BreakerFailures: 1, RateLimit: 0.001, RateBurst: 1}.WithDefaults())
	s := g.Wrap(webhookTo(t, rcv.srv.URL))
	require.NoError(t, s.Deliver(context.Background(), oneEvent(1))[0].Err)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	for i := range 3 {
		require.ErrorIs(t, s.Deliver(ctx, oneEvent(int64(2+i)))[0].Err, context.Canceled)
	}
	require.Equal(t, BreakerClosed, g.State())
	require.Zero(t, g.Openings())
	require.Equal(t, 1, rcv.count())
}
