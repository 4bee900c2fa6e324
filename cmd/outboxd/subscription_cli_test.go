package main

import (
	"context"
	"encoding/json"
	"regexp"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/outboxd/outboxd/internal/e2e"
	"github.com/outboxd/outboxd/internal/pgtest"
)

// The subscription commands manage rows of outboxd_subscription; secrets
// are printed once by add and rotate-secret and never by list.
func TestSubscriptionCommands(t *testing.T) {
	t.Parallel()
	b := newBundle(t, pgtest.Shared(t), nil)
	code, out := e2e.RunCommand(t, b.env, "subscription", "add", "--url", "https://tenant7.example/hooks", "--organization", "7", "--events", "batch_*,inventory_adjusted")
	require.Equal(t, 0, code, out)
	m := regexp.MustCompile(`subscription (\d+) added\nsecret: (whsec_\S+)`).FindStringSubmatch(out)
	require.NotNil(t, m, out)
	id, secret := m[1], m[2]

	code, out = e2e.RunCommand(t, b.env, "subscription", "add", "--url", "not a url")
	require.Equal(t, 2, code, out)

	code, out = e2e.RunCommand(t, b.env, "subscription", "list", "--json")
	require.Equal(t, 0, code, out)
	require.NotContains(t, out, secret, "list never shows secrets")
	var subs []struct {
		ID      int64    `json:"id"`
		Org     *int64   `json:"organization_id"`
		Events  []string `json:"events"`
		Secrets int      `json:"secrets"`
		Enabled bool     `json:"enabled"`
	}
	require.NoError(t, json.Unmarshal([]byte(out[strings.Index(out, "["):]), &subs))
	require.Len(t, subs, 1)
	require.Equal(t, int64(7), *subs[0].Org)
	require.Equal(t, []string{"batch_*", "inventory_adjusted"}, subs[0].Events)
	require.True(t, subs[0].Enabled)

	code, out = e2e.RunCommand(t, b.env, "subscription", "disable", id)
	require.Equal(t, 2, code, "disable needs --yes: %s", out)
	code, out = e2e.RunCommand(t, b.env, "subscription", "disable", id, "--yes", "--reason", "customer request")
	require.Equal(t, 0, code, out)
	var enabled bool
	var reason string
	require.NoError(t, b.pool.QueryRow(context.Background(), `SELECT enabled, disabled_reason FROM outboxd_subscription WHERE id = $1::bigint`, id).Scan(&enabled, &reason))
	require.False(t, enabled)
	require.Equal(t, "customer request", reason)

	code, out = e2e.RunCommand(t, b.env, "subscription", "rotate-secret", id)
	require.Equal(t, 0, code, out)
	newSecret := regexp.MustCompile(`new secret: (whsec_\S+)`).FindStringSubmatch(out)[1]
	var secrets []string
	require.NoError(t, b.pool.QueryRow(context.Background(), `SELECT secrets FROM outboxd_subscription WHERE id = $1::bigint`, id).Scan(&secrets))
	require.Equal(t, []string{newSecret, secret}, secrets, "both sign during the rotation, newest first")

	code, out = e2e.RunCommand(t, b.env, "subscription", "rotate-secret", id, "--drop-old")
	require.Equal(t, 2, code, "--drop-old needs --yes: %s", out)
	code, out = e2e.RunCommand(t, b.env, "subscription", "rotate-secret", id, "--drop-old", "--yes")
	require.Equal(t, 0, code, out)
	require.NoError(t, b.pool.QueryRow(context.Background(), `SELECT secrets FROM outboxd_subscription WHERE id = $1::bigint`, id).Scan(&secrets))
	require.Equal(t, []string{newSecret}, secrets)

	code, out = e2e.RunCommand(t, b.env, "subscription", "enable", "999999")
	require.Equal(t, 1, code, out)
	require.Contains(t, out, "not found")
}

// `subscription add` without --events (or with an empty list) adds a
// subscription to every event, as its help says: events is '{}', not NULL
// (issue 11 item 10: it failed with a NOT NULL violation).
func TestSubscriptionAddWithoutEventsTakesEveryEvent(t *testing.T) {
	t.Parallel()
	b := newBundle(t, pgtest.Shared(t), nil)
	var ids []string
	for _, args := range [][]string{
		{"subscription", "add", "--url", "https://platform.example/hooks"},
		{"subscription", "add", "--url", "https://tenant8.example/hooks", "--organization", "8", "--events", ""},
		{"subscription", "add", "--url", "https://tenant9.example/hooks", "--organization", "9", "--events", " , "},
	} {
		code, out := e2e.RunCommand(t, b.env, args...)
		require.Equal(t, 0, code, out)
		m := regexp.MustCompile(`subscription (\d+) added`).FindStringSubmatch(out)
		require.NotNil(t, m, out)
		ids = append(ids, m[1])
	}
	for _, id := range ids {
		var events []string
		require.NoError(t, b.pool.QueryRow(context.Background(), `SELECT events FROM outboxd_subscription WHERE id = $1::bigint`, id).Scan(&events))
		require.NotNil(t, events)
		require.Empty(t, events, "empty = every event (docs/DESIGN.md §2)")
	}

	code, out := e2e.RunCommand(t, b.env, "subscription", "list", "--json")
	require.Equal(t, 0, code, out)
	var subs []struct {
		ID     int64    `json:"id"`
		Events []string `json:"events"`
	}
	require.NoError(t, json.Unmarshal([]byte(out[strings.Index(out, "["):]), &subs))
	require.Len(t, subs, 3)
	for _, s := range subs {
		require.Empty(t, s.Events)
	}
	code, out = e2e.RunCommand(t, b.env, "subscription", "list")
	require.Equal(t, 0, code, out)
	require.Regexp(t, `https://platform\.example/hooks\s+\*\s`, out, "the table shows every event as *")
}
