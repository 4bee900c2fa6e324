package main

import (
	"errors"
	"fmt"
	"reflect"
	"regexp"
	"sort"
	"strings"
	"time"

	"github.com/caarlos0/env/v10"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/rs/zerolog"

	"github.com/outboxd/outboxd/decode"
	"github.com/outboxd/outboxd/deliver"
	"github.com/outboxd/outboxd/migrations"
	"github.com/outboxd/outboxd/pipeline"
	"github.com/outboxd/outboxd/sink"
)

const envPrefix = "OUTBOXD_"

// config is every setting, read from OUTBOXD_* variables; flags may override.
// It is the only place with env tags (CONVENTIONS.md).
type config struct {
	DatabaseURL string `env:"DATABASE_URL"`
	Table       string `env:"TABLE" envDefault:"public.domain_event"`
	Slot        string `env:"SLOT" envDefault:"outboxd"`
	Publication string `env:"PUBLICATION" envDefault:"outboxd"`

	Sink               string        `env:"SINK" envDefault:"webhook"`
	WebhookURL         string        `env:"WEBHOOK_URL"`
	WebhookSecret      string        `env:"WEBHOOK_SECRET"`
	WebhookTimeout     time.Duration `env:"WEBHOOK_TIMEOUT" envDefault:"10s"`
	WebhookMaxAttempts int           `env:"WEBHOOK_MAX_ATTEMPTS" envDefault:"8"`
	WebhookBackoffMax  time.Duration `env:"WEBHOOK_BACKOFF_MAX" envDefault:"30s"`
	WebhookConcurrency int           `env:"WEBHOOK_CONCURRENCY" envDefault:"16"`
	WebhookBatchSize   int           `env:"WEBHOOK_BATCH_SIZE" envDefault:"1"`
	WebhookBatchWait   time.Duration `env:"WEBHOOK_BATCH_WAIT" envDefault:"0s"`
	WebhookEvents      string        `env:"WEBHOOK_EVENTS"`
	RetrySchedule      string        `env:"RETRY_SCHEDULE" envDefault:"5s,5m,30m,2h,5h,10h,14h,20h,24h"`
	OrderingKey        string        `env:"ORDERING_KEY" envDefault:"organization"`
	AllowPrivateSinks  bool          `env:"ALLOW_PRIVATE_SINKS" envDefault:"false"`

	SlotRecreate    bool          `env:"SLOT_RECREATE" envDefault:"false"`
	FlushInterval   time.Duration `env:"FLUSH_INTERVAL" envDefault:"200ms"`
	FlushSize       int           `env:"FLUSH_SIZE" envDefault:"1000"`
	StatusInterval  time.Duration `env:"STATUS_INTERVAL" envDefault:"1s"`
	ShutdownTimeout time.Duration `env:"SHUTDOWN_TIMEOUT" envDefault:"10s"`
	MaxInFlight     int           `env:"MAX_IN_FLIGHT" envDefault:"10000"`

	HTTPAddr  string `env:"HTTP_ADDR" envDefault:"127.0.0.1:9187"`
	LogLevel  string `env:"LOG_LEVEL" envDefault:"info"`
	LogFormat string `env:"LOG_FORMAT" envDefault:"json"`

	// Operations (README.md, "Operating outboxd").
	HeartbeatInterval   time.Duration `env:"HEARTBEAT_INTERVAL" envDefault:"0s"`
	ReplicationTimeout  time.Duration `env:"REPLICATION_TIMEOUT" envDefault:"10s"`
	LagAlertBytes       string        `env:"LAG_ALERT_BYTES" envDefault:"1GiB"`
	SlotStallTimeout    time.Duration `env:"SLOT_STALL_TIMEOUT" envDefault:"5m"`
	SlotPollInterval    time.Duration `env:"SLOT_POLL_INTERVAL" envDefault:"5s"`
	BacklogPollInterval time.Duration `env:"BACKLOG_POLL_INTERVAL" envDefault:"30s"`
}

// configError is bad configuration: exit code 2, message naming the variable.
type configError struct{ msg string }

func (e configError) Error() string { return e.msg }

func badVar(name, format string, args ...any) error {
	return configError{envPrefix + name + ": " + fmt.Sprintf(format, args...)}
}

// loadConfig reads the OUTBOXD_* variables from environ. It returns warnings
// for unknown OUTBOXD_* variables.
func loadConfig(environ map[string]string) (config, []string, error) {
	var c config
	err := env.ParseWithOptions(&c, env.Options{Environment: environ, Prefix: envPrefix})
	if err != nil {
		return c, nil, configError{describeEnvError(err)}
	}
	known := map[string]bool{}
	t := reflect.TypeOf(c)
	for i := range t.NumField() {
		known[envPrefix+t.Field(i).Tag.Get("env")] = true
	}
	var warnings []string
	for k := range environ {
		if strings.HasPrefix(k, envPrefix) && !known[k] && !sinkVar(k) && !strings.HasPrefix(k, "OUTBOXD_TEST_") {
			warnings = append(warnings, fmt.Sprintf("unknown variable %s ignored", k))
		}
	}
	sort.Strings(warnings)
	return c, warnings, nil
}

// describeEnvError names the variable behind a parse error of caarlos0/env,
// which reports struct field names.
func describeEnvError(err error) string {
	var agg env.AggregateError
	if !errors.As(err, &agg) {
		return err.Error()
	}
	t := reflect.TypeOf(config{})
	var msgs []string
	for _, e := range agg.Errors {
		var pe env.ParseError
		if errors.As(e, &pe) {
			if f, ok := t.FieldByName(pe.Name); ok {
				msgs = append(msgs, fmt.Sprintf("%s%s: invalid %s: %v", envPrefix, f.Tag.Get("env"), pe.Type, pe.Err))
				continue
			}
		}
		msgs = append(msgs, e.Error())
	}
	return strings.Join(msgs, "; ")
}

// table splits OUTBOXD_TABLE into schema and name.
func (c config) table() (decode.Table, error) {
	schema, name, ok := strings.Cut(c.Table, ".")
	if !ok {
		schema, name = "public", c.Table
	}
	if schema == "" || name == "" || strings.Contains(name, ".") {
		return decode.Table{}, badVar("TABLE", "%q is not [schema.]table", c.Table)
	}
	return decode.Table{Schema: schema, Name: name}, nil
}

// requireDatabase checks what every command that works on the database
// needs, before it connects: the connection string, and the names of the
// objects (OUTBOXD_TABLE, OUTBOXD_SLOT, OUTBOXD_PUBLICATION).
func (c config) requireDatabase() error {
	if strings.TrimSpace(c.DatabaseURL) == "" {
		return badVar("DATABASE_URL", "required: a libpq URL or key/value connection string")
	}
	if _, err := pgconn.ParseConfig(c.DatabaseURL); err != nil {
		// pgconn's parse errors may quote the string, password included.
		return badVar("DATABASE_URL", "cannot be parsed as a libpq URL or key/value connection string")
	}
	return c.checkNames()
}

// slotNameRE is Postgres's rule for replication slot names.
var slotNameRE = regexp.MustCompile(`^[a-z0-9_]{1,63}$`)

// checkNames checks the database object names with the rules migrate
// (migrations.Options.Validate) and the operator commands (ops.Target.Validate)
// apply, so that a name outboxd cannot use is refused at start, naming the
// variable, instead of failing later in SQL or a replication command.
func (c config) checkNames() error {
	table, err := c.table()
	if err != nil {
		return err
	}
	if err := (&migrations.Options{Schema: table.Schema, Table: table.Name}).Validate(); err != nil {
		return badVar("TABLE", "%v", err)
	}
	if !slotNameRE.MatchString(c.Slot) {
		return badVar("SLOT", "%q must be 1-63 characters of a-z, 0-9 and _ (Postgres's rule for replication slot names)", c.Slot)
	}
	if err := (&migrations.Options{Publication: c.Publication}).Validate(); err != nil {
		return badVar("PUBLICATION", "%v", err)
	}
	return nil
}

// pipelineConfig converts and validates the settings of `outboxd run`.
func (c config) pipelineConfig() (pipeline.Config, error) {
	if err := c.requireDatabase(); err != nil {
		return pipeline.Config{}, err
	}
	table, err := c.table()
	if err != nil {
		return pipeline.Config{}, err
	}
	ordering, err := deliver.ParseOrdering(c.OrderingKey)
	if err != nil {
		return pipeline.Config{}, badVar("ORDERING_KEY", "%v", err)
	}
	if c.Sink != "webhook" {
		if !knownSink(c.Sink) {
			return pipeline.Config{}, badVar("SINK", "unknown sink %q", c.Sink)
		}
	} else if c.WebhookURL == "" {
		return pipeline.Config{}, badVar("WEBHOOK_URL", "required: the URL events are posted to")
	}
	events, err := deliver.ParseGlobs(c.WebhookEvents)
	if err != nil {
		return pipeline.Config{}, badVar("WEBHOOK_EVENTS", "%v", err)
	}
	schedule, err := deliver.ParseSchedule(c.RetrySchedule)
	if err != nil {
		return pipeline.Config{}, badVar("RETRY_SCHEDULE", "%v", err)
	}
	var secrets []string
	for _, s := range strings.Fields(strings.ReplaceAll(c.WebhookSecret, ",", " ")) {
		secrets = append(secrets, s)
	}
	pc := pipeline.Config{
		DatabaseURL: c.DatabaseURL, Table: table, Slot: c.Slot, Publication: c.Publication,
		SlotRecreate: c.SlotRecreate,
		Deliver: deliver.Config{Ordering: ordering, Concurrency: c.WebhookConcurrency, BatchSize: c.WebhookBatchSize,
			BatchWait: c.WebhookBatchWait, MaxInFlight: c.MaxInFlight},
		Webhook: sink.WebhookConfig{Name: "webhook", URL: c.WebhookURL, Secrets: secrets, Timeout: c.WebhookTimeout,
			MaxAttempts: c.WebhookMaxAttempts, BackoffMax: c.WebhookBackoffMax, AllowPrivate: c.AllowPrivateSinks},
		DefaultEvents: events, Schedule: schedule,
		FlushInterval: c.FlushInterval, FlushSize: c.FlushSize, ShutdownTimeout: c.ShutdownTimeout,
		StatusInterval: c.StatusInterval,
	}
	pc.HeartbeatInterval = c.HeartbeatInterval
	pc.ReplicationTimeout = c.ReplicationTimeout
	// Check each part separately, so the error names the variable.
	checks := []struct {
		name string
		err  error
	}{
		{"WEBHOOK_CONCURRENCY", positive(c.WebhookConcurrency)},
		{"WEBHOOK_BATCH_SIZE", positive(c.WebhookBatchSize)},
		{"MAX_IN_FLIGHT", positive(c.MaxInFlight)},
		{"FLUSH_SIZE", positive(c.FlushSize)},
		{"WEBHOOK_MAX_ATTEMPTS", positive(c.WebhookMaxAttempts)},
		{"WEBHOOK_TIMEOUT", positiveDur(c.WebhookTimeout)},
		{"FLUSH_INTERVAL", positiveDur(c.FlushInterval)},
		{"STATUS_INTERVAL", positiveDur(c.StatusInterval)},
		{"SHUTDOWN_TIMEOUT", positiveDur(c.ShutdownTimeout)},
		{"WEBHOOK_BATCH_WAIT", nonNegativeDur(c.WebhookBatchWait)},
		{"HEARTBEAT_INTERVAL", nonNegativeDur(c.HeartbeatInterval)},
		{"REPLICATION_TIMEOUT", atLeast(c.ReplicationTimeout, 2*c.StatusInterval, "twice OUTBOXD_STATUS_INTERVAL")},
	}
	for _, ch := range checks {
		if ch.err != nil {
			return pipeline.Config{}, badVar(ch.name, "%v", ch.err)
		}
	}
	// Check a copy: Validate fills in defaults, among them a first retry of
	// 5s, which must not stand in for the schedule's first step (pc.Validate
	// takes it from the schedule).
	deliverCheck := pc.Deliver
	if err := deliverCheck.Validate(); err != nil {
		return pipeline.Config{}, badVar("WEBHOOK_CONCURRENCY", "%v", err)
	}
	if c.Sink != "webhook" {
		// The sink is built by buildSink; the webhook settings are unused.
	} else if err := pc.Webhook.Validate(); err != nil {
		name := "WEBHOOK_URL"
		if strings.Contains(strings.ToLower(err.Error()), "secret") {
			name = "WEBHOOK_SECRET"
		}
		return pipeline.Config{}, badVar(name, "%v", err)
	}
	if c.Sink != "webhook" {
		pc.Sink = placeholderSink{}
	}
	if err := pc.Validate(); err != nil {
		name := "SLOT"
		if strings.Contains(err.Error(), "publication") {
			name = "PUBLICATION"
		}
		return pipeline.Config{}, badVar(name, "%v", err)
	}
	return pc, nil
}

func positive(n int) error {
	if n <= 0 {
		return fmt.Errorf("must be positive, got %d", n)
	}
	return nil
}

func positiveDur(d time.Duration) error {
	if d <= 0 {
		return fmt.Errorf("must be a positive duration, got %s", d)
	}
	return nil
}

func atLeast(d, floor time.Duration, what string) error {
	if d < floor {
		return fmt.Errorf("must be at least %s (%s), got %s", floor, what, d)
	}
	return nil
}

func nonNegativeDur(d time.Duration) error {
	if d < 0 {
		return fmt.Errorf("must not be negative, got %s", d)
	}
	return nil
}

// logger builds the zerolog logger from OUTBOXD_LOG_LEVEL and OUTBOXD_LOG_FORMAT.
func (c config) logger(w interface{ Write([]byte) (int, error) }) (zerolog.Logger, error) {
	level, err := zerolog.ParseLevel(strings.ToLower(c.LogLevel))
	if err != nil || c.LogLevel == "" {
		return zerolog.Nop(), badVar("LOG_LEVEL", "%q is not one of trace, debug, info, warn, error", c.LogLevel)
	}
	var out = w
	switch c.LogFormat {
	case "json":
	case "console":
		out = zerolog.ConsoleWriter{Out: w, TimeFormat: time.RFC3339}
	default:
		return zerolog.Nop(), badVar("LOG_FORMAT", "%q is not json or console", c.LogFormat)
	}
	return zerolog.New(out).Level(level).With().Timestamp().Logger(), nil
}
