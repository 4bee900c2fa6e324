package sink_test

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httptrace"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"github.com/stretchr/testify/require"

	"github.com/outboxd/outboxd/decode"
	"github.com/outboxd/outboxd/internal/e2e"
	"github.com/outboxd/outboxd/sink"
)

const (
	secretA = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
	secretB = "whsec_dGhpcyBpcyBhIHNlY29uZCBzZWNyZXQga2V5IQ=="
)

// request is one request as the test receiver saw it.
type request struct {
	n      int // 1-based attempt number at the receiver
	header http.Header
	body   []byte
	at     time.Time
}

// receiver is an httptest server that records every request and answers with
// handle.
type receiver struct {
	srv  *httptest.Server
	reqs chan request
	hits atomic.Int64
}

func newReceiver(t *testing.T, handle func(n int, w http.ResponseWriter, r *http.Request)) *receiver {
	t.Helper()
	rc := &receiver{reqs: make(chan request, 256)}
	rc.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, err := io.ReadAll(r.Body)
		if err != nil {
			w.WriteHeader(http.StatusBadRequest)
			return
		}
		n := int(rc.hits.Add(1))
		rc.reqs <- request{n: n, header: r.Header.Clone(), body: body, at: time.Now()}
		if handle == nil {
			w.WriteHeader(http.StatusNoContent)
			return
		}
		handle(n, w, r)
	}))
	t.Cleanup(rc.srv.Close)
	return rc
}

// requests returns everything received so far.
func (rc *receiver) requests() []request {
	var out []request
	for {
		select {
		case r := <-rc.reqs:
			out = append(out, r)
		default:
			return out
		}
	}
}

// status answers code for the first n attempts, then 200.
func status(code, n int) func(int, http.ResponseWriter, *http.Request) {
	return func(i int, w http.ResponseWriter, _ *http.Request) {
		if i <= n {
			w.WriteHeader(code)
			return
		}
		w.WriteHeader(http.StatusOK)
	}
}

// fastConfig returns a config for url with a small, fast retry budget.
func fastConfig(url string) sink.WebhookConfig {
	return sink.WebhookConfig{
		URL: url,
		HTTPConfig: sink.HTTPConfig{
			AllowPrivate: true, // httptest listens on loopback
			Timeout:      5 * time.Second,
			RetryConfig:  sink.RetryConfig{MaxAttempts: 5, BackoffMin: time.Millisecond, BackoffMax: 5 * time.Millisecond},
		},
	}
}

func newWebhook(t testing.TB, cfg sink.WebhookConfig, log zerolog.Logger) *sink.Webhook {
	t.Helper()
	w, err := sink.NewWebhook(cfg, log)
	require.NoError(t, err)
	t.Cleanup(w.Close)
	return w
}

// testNS is the message namespace of the events made by event.
const testNS = "0a1b2c3d4e5f6789"

// testOccurredAt is the occurred_at of the events made by event.
var testOccurredAt = time.Date(2026, 11, 26, 10, 0, 0, 123456000, time.UTC)

func event(id int64) *decode.Event {
	return &decode.Event{
		ID:         id,
		OccurredAt: testOccurredAt,
		MessageID:  decode.MessageID(testNS, id, testOccurredAt),
		Name:       "batch_started",
		Body: fmt.Appendf(nil, `{"id":%d,"event_name":"batch_started","occurred_at":"2026-11-26T10:00:00.123456Z",`+
			`"organization_id":7,"user_id":null,"properties":{"n":%d,"s":"é\u2028"}}`, id, id*3),
	}
}

// verifyStandardWebhooks is an independent implementation of the Standard
// Webhooks verification: base64-decode the key after "whsec_", HMAC-SHA256 over
// "id.timestamp.body", compare each v1 signature in constant time.
func verifyStandardWebhooks(secret string, h http.Header, body []byte) error {
	key, err := base64.StdEncoding.DecodeString(strings.TrimPrefix(secret, "whsec_"))
	if err != nil {
		return err
	}
	id, ts, sigs := h.Get("webhook-id"), h.Get("webhook-timestamp"), h.Get("webhook-signature")
	if id == "" || ts == "" || sigs == "" {
		return fmt.Errorf("missing headers: id %q ts %q signature present %t", id, ts, sigs != "")
	}
	sec, err := strconv.ParseInt(ts, 10, 64)
	if err != nil {
		return err
	}
	if d := time.Since(time.Unix(sec, 0)); d > 5*time.Minute || d < -5*time.Minute {
		return fmt.Errorf("timestamp %s outside tolerance", ts)
	}
	mac := hmac.New(sha256.New, key)
	mac.Write([]byte(id + "." + ts + "."))
	mac.Write(body)
	want := mac.Sum(nil)
	for _, part := range strings.Split(sigs, " ") {
		version, sig, ok := strings.Cut(part, ",")
		if !ok || version != "v1" {
			continue
		}
		got, err := base64.StdEncoding.DecodeString(sig)
		if err == nil && hmac.Equal(got, want) {
			return nil
		}
	}
	return fmt.Errorf("no matching v1 signature")
}

func TestSignStandardWebhooksVector(t *testing.T) {
	t.Parallel()
	// The test vector of the Standard Webhooks reference libraries.
	got, err := sink.Sign([]string{secretA}, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, []byte(`{"test": 2432232314}`))
	require.NoError(t, err)
	require.Equal(t, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=", got)

	got, err = sink.Sign(nil, "1", 1, []byte("{}"))
	require.NoError(t, err)
	require.Empty(t, got)

	two, err := sink.Sign([]string{secretA, secretB}, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, []byte(`{"test": 2432232314}`))
	require.NoError(t, err)
	require.True(t, strings.HasPrefix(two, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE= v1,"), two)

	_, err = sink.Sign([]string{"whsec_!!not-base64!!"}, "1", 1, nil)
	require.Error(t, err)
	require.NotContains(t, err.Error(), "not-base64")
	_, err = sink.Sign([]string{"MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"}, "1", 1, nil)
	require.Error(t, err)
	require.NotContains(t, err.Error(), "MfKQ9r8G")
}

func TestWebhookID(t *testing.T) {
	t.Parallel()
	require.Empty(t, sink.WebhookID(nil))
	require.Equal(t, "evt_0a1b2c3d4e5f6789_42_hoinb7omdc", sink.WebhookID([]*decode.Event{event(42)}), "the message id")

	batch := []*decode.Event{event(7), event(8), event(12)}
	id := sink.WebhookID(batch)
	require.Regexp(t, regexp.MustCompile(`^batch_0a1b2c3d4e5f6789_7_12_[0-9a-f]{16}$`), id)
	require.Equal(t, id, sink.WebhookID([]*decode.Event{event(7), event(8), event(12)}), "stable")
	require.NotEqual(t, id, sink.WebhookID([]*decode.Event{event(7), event(9), event(12)}), "covers every member")
	require.NotEqual(t, id, sink.WebhookID([]*decode.Event{event(7), event(12)}))

	// The same row ids in another outbox, or reused later (a restarted
	// identity), are other events: other ids.
	other := func(ns string, at time.Time, ids ...int64) []*decode.Event {
		evs := make([]*decode.Event, len(ids))
		for i, n := range ids {
			evs[i] = event(n)
			evs[i].OccurredAt, evs[i].MessageID = at, decode.MessageID(ns, n, at)
		}
		return evs
	}
	for _, evs := range [][]*decode.Event{
		other("ffffffffffffffff", testOccurredAt, 7, 8, 12),
		other(testNS, testOccurredAt.Add(time.Hour), 7, 8, 12),
	} {
		require.NotEqual(t, id, sink.WebhookID(evs))
		require.NotEqual(t, sink.WebhookID(batch[:1]), sink.WebhookID(evs[:1]))
	}
	require.Regexp(t, `^batch_ffffffffffffffff_7_12_[0-9a-f]{16}$`, sink.WebhookID(other("ffffffffffffffff", testOccurredAt, 7, 8, 12)))

	// An Event made by hand without a message id gets one without a namespace.
	require.Equal(t, "evt__42", sink.WebhookID([]*decode.Event{{ID: 42}}))
}

func TestWebhookSignatureVerifies(t *testing.T) {
	t.Parallel()
	for name, secrets := range map[string][]string{
		"one secret":  {secretA},
		"two secrets": {secretA, secretB},
	} {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			rc := newReceiver(t, nil)
			cfg := fastConfig(rc.srv.URL)
			cfg.Secrets = secrets
			w := newWebhook(t, cfg, zerolog.Nop())

			out := w.Deliver(t.Context(), []*decode.Event{event(42)})
			require.NoError(t, out[0].Err)
			reqs := rc.requests()
			require.Len(t, reqs, 1)
			require.Len(t, strings.Split(reqs[0].header.Get("webhook-signature"), " "), len(secrets))
			for _, s := range secrets {
				require.NoError(t, verifyStandardWebhooks(s, reqs[0].header, reqs[0].body), "verify with %d-th secret", len(s))
			}
			require.Error(t, verifyStandardWebhooks("whsec_"+base64.StdEncoding.EncodeToString([]byte("wrong key")), reqs[0].header, reqs[0].body))
		})
	}
}

func TestWebhookUnsigned(t *testing.T) {
	t.Parallel()
	rc := newReceiver(t, nil)
	w := newWebhook(t, fastConfig(rc.srv.URL), zerolog.Nop())
	out := w.Deliver(t.Context(), []*decode.Event{event(1)})
	require.NoError(t, out[0].Err)
	h := rc.requests()[0].header
	require.Empty(t, h.Values("webhook-signature"))
	require.Equal(t, event(1).MessageID, h.Get("webhook-id"))
	require.NotEmpty(t, h.Get("webhook-timestamp"))
}

func TestWebhookRequest(t *testing.T) {
	t.Parallel()
	rc := newReceiver(t, nil)
	cfg := fastConfig(rc.srv.URL + "/hooks/outbox")
	cfg.Secrets = []string{secretA}
	cfg.UserAgent = "outboxd-test/1.0"
	w := newWebhook(t, cfg, zerolog.Nop())
	require.Equal(t, "webhook", w.Name())

	ev := event(42)
	ev.Traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
	ctx := sink.WithHeader(t.Context(), "webhook-replay", "true")
	ctx = sink.WithHeader(ctx, "webhook-id", "must-not-override")
	before := time.Now().Unix()
	out := w.Deliver(ctx, []*decode.Event{ev})
	require.Len(t, out, 1)
	require.NoError(t, out[0].Err)
	require.Equal(t, sink.Outcome{Status: http.StatusNoContent, Attempts: 1}, out[0])

	reqs := rc.requests()
	require.Len(t, reqs, 1)
	r := reqs[0]
	require.Equal(t, ev.Body, r.body, "body is exactly the event's envelope")
	require.Equal(t, "application/json", r.header.Get("Content-Type"))
	require.Equal(t, "outboxd-test/1.0", r.header.Get("User-Agent"))
	require.Equal(t, ev.MessageID, r.header.Get("webhook-id"))
	require.Equal(t, ev.Traceparent, r.header.Get("traceparent"))
	require.Equal(t, "true", r.header.Get("webhook-replay"))
	ts, err := strconv.ParseInt(r.header.Get("webhook-timestamp"), 10, 64)
	require.NoError(t, err)
	require.GreaterOrEqual(t, ts, before)
	require.LessOrEqual(t, ts, time.Now().Unix())
	require.NoError(t, verifyStandardWebhooks(secretA, r.header, r.body))

	// WithHeader does not leak into other contexts.
	require.Empty(t, sink.ExtraHeaders(t.Context()))
	require.Len(t, sink.ExtraHeaders(ctx), 2)
	require.Panics(t, func() { sink.WithHeader(t.Context(), "bad header", "x") })
	require.Panics(t, func() { sink.WithHeader(t.Context(), "x-ok", "a\r\nb") })
}

func TestWebhookBatch(t *testing.T) {
	t.Parallel()
	rc := newReceiver(t, nil)
	cfg := fastConfig(rc.srv.URL)
	cfg.Secrets = []string{secretA}
	w := newWebhook(t, cfg, zerolog.Nop())

	evs := []*decode.Event{event(10), event(11), event(13)}
	evs[0].Traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
	out := w.Deliver(t.Context(), evs)
	require.Len(t, out, 3)
	for _, o := range out {
		require.NoError(t, o.Err)
		require.Equal(t, 1, o.Attempts)
	}
	reqs := rc.requests()
	require.Len(t, reqs, 1, "one POST per Deliver call")
	r := reqs[0]
	require.True(t, json.Valid(r.body))
	var arr []json.RawMessage
	require.NoError(t, json.Unmarshal(r.body, &arr))
	require.Len(t, arr, 3)
	for i, raw := range arr {
		require.Equal(t, evs[i].Body, []byte(raw), "element %d is the envelope unchanged", i)
		var env struct{ ID int64 }
		require.NoError(t, json.Unmarshal(raw, &env))
		require.Equal(t, evs[i].ID, env.ID)
	}
	require.Equal(t, sink.WebhookID(evs), r.header.Get("webhook-id"))
	require.Regexp(t, `^batch_0a1b2c3d4e5f6789_10_13_[0-9a-f]{16}$`, r.header.Get("webhook-id"))
	require.Empty(t, r.header.Get("traceparent"), "no single trace for a batch")
	require.NoError(t, verifyStandardWebhooks(secretA, r.header, r.body))
}

func TestWebhookIDStableSignatureFresh(t *testing.T) {
	t.Parallel()
	rc := newReceiver(t, func(n int, w http.ResponseWriter, _ *http.Request) {
		if n == 1 {
			w.Header().Set("Retry-After", "1")
			w.WriteHeader(http.StatusServiceUnavailable)
			return
		}
		w.WriteHeader(http.StatusOK)
	})
	cfg := fastConfig(rc.srv.URL)
	cfg.Secrets = []string{secretA, secretB}
	cfg.BackoffMax = 5 * time.Second
	w := newWebhook(t, cfg, zerolog.Nop())

	out := w.Deliver(t.Context(), []*decode.Event{event(77)})
	require.NoError(t, out[0].Err)
	require.Equal(t, 2, out[0].Attempts)
	require.Equal(t, time.Second, out[0].RetryAfter)

	reqs := rc.requests()
	require.Len(t, reqs, 2)
	first, second := reqs[0].header, reqs[1].header
	require.Equal(t, event(77).MessageID, first.Get("webhook-id"))
	require.Equal(t, first.Get("webhook-id"), second.Get("webhook-id"), "webhook-id is the same on every attempt")
	ts1, err := strconv.ParseInt(first.Get("webhook-timestamp"), 10, 64)
	require.NoError(t, err)
	ts2, err := strconv.ParseInt(second.Get("webhook-timestamp"), 10, 64)
	require.NoError(t, err)
	require.GreaterOrEqual(t, ts2, ts1+1, "timestamp is fresh per attempt")
	require.NotEqual(t, first.Get("webhook-signature"), second.Get("webhook-signature"), "signature is fresh per attempt")
	for _, r := range reqs {
		require.Equal(t, event(77).Body, r.body)
		require.NoError(t, verifyStandardWebhooks(secretA, r.header, r.body))
		require.NoError(t, verifyStandardWebhooks(secretB, r.header, r.body))
	}
}

func TestWebhookRetries(t *testing.T) {
	t.Parallel()
	t.Run("503 x3 then 200", func(t *testing.T) {
		t.Parallel()
		rc := newReceiver(t, status(http.StatusServiceUnavailable, 3))
		w := newWebhook(t, fastConfig(rc.srv.URL), zerolog.Nop())
		out := w.Deliver(t.Context(), []*decode.Event{event(1)})
		require.Equal(t, sink.Outcome{Err: nil, Status: http.StatusOK, Attempts: 4}, out[0])
		require.Len(t, rc.requests(), 4)
	})
	for _, code := range []int{408, 425, 429, 500, 502, 503, 504} {
		t.Run(strconv.Itoa(code), func(t *testing.T) {
			t.Parallel()
			rc := newReceiver(t, status(code, 1))
			w := newWebhook(t, fastConfig(rc.srv.URL), zerolog.Nop())
			out := w.Deliver(t.Context(), []*decode.Event{event(1)})
			require.NoError(t, out[0].Err)
			require.Equal(t, 2, out[0].Attempts)
			require.Equal(t, http.StatusOK, out[0].Status)
		})
	}
	t.Run("budget exhausted on status", func(t *testing.T) {
		t.Parallel()
		rc := newReceiver(t, func(_ int, w http.ResponseWriter, _ *http.Request) {
			http.Error(w, "down for maintenance", http.StatusBadGateway)
		})
		cfg := fastConfig(rc.srv.URL)
		cfg.MaxAttempts = 3
		w := newWebhook(t, cfg, zerolog.Nop())
		out := w.Deliver(t.Context(), []*decode.Event{event(1), event(2)})
		require.Len(t, out, 2)
		for _, o := range out {
			require.Error(t, o.Err)
			require.NotErrorIs(t, o.Err, sink.ErrPermanent)
			require.NotErrorIs(t, o.Err, sink.ErrGone)
			require.Equal(t, 3, o.Attempts)
			require.Equal(t, http.StatusBadGateway, o.Status)
			require.Contains(t, o.Err.Error(), "status 502")
			require.Contains(t, o.Err.Error(), "down for maintenance")
		}
		require.Len(t, rc.requests(), 3)
	})
	t.Run("per-attempt timeout", func(t *testing.T) {
		t.Parallel()
		rc := newReceiver(t, func(n int, w http.ResponseWriter, r *http.Request) {
			if n == 1 {
				<-r.Context().Done() // hang until the client gives up on the attempt
				return
			}
			w.WriteHeader(http.StatusOK)
		})
		cfg := fastConfig(rc.srv.URL)
		cfg.Timeout = 100 * time.Millisecond
		w := newWebhook(t, cfg, zerolog.Nop())
		out := w.Deliver(t.Context(), []*decode.Event{event(1)})
		require.NoError(t, out[0].Err)
		require.Equal(t, 2, out[0].Attempts)
	})
}

func TestWebhookPermanent(t *testing.T) {
	t.Parallel()
	for _, code := range []int{400, 401, 403, 404, 413, 422} {
		t.Run(strconv.Itoa(code), func(t *testing.T) {
			t.Parallel()
			rc := newReceiver(t, func(_ int, w http.ResponseWriter, _ *http.Request) {
				http.Error(w, `{"error":"unknown event"}`, code)
			})
			w := newWebhook(t, fastConfig(rc.srv.URL), zerolog.Nop())
			out := w.Deliver(t.Context(), []*decode.Event{event(1)})
			require.ErrorIs(t, out[0].Err, sink.ErrPermanent)
			require.NotErrorIs(t, out[0].Err, sink.ErrGone)
			require.Equal(t, 1, out[0].Attempts)
			require.Equal(t, code, out[0].Status)
			require.Contains(t, out[0].Err.Error(), "unknown event", "the receiver's reason is kept")
			require.Len(t, rc.requests(), 1, "never retried")
		})
	}
	t.Run("410 gone", func(t *testing.T) {
		t.Parallel()
		rc := newReceiver(t, status(http.StatusGone, 100))
		w := newWebhook(t, fastConfig(rc.srv.URL), zerolog.Nop())
		out := w.Deliver(t.Context(), []*decode.Event{event(1), event(2)})
		for _, o := range out {
			require.ErrorIs(t, o.Err, sink.ErrGone)
			require.NotErrorIs(t, o.Err, sink.ErrPermanent)
			require.Equal(t, 1, o.Attempts)
			require.Equal(t, http.StatusGone, o.Status)
		}
		require.Len(t, rc.requests(), 1)
	})
}

func TestWebhookRedirectNotFollowed(t *testing.T) {
	t.Parallel()
	for _, code := range []int{301, 302, 307, 308} {
		t.Run(strconv.Itoa(code), func(t *testing.T) {
			t.Parallel()
			target := newReceiver(t, nil)
			rc := newReceiver(t, func(_ int, w http.ResponseWriter, r *http.Request) {
				http.Redirect(w, r, target.srv.URL+"/elsewhere", code)
			})
			w := newWebhook(t, fastConfig(rc.srv.URL), zerolog.Nop())
			out := w.Deliver(t.Context(), []*decode.Event{event(1)})
			require.ErrorIs(t, out[0].Err, sink.ErrPermanent)
			require.Equal(t, code, out[0].Status)
			require.Equal(t, 1, out[0].Attempts)
			require.Contains(t, out[0].Err.Error(), "redirects are not followed")
			require.Len(t, rc.requests(), 1)
			require.Zero(t, target.hits.Load(), "the redirect target receives nothing")
		})
	}
}

func TestWebhookRetryAfter(t *testing.T) {
	t.Parallel()
	t.Run("honoured", func(t *testing.T) {
		t.Parallel()
		rc := newReceiver(t, func(n int, w http.ResponseWriter, _ *http.Request) {
			if n == 1 {
				w.Header().Set("Retry-After", "1")
				w.WriteHeader(http.StatusTooManyRequests)
				return
			}
			w.WriteHeader(http.StatusOK)
		})
		cfg := fastConfig(rc.srv.URL)
		cfg.BackoffMax = 10 * time.Second
		w := newWebhook(t, cfg, zerolog.Nop())
		out := w.Deliver(t.Context(), []*decode.Event{event(1)})
		require.NoError(t, out[0].Err)
		require.Equal(t, 2, out[0].Attempts)
		require.Equal(t, time.Second, out[0].RetryAfter)
		reqs := rc.requests()
		require.Len(t, reqs, 2)
		require.GreaterOrEqual(t, reqs[1].at.Sub(reqs[0].at), time.Second, "waited as asked")
	})
	t.Run("HTTP-date", func(t *testing.T) {
		t.Parallel()
		rc := newReceiver(t, func(n int, w http.ResponseWriter, _ *http.Request) {
			if n == 1 {
				w.Header().Set("Retry-After", time.Now().Add(2*time.Second).UTC().Format(http.TimeFormat))
				w.WriteHeader(http.StatusServiceUnavailable)
				return
			}
			w.WriteHeader(http.StatusOK)
		})
		cfg := fastConfig(rc.srv.URL)
		cfg.BackoffMax = 10 * time.Second
		w := newWebhook(t, cfg, zerolog.Nop())
		out := w.Deliver(t.Context(), []*decode.Event{event(1)})
		require.NoError(t, out[0].Err)
		require.Equal(t, 2, out[0].Attempts)
		reqs := rc.requests()
		require.Len(t, reqs, 2)
		// The date has one-second resolution: at least one second of the two.
		require.GreaterOrEqual(t, reqs[1].at.Sub(reqs[0].at), time.Second)
	})
	t.Run("clamped to BackoffMax", func(t *testing.T) {
		t.Parallel()
		rc := newReceiver(t, func(n int, w http.ResponseWriter, _ *http.Request) {
			if n == 1 {
				w.Header().Set("Retry-After", "3600")
				w.WriteHeader(http.StatusTooManyRequests)
				return
			}
			w.WriteHeader(http.StatusOK)
		})
		cfg := fastConfig(rc.srv.URL)
		cfg.BackoffMax = 200 * time.Millisecond
		w := newWebhook(t, cfg, zerolog.Nop())
		result := make(chan sink.Outcome, 1)
		go func() { result <- w.Deliver(t.Context(), []*decode.Event{event(1)})[0] }()
		var out sink.Outcome
		select {
		case out = <-result:
		case <-time.After(30 * time.Second):
			t.Fatal("Retry-After: 3600 was not clamped")
		}
		require.NoError(t, out.Err)
		require.Equal(t, 2, out.Attempts)
		require.Equal(t, time.Hour, out.RetryAfter, "reported as asked")
		reqs := rc.requests()
		require.Len(t, reqs, 2)
		require.GreaterOrEqual(t, reqs[1].at.Sub(reqs[0].at), 200*time.Millisecond, "waited BackoffMax")
	})
}

func TestWebhookTransportErrorExhausts(t *testing.T) {
	t.Parallel()
	srv := httptest.NewServer(http.NotFoundHandler())
	url := srv.URL
	srv.Close() // connection refused from now on

	cfg := fastConfig(url)
	cfg.MaxAttempts = 4
	w := newWebhook(t, cfg, zerolog.Nop())
	out := w.Deliver(t.Context(), []*decode.Event{event(1)})
	require.Error(t, out[0].Err)
	require.NotErrorIs(t, out[0].Err, sink.ErrPermanent, "transport errors are retryable")
	require.NotErrorIs(t, out[0].Err, context.Canceled)
	require.Equal(t, 4, out[0].Attempts, "the whole budget is spent")
	require.Zero(t, out[0].Status)
	require.Contains(t, out[0].Err.Error(), "giving up after 4 attempt(s)")
}

// An attempt that runs out of its own Timeout is a retryable failure; it must
// not look like the end of the caller's ctx, which callers take as a stop and
// leave the event unsettled and unparked.
func TestWebhookAttemptTimeoutIsNotCallerDeadline(t *testing.T) {
	t.Parallel()
	release := make(chan struct{})
	rc := newReceiver(t, func(_ int, _ http.ResponseWriter, r *http.Request) {
		select {
		case <-release:
		case <-r.Context().Done():
		}
	})
	t.Cleanup(func() { close(release) }) // before the server's Close
	cfg := fastConfig(rc.srv.URL)
	cfg.Timeout = 50 * time.Millisecond
	cfg.MaxAttempts = 2
	out := newWebhook(t, cfg, zerolog.Nop()).Deliver(t.Context(), []*decode.Event{event(1)})
	require.Error(t, out[0].Err)
	require.NotErrorIs(t, out[0].Err, context.DeadlineExceeded, "the attempt's own timeout is not the caller's deadline")
	require.NotErrorIs(t, out[0].Err, sink.ErrPermanent)
	require.Equal(t, 2, out[0].Attempts)
	require.Contains(t, out[0].Err.Error(), "giving up after 2 attempt(s)")
}

func TestWebhookCancelDuringBackoff(t *testing.T) {
	t.Parallel()
	rc := newReceiver(t, status(http.StatusServiceUnavailable, 100))
	cfg := fastConfig(rc.srv.URL)
	cfg.BackoffMin = time.Hour
	cfg.BackoffMax = time.Hour
	// The debug line of the first attempt is written once its 503 has been
	// classified, right before the backoff starts.
	attempted := make(chan struct{}, 16)
	log := zerolog.New(writerFunc(func(p []byte) (int, error) {
		if bytes.Contains(p, []byte(`"message":"webhook attempt"`)) {
			attempted <- struct{}{}
		}
		return len(p), nil
	})).Level(zerolog.DebugLevel)
	w := newWebhook(t, cfg, log)

	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	result := make(chan []sink.Outcome, 1)
	go func() { result <- w.Deliver(ctx, []*decode.Event{event(1), event(2)}) }()
	select {
	case <-attempted: // the first attempt got its 503; Deliver now waits an hour
	case <-time.After(10 * time.Second):
		t.Fatal("no request")
	}
	cancel()
	var out []sink.Outcome
	select {
	case out = <-result:
	case <-time.After(10 * time.Second):
		t.Fatal("Deliver did not return after cancel")
	}
	require.Len(t, out, 2)
	for _, o := range out {
		require.ErrorIs(t, o.Err, context.Canceled)
		require.NotErrorIs(t, o.Err, sink.ErrPermanent)
		require.Equal(t, 1, o.Attempts)
		require.Equal(t, http.StatusServiceUnavailable, o.Status)
	}
}

func TestWebhookPrivateAddressGuard(t *testing.T) {
	t.Parallel()
	rc := newReceiver(t, nil)
	localhostURL := strings.Replace(rc.srv.URL, "127.0.0.1", "localhost", 1)
	for _, url := range []string{rc.srv.URL, localhostURL} {
		t.Run(url, func(t *testing.T) {
			cfg := fastConfig(url)
			cfg.AllowPrivate = false
			w := newWebhook(t, cfg, zerolog.Nop())
			out := w.Deliver(t.Context(), []*decode.Event{event(1)})
			require.ErrorIs(t, out[0].Err, sink.ErrPermanent)
			require.ErrorIs(t, out[0].Err, sink.ErrForbiddenAddress)
			require.Contains(t, out[0].Err.Error(), "loopback")
			require.Equal(t, 1, out[0].Attempts, "a refused destination is not retried")
			require.Zero(t, rc.hits.Load(), "nothing reached the server")
		})
	}
	t.Run("allowed", func(t *testing.T) {
		cfg := fastConfig(rc.srv.URL)
		cfg.AllowPrivate = true
		w := newWebhook(t, cfg, zerolog.Nop())
		out := w.Deliver(t.Context(), []*decode.Event{event(1)})
		require.NoError(t, out[0].Err)
		require.Equal(t, int64(1), rc.hits.Load())
	})
}

func TestWebhookProxyFromEnvironmentIgnored(t *testing.T) {
	// Not parallel: it sets process environment.
	proxy := newReceiver(t, nil)
	t.Setenv("HTTP_PROXY", proxy.srv.URL)
	t.Setenv("http_proxy", proxy.srv.URL)
	t.Setenv("NO_PROXY", "")
	t.Setenv("no_proxy", "")
	rc := newReceiver(t, nil)
	w := newWebhook(t, fastConfig(rc.srv.URL), zerolog.Nop())
	out := w.Deliver(t.Context(), []*decode.Event{event(1)})
	require.NoError(t, out[0].Err)
	require.Equal(t, int64(1), rc.hits.Load())
	require.Zero(t, proxy.hits.Load())
}

// writerFunc adapts a function to io.Writer.
type writerFunc func(p []byte) (int, error)

func (f writerFunc) Write(p []byte) (int, error) { return f(p) }

// syncBuffer is a goroutine-safe log sink.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func TestWebhookNoSecretsInErrorsOrLogs(t *testing.T) {
	t.Parallel()
	const (
		password = "hunter2pw"
		token    = "qu3ryt0ken"
	)
	secrets := []string{secretA, secretB}
	// A receiver that echoes everything it got, headers included, on failure.
	echo := func(code int) func(int, http.ResponseWriter, *http.Request) {
		return func(_ int, w http.ResponseWriter, r *http.Request) {
			w.WriteHeader(code)
			_, _ = fmt.Fprintf(w, "url=%s auth=%s sig=%s", r.URL.String(), r.Header.Get("Authorization"), r.Header.Get("webhook-signature"))
		}
	}
	withCreds := func(raw string) string {
		return strings.Replace(raw, "http://", "http://alice:"+password+"@", 1) + "/hook?token=" + token
	}
	var logs syncBuffer
	log := zerolog.New(&logs).Level(zerolog.DebugLevel)

	var errs []error
	var sigs []string
	for _, code := range []int{400, 503, 410} {
		rc := newReceiver(t, echo(code))
		cfg := fastConfig(withCreds(rc.srv.URL))
		cfg.Secrets = secrets
		cfg.MaxAttempts = 2
		w := newWebhook(t, cfg, log)
		out := w.Deliver(t.Context(), []*decode.Event{event(1)})
		require.Error(t, out[0].Err)
		errs = append(errs, out[0].Err)
		for _, r := range rc.requests() {
			user, pass, ok := (&http.Request{Header: r.header}).BasicAuth()
			require.True(t, ok, "userinfo is sent as basic auth")
			require.Equal(t, "alice", user)
			require.Equal(t, password, pass)
			for _, s := range strings.Fields(r.header.Get("webhook-signature")) {
				sigs = append(sigs, strings.TrimPrefix(s, "v1,"))
			}
		}
	}
	// Transport error, refused address, cancellation.
	closed := httptest.NewServer(http.NotFoundHandler())
	closed.Close()
	for _, allow := range []bool{true, false} {
		cfg := fastConfig(withCreds(closed.URL))
		cfg.Secrets = secrets
		cfg.MaxAttempts = 2
		cfg.AllowPrivate = allow
		w := newWebhook(t, cfg, log)
		out := w.Deliver(t.Context(), []*decode.Event{event(1)})
		require.Error(t, out[0].Err)
		errs = append(errs, out[0].Err)
	}
	// Validation errors.
	for _, cfg := range []sink.WebhookConfig{
		{URL: "ftp://alice:" + password + "@example.com/?token=" + token},
		{URL: "http://alice:" + password + "@exa mple.com/?token=" + token},
		{URL: "https://example.com/", Secrets: []string{secretA, "whsec_" + token + "!!"}},
		{URL: "https://example.com/", Secrets: []string{strings.TrimPrefix(secretA, "whsec_")}},
	} {
		_, err := sink.NewWebhook(cfg, log)
		require.Error(t, err)
		errs = append(errs, err)
	}

	leaks := []string{password, token, secretA, secretB, "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
		strings.TrimPrefix(secretB, "whsec_"), base64.StdEncoding.EncodeToString([]byte("alice:" + password))}
	require.NotEmpty(t, sigs)
	leaks = append(leaks, sigs...)
	out := logs.String()
	require.Contains(t, out, `"component":"sink"`)
	require.Contains(t, out, "webhook attempt", "debug logging was on")
	for _, leak := range leaks {
		require.NotContains(t, out, leak, "log output leaks a secret")
		for _, err := range errs {
			require.NotContains(t, err.Error(), leak, "error leaks a secret: %v", err)
		}
	}
	for _, err := range errs {
		require.NotContains(t, err.Error(), "alice", "no userinfo in errors: %v", err)
	}
	require.NotContains(t, out, "alice")
	require.NotContains(t, out, string(event(1).Body), "no payloads in logs")
}

func TestWebhookConfigValidate(t *testing.T) {
	t.Parallel()
	given := sink.WebhookConfig{URL: "https://example.com/hook"}
	require.NoError(t, given.Validate())
	require.Equal(t, sink.WebhookConfig{URL: "https://example.com/hook"}, given, "Validate changes nothing")
	cfg := given.WithDefaults()
	require.NoError(t, cfg.Validate())
	require.Equal(t, sink.WebhookConfig{
		Name: "webhook",
		URL:  "https://example.com/hook",
		HTTPConfig: sink.HTTPConfig{
			Timeout:      10 * time.Second,
			RetryConfig:  sink.RetryConfig{MaxAttempts: 8, BackoffMin: 200 * time.Millisecond, BackoffMax: 30 * time.Second},
			MaxIdleConns: 64,
			UserAgent:    "outboxd",
		},
	}, cfg)

	tests := []struct {
		name  string
		cfg   sink.WebhookConfig
		field string
	}{
		{"no URL", sink.WebhookConfig{}, "URL"},
		{"relative URL", sink.WebhookConfig{URL: "/hook"}, "URL"},
		{"scheme", sink.WebhookConfig{URL: "ftp://example.com/"}, "URL"},
		{"no host", sink.WebhookConfig{URL: "http:///hook"}, "URL"},
		{"opaque", sink.WebhookConfig{URL: "http:example.com"}, "URL"},
		{"bad escape", sink.WebhookConfig{URL: "http://example.com/%zz"}, "URL"},
		{"secret prefix", sink.WebhookConfig{URL: "https://e.com", Secrets: []string{"abc"}}, "Secrets[0]"},
		{"secret base64", sink.WebhookConfig{URL: "https://e.com", Secrets: []string{secretA, "whsec_***"}}, "Secrets[1]"},
		{"secret empty", sink.WebhookConfig{URL: "https://e.com", Secrets: []string{"whsec_"}}, "Secrets[0]"},
		{"timeout", sink.WebhookConfig{URL: "https://e.com", HTTPConfig: sink.HTTPConfig{Timeout: -1}}, "Timeout"},
		{"attempts", sink.WebhookConfig{URL: "https://e.com", HTTPConfig: sink.HTTPConfig{RetryConfig: sink.RetryConfig{MaxAttempts: -1}}}, "MaxAttempts"},
		{"backoff order", sink.WebhookConfig{URL: "https://e.com", HTTPConfig: sink.HTTPConfig{RetryConfig: sink.RetryConfig{BackoffMin: time.Minute, BackoffMax: time.Second}}}, "BackoffMin"},
		{"backoff max", sink.WebhookConfig{URL: "https://e.com", HTTPConfig: sink.HTTPConfig{RetryConfig: sink.RetryConfig{BackoffMax: -time.Second}}}, "BackoffMax"},
		{"idle conns", sink.WebhookConfig{URL: "https://e.com", HTTPConfig: sink.HTTPConfig{MaxIdleConns: -3}}, "MaxIdleConns"},
		{"user agent", sink.WebhookConfig{URL: "https://e.com", HTTPConfig: sink.HTTPConfig{UserAgent: "a\nb"}}, "UserAgent"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			err := tt.cfg.Validate()
			require.Error(t, err)
			require.Contains(t, err.Error(), tt.field+":")
			for _, s := range tt.cfg.Secrets {
				if s != "" && s != "whsec_" {
					require.NotContains(t, err.Error(), strings.TrimPrefix(s, "whsec_"))
				}
			}
			_, err = sink.NewWebhook(tt.cfg, zerolog.Nop())
			require.Error(t, err)
		})
	}
}

func TestWebhookNilAndEmpty(t *testing.T) {
	t.Parallel()
	rc := newReceiver(t, nil)
	w := newWebhook(t, fastConfig(rc.srv.URL), zerolog.Nop())
	require.Empty(t, w.Deliver(t.Context(), nil))
	out := w.Deliver(t.Context(), []*decode.Event{event(1), nil})
	require.Len(t, out, 2)
	require.ErrorIs(t, out[1].Err, sink.ErrPermanent)
	require.Zero(t, rc.hits.Load())
}

// Webhooks made with one SharedClient share its keep-alive pool: many
// subscription endpoints on one host take one connection between them, not
// one each (with thousands of tenants, one pool per subscription held
// thousands of idle connections and their goroutines).
func TestWebhooksShareAClient(t *testing.T) {
	t.Parallel()
	for _, shared := range []bool{false, true} {
		var conns atomic.Int32
		srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			_, _ = io.Copy(io.Discard, r.Body)
			w.WriteHeader(http.StatusNoContent)
		}))
		srv.Config.ConnState = func(_ net.Conn, s http.ConnState) {
			if s == http.StateNew {
				conns.Add(1)
			}
		}
		srv.Start()
		t.Cleanup(srv.Close)
		base := fastConfig(srv.URL)
		var client *sink.SharedClient
		if shared {
			client = sink.NewSharedClient(base.HTTPConfig)
			t.Cleanup(client.Close)
		}
		for i := range 5 {
			cfg := base
			cfg.Name, cfg.URL, cfg.Client = fmt.Sprintf("subscription:%d", i), fmt.Sprintf("%s/tenant/%d", srv.URL, i), client
			w := newWebhook(t, cfg, zerolog.Nop())
			out := w.Deliver(context.Background(), []*decode.Event{event(int64(i + 1))})
			require.NoError(t, out[0].Err)
		}
		want := int32(5)
		if shared {
			want = 1
		}
		require.Equal(t, want, conns.Load(), "connections opened (shared %v)", shared)
	}
}

// A SharedClient with MaxConnsPerHost sends at most that many requests to one
// host at once; the others wait in outboxd, not in the receiver's queue. With
// thousands of tenants' subscriptions on one slow receiver, requests queued
// there outlived their attempt's timeout, were processed all the same, and
// their retries arrived as duplicates.
func TestSharedClientCapsConnectionsPerHost(t *testing.T) {
	t.Parallel()
	const callers, limit = 10, 2
	var inflight, maxInflight atomic.Int32
	release := make(chan struct{})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		n := inflight.Add(1)
		for m := maxInflight.Load(); n > m && !maxInflight.CompareAndSwap(m, n); m = maxInflight.Load() {
		}
		<-release
		inflight.Add(-1)
		w.WriteHeader(http.StatusNoContent)
	}))
	t.Cleanup(srv.Close)
	var once sync.Once
	open := func() { once.Do(func() { close(release) }) }
	t.Cleanup(open) // before srv.Close, which waits for the handlers
	base := fastConfig(srv.URL)
	base.Timeout = time.Minute // no attempt times out here: the test waits for progress
	base.SubscriptionMaxConnsPerHost = limit
	base.SubscriptionAllowPrivate = true
	client := sink.NewSharedClient(base.ForSubscription("", "", nil).HTTPConfig)
	t.Cleanup(client.Close)

	// Every caller asked for a connection (GetConn), and every one that got
	// one (GotConn) is in the handler: then what is in flight is all that
	// the client let through.
	var asked, got atomic.Int32
	trace := &httptrace.ClientTrace{
		GetConn: func(string) { asked.Add(1) },
		GotConn: func(httptrace.GotConnInfo) { got.Add(1) },
	}
	ctx := httptrace.WithClientTrace(t.Context(), trace)
	errs := make(chan error, callers)
	for i := range callers {
		cfg := base.ForSubscription(fmt.Sprintf("subscription:%d", i), fmt.Sprintf("%s/tenant/%d", srv.URL, i), []string{secretA})
		cfg.Client = client
		w := newWebhook(t, cfg, zerolog.Nop())
		go func() { errs <- w.Deliver(ctx, []*decode.Event{event(int64(i + 1))})[0].Err }()
	}
	e2e.WaitFor(t, time.Minute, func() bool {
		return asked.Load() == callers && got.Load() == inflight.Load() && inflight.Load() >= limit
	}, func() string {
		return fmt.Sprintf("asked %d, got %d, in flight %d", asked.Load(), got.Load(), inflight.Load())
	})
	require.Equal(t, int32(limit), inflight.Load(), "requests in flight at the receiver")
	open()
	for range callers {
		require.NoError(t, <-errs)
	}
	require.Equal(t, int32(limit), maxInflight.Load(), "most requests at the receiver at once")
}

// One webhook's deliveries, one after another, reuse one keep-alive
// connection whatever the answer's body: none (204, Content-Length: 0), a
// short one, or an error's, which is quoted.
func TestWebhookReusesItsConnection(t *testing.T) {
	t.Parallel()
	answers := []struct {
		code int
		body string
	}{{http.StatusNoContent, ""}, {http.StatusOK, ""}, {http.StatusOK, `{"ok":true}`}, {http.StatusBadRequest, "bad envelope"}, {http.StatusAccepted, ""}}
	var conns, hits atomic.Int32
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		a := answers[int(hits.Add(1)-1)%len(answers)]
		w.Header().Set("Content-Length", strconv.Itoa(len(a.body)))
		w.WriteHeader(a.code)
		_, _ = io.WriteString(w, a.body)
	}))
	srv.Config.ConnState = func(_ net.Conn, s http.ConnState) {
		if s == http.StateNew {
			conns.Add(1)
		}
	}
	srv.Start()
	t.Cleanup(srv.Close)
	w := newWebhook(t, fastConfig(srv.URL), zerolog.Nop())
	for i, a := range answers {
		out := w.Deliver(context.Background(), []*decode.Event{event(int64(i + 1))})
		require.Equal(t, a.code, out[0].Status)
		if a.code >= 300 {
			require.ErrorIs(t, out[0].Err, sink.ErrPermanent)
			require.ErrorContains(t, out[0].Err, a.body)
			continue
		}
		require.NoError(t, out[0].Err)
	}
	require.Equal(t, int32(1), conns.Load(), "connections opened")
}
