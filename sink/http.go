package sink

import (
	"cmp"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/hashicorp/go-retryablehttp"
)

// Defaults of HTTPConfig beyond those of RetryConfig (Timeout is
// DefaultTimeout).
const (
	DefaultMaxIdleConns = 64
	DefaultUserAgent    = "outboxd"
)

const (
	// maxDrain is how much of a response body is read before the connection
	// is given back to the pool; a longer body costs the connection instead.
	maxDrain = 64 << 10
	// snippetRead and snippetLen bound the part of an error response body
	// quoted in the delivery error.
	snippetRead = 512
	snippetLen  = 256
	// dialTimeout and tlsTimeout bound connection set-up within an attempt.
	dialTimeout = 10 * time.Second
	tlsTimeout  = 10 * time.Second
	// redacted replaces secrets echoed back by a receiver.
	redacted = "[REDACTED]"
)

// HTTPConfig is the configuration the HTTP sinks (webhook, PostHog, GA4) share:
// the attempt timeout, the retry budget, the address guard and the
// connection pool.
type HTTPConfig struct {
	// Timeout bounds each attempt, connection, request and response included.
	// Default 10s.
	Timeout time.Duration
	RetryConfig
	// AllowPrivate allows loopback, private, link-local and other
	// non-public destinations. Default false: such addresses are refused.
	AllowPrivate bool
	// MaxIdleConns is the keep-alive pool size. Default 64.
	MaxIdleConns int
	// MaxConnsPerHost caps the connections open to one host at once; 0:
	// no cap. Requests beyond it wait in outboxd, inside their attempt's
	// Timeout, instead of queueing unseen at a slow receiver: a request the
	// receiver takes up only after the attempt gave up is processed all the
	// same, and its retry arrives as a duplicate.
	MaxConnsPerHost int
	// UserAgent is the User-Agent header. Default "outboxd".
	UserAgent string
}

func (c HTTPConfig) withDefaults() HTTPConfig {
	c.Timeout = cmp.Or(c.Timeout, DefaultTimeout)
	c.RetryConfig = c.RetryConfig.withDefaults()
	c.MaxIdleConns = cmp.Or(c.MaxIdleConns, DefaultMaxIdleConns)
	c.UserAgent = cmp.Or(c.UserAgent, DefaultUserAgent)
	return c
}

// validate reports each bad field through bad.
func (c HTTPConfig) validate(bad func(field, format string, args ...any)) {
	c.RetryConfig.validate(bad)
	if c.Timeout < 0 {
		bad("Timeout", "must be positive, got %s", c.Timeout)
	}
	if c.MaxIdleConns < 0 {
		bad("MaxIdleConns", "must be positive, got %d", c.MaxIdleConns)
	}
	if c.MaxConnsPerHost < 0 {
		bad("MaxConnsPerHost", "must be 0 (no cap) or positive, got %d", c.MaxConnsPerHost)
	}
	if !validHeaderValue(c.UserAgent) {
		bad("UserAgent", "must not contain CR, LF or NUL")
	}
}

// httpClient sends the requests of an HTTP sink: through the guarded
// transport, one Timeout per attempt, redirects never followed, retried by
// go-retryablehttp with the sinks' retry policy. It is safe for concurrent
// use; its calls share one keep-alive pool.
type httpClient struct {
	transport *http.Transport
	client    *http.Client
	policy    retryPolicy
	timeout   time.Duration
}

// newHTTPClient returns the client c configures; c has its defaults.
func newHTTPClient(c HTTPConfig) *httpClient {
	t := newGuardedTransport(c.Timeout, c.MaxIdleConns, c.AllowPrivate)
	t.MaxConnsPerHost = c.MaxConnsPerHost
	return &httpClient{
		transport: t,
		client: &http.Client{
			Transport: t,
			Timeout:   c.Timeout, // per attempt: retryablehttp calls Do once per attempt
			CheckRedirect: func(*http.Request, []*http.Request) error {
				return http.ErrUseLastResponse // a 3xx is a permanent failure, never followed
			},
		},
		policy:  c.RetryConfig.policy(),
		timeout: c.Timeout,
	}
}

// SharedClient is an HTTP client many webhook sinks send through
// (WebhookConfig.Client): one keep-alive pool for the subscriptions of a
// platform instead of one per subscription, whose idle connections and their
// goroutines grew with the number of tenants.
type SharedClient struct{ h *httpClient }

// NewSharedClient returns the client c configures (defaults filled in).
func NewSharedClient(c HTTPConfig) *SharedClient {
	return &SharedClient{newHTTPClient(c.withDefaults())}
}

// Close closes its idle keep-alive connections.
func (s *SharedClient) Close() { s.h.closeIdle() }

// closeIdle closes idle keep-alive connections.
func (h *httpClient) closeIdle() { h.transport.CloseIdleConnections() }

// httpCall is one request and its retries. The sink sets what the call does
// (budget, classification, hooks); the attempts fill in what happened. The
// hooks go-retryablehttp runs are this call's methods: its state travels with
// it, not in the request's context.
type httpCall struct {
	// maxAttempts is the call's attempt budget (retryPolicy.limit).
	maxAttempts int
	// classify sorts a status; only statusRetryable answers are retried.
	classify func(status int) statusClass
	// beforeRetry, when set, adjusts the headers of each retry (the webhook
	// signs again with a fresh timestamp).
	beforeRetry func(h http.Header)
	// onAttempt, when set, is told of each attempt once its result is in c.
	onAttempt func(c *httpCall, err error)

	attempts   int
	status     int           // of the last response, 0 when none
	retryAfter time.Duration // the last Retry-After asked for, as asked
	started    time.Time     // start of the current attempt
}

// do runs the call: req, retried per the client's policy and c. Like
// retryablehttp.PassthroughErrorHandler, it returns the last response, whose
// status is the outcome, rather than a generic "giving up" error; the caller
// closes it.
func (h *httpClient) do(req *retryablehttp.Request, c *httpCall) (*http.Response, error) {
	rc := &retryablehttp.Client{
		HTTPClient:   h.client,
		Logger:       nil, // no debug lines on stderr
		RetryWaitMin: h.policy.backoff.Min,
		RetryWaitMax: h.policy.backoff.Max,
		RetryMax:     c.maxAttempts, // a bound only: checkRetry stops at maxAttempts
		CheckRetry:   c.checkRetry,
		Backoff: func(_, _ time.Duration, retry int, resp *http.Response) time.Duration {
			return h.policy.wait(retry, resp)
		},
		ErrorHandler:   retryablehttp.PassthroughErrorHandler,
		PrepareRetry:   c.prepareRetry,
		RequestLogHook: func(retryablehttp.Logger, *http.Request, int) { c.started = time.Now() },
	}
	return rc.Do(req)
}

// checkRetry is the retryablehttp.CheckRetry policy. It stops (without error)
// on every answer that is not retryable, so that the sink classifies the
// response, and when the budget is spent; it reports ctx errors; it retries
// retryable answers and transport errors other than a refused address.
func (c *httpCall) checkRetry(ctx context.Context, resp *http.Response, err error) (bool, error) {
	c.attempts++
	if resp != nil {
		c.status = resp.StatusCode
		if v := resp.Header.Get("Retry-After"); v != "" {
			if ra, ok := parseRetryAfter(v, time.Now()); ok {
				c.retryAfter = ra
			}
		}
	}
	if c.onAttempt != nil {
		c.onAttempt(c, cleanErr(err))
	}
	if observe := attemptObserver(ctx); observe != nil {
		status := 0 // this attempt's: c.status is the last answer's
		if resp != nil {
			status = resp.StatusCode
		}
		observe(Attempt{Number: c.attempts, Status: status, Err: c.attemptErr(resp, err), Start: c.started, End: time.Now()})
	}
	if err == nil && c.classify(resp.StatusCode) != statusRetryable {
		return false, nil
	}
	if ctxErr := ctx.Err(); ctxErr != nil {
		return false, ctxErr
	}
	if c.attempts >= c.maxAttempts {
		return false, nil
	}
	if err != nil {
		return !errors.Is(err, ErrForbiddenAddress), nil
	}
	return true, nil
}

// attemptErr is the failure of an attempt for an AttemptObserver: the
// transport error, or the status when it is not a 2xx; nil for a 2xx.
func (c *httpCall) attemptErr(resp *http.Response, err error) error {
	if err != nil {
		return cleanErr(err)
	}
	if resp != nil && c.classify(resp.StatusCode) != statusOK {
		return fmt.Errorf("status %d", resp.StatusCode)
	}
	return nil
}

// prepareRetry is the retryablehttp.PrepareRetry hook.
func (c *httpCall) prepareRetry(req *http.Request) error {
	if c.beforeRetry != nil {
		// req is a shallow copy whose Header map is shared with the previous
		// attempt, which the transport may still be reading: change a copy.
		req.Header = req.Header.Clone()
		c.beforeRetry(req.Header)
	}
	return nil
}

// newGuardedTransport returns the HTTP transport of the sinks that POST to a
// URL from configuration (webhook, PostHog, GA4): never an environment proxy (it
// would bypass the address guard), TLS 1.2 or later, and, unless
// allowPrivate, a dialer that refuses loopback, private, link-local and other
// reserved addresses at connect time, after name resolution, so that a name
// resolving to such an address is refused too (G8).
func newGuardedTransport(timeout time.Duration, maxIdleConns int, allowPrivate bool) *http.Transport {
	dialer := &net.Dialer{Timeout: min(timeout, dialTimeout), KeepAlive: 30 * time.Second}
	if !allowPrivate {
		dialer.Control = refuseReserved
	}
	return &http.Transport{
		Proxy:                 nil,
		DialContext:           dialer.DialContext,
		ForceAttemptHTTP2:     true,
		TLSClientConfig:       &tls.Config{MinVersion: tls.VersionTLS12},
		TLSHandshakeTimeout:   min(timeout, tlsTimeout),
		MaxIdleConns:          maxIdleConns,
		MaxIdleConnsPerHost:   maxIdleConns,
		IdleConnTimeout:       90 * time.Second,
		ExpectContinueTimeout: time.Second,
	}
}

type statusClass int

const (
	statusOK statusClass = iota
	statusRetryable
	statusPermanent
	statusGone
)

// classify sorts an HTTP status per docs/DESIGN.md §4.
func classify(code int) statusClass {
	switch {
	case code >= 200 && code < 300:
		return statusOK
	case code == http.StatusGone:
		return statusGone
	case code == http.StatusRequestTimeout, code == http.StatusTooEarly,
		code == http.StatusTooManyRequests, code >= 500:
		return statusRetryable
	default: // 1xx never surfaces; 3xx (not followed) and other 4xx
		return statusPermanent
	}
}

// drainBody drains (up to maxDrain, so that the connection can be reused)
// and closes resp's body. For a non-2xx answer it returns the start of the
// body, to be scrubbed and made printable (printable) before it is quoted.
func drainBody(resp *http.Response) []byte {
	defer resp.Body.Close()
	if resp.ContentLength == 0 {
		return nil // an empty body (a 204, say): nothing to read
	}
	body := io.LimitReader(resp.Body, maxDrain)
	if resp.StatusCode >= 200 && resp.StatusCode < 300 {
		_, _ = io.Copy(io.Discard, body)
		return nil
	}
	buf := make([]byte, snippetRead)
	n, _ := io.ReadFull(body, buf)
	_, _ = io.Copy(io.Discard, body)
	return buf[:n]
}

// printable makes a short, printable excerpt of s, already scrubbed.
func printable(s string) string {
	if len(s) > snippetLen {
		s = s[:snippetLen]
	}
	s = strings.ToValidUTF8(s, "")
	s = strings.Map(func(r rune) rune {
		if r < 0x20 || r == 0x7f {
			return ' '
		}
		return r
	}, s)
	return strings.TrimSpace(s)
}

// cleanErr drops the *url.Error layer net/http adds: it repeats the full URL,
// userinfo and query included. What it wraps names at most host and port.
func cleanErr(err error) error {
	if err == nil {
		return nil // without the allocation of errors.As's target
	}
	var ue *url.Error
	for errors.As(err, &ue) {
		err = ue.Err
	}
	return err
}
