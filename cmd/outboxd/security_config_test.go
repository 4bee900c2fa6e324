package main

import (
	"context"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"github.com/stretchr/testify/require"

	"github.com/outboxd/outboxd/decode"
	"github.com/outboxd/outboxd/internal/e2e"
	"github.com/outboxd/outboxd/sink"
)

// runInProcess runs the CLI with exactly environ and returns the exit code
// and everything written. Nothing listens at the database URLs used here, so
// a command that got past its configuration would exit 1, not 2.
func runInProcess(t *testing.T, env map[string]string, args ...string) (int, string) {
	t.Helper()
	var environ []string
	for k, v := range env {
		environ = append(environ, k+"="+v)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	var out toolsBuffer
	err := run(ctx, args, nil, environ, &out, &out)
	return exitCode(err, &out), out.String()
}

// securityBase is a complete `run` configuration but for the signing
// secret: the database URL points at a closed port.
func securityBase(extra map[string]string) map[string]string {
	env := map[string]string{
		"OUTBOXD_DATABASE_URL": "postgres://u@127.0.0.1:1/db?connect_timeout=2",
		"OUTBOXD_WEBHOOK_URL":  "https://example.com/hook",
		"OUTBOXD_HTTP_ADDR":    "",
	}
	for k, v := range extra {
		env[k] = v
	}
	return env
}

// An unknown OUTBOXD_* variable close to a known name is a misspelling:
// every command refuses to start (exit 2) naming the variable meant, and
// never prints the value, which may be a secret. Other unknown variables
// stay warnings. (Security round 2, item 1.)
func TestNearMissVariableExits2NamingTheOneMeant(t *testing.T) {
	t.Parallel()
	const value = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
	env := securityBase(map[string]string{"OUTBOXD_WEBHOOK_SECRETS": value})
	for _, args := range [][]string{{"run"}, {"migrate"}, {"status"}, {"dlq", "list"}, {"subscription", "list"}, {"replay", "--dry-run"}, {"dev"}} {
		t.Run(strings.Join(args, "_"), func(t *testing.T) {
			t.Parallel()
			code, out := runInProcess(t, env, args...)
			require.Equal(t, 2, code, out)
			require.Contains(t, out, "OUTBOXD_WEBHOOK_SECRETS is not a setting; did you mean OUTBOXD_WEBHOOK_SECRET?")
			require.NotContains(t, out, value)
			require.NotContains(t, out, strings.TrimPrefix(value, "whsec_"))
			require.NotContains(t, out, "starting PostgreSQL")
		})
	}
	// With the secret set too, the misspelt twin is still refused.
	code, out := runInProcess(t, securityBase(map[string]string{"OUTBOXD_WEBHOOK_SECRET": e2e.Secret, "OUTBOXD_WEBHOOK_TIMEOUTS": "1s"}), "run")
	require.Equal(t, 2, code, out)
	require.Contains(t, out, "OUTBOXD_WEBHOOK_TIMEOUTS is not a setting; did you mean OUTBOXD_WEBHOOK_TIMEOUT?")
}

func TestNearestVariable(t *testing.T) {
	t.Parallel()
	known := knownVars()
	for name, want := range map[string]string{
		"OUTBOXD_WEBHOOK_SECRETS":             "OUTBOXD_WEBHOOK_SECRET",
		"OUTBOXD_WEBHOOK_SECRT":               "OUTBOXD_WEBHOOK_SECRET",
		"OUTBOXD_WEBHOOK_SECERT":              "OUTBOXD_WEBHOOK_SECRET",
		"OUTBOXD_webhook_secret":              "OUTBOXD_WEBHOOK_SECRET",
		"OUTBOXD_WEBHOOK_SECRET_FILE":         "OUTBOXD_WEBHOOK_SECRET",
		"OUTBOXD_OUTBOXD_WEBHOOK_SECRET":      "OUTBOXD_WEBHOOK_SECRET",
		"OUTBOXD_WEBHOOK_UNSINGED":            "OUTBOXD_WEBHOOK_UNSIGNED",
		"OUTBOXD_ALLOW_PRIVATE_SINK":          "OUTBOXD_ALLOW_PRIVATE_SINKS",
		"OUTBOXD_ALLOW_PRIVATE_SUBSCRIPTION":  "OUTBOXD_ALLOW_PRIVATE_SUBSCRIPTIONS",
		"OUTBOXD_KAFKA_SASL_PASWORD":          "OUTBOXD_KAFKA_SASL_PASSWORD",
		"OUTBOXD_KAFKA_TOPC":                  "OUTBOXD_KAFKA_TOPIC",
		"OUTBOXD_POSTHOG_PROJECT_API_KEYS":    "OUTBOXD_POSTHOG_PROJECT_API_KEY",
		"OUTBOXD_SNK":                         "OUTBOXD_SINK",
		"OUTBOXD_SINKSS":                      "OUTBOXD_SINKS",
		"OUTBOXD_TABEL":                       "OUTBOXD_TABLE",
		"OUTBOXD_SLOT_RECREATED":              "OUTBOXD_SLOT_RECREATE",
		"OUTBOXD_DATABASE_URI":                "OUTBOXD_DATABASE_URL",
		"OUTBOXD_REPLICATION_SLOT":            "OUTBOXD_SLOT",
		"OUTBOXD_ALLOW_PRIVATE_SUBSCRIPTIONZ": "OUTBOXD_ALLOW_PRIVATE_SUBSCRIPTIONS",
	} {
		require.Equal(t, want, nearestVar(name, known), name)
	}
	for _, name := range []string{"OUTBOXD_PORT", "OUTBOXD_HOST", "OUTBOXD_REGION", "OUTBOXD_PG_CACHE", "OUTBOXD_SOMETHING_ELSE", "OUTBOXD_X"} {
		require.Empty(t, nearestVar(name, known), name)
	}
	// Far from every name: a warning, not an error; the test suites'
	// variables are neither.
	env := map[string]string{"OUTBOXD_SOMETHING_ELSE": "x", "OUTBOXD_TEST_DATABASE_URL": "x", "OUTBOXD_FAULT_LOG_LEVEL": "debug"}
	require.NoError(t, checkNearMisses(env))
	_, warnings, err := loadConfig(env)
	require.NoError(t, err)
	require.Equal(t, []string{"unknown variable OUTBOXD_SOMETHING_ELSE ignored"}, warnings)
	require.Equal(t, 1, editDistance("SECRET", "SECRETS"))
	require.Equal(t, 1, editDistance("SECRET", "SECERT"))
	require.Equal(t, 0, editDistance("", ""))
	require.Equal(t, 3, editDistance("abc", ""))
}

// The default webhook signs, or is unsigned because
// OUTBOXD_WEBHOOK_UNSIGNED=true says so: never because the secret is
// missing. Both at once is a contradiction. (Security round 2, item 1.)
func TestWebhookSecretOrExplicitUnsigned(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name  string
		env   map[string]string
		wants []string
	}{
		{"no secret", nil, []string{"OUTBOXD_WEBHOOK_SECRET: required", "OUTBOXD_WEBHOOK_UNSIGNED=true"}},
		{"empty secret", map[string]string{"OUTBOXD_WEBHOOK_SECRET": ""}, []string{"OUTBOXD_WEBHOOK_SECRET: required", "OUTBOXD_WEBHOOK_UNSIGNED=true"}},
		{"separators only", map[string]string{"OUTBOXD_WEBHOOK_SECRET": " , "}, []string{"OUTBOXD_WEBHOOK_SECRET: required"}},
		{"unsigned false", map[string]string{"OUTBOXD_WEBHOOK_UNSIGNED": "false"}, []string{"OUTBOXD_WEBHOOK_SECRET: required"}},
		{"secret and unsigned", map[string]string{"OUTBOXD_WEBHOOK_SECRET": e2e.Secret, "OUTBOXD_WEBHOOK_UNSIGNED": "true"},
			[]string{"OUTBOXD_WEBHOOK_UNSIGNED:", "OUTBOXD_WEBHOOK_SECRET"}},
		{"bad unsigned", map[string]string{"OUTBOXD_WEBHOOK_UNSIGNED": "maybe"}, []string{"OUTBOXD_WEBHOOK_UNSIGNED"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			code, out := runInProcess(t, securityBase(tc.env), "run")
			require.Equal(t, 2, code, out)
			for _, want := range tc.wants {
				require.Contains(t, out, want)
			}
			require.NotContains(t, out, strings.TrimPrefix(e2e.Secret, "whsec_"))
		})
	}
	for _, tc := range []struct {
		name string
		env  map[string]string
	}{
		{"secret", map[string]string{"OUTBOXD_WEBHOOK_SECRET": e2e.Secret}},
		{"unsigned on purpose", map[string]string{"OUTBOXD_WEBHOOK_UNSIGNED": "true"}},
		{"another sink needs no webhook secret", map[string]string{"OUTBOXD_SINK": "stdout"}},
	} {
		c, _, err := loadConfig(securityBase(tc.env))
		require.NoError(t, err, tc.name)
		require.NoError(t, c.checkSigning(), tc.name)
		pc, err := c.pipelineConfig()
		require.NoError(t, err, tc.name)
		require.Equal(t, tc.env["OUTBOXD_WEBHOOK_SECRET"] != "", len(pc.Webhook.Secrets) > 0, tc.name)
	}
}

// `outboxd dev` signs with a secret of its own, whatever the user's
// environment says about signing.
func TestDevSignsWhateverTheEnvironmentSays(t *testing.T) {
	t.Parallel()
	for _, user := range []map[string]string{nil, {"OUTBOXD_WEBHOOK_UNSIGNED": "true"}, {"OUTBOXD_WEBHOOK_SECRET": ""}} {
		secret, err := devWebhookSecret()
		require.NoError(t, err)
		c, _, err := setup(devEnv(user, "postgres://postgres@127.0.0.1:5432/postgres", "http://127.0.0.1:9/", secret), new(toolsBuffer), nil)
		require.NoError(t, err, "%v", user)
		pc, err := c.pipelineConfig()
		require.NoError(t, err, "%v", user)
		require.Equal(t, []string{secret}, pc.Webhook.Secrets)
	}
}

// Kafka credentials without a mechanism would be ignored (an
// unauthenticated connection): bad configuration, naming the variable.
func TestKafkaCredentialsNeedAMechanism(t *testing.T) {
	t.Parallel()
	for _, extra := range []map[string]string{
		{"OUTBOXD_KAFKA_SASL_USERNAME": "u", "OUTBOXD_KAFKA_SASL_PASSWORD": "pw-s3cret"},
		{"OUTBOXD_KAFKA_SASL_PASSWORD": "pw-s3cret"},
	} {
		env := map[string]string{"OUTBOXD_KAFKA_BROKERS": "127.0.0.1:1", "OUTBOXD_KAFKA_TOPIC": "t"}
		for k, v := range extra {
			env[k] = v
		}
		_, err := buildSink("kafka", env, zerolog.Nop())
		require.Error(t, err)
		require.ErrorAs(t, err, new(configError))
		require.Contains(t, err.Error(), "OUTBOXD_KAFKA_SASL_MECHANISM:")
		require.NotContains(t, err.Error(), "s3cret")
	}
}

// OUTBOXD_ALLOW_PRIVATE_SINKS opens private addresses to the default
// destination only; subscription URLs have their own switch,
// OUTBOXD_ALLOW_PRIVATE_SUBSCRIPTIONS, and a subscription webhook refused by
// the guard never connects and fails permanently naming that switch.
// (Security round 2, item 5.)
func TestSubscriptionsHaveTheirOwnPrivateAllowance(t *testing.T) {
	t.Parallel()
	var hits atomic.Int64
	srv := httptest.NewServer(http.HandlerFunc(func(http.ResponseWriter, *http.Request) { hits.Add(1) }))
	t.Cleanup(srv.Close)
	ev := &decode.Event{ID: 1, Name: "e", Body: []byte(`{"id":1}`)}
	deliver := func(wc sink.WebhookConfig) error {
		w, err := sink.NewWebhook(wc, zerolog.Nop())
		require.NoError(t, err)
		defer w.Close()
		return w.Deliver(t.Context(), []*decode.Event{ev})[0].Err
	}
	for _, tc := range []struct {
		sinks, subs string
	}{{"true", "false"}, {"false", "false"}, {"false", "true"}, {"true", "true"}} {
		c, _, err := loadConfig(securityBase(map[string]string{"OUTBOXD_WEBHOOK_SECRET": e2e.Secret,
			"OUTBOXD_ALLOW_PRIVATE_SINKS": tc.sinks, "OUTBOXD_ALLOW_PRIVATE_SUBSCRIPTIONS": tc.subs}))
		require.NoError(t, err)
		pc, err := c.pipelineConfig()
		require.NoError(t, err)
		require.Equal(t, tc.sinks == "true", pc.Webhook.AllowPrivate)
		sub := pc.Webhook.ForSubscription("subscription:7", srv.URL+"/tenant", []string{e2e.Secret})
		require.Equal(t, tc.subs == "true", sub.AllowPrivate, "sinks=%s subscriptions=%s", tc.sinks, tc.subs)
		require.Equal(t, "subscription:7", sub.Name)
		require.Equal(t, pc.Webhook.Timeout, sub.Timeout, "the rest comes from the default webhook")

		before := hits.Load()
		err = deliver(sub)
		if tc.subs == "true" {
			require.NoError(t, err)
			require.Equal(t, before+1, hits.Load())
			continue
		}
		require.ErrorIs(t, err, sink.ErrForbiddenAddress)
		require.ErrorIs(t, err, sink.ErrPermanent)
		require.Contains(t, err.Error(), "OUTBOXD_ALLOW_PRIVATE_SUBSCRIPTIONS=true")
		require.NotContains(t, err.Error(), "OUTBOXD_ALLOW_PRIVATE_SINKS")
		require.Equal(t, before, hits.Load(), "never connected")
	}
	// The default webhook's refusal names its own switch.
	c, _, err := loadConfig(securityBase(map[string]string{"OUTBOXD_WEBHOOK_SECRET": e2e.Secret,
		"OUTBOXD_WEBHOOK_URL": srv.URL, "OUTBOXD_ALLOW_PRIVATE_SUBSCRIPTIONS": "true"}))
	require.NoError(t, err)
	pc, err := c.pipelineConfig()
	require.NoError(t, err)
	err = deliver(pc.Webhook)
	require.ErrorIs(t, err, sink.ErrForbiddenAddress)
	require.Contains(t, err.Error(), "OUTBOXD_ALLOW_PRIVATE_SINKS=true")
	require.EqualValues(t, 2, hits.Load(), "only the two allowed subscription deliveries arrived")
}
