package sink

import (
	"bytes"
	"errors"
	"io"
	"net/http"
	"net/url"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"github.com/stretchr/testify/require"

	"github.com/outboxd/outboxd/internal/backoff"
)

func TestParseRetryAfter(t *testing.T) {
	t.Parallel()
	now := time.Date(2026, 11, 26, 10, 0, 0, 0, time.UTC)
	tests := []struct {
		in   string
		want time.Duration
		ok   bool
	}{
		{"", 0, false},
		{"0", 0, true},
		{"1", time.Second, true},
		{" 120 ", 2 * time.Minute, true},
		{"99999999999999999999", maxRetryAfter, true},
		{"-5", 0, false},
		{"1.5", 0, false},
		{"soon", 0, false},
		{"Thu, 26 Nov 2026 10:00:30 GMT", 30 * time.Second, true}, // IMF-fixdate
		{"Thursday, 26-Nov-26 10:01:00 GMT", time.Minute, true},   // RFC 850
		{"Thu Nov 26 10:00:05 2026", 5 * time.Second, true},       // asctime
		{"Thu, 26 Nov 2026 09:00:00 GMT", 0, true},                // in the past: no wait
	}
	for _, tt := range tests {
		got, ok := parseRetryAfter(tt.in, now)
		require.Equal(t, tt.ok, ok, "%q", tt.in)
		require.Equal(t, tt.want, got, "%q", tt.in)
	}
}

func TestBackoff(t *testing.T) {
	t.Parallel()
	const minWait, maxWait = 100 * time.Millisecond, 2 * time.Second
	p := retryPolicy{backoff: backoff.Policy{Min: minWait, Max: maxWait}}
	retryWait := func(_, _ time.Duration, retry int, resp *http.Response) time.Duration { return p.wait(retry, resp) }
	for attempt := range 70 {
		d := min(maxWait, minWait<<min(attempt, 20))
		for range 50 {
			got := retryWait(minWait, maxWait, attempt, nil)
			require.GreaterOrEqual(t, got, max(d/2, minWait), "attempt %d", attempt)
			require.LessOrEqual(t, got, d, "attempt %d", attempt)
		}
	}

	resp := &http.Response{Header: http.Header{"Retry-After": {"1"}}}
	require.Equal(t, time.Second, retryWait(minWait, maxWait, 0, resp))
	resp.Header.Set("Retry-After", "3600")
	require.Equal(t, maxWait, retryWait(minWait, maxWait, 0, resp), "clamped to BackoffMax")
	resp.Header.Set("Retry-After", "garbage")
	got := retryWait(minWait, maxWait, 0, resp)
	require.GreaterOrEqual(t, got, minWait)
	require.LessOrEqual(t, got, minWait)
}

func TestClassify(t *testing.T) {
	t.Parallel()
	for code, want := range map[int]statusClass{
		200: statusOK, 201: statusOK, 204: statusOK, 299: statusOK,
		301: statusPermanent, 302: statusPermanent, 304: statusPermanent, 307: statusPermanent, 308: statusPermanent,
		400: statusPermanent, 401: statusPermanent, 403: statusPermanent, 404: statusPermanent, 413: statusPermanent, 422: statusPermanent,
		408: statusRetryable, 425: statusRetryable, 429: statusRetryable,
		500: statusRetryable, 502: statusRetryable, 503: statusRetryable, 504: statusRetryable, 599: statusRetryable,
		410: statusGone,
	} {
		require.Equal(t, want, classify(code), "status %d", code)
	}
}

func TestCleanErr(t *testing.T) {
	t.Parallel()
	inner := errors.New("dial tcp 192.0.2.1:443: connect: connection refused")
	err := &url.Error{Op: "Post", URL: "https://user:pw@example.com/hook?token=abc", Err: inner}
	got := cleanErr(err)
	require.Equal(t, inner, got)
	require.NotContains(t, got.Error(), "token")
}

func TestSnippetScrubs(t *testing.T) {
	t.Parallel()
	u, err := url.Parse("https://alice:s3cr3tpw@example.com/hook?token=qu3rys3cret&x=1")
	require.NoError(t, err)
	secret := "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
	w := &Webhook{scrub: newScrubber([]string{secret}, u)}
	sig := "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
	body := "bad signature " + sig + " for key " + secret + " pw s3cr3tpw q token=qu3rys3cret&x=1 " +
		"auth Basic YWxpY2U6czNjcjN0cHc=\n\x00tail"
	got := w.snippet([]byte(body), sig)
	for _, leak := range []string{"g0hM9SsE", "MfKQ9r8G", "s3cr3tpw", "qu3rys3cret", "YWxpY2U6czNjcjN0cHc="} {
		require.NotContains(t, got, leak)
	}
	require.NotContains(t, got, "\n")
	require.NotContains(t, got, "\x00")
	require.Contains(t, got, "bad signature")

	long := make([]byte, 4*snippetRead)
	for i := range long {
		long[i] = 'x'
	}
	require.Len(t, w.snippet(long, ""), snippetLen)
}

// The scrubber of a webhook does no work for the empty body of a 2xx
// answer: its Replacer, whose tables cost more than the sink itself, is
// built only for text to scrub. Not parallel: it counts allocations.
func TestScrubberBuiltOnlyForText(t *testing.T) {
	u, err := url.Parse("https://alice:s3cr3tpw@example.com/hook?token=qu3rys3cret")
	require.NoError(t, err)
	secrets := []string{"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"}
	made := testing.AllocsPerRun(20, func() { _ = newScrubber(secrets, u) })
	empty := testing.AllocsPerRun(20, func() { _ = newScrubber(secrets, u).Replace("") })
	require.Equal(t, made, empty, "nothing built for empty text")
	require.Equal(t, "key [REDACTED] pw [REDACTED]", newScrubber(secrets, u).Replace("key "+secrets[0]+" pw s3cr3tpw"))
}

// A webhook logs only at debug level, so it gives its logger a context (a
// buffer per sink, one sink per subscription) only when debug lines are
// written. Not parallel: it counts allocations.
func TestWebhookLoggerContextOnlyForDebug(t *testing.T) {
	cfg := WebhookConfig{URL: "https://example.com/hook", Secrets: []string{"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"}}
	allocs := func(level zerolog.Level) float64 {
		log := zerolog.New(io.Discard).Level(level)
		return testing.AllocsPerRun(20, func() {
			if _, err := NewWebhook(cfg, log); err != nil {
				t.Fatal(err)
			}
		})
	}
	require.Less(t, allocs(zerolog.InfoLevel), allocs(zerolog.DebugLevel))
	var buf bytes.Buffer
	w, err := NewWebhook(cfg, zerolog.New(&buf).Level(zerolog.DebugLevel))
	require.NoError(t, err)
	w.log.Debug().Msg("x")
	require.Contains(t, buf.String(), `"sink":"webhook","url":"https://example.com/hook"`)
}

// The request URL made from the one NewWebhook parsed is the one
// http.NewRequest made from the text: an empty port dropped, the rest kept.
func TestRequestURLAsNewRequest(t *testing.T) {
	t.Parallel()
	for _, raw := range []string{"http://h:/x", "https://h:8443/p?q=1", "http://[::1]:/hook", "http://u:p@h/x"} {
		u, err := parseWebhookURL(raw)
		require.NoError(t, err, raw)
		want, err := http.NewRequest(http.MethodPost, raw, nil)
		require.NoError(t, err, raw)
		require.Equal(t, want.URL.String(), requestURL(u).String(), raw)
		require.Equal(t, want.URL.Host, requestURL(u).Host, raw)
	}
}
