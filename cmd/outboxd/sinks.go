package main

import (
	"context"
	"reflect"
	"slices"
	"strings"
	"time"

	"github.com/caarlos0/env/v10"
	"github.com/rs/zerolog"

	"github.com/outboxd/outboxd/decode"
	"github.com/outboxd/outboxd/sink"
)

// closableSink is a sink built from OUTBOXD_SINK other than webhook.
type closableSink interface {
	sink.Sink
	Close()
}

// The variables of each sink other than the webhook, read by buildSink from
// the same environment as config (prefix OUTBOXD_). Shared settings
// (ORDERING_KEY, ALLOW_PRIVATE_SINKS) are read again here with the same
// defaults as in config.

type stdoutEnv struct {
	Path        string        `env:"STDOUT_PATH"`
	MaxAttempts int           `env:"STDOUT_MAX_ATTEMPTS" envDefault:"8"`
	BackoffMax  time.Duration `env:"STDOUT_BACKOFF_MAX" envDefault:"30s"`
}

type kafkaEnv struct {
	Brokers       []string      `env:"KAFKA_BROKERS" envSeparator:","`
	Topic         string        `env:"KAFKA_TOPIC"`
	ClientID      string        `env:"KAFKA_CLIENT_ID" envDefault:"outboxd"`
	TLS           bool          `env:"KAFKA_TLS" envDefault:"false"`
	TLSCAFile     string        `env:"KAFKA_TLS_CA_FILE"`
	TLSCertFile   string        `env:"KAFKA_TLS_CERT_FILE"`
	TLSKeyFile    string        `env:"KAFKA_TLS_KEY_FILE"`
	SASLMechanism string        `env:"KAFKA_SASL_MECHANISM"`
	SASLUser      string        `env:"KAFKA_SASL_USERNAME"`
	SASLPassword  string        `env:"KAFKA_SASL_PASSWORD"`
	AutoCreate    bool          `env:"KAFKA_AUTO_CREATE_TOPICS" envDefault:"false"`
	MaxRecord     int           `env:"KAFKA_MAX_RECORD_BYTES" envDefault:"1048576"`
	Timeout       time.Duration `env:"KAFKA_TIMEOUT" envDefault:"10s"`
	MaxAttempts   int           `env:"KAFKA_MAX_ATTEMPTS" envDefault:"8"`
	BackoffMax    time.Duration `env:"KAFKA_BACKOFF_MAX" envDefault:"30s"`
	OrderingKey   string        `env:"ORDERING_KEY" envDefault:"organization"`
}

type natsEnv struct {
	URL         string        `env:"NATS_URL"`
	Subject     string        `env:"NATS_SUBJECT" envDefault:"events.{event_name}"`
	Stream      string        `env:"NATS_STREAM"`
	CredsFile   string        `env:"NATS_CREDS"`
	Timeout     time.Duration `env:"NATS_TIMEOUT" envDefault:"10s"`
	MaxAttempts int           `env:"NATS_MAX_ATTEMPTS" envDefault:"8"`
	BackoffMax  time.Duration `env:"NATS_BACKOFF_MAX" envDefault:"30s"`
}

type posthogEnv struct {
	APIKey       string        `env:"POSTHOG_PROJECT_API_KEY"`
	Host         string        `env:"POSTHOG_HOST"`
	Timeout      time.Duration `env:"POSTHOG_TIMEOUT" envDefault:"10s"`
	MaxAttempts  int           `env:"POSTHOG_MAX_ATTEMPTS" envDefault:"8"`
	BackoffMax   time.Duration `env:"POSTHOG_BACKOFF_MAX" envDefault:"30s"`
	AllowPrivate bool          `env:"ALLOW_PRIVATE_SINKS" envDefault:"false"`
	// Person and group properties: property keys, comma-separated.
	PersonProperties []string `env:"POSTHOG_PERSON_PROPERTIES" envSeparator:","`
	GroupIdentify    bool     `env:"POSTHOG_GROUP_IDENTIFY" envDefault:"false"`
	GroupProperties  []string `env:"POSTHOG_GROUP_PROPERTIES" envSeparator:","`
}

type ga4Env struct {
	MeasurementID    string        `env:"GA4_MEASUREMENT_ID"`
	APISecret        string        `env:"GA4_API_SECRET"`
	Endpoint         string        `env:"GA4_ENDPOINT"`
	ClientIDProperty string        `env:"GA4_CLIENT_ID_PROPERTY"`
	ClientIDKey      string        `env:"GA4_CLIENT_ID_KEY"`
	Timeout          time.Duration `env:"GA4_TIMEOUT" envDefault:"10s"`
	MaxAttempts      int           `env:"GA4_MAX_ATTEMPTS" envDefault:"8"`
	BackoffMax       time.Duration `env:"GA4_BACKOFF_MAX" envDefault:"30s"`
	AllowPrivate     bool          `env:"ALLOW_PRIVATE_SINKS" envDefault:"false"`
}

// sinkEnvs maps each OUTBOXD_SINK value other than webhook to its variables.
var sinkEnvs = map[string]any{
	"stdout":  stdoutEnv{},
	"kafka":   kafkaEnv{},
	"nats":    natsEnv{},
	"posthog": posthogEnv{},
	"ga4":     ga4Env{},
}

// Unprefixed variables the PostHog sink also reads: the names the product
// already uses for PostHog. The OUTBOXD_-prefixed form wins.
const (
	posthogKeyVar  = "POSTHOG_PROJECT_API_KEY"
	posthogHostVar = "POSTHOG_HOST"
)

// ga4MeasurementIDVar is the unprefixed name the GA4 sink also reads the
// measurement id from (the one the product's web tag already uses). The
// OUTBOXD_-prefixed form wins.
const ga4MeasurementIDVar = "GOOGLE_ANALYTICS_MEASUREMENT_ID"

// passthroughVar reports whether name, though not OUTBOXD_-prefixed, is a
// variable a sink reads, so that run must copy it into the environment map.
func passthroughVar(name string) bool {
	return name == posthogKeyVar || name == posthogHostVar || name == ga4MeasurementIDVar
}

// knownSink reports whether OUTBOXD_SINK names a sink this build has.
func knownSink(kind string) bool {
	_, ok := sinkEnvs[kind]
	return ok
}

// sinkVar reports whether name is a variable of one of the non-webhook sinks
// (so it is not warned about as unknown).
func sinkVar(name string) bool {
	for _, e := range sinkEnvs {
		if slices.Contains(envVars(e), name) {
			return true
		}
	}
	return slices.Contains(destVars(), name) || slices.Contains(guardVars(), name) || slices.Contains(filterMaskVars(), name)
}

// envVars lists the prefixed variable names of an env struct.
func envVars(v any) []string {
	t := reflect.TypeOf(v)
	names := make([]string, 0, t.NumField())
	for i := range t.NumField() {
		names = append(names, envPrefix+t.Field(i).Tag.Get("env"))
	}
	return names
}

// parseSinkEnv reads the variables of v (a pointer to an env struct) from
// envMap; errors name the variable.
func parseSinkEnv(v any, envMap map[string]string) error {
	err := env.ParseWithOptions(v, env.Options{Environment: envMap, Prefix: envPrefix})
	if err == nil {
		return nil
	}
	return configError{describeEnvError(err, v)}
}

// checkCommon checks the settings every sink has; names are without prefix.
func checkCommon(maxAttemptsVar string, maxAttempts int, durs map[string]time.Duration) error {
	if err := positive(maxAttempts); err != nil {
		return badVar(maxAttemptsVar, "%v", err)
	}
	names := make([]string, 0, len(durs))
	for name := range durs {
		names = append(names, name)
	}
	slices.Sort(names)
	for _, name := range names {
		if err := positiveDur(durs[name]); err != nil {
			return badVar(name, "%v", err)
		}
	}
	return nil
}

// backoffMin is the first backoff: the default, or less when the configured
// maximum is smaller.
func backoffMin(backoffMax time.Duration) time.Duration {
	return min(sink.DefaultBackoffMin, backoffMax)
}

// validateNamed runs a sink config's Validate and turns its error, which
// names struct fields, into one naming the variable (fields maps field to
// variable, without prefix).
func validateNamed(validate func() error, fields map[string]string) error {
	err := validate()
	if err == nil {
		return nil
	}
	var errs []error
	if j, ok := err.(interface{ Unwrap() []error }); ok {
		errs = j.Unwrap()
	} else {
		errs = []error{err}
	}
	for _, e := range errs {
		msg := e.Error()
		for field, name := range fields {
			if strings.Contains(msg, ": "+field+":") || strings.Contains(msg, ": "+field+"[") {
				return badVar(name, "%s", msg)
			}
		}
	}
	return configError{err.Error()}
}

// buildSink builds the sink named by OUTBOXD_SINK from its variables.
// Configuration errors name the variable (exit 2); a Kafka or NATS
// destination that cannot be reached at start is a runtime error (exit 1).
func buildSink(kind string, envMap map[string]string, log zerolog.Logger) (closableSink, error) {
	switch kind {
	case "stdout":
		return buildStdout(envMap, log)
	case "kafka":
		return buildKafka(envMap, log)
	case "nats":
		return buildNATS(envMap, log)
	case "posthog":
		return buildPostHog(envMap, log)
	case "ga4":
		return buildGA4(envMap, log)
	}
	return nil, badVar("SINK", "unknown sink %q (want webhook, stdout, kafka, nats, posthog or ga4)", kind)
}

func buildStdout(envMap map[string]string, log zerolog.Logger) (closableSink, error) {
	var e stdoutEnv
	if err := parseSinkEnv(&e, envMap); err != nil {
		return nil, err
	}
	if err := checkCommon("STDOUT_MAX_ATTEMPTS", e.MaxAttempts, map[string]time.Duration{"STDOUT_BACKOFF_MAX": e.BackoffMax}); err != nil {
		return nil, err
	}
	cfg := sink.JSONLinesConfig{Name: "stdout", Path: e.Path,
		RetryConfig: sink.RetryConfig{MaxAttempts: e.MaxAttempts, BackoffMin: backoffMin(e.BackoffMax), BackoffMax: e.BackoffMax}}.WithDefaults()
	if err := validateNamed(cfg.Validate, map[string]string{"MaxAttempts": "STDOUT_MAX_ATTEMPTS", "BackoffMax": "STDOUT_BACKOFF_MAX"}); err != nil {
		return nil, err
	}
	s, err := sink.NewJSONLines(cfg, log)
	if err != nil {
		return nil, badVar("STDOUT_PATH", "%v", err)
	}
	out := "standard output"
	if e.Path != "" {
		out = e.Path
	}
	log.Info().Str("sink", "stdout").Str("output", out).Msg("sink ready")
	return s, nil
}

func buildKafka(envMap map[string]string, log zerolog.Logger) (closableSink, error) {
	var e kafkaEnv
	if err := parseSinkEnv(&e, envMap); err != nil {
		return nil, err
	}
	var brokers []string
	for _, b := range e.Brokers {
		if b = strings.TrimSpace(b); b != "" {
			brokers = append(brokers, b)
		}
	}
	if len(brokers) == 0 {
		return nil, badVar("KAFKA_BROKERS", "required: a comma-separated list of host:port")
	}
	if strings.TrimSpace(e.Topic) == "" {
		return nil, badVar("KAFKA_TOPIC", "required: a topic, or a template such as events.{event_name}")
	}
	if e.SASLMechanism == "" && (e.SASLUser != "" || e.SASLPassword != "") {
		// Credentials without a mechanism would be ignored: the client
		// would connect unauthenticated, with nothing saying so.
		return nil, badVar("KAFKA_SASL_MECHANISM", "required when %sKAFKA_SASL_USERNAME or %sKAFKA_SASL_PASSWORD is set: plain, scram-sha-256 or scram-sha-512",
			envPrefix, envPrefix)
	}
	if err := checkCommon("KAFKA_MAX_ATTEMPTS", e.MaxAttempts, map[string]time.Duration{
		"KAFKA_TIMEOUT": e.Timeout, "KAFKA_BACKOFF_MAX": e.BackoffMax,
	}); err != nil {
		return nil, err
	}
	cfg := sink.KafkaConfig{
		Name: "kafka", Brokers: brokers, Topic: e.Topic, KeyBy: e.OrderingKey, ClientID: e.ClientID,
		TLS: e.TLS, TLSCAFile: e.TLSCAFile, TLSCertFile: e.TLSCertFile, TLSKeyFile: e.TLSKeyFile, SASLMechanism: strings.ToLower(e.SASLMechanism), SASLUser: e.SASLUser, SASLPassword: e.SASLPassword,
		AllowAutoTopicCreation: e.AutoCreate, MaxRecordBytes: e.MaxRecord, Timeout: e.Timeout,
		RetryConfig: sink.RetryConfig{MaxAttempts: e.MaxAttempts, BackoffMin: backoffMin(e.BackoffMax), BackoffMax: e.BackoffMax},
	}.WithDefaults()
	if err := validateNamed(cfg.Validate, map[string]string{
		"Brokers": "KAFKA_BROKERS", "Topic": "KAFKA_TOPIC", "KeyBy": "ORDERING_KEY", "ClientID": "KAFKA_CLIENT_ID",
		"TLSCAFile": "KAFKA_TLS_CA_FILE", "TLSCertFile": "KAFKA_TLS_CERT_FILE", "MaxRecordBytes": "KAFKA_MAX_RECORD_BYTES",
		"SASLMechanism": "KAFKA_SASL_MECHANISM", "SASLUser": "KAFKA_SASL_USERNAME", "SASLPassword": "KAFKA_SASL_PASSWORD",
		"Timeout": "KAFKA_TIMEOUT", "MaxAttempts": "KAFKA_MAX_ATTEMPTS", "BackoffMax": "KAFKA_BACKOFF_MAX",
	}); err != nil {
		return nil, err
	}
	k, err := sink.NewKafka(cfg, log)
	if err != nil {
		return nil, configError{err.Error()}
	}
	ctx, cancel := context.WithTimeout(context.Background(), e.Timeout)
	defer cancel()
	if err := k.Ping(ctx); err != nil {
		k.Close()
		return nil, err
	}
	log.Info().Str("sink", "kafka").Strs("brokers", brokers).Str("topic", e.Topic).Str("key", cfg.KeyBy).Msg("sink ready")
	return k, nil
}

func buildNATS(envMap map[string]string, log zerolog.Logger) (closableSink, error) {
	var e natsEnv
	if err := parseSinkEnv(&e, envMap); err != nil {
		return nil, err
	}
	if strings.TrimSpace(e.URL) == "" {
		return nil, badVar("NATS_URL", "required: nats://host:4222")
	}
	if err := checkCommon("NATS_MAX_ATTEMPTS", e.MaxAttempts, map[string]time.Duration{
		"NATS_TIMEOUT": e.Timeout, "NATS_BACKOFF_MAX": e.BackoffMax,
	}); err != nil {
		return nil, err
	}
	cfg := sink.NATSConfig{
		Name: "nats", URL: e.URL, Subject: e.Subject, Stream: e.Stream, CredsFile: e.CredsFile,
		Timeout: e.Timeout, RetryConfig: sink.RetryConfig{MaxAttempts: e.MaxAttempts, BackoffMin: backoffMin(e.BackoffMax), BackoffMax: e.BackoffMax},
	}.WithDefaults()
	if err := validateNamed(cfg.Validate, map[string]string{
		"URL": "NATS_URL", "Subject": "NATS_SUBJECT", "Stream": "NATS_STREAM",
		"Timeout": "NATS_TIMEOUT", "MaxAttempts": "NATS_MAX_ATTEMPTS", "BackoffMax": "NATS_BACKOFF_MAX",
	}); err != nil {
		return nil, err
	}
	n, err := sink.NewNATS(context.Background(), cfg, log)
	if err != nil {
		return nil, err
	}
	log.Info().Str("sink", "nats").Str("subject", e.Subject).Str("stream", e.Stream).Msg("sink ready")
	return n, nil
}

func buildPostHog(envMap map[string]string, log zerolog.Logger) (closableSink, error) {
	var e posthogEnv
	if err := parseSinkEnv(&e, envMap); err != nil {
		return nil, err
	}
	if e.APIKey == "" {
		e.APIKey = envMap[posthogKeyVar]
	}
	if e.Host == "" {
		e.Host = envMap[posthogHostVar]
	}
	if strings.TrimSpace(e.APIKey) == "" {
		return nil, badVar("POSTHOG_PROJECT_API_KEY", "required (or %s): the project API key", posthogKeyVar)
	}
	if err := checkCommon("POSTHOG_MAX_ATTEMPTS", e.MaxAttempts, map[string]time.Duration{
		"POSTHOG_TIMEOUT": e.Timeout, "POSTHOG_BACKOFF_MAX": e.BackoffMax,
	}); err != nil {
		return nil, err
	}
	cfg := sink.PostHogConfig{
		Name: "posthog", Host: e.Host, APIKey: e.APIKey,
		PersonProperties: trimAll(e.PersonProperties), GroupIdentify: e.GroupIdentify, GroupProperties: trimAll(e.GroupProperties),
		HTTPConfig: sink.HTTPConfig{Timeout: e.Timeout, AllowPrivate: e.AllowPrivate, UserAgent: "outboxd/" + version,
			RetryConfig: sink.RetryConfig{MaxAttempts: e.MaxAttempts, BackoffMin: backoffMin(e.BackoffMax), BackoffMax: e.BackoffMax}},
	}.WithDefaults()
	if err := validateNamed(cfg.Validate, map[string]string{
		"Host": "POSTHOG_HOST", "APIKey": "POSTHOG_PROJECT_API_KEY",
		"Timeout": "POSTHOG_TIMEOUT", "MaxAttempts": "POSTHOG_MAX_ATTEMPTS", "BackoffMax": "POSTHOG_BACKOFF_MAX",
		"PersonProperties": "POSTHOG_PERSON_PROPERTIES", "GroupProperties": "POSTHOG_GROUP_PROPERTIES",
	}); err != nil {
		return nil, err
	}
	p, err := sink.NewPostHog(cfg, log)
	if err != nil {
		return nil, configError{err.Error()}
	}
	log.Info().Str("sink", "posthog").Str("host", cfg.Host).Msg("sink ready")
	return p, nil
}

// trimAll trims the items of a comma-separated list ("a, b").
func trimAll(list []string) []string {
	out := make([]string, len(list))
	for i, s := range list {
		out[i] = strings.TrimSpace(s)
	}
	return out
}

func buildGA4(envMap map[string]string, log zerolog.Logger) (closableSink, error) {
	cfg, err := ga4Config(envMap)
	if err != nil {
		return nil, err
	}
	g, err := sink.NewGA4(cfg, log)
	if err != nil {
		return nil, configError{err.Error()}
	}
	log.Info().Str("sink", "ga4").Str("endpoint", cfg.Endpoint).Str("measurement_id", cfg.MeasurementID).
		Bool("client_id_property", cfg.ClientIDProperty != "").Msg("sink ready")
	return g, nil
}

// ga4Config reads and checks the GA4 sink's variables (run, replay and
// `ga4 validate` share it). Errors name the variable, never a secret.
func ga4Config(envMap map[string]string) (sink.GA4Config, error) {
	var e ga4Env
	if err := parseSinkEnv(&e, envMap); err != nil {
		return sink.GA4Config{}, err
	}
	if e.MeasurementID == "" {
		e.MeasurementID = envMap[ga4MeasurementIDVar]
	}
	if strings.TrimSpace(e.MeasurementID) == "" {
		return sink.GA4Config{}, badVar("GA4_MEASUREMENT_ID", "required (or %s): the web stream's measurement id, G-XXXXXXXXXX", ga4MeasurementIDVar)
	}
	if strings.TrimSpace(e.APISecret) == "" {
		return sink.GA4Config{}, badVar("GA4_API_SECRET", "required: the stream's Measurement Protocol API secret")
	}
	if err := checkCommon("GA4_MAX_ATTEMPTS", e.MaxAttempts, map[string]time.Duration{
		"GA4_TIMEOUT": e.Timeout, "GA4_BACKOFF_MAX": e.BackoffMax,
	}); err != nil {
		return sink.GA4Config{}, err
	}
	cfg := sink.GA4Config{
		Name: "ga4", Endpoint: e.Endpoint, MeasurementID: e.MeasurementID, APISecret: e.APISecret,
		ClientIDProperty: e.ClientIDProperty, ClientIDKey: e.ClientIDKey,
		HTTPConfig: sink.HTTPConfig{Timeout: e.Timeout, AllowPrivate: e.AllowPrivate, UserAgent: "outboxd/" + version,
			RetryConfig: sink.RetryConfig{MaxAttempts: e.MaxAttempts, BackoffMin: backoffMin(e.BackoffMax), BackoffMax: e.BackoffMax}},
	}.WithDefaults()
	if err := validateNamed(cfg.Validate, map[string]string{
		"MeasurementID": "GA4_MEASUREMENT_ID", "APISecret": "GA4_API_SECRET", "Endpoint": "GA4_ENDPOINT",
		"Timeout": "GA4_TIMEOUT", "MaxAttempts": "GA4_MAX_ATTEMPTS", "BackoffMax": "GA4_BACKOFF_MAX",
	}); err != nil {
		return sink.GA4Config{}, err
	}
	return cfg, nil
}

// placeholderSink stands for the sink buildSink makes, during validation.
type placeholderSink struct{}

func (placeholderSink) Name() string { return "placeholder" }
func (placeholderSink) Deliver(context.Context, []*decode.Event) []sink.Outcome {
	return nil
}
