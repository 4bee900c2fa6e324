package main

import (
	"context"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/outboxd/outboxd/internal/e2e"
	"github.com/outboxd/outboxd/internal/pgtest"
)

// `dlq retry` revives the dead letters of the targets run delivers to. With
// OUTBOXD_SINK=posthog (any kind but the webhook) the one target is named
// "webhook" (deliver.DefaultTarget), and so are its dead letters: they were
// refused as "targets this outboxd does not deliver to (webhook)", because
// the command compared them with the kind's name.
func TestDLQRetryKnowsTheTargetNames(t *testing.T) {
	t.Parallel()
	b := newBundle(t, pgtest.Shared(t), nil)
	ids := e2e.Insert(t, b.pool, 1, 3, one)
	deadLetter := func(id int64, target string) {
		_, err := b.pool.Exec(context.Background(),
			`INSERT INTO outboxd_dead_letter (event_id, sink, last_error, attempts) VALUES ($1, $2, 'refused', 1)`, id, target)
		require.NoError(t, err)
	}
	deadLetter(ids[0], "webhook")
	env := func(extra map[string]string) map[string]string {
		e := e2e.Env(b.env["OUTBOXD_DATABASE_URL"], b.env["OUTBOXD_SLOT"], b.recv.URL, extra)
		return e
	}

	code, out := e2e.RunCommand(t, env(map[string]string{"OUTBOXD_SINK": "posthog"}), "dlq", "retry", "--target", "webhook")
	require.Equal(t, 0, code, out)
	require.Contains(t, out, "1 dead letter(s) moved back")

	// With OUTBOXD_SINKS each destination's target is its kind.
	deadLetter(ids[1], "posthog")
	deadLetter(ids[2], "ga4")
	sinks := env(map[string]string{"OUTBOXD_SINKS": "webhook,posthog"})
	code, out = e2e.RunCommand(t, sinks, "dlq", "retry", "--target", "ga4")
	require.Equal(t, 2, code, out)
	require.Contains(t, out, "targets this outboxd does not deliver to (ga4)")
	code, out = e2e.RunCommand(t, sinks, "dlq", "retry", "--target", "posthog")
	require.Equal(t, 0, code, out)
	require.Contains(t, out, "1 dead letter(s) moved back")
}
