package sink

import (
	"bytes"
	"context"
	"crypto/sha1" //nolint:gosec // UUIDv5 is defined over SHA-1; no security property rests on it
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/rs/zerolog"

	"github.com/outboxd/outboxd/decode"
)

// Defaults applied by PostHogConfig.Validate.
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
	// AllowPrivate allows loopback, private, link-local and other non-public
	// destinations (a self-hosted PostHog on a private network). Default
	// false: such addresses are refused.
	AllowPrivate bool
	// UserAgent is the User-Agent header. Default "outboxd".
	UserAgent string
}

// Validate fills in defaults and checks c. Errors name the offending field and
// never contain the API key.
func (c *PostHogConfig) Validate() error {
	if c.Name == "" {
		c.Name = DefaultPostHogName
	}
	if c.Host == "" {
		c.Host = DefaultPostHogHost
	}
	if c.Timeout == 0 {
		c.Timeout = DefaultTimeout
	}
	if c.UserAgent == "" {
		c.UserAgent = DefaultWebhookUserAgent
	}
	var errs []error
	bad := func(field, format string, args ...any) {
		errs = append(errs, fmt.Errorf("posthog sink %q: %s: %s", c.Name, field, fmt.Sprintf(format, args...)))
	}
	if _, err := posthogEndpoint(c.Host); err != nil {
		bad("Host", "%v", err)
	}
	if strings.TrimSpace(c.APIKey) == "" {
		bad("APIKey", "required: the project API key")
	} else if !validHeaderValue(c.APIKey) {
		bad("APIKey", "must not contain CR, LF or NUL")
	}
	if c.Timeout < 0 {
		bad("Timeout", "must be positive, got %s", c.Timeout)
	}
	if !validHeaderValue(c.UserAgent) {
		bad("UserAgent", "must not contain CR, LF or NUL")
	}
	validateRetry(&c.MaxAttempts, &c.BackoffMin, &c.BackoffMax, bad)
	return errors.Join(errs...)
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
	redacted  string
	apiKey    string
	userAgent string
	timeout   time.Duration
	policy    retryPolicy
	transport *http.Transport
	client    *http.Client
	scrub     *strings.Replacer
	log       zerolog.Logger
	// keyRefused is set while PostHog refuses the key (401/403), so that
	// it is logged once per outage.
	keyRefused atomic.Bool
}

var _ Sink = (*PostHog)(nil)

// NewPostHog validates cfg and returns a PostHog sink.
func NewPostHog(cfg PostHogConfig, log zerolog.Logger) (*PostHog, error) {
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
		redacted:  redactURL(u),
		apiKey:    cfg.APIKey,
		userAgent: cfg.UserAgent,
		timeout:   cfg.Timeout,
		policy:    retryPolicy{maxAttempts: cfg.MaxAttempts, backoffMin: cfg.BackoffMin, backoffMax: cfg.BackoffMax},
		scrub:     strings.NewReplacer(cfg.APIKey, redacted),
	}
	p.log = log.With().Str("component", "sink").Str("sink", cfg.Name).Str("url", p.redacted).Logger()
	p.transport = newGuardedTransport(cfg.Timeout, DefaultWebhookMaxIdleConns, cfg.AllowPrivate)
	p.client = &http.Client{
		Transport: p.transport,
		Timeout:   cfg.Timeout,
		CheckRedirect: func(*http.Request, []*http.Request) error {
			return http.ErrUseLastResponse // a 3xx is a permanent failure, never followed
		},
	}
	return p, nil
}

// Name returns the sink name.
func (p *PostHog) Name() string { return p.name }

// Close closes idle keep-alive connections.
func (p *PostHog) Close() { p.transport.CloseIdleConnections() }

// Deliver sends the events in one /batch/ request, retried in memory.
func (p *PostHog) Deliver(ctx context.Context, events []*decode.Event) []Outcome {
	if len(events) == 0 {
		return []Outcome{}
	}
	// Events are converted once; one whose body is not a JSON object fails
	// permanently by itself, and the others go on.
	items := make([]json.RawMessage, len(events))
	historical := make([]bool, len(events))
	var rejected []error
	for i, ev := range events {
		if ev == nil {
			continue
		}
		historical[i] = ev.Historical
		item, err := posthogEvent(ev)
		if err == nil && len(item) > posthogMaxEventBytes {
			err = fmt.Errorf("event of %d bytes is over PostHog's limit of %d bytes per event (PostHog would drop it after accepting it)", len(item), posthogMaxEventBytes)
		}
		if err != nil {
			if rejected == nil {
				rejected = make([]error, len(events))
			}
			rejected[i] = err
			continue
		}
		items[i] = item
	}
	return deliverEach(ctx, p.policy, "post posthog batch "+p.redacted, events, rejected, func(ctx context.Context, pending []int) attemptResult {
		res := attemptResult{errs: make([]error, len(pending))}
		p.sendChunks(ctx, items, historical, pending, 0, &res)
		return res
	})
}

// PostHog's limits: it drops an event over about 1 MB (after answering 2xx)
// and refuses a request body over its batch limit (413).
const (
	posthogMaxEventBytes = 1_000_000
	posthogMaxBatchBytes = 16 << 20 // below the 20 MB the capture API takes
)

// sendChunks posts the events at pending[from:] in order, in requests of at
// most posthogMaxBatchBytes, and fills res.errs. A chunk answered 413 is
// split in two and sent again, down to single events (then permanent). After
// a chunk that failed otherwise, the events behind it are not sent
// (errNotSent), so that they never overtake it.
func (p *PostHog) sendChunks(ctx context.Context, items []json.RawMessage, historical []bool, pending []int, from int, res *attemptResult) {
	for start := from; start < len(pending); {
		end, size := start, 0
		for end < len(pending) && (end == start || size+len(items[pending[end]])+1 <= posthogMaxBatchBytes) {
			size += len(items[pending[end]]) + 1
			end++
		}
		if !p.sendChunk(ctx, items, historical, pending[start:end], res.errs[start:end], res) {
			for j := end; j < len(pending); j++ {
				res.errs[j] = errNotSent
			}
			return
		}
		start = end
	}
}

// sendChunk posts one chunk (splitting it on 413) and reports whether all of
// it was acknowledged.
func (p *PostHog) sendChunk(ctx context.Context, items []json.RawMessage, historical []bool, chunk []int, errs []error, res *attemptResult) bool {
	batch := make([]json.RawMessage, len(chunk))
	old := true
	for j, i := range chunk {
		batch[j] = items[i]
		old = old && historical[i]
	}
	status, retryAfter, err := p.post(ctx, batch, old)
	res.status = status
	if retryAfter > 0 {
		res.retryAfter = retryAfter
	}
	if status == http.StatusRequestEntityTooLarge && len(chunk) > 1 {
		half := len(chunk) / 2
		p.log.Info().Int("events", len(chunk)).Msg("posthog refused the batch as too large (413): sending it in two")
		if !p.sendChunk(ctx, items, historical, chunk[:half], errs[:half], res) {
			for j := half; j < len(chunk); j++ {
				errs[j] = errNotSent
			}
			return false
		}
		return p.sendChunk(ctx, items, historical, chunk[half:], errs[half:], res)
	}
	for j := range errs {
		errs[j] = err
	}
	return err == nil
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

// post makes one attempt: one request, classified.
func (p *PostHog) post(ctx context.Context, batch []json.RawMessage, historical bool) (status int, retryAfter time.Duration, err error) {
	body, err := json.Marshal(posthogBatch{APIKey: p.apiKey, Batch: batch, HistoricalMigration: historical})
	if err != nil {
		return 0, 0, fmt.Errorf("%w: encode batch: %w", ErrPermanent, err)
	}
	actx, cancel := context.WithTimeout(ctx, p.timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(actx, http.MethodPost, p.endpoint, bytes.NewReader(body))
	if err != nil {
		return 0, 0, fmt.Errorf("%w: build request: %w", ErrPermanent, cleanErr(err))
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("User-Agent", p.userAgent)
	started := time.Now()
	resp, err := p.client.Do(req)
	if err != nil {
		err = cleanErr(err)
		p.log.Debug().Int("events", len(batch)).Dur("duration", time.Since(started)).AnErr("error", err).Msg("posthog attempt")
		if errors.Is(err, ErrForbiddenAddress) {
			return 0, 0, fmt.Errorf("%w: %w", ErrPermanent, err)
		}
		return 0, 0, attemptErr(ctx, p.timeout, err)
	}
	snippet := p.finish(resp)
	status = resp.StatusCode
	if ra, ok := parseRetryAfter(resp.Header.Get("Retry-After"), time.Now()); ok {
		retryAfter = ra
	}
	p.log.Debug().Int("events", len(batch)).Int("status", status).Dur("duration", time.Since(started)).Msg("posthog attempt")
	switch classify(status) {
	case statusOK:
		p.keyRefused.Store(false)
		return status, retryAfter, nil
	case statusRetryable:
		return status, retryAfter, fmt.Errorf("status %d%s", status, quote(snippet))
	default: // PostHog has no 410 meaning: it is permanent like other 4xx
		if status == http.StatusUnauthorized || status == http.StatusForbidden {
			// A wrong key (or an EU key on the US host) refuses every
			// event alike: parking them until it is fixed loses nothing,
			// dead-lettering would dead-letter the whole stream.
			if !p.keyRefused.Swap(true) {
				p.log.Error().Int("status", status).Msg("PostHog refused the project API key: check POSTHOG_PROJECT_API_KEY and POSTHOG_HOST (an EU project's key is refused on the US host); deliveries park until it is fixed")
			}
			return status, retryAfter, fmt.Errorf("status %d: the project API key was refused%s", status, quote(snippet))
		}
		if status >= 300 && status < 400 {
			return status, retryAfter, fmt.Errorf("%w: status %d: redirects are not followed", ErrPermanent, status)
		}
		return status, retryAfter, fmt.Errorf("%w: status %d%s", ErrPermanent, status, quote(snippet))
	}
}

// finish drains and closes resp's body and returns, for a non-2xx answer, a
// short printable excerpt with the API key scrubbed out.
func (p *PostHog) finish(resp *http.Response) string {
	defer resp.Body.Close()
	body := io.LimitReader(resp.Body, maxDrain)
	if resp.StatusCode >= 200 && resp.StatusCode < 300 {
		_, _ = io.Copy(io.Discard, body)
		return ""
	}
	buf := make([]byte, snippetRead)
	n, _ := io.ReadFull(body, buf)
	_, _ = io.Copy(io.Discard, body)
	s := p.scrub.Replace(string(buf[:n]))
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

// posthogEvent converts ev to one PostHog event (see PostHog).
func posthogEvent(ev *decode.Event) (json.RawMessage, error) {
	var env posthogEnvelope
	if err := json.Unmarshal(ev.Body, &env); err != nil {
		return nil, fmt.Errorf("decode envelope: %w", err)
	}
	props := map[string]json.RawMessage{}
	if isJSONObject(env.Properties) {
		if err := json.Unmarshal(env.Properties, &props); err != nil {
			return nil, fmt.Errorf("decode properties: %w", err)
		}
	} else if len(env.Properties) > 0 && !bytes.Equal(env.Properties, jsonNull) {
		// A json or text column may hold something else than an object.
		props["properties"] = env.Properties
	}
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
	return json.Marshal(item)
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
