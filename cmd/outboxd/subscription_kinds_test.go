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
	require.NoError(t, os.WriteFile(filepath.Join(dir, "ph"), []byte("phc_from_file\n"), 0o600))
	envMap := map[string]string{
		"OUTBOXD_POSTHOG_PROJECT_API_KEY": "phc_daemon_own", "OUTBOXD_ALLOW_PRIVATE_SINKS": "true",
		"OUTBOXD_SECRET_T7": "phc_from_env", "OUTBOXD_DATABASE_URL": "postgres://u:dbpass@h/db",
	}
	build := func(c config, settings map[string]string) error {
		_, err := c.subscriptionSinkOf(envMap, zerolog.Nop())(deliver.Subscription{ID: 7, Kind: "posthog", Settings: settings})
		return err
	}
	open := config{AllowPrivateSubscriptions: true, SecretsDir: dir}

	err := build(open, map[string]string{"HOST": srv.URL})
	require.ErrorContains(t, err, "POSTHOG_PROJECT_API_KEY: required", "the daemon's own key is not a subscription's")
	require.NotContains(t, err.Error(), "phc_daemon_own")
	require.NoError(t, build(open, map[string]string{"HOST": srv.URL, "PROJECT_API_KEY_ENV": "OUTBOXD_SECRET_T7"}))
	require.NoError(t, build(open, map[string]string{"HOST": srv.URL, "PROJECT_API_KEY_FILE": "ph"}))
	for settings, want := range map[string]map[string]string{
		"setting PROJECT_API_KEY_ENV: name a variable OUTBOXD_SECRET_<NAME>": {"PROJECT_API_KEY_ENV": "OUTBOXD_DATABASE_URL"},
		"setting PROJECT_API_KEY_ENV: OUTBOXD_SECRET_NONE is not set":        {"PROJECT_API_KEY_ENV": "OUTBOXD_SECRET_NONE"},
		"setting PROJECT_API_KEY_FILE: read absent of OUTBOXD_SECRETS_DIR":   {"PROJECT_API_KEY_FILE": "absent"},
		"setting PROJECT_API_KEY is a secret":                                {"PROJECT_API_KEY": "phc_inline"},
		"setting TOPIC is not one of a posthog subscription's":               {"TOPIC": "x"},
	} {
		err := build(open, want)
		require.ErrorContains(t, err, settings)
		require.NotContains(t, err.Error(), "dbpass")
		require.NotContains(t, err.Error(), "phc_inline")
	}
	require.ErrorContains(t, build(config{AllowPrivateSubscriptions: true}, map[string]string{"PROJECT_API_KEY_FILE": "ph"}), "OUTBOXD_SECRETS_DIR is not set")

	// The subscriptions' guard: a loopback host is refused, never contacted,
	// though OUTBOXD_ALLOW_PRIVATE_SINKS=true lets the default sinks reach it.
	guarded := config{SecretsDir: dir}
	s, err := guarded.subscriptionSinkOf(envMap, zerolog.Nop())(deliver.Subscription{ID: 7, Kind: "posthog",
		Settings: map[string]string{"HOST": srv.URL, "PROJECT_API_KEY_FILE": "ph"}})
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
