package main

import (
	"errors"
	"fmt"
	"reflect"
	"regexp"
	"slices"
	"sort"
	"strconv"
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
	Sinks              string        `env:"SINKS"`
	WebhookURL         string        `env:"WEBHOOK_URL"`
	WebhookSecret      string        `env:"WEBHOOK_SECRET"`
	WebhookUnsigned    bool          `env:"WEBHOOK_UNSIGNED" envDefault:"false"`
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
	// AllowPrivateSubscriptions is the address guard of the tenant
	// subscription URLs, independent of AllowPrivateSinks (G8).
	AllowPrivateSubscriptions bool `env:"ALLOW_PRIVATE_SUBSCRIPTIONS" envDefault:"false"`
	// SecretsDir holds the files subscription rows of other kinds than
	// webhook reference their secrets by (KEY_FILE settings).
	SecretsDir string `env:"SECRETS_DIR"`
	// SubscriptionTopicPrefix is the start every Kafka topic and NATS
	// subject of a subscription row must have ("": such rows refused).
	SubscriptionTopicPrefix string `env:"SUBSCRIPTION_TOPIC_PREFIX"`
	// SubscriptionMaxConnsPerHost caps the connections the tenant
	// subscriptions' webhooks open to one host (0: no cap).
	SubscriptionMaxConnsPerHost int `env:"SUBSCRIPTION_MAX_CONNS_PER_HOST" envDefault:"64"`
	// SubscriptionDisableAfter disables a tenant subscription failing for
	// that long (0: never).
	SubscriptionDisableAfter time.Duration `env:"SUBSCRIPTION_DISABLE_AFTER" envDefault:"24h"`

	SlotRecreate    bool          `env:"SLOT_RECREATE" envDefault:"false"`
	SlotFailover    bool          `env:"SLOT_FAILOVER" envDefault:"true"`
	FlushInterval   time.Duration `env:"FLUSH_INTERVAL" envDefault:"200ms"`
	FlushSize       int           `env:"FLUSH_SIZE" envDefault:"1000"`
	StatusInterval  time.Duration `env:"STATUS_INTERVAL" envDefault:"1s"`
	ShutdownTimeout time.Duration `env:"SHUTDOWN_TIMEOUT" envDefault:"10s"`
	// MaxInFlight is resolved by loadConfig when unset or 0: see
	// defaultMaxInFlight.
	MaxInFlight int `env:"MAX_IN_FLIGHT" envDefault:"5000"`

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

	// The tracking plan's policies (README "Tracking plan"): what a target
	// does with an event that breaks the plan. OUTBOXD_<KIND>_CONTRACT sets
	// a destination of OUTBOXD_SINKS other than the webhook.
	ContractPolicy       string `env:"CONTRACT_POLICY" envDefault:"deliver"`
	WebhookContract      string `env:"WEBHOOK_CONTRACT"`
	SubscriptionContract string `env:"SUBSCRIPTION_CONTRACT"`
}

// configError is bad configuration: exit code 2, message naming the variable.
type configError struct{ msg string }

func (e configError) Error() string { return e.msg }

func badVar(name, format string, args ...any) error {
	return configError{envPrefix + name + ": " + fmt.Sprintf(format, args...)}
}

// loadConfig reads the OUTBOXD_* variables from environ. It returns warnings
// for unknown OUTBOXD_* variables; checkNearMisses refuses those close to a
// known name.
func loadConfig(environ map[string]string) (config, []string, error) {
	var c config
	if err := checkBothSinks(environ); err != nil {
		return c, nil, err
	}
	err := env.ParseWithOptions(&c, env.Options{Environment: environ, Prefix: envPrefix})
	if err != nil {
		return c, nil, configError{describeEnvError(err, config{})}
	}
	if err := checkTopicPrefix(c.SubscriptionTopicPrefix); err != nil {
		return c, nil, err
	}
	if strings.TrimSpace(environ[envPrefix+"MAX_IN_FLIGHT"]) == "" || c.MaxInFlight == 0 {
		c.MaxInFlight = defaultMaxInFlight(c.WebhookBatchSize, environ)
	}
	var warnings []string
	for _, k := range unknownVars(environ) {
		warnings = append(warnings, fmt.Sprintf("unknown variable %s ignored", k))
	}
	return c, warnings, nil
}

// maxInFlightDefault is OUTBOXD_MAX_IN_FLIGHT when it is unset or 0, unless a
// batch size is larger (also config.MaxInFlight's envDefault, which
// deploy/outboxd.env.example shows). It was 10,000; 5,000 holds the same
// throughput (bench: per-event drain at txn 1, alternated) with 56 MB peak
// RSS instead of 73.
const maxInFlightDefault = 5000

// defaultMaxInFlight returns OUTBOXD_MAX_IN_FLIGHT's default: 5,000, or the
// largest batch size configured (the webhook's, or any destination's
// OUTBOXD_<KIND>_BATCH_SIZE) when larger, so that no batch size is refused
// for exceeding it. Malformed batch sizes are left to their own checks.
func defaultMaxInFlight(webhookBatch int, environ map[string]string) int {
	n := max(maxInFlightDefault, webhookBatch)
	for k, v := range environ {
		if strings.HasPrefix(k, envPrefix) && strings.HasSuffix(k, "_BATCH_SIZE") {
			if b, err := strconv.Atoi(strings.TrimSpace(v)); err == nil {
				n = max(n, b)
			}
		}
	}
	return n
}

// testVarPrefixes are the prefixes of variables the test suites read
// (internal/pgtest, test/fault): never settings, so neither warned about nor
// refused as a misspelling.
var testVarPrefixes = []string{envPrefix + "TEST_", envPrefix + "FAULT_"}

// knownVars returns every variable outboxd reads: config's and the sinks'.
func knownVars() map[string]bool {
	known := map[string]bool{}
	for _, name := range envVars(config{}) {
		known[name] = true
	}
	for _, e := range sinkEnvs {
		for _, name := range envVars(e) {
			known[name] = true
		}
	}
	for _, name := range append(destVars(), filterMaskVars()...) {
		known[name] = true
	}
	for _, name := range guardVars() {
		known[name] = true
	}
	return known
}

// unknownVars returns, sorted, the OUTBOXD_* names in environ outboxd does
// not read.
func unknownVars(environ map[string]string) []string {
	known := knownVars()
	var unknown []string
	for k := range environ {
		if !strings.HasPrefix(k, envPrefix) || known[k] || strings.HasPrefix(k, subscriptionSecretPrefix) {
			continue // OUTBOXD_SECRET_*: secrets subscription rows reference
		}
		test := false
		for _, p := range testVarPrefixes {
			test = test || strings.HasPrefix(k, p)
		}
		if !test {
			unknown = append(unknown, k)
		}
	}
	sort.Strings(unknown)
	return unknown
}

// checkNearMisses refuses unknown OUTBOXD_* variables close to a known name
// (docs/DESIGN.md §4): a misspelt setting must not quietly leave its default
// in force (OUTBOXD_WEBHOOK_SECRETS would leave every request unsigned).
// Other unknown variables stay warnings (loadConfig). Only names are
// compared and printed, never a value: it may be a secret.
func checkNearMisses(environ map[string]string) error {
	known := knownVars()
	var msgs []string
	for _, k := range unknownVars(environ) {
		if meant := nearestVar(k, known); meant != "" {
			msgs = append(msgs, fmt.Sprintf("%s is not a setting; did you mean %s?", k, meant))
		}
	}
	if msgs == nil {
		return nil
	}
	return configError{strings.Join(msgs, "; ")}
}

// nearestVar returns the known variable name is a near miss of, or "": the
// same name in another case, a name within a small edit distance (one edit
// for names of up to five letters after the prefix, two for longer ones;
// plural and singular among them), or a known name with a word added before
// or after it (OUTBOXD_WEBHOOK_SECRET_FILE, OUTBOXD_OUTBOXD_SLOT). Of several,
// the closest wins, then the first in alphabetical order.
func nearestVar(name string, known map[string]bool) string {
	u := strings.ToUpper(strings.TrimPrefix(name, envPrefix))
	best, bestDist := "", -1
	for k := range known {
		kb := strings.TrimPrefix(k, envPrefix)
		d := editDistance(u, kb)
		limit := 2
		if len(kb) <= 5 {
			limit = 1
		}
		if d > limit && !strings.HasPrefix(u, kb+"_") && !strings.HasSuffix(u, "_"+kb) {
			continue
		}
		if bestDist < 0 || d < bestDist || (d == bestDist && k < best) {
			best, bestDist = k, d
		}
	}
	return best
}

// editDistance is the optimal string alignment distance of a and b:
// insertions, deletions, substitutions and transpositions of adjacent bytes.
func editDistance(a, b string) int {
	prev2 := make([]int, len(b)+1)
	prev := make([]int, len(b)+1)
	cur := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
			if i > 1 && j > 1 && a[i-1] == b[j-2] && a[i-2] == b[j-1] {
				cur[j] = min(cur[j], prev2[j-2]+1)
			}
		}
		prev2, prev, cur = prev, cur, prev2
	}
	return prev[len(b)]
}

// describeEnvError names the variable behind each parse error of
// caarlos0/env, which reports struct field names; v is the struct (or a
// pointer to it) that was parsed.
func describeEnvError(err error, v any) string {
	var agg env.AggregateError
	if !errors.As(err, &agg) {
		return err.Error()
	}
	t := reflect.TypeOf(v)
	if t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
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
	if err := (migrations.Options{Schema: table.Schema, Table: table.Name}).Validate(); err != nil {
		return badVar("TABLE", "%v", err)
	}
	if !slotNameRE.MatchString(c.Slot) {
		return badVar("SLOT", "%q must be 1-63 characters of a-z, 0-9 and _ (Postgres's rule for replication slot names)", c.Slot)
	}
	if err := (migrations.Options{Publication: c.Publication}).Validate(); err != nil {
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
	kinds, _, err := c.sinkKinds()
	if err != nil {
		return pipeline.Config{}, err
	}
	webhook := slices.Contains(kinds, "webhook")
	if webhook && c.WebhookURL == "" {
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
	secrets := c.webhookSecrets()
	pc := pipeline.Config{
		DatabaseURL: c.DatabaseURL, Table: table, Slot: c.Slot, Publication: c.Publication,
		SlotRecreate: c.SlotRecreate, SlotFailover: c.SlotFailover,
		Deliver: deliver.Config{Ordering: ordering, Concurrency: c.WebhookConcurrency, BatchSize: c.WebhookBatchSize,
			BatchWait: c.WebhookBatchWait, MaxInFlight: c.MaxInFlight},
		Webhook: sink.WebhookConfig{Name: "webhook", URL: c.WebhookURL, Secrets: secrets,
			HTTPConfig: sink.HTTPConfig{Timeout: c.WebhookTimeout, AllowPrivate: c.AllowPrivateSinks,
				RetryConfig: sink.RetryConfig{MaxAttempts: c.WebhookMaxAttempts, BackoffMin: backoffMin(c.WebhookBackoffMax), BackoffMax: c.WebhookBackoffMax}},
			AllowPrivateSetting:             envPrefix + "ALLOW_PRIVATE_SINKS",
			SubscriptionAllowPrivate:        c.AllowPrivateSubscriptions,
			SubscriptionAllowPrivateSetting: envPrefix + "ALLOW_PRIVATE_SUBSCRIPTIONS",
			SubscriptionMaxConnsPerHost:     c.SubscriptionMaxConnsPerHost},
		DefaultEvents: events, Schedule: schedule, SubscriptionDisableAfter: c.SubscriptionDisableAfter,
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
		{"MAX_IN_FLIGHT", positive(c.MaxInFlight)}, // 0 was resolved to the default
		{"FLUSH_SIZE", positive(c.FlushSize)},
		{"WEBHOOK_MAX_ATTEMPTS", positive(c.WebhookMaxAttempts)},
		{"WEBHOOK_TIMEOUT", positiveDur(c.WebhookTimeout)},
		{"WEBHOOK_BACKOFF_MAX", positiveDur(c.WebhookBackoffMax)},
		{"FLUSH_INTERVAL", positiveDur(c.FlushInterval)},
		{"STATUS_INTERVAL", positiveDur(c.StatusInterval)},
		{"SHUTDOWN_TIMEOUT", positiveDur(c.ShutdownTimeout)},
		{"WEBHOOK_BATCH_WAIT", nonNegativeDur(c.WebhookBatchWait)},
		{"SUBSCRIPTION_MAX_CONNS_PER_HOST", nonNegative(c.SubscriptionMaxConnsPerHost)},
		{"SUBSCRIPTION_DISABLE_AFTER", nonNegativeDur(c.SubscriptionDisableAfter)},
		{"HEARTBEAT_INTERVAL", nonNegativeDur(c.HeartbeatInterval)},
		{"REPLICATION_TIMEOUT", atLeast(c.ReplicationTimeout, 2*c.StatusInterval, "twice OUTBOXD_STATUS_INTERVAL")},
	}
	for _, ch := range checks {
		if ch.err != nil {
			return pipeline.Config{}, badVar(ch.name, "%v", ch.err)
		}
	}
	// The delivery settings alone, to name their variable; pc.WithDefaults
	// then takes the first retry from the schedule.
	if err := pc.Deliver.WithDefaults().Validate(); err != nil {
		return pipeline.Config{}, badVar("WEBHOOK_CONCURRENCY", "%v", err)
	}
	if !webhook {
		// The sinks are built by buildSink; the webhook settings are unused.
	} else if err := pc.Webhook.WithDefaults().Validate(); err != nil {
		name := "WEBHOOK_URL"
		if strings.Contains(strings.ToLower(err.Error()), "secret") {
			name = "WEBHOOK_SECRET"
		}
		return pipeline.Config{}, badVar(name, "%v", err)
	}
	if !webhook {
		pc.Sink = placeholderSink{}
	}
	pc = pc.WithDefaults()
	if err := pc.Validate(); err != nil {
		name := "SLOT"
		if strings.Contains(err.Error(), "publication") {
			name = "PUBLICATION"
		}
		return pipeline.Config{}, badVar(name, "%v", err)
	}
	return pc, nil
}

// webhookSecrets splits OUTBOXD_WEBHOOK_SECRET (comma- or space-separated).
func (c config) webhookSecrets() []string {
	secrets := strings.Fields(strings.ReplaceAll(c.WebhookSecret, ",", " "))
	if len(secrets) == 0 {
		return nil
	}
	return secrets
}

// checkSigning applies the signing rule of the default webhook (docs/DESIGN.md
// §4, G8): it signs with OUTBOXD_WEBHOOK_SECRET, and sends unsigned requests
// only when OUTBOXD_WEBHOOK_UNSIGNED=true says that is meant, never because a
// variable is missing (or misspelt: checkNearMisses). Both at once is a
// contradiction. `run` checks it after the other settings (pipelineConfig,
// monitorConfig), so that their errors keep naming their own variable.
func (c config) checkSigning() error {
	secrets := c.webhookSecrets()
	if c.WebhookUnsigned && len(secrets) > 0 {
		return badVar("WEBHOOK_UNSIGNED", "true contradicts %sWEBHOOK_SECRET, which is set: requests are either signed or unsigned; unset one of the two", envPrefix)
	}
	if c.usesWebhook() && !c.WebhookUnsigned && len(secrets) == 0 {
		return badVar("WEBHOOK_SECRET", "required: the Standard Webhooks secret (whsec_ + base64) requests are signed with; to send unsigned requests on purpose, set %sWEBHOOK_UNSIGNED=true", envPrefix)
	}
	return nil
}

func positive(n int) error {
	if n <= 0 {
		return fmt.Errorf("must be positive, got %d", n)
	}
	return nil
}

func nonNegative(n int) error {
	if n < 0 {
		return fmt.Errorf("must be 0 or positive, got %d", n)
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
