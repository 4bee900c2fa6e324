package sink

import (
	"cmp"
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/hashicorp/go-retryablehttp"
	"github.com/rs/zerolog"

	"github.com/outboxd/outboxd/decode"
)

// DefaultWebhookName is the default name of a Webhook sink.
const DefaultWebhookName = "webhook"

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
	// HTTPConfig holds the attempt timeout, the retry budget, the address
	// guard (AllowPrivate), the pool and the user agent.
	HTTPConfig
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
	// SubscriptionMaxConnsPerHost is the MaxConnsPerHost of the
	// subscriptions' webhooks: thousands of tenants' targets may point at
	// one receiver, each with its own concurrency.
	SubscriptionMaxConnsPerHost int
	// Client, when set, is the HTTP client the sink sends through, shared
	// with other sinks; it must have been made from this HTTPConfig. Nil:
	// the sink has a client of its own.
	Client *SharedClient
}

// WithDefaults returns a copy of c with the defaults filled in.
func (c WebhookConfig) WithDefaults() WebhookConfig {
	c.HTTPConfig = c.HTTPConfig.withDefaults()
	c.Name = cmp.Or(c.Name, DefaultWebhookName)
	return c
}

// Validate checks c with its defaults (WithDefaults) and changes nothing.
// Errors name the offending field and never contain a secret or the URL's
// userinfo or query.
func (c WebhookConfig) Validate() error {
	_, _, err := c.WithDefaults().check()
	return err
}

// check validates c, which has its defaults, and returns its URL parsed and
// its secrets decoded.
func (c WebhookConfig) check() (*url.URL, [][]byte, error) {
	var v fieldCheck
	u, err := parseWebhookURL(c.URL)
	if err != nil {
		v.bad("URL", "%v", err)
	}
	keys := make([][]byte, len(c.Secrets))
	for i, s := range c.Secrets {
		if keys[i], err = decodeSecret(s); err != nil {
			v.bad(fmt.Sprintf("Secrets[%d]", i), "%v", err)
		}
	}
	c.HTTPConfig.validate(v.bad)
	return u, keys, v.err("webhook", c.Name)
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
	c.MaxConnsPerHost = c.SubscriptionMaxConnsPerHost
	return c
}

// guardHint is what the error of a refused address adds: the setting that
// would allow the destination.
func (c WebhookConfig) guardHint() string {
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

// requestURL returns a copy of u as http.NewRequest would have it: an empty
// port (a Host ending in ":") dropped.
func requestURL(u *url.URL) *url.URL {
	r := *u
	r.Host = strings.TrimSuffix(r.Host, ":")
	return &r
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
	url       *url.URL // parsed rawURL, copied into each request
	redacted  string
	userAgent string
	signer    *signer  // nil: unsigned
	guardHint string   // appended to a refused address's error
	scrub     scrubber // secrets a receiver might echo back
	log       zerolog.Logger
	http      *httpClient
	// sharedHTTP: http belongs to a SharedClient, whose owner closes it.
	sharedHTTP bool
}

var _ Sink = (*Webhook)(nil)

// NewWebhook validates cfg, with its defaults, and returns a Webhook sink.
func NewWebhook(cfg WebhookConfig, log zerolog.Logger) (*Webhook, error) {
	cfg = cfg.WithDefaults()
	// One parse of the URL and of the secrets: a platform builds a sink
	// per subscription with deliveries in hand.
	u, keys, err := cfg.check()
	if err != nil {
		return nil, err
	}
	w := &Webhook{
		name:      cfg.Name,
		rawURL:    cfg.URL,
		userAgent: cfg.UserAgent,
		guardHint: cfg.guardHint(),
	}
	if cfg.Client != nil {
		w.http, w.sharedHTTP = cfg.Client.h, true
	} else {
		w.http = newHTTPClient(cfg.HTTPConfig)
	}
	w.redacted, w.signer, w.scrub = redactURL(u), newSigner(keys), newScrubber(cfg.Secrets, u)
	w.url = requestURL(u)
	// The sink logs only at debug level: below it, its context (made for
	// every subscription's sink) would never be written.
	w.log = log
	if debugEnabled(log) {
		w.log = log.With().Str("component", "sink").Str("sink", cfg.Name).Str("url", w.redacted).Logger()
	}
	return w, nil
}

// newScrubber returns a replacer that removes secrets, credentials and the
// query string from text a receiver sent back.
func newScrubber(secrets []string, u *url.URL) scrubber {
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
	return scrubber{strings.NewReplacer(pairs...)}
}

// scrubber is the Replacer of newScrubber, not asked about empty text: a
// Replacer of several strings builds its tables at its first use, and the
// body of a 2xx answer, not read, is empty. A platform has a webhook per
// subscription, most of which only ever see 2xx answers.
type scrubber struct{ r *strings.Replacer }

// Replace returns text with the secrets replaced.
func (s scrubber) Replace(text string) string {
	if text == "" {
		return text
	}
	return s.r.Replace(text)
}

// Name returns the sink name.
func (w *Webhook) Name() string { return w.name }

// Close closes idle keep-alive connections (of its own client, not of a
// shared one). Deliver may still be called afterwards; it opens new
// connections.
func (w *Webhook) Close() {
	if !w.sharedHTTP {
		w.http.closeIdle()
	}
}

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
	growStack()
	id, body := WebhookID(events), batchBody(events)
	// Each attempt is signed with a fresh timestamp (receivers reject stale
	// ones) while webhook-id stays the same.
	req, signature := w.request(ctx, id, events, body) // signature: the last one sent, to scrub from echoes
	c := &httpCall{
		maxAttempts: w.http.policy.limit(ctx),
		classify:    classify,
		beforeRetry: func(h http.Header) { signature = w.signer.setHeaders(h, id, body) },
	}
	if debugEnabled(w.log) { // else a delivery spares the hook's allocation
		c.onAttempt = func(c *httpCall, err error) {
			if ev := w.log.Debug(); ev.Enabled() {
				ev.Str("webhook_id", id).Int("attempt", c.attempts).Int("status", c.status).
					Dur("duration", time.Since(c.started)).AnErr("error", err).Msg("webhook attempt")
			}
		}
	}
	resp, err := w.http.do(req, c)
	var snippet string
	if resp != nil {
		if b := drainBody(resp); len(b) > 0 {
			snippet = w.snippet(b, signature)
		}
	}
	o := w.outcome(ctx, c, resp, snippet, err)
	if ev := w.log.Debug(); ev.Enabled() {
		ev.Str("webhook_id", id).Int("attempts", o.Attempts).Int("status", o.Status).
			AnErr("error", o.Err).Msg("webhook delivery")
	}
	return o
}

// debugEnabled tells whether log writes debug lines.
func debugEnabled(log zerolog.Logger) bool {
	return log.GetLevel() <= zerolog.DebugLevel && zerolog.GlobalLevel() <= zerolog.DebugLevel
}

// Headers a delivery sets besides the ExtraHeaders; their values share one
// backing array.
const (
	hdrContentType = iota
	hdrUserAgent
	hdrWebhookID
	hdrTimestamp
	hdrSignature
	hdrTraceparent
	webhookHeaders
)

// request returns the request of a delivery of events under ctx, whose
// webhook-id is id, with body, signed (its signature, "" when unsigned, is
// returned too): the ExtraHeaders of ctx, then ours, which win. The URL was
// parsed once, by NewWebhook: the request has a copy of it; as
// http.NewRequest would, it drops an empty port.
func (w *Webhook) request(ctx context.Context, id string, events []*decode.Event, body []byte) (*retryablehttp.Request, string) {
	extra := ExtraHeaders(ctx)
	h := make(http.Header, len(extra)+webhookHeaders)
	for _, x := range extra {
		h.Set(x.Key, x.Value)
	}
	v := new([webhookHeaders]string)
	set := func(key string, i int, value string) { v[i] = value; h[key] = v[i : i+1 : i+1] }
	set("Content-Type", hdrContentType, "application/json")
	set("User-Agent", hdrUserAgent, w.userAgent)
	set("Webhook-Id", hdrWebhookID, id)
	if len(events) == 1 && events[0].Traceparent != "" && validHeaderValue(events[0].Traceparent) {
		set("Traceparent", hdrTraceparent, events[0].Traceparent)
	}
	ts, sig := w.signer.stamp(id, body)
	set("Webhook-Timestamp", hdrTimestamp, ts)
	if w.signer != nil {
		set("Webhook-Signature", hdrSignature, sig)
	}
	u := *w.url
	hreq := http.Request{
		Method:     http.MethodPost,
		URL:        &u,
		Proto:      "HTTP/1.1",
		ProtoMajor: 1,
		ProtoMinor: 1,
		Header:     h,
		Host:       u.Host,
	}
	// FromRequest of a request without a body, and SetBody of a []byte,
	// cannot fail.
	req, _ := retryablehttp.FromRequest(hreq.WithContext(ctx))
	_ = req.SetBody(body)
	return req, sig
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

// outcome turns what the call returned into an Outcome; resp, when not nil,
// is drained and closed already, snippet the start of its body.
func (w *Webhook) outcome(ctx context.Context, c *httpCall, resp *http.Response, snippet string, err error) Outcome {
	o := Outcome{Attempts: c.attempts, Status: c.status, RetryAfter: c.retryAfter}
	if resp != nil {
		o.Status = resp.StatusCode
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
			o.Err = fmt.Errorf("post webhook %s: giving up after %d attempt(s): %w", w.redacted, o.Attempts, attemptErr(ctx, w.http.timeout, err))
		}
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
	return o
}

// snippet makes a short, printable excerpt of a response body, scrubbed of
// anything secret the receiver may have echoed back: the signature sent, the
// secrets, the URL's credentials and query.
func (w *Webhook) snippet(b []byte, signature string) string {
	s := string(b)
	for sig := range strings.FieldsSeq(signature) {
		s = strings.ReplaceAll(s, strings.TrimPrefix(sig, "v1,"), redacted)
	}
	return printable(w.scrub.Replace(s))
}
