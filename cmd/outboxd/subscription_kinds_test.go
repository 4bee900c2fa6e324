package main

import (
	"context"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"

	"github.com/rs/zerolog"
	"github.com/stretchr/testify/require"

	"github.com/outboxd/outboxd/decode"
	"github.com/outboxd/outboxd/deliver"
	"github.com/outboxd/outboxd/sink"
)

// The sink of a subscription of another kind takes its secrets from the
// references only (never the daemon's own key), refuses references outside
// OUTBOXD_SECRET_* and OUTBOXD_SECRETS_DIR naming the setting and never a
// value, and is held to the subscriptions' address guard even when the
// default sinks may reach private addresses.
func TestSubscriptionSinkOf(t *testing.T) {
	t.Parallel()
	var hits atomic.Int64
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		hits.Add(1)
		_, _ = w.Write([]byte(`{"status":1}`))
	}))
	t.Cleanup(srv.Close)
	dir := t.TempDir()
	require.NoError(t, os.WriteFile(filepath.Join(dir, "ORG_7_ph"), []byte("phc_from_file\n"), 0o600))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "outboxd_mask_key"), []byte("DAEMON-MASK-KEY\n"), 0o600))
	envMap := map[string]string{
		"OUTBOXD_POSTHOG_PROJECT_API_KEY": "phc_daemon_own", "OUTBOXD_ALLOW_PRIVATE_SINKS": "true",
		"OUTBOXD_SECRET_ORG_7_PH": "phc_from_env", "OUTBOXD_SECRET_ORG_8_PH": "phc_other", "OUTBOXD_DATABASE_URL": "postgres://u:dbpass@h/db",
	}
	build := func(c config, settings map[string]string) error {
		org := int64(7)
		_, err := c.subscriptionSinkOf(envMap, zerolog.Nop())(deliver.Subscription{ID: 7, OrganizationID: &org, Kind: "posthog", Settings: settings})
		return err
	}
	open := config{AllowPrivateSubscriptions: true, SecretsDir: dir}

	err := build(open, map[string]string{"HOST": srv.URL})
	require.ErrorContains(t, err, "a posthog subscription needs PROJECT_API_KEY_ENV or PROJECT_API_KEY_FILE", "the daemon's own key is not a subscription's")
	require.ErrorIs(t, err, sink.ErrPermanent, "the row's own: dead-lettered")
	require.NotContains(t, err.Error(), "phc_daemon_own")
	require.NoError(t, build(open, map[string]string{"HOST": srv.URL, "PROJECT_API_KEY_ENV": "OUTBOXD_SECRET_ORG_7_PH"}))
	require.NoError(t, build(open, map[string]string{"HOST": srv.URL, "PROJECT_API_KEY_FILE": "ORG_7_ph"}))
	for settings, want := range map[string]map[string]string{
		"setting PROJECT_API_KEY_ENV: name a variable OUTBOXD_SECRET_ORG_7_<NAME>": {"PROJECT_API_KEY_ENV": "OUTBOXD_DATABASE_URL"},
		"only its own organization's secrets":                                      {"PROJECT_API_KEY_ENV": "OUTBOXD_SECRET_ORG_8_PH"},
		"setting PROJECT_API_KEY_FILE: name a file ORG_7_<name>":                   {"PROJECT_API_KEY_FILE": "outboxd_mask_key"},
		"setting PROJECT_API_KEY_ENV: OUTBOXD_SECRET_ORG_7_NONE is not set":        {"PROJECT_API_KEY_ENV": "OUTBOXD_SECRET_ORG_7_NONE"},
		"setting PROJECT_API_KEY_FILE: read ORG_7_absent of OUTBOXD_SECRETS_DIR":   {"PROJECT_API_KEY_FILE": "ORG_7_absent"},
		"setting PROJECT_API_KEY is a secret":                                      {"PROJECT_API_KEY": "phc_inline"},
		"setting TOPIC is not one of a posthog subscription's":                     {"TOPIC": "x"},
	} {
		err := build(open, want)
		require.ErrorContains(t, err, settings)
		require.NotContains(t, err.Error(), "dbpass")
		require.NotContains(t, err.Error(), "phc_inline")
		require.NotContains(t, err.Error(), "DAEMON-MASK-KEY")
	}
	require.ErrorContains(t, build(config{AllowPrivateSubscriptions: true}, map[string]string{"PROJECT_API_KEY_FILE": "ORG_7_ph"}), "OUTBOXD_SECRETS_DIR is not set")

	// The subscriptions' guard: a loopback host is refused, never contacted,
	// though OUTBOXD_ALLOW_PRIVATE_SINKS=true lets the default sinks reach it.
	guarded := config{SecretsDir: dir}
	org := int64(7)
	s, err := guarded.subscriptionSinkOf(envMap, zerolog.Nop())(deliver.Subscription{ID: 7, OrganizationID: &org, Kind: "posthog",
		Settings: map[string]string{"HOST": srv.URL, "PROJECT_API_KEY_FILE": "ORG_7_ph"}})
	if err == nil {
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		out := s.Deliver(ctx, []*decode.Event{{ID: 1, Name: "batch_started", Body: []byte(`{"id":1,"event_name":"batch_started"}`)}})
		require.Len(t, out, 1)
		err = out[0].Err
	}
	require.ErrorContains(t, err, "forbidden destination address", "a private address refused by the subscriptions' guard")
	require.Zero(t, hits.Load(), "never contacted")
}

// OUTBOXD_SUBSCRIPTION_TOPIC_PREFIX is checked at start: NATS's system and
// reply namespaces, wildcards and placeholders are refused, naming the
// variable.
func TestSubscriptionTopicPrefixChecked(t *testing.T) {
	t.Parallel()
	for _, bad := range []string{"$JS.API.", "$SYS.", "_INBOX.", "tenants.*", "tenants.>", "t.{event_name}", "a b"} {
		_, _, err := loadConfig(map[string]string{"OUTBOXD_SUBSCRIPTION_TOPIC_PREFIX": bad})
		require.ErrorContains(t, err, "OUTBOXD_SUBSCRIPTION_TOPIC_PREFIX", bad)
	}
	c, _, err := loadConfig(map[string]string{"OUTBOXD_SUBSCRIPTION_TOPIC_PREFIX": "tenants."})
	require.NoError(t, err)
	org := int64(7)
	env := subscriptionEnv{topicPrefix: c.SubscriptionTopicPrefix}
	require.NoError(t, checkSubscriptionSettings("nats", &org, map[string]string{"SUBJECT": "tenants.{event_name}"}, env))
	require.ErrorContains(t, checkSubscriptionSettings("nats", &org, map[string]string{"SUBJECT": "$JS.API.STREAM.DELETE.EVENTS"}, env), "does not start with")
	require.ErrorContains(t, checkSubscriptionSettings("kafka", &org, map[string]string{"TOPIC": "tenants.x"}, subscriptionEnv{}), "kafka subscriptions are off")
}
