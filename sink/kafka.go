package sink

import (
	"cmp"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/rs/zerolog"
	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/sasl"
	"github.com/twmb/franz-go/pkg/sasl/plain"
	"github.com/twmb/franz-go/pkg/sasl/scram"

	"github.com/outboxd/outboxd/decode"
)

// Defaults applied by KafkaConfig.Validate.
const (
	DefaultKafkaName     = "kafka"
	DefaultKafkaClientID = "outboxd"
	// DefaultKafkaMaxRecordBytes is franz-go's default batch cap, which
	// Kafka's default max.message.bytes matches.
	DefaultKafkaMaxRecordBytes = 1 << 20
)

// Record keys: which ordering key becomes the Kafka record key, so that the
// events outboxd keeps in order land in one partition and stay in order there.
// The values are those of OUTBOXD_ORDERING_KEY.
const (
	// KeyByOrganization keys records by organization_id in decimal; events
	// without one share the empty key.
	KeyByOrganization = "organization"
	// KeyByEntity keys records by "<entity_type>:<entity_id>".
	KeyByEntity = "entity"
	// KeyByNone keys records by the event id in decimal.
	KeyByNone = "none"
)

// Header names set on every Kafka record and NATS message.
const (
	// HeaderMessageID carries the event's message id
	// (decode.Event.MessageID), the same on every retry and redelivery and
	// unique across outboxes: consumers deduplicate on it.
	HeaderMessageID = "outboxd-message-id"
	// HeaderEventID carries the row id in decimal, as the body's "id". It is
	// not unique across outboxes, nor after a restarted identity or a
	// restore: do not deduplicate on it.
	HeaderEventID = "outboxd-event-id"
	// HeaderEventName carries event_name, for routing without parsing.
	HeaderEventName = "outboxd-event-name"
	// HeaderTraceparent carries the event's W3C traceparent, when it has one.
	HeaderTraceparent = "traceparent"
)

// maxKafkaTopicLen is Kafka's limit on topic names.
const maxKafkaTopicLen = 249

// KafkaConfig configures a Kafka sink.
type KafkaConfig struct {
	// Name is the sink name used in logs, metrics and dead letters.
	// Default "kafka".
	Name string
	// Brokers are the seed brokers, host:port. Required.
	Brokers []string
	// Topic is the topic records are produced to, or a template over the
	// event name: each "{event_name}" is replaced by event_name with every
	// character not valid in a topic name (letters, digits, '.', '_', '-')
	// replaced by '_' ("_" for an empty name). Required.
	Topic string
	// KeyBy selects the record key: KeyByOrganization (default),
	// KeyByEntity or KeyByNone; set it to the ordering key.
	KeyBy string
	// ClientID is the Kafka client id. Default "outboxd".
	ClientID string
	// TLS connects to the brokers with TLS (1.2 or later), trusting the
	// system roots, or TLSCAFile's when set. Setting any TLS file implies it.
	TLS bool
	// TLSCAFile is a PEM file of the CA certificates that sign the
	// brokers' certificates (a private CA).
	TLSCAFile string
	// TLSCertFile and TLSKeyFile are a PEM client certificate and its key,
	// for brokers that authenticate clients by certificate (mTLS). Both or
	// neither.
	TLSCertFile, TLSKeyFile string
	// SASLMechanism is "", "plain", "scram-sha-256" or "scram-sha-512".
	SASLMechanism string
	// SASLUser and SASLPassword are the SASL credentials; the password never
	// appears in logs or errors.
	SASLUser     string
	SASLPassword string
	// MaxRecordBytes caps a record (and a produce batch): a bigger one fails
	// permanently without being sent. Set it to the brokers' and topics'
	// max.message.bytes when they allow more. Default 1 MiB (franz-go's).
	MaxRecordBytes int
	// AllowAutoTopicCreation lets brokers configured for it create missing
	// topics on first produce. Default false: a missing topic is a retryable
	// failure until it is created.
	AllowAutoTopicCreation bool
	// Timeout bounds each attempt: from handing the records to the client to
	// the last acknowledgement. Default 10s.
	Timeout time.Duration
	// RetryConfig is the retry budget of one Deliver call, per record.
	RetryConfig
}

// WithDefaults returns a copy of c with the defaults filled in.
func (c KafkaConfig) WithDefaults() KafkaConfig {
	c.Name = cmp.Or(c.Name, DefaultKafkaName)
	c.KeyBy = cmp.Or(c.KeyBy, KeyByOrganization)
	c.ClientID = cmp.Or(c.ClientID, DefaultKafkaClientID)
	c.Timeout = cmp.Or(c.Timeout, DefaultTimeout)
	c.MaxRecordBytes = cmp.Or(c.MaxRecordBytes, DefaultKafkaMaxRecordBytes)
	c.RetryConfig = c.RetryConfig.withDefaults()
	return c
}

// Validate checks c with its defaults (WithDefaults) and changes nothing.
// Errors name the offending field and never contain the SASL password.
func (c KafkaConfig) Validate() error {
	c = c.WithDefaults()
	var v fieldCheck
	if c.MaxRecordBytes < 1024 || c.MaxRecordBytes > 1<<30 {
		v.bad("MaxRecordBytes", "must be between 1024 and 1073741824, got %d", c.MaxRecordBytes)
	}
	if len(c.Brokers) == 0 {
		v.bad("Brokers", "required: at least one host:port")
	}
	if c.tlsOn() {
		if _, field, err := kafkaTLS(c); err != nil {
			v.bad(field, "%v", err)
		}
	}
	for i, b := range c.Brokers {
		if b == "" || strings.ContainsAny(b, " /") {
			v.bad(fmt.Sprintf("Brokers[%d]", i), "%q is not host:port", b)
		}
	}
	if t, err := parseTemplate(c.Topic, validKafkaTopicByte); err != nil {
		v.bad("Topic", "%v", err)
	} else if err := checkKafkaTopic(t.expand("x")); err != nil {
		v.bad("Topic", "%v", err)
	}
	switch c.KeyBy {
	case KeyByOrganization, KeyByEntity, KeyByNone:
	default:
		v.bad("KeyBy", "%q is not organization, entity or none", c.KeyBy)
	}
	switch c.SASLMechanism {
	case "":
	case "plain", "scram-sha-256", "scram-sha-512":
		if c.SASLUser == "" {
			v.bad("SASLUser", "required with SASL mechanism %s", c.SASLMechanism)
		}
		if c.SASLPassword == "" {
			v.bad("SASLPassword", "required with SASL mechanism %s", c.SASLMechanism)
		}
	default:
		v.bad("SASLMechanism", "%q is not plain, scram-sha-256 or scram-sha-512", c.SASLMechanism)
	}
	if c.Timeout < 0 {
		v.bad("Timeout", "must be positive, got %s", c.Timeout)
	}
	c.RetryConfig.validate(v.bad)
	return v.err("kafka", c.Name)
}

// Kafka is a Sink that produces each event as one record with franz-go's
// idempotent producer and acks from all in-sync replicas: key = the ordering
// key (see KafkaConfig.KeyBy), value = the envelope, headers
// outboxd-event-id, outboxd-event-name, content-type, traceparent (when the
// event has one) and those added with WithHeader. Deliver returns once every
// record is acknowledged or has failed; each record has its own Outcome.
//
// The Deliver call owns the retries: the client is told not to retry a
// record after an answer from the broker, so each attempt is counted and
// bounded. Within one partition the client fails the records that follow a
// failed one, so a retry never lands after a later event of the same key.
// Retriable Kafka errors, timeouts and connection failures are retryable;
// MESSAGE_TOO_LARGE, RECORD_LIST_TOO_LARGE, INVALID_TOPIC_EXCEPTION,
// INVALID_RECORD, POLICY_VIOLATION and authorization or authentication
// failures are permanent.
type Kafka struct {
	name    string
	topic   template
	keyBy   string
	timeout time.Duration
	policy  retryPolicy
	client  *kgo.Client
	log     zerolog.Logger
}

var (
	_ Sink   = (*Kafka)(nil)
	_ Scoped = (*Kafka)(nil)
)

// Scope returns the topic of e when the topic is a template, "" for a fixed
// topic. A consumer of several topics sees no order across them, so order
// is kept per topic: an event whose topic is missing parks only the events
// of its key on that topic.
func (k *Kafka) Scope(e *decode.Event) string {
	if !k.topic.dynamic() {
		return ""
	}
	return k.topic.expand(e.Name)
}

// NewKafka validates cfg and returns a Kafka sink. It does not connect: the
// client connects on first use (see Ping).
func NewKafka(cfg KafkaConfig, log zerolog.Logger) (*Kafka, error) {
	cfg = cfg.WithDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	topic, err := parseTemplate(cfg.Topic, validKafkaTopicByte)
	if err != nil {
		return nil, fmt.Errorf("kafka sink %q: Topic: %w", cfg.Name, err)
	}
	k := &Kafka{
		name:    cfg.Name,
		topic:   topic,
		keyBy:   cfg.KeyBy,
		timeout: cfg.Timeout,
		policy:  cfg.RetryConfig.policy(),
		log:     log.With().Str("component", "sink").Str("sink", cfg.Name).Logger(),
	}
	opts := []kgo.Opt{
		kgo.SeedBrokers(cfg.Brokers...),
		kgo.ClientID(cfg.ClientID),
		kgo.WithLogger(kgoLogger{k.log}),
		// Idempotent writes are franz-go's default; they need acks=all.
		kgo.RequiredAcks(kgo.AllISRAcks()),
		// One try per record per attempt: Deliver retries and counts. The
		// client still re-sends a request whose answer it never got, as
		// idempotence requires.
		kgo.RecordRetries(0),
		// Deliver hands over all its records at once; lingering would only
		// add latency to every call.
		kgo.ProducerLinger(0),
		kgo.ProduceRequestTimeout(cfg.Timeout),
		kgo.ProducerBatchMaxBytes(int32(cfg.MaxRecordBytes)),
	}
	if cfg.tlsOn() {
		tc, field, err := kafkaTLS(cfg)
		if err != nil {
			return nil, fmt.Errorf("kafka sink %q: %s: %w", cfg.Name, field, err)
		}
		opts = append(opts, kgo.DialTLSConfig(tc))
	} else if cfg.SASLMechanism == "plain" {
		k.log.Warn().Msg("SASL PLAIN without TLS: the password crosses the network in clear text; set TLS")
	}
	if m := saslMechanism(cfg); m != nil {
		opts = append(opts, kgo.SASL(m))
	}
	if cfg.AllowAutoTopicCreation {
		opts = append(opts, kgo.AllowAutoTopicCreation())
	}
	topic.onCollision(func(name, earlier, expanded string) {
		k.log.Warn().Str("event_name", name).Str("earlier_event_name", earlier).Str("topic", expanded).
			Msg("two event names share one topic once made valid: consumers of it get both (tell them apart by outboxd-event-name)")
	})
	k.client, err = kgo.NewClient(opts...)
	if err != nil {
		return nil, fmt.Errorf("kafka sink %q: create client: %w", cfg.Name, err)
	}
	return k, nil
}

// kafkaTLS builds the TLS configuration: system roots or the CA file, and
// the client certificate when given. A failure names the field at fault.
func kafkaTLS(cfg KafkaConfig) (_ *tls.Config, field string, _ error) {
	tc := &tls.Config{MinVersion: tls.VersionTLS12}
	if cfg.TLSCAFile != "" {
		pem, err := os.ReadFile(cfg.TLSCAFile)
		if err != nil {
			return nil, "TLSCAFile", err
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, "TLSCAFile", fmt.Errorf("%s holds no PEM certificate", cfg.TLSCAFile)
		}
		tc.RootCAs = pool
	}
	if (cfg.TLSCertFile == "") != (cfg.TLSKeyFile == "") {
		return nil, "TLSCertFile", errors.New("a client certificate needs its key, and a key its certificate: set both files")
	}
	if cfg.TLSCertFile != "" {
		cert, err := tls.LoadX509KeyPair(cfg.TLSCertFile, cfg.TLSKeyFile)
		if err != nil {
			return nil, "TLSCertFile", fmt.Errorf("load client certificate: %w", err)
		}
		tc.Certificates = []tls.Certificate{cert}
	}
	return tc, "", nil
}

func (c KafkaConfig) tlsOn() bool {
	return c.TLS || c.TLSCAFile != "" || c.TLSCertFile != "" || c.TLSKeyFile != ""
}

func saslMechanism(cfg KafkaConfig) sasl.Mechanism {
	switch cfg.SASLMechanism {
	case "plain":
		return plain.Auth{User: cfg.SASLUser, Pass: cfg.SASLPassword}.AsMechanism()
	case "scram-sha-256":
		return scram.Auth{User: cfg.SASLUser, Pass: cfg.SASLPassword}.AsSha256Mechanism()
	case "scram-sha-512":
		return scram.Auth{User: cfg.SASLUser, Pass: cfg.SASLPassword}.AsSha512Mechanism()
	}
	return nil
}

// Name returns the sink name.
func (k *Kafka) Name() string { return k.name }

// Ping checks that a broker answers, so that a wrong address fails at start.
func (k *Kafka) Ping(ctx context.Context) error {
	if err := k.client.Ping(ctx); err != nil {
		return fmt.Errorf("kafka sink %q: reach brokers: %w", k.name, err)
	}
	return nil
}

// Close closes the client. Records still buffered fail; Deliver must not be
// called afterwards.
func (k *Kafka) Close() { k.client.Close() }

// Deliver produces one record per event and waits for each acknowledgement.
func (k *Kafka) Deliver(ctx context.Context, events []*decode.Event) []Outcome {
	if len(events) == 0 {
		return []Outcome{}
	}
	var rejected []error
	for i, ev := range events {
		if ev == nil {
			continue
		}
		if err := checkKafkaTopic(k.topic.expand(ev.Name)); err != nil {
			if rejected == nil {
				rejected = make([]error, len(events))
			}
			rejected[i] = fmt.Errorf("topic: %w", err)
		}
	}
	call := &kafkaCall{answers: make(chan produced, len(events)), inflight: make([]bool, len(events))}
	out := deliverEach(ctx, k.policy, "produce to kafka", events, rejected, func(ctx context.Context, pending []int) attemptResult {
		return k.attempt(ctx, call, events, pending)
	})
	if ev := k.log.Debug(); ev.Enabled() {
		ev.Int("events", len(events)).Int("failed", failed(out)).Msg("kafka delivery")
	}
	return out
}

func failed(out []Outcome) int {
	n := 0
	for _, o := range out {
		if o.Err != nil {
			n++
		}
	}
	return n
}

type produced struct {
	i   int // the event's index in the Deliver call
	err error
}

// kafkaCall is the state of one Deliver call across its attempts.
type kafkaCall struct {
	// answers receives the answer of every record produced by the call,
	// whenever it comes; buffered for every event, so that a promise firing
	// after the call returned never blocks the client.
	answers chan produced
	// inflight[i] is true while events[i]'s record is produced and not yet
	// answered.
	inflight []bool
}

// attempt produces the pending events whose records are not in flight and
// waits, up to the timeout, for the answer of each pending one. A record an
// earlier attempt produced and the broker has not answered yet is waited
// for, never produced again: a second copy would follow the first into the
// partition, behind the newer records produced after it, and put an older
// event after a newer one (1 2 1 2). Records are produced under the call's
// ctx, so an attempt's timeout does not withdraw them.
func (k *Kafka) attempt(ctx context.Context, call *kafkaCall, events []*decode.Event, pending []int) attemptResult {
	res := attemptResult{errs: make([]error, len(pending))}
	actx, cancel := context.WithTimeout(ctx, k.timeout)
	defer cancel()
	slot := make(map[int]int, len(pending))
	extra := ExtraHeaders(ctx)
	for j, i := range pending {
		slot[i] = j
		if call.inflight[i] {
			continue
		}
		call.inflight[i] = true
		k.client.Produce(ctx, k.record(events[i], extra), func(_ *kgo.Record, err error) { call.answers <- produced{i, err} })
	}
	answered := make([]bool, len(pending))
	for waiting := len(pending); waiting > 0; {
		select {
		case a := <-call.answers:
			call.inflight[a.i] = false
			j, ok := slot[a.i]
			if !ok || answered[j] {
				continue
			}
			res.errs[j] = attemptErr(ctx, k.timeout, classifyKafka(a.err))
			answered[j] = true
			waiting--
		case <-actx.Done():
			// Records still in flight stay with the client; the next
			// attempt waits for their answers.
			err := attemptErr(ctx, k.timeout, actx.Err())
			for j := range answered {
				if !answered[j] {
					res.errs[j] = err
				}
			}
			return res
		}
	}
	return res
}

// record builds the record of ev.
func (k *Kafka) record(ev *decode.Event, extra []ExtraHeader) *kgo.Record {
	topic := k.topic.expand(ev.Name)
	id := strconv.FormatInt(ev.ID, 10)
	headers := make([]kgo.RecordHeader, 0, 5+len(extra))
	for _, h := range extra {
		switch strings.ToLower(h.Key) {
		case HeaderMessageID, HeaderEventID, HeaderEventName, "content-type", HeaderTraceparent:
			continue // the sink's own headers take precedence
		}
		headers = append(headers, kgo.RecordHeader{Key: h.Key, Value: []byte(h.Value)})
	}
	headers = append(headers,
		kgo.RecordHeader{Key: HeaderMessageID, Value: []byte(messageID(ev))},
		kgo.RecordHeader{Key: HeaderEventID, Value: []byte(id)},
		kgo.RecordHeader{Key: HeaderEventName, Value: []byte(ev.Name)},
		kgo.RecordHeader{Key: "content-type", Value: []byte("application/json")},
	)
	if ev.Traceparent != "" {
		headers = append(headers, kgo.RecordHeader{Key: HeaderTraceparent, Value: []byte(ev.Traceparent)})
	}
	return &kgo.Record{Topic: topic, Key: k.key(ev), Value: ev.Body, Headers: headers}
}

// key returns the record key of ev: its ordering key. Never nil, so that
// keyless events too hash to one partition and keep their order.
func (k *Kafka) key(ev *decode.Event) []byte {
	switch k.keyBy {
	case KeyByEntity:
		return []byte(ev.EntityType + ":" + ev.EntityID)
	case KeyByNone:
		return strconv.AppendInt(nil, ev.ID, 10)
	default:
		if !ev.HasOrganization {
			return []byte{}
		}
		return strconv.AppendInt(nil, ev.OrganizationID, 10)
	}
}

// kafkaPermanent are the broker answers retrying cannot fix.
var kafkaPermanent = []error{
	kerr.MessageTooLarge,
	kerr.RecordListTooLarge,
	kerr.InvalidTopicException,
	kerr.InvalidRecord,
	kerr.PolicyViolation,
	kerr.InvalidRequiredAcks,
	kerr.UnsupportedForMessageFormat,
	kerr.TopicAuthorizationFailed,
	kerr.ClusterAuthorizationFailed,
	kerr.TransactionalIDAuthorizationFailed,
	kerr.SaslAuthenticationFailed,
	kerr.UnsupportedSaslMechanism,
	kerr.IllegalSaslState,
}

// classifyKafka marks the permanent failures among the errors of a record.
func classifyKafka(err error) error {
	if err == nil {
		return nil
	}
	for _, p := range kafkaPermanent {
		if errors.Is(err, p) {
			return fmt.Errorf("%w: %w", ErrPermanent, err)
		}
	}
	return err
}

// checkKafkaTopic checks a topic name against Kafka's rules.
func checkKafkaTopic(t string) error {
	switch {
	case t == "":
		return errors.New("empty topic name")
	case t == "." || t == "..":
		return fmt.Errorf("topic name %q is not allowed", t)
	case len(t) > maxKafkaTopicLen:
		return fmt.Errorf("topic name is %d characters long, more than %d", len(t), maxKafkaTopicLen)
	}
	for i := 0; i < len(t); i++ {
		if !validKafkaTopicByte(t[i]) {
			return fmt.Errorf("topic name %q has invalid character %q (want letters, digits, '.', '_', '-')", t, t[i])
		}
	}
	return nil
}

func validKafkaTopicByte(c byte) bool {
	return 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '.' || c == '_' || c == '-'
}

// templateVar is the one variable topic and subject templates know.
const templateVar = "{event_name}"

// template is a topic or subject with "{event_name}" placeholders.
type template struct {
	parts []string // literal text around the placeholders: len = placeholders+1
	valid func(byte) bool
	names *nameTable
}

// nameTable remembers which event name first expanded to each topic or
// subject, so that two names made equal by sanitizing ("order.paid" and
// "order_paid" on NATS) are said, not mixed silently.
type nameTable struct {
	mu    sync.Mutex
	first map[string]string // expansion → first event name seen with it
	said  map[string]bool   // event names already reported
	// collide, when set, is told of each event name that expands like an
	// earlier, different one (once per name).
	collide func(name, earlier, expanded string)
}

// maxNames bounds the names a nameTable remembers: event names are a small
// set, and a flood of distinct ones must not grow memory without end.
const maxNames = 10000

func (n *nameTable) note(name, expanded string) {
	n.mu.Lock()
	earlier, seen := n.first[expanded]
	if !seen && len(n.first) < maxNames {
		n.first[expanded] = name
	}
	report := seen && earlier != name && !n.said[name] && n.collide != nil
	if report {
		n.said[name] = true
	}
	collide := n.collide
	n.mu.Unlock()
	if report {
		collide(name, earlier, expanded)
	}
}

// onCollision sets what is told of colliding names.
func (t template) onCollision(f func(name, earlier, expanded string)) {
	t.names.mu.Lock()
	defer t.names.mu.Unlock()
	t.names.collide = f
}

// parseTemplate parses s. Braces other than "{event_name}" are refused, so a
// typo ("{event}") fails at start instead of becoming part of every name.
func parseTemplate(s string, valid func(byte) bool) (template, error) {
	if s == "" {
		return template{}, errors.New("required")
	}
	parts := strings.Split(s, templateVar)
	for _, p := range parts {
		if strings.ContainsAny(p, "{}") {
			return template{}, fmt.Errorf("%q: only %s may appear in braces", s, templateVar)
		}
	}
	return template{parts: parts, valid: valid, names: &nameTable{first: map[string]string{}, said: map[string]bool{}}}, nil
}

func (t template) dynamic() bool { return len(t.parts) > 1 }

// expand substitutes name, made safe, for each placeholder.
func (t template) expand(name string) string {
	if !t.dynamic() {
		return t.parts[0]
	}
	safe := sanitizeName(name, t.valid)
	out := strings.Join(t.parts, safe)
	t.names.note(name, out)
	return out
}

// sanitizeName replaces each byte for which valid is false by '_': a
// multi-byte character becomes several '_', which keeps the mapping simple
// and the result within the limits the destination sets on bytes.
func sanitizeName(name string, valid func(byte) bool) string {
	if name == "" {
		return "_"
	}
	b := []byte(name)
	for i, c := range b {
		if !valid(c) {
			b[i] = '_'
		}
	}
	return string(b)
}

// kgoLogger sends franz-go's log lines to zerolog, one level lower: franz-go
// logs routine connection and metadata news at info.
type kgoLogger struct{ log zerolog.Logger }

func (l kgoLogger) Level() kgo.LogLevel {
	switch lv := l.log.GetLevel(); {
	case lv <= zerolog.TraceLevel:
		return kgo.LogLevelDebug
	case lv <= zerolog.DebugLevel:
		return kgo.LogLevelInfo
	case lv <= zerolog.WarnLevel:
		return kgo.LogLevelWarn
	default:
		return kgo.LogLevelError
	}
}

func (l kgoLogger) Log(level kgo.LogLevel, msg string, keyvals ...any) {
	var ev *zerolog.Event
	switch level {
	case kgo.LogLevelError:
		ev = l.log.Error()
	case kgo.LogLevelWarn:
		ev = l.log.Warn()
	case kgo.LogLevelInfo:
		ev = l.log.Debug()
	default:
		ev = l.log.Trace()
	}
	if !ev.Enabled() {
		return
	}
	for i := 0; i+1 < len(keyvals); i += 2 {
		key, _ := keyvals[i].(string)
		if err, ok := keyvals[i+1].(error); ok {
			ev = ev.AnErr(key, err)
			continue
		}
		ev = ev.Interface(key, keyvals[i+1])
	}
	ev.Msg("kafka client: " + msg)
}
