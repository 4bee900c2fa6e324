package sink

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/hashicorp/go-retryablehttp"
	"github.com/rs/zerolog"

	"github.com/outboxd/outboxd/decode"
	"github.com/outboxd/outboxd/internal/backoff"
)

// Defaults applied by WebhookConfig.Validate.
const (
	DefaultWebhookName         = "webhook"
	DefaultWebhookTimeout      = 10 * time.Second
	DefaultWebhookMaxAttempts  = 8
	DefaultWebhookBackoffMin   = 200 * time.Millisecond
	DefaultWebhookBackoffMax   = 30 * time.Second
	DefaultWebhookMaxIdleConns = 64
	DefaultWebhookUserAgent    = "outboxd"
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

// WebhookConfig configures a Webhook sink.
type WebhookConfig struct {
	// Name is the sink name used in logs, metrics and dead letters.
	// Default "webhook".
	Name string
	// URL is the absolute http or https URL deliveries are POSTed to. Userinfo
	// is sent as basic auth; neither it nor the query string ever appears in
	// logs or errors.
	URL string
	// Secrets are Standard Webhooks secrets, "whsec_<base64>". None: requests
	// are unsigned. Two or more: one v1 signature each, space-separated, for
	// rotation.
	Secrets []string
	// Timeout bounds each attempt, connection, request and response included.
	// Default 10s.
	Timeout time.Duration
	// MaxAttempts is the number of attempts one Deliver call makes before it
	// gives up with a retryable error. Default 8.
	MaxAttempts int
	// BackoffMin is the first backoff. Default 200ms.
	BackoffMin time.Duration
	// BackoffMax caps the backoff and any Retry-After. Default 30s.
	BackoffMax time.Duration
	// AllowPrivate allows loopback, private, link-local and other
	// non-public destinations. Default false: such addresses are refused.
	AllowPrivate bool
	// AllowPrivateSetting names the setting behind AllowPrivate (such as
	// OUTBOXD_ALLOW_PRIVATE_SINKS). The error of a refused address names it,
	// so that a dead letter's reason says which switch the guard applied.
	// Empty: the error names the field AllowPrivate.
	AllowPrivateSetting string
	// SubscriptionAllowPrivate and SubscriptionAllowPrivateSetting are the
	// AllowPrivate and AllowPrivateSetting of the subscription webhooks made
	// from this configuration by ForSubscription. Tenant-controlled URLs have
	// an allowance of their own and never inherit AllowPrivate (G8). Default
	// false: a subscription URL's private address is refused.
	SubscriptionAllowPrivate        bool
	SubscriptionAllowPrivateSetting string
	// MaxIdleConns is the keep-alive pool size. Default 64.
	MaxIdleConns int
	// UserAgent is the User-Agent header. Default "outboxd".
	UserAgent string
}

// Validate fills in defaults and checks c. Errors name the offending field and
// never contain a secret or the URL's userinfo or query.
func (c *WebhookConfig) Validate() error {
	if c.Name == "" {
		c.Name = DefaultWebhookName
	}
	if c.Timeout == 0 {
		c.Timeout = DefaultWebhookTimeout
	}
	if c.MaxAttempts == 0 {
		c.MaxAttempts = DefaultWebhookMaxAttempts
	}
	if c.BackoffMin == 0 {
		c.BackoffMin = DefaultWebhookBackoffMin
	}
	if c.BackoffMax == 0 {
		c.BackoffMax = DefaultWebhookBackoffMax
	}
	if c.MaxIdleConns == 0 {
		c.MaxIdleConns = DefaultWebhookMaxIdleConns
	}
	if c.UserAgent == "" {
		c.UserAgent = DefaultWebhookUserAgent
	}

	var errs []error
	bad := func(field, format string, args ...any) {
		errs = append(errs, fmt.Errorf("webhook sink %q: %s: %s", c.Name, field, fmt.Sprintf(format, args...)))
	}
	if _, err := parseWebhookURL(c.URL); err != nil {
		bad("URL", "%v", err)
	}
	for i, s := range c.Secrets {
		if _, err := decodeSecret(s); err != nil {
			bad(fmt.Sprintf("Secrets[%d]", i), "%v", err)
		}
	}
	if c.Timeout < 0 {
		bad("Timeout", "must be positive, got %s", c.Timeout)
	}
	if c.MaxAttempts < 0 {
		bad("MaxAttempts", "must be positive, got %d", c.MaxAttempts)
	}
	if c.BackoffMin < 0 {
		bad("BackoffMin", "must be positive, got %s", c.BackoffMin)
	}
	if c.BackoffMax < 0 {
		bad("BackoffMax", "must be positive, got %s", c.BackoffMax)
	}
	if c.BackoffMin > 0 && c.BackoffMax > 0 && c.BackoffMin > c.BackoffMax {
		bad("BackoffMin", "%s is greater than BackoffMax %s", c.BackoffMin, c.BackoffMax)
	}
	if c.MaxIdleConns < 0 {
		bad("MaxIdleConns", "must be positive, got %d", c.MaxIdleConns)
	}
	if !validHeaderValue(c.UserAgent) {
		bad("UserAgent", "must not contain CR, LF or NUL")
	}
	return errors.Join(errs...)
}

// ForSubscription returns the configuration of a subscription's webhook: c as
// the template (timeouts, attempts, backoff, pool, user agent) with the
// subscription's name, URL and secrets, and with the subscriptions' own
// address guard (SubscriptionAllowPrivate) in place of c's AllowPrivate, so
// that a switch meant for the operator's destinations does not open private
// ranges to tenant-controlled URLs.
func (c WebhookConfig) ForSubscription(name, url string, secrets []string) WebhookConfig {
	c.Name, c.URL, c.Secrets = name, url, secrets
	c.AllowPrivate, c.AllowPrivateSetting = c.SubscriptionAllowPrivate, c.SubscriptionAllowPrivateSetting
	return c
}

// guardHint is what the error of a refused address adds: the setting that
// would allow the destination.
func (c *WebhookConfig) guardHint() string {
	setting := c.AllowPrivateSetting
	if setting == "" {
		setting = "AllowPrivate"
	}
	return "; the address guard refuses non-public destinations unless " + setting + "=true"
}

// parseWebhookURL parses an absolute http or https URL. Its errors do not
// repeat the URL.
func parseWebhookURL(raw string) (*url.URL, error) {
	if raw == "" {
		return nil, errors.New("required")
	}
	u, err := url.Parse(raw)
	if err != nil {
		// url.Error repeats the whole URL, credentials included: keep only
		// the reason, which quotes at most the offending fragment.
		var ue *url.Error
		if errors.As(err, &ue) {
			err = ue.Err
		}
		return nil, fmt.Errorf("must be an absolute http or https URL: %v", err)
	}
	if (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || u.Opaque != "" {
		return nil, errors.New("must be an absolute http or https URL")
	}
	if u.Hostname() == "" {
		return nil, errors.New("has no host")
	}
	return u, nil
}

// redactURL returns scheme://host/path of u: no userinfo, query or fragment.
func redactURL(u *url.URL) string {
	return u.Scheme + "://" + u.Host + u.EscapedPath()
}

// Webhook is a Sink that POSTs events to an HTTP endpoint, signed as Standard
// Webhooks, with in-memory retries (docs/DESIGN.md §4). It is safe for concurrent
// use; Deliver calls share one keep-alive connection pool.
type Webhook struct {
	name      string
	rawURL    string
	redacted  string
	userAgent string
	timeout   time.Duration     // of each attempt
	signer    *signer           // nil: unsigned
	guardHint string            // appended to a refused address's error
	scrub     *strings.Replacer // secrets a receiver might echo back
	log       zerolog.Logger
	transport *http.Transport
	client    *retryablehttp.Client
}

var _ Sink = (*Webhook)(nil)

// NewWebhook validates cfg and returns a Webhook sink.
func NewWebhook(cfg WebhookConfig, log zerolog.Logger) (*Webhook, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	u, err := parseWebhookURL(cfg.URL)
	if err != nil {
		return nil, fmt.Errorf("webhook sink %q: URL: %w", cfg.Name, err)
	}
	keys, err := decodeSecrets(cfg.Secrets)
	if err != nil {
		return nil, fmt.Errorf("webhook sink %q: %w", cfg.Name, err)
	}
	w := &Webhook{
		name:      cfg.Name,
		rawURL:    cfg.URL,
		redacted:  redactURL(u),
		userAgent: cfg.UserAgent,
		timeout:   cfg.Timeout,
		signer:    newSigner(keys),
		scrub:     newScrubber(cfg.Secrets, u),
		guardHint: cfg.guardHint(),
	}
	w.log = log.With().Str("component", "sink").Str("sink", cfg.Name).Str("url", w.redacted).Logger()

	w.transport = newGuardedTransport(cfg.Timeout, cfg.MaxIdleConns, cfg.AllowPrivate)
	httpClient := &http.Client{
		Transport: w.transport,
		Timeout:   cfg.Timeout, // per attempt: retryablehttp calls Do once per attempt
		CheckRedirect: func(*http.Request, []*http.Request) error {
			return http.ErrUseLastResponse // a 3xx is a permanent failure, never followed
		},
	}
	w.client = &retryablehttp.Client{
		HTTPClient:   httpClient,
		Logger:       nil, // no debug lines on stderr
		RetryWaitMin: cfg.BackoffMin,
		RetryWaitMax: cfg.BackoffMax,
		RetryMax:     cfg.MaxAttempts - 1,
		CheckRetry:   w.checkRetry,
		Backoff:      retryWait,
		// Hand the last response back (its status is the outcome) instead of
		// retryablehttp's generic "giving up" error; Deliver closes it.
		ErrorHandler: retryablehttp.PassthroughErrorHandler,
		PrepareRetry: w.prepareRetry,
	}
	return w, nil
}

// newScrubber returns a replacer that removes secrets, credentials and the
// query string from text a receiver sent back.
func newScrubber(secrets []string, u *url.URL) *strings.Replacer {
	var olds []string
	add := func(s string, minLen int) {
		if s != "" && len(s) >= minLen {
			olds = append(olds, s)
		}
	}
	for _, s := range secrets {
		add(s, 1)
		add(strings.TrimPrefix(s, secretPrefix), 1)
	}
	if u.User != nil {
		user := u.User.Username()
		pass, _ := u.User.Password()
		add(u.User.String(), 1)
		add(pass, 1)
		// Usernames and query values are often short common words ("1",
		// "json"): scrubbing those would mangle the text, not protect a secret.
		add(user, 4)
		add(base64.StdEncoding.EncodeToString([]byte(user+":"+pass)), 1)
	}
	add(u.RawQuery, 1)
	for _, vs := range u.Query() {
		for _, v := range vs {
			add(v, 4)
		}
	}
	pairs := make([]string, 0, 2*len(olds))
	for _, s := range olds {
		pairs = append(pairs, s, redacted)
	}
	return strings.NewReplacer(pairs...)
}

// Name returns the sink name.
func (w *Webhook) Name() string { return w.name }

// Close closes idle keep-alive connections. Deliver may still be called
// afterwards; it opens new connections.
func (w *Webhook) Close() { w.transport.CloseIdleConnections() }

// call is the state of one Deliver call. It lives in the request context so
// that the policy hooks, shared by all calls, find it; only the goroutine
// running Deliver touches it.
type call struct {
	id         string
	body       []byte
	attempts   int
	status     int
	retryAfter time.Duration
	signature  string    // last webhook-signature sent, to scrub from echoes
	started    time.Time // start of the current attempt
}

type callKey struct{}

// Deliver POSTs events as one request: the event's Body for one event, a JSON
// array of the bodies for several. It retries in memory per the config and
// returns the same Outcome for every event, one per event, in order.
func (w *Webhook) Deliver(ctx context.Context, events []*decode.Event) []Outcome {
	if len(events) == 0 {
		return []Outcome{}
	}
	o := w.deliver(ctx, events)
	out := make([]Outcome, len(events))
	for i := range out {
		out[i] = o
	}
	return out
}

func (w *Webhook) deliver(ctx context.Context, events []*decode.Event) Outcome {
	for i, ev := range events {
		if ev == nil {
			return Outcome{Err: fmt.Errorf("post webhook %s: %w: event %d is nil", w.redacted, ErrPermanent, i)}
		}
	}
	if err := ctx.Err(); err != nil {
		return Outcome{Err: fmt.Errorf("post webhook %s: %w", w.redacted, err)}
	}
	c := &call{id: WebhookID(events), body: batchBody(events)}
	ctx = context.WithValue(ctx, callKey{}, c)
	req, err := retryablehttp.NewRequestWithContext(ctx, http.MethodPost, w.rawURL, c.body)
	if err != nil {
		// The URL was validated: only a broken ctx or method gets here.
		return Outcome{Err: fmt.Errorf("post webhook %s: %w: build request: %w", w.redacted, ErrPermanent, cleanErr(err))}
	}
	for _, h := range ExtraHeaders(ctx) {
		req.Header.Set(h.Key, h.Value)
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("User-Agent", w.userAgent)
	req.Header.Set("Webhook-Id", c.id)
	if len(events) == 1 && events[0].Traceparent != "" && validHeaderValue(events[0].Traceparent) {
		req.Header.Set("Traceparent", events[0].Traceparent)
	}
	w.sign(req.Header, c)

	resp, err := w.client.Do(req)
	return w.outcome(ctx, c, resp, err)
}

// batchBody returns the request body: the one envelope, or a JSON array of all.
func batchBody(events []*decode.Event) []byte {
	if len(events) == 1 {
		return events[0].Body
	}
	n := 2 + len(events) - 1
	for _, ev := range events {
		n += len(ev.Body)
	}
	b := make([]byte, 0, n)
	b = append(b, '[')
	for i, ev := range events {
		if i > 0 {
			b = append(b, ',')
		}
		b = append(b, ev.Body...)
	}
	return append(b, ']')
}

// sign sets a fresh webhook-timestamp and webhook-signature on h.
func (w *Webhook) sign(h http.Header, c *call) {
	ts := time.Now().Unix()
	h.Set("Webhook-Timestamp", strconv.FormatInt(ts, 10))
	if w.signer != nil {
		c.signature = w.signer.sign(c.id, ts, c.body)
		h.Set("Webhook-Signature", c.signature)
	}
	c.started = time.Now()
}

// prepareRetry re-signs the request before each retry so that the timestamp is
// fresh (receivers reject stale ones) while webhook-id stays the same.
func (w *Webhook) prepareRetry(req *http.Request) error {
	c, ok := req.Context().Value(callKey{}).(*call)
	if !ok {
		return errors.New("re-sign webhook: no delivery state in request context")
	}
	// req is a shallow copy whose Header map is shared with the previous
	// attempt, which the transport may still be reading: sign a copy.
	req.Header = req.Header.Clone()
	w.sign(req.Header, c)
	return nil
}

// checkRetry is the retryablehttp.CheckRetry policy. It stops (without error)
// on every final answer, so that Deliver classifies the response, and reports
// ctx errors; it retries 408, 425, 429, 5xx and transport errors.
func (w *Webhook) checkRetry(ctx context.Context, resp *http.Response, err error) (bool, error) {
	c, _ := ctx.Value(callKey{}).(*call)
	if c == nil {
		c = &call{}
	}
	c.attempts++
	if resp != nil {
		c.status = resp.StatusCode
		if ra, ok := parseRetryAfter(resp.Header.Get("Retry-After"), time.Now()); ok {
			c.retryAfter = ra
		}
	}
	if ev := w.log.Debug(); ev.Enabled() {
		ev.Str("webhook_id", c.id).Int("attempt", c.attempts).Int("status", c.status).
			Dur("duration", time.Since(c.started)).AnErr("error", cleanErr(err)).Msg("webhook attempt")
	}

	if err == nil {
		switch classify(resp.StatusCode) {
		case statusOK, statusPermanent, statusGone:
			return false, nil
		}
	}
	if ctxErr := ctx.Err(); ctxErr != nil {
		return false, ctxErr
	}
	if max := MaxAttempts(ctx); max > 0 && c.attempts >= max {
		return false, nil
	}
	if err != nil {
		return !errors.Is(err, ErrForbiddenAddress), nil
	}
	return true, nil
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

// outcome turns what retryablehttp returned into an Outcome, draining and
// closing the response.
func (w *Webhook) outcome(ctx context.Context, c *call, resp *http.Response, err error) Outcome {
	o := Outcome{Attempts: c.attempts, Status: c.status, RetryAfter: c.retryAfter}
	var snippet string
	if resp != nil {
		o.Status = resp.StatusCode
		snippet = w.finish(resp, c)
	}
	if err != nil {
		err = cleanErr(err)
		switch ctxErr := ctx.Err(); {
		case ctxErr != nil:
			o.Err = fmt.Errorf("post webhook %s: stopped after %d attempt(s)%s: %w",
				w.redacted, o.Attempts, lastStatus(o.Status), ctxErr)
		case errors.Is(err, ErrForbiddenAddress):
			o.Err = fmt.Errorf("post webhook %s: %w: %w%s", w.redacted, ErrPermanent, err, w.guardHint)
		default:
			// An attempt that ran out of its own Timeout fails with an error
			// that wraps context.DeadlineExceeded: that must not read as the
			// end of ctx.
			o.Err = fmt.Errorf("post webhook %s: giving up after %d attempt(s): %w", w.redacted, o.Attempts, attemptErr(ctx, w.timeout, err))
		}
		w.logOutcome(c, o)
		return o
	}
	code := resp.StatusCode
	switch classify(code) {
	case statusOK:
	case statusGone:
		o.Err = fmt.Errorf("post webhook %s: %w%s", w.redacted, ErrGone, quote(snippet))
	case statusRetryable:
		o.Err = fmt.Errorf("post webhook %s: giving up after %d attempt(s): status %d%s",
			w.redacted, o.Attempts, code, quote(snippet))
	default:
		if code >= 300 && code < 400 {
			o.Err = fmt.Errorf("post webhook %s: %w: status %d: redirects are not followed",
				w.redacted, ErrPermanent, code)
		} else {
			o.Err = fmt.Errorf("post webhook %s: %w: status %d%s", w.redacted, ErrPermanent, code, quote(snippet))
		}
	}
	w.logOutcome(c, o)
	return o
}

func (w *Webhook) logOutcome(c *call, o Outcome) {
	if ev := w.log.Debug(); ev.Enabled() {
		ev.Str("webhook_id", c.id).Int("attempts", o.Attempts).Int("status", o.Status).
			AnErr("error", o.Err).Msg("webhook delivery")
	}
}

func lastStatus(code int) string {
	if code == 0 {
		return ""
	}
	return fmt.Sprintf(" (last status %d)", code)
}

func quote(s string) string {
	if s == "" {
		return ""
	}
	return ": " + strconv.Quote(s)
}

// finish drains (up to maxDrain, so that the connection can be reused) and
// closes resp's body. For a non-2xx answer it returns the start of the body,
// scrubbed of anything secret the receiver may have echoed back.
func (w *Webhook) finish(resp *http.Response, c *call) string {
	defer resp.Body.Close()
	body := io.LimitReader(resp.Body, maxDrain)
	if resp.StatusCode >= 200 && resp.StatusCode < 300 {
		_, _ = io.Copy(io.Discard, body)
		return ""
	}
	buf := make([]byte, snippetRead)
	n, _ := io.ReadFull(body, buf)
	_, _ = io.Copy(io.Discard, body)
	return w.snippet(buf[:n], c.signature)
}

// snippet makes a short, printable, scrubbed excerpt of a response body.
func (w *Webhook) snippet(b []byte, signature string) string {
	s := string(b)
	for sig := range strings.FieldsSeq(signature) {
		s = strings.ReplaceAll(s, strings.TrimPrefix(sig, "v1,"), redacted)
	}
	s = w.scrub.Replace(s)
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
	var ue *url.Error
	for errors.As(err, &ue) {
		err = ue.Err
	}
	return err
}

// retryWait is the retryablehttp.Backoff policy. A Retry-After (delta-seconds or
// HTTP-date) on a retryable answer is honoured, clamped to max; otherwise the
// wait grows exponentially from min with equal jitter, capped at max.
func retryWait(minWait, maxWait time.Duration, attempt int, resp *http.Response) time.Duration {
	if resp != nil {
		if ra, ok := parseRetryAfter(resp.Header.Get("Retry-After"), time.Now()); ok {
			return min(ra, maxWait)
		}
	}
	return backoff.Policy{Min: minWait, Max: maxWait}.Wait(attempt)
}

// maxRetryAfter bounds a delta-seconds Retry-After so that it cannot overflow.
const maxRetryAfter = 365 * 24 * time.Hour

// parseRetryAfter parses a Retry-After value, delta-seconds or HTTP-date
// (RFC 9110 §10.2.3), relative to now. A date in the past means no wait.
func parseRetryAfter(v string, now time.Time) (time.Duration, bool) {
	v = strings.TrimSpace(v)
	if v == "" {
		return 0, false
	}
	if isDigits(v) {
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil || n > int64(maxRetryAfter/time.Second) {
			return maxRetryAfter, true
		}
		return time.Duration(n) * time.Second, true
	}
	t, err := http.ParseTime(v)
	if err != nil {
		return 0, false
	}
	return max(t.Sub(now), 0), true
}

func isDigits(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return false
		}
	}
	return s != ""
}
