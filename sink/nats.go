package sink

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"net/url"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"

	"github.com/outboxd/outboxd/decode"
)

// DefaultNATSName is the default name of a NATS sink.
const DefaultNATSName = "nats"

// NATSConfig configures a NATS JetStream sink.
type NATSConfig struct {
	// Name is the sink name used in logs, metrics and dead letters.
	// Default "nats".
	Name string
	// URL is the server URL, or a comma-separated list of them
	// (nats://host:4222). Credentials in it never appear in logs or errors.
	// Required.
	URL string
	// Subject is the subject messages are published to, or a template over
	// the event name: each "{event_name}" is replaced by event_name with every
	// character other than letters, digits, '_' and '-' replaced by '_' ("_"
	// for an empty name). Required.
	Subject string
	// Stream, when set, is a stream that must capture the subjects: at start
	// it is created if missing, with the subject pattern of Subject
	// ("{event_name}" tokens become "*"); an existing stream is left as it
	// is. Empty: the streams are managed elsewhere.
	Stream string
	// CredsFile is a NATS credentials file (JWT and NKey seed), optional.
	CredsFile string
	// Timeout bounds connecting at start and each publish attempt, up to
	// its PubAck. Default 10s.
	Timeout time.Duration
	// RetryConfig is the retry budget of one Deliver call, per event.
	RetryConfig
}

// WithDefaults returns a copy of c with the defaults filled in.
func (c NATSConfig) WithDefaults() NATSConfig {
	c.Name = cmp.Or(c.Name, DefaultNATSName)
	c.Timeout = cmp.Or(c.Timeout, DefaultTimeout)
	c.RetryConfig = c.RetryConfig.withDefaults()
	return c
}

// Validate checks c with its defaults (WithDefaults) and changes nothing.
// Errors name the offending field and never contain the URL's credentials.
func (c NATSConfig) Validate() error {
	c = c.WithDefaults()
	var v fieldCheck
	if strings.TrimSpace(c.URL) == "" {
		v.bad("URL", "required: nats://host:4222")
	} else {
		for _, u := range strings.Split(c.URL, ",") {
			if _, err := redactNATSURL(u); err != nil {
				v.bad("URL", "%v", err)
				break
			}
		}
	}
	if t, err := parseTemplate(c.Subject, validSubjectByte); err != nil {
		v.bad("Subject", "%v", err)
	} else if err := checkSubject(t.expand("x")); err != nil {
		v.bad("Subject", "%v", err)
	}
	if c.Stream != "" && strings.ContainsAny(c.Stream, " \t\r\n.*>/\\") {
		v.bad("Stream", "%q may not contain whitespace, '.', '*', '>', '/' or '\\'", c.Stream)
	}
	if c.Timeout < 0 {
		v.bad("Timeout", "must be positive, got %s", c.Timeout)
	}
	c.RetryConfig.validate(v.bad)
	return v.err("nats", c.Name)
}

// redactNATSURL returns scheme://host of one server URL, without userinfo.
func redactNATSURL(raw string) (string, error) {
	raw = strings.TrimSpace(raw)
	if !strings.Contains(raw, "://") {
		raw = "nats://" + raw
	}
	u, err := url.Parse(raw)
	if err != nil || u.Host == "" {
		return "", errors.New("must be nats://host:port, or a comma-separated list of them")
	}
	return u.Scheme + "://" + u.Host, nil
}

// NATS is a Sink that publishes each event to JetStream and waits for its
// PubAck. The message carries the envelope, Nats-Msg-Id = the event's
// message id (decode.Event.MessageID: the stream drops a redelivery within its
// duplicate window, and never an event of another outbox, or a new event
// that reuses a row id, as one), and the headers outboxd-message-id (the same
// id), outboxd-event-id (the row id), outboxd-event-name, Content-Type,
// traceparent (when the event has one) and those added with WithHeader.
//
// The events of one Deliver call are published one after the other, in order;
// after a retryable failure the rest of the call waits for the next attempt,
// so that no event of a key lands before an earlier one. Timeouts, lost
// connections, a subject no stream captures and 5xx API errors are retryable;
// a message larger than the maximum payload and other 4xx API errors are
// permanent.
type NATS struct {
	name     string
	subject  template
	timeout  time.Duration
	policy   retryPolicy
	conn     *nats.Conn
	js       jetstream.JetStream
	redacted string
	log      zerolog.Logger
	// duplicates counts publishes JetStream acknowledged as duplicates
	// (a Nats-Msg-Id it saw within the stream's duplicate window).
	duplicates atomic.Uint64
}

var _ Sink = (*NATS)(nil)

// DuplicateCounter is a sink that knows how many deliveries its destination
// acknowledged as copies of one it already had (NATS JetStream); metrics
// export it.
type DuplicateCounter interface {
	DuplicatesAcknowledged() uint64
}

// DuplicatesAcknowledged returns how many publishes JetStream acknowledged
// as duplicates since the sink was made.
func (n *NATS) DuplicatesAcknowledged() uint64 { return n.duplicates.Load() }

// NewNATS validates cfg, connects (within cfg.Timeout and ctx) and, when
// cfg.Stream is set, makes sure the stream exists. Once connected, the
// connection reconnects for ever.
func NewNATS(ctx context.Context, cfg NATSConfig, log zerolog.Logger) (*NATS, error) {
	cfg = cfg.WithDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	subject, err := parseTemplate(cfg.Subject, validSubjectByte)
	if err != nil {
		return nil, fmt.Errorf("nats sink %q: Subject: %w", cfg.Name, err)
	}
	var hosts []string
	for _, u := range strings.Split(cfg.URL, ",") {
		h, _ := redactNATSURL(u)
		hosts = append(hosts, h)
	}
	n := &NATS{
		name:     cfg.Name,
		subject:  subject,
		timeout:  cfg.Timeout,
		policy:   cfg.RetryConfig.policy(),
		redacted: strings.Join(hosts, ","),
	}
	subject.onCollision(func(name, earlier, expanded string) {
		n.log.Warn().Str("event_name", name).Str("earlier_event_name", earlier).Str("subject", expanded).
			Msg("two event names share one subject once made valid: subscribers of it get both (tell them apart by outboxd-event-name)")
	})
	n.log = log.With().Str("component", "sink").Str("sink", cfg.Name).Str("url", n.redacted).Logger()
	opts := []nats.Option{
		nats.Name("outboxd"),
		nats.Timeout(cfg.Timeout),
		nats.MaxReconnects(-1),
		// No buffering while reconnecting: a publish then fails at once
		// (retryable) instead of waiting in a buffer for its timeout.
		nats.ReconnectBufSize(-1),
		nats.DisconnectErrHandler(func(_ *nats.Conn, err error) {
			n.log.Warn().AnErr("error", err).Msg("nats disconnected")
		}),
		nats.ReconnectHandler(func(*nats.Conn) { n.log.Info().Msg("nats reconnected") }),
		nats.ErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) {
			n.log.Warn().AnErr("error", err).Msg("nats error")
		}),
	}
	if cfg.CredsFile != "" {
		opts = append(opts, nats.UserCredentials(cfg.CredsFile))
	}
	scrub := natsScrubber(cfg.URL)
	conn, err := nats.Connect(cfg.URL, opts...)
	if err != nil {
		return nil, fmt.Errorf("nats sink %q: connect to %s: %s", cfg.Name, n.redacted, scrub.Replace(err.Error()))
	}
	n.conn = conn
	n.js, err = jetstream.New(conn)
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("nats sink %q: jetstream: %w", cfg.Name, err)
	}
	if cfg.Stream != "" {
		sctx, cancel := context.WithTimeout(ctx, cfg.Timeout)
		defer cancel()
		if err := n.ensureStream(sctx, cfg.Stream); err != nil {
			conn.Close()
			return nil, fmt.Errorf("nats sink %q: stream %q: %w", cfg.Name, cfg.Stream, err)
		}
	}
	return n, nil
}

// natsScrubber removes the passwords and tokens of a NATS URL list from text.
func natsScrubber(raw string) *strings.Replacer {
	var pairs []string
	for _, s := range strings.Split(raw, ",") {
		u, err := url.Parse(strings.TrimSpace(s))
		if err != nil || u.User == nil {
			continue
		}
		if p, ok := u.User.Password(); ok && p != "" {
			pairs = append(pairs, p, redacted)
		}
		// A token is sent as the user name; short names are common words
		// whose scrubbing would mangle the text rather than protect a secret.
		if name := u.User.Username(); len(name) >= 4 {
			pairs = append(pairs, name, redacted)
		}
	}
	return strings.NewReplacer(pairs...)
}

// ensureStream creates the stream if it does not exist.
func (n *NATS) ensureStream(ctx context.Context, name string) error {
	pattern := subjectPattern(n.subject)
	s, err := n.js.Stream(ctx, name)
	switch {
	case err == nil:
		n.log.Info().Str("stream", name).Strs("stream_subjects", s.CachedInfo().Config.Subjects).
			Str("subject_pattern", pattern).Msg("stream exists; left as it is")
		return nil
	case !errors.Is(err, jetstream.ErrStreamNotFound):
		return fmt.Errorf("look up: %w", err)
	}
	if _, err := n.js.CreateStream(ctx, jetstream.StreamConfig{Name: name, Subjects: []string{pattern}}); err != nil {
		return fmt.Errorf("create for %q: %w", pattern, err)
	}
	n.log.Info().Str("stream", name).Str("subject_pattern", pattern).Msg("stream created")
	return nil
}

// subjectPattern is the subject filter matching every expansion of t: each
// token holding a placeholder becomes "*".
func subjectPattern(t template) string {
	raw := strings.Join(t.parts, templateVar)
	tokens := strings.Split(raw, ".")
	for i, tok := range tokens {
		if strings.Contains(tok, templateVar) {
			tokens[i] = "*"
		}
	}
	return strings.Join(tokens, ".")
}

// Name returns the sink name.
func (n *NATS) Name() string { return n.name }

// Close closes the connection.
func (n *NATS) Close() { n.conn.Close() }

// Deliver publishes one message per event, in order, and waits for each
// PubAck.
func (n *NATS) Deliver(ctx context.Context, events []*decode.Event) []Outcome {
	if len(events) == 0 {
		return []Outcome{}
	}
	return deliverEach(ctx, n.policy, "publish to nats", events, n.rejected(events), func(ctx context.Context, pending []int) attemptResult {
		res := attemptResult{errs: make([]error, len(pending))}
		stopped := false
		for j, i := range pending {
			if stopped {
				res.errs[j] = fmt.Errorf("%w: an earlier event of the batch failed", errNotSent)
				continue
			}
			err := n.publish(ctx, events[i])
			res.errs[j] = err
			if err != nil && !errors.Is(err, ErrPermanent) {
				stopped = true
			}
		}
		return res
	})
}

// rejected returns, for each event whose subject is not valid, why; nil if
// all are.
func (n *NATS) rejected(events []*decode.Event) []error {
	var errs []error
	for i, ev := range events {
		if ev == nil {
			continue
		}
		if err := checkSubject(n.subject.expand(ev.Name)); err != nil {
			if errs == nil {
				errs = make([]error, len(events))
			}
			errs[i] = fmt.Errorf("subject: %w", err)
		}
	}
	return errs
}

// publish publishes ev and waits for its PubAck, for at most the timeout.
func (n *NATS) publish(ctx context.Context, ev *decode.Event) error {
	subject := n.subject.expand(ev.Name)
	id := messageID(ev)
	msg := &nats.Msg{Subject: subject, Data: ev.Body, Header: nats.Header{}}
	for _, h := range ExtraHeaders(ctx) {
		msg.Header.Set(h.Key, h.Value)
	}
	msg.Header.Set(HeaderMessageID, id)
	msg.Header.Set(HeaderEventID, strconv.FormatInt(ev.ID, 10))
	msg.Header.Set(HeaderEventName, ev.Name)
	msg.Header.Set("Content-Type", "application/json")
	if ev.Traceparent != "" && validHeaderValue(ev.Traceparent) {
		msg.Header.Set(HeaderTraceparent, ev.Traceparent)
	}
	actx, cancel := context.WithTimeout(ctx, n.timeout)
	defer cancel()
	// No retry inside the client on "no responders": Deliver retries, and
	// counts.
	ack, err := n.js.PublishMsg(actx, msg, jetstream.WithMsgID(id), jetstream.WithRetryAttempts(0))
	if err != nil {
		err = attemptErr(ctx, n.timeout, classifyNATS(err))
		n.log.Debug().Int64("event_id", ev.ID).Str("subject", subject).AnErr("error", err).Msg("nats publish")
		return fmt.Errorf("subject %s: %w", subject, err)
	}
	if ack.Duplicate {
		n.duplicates.Add(1)
	}
	if le := n.log.Debug(); le.Enabled() {
		le.Int64("event_id", ev.ID).Str("subject", subject).Str("stream", ack.Stream).
			Uint64("seq", ack.Sequence).Bool("duplicate", ack.Duplicate).Msg("nats publish")
	}
	return nil
}

// classifyNATS marks the permanent failures among publish errors.
func classifyNATS(err error) error {
	var apiErr *jetstream.APIError
	if errors.As(err, &apiErr) {
		if apiErr.ErrorCode == jetstream.JSErrCodeStreamMessageExceedsMaximum ||
			apiErr.Code == 400 || apiErr.Code == 413 {
			return fmt.Errorf("%w: %w", ErrPermanent, err)
		}
		return err
	}
	if errors.Is(err, nats.ErrMaxPayload) || errors.Is(err, nats.ErrBadSubject) {
		return fmt.Errorf("%w: %w", ErrPermanent, err)
	}
	return err
}

// checkSubject checks a subject to publish to: dot-separated non-empty
// tokens, no whitespace, no wildcard.
func checkSubject(s string) error {
	if s == "" {
		return errors.New("empty subject")
	}
	for tok := range strings.SplitSeq(s, ".") {
		if tok == "" {
			return fmt.Errorf("subject %q has an empty token", s)
		}
		if tok == "*" || tok == ">" {
			return fmt.Errorf("subject %q has a wildcard", s)
		}
	}
	for i := 0; i < len(s); i++ {
		if c := s[i]; c <= ' ' || c == 0x7f {
			return fmt.Errorf("subject %q has whitespace or a control character", s)
		}
	}
	return nil
}

// validSubjectByte is what an event name keeps in a subject.
func validSubjectByte(c byte) bool {
	return 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '_' || c == '-'
}
