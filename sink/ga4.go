package sink

import (
	"bytes"
	"cmp"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/hashicorp/go-retryablehttp"
	"github.com/rs/zerolog"

	"github.com/outboxd/outboxd/decode"
)

// Defaults of GA4Config.
const (
	DefaultGA4Name     = "ga4"
	DefaultGA4Endpoint = "https://www.google-analytics.com"
	// GA4EndpointEU is the endpoint that collects in the EU.
	GA4EndpointEU = "https://region1.google-analytics.com"
)

// GA4's Measurement Protocol limits, checked before anything is sent: GA4
// answers 2xx to a request it then drops, in part or in whole, so an event
// over a limit would be marked processed and lost without a word.
const (
	ga4MaxEventsPerRequest = 25
	ga4MaxParams           = 25
	ga4MaxNameLen          = 40
	ga4MaxStringLen        = 100
	ga4MaxUserIDLen        = 256
	ga4MaxBodyBytes        = 130_000
	ga4MaxAge              = 72 * time.Hour
)

// ga4ReservedEvents are the event names GA4 keeps for itself.
var ga4ReservedEvents = []string{
	"ad_activeview", "ad_click", "ad_exposure", "ad_query", "ad_reward", "adunit_exposure",
	"app_clear_data", "app_exception", "app_install", "app_remove", "app_store_refund",
	"app_update", "app_upgrade", "dynamic_link_app_open", "dynamic_link_app_update",
	"dynamic_link_first_open", "error", "first_open", "first_visit", "in_app_purchase",
	"notification_dismiss", "notification_foreground", "notification_open",
	"notification_receive", "notification_send", "os_update", "session_start", "user_engagement",
}

// ga4ReservedPrefixes start no event name and no parameter name.
var ga4ReservedPrefixes = []string{"_", "firebase_", "ga_", "google_", "gtag."}

// ga4NameRE is GA4's rule for event and parameter names: a letter, then
// letters, digits and underscores, 40 characters in all.
var ga4NameRE = regexp.MustCompile(`^[A-Za-z][A-Za-z0-9_]*$`)

// ga4MeasurementIDRE is the form of a web stream's measurement id.
var ga4MeasurementIDRE = regexp.MustCompile(`^G-[A-Z0-9]+$`)

// GA4Config configures a GA4 (Google Analytics 4 Measurement Protocol) sink.
type GA4Config struct {
	// Name is the sink name used in logs, metrics and dead letters.
	// Default "ga4".
	Name string
	// Endpoint is the collection host, http or https, without a path:
	// Default "https://www.google-analytics.com"; GA4EndpointEU collects
	// in the EU. Events go to Endpoint/mp/collect, validation requests to
	// Endpoint/debug/mp/collect.
	Endpoint string
	// MeasurementID is the web stream's measurement id, G-XXXXXXX. Required.
	MeasurementID string
	// APISecret is the stream's Measurement Protocol API secret. It never
	// appears in logs or errors. Required.
	APISecret string
	// ClientIDProperty, when set, is the key of the event property that
	// holds the GA client id (the _ga cookie's id, say "ga_client_id"):
	// used as client_id when it is a non-empty string or a number, and not
	// sent as a parameter.
	ClientIDProperty string
	// ClientIDKey keys the pseudonymous client ids made for events without
	// one (see GA4). Default: APISecret, so that rotating the secret
	// changes every made-up client id; set it to keep them stable.
	ClientIDKey string
	// Now is the clock the 72-hour limit is checked against. Default
	// time.Now.
	Now func() time.Time
	// HTTPConfig holds the attempt timeout, the retry budget, the address
	// guard, the pool and the user agent.
	HTTPConfig
}

// WithDefaults returns a copy of c with the defaults filled in.
func (c GA4Config) WithDefaults() GA4Config {
	c.HTTPConfig = c.HTTPConfig.withDefaults()
	c.Name = cmp.Or(c.Name, DefaultGA4Name)
	c.Endpoint = cmp.Or(c.Endpoint, DefaultGA4Endpoint)
	c.ClientIDKey = cmp.Or(c.ClientIDKey, c.APISecret)
	if c.Now == nil {
		c.Now = time.Now
	}
	return c
}

// Validate checks c with its defaults (WithDefaults) and changes nothing.
// Errors name the offending field and never contain the API secret or the
// client id key.
func (c GA4Config) Validate() error {
	c = c.WithDefaults()
	var v fieldCheck
	switch {
	case strings.TrimSpace(c.MeasurementID) == "":
		v.bad("MeasurementID", "required: the web stream's measurement id, G-XXXXXXXXXX")
	case !ga4MeasurementIDRE.MatchString(c.MeasurementID):
		v.bad("MeasurementID", "%q is not a measurement id: want G- then capital letters and digits", c.MeasurementID)
	}
	switch {
	case strings.TrimSpace(c.APISecret) == "":
		v.bad("APISecret", "required: the stream's Measurement Protocol API secret")
	case !validHeaderValue(c.APISecret) || strings.ContainsAny(c.APISecret, " \t"):
		v.bad("APISecret", "must not contain spaces, CR, LF or NUL")
	}
	if _, err := ga4Endpoint(c.Endpoint); err != nil {
		v.bad("Endpoint", "%v", err)
	}
	c.HTTPConfig.validate(v.bad)
	return v.err("ga4", c.Name)
}

// ga4Endpoint returns the host URL of endpoint, without a path. Its errors
// do not repeat the endpoint.
func ga4Endpoint(endpoint string) (*url.URL, error) {
	u, err := parseWebhookURL(endpoint)
	if err != nil {
		return nil, err
	}
	if u.User != nil || u.RawQuery != "" || u.Fragment != "" {
		return nil, errors.New("must be scheme://host[:port], without credentials or query")
	}
	// An endpoint given with the collection path is taken as the host.
	p := strings.TrimSuffix(u.Path, "/")
	p = strings.TrimSuffix(strings.TrimSuffix(p, "/mp/collect"), "/debug")
	u.Path, u.RawPath = strings.TrimSuffix(p, "/"), ""
	return u, nil
}

// GA4 is a Sink that sends events to the GA4 Measurement Protocol
// (POST /mp/collect?measurement_id=…&api_secret=…) and acknowledges them once
// GA4 answered 2xx. Each event becomes one GA4 event:
//
//	{"client_id": see below, "user_id": user_id as a string (absent when NULL),
//	 "timestamp_micros": occurred_at of the request's first event, in µs,
//	 "events": [{"name": event_name,
//	             "timestamp_micros": the event's occurred_at, in µs,
//	             "params": {...scalar properties...,
//	                        "organization_id", "entity_type", "entity_id",
//	                        "correlation_id", "source", "schema_version",
//	                        "outboxd_event_id"}}]}
//
// client_id is the ClientIDProperty property when the event has it;
// otherwise a pseudonymous id: the hex of the first 16 bytes of
// HMAC-SHA256(ClientIDKey, "outboxd-ga4-client-id\x00" + organization_id +
// "\x00" + user_id) (decimal, "" for NULL) when the event has a user or an
// organization, HMAC-SHA256(ClientIDKey, "outboxd-ga4-client-id\x00event\x00"
// + message id) otherwise. It is stable, never the raw user id, and cannot be
// reversed without the key.
//
// Parameters: a property whose value is a string or a number is sent as it
// is, true and false as the strings "true" and "false"; null, object and
// array values are not sent (GA4 parameters are scalars). The envelope
// parameters win over properties of the same name; a NULL envelope field is
// not sent. engagement_time_msec and session_id are not set: they only feed
// GA4's realtime and session reports, which server-side events have no part
// in.
//
// GA4 takes one client_id and user_id per request: a request carries a run
// of at most 25 consecutive events of the call with the same client_id and
// user_id (and at most 130 kB), so a call's requests keep its order. They
// are sent one after the other; once one cannot be settled (its budget ran
// out, ctx ended), the ones behind it are not sent.
//
// An event over one of GA4's limits fails permanently without being sent,
// with the rule and the value in the error: the event name (at most 40
// letters, digits and underscores, starting with a letter, not reserved, no
// reserved prefix), parameter names (the same rules), at most 25 parameters,
// string values of at most 100 characters, user_id of at most 256
// characters, occurred_at at most 72 hours before now.
//
// 2xx acknowledges; 408, 425, 429, 5xx and transport errors are retried,
// honouring Retry-After; other answers (3xx included, 410 too) are
// permanent, as is a destination address refused by the guard. The API
// secret travels in the URL's query, which no error or log line shows.
type GA4 struct {
	name         string
	collect      string // the /mp/collect URL, secret included: never shown
	debug        string // the /debug/mp/collect URL, secret included
	what         string // the action, in errors: "post ga4 <url without query>"
	userAgent    string
	clientIDProp string
	clientIDKey  []byte
	now          func() time.Time
	http         *httpClient
	scrub        *strings.Replacer
	log          zerolog.Logger
}

var _ Sink = (*GA4)(nil)

// NewGA4 validates cfg, with its defaults, and returns a GA4 sink.
func NewGA4(cfg GA4Config, log zerolog.Logger) (*GA4, error) {
	cfg = cfg.WithDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	u, err := ga4Endpoint(cfg.Endpoint)
	if err != nil {
		return nil, fmt.Errorf("ga4 sink %q: Endpoint: %w", cfg.Name, err)
	}
	q := url.Values{"measurement_id": {cfg.MeasurementID}, "api_secret": {cfg.APISecret}}.Encode()
	collect, debug := *u, *u
	collect.Path += "/mp/collect"
	debug.Path += "/debug/mp/collect"
	g := &GA4{
		name:         cfg.Name,
		what:         "post ga4 " + redactURL(&collect),
		userAgent:    cfg.UserAgent,
		clientIDProp: cfg.ClientIDProperty,
		clientIDKey:  []byte(cfg.ClientIDKey),
		now:          cfg.Now,
		http:         newHTTPClient(cfg.HTTPConfig),
		// The secret as sent (query-escaped) and as given.
		scrub: strings.NewReplacer(cfg.APISecret, redacted, url.QueryEscape(cfg.APISecret), redacted),
	}
	collect.RawQuery, debug.RawQuery = q, q
	g.collect, g.debug = collect.String(), debug.String()
	g.log = log.With().Str("component", "sink").Str("sink", cfg.Name).Str("url", redactURL(&collect)).Logger()
	return g, nil
}

// Name returns the sink name.
func (g *GA4) Name() string { return g.name }

// Close closes idle keep-alive connections.
func (g *GA4) Close() { g.http.closeIdle() }

// GA4Request is one Measurement Protocol request a GA4 sink sends.
type GA4Request struct {
	// Body is the JSON body.
	Body []byte
	// Events are the indexes, in the events given to Plan, of the events
	// the request carries, in order.
	Events []int
}

// GA4Plan is what a GA4 sink makes of a list of events: the requests it
// sends, and the events it refuses.
type GA4Plan struct {
	// Requests are the requests, in the order they are sent.
	Requests []GA4Request
	// Rejected holds, per event, the GA4 limit it breaks (the event is not
	// sent and fails permanently); nil for an event that is sent.
	Rejected []error
	// Dropped lists, per event, the properties not sent as parameters
	// (null, object or array values), sorted.
	Dropped [][]string
}

// ga4Item is one event converted: its request fields and its GA4 event.
type ga4Item struct {
	clientID string
	userID   string // "" for none
	micros   int64  // 0 for no occurred_at
	event    json.RawMessage
	dropped  []string
}

// Plan converts events to the requests Deliver would send them in, with the
// limit each refused event breaks. Nil events are refused.
func (g *GA4) Plan(events []*decode.Event) GA4Plan {
	p := GA4Plan{Rejected: make([]error, len(events)), Dropped: make([][]string, len(events))}
	items := make([]*ga4Item, len(events))
	for i, ev := range events {
		if ev == nil {
			p.Rejected[i] = fmt.Errorf("event %d is nil", i)
			continue
		}
		it, err := g.convert(ev)
		if err != nil {
			p.Rejected[i] = err
			continue
		}
		items[i] = it
		p.Dropped[i] = it.dropped
	}
	// Runs of consecutive events (refused ones skipped) of one client_id and
	// user_id, of at most 25 events and ga4MaxBodyBytes.
	var cur []int
	size := 0
	flush := func() {
		if len(cur) == 0 {
			return
		}
		p.Requests = append(p.Requests, GA4Request{Body: ga4Body(items, cur), Events: cur})
		cur, size = nil, 0
	}
	for i, it := range items {
		if it == nil {
			continue
		}
		if len(cur) > 0 {
			first := items[cur[0]]
			if first.clientID != it.clientID || first.userID != it.userID ||
				len(cur) == ga4MaxEventsPerRequest || size+len(it.event)+1 > ga4MaxBodyBytes-ga4EnvelopeBytes(first) {
				flush()
			}
		}
		cur = append(cur, i)
		size += len(it.event) + 1
	}
	flush()
	return p
}

// ga4RequestBody is the body of a Measurement Protocol request.
type ga4RequestBody struct {
	ClientID        string            `json:"client_id"`
	UserID          string            `json:"user_id,omitempty"`
	TimestampMicros int64             `json:"timestamp_micros,omitempty"`
	Events          []json.RawMessage `json:"events"`
}

// ga4EnvelopeBytes bounds the size of a request body without its events.
func ga4EnvelopeBytes(first *ga4Item) int {
	return 80 + len(first.clientID)*6 + len(first.userID)*6
}

func ga4Body(items []*ga4Item, idx []int) []byte {
	first := items[idx[0]]
	b := ga4RequestBody{ClientID: first.clientID, UserID: first.userID, TimestampMicros: first.micros,
		Events: make([]json.RawMessage, len(idx))}
	for j, i := range idx {
		b.Events[j] = items[i].event
	}
	return mustJSON(b)
}

// ga4Event is one event of a request.
type ga4Event struct {
	Name            string                     `json:"name"`
	TimestampMicros int64                      `json:"timestamp_micros,omitempty"`
	Params          map[string]json.RawMessage `json:"params"`
}

// ga4Envelope is the part of the outbox envelope a GA4 event is made of.
type ga4Envelope struct {
	EventName     *string         `json:"event_name"`
	OccurredAt    *string         `json:"occurred_at"`
	UserID        json.RawMessage `json:"user_id"`
	EntityType    json.RawMessage `json:"entity_type"`
	EntityID      json.RawMessage `json:"entity_id"`
	CorrelationID json.RawMessage `json:"correlation_id"`
	Source        json.RawMessage `json:"source"`
	SchemaVersion json.RawMessage `json:"schema_version"`
	Properties    json.RawMessage `json:"properties"`
}

// convert makes ev a GA4 event, or says which limit it breaks.
func (g *GA4) convert(ev *decode.Event) (*ga4Item, error) {
	var env ga4Envelope
	if err := json.Unmarshal(ev.Body, &env); err != nil {
		return nil, fmt.Errorf("decode envelope: %w", err)
	}
	name := ev.Name
	if env.EventName != nil {
		name = *env.EventName
	}
	if err := ga4CheckName("event name", name, true); err != nil {
		return nil, err
	}
	it := &ga4Item{}
	at := ev.OccurredAt
	if at.IsZero() && env.OccurredAt != nil {
		if t, err := time.Parse(time.RFC3339Nano, *env.OccurredAt); err == nil {
			at = t
		}
	}
	if !at.IsZero() {
		now := g.now()
		if age := now.Sub(at); age > ga4MaxAge {
			return nil, fmt.Errorf("GA4 limit: occurred_at %s is %s before now, over the 72h GA4 accepts",
				at.UTC().Format(time.RFC3339Nano), age.Round(time.Second))
		}
		it.micros = at.UnixMicro()
	}

	props := map[string]json.RawMessage{}
	if isJSONObject(env.Properties) {
		if err := json.Unmarshal(env.Properties, &props); err != nil {
			return nil, fmt.Errorf("decode properties: %w", err)
		}
	}
	if g.clientIDProp != "" {
		if raw, ok := props[g.clientIDProp]; ok {
			it.clientID = jsonScalarString(raw)
			delete(props, g.clientIDProp)
		}
	}
	it.userID = jsonScalarString(env.UserID)
	if n := utf8.RuneCountInString(it.userID); n > ga4MaxUserIDLen {
		return nil, fmt.Errorf("GA4 limit: user_id is %d characters, over the %d GA4 accepts", n, ga4MaxUserIDLen)
	}
	if it.clientID == "" {
		it.clientID = g.pseudonymousClientID(ev, it.userID)
	}

	params := make(map[string]json.RawMessage, len(props)+7)
	for k, v := range props {
		switch scalar, ok := ga4Scalar(v); {
		case !ok:
			it.dropped = append(it.dropped, k)
		default:
			params[k] = scalar
		}
	}
	slices.Sort(it.dropped)
	if ev.HasOrganization {
		params["organization_id"] = json.RawMessage(strconv.FormatInt(ev.OrganizationID, 10))
	} else {
		delete(params, "organization_id")
	}
	for k, v := range map[string]json.RawMessage{
		"entity_type": env.EntityType, "entity_id": env.EntityID, "correlation_id": env.CorrelationID,
		"source": env.Source, "schema_version": env.SchemaVersion,
	} {
		if scalar, ok := ga4Scalar(v); ok {
			params[k] = scalar
		} else {
			delete(params, k) // a NULL envelope field is not sent, nor a property in its place
		}
	}
	params["outboxd_event_id"] = json.RawMessage(strconv.FormatInt(ev.ID, 10))
	if err := ga4CheckParams(params); err != nil {
		return nil, err
	}
	event, err := json.Marshal(ga4Event{Name: name, TimestampMicros: it.micros, Params: params})
	if err != nil {
		return nil, fmt.Errorf("encode event: %w", err)
	}
	if len(event)+ga4EnvelopeBytes(it) > ga4MaxBodyBytes {
		return nil, fmt.Errorf("GA4 limit: event of %d bytes is over the %d bytes of a request", len(event), ga4MaxBodyBytes)
	}
	it.event = event
	return it, nil
}

// pseudonymousClientID is the client_id of an event without one (see GA4).
func (g *GA4) pseudonymousClientID(ev *decode.Event, userID string) string {
	m := hmac.New(sha256.New, g.clientIDKey)
	m.Write([]byte("outboxd-ga4-client-id\x00"))
	if ev.HasOrganization || userID != "" {
		if ev.HasOrganization {
			m.Write(strconv.AppendInt(nil, ev.OrganizationID, 10))
		}
		m.Write([]byte{0})
		m.Write([]byte(userID))
	} else {
		m.Write([]byte("event\x00"))
		m.Write([]byte(ev.MessageID))
	}
	return hex.EncodeToString(m.Sum(nil)[:16])
}

// ga4Scalar returns v as a GA4 parameter value: strings and numbers as they
// are, booleans as strings; ok is false for null, objects, arrays and
// nothing.
func ga4Scalar(v json.RawMessage) (json.RawMessage, bool) {
	v = bytes.TrimSpace(v)
	if len(v) == 0 {
		return nil, false
	}
	switch c := v[0]; {
	case c == '"' || c == '-' || '0' <= c && c <= '9':
		return v, true
	case bytes.Equal(v, []byte("true")):
		return json.RawMessage(`"true"`), true
	case bytes.Equal(v, []byte("false")):
		return json.RawMessage(`"false"`), true
	}
	return nil, false
}

// ga4CheckName checks an event or parameter name against GA4's rules; what
// says which ("event name", "parameter name").
func ga4CheckName(what, name string, event bool) error {
	for _, p := range ga4ReservedPrefixes {
		if strings.HasPrefix(name, p) {
			return fmt.Errorf("GA4 limit: %s %q starts with the reserved prefix %q", what, name, p)
		}
	}
	switch {
	case name == "":
		return fmt.Errorf("GA4 limit: %s is empty", what)
	case !ga4NameRE.MatchString(name):
		return fmt.Errorf("GA4 limit: %s %q must start with a letter and have only letters, digits and underscores", what, name)
	case len(name) > ga4MaxNameLen: // ASCII by now: bytes are characters
		return fmt.Errorf("GA4 limit: %s %q is %d characters, over the %d GA4 accepts", what, name, len(name), ga4MaxNameLen)
	case event && slices.Contains(ga4ReservedEvents, name):
		return fmt.Errorf("GA4 limit: event name %q is reserved by GA4", name)
	}
	return nil
}

// ga4CheckParams checks the parameters of one event against GA4's limits,
// in name order so that the error is the same on every delivery.
func ga4CheckParams(params map[string]json.RawMessage) error {
	if len(params) > ga4MaxParams {
		return fmt.Errorf("GA4 limit: %d parameters, over the %d GA4 accepts per event (outboxd adds up to 7 of its own)", len(params), ga4MaxParams)
	}
	names := make([]string, 0, len(params))
	for k := range params {
		names = append(names, k)
	}
	slices.Sort(names)
	for _, k := range names {
		if err := ga4CheckName("parameter name", k, false); err != nil {
			return err
		}
		v := params[k]
		if len(v) == 0 || v[0] != '"' {
			continue
		}
		var s string
		if err := json.Unmarshal(v, &s); err != nil {
			return fmt.Errorf("parameter %q: %w", k, err)
		}
		if n := utf8.RuneCountInString(s); n > ga4MaxStringLen {
			return fmt.Errorf("GA4 limit: parameter %q is a string of %d characters, over the %d GA4 accepts", k, n, ga4MaxStringLen)
		}
	}
	return nil
}

// Deliver sends the events in the requests Plan makes, in order, each
// retried in memory.
func (g *GA4) Deliver(ctx context.Context, events []*decode.Event) []Outcome {
	if len(events) == 0 {
		return []Outcome{}
	}
	plan := g.Plan(events)
	c := &ga4Call{g: g, out: make([]Outcome, len(events)), maxAttempts: g.http.policy.limit(ctx), round: 1}
	for i, err := range plan.Rejected {
		if err == nil {
			continue
		}
		id := int64(i)
		if events[i] != nil {
			id = events[i].ID
		}
		c.out[i].Err = fmt.Errorf("%s: %w: event %d: %w", g.what, ErrPermanent, id, err)
	}
	if err := ctx.Err(); err != nil {
		for _, r := range plan.Requests {
			for _, i := range r.Events {
				c.out[i].Err = fmt.Errorf("%s: %w", g.what, err)
			}
		}
		return c.out
	}
	for k, r := range plan.Requests {
		if !c.send(ctx, r) {
			for _, later := range plan.Requests[k+1:] {
				c.notSent(ctx, later.Events)
			}
			break
		}
	}
	return c.out
}

// ga4Call is the state of one Deliver call. As for PostHog, its attempt
// budget is the call's: a request retried k times spends k-1 rounds of it.
type ga4Call struct {
	g           *GA4
	out         []Outcome
	maxAttempts int
	round       int
}

// notSent fails the events an earlier failure held back.
func (c *ga4Call) notSent(ctx context.Context, events []int) {
	for _, i := range events {
		if err := ctx.Err(); err != nil {
			c.out[i].Err = fmt.Errorf("%s: stopped after %d attempt(s): %w", c.g.what, c.out[i].Attempts, err)
		} else {
			c.out[i].Err = fmt.Errorf("%s: giving up after %d attempt(s): %w", c.g.what, c.out[i].Attempts, errNotSent)
		}
	}
}

// send posts one request and sets its events' outcomes. It reports whether
// the requests behind it may be sent: false when the budget ran out or ctx
// ended.
func (c *ga4Call) send(ctx context.Context, r GA4Request) bool {
	g := c.g
	call, resp, snippet, err := g.post(ctx, g.collect, r.Body, len(r.Events), max(c.maxAttempts-c.round+1, 1))
	if call.attempts > 0 {
		c.round += call.attempts - 1
		for _, i := range r.Events {
			c.out[i].Attempts = call.attempts
			c.out[i].Status = call.status
			c.out[i].RetryAfter = call.retryAfter
		}
	}
	var fail func(attempts int) error
	goOn := true
	switch {
	case err != nil && ctx.Err() != nil:
		fail = func(n int) error {
			return fmt.Errorf("%s: stopped after %d attempt(s)%s: %w", g.what, n, lastStatus(call.status), ctx.Err())
		}
		goOn = false
	case errors.Is(err, ErrPermanent):
		fail = func(int) error { return fmt.Errorf("%s: %w", g.what, err) }
	case errors.Is(err, ErrForbiddenAddress):
		fail = func(int) error { return fmt.Errorf("%s: %w: %w", g.what, ErrPermanent, err) }
	case err != nil:
		err = attemptErr(ctx, g.http.timeout, err)
		fail = func(n int) error { return fmt.Errorf("%s: giving up after %d attempt(s): %w", g.what, n, err) }
		goOn = false
	default:
		status := resp.StatusCode
		switch classifyGA4(status) {
		case statusOK:
		case statusRetryable:
			fail = func(n int) error {
				return fmt.Errorf("%s: giving up after %d attempt(s): status %d%s", g.what, n, status, quote(snippet))
			}
			goOn = false
		default:
			perm := fmt.Errorf("%w: status %d%s", ErrPermanent, status, quote(snippet))
			if status >= 300 && status < 400 {
				perm = fmt.Errorf("%w: status %d: redirects are not followed", ErrPermanent, status)
			}
			fail = func(int) error { return fmt.Errorf("%s: %w", g.what, perm) }
		}
	}
	for _, i := range r.Events {
		c.out[i].Err = nil
		if fail != nil {
			c.out[i].Err = fail(c.out[i].Attempts)
		}
	}
	return goOn
}

// classifyGA4 sorts GA4's answers: the shared classification, except that
// 410 has no meaning of its own (ErrGone disables a subscription's
// endpoint): permanent like other 4xx.
func classifyGA4(status int) statusClass {
	if c := classify(status); c != statusGone {
		return c
	}
	return statusPermanent
}

// post sends body to target (the collection or the validation URL), retried
// in memory up to maxAttempts, and returns the call, the last response
// (drained and closed) with the scrubbed start of its body, or the error
// that ended the call, which never holds the URL's query.
func (g *GA4) post(ctx context.Context, target string, body []byte, events, maxAttempts int) (*httpCall, *http.Response, string, error) {
	return g.postRead(ctx, target, body, events, maxAttempts, nil)
}

// postRead is post, handing a 2xx response's body (up to maxDrain) to read
// when read is set.
func (g *GA4) postRead(ctx context.Context, target string, body []byte, events, maxAttempts int, read func([]byte)) (*httpCall, *http.Response, string, error) {
	call := &httpCall{
		maxAttempts: maxAttempts,
		classify:    classifyGA4,
		onAttempt: func(c *httpCall, err error) {
			if err != nil {
				g.log.Debug().Int("events", events).Dur("duration", time.Since(c.started)).Str("error", g.scrub.Replace(err.Error())).Msg("ga4 attempt")
				return
			}
			g.log.Debug().Int("events", events).Int("status", c.status).Dur("duration", time.Since(c.started)).Msg("ga4 attempt")
		},
	}
	req, err := retryablehttp.NewRequestWithContext(ctx, http.MethodPost, target, body)
	if err != nil {
		return call, nil, "", fmt.Errorf("%w: build request: %s", ErrPermanent, g.scrub.Replace(cleanErr(err).Error()))
	}
	for _, h := range ExtraHeaders(ctx) { // the destination's own headers (OUTBOXD_GA4_HEADERS); ours win
		req.Header.Set(h.Key, h.Value)
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("User-Agent", g.userAgent)
	resp, err := g.http.do(req, call)
	var snippet string
	if resp != nil {
		if read != nil && resp.StatusCode >= 200 && resp.StatusCode < 300 {
			b, _ := readAll(resp)
			read(b)
		} else {
			snippet = printable(g.scrub.Replace(string(drainBody(resp))))
		}
	}
	// cleanErr drops net/http's *url.Error, whose text is the whole URL,
	// api_secret included.
	return call, resp, snippet, cleanErr(err)
}

// readAll reads (up to maxDrain) and closes resp's body.
func readAll(resp *http.Response) ([]byte, error) {
	defer resp.Body.Close()
	var buf bytes.Buffer
	_, err := buf.ReadFrom(io.LimitReader(resp.Body, maxDrain))
	return buf.Bytes(), err
}

// GA4Message is one validation message of GA4's validation server, for the
// events of a request.
type GA4Message struct {
	// Event is the index, in the request's Events, of the event the message
	// is about; -1 when it is about the request.
	Event          int    `json:"-"`
	FieldPath      string `json:"fieldPath"`
	Description    string `json:"description"`
	ValidationCode string `json:"validationCode"`
}

// ga4EventIndexRE finds the event a validation message is about: a field
// path "events[3].params" or a description "Event at index: [3] …".
var ga4EventIndexRE = regexp.MustCompile(`(?:events\[|index: \[)(\d+)\]`)

// Debug sends r to GA4's validation server (/debug/mp/collect on the same
// host), which records nothing, and returns its validation messages. An
// error is a request that failed (after the retry budget) or an answer that
// is not a validation response; it never holds the API secret.
func (g *GA4) Debug(ctx context.Context, r GA4Request) ([]GA4Message, error) {
	var raw []byte
	_, resp, snippet, err := g.postRead(ctx, g.debug, r.Body, len(r.Events), g.http.policy.limit(ctx), func(b []byte) { raw = b })
	if err != nil {
		return nil, fmt.Errorf("post ga4 validation request: %w", err)
	}
	if resp.StatusCode < 200 || resp.StatusCode >= 300 {
		return nil, fmt.Errorf("post ga4 validation request: status %d%s", resp.StatusCode, quote(snippet))
	}
	var answer struct {
		ValidationMessages []GA4Message `json:"validationMessages"`
	}
	if err := json.Unmarshal(raw, &answer); err != nil {
		return nil, fmt.Errorf("ga4 validation answer: %w", err)
	}
	for i := range answer.ValidationMessages {
		m := &answer.ValidationMessages[i]
		m.Event = -1
		if sub := ga4EventIndexRE.FindStringSubmatch(m.FieldPath + " " + m.Description); sub != nil {
			if n, err := strconv.Atoi(sub[1]); err == nil && n < len(r.Events) {
				m.Event = n
			}
		}
	}
	return answer.ValidationMessages, nil
}
