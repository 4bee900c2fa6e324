package sink

import (
	"bytes"
	"cmp"
	"context"
	"crypto/sha1" //nolint:gosec // UUIDv5 is defined over SHA-1; no security property rests on it
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-retryablehttp"
	"github.com/rs/zerolog"

	"github.com/outboxd/outboxd/decode"
)

// Defaults of PostHogConfig.
const (
	DefaultPostHogName = "posthog"
	DefaultPostHogHost = "https://us.i.posthog.com"
)

// PostHogConfig configures a PostHog sink.
type PostHogConfig struct {
	// Name is the sink name used in logs, metrics and dead letters.
	// Default "posthog".
	Name string
	// Host is the PostHog ingestion host, http or https. Default
	// "https://us.i.posthog.com".
	Host string
	// APIKey is the project API key. It never appears in logs or errors.
	// Required.
	APIKey string
	// PersonProperties are property keys whose values an event with a
	// user_id also sets on the person ("$set"): PostHog person properties
	// from the events the application already writes.
	PersonProperties []string
	// GroupIdentify sends a "$groupidentify" event for each organization
	// this process has not identified yet (and again whenever an event
	// carries GroupProperties), so that PostHog knows the organization group
	// and its properties, not only events pointing at it.
	GroupIdentify bool
	// GroupProperties are property keys whose values are set on the
	// organization group ("$group_set" of a "$groupidentify" sent before the
	// event). Setting any implies GroupIdentify.
	GroupProperties []string
	// HTTPConfig holds the attempt timeout, the retry budget, the address
	// guard (AllowPrivate: a self-hosted PostHog on a private network), the
	// pool and the user agent.
	HTTPConfig
}

// WithDefaults returns a copy of c with the defaults filled in.
func (c PostHogConfig) WithDefaults() PostHogConfig {
	c.HTTPConfig = c.HTTPConfig.withDefaults()
	c.Name = cmp.Or(c.Name, DefaultPostHogName)
	c.Host = cmp.Or(c.Host, DefaultPostHogHost)
	return c
}

// Validate checks c with its defaults (WithDefaults) and changes nothing.
// Errors name the offending field and never contain the API key.
func (c PostHogConfig) Validate() error {
	c = c.WithDefaults()
	var v fieldCheck
	switch {
	case strings.TrimSpace(c.APIKey) == "":
		v.bad("APIKey", "required: the project API key")
	case !validHeaderValue(c.APIKey):
		v.bad("APIKey", "must not contain CR, LF or NUL")
	}
	for field, keys := range map[string][]string{"PersonProperties": c.PersonProperties, "GroupProperties": c.GroupProperties} {
		for _, k := range keys {
			if strings.TrimSpace(k) == "" || strings.HasPrefix(k, "$") {
				v.bad(field, "%q is not a property key (empty, or a PostHog $ key)", k)
			}
		}
	}
	if _, err := posthogEndpoint(c.Host); err != nil {
		v.bad("Host", "%v", err)
	}
	c.HTTPConfig.validate(v.bad)
	return v.err("posthog", c.Name)
}

// posthogEndpoint returns the /batch/ URL of host. Its errors do not repeat
// the host.
func posthogEndpoint(host string) (*url.URL, error) {
	u, err := parseWebhookURL(host)
	if err != nil {
		return nil, err
	}
	if u.User != nil || u.RawQuery != "" || u.Fragment != "" {
		return nil, errors.New("must be scheme://host[:port][/path], without credentials or query")
	}
	// A host given with the endpoint itself ("…/batch/") is taken as the
	// host: posting to …/batch/batch/ would be refused.
	u.Path = strings.TrimSuffix(strings.TrimSuffix(strings.TrimSuffix(u.Path, "/"), "/batch"), "/") + "/batch/"
	u.RawPath = ""
	return u, nil
}

// PostHog is a Sink that sends events to PostHog's /batch/ capture API, all
// events of one Deliver call in one request, and acknowledges them only once
// PostHog answered 2xx: a row is marked processed only after PostHog accepted
// it. Each event becomes
//
//	{"event": event_name, "distinct_id": user_id as a string,
//	 "uuid": a UUIDv5 of the event's message id (stable, so PostHog
//	         deduplicates redeliveries; unique across outboxes),
//	 "timestamp": occurred_at,
//	 "properties": {...the event's properties...,
//	     "$groups": {"organization": "<organization_id>"},
//	     "entity_type", "entity_id", "correlation_id", "source",
//	     "schema_version", "outboxd_event_id": id}}
//
// An event without user_id gets distinct_id "org_<organization_id>" (or
// "event_<id>" without organization either) and "$process_person_profile":
// false, so that no person profile is made up for it. The outboxd keys win
// over event properties of the same name.
//
// 2xx acknowledges; 408, 429, 5xx, 401, 403 (a key refused: every event
// alike) and transport errors are retried, honouring Retry-After; other
// answers (3xx included: redirects are not followed) are permanent, as is a
// destination address refused by the guard (see AllowPrivate). An event over
// PostHog's 1 MB limit fails permanently without being sent; a call's events
// go in requests of at most 16 MB, and a request answered 413 is split. The API key travels in the body only and never appears in
// an error or a log line.
type PostHog struct {
	name      string
	endpoint  string
	what      string // the action, in errors: "post posthog batch <url>"
	apiKey    string
	userAgent string
	http      *httpClient
	scrub     *strings.Replacer
	log       zerolog.Logger
	// keyRefused is set while PostHog refuses the key (401/403), so that
	// it is logged once per outage.
	keyRefused atomic.Bool

	person, group []string
	groupIdentify bool
	// identified are the organizations whose "$groupidentify" PostHog
	// acknowledged; bounded (forgotten wholesale beyond maxIdentified,
	// which only costs a repeated, idempotent identify).
	identifiedMu sync.Mutex
	identified   map[string]struct{}
}

// maxIdentified bounds the organizations a PostHog sink remembers having
// identified.
const maxIdentified = 100_000

var _ Sink = (*PostHog)(nil)

// NewPostHog validates cfg, with its defaults, and returns a PostHog sink.
func NewPostHog(cfg PostHogConfig, log zerolog.Logger) (*PostHog, error) {
	cfg = cfg.WithDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	u, err := posthogEndpoint(cfg.Host)
	if err != nil {
		return nil, fmt.Errorf("posthog sink %q: Host: %w", cfg.Name, err)
	}
	p := &PostHog{
		name:      cfg.Name,
		endpoint:  u.String(),
		what:      "post posthog batch " + redactURL(u),
		apiKey:    cfg.APIKey,
		userAgent: cfg.UserAgent,
		http:      newHTTPClient(cfg.HTTPConfig),
		scrub:     strings.NewReplacer(cfg.APIKey, redacted),
		person:    cfg.PersonProperties, group: cfg.GroupProperties,
		groupIdentify: cfg.GroupIdentify || len(cfg.GroupProperties) > 0,
		identified:    map[string]struct{}{},
	}
	p.log = log.With().Str("component", "sink").Str("sink", cfg.Name).Str("url", redactURL(u)).Logger()
	return p, nil
}

// Name returns the sink name.
func (p *PostHog) Name() string { return p.name }

// Close closes idle keep-alive connections.
func (p *PostHog) Close() { p.http.closeIdle() }

// PostHog's limits: it drops an event over about 1 MB (after answering 2xx)
// and refuses a request body over its batch limit (413).
const (
	posthogMaxEventBytes = 1_000_000
	posthogMaxBatchBytes = 16 << 20 // below the 20 MB the capture API takes
)

// Deliver sends the events in /batch/ requests of at most
// posthogMaxBatchBytes, in order, each retried in memory.
func (p *PostHog) Deliver(ctx context.Context, events []*decode.Event) []Outcome {
	if len(events) == 0 {
		return []Outcome{}
	}
	c := &posthogCall{
		p: p, out: make([]Outcome, len(events)), items: make([]json.RawMessage, len(events)),
		historical: make([]bool, len(events)), lastRound: make([]int, len(events)),
		identify: make([]json.RawMessage, len(events)), org: make([]string, len(events)),
		maxAttempts: p.http.policy.limit(ctx), round: 1,
	}
	// Events are converted once; one whose body is not a JSON object fails
	// permanently by itself, and the others go on.
	pending := make([]int, 0, len(events))
	for i, ev := range events {
		if ev == nil {
			c.out[i].Err = fmt.Errorf("%s: %w: event %d is nil", p.what, ErrPermanent, i)
			continue
		}
		item, identify, err := p.convert(ev)
		if err == nil && len(item) > posthogMaxEventBytes {
			err = fmt.Errorf("event of %d bytes is over PostHog's limit of %d bytes per event (PostHog would drop it after accepting it)", len(item), posthogMaxEventBytes)
		}
		if err != nil {
			c.out[i].Err = fmt.Errorf("%s: %w: event %d: %w", p.what, ErrPermanent, ev.ID, err)
			continue
		}
		c.items[i], c.historical[i] = item, ev.Historical
		if identify != nil {
			// The organization's identify goes just before the event, in
			// the same request: acknowledged together.
			c.identify[i], c.org[i] = identify, strconv.FormatInt(ev.OrganizationID, 10)
		}
		pending = append(pending, i)
	}
	if err := ctx.Err(); err != nil {
		for _, i := range pending {
			c.out[i].Err = fmt.Errorf("%s: %w", p.what, err)
		}
		return c.out
	}
	c.sendChunks(ctx, pending)
	return c.out
}

// posthogCall is the state of one Deliver call. Its attempt budget is the
// call's, as if all its requests were one attempt loop: a round is one
// attempt at each event still pending, and a request retried k times spends
// k-1 rounds of the budget. An event's Attempts counts the rounds in which
// it was sent (a batch split after a 413 is sent again in the same round).
type posthogCall struct {
	p          *PostHog
	out        []Outcome
	items      []json.RawMessage
	historical []bool
	// identify is the "$groupidentify" sent before each event, nil for
	// none; org is the organization it identifies.
	identify    []json.RawMessage
	org         []string
	lastRound   []int // the last round in which each event was sent, 0 for none
	maxAttempts int
	round       int // the current round, from 1
}

// sendChunks posts the events at pending in order, in requests of at most
// posthogMaxBatchBytes. When a request cannot be settled (its budget ran
// out, or ctx ended), the events behind it are not sent, so that they never
// overtake it.
func (c *posthogCall) sendChunks(ctx context.Context, pending []int) {
	for start := 0; start < len(pending); {
		end, size := start, 0
		for end < len(pending) && (end == start || size+c.size(pending[end]) <= posthogMaxBatchBytes) {
			size += c.size(pending[end])
			end++
		}
		if !c.sendChunk(ctx, pending[start:end]) {
			c.notSent(ctx, pending[end:])
			return
		}
		start = end
	}
}

// size is the bytes event i adds to a batch, its identify included.
func (c *posthogCall) size(i int) int {
	n := len(c.items[i]) + 1
	if c.identify[i] != nil {
		n += len(c.identify[i]) + 1
	}
	return n
}

// notSent fails the events an earlier failure held back.
func (c *posthogCall) notSent(ctx context.Context, events []int) {
	for _, i := range events {
		if err := ctx.Err(); err != nil {
			c.out[i].Err = fmt.Errorf("%s: stopped after %d attempt(s): %w", c.p.what, c.out[i].Attempts, err)
		} else {
			c.out[i].Err = fmt.Errorf("%s: giving up after %d attempt(s): %w", c.p.what, c.out[i].Attempts, errNotSent)
		}
	}
}

// sendChunk posts one chunk, splitting it on 413, and sets its events'
// outcomes. It reports whether the events behind it may be sent: false when
// the budget ran out or ctx ended.
func (c *posthogCall) sendChunk(ctx context.Context, chunk []int) bool {
	batch := make([]json.RawMessage, 0, len(chunk))
	old := true
	for _, i := range chunk {
		if c.identify[i] != nil {
			batch = append(batch, c.identify[i])
		}
		batch = append(batch, c.items[i])
		old = old && c.historical[i]
	}
	first := c.round
	call, resp, snippet, err := c.p.post(ctx, batch, old, c.maxAttempts-c.round+1)
	if call.attempts > 0 {
		c.round += call.attempts - 1
		for _, i := range chunk {
			from := max(first, c.lastRound[i]+1)
			c.out[i].Attempts += c.round - from + 1
			c.lastRound[i] = c.round
			c.out[i].Status = call.status
			if call.retryAfter > 0 {
				c.out[i].RetryAfter = call.retryAfter
			}
		}
	}
	if err == nil && resp.StatusCode == http.StatusRequestEntityTooLarge && len(chunk) > 1 {
		half := len(chunk) / 2
		c.p.log.Info().Int("events", len(chunk)).Msg("posthog refused the batch as too large (413): sending it in two")
		if !c.sendChunk(ctx, chunk[:half]) {
			c.notSent(ctx, chunk[half:])
			return false
		}
		return c.sendChunk(ctx, chunk[half:])
	}
	var fail func(attempts int) error // the error of each event, nil when acknowledged
	goOn := true
	switch {
	case err != nil && ctx.Err() != nil:
		fail = func(n int) error {
			return fmt.Errorf("%s: stopped after %d attempt(s)%s: %w", c.p.what, n, lastStatus(call.status), ctx.Err())
		}
		goOn = false
	case errors.Is(err, ErrPermanent):
		fail = func(int) error { return fmt.Errorf("%s: %w", c.p.what, err) }
	case errors.Is(err, ErrForbiddenAddress):
		fail = func(int) error { return fmt.Errorf("%s: %w: %w", c.p.what, ErrPermanent, err) }
	case err != nil:
		err = attemptErr(ctx, c.p.http.timeout, err)
		fail = func(n int) error { return fmt.Errorf("%s: giving up after %d attempt(s): %w", c.p.what, n, err) }
		goOn = false
	default:
		status := resp.StatusCode
		switch classifyPostHog(status) {
		case statusOK:
		case statusRetryable:
			reason := fmt.Sprintf("status %d%s", status, quote(snippet))
			if status == http.StatusUnauthorized || status == http.StatusForbidden {
				reason = fmt.Sprintf("status %d: the project API key was refused%s", status, quote(snippet))
			}
			fail = func(n int) error { return fmt.Errorf("%s: giving up after %d attempt(s): %s", c.p.what, n, reason) }
			goOn = false
		default:
			perm := fmt.Errorf("%w: status %d%s", ErrPermanent, status, quote(snippet))
			if status >= 300 && status < 400 {
				perm = fmt.Errorf("%w: status %d: redirects are not followed", ErrPermanent, status)
			}
			fail = func(int) error { return fmt.Errorf("%s: %w", c.p.what, perm) }
		}
	}
	for _, i := range chunk {
		c.out[i].Err = nil
		if fail != nil {
			c.out[i].Err = fail(c.out[i].Attempts)
		} else if c.identify[i] != nil {
			c.p.identifiedOrg(c.org[i])
		}
	}
	return goOn
}

// classifyPostHog sorts PostHog's answers: 401 and 403 (the key refused:
// every event alike, so parking them until it is fixed loses nothing, where
// dead-lettering would dead-letter the whole stream) are retryable, and 410
// has no meaning of its own: permanent like other 4xx.
func classifyPostHog(status int) statusClass {
	switch c := classify(status); {
	case status == http.StatusUnauthorized || status == http.StatusForbidden:
		return statusRetryable
	case c == statusGone:
		return statusPermanent
	default:
		return c
	}
}

// posthogBatch is the body of a /batch/ request.
type posthogBatch struct {
	APIKey string            `json:"api_key"`
	Batch  []json.RawMessage `json:"batch"`
	// HistoricalMigration sends the batch through PostHog's pipeline for
	// old events: set when every event of it was read from the table
	// (catch-up, replay) rather than streamed.
	HistoricalMigration bool `json:"historical_migration,omitempty"`
}

// post sends one /batch/ request, retried in memory up to maxAttempts, and
// returns the call, the last response (drained and closed) with the scrubbed
// start of its body, or the error that ended the call.
func (p *PostHog) post(ctx context.Context, batch []json.RawMessage, historical bool, maxAttempts int) (*httpCall, *http.Response, string, error) {
	call := &httpCall{
		maxAttempts: maxAttempts,
		classify:    classifyPostHog,
		onAttempt: func(c *httpCall, err error) {
			switch {
			case err != nil:
				p.log.Debug().Int("events", len(batch)).Dur("duration", time.Since(c.started)).AnErr("error", err).Msg("posthog attempt")
				return
			case c.status == http.StatusUnauthorized || c.status == http.StatusForbidden:
				if !p.keyRefused.Swap(true) {
					p.log.Error().Int("status", c.status).Msg("PostHog refused the project API key: check POSTHOG_PROJECT_API_KEY and POSTHOG_HOST (an EU project's key is refused on the US host); deliveries park until it is fixed")
				}
			case classifyPostHog(c.status) == statusOK:
				p.keyRefused.Store(false)
			}
			p.log.Debug().Int("events", len(batch)).Int("status", c.status).Dur("duration", time.Since(c.started)).Msg("posthog attempt")
		},
	}
	body, err := json.Marshal(posthogBatch{APIKey: p.apiKey, Batch: batch, HistoricalMigration: historical})
	if err != nil {
		return call, nil, "", fmt.Errorf("%w: encode batch: %w", ErrPermanent, err)
	}
	req, err := retryablehttp.NewRequestWithContext(ctx, http.MethodPost, p.endpoint, body)
	if err != nil {
		return call, nil, "", fmt.Errorf("%w: build request: %w", ErrPermanent, cleanErr(err))
	}
	for _, h := range ExtraHeaders(ctx) { // the destination's own headers (OUTBOXD_POSTHOG_HEADERS); ours win
		req.Header.Set(h.Key, h.Value)
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("User-Agent", p.userAgent)
	resp, err := p.http.do(req, call)
	var snippet string
	if resp != nil {
		snippet = printable(p.scrub.Replace(string(drainBody(resp))))
	}
	return call, resp, snippet, cleanErr(err)
}

// posthogEnvelope is the part of the outbox envelope a PostHog event is made
// of; values stay raw JSON so that numbers and nulls pass through unchanged.
type posthogEnvelope struct {
	EventName     *string         `json:"event_name"`
	OccurredAt    json.RawMessage `json:"occurred_at"`
	UserID        json.RawMessage `json:"user_id"`
	EntityType    json.RawMessage `json:"entity_type"`
	EntityID      json.RawMessage `json:"entity_id"`
	CorrelationID json.RawMessage `json:"correlation_id"`
	Source        json.RawMessage `json:"source"`
	SchemaVersion json.RawMessage `json:"schema_version"`
	Properties    json.RawMessage `json:"properties"`
}

// posthogItem is one event of a /batch/ request.
type posthogItem struct {
	Event      string                     `json:"event"`
	DistinctID string                     `json:"distinct_id"`
	UUID       string                     `json:"uuid"`
	Timestamp  json.RawMessage            `json:"timestamp,omitempty"`
	Properties map[string]json.RawMessage `json:"properties"`
}

var jsonNull = json.RawMessage("null")

// convert converts ev to its PostHog event (see PostHog and
// PersonProperties) and, when its organization is to be identified (see
// GroupIdentify), the "$groupidentify" to send before it.
func (p *PostHog) convert(ev *decode.Event) (item, identify json.RawMessage, err error) {
	item, props, err := posthogEvent(ev, p.person)
	if err != nil || !p.groupIdentify || !ev.HasOrganization {
		return item, nil, err
	}
	org := strconv.FormatInt(ev.OrganizationID, 10)
	set := pick(props, p.group)
	if len(set) == 0 && p.wasIdentified(org) {
		return item, nil, nil
	}
	gi := posthogItem{Event: "$groupidentify", DistinctID: "org_" + org,
		UUID: EventUUID(messageID(ev) + "/$groupidentify"), Properties: map[string]json.RawMessage{
			"$group_type": json.RawMessage(`"organization"`), "$group_key": mustJSON(org),
			"$group_set": mustJSON(set), "$process_person_profile": json.RawMessage("false"),
		}}
	var t posthogItem
	if json.Unmarshal(item, &t) == nil && len(t.Timestamp) > 0 {
		gi.Timestamp = t.Timestamp
	}
	identify, err = json.Marshal(gi)
	return item, identify, err
}

// pick returns the members of props named by keys (absent ones skipped).
func pick(props map[string]json.RawMessage, keys []string) map[string]json.RawMessage {
	out := map[string]json.RawMessage{}
	for _, k := range keys {
		if v, ok := props[k]; ok {
			out[k] = v
		}
	}
	return out
}

func (p *PostHog) wasIdentified(org string) bool {
	p.identifiedMu.Lock()
	defer p.identifiedMu.Unlock()
	_, ok := p.identified[org]
	return ok
}

// identifiedOrg records that PostHog acknowledged org's identify.
func (p *PostHog) identifiedOrg(org string) {
	p.identifiedMu.Lock()
	defer p.identifiedMu.Unlock()
	if len(p.identified) >= maxIdentified {
		clear(p.identified)
	}
	p.identified[org] = struct{}{}
}

// posthogEvent converts ev to one PostHog event (see PostHog), with the
// values of the person keys of its properties in "$set" when it has a
// user; it returns the event's own properties too.
func posthogEvent(ev *decode.Event, person []string) (json.RawMessage, map[string]json.RawMessage, error) {
	var env posthogEnvelope
	if err := json.Unmarshal(ev.Body, &env); err != nil {
		return nil, nil, fmt.Errorf("decode envelope: %w", err)
	}
	props := map[string]json.RawMessage{}
	if isJSONObject(env.Properties) {
		if err := json.Unmarshal(env.Properties, &props); err != nil {
			return nil, nil, fmt.Errorf("decode properties: %w", err)
		}
	} else if len(env.Properties) > 0 && !bytes.Equal(env.Properties, jsonNull) {
		// A json or text column may hold something else than an object.
		props["properties"] = env.Properties
	}
	own := maps.Clone(props)
	name := ev.Name
	if env.EventName != nil {
		name = *env.EventName
	}
	item := posthogItem{Event: name, UUID: EventUUID(messageID(ev)), Properties: props}
	if len(env.OccurredAt) > 0 && !bytes.Equal(env.OccurredAt, jsonNull) {
		item.Timestamp = env.OccurredAt
	}
	org := ""
	if ev.HasOrganization {
		org = strconv.FormatInt(ev.OrganizationID, 10)
		props["$groups"] = mustJSON(map[string]string{"organization": org})
	}
	switch user := jsonScalarString(env.UserID); {
	case user != "":
		item.DistinctID = user
		if set := pick(own, person); len(set) > 0 {
			props["$set"] = mustJSON(set)
		}
	case org != "":
		item.DistinctID = "org_" + org
		props["$process_person_profile"] = json.RawMessage("false")
	default:
		item.DistinctID = "event_" + strconv.FormatInt(ev.ID, 10)
		props["$process_person_profile"] = json.RawMessage("false")
	}
	for k, v := range map[string]json.RawMessage{
		"entity_type":    env.EntityType,
		"entity_id":      env.EntityID,
		"correlation_id": env.CorrelationID,
		"source":         env.Source,
		"schema_version": env.SchemaVersion,
	} {
		if len(v) == 0 {
			v = jsonNull
		}
		props[k] = v
	}
	props["outboxd_event_id"] = json.RawMessage(strconv.FormatInt(ev.ID, 10))
	b, err := json.Marshal(item)
	return b, own, err
}

func isJSONObject(b json.RawMessage) bool {
	b = bytes.TrimSpace(b)
	return len(b) > 0 && b[0] == '{'
}

// jsonScalarString returns a JSON string's value or a number's text; "" for
// null, absent or anything else.
func jsonScalarString(b json.RawMessage) string {
	b = bytes.TrimSpace(b)
	if len(b) == 0 {
		return ""
	}
	switch {
	case b[0] == '"':
		var s string
		if json.Unmarshal(b, &s) == nil {
			return s
		}
	case b[0] == '-' || '0' <= b[0] && b[0] <= '9':
		return string(b)
	}
	return ""
}

func mustJSON(v any) json.RawMessage {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err)
	}
	return b
}

// eventUUIDNamespace is the UUIDv5 namespace of message ids: a fixed, random
// UUID that belongs to outboxd.
var eventUUIDNamespace = [16]byte{
	0x6f, 0x7a, 0x2c, 0x1e, 0x8b, 0x43, 0x4d, 0x0a,
	0x9c, 0x5e, 0x31, 0xf2, 0x64, 0xa8, 0x0d, 0x57,
}

// EventUUID returns the UUID a PostHog event carries for the event with
// message id messageID (decode.Event.MessageID): a version-5 (SHA-1, RFC 9562
// §5.5) UUID of the message id in a fixed namespace, the same on every
// delivery so that PostHog can deduplicate, and as unique as the message id.
func EventUUID(messageID string) string {
	h := sha1.New() //nolint:gosec // see import
	h.Write(eventUUIDNamespace[:])
	h.Write([]byte(messageID))
	var u [16]byte
	copy(u[:], h.Sum(nil))
	u[6] = u[6]&0x0f | 0x50 // version 5
	u[8] = u[8]&0x3f | 0x80 // variant 10 (RFC 9562)
	var s [36]byte
	hex.Encode(s[0:8], u[0:4])
	s[8] = '-'
	hex.Encode(s[9:13], u[4:6])
	s[13] = '-'
	hex.Encode(s[14:18], u[6:8])
	s[18] = '-'
	hex.Encode(s[19:23], u[8:10])
	s[23] = '-'
	hex.Encode(s[24:36], u[10:16])
	return string(s[:])
}
