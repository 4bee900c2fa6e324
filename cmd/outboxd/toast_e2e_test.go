package main

import (
	"context"
	"encoding/base64"
	"fmt"
	"math/rand/v2"
	"net/http"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/require"

	"github.com/outboxd/outboxd/internal/e2e"
	"github.com/outboxd/outboxd/internal/pgtest"
)

// This file holds the end-to-end tests of issue 11 item 8 (docs/DESIGN.md
// G8, G10): an UPDATE of a subscription that leaves its TOASTed secrets and
// event globs alone makes pgoutput send them as 'u' (unchanged, value not
// sent); read as NULL, they made the subscription send unsigned requests and
// match every event.

// randomToken returns n random bytes in base64url (no padding): text that
// does not compress, so arrays of it are stored out of line (TOASTed).
func randomToken(rng *rand.ChaCha8, n int) string {
	b := make([]byte, n)
	_, _ = rng.Read(b)
	return base64.RawURLEncoding.EncodeToString(b)
}

// toastedSubscription returns 80 secrets and 301 globs (batch_* and 300 that
// match nothing), each array far beyond the 2 kB TOAST threshold.
func toastedSubscription() (secrets, globs []string) {
	rng := rand.NewChaCha8([32]byte{8, 11})
	for range 80 {
		b := make([]byte, 32)
		_, _ = rng.Read(b)
		secrets = append(secrets, "whsec_"+base64.StdEncoding.EncodeToString(b))
	}
	globs = append(globs, "batch_*")
	for range 300 {
		globs = append(globs, "never_"+randomToken(rng, 24)+"_*")
	}
	return secrets, globs
}

// insertNamed commits one event per name for organization org and returns
// the ids.
func insertNamed(t *testing.T, pool *pgxpool.Pool, org int64, names ...string) []int64 {
	t.Helper()
	var ids []int64
	for _, name := range names {
		var id int64
		require.NoError(t, pool.QueryRow(context.Background(),
			`INSERT INTO domain_event (event_name, organization_id) VALUES ($1, $2) RETURNING id`, name, org).Scan(&id))
		ids = append(ids, id)
	}
	return ids
}

// A subscription with 80 secrets and 301 globs, both TOASTed, is disabled
// and enabled again: by plain SQL while streaming, by a 410 answer (the
// daemon disables it) with parked deliveries retried after the enable, and
// by the CLI while the daemon is down (the routing state comes from the
// checkpoint). After each, every request to it carries a valid signature for
// each of its secrets, and only events matching its globs reach it.
//
// It runs with the table's default replica identity (the registry merges
// the unchanged columns) and with REPLICA IDENTITY FULL (the old row in the
// message supplies them to the decoder).
func TestToastedSubscriptionKeepsSecretsAndGlobsAcrossUpdates(t *testing.T) {
	t.Parallel()
	pgtest.ForEachMajor(t, func(t *testing.T) {
		for _, identity := range []string{"default", "full"} {
			t.Run("identity_"+identity, func(t *testing.T) { testToastedSubscription(t, identity) })
		}
	})
}

func testToastedSubscription(t *testing.T, identity string) {
	b := newBundle(t, pgtest.Shared(t), map[string]string{
		"OUTBOXD_RETRY_SCHEDULE": strings.Repeat("300ms,", 39) + "300ms",
	})
	ctx := context.Background()
	if identity == "full" {
		_, err := b.pool.Exec(ctx, `ALTER TABLE outboxd_subscription REPLICA IDENTITY FULL`)
		require.NoError(t, err)
	}
	secrets, globs := toastedSubscription()
	sub := e2e.NewReceiver(t)
	var gone atomic.Bool
	sub.Respond = func(*e2e.Delivery) int {
		if gone.Load() {
			return http.StatusGone
		}
		return http.StatusOK
	}
	subID := addSubscription(t, b.pool, org(5), sub.URL, secrets, globs)
	var toast int64
	require.NoError(t, b.pool.QueryRow(ctx, `SELECT pg_relation_size(reltoastrelid) FROM pg_class WHERE oid = 'outboxd_subscription'::regclass`).Scan(&toast))
	require.Positive(t, toast, "the secrets and globs must be TOASTed for this test to mean anything")

	var matching, all []int64
	// send commits a matching and a non-matching event of organization 5
	// and one of another tenant, and waits until the subscription got
	// what it should and every row is processed (a row is processed only
	// once every target it was routed to acknowledged it, so a
	// non-matching event routed to the subscription would show up).
	send := func(t *testing.T) {
		t.Helper()
		match := insertNamed(t, b.pool, 5, "batch_started")
		other := insertNamed(t, b.pool, 5, "recipe_created")
		tenant := insertNamed(t, b.pool, 6, "batch_started")
		matching = append(matching, match...)
		all = append(append(append(all, match...), other...), tenant...)
		sub.WaitAccepted(t, matching, time.Minute)
		b.recv.WaitAccepted(t, all, time.Minute)
		b.waitProcessed(t, int64(len(all)), time.Minute)
	}
	// check verifies every request the subscription received so far.
	check := func(t *testing.T) {
		t.Helper()
		want := map[int64]bool{}
		for _, id := range matching {
			want[id] = true
		}
		dls := sub.Deliveries()
		require.NotEmpty(t, dls)
		for _, dl := range dls {
			for _, id := range dl.IDs {
				require.True(t, want[id], "event %d does not match the subscription's globs or tenant, yet reached it", id)
			}
			require.NotEmpty(t, dl.Signature, "request for %v went out unsigned", dl.IDs)
			require.Len(t, strings.Fields(dl.Signature), len(secrets), "one signature per secret")
			for i, s := range secrets {
				require.True(t, e2e.Verify(s, dl.WebhookID, dl.Timestamp, dl.Body, dl.Signature),
					"request for %v: no valid signature for secret %d", dl.IDs, i)
			}
		}
		var dead int
		require.NoError(t, b.pool.QueryRow(ctx, `SELECT count(*) FROM outboxd_dead_letter`).Scan(&dead))
		require.Zero(t, dead)
	}
	setEnabled := func(t *testing.T, enabled bool) {
		t.Helper()
		_, err := b.pool.Exec(ctx, `UPDATE outboxd_subscription SET enabled = $2 WHERE id = $1`, subID, enabled)
		require.NoError(t, err)
	}

	d := e2e.StartDaemon(t, b.env)
	waitStreaming(t, d)
	send(t)
	check(t)

	// 1. Plain SQL updates touching only enabled, while streaming.
	setEnabled(t, false)
	setEnabled(t, true)
	send(t)
	check(t)

	// 2. The endpoint answers 410: the daemon disables the subscription
	// (its own UPDATE), the delivery is parked; enabled again, the retrier
	// delivers it with the subscription's sink.
	gone.Store(true)
	parkedID := insertNamed(t, b.pool, 5, "batch_completed")
	matching = append(matching, parkedID...)
	all = append(all, parkedID...)
	var enabled bool
	e2e.WaitFor(t, time.Minute, func() bool {
		require.NoError(t, b.pool.QueryRow(ctx, `SELECT enabled FROM outboxd_subscription WHERE id = $1`, subID).Scan(&enabled))
		return !enabled
	}, func() string { return "subscription not disabled after 410" })
	var parked int
	e2e.WaitFor(t, time.Minute, func() bool {
		require.NoError(t, b.pool.QueryRow(ctx, `SELECT count(*) FROM outboxd_parked WHERE target = $1`,
			fmt.Sprintf("subscription:%d", subID)).Scan(&parked))
		return parked == 1
	}, func() string { return fmt.Sprintf("%d parked", parked) })
	// The enable commits after the disable, so the router applies both,
	// in that order, with the stream.
	gone.Store(false)
	setEnabled(t, true)
	send(t)
	check(t)

	// 3. The CLI disables and enables it while the daemon is down: the
	// restarted daemon routes from the checkpoint's routing state and
	// merges the updates into it.
	require.Equal(t, 0, d.Stop(30*time.Second))
	id := strconv.FormatInt(subID, 10)
	code, out := e2e.RunCommand(t, b.env, "subscription", "disable", id, "--yes", "--reason", "maintenance")
	require.Equal(t, 0, code, out)
	code, out = e2e.RunCommand(t, b.env, "subscription", "enable", id)
	require.Equal(t, 0, code, out)
	d = e2e.StartDaemon(t, b.env)
	send(t)
	check(t)

	require.NotContains(t, d.Log(), "subscription change ignored")
	require.Equal(t, 0, d.Stop(30*time.Second))
}

// A subscription whose secret list is empty never sends an unsigned request:
// its events are dead-lettered with the reason, and once it has a secret it
// delivers, signed.
func TestSubscriptionWithoutSecretNeverSendsUnsigned(t *testing.T) {
	t.Parallel()
	pgtest.ForEachMajor(t, func(t *testing.T) {
		b := newBundle(t, pgtest.Shared(t), nil)
		ctx := context.Background()
		sub := e2e.NewReceiver(t)
		subID := addSubscription(t, b.pool, org(5), sub.URL, []string{}, nil)
		d := e2e.StartDaemon(t, b.env)
		ids := insertNamed(t, b.pool, 5, "batch_started", "batch_completed", "timer_started")
		b.recv.WaitAccepted(t, ids, time.Minute)
		target := fmt.Sprintf("subscription:%d", subID)
		var dead int
		e2e.WaitProgress(t, time.Minute, func() (bool, int64) {
			require.Zero(t, sub.Len(), "no request without a signature")
			require.NoError(t, b.pool.QueryRow(ctx, `SELECT count(*) FROM outboxd_dead_letter WHERE sink = $1`, target).Scan(&dead))
			return dead == len(ids), int64(dead)
		}, func() string { return fmt.Sprintf("%d of %d dead-lettered", dead, len(ids)) })
		var reason string
		require.NoError(t, b.pool.QueryRow(ctx, `SELECT last_error FROM outboxd_dead_letter WHERE sink = $1 LIMIT 1`, target).Scan(&reason))
		require.Contains(t, reason, fmt.Sprintf("subscription %d has no signing secret", subID))
		require.Zero(t, sub.Len(), "no request without a signature")

		_, err := b.pool.Exec(ctx, `UPDATE outboxd_subscription SET secrets = $2 WHERE id = $1`, subID, []string{e2e.Secret})
		require.NoError(t, err)
		more := insertNamed(t, b.pool, 5, "batch_started")
		sub.WaitAccepted(t, more, time.Minute)
		for _, dl := range sub.Deliveries() {
			require.True(t, dl.SigOK, "request for %v not signed with the new secret", dl.IDs)
		}
		require.Equal(t, 0, d.Stop(30*time.Second))
	})
}
