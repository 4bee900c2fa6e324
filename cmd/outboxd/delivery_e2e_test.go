package main

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/require"

	"github.com/outboxd/outboxd/internal/e2e"
	"github.com/outboxd/outboxd/internal/pgtest"
)

// addSubscription inserts a subscription row and returns its id.
func addSubscription(t *testing.T, pool *pgxpool.Pool, org *int64, url string, secrets []string, events []string) int64 {
	t.Helper()
	if secrets == nil {
		secrets = []string{e2e.Secret}
	}
	if events == nil {
		events = []string{}
	}
	var id int64
	require.NoError(t, pool.QueryRow(context.Background(), `INSERT INTO outboxd_subscription (organization_id, url, secrets, events)
VALUES ($1, $2, $3, $4) RETURNING id`, org, url, secrets, events).Scan(&id))
	return id
}

func org(n int64) *int64 { return &n }

// waitStreaming waits until the daemon has finished its catch-up and
// streams: rows committed from then on come through the stream, in commit
// order with subscription changes.
func waitStreaming(t *testing.T, d *e2e.Daemon) {
	t.Helper()
	e2e.WaitFor(t, time.Minute, func() bool { return strings.Contains(d.Log(), "catch-up read the table") },
		func() string { return "not streaming" })
}

// firstReceipts returns, per organization, the ids in the order of their
// first accepted receipt.
func firstReceipts(r *e2e.Receiver) map[int64][]int64 {
	seen := map[int64]bool{}
	out := map[int64][]int64{}
	for _, d := range r.Deliveries() {
		if d.Status/100 != 2 {
			continue
		}
		for i, id := range d.IDs {
			if !seen[id] {
				seen[id] = true
				out[d.Orgs[i]] = append(out[d.Orgs[i]], id)
			}
		}
	}
	return out
}

// commitOrder groups ids (in commit order) by organization.
func commitOrder(ids []int64, orgOf func(i int) int64) map[int64][]int64 {
	out := map[int64][]int64{}
	for i, id := range ids {
		out[orgOf(i)] = append(out[orgOf(i)], id)
	}
	return out
}

// Per-key order under concurrency: receivers with random delays, many keys;
// commit order holds within each key and keys overlap in time.
func TestPerKeyOrderUnderConcurrency(t *testing.T) {
	t.Parallel()
	pgtest.ForEachMajor(t, func(t *testing.T) {
		b := newBundle(t, pgtest.Shared(t), map[string]string{"OUTBOXD_WEBHOOK_CONCURRENCY": "16"})
		var active, maxActive atomic.Int32
		var mu sync.Mutex
		rng := rand.New(rand.NewPCG(11, 12))
		b.recv.Respond = func(*e2e.Delivery) int {
			n := active.Add(1)
			for m := maxActive.Load(); n > m && !maxActive.CompareAndSwap(m, n); m = maxActive.Load() {
			}
			mu.Lock()
			d := time.Duration(rng.IntN(3000)) * time.Microsecond
			mu.Unlock()
			time.Sleep(d) // the receiver's latency, not a synchronisation
			active.Add(-1)
			return http.StatusOK
		}
		d := e2e.StartDaemon(t, b.env)
		orgOf := func(i int) int64 { return int64(i*7%20) + 1 }
		ids := e2e.Insert(t, b.pool, 100, 20, orgOf)
		b.recv.WaitAccepted(t, ids, 2*time.Minute)
		got := firstReceipts(b.recv)
		for o, want := range commitOrder(ids, orgOf) {
			require.Equal(t, want, got[o], "organization %d out of commit order", o)
		}
		t.Logf("max concurrent requests: %d", maxActive.Load())
		require.Greater(t, maxActive.Load(), int32(1), "different keys must overlap in time")
		require.Equal(t, 0, d.Stop(30*time.Second))
	})
}

// A receiver down for longer than the in-memory retries: its events are
// parked, the slot keeps advancing while other traffic flows, nothing is lost
// across a kill -9, and when it returns every parked event arrives in key
// order and its rows become processed.
func TestReceiverDownEventsParkedThenDelivered(t *testing.T) {
	t.Parallel()
	pgtest.ForEachMajor(t, func(t *testing.T) {
		b := newBundle(t, pgtest.Shared(t), map[string]string{
			"OUTBOXD_WEBHOOK_MAX_ATTEMPTS": "2",
			"OUTBOXD_RETRY_SCHEDULE":       "500ms,500ms,500ms,500ms,500ms,500ms,500ms,500ms,500ms,500ms,500ms,500ms,500ms,500ms,500ms,500ms,500ms,500ms,500ms,500ms,500ms,500ms,500ms,500ms,500ms,500ms,500ms,500ms,500ms,500ms,500ms,500ms,500ms,500ms,500ms,500ms,500ms,500ms,500ms,500ms",
		})
		down := e2e.NewReceiver(t)
		var up atomic.Bool
		down.Respond = func(*e2e.Delivery) int {
			if up.Load() {
				return http.StatusOK
			}
			return http.StatusServiceUnavailable
		}
		subID := addSubscription(t, b.pool, org(1), down.URL, nil, nil)
		d := e2e.StartDaemon(t, b.env)

		orgOf := func(i int) int64 { return int64(i%2) + 1 } // org 1 goes to the down subscription too
		ids := e2e.Insert(t, b.pool, 20, 3, orgOf)
		org1 := commitOrder(ids, orgOf)[1]
		b.recv.WaitAccepted(t, ids, time.Minute)

		var parked int
		e2e.WaitFor(t, time.Minute, func() bool {
			require.NoError(t, b.pool.QueryRow(context.Background(), `SELECT count(*) FROM outboxd_parked WHERE target = $1`,
				fmt.Sprintf("subscription:%d", subID)).Scan(&parked))
			return parked == len(org1)
		}, func() string { return fmt.Sprintf("%d of %d parked", parked, len(org1)) })

		// Other traffic flows and the slot advances past it.
		more := e2e.Insert(t, b.pool, 10, 1, func(int) int64 { return 2 })
		last := b.currentLSN(t)
		b.recv.WaitAccepted(t, more, time.Minute)
		e2e.WaitFor(t, 30*time.Second, func() bool { return b.confirmedFlush(t) >= last },
			func() string { return "slot did not advance while deliveries were parked" })
		lag := int64(b.currentLSN(t) - b.confirmedFlush(t))
		t.Logf("slot lag while the receiver was down: %d bytes", lag)

		// Org 1 rows are not processed: one of their targets has not acknowledged.
		var processed int
		require.NoError(t, b.pool.QueryRow(context.Background(), `SELECT count(*) FROM domain_event WHERE organization_id = 1 AND is_processed`).Scan(&processed))
		require.Zero(t, processed)

		d.Kill()
		d = e2e.StartDaemon(t, b.env)
		up.Store(true)
		down.WaitAccepted(t, org1, time.Minute)
		require.Equal(t, org1, firstReceipts(down)[1], "parked events arrive in commit order")
		b.waitProcessed(t, int64(len(ids)+len(more)), time.Minute)
		require.NoError(t, b.pool.QueryRow(context.Background(), `SELECT count(*) FROM outboxd_parked`).Scan(&parked))
		require.Zero(t, parked)
		c := down.Count(org1)
		t.Logf("down receiver: %s", c)
		require.Zero(t, c.Lost)
		require.Zero(t, c.Unexpected)
		// In-memory attempts, parked retries and those after the kill all
		// carry the event's message id.
		ns := e2e.Namespace(t, b.pool)
		for _, dl := range down.Deliveries() {
			require.Equal(t, e2e.WebhookIDOf(ns, dl), dl.WebhookID)
		}
		require.Equal(t, 0, d.Stop(30*time.Second))
	})
}

// Subscription changes apply in commit order with the events.
func TestSubscriptionChangesApplyInCommitOrder(t *testing.T) {
	t.Parallel()
	pgtest.ForEachMajor(t, func(t *testing.T) {
		b := newBundle(t, pgtest.Shared(t), nil)
		sub := e2e.NewReceiver(t)
		d := e2e.StartDaemon(t, b.env)
		waitStreaming(t, d)
		ctx := context.Background()
		insert := func(tx pgx.Tx, name string) int64 {
			var id int64
			require.NoError(t, tx.QueryRow(ctx, `INSERT INTO domain_event (event_name, organization_id) VALUES ($1, 5) RETURNING id`, name).Scan(&id))
			return id
		}
		var before, with, after, disabled int64
		var subID int64
		require.NoError(t, pgx.BeginFunc(ctx, b.pool, func(tx pgx.Tx) error { before = insert(tx, "batch_started"); return nil }))
		require.NoError(t, pgx.BeginFunc(ctx, b.pool, func(tx pgx.Tx) error {
			require.NoError(t, tx.QueryRow(ctx, `INSERT INTO outboxd_subscription (organization_id, url, secrets) VALUES (5, $1, $2) RETURNING id`,
				sub.URL, []string{e2e.Secret}).Scan(&subID))
			with = insert(tx, "batch_completed")
			return nil
		}))
		require.NoError(t, pgx.BeginFunc(ctx, b.pool, func(tx pgx.Tx) error { after = insert(tx, "timer_started"); return nil }))
		require.NoError(t, pgx.BeginFunc(ctx, b.pool, func(tx pgx.Tx) error {
			_, err := tx.Exec(ctx, `UPDATE outboxd_subscription SET enabled = false WHERE id = $1`, subID)
			require.NoError(t, err)
			disabled = insert(tx, "timer_stopped")
			return nil
		}))
		final := e2e.Insert(t, b.pool, 1, 1, func(int) int64 { return 5 })
		all := []int64{before, with, after, disabled, final[0]}
		b.recv.WaitAccepted(t, all, time.Minute)
		b.waitProcessed(t, int64(len(all)), time.Minute)
		require.Equal(t, []int64{with, after}, sub.Accepted(), "only events committed while the subscription was enabled")
		require.Equal(t, 0, d.Stop(30*time.Second))
	})
}

// A catch-up routes each row it reads from the table as the stream would
// have: by the subscriptions as they were at the row's commit (their history
// and the server's commit timestamps), not as they are at the catch-up. Here
// every row is committed before outboxd first starts, so the first start's
// catch-up reads them all; a slot reset or recreation takes the same path.
// It used to route them all with the subscriptions of its snapshot: the
// subscription got the row committed while it was disabled and the one from
// before it existed, and one added after every row got them all.
func TestCatchupRoutesBySubscriptionsAtCommit(t *testing.T) {
	t.Parallel()
	b := newBundle(t, pgtest.New(t, map[string]string{"track_commit_timestamp": "on"}), nil)
	sub, late := e2e.NewReceiver(t), e2e.NewReceiver(t)
	ctx := context.Background()
	insert := func(tx pgx.Tx, name string) int64 {
		var id int64
		require.NoError(t, tx.QueryRow(ctx, `INSERT INTO domain_event (event_name, organization_id) VALUES ($1, 5) RETURNING id`, name).Scan(&id))
		return id
	}
	in := func(f func(tx pgx.Tx) int64) int64 {
		var id int64
		require.NoError(t, pgx.BeginFunc(ctx, b.pool, func(tx pgx.Tx) error { id = f(tx); return nil }))
		return id
	}
	set := func(tx pgx.Tx, sql string, args ...any) {
		_, err := tx.Exec(ctx, sql, args...)
		require.NoError(t, err)
	}
	var subID int64
	before := in(func(tx pgx.Tx) int64 { return insert(tx, "batch_started") })
	with := in(func(tx pgx.Tx) int64 {
		require.NoError(t, tx.QueryRow(ctx, `INSERT INTO outboxd_subscription (organization_id, url, secrets) VALUES (5, $1, $2) RETURNING id`,
			sub.URL, []string{e2e.Secret}).Scan(&subID))
		return insert(tx, "batch_completed")
	})
	after := in(func(tx pgx.Tx) int64 { return insert(tx, "timer_started") })
	disabled := in(func(tx pgx.Tx) int64 {
		set(tx, `UPDATE outboxd_subscription SET enabled = false WHERE id = $1`, subID)
		return insert(tx, "timer_stopped")
	})
	in(func(tx pgx.Tx) int64 {
		set(tx, `UPDATE outboxd_subscription SET enabled = true WHERE id = $1`, subID)
		return 0
	})
	reenabled := in(func(tx pgx.Tx) int64 { return insert(tx, "timer_started") })
	in(func(tx pgx.Tx) int64 {
		set(tx, `UPDATE outboxd_subscription SET events = '{batch_*}' WHERE id = $1`, subID)
		return 0
	})
	filtered := in(func(tx pgx.Tx) int64 { return insert(tx, "timer_stopped") })
	matching := in(func(tx pgx.Tx) int64 { return insert(tx, "batch_failed") })
	// A secret rotation is no routing change: nothing changes for the rows.
	in(func(tx pgx.Tx) int64 {
		set(tx, `UPDATE outboxd_subscription SET secrets = secrets || $2::text WHERE id = $1`, subID, "whsec_"+strings.Repeat("QQ", 16))
		return 0
	})
	addSubscription(t, b.pool, org(5), late.URL, nil, nil) // after every row

	d := e2e.StartDaemon(t, b.env)
	all := []int64{before, with, after, disabled, reenabled, filtered, matching}
	b.recv.WaitAccepted(t, all, time.Minute)
	b.waitProcessed(t, int64(len(all)), time.Minute)
	require.Equal(t, []int64{with, after, reenabled, matching}, sub.Accepted(),
		"only the rows the subscription matched when they committed, in commit order")
	require.Empty(t, late.Accepted(), "a subscription added after every row gets none of them")
	require.Equal(t, 0, d.Stop(30*time.Second))
}

// Tenant isolation: many organizations with their own endpoints and random
// interleavings; no endpoint ever receives another tenant's event.
func TestTenantIsolation(t *testing.T) {
	t.Parallel()
	pgtest.ForEachMajor(t, func(t *testing.T) {
		b := newBundle(t, pgtest.Shared(t), nil)
		ep := e2e.NewReceiver(t)
		platform := e2e.NewReceiver(t)
		const orgs = 8
		for o := int64(1); o <= orgs/2; o++ {
			addSubscription(t, b.pool, org(o), ep.URL+"/org/"+strconv.FormatInt(o, 10), nil, nil)
		}
		addSubscription(t, b.pool, nil, platform.URL, nil, []string{"batch_*"})
		d := e2e.StartDaemon(t, b.env)
		waitStreaming(t, d)

		ctx := context.Background()
		var wg sync.WaitGroup
		var mu sync.Mutex
		var ids []int64
		for w := range 4 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				rng := rand.New(rand.NewPCG(uint64(w), 99))
				got, err := e2e.InsertErr(ctx, b.pool, 50, 4, func(int) int64 { return int64(rng.IntN(orgs)) + 1 })
				mu.Lock()
				ids = append(ids, got...)
				mu.Unlock()
				require.NoError(t, err)
			}()
		}
		// Half the organizations subscribe while events flow.
		for o := int64(orgs/2 + 1); o <= orgs; o++ {
			addSubscription(t, b.pool, org(o), ep.URL+"/org/"+strconv.FormatInt(o, 10), nil, nil)
		}
		wg.Wait()
		b.recv.WaitAccepted(t, ids, time.Minute)
		b.waitProcessed(t, int64(len(ids)), time.Minute)
		platform.WaitAccepted(t, ids, time.Minute) // every event here is a batch_started

		perOrg := map[int64]int{}
		for _, dl := range ep.Deliveries() {
			want, err := strconv.ParseInt(strings.TrimPrefix(dl.Path, "/org/"), 10, 64)
			require.NoError(t, err)
			for _, o := range dl.Orgs {
				require.Equal(t, want, o, "endpoint of organization %d received an event of organization %d", want, o)
				perOrg[o]++
			}
		}
		t.Logf("per-organization deliveries: %v (platform: %d)", perOrg, len(platform.Accepted()))
		for o := int64(1); o <= orgs/2; o++ {
			require.NotZero(t, perOrg[o], "organization %d subscribed from the start", o)
		}
		require.Equal(t, 0, d.Stop(30*time.Second))
	})
}

// Batching: arrays of envelopes, a stable batch webhook-id, per-key order.
func TestBatchedDelivery(t *testing.T) {
	t.Parallel()
	pgtest.ForEachMajor(t, func(t *testing.T) {
		b := newBundle(t, pgtest.Shared(t), map[string]string{
			"OUTBOXD_WEBHOOK_BATCH_SIZE": "50", "OUTBOXD_WEBHOOK_BATCH_WAIT": "20ms", "OUTBOXD_WEBHOOK_CONCURRENCY": "4",
		})
		d := e2e.StartDaemon(t, b.env)
		orgOf := func(i int) int64 { return int64(i % 5) }
		ids := e2e.Insert(t, b.pool, 20, 50, orgOf)
		b.recv.WaitAccepted(t, ids, time.Minute)
		b.waitProcessed(t, int64(len(ids)), time.Minute)
		c := b.recv.Count(ids)
		require.Zero(t, c.Duplicates)
		require.Zero(t, c.BadSignatures)
		batches := 0
		ns := e2e.Namespace(t, b.pool)
		for _, dl := range b.recv.Deliveries() {
			require.Equal(t, e2e.WebhookIDOf(ns, dl), dl.WebhookID)
			if len(dl.IDs) > 1 {
				batches++
				require.True(t, strings.HasPrefix(dl.WebhookID, "batch_"+ns+"_"), dl.WebhookID)
				require.True(t, json.Valid(dl.Body))
			}
		}
		require.NotZero(t, batches)
		got := firstReceipts(b.recv)
		for o, want := range commitOrder(ids, orgOf) {
			require.Equal(t, want, got[o])
		}
		t.Logf("%d events in %d requests", len(ids), len(b.recv.Deliveries()))
		require.Equal(t, 0, d.Stop(30*time.Second))
	})
}

// 410 Gone disables the subscription and parks its events; re-enabling it
// delivers them.
func TestGoneDisablesSubscriptionUntilReenabled(t *testing.T) {
	t.Parallel()
	pgtest.ForEachMajor(t, func(t *testing.T) {
		b := newBundle(t, pgtest.Shared(t), map[string]string{"OUTBOXD_RETRY_SCHEDULE": "300ms,300ms,300ms,300ms,300ms,300ms,300ms,300ms,300ms,300ms,300ms,300ms,300ms,300ms,300ms,300ms,300ms,300ms,300ms,300ms"})
		sub := e2e.NewReceiver(t)
		var gone atomic.Bool
		gone.Store(true)
		sub.Respond = func(*e2e.Delivery) int {
			if gone.Load() {
				return http.StatusGone
			}
			return http.StatusOK
		}
		id := addSubscription(t, b.pool, org(3), sub.URL, nil, nil)
		d := e2e.StartDaemon(t, b.env)
		ids := e2e.Insert(t, b.pool, 5, 2, func(int) int64 { return 3 })
		b.recv.WaitAccepted(t, ids, time.Minute)
		var enabled bool
		var reason string
		e2e.WaitFor(t, time.Minute, func() bool {
			require.NoError(t, b.pool.QueryRow(context.Background(), `SELECT enabled, coalesce(disabled_reason, '') FROM outboxd_subscription WHERE id = $1`, id).Scan(&enabled, &reason))
			return !enabled
		}, func() string { return "subscription not disabled" })
		require.Contains(t, reason, "410")
		var parked int
		e2e.WaitFor(t, time.Minute, func() bool {
			require.NoError(t, b.pool.QueryRow(context.Background(), `SELECT count(*) FROM outboxd_parked`).Scan(&parked))
			return parked == len(ids)
		}, func() string { return fmt.Sprintf("%d parked", parked) })

		gone.Store(false)
		code, out := e2e.RunCommand(t, b.env, "subscription", "enable", strconv.FormatInt(id, 10))
		require.Equal(t, 0, code, out)
		sub.WaitAccepted(t, ids, time.Minute)
		b.waitProcessed(t, int64(len(ids)), time.Minute)
		require.Equal(t, 0, d.Stop(30*time.Second))
	})
}

// A subscription with two secrets sends both signatures; each verifies with
// an independent verifier.
func TestSecretRotationSignsWithBoth(t *testing.T) {
	t.Parallel()
	pgtest.ForEachMajor(t, func(t *testing.T) {
		b := newBundle(t, pgtest.Shared(t), nil)
		sub := e2e.NewReceiver(t)
		const newer = "whsec_c2Vjb25kLXNlY3JldC1mb3Itcm90YXRpb24hIQ=="
		addSubscription(t, b.pool, nil, sub.URL, []string{newer, e2e.Secret}, nil)
		d := e2e.StartDaemon(t, b.env)
		ids := e2e.Insert(t, b.pool, 3, 1, one)
		sub.WaitAccepted(t, ids, time.Minute)
		for _, dl := range sub.Deliveries() {
			require.Len(t, strings.Fields(dl.Signature), 2)
			require.True(t, e2e.Verify(newer, dl.WebhookID, dl.Timestamp, dl.Body, dl.Signature))
			require.True(t, e2e.Verify(e2e.Secret, dl.WebhookID, dl.Timestamp, dl.Body, dl.Signature))
		}
		require.Equal(t, 0, d.Stop(30*time.Second))
	})
}

// dlq list, retry and purge round trip.
func TestDeadLetterListRetryPurge(t *testing.T) {
	t.Parallel()
	pgtest.ForEachMajor(t, func(t *testing.T) {
		b := newBundle(t, pgtest.Shared(t), nil)
		var refuse atomic.Bool
		refuse.Store(true)
		b.recv.Respond = func(dl *e2e.Delivery) int {
			if refuse.Load() {
				return http.StatusUnprocessableEntity
			}
			return http.StatusOK
		}
		d := e2e.StartDaemon(t, b.env)
		ids := e2e.Insert(t, b.pool, 3, 1, func(i int) int64 { return int64(i) })
		e2e.WaitFor(t, time.Minute, func() bool {
			var n int
			require.NoError(t, b.pool.QueryRow(context.Background(), `SELECT count(*) FROM outboxd_dead_letter`).Scan(&n))
			return n == 3
		}, func() string { return "not dead-lettered" })

		// No match: an empty JSON array, not null.
		code, out := e2e.RunCommand(t, b.env, "dlq", "list", "--json", "--target", "no-such-target")
		require.Equal(t, 0, code, out)
		require.Equal(t, "[]", strings.TrimSpace(out))
		code, out = e2e.RunCommand(t, b.env, "dlq", "list", "--json")
		require.Equal(t, 0, code, out)
		var listed []struct {
			EventID int64  `json:"event_id"`
			Sink    string `json:"sink"`
			Status  int    `json:"last_status"`
		}
		require.NoError(t, json.Unmarshal([]byte(out[strings.Index(out, "["):]), &listed))
		require.Len(t, listed, 3)
		require.Equal(t, 422, listed[0].Status)

		code, out = e2e.RunCommand(t, b.env, "dlq", "retry", "--organization", "1", "--dry-run")
		require.Equal(t, 0, code, out)
		require.Contains(t, out, "would retry 1 ")
		refuse.Store(false)
		code, out = e2e.RunCommand(t, b.env, "dlq", "retry", "--organization", "1")
		require.Equal(t, 0, code, out)
		e2e.WaitFor(t, time.Minute, func() bool {
			var p bool
			require.NoError(t, b.pool.QueryRow(context.Background(), `SELECT is_processed FROM domain_event WHERE id = $1`, ids[1]).Scan(&p))
			return p
		}, func() string { return "retried dead letter not delivered" })

		code, out = e2e.RunCommand(t, b.env, "dlq", "purge")
		require.Equal(t, 2, code, "purge without --yes is refused: %s", out)
		code, out = e2e.RunCommand(t, b.env, "dlq", "purge", "--yes")
		require.Equal(t, 0, code, out)
		require.Contains(t, out, "2 dead letter(s) purged")
		var left int
		require.NoError(t, b.pool.QueryRow(context.Background(), `SELECT count(*) FROM outboxd_dead_letter`).Scan(&left))
		require.Zero(t, left)
		require.Equal(t, 0, d.Stop(30*time.Second))
	})
}

// The default webhook's event filter: events not matching go nowhere and are
// marked processed.
func TestDefaultWebhookEventFilter(t *testing.T) {
	t.Parallel()
	pgtest.ForEachMajor(t, func(t *testing.T) {
		b := newBundle(t, pgtest.Shared(t), map[string]string{"OUTBOXD_WEBHOOK_EVENTS": "batch_*,inventory_adjusted"})
		d := e2e.StartDaemon(t, b.env)
		ctx := context.Background()
		var keep, skip []int64
		for _, name := range []string{"batch_started", "timer_started", "inventory_adjusted", "recipe_created", "batch_failed"} {
			var id int64
			require.NoError(t, b.pool.QueryRow(ctx, `INSERT INTO domain_event (event_name, organization_id) VALUES ($1, 1) RETURNING id`, name).Scan(&id))
			if strings.HasPrefix(name, "batch_") || name == "inventory_adjusted" {
				keep = append(keep, id)
			} else {
				skip = append(skip, id)
			}
		}
		b.recv.WaitAccepted(t, keep, time.Minute)
		b.waitProcessed(t, 5, time.Minute)
		require.Equal(t, keep, b.recv.Accepted())
		require.Equal(t, 0, d.Stop(30*time.Second))
	})
}

// dlq list, retry and purge act on every match by default (they used to stop
// at 1,000 without a word); --limit says how many more match; --event-id
// selects by event; --since takes days (7d) as replay does.
func TestDeadLetterCommandsHaveNoSilentLimit(t *testing.T) {
	t.Parallel()
	b := newBundle(t, pgtest.Shared(t), nil)
	ctx := context.Background()
	// 1,200 dead letters written as outboxd writes them (no daemon needed).
	ids := e2e.Insert(t, b.pool, 1, 1200, func(int) int64 { return 7 })
	_, err := b.pool.Exec(ctx, `INSERT INTO outboxd_dead_letter (event_id, sink, last_status, last_error, attempts)
SELECT unnest($1::bigint[]), 'webhook', 400, 'bad request', 1`, ids)
	require.NoError(t, err)
	_, err = b.pool.Exec(ctx, `UPDATE outboxd_dead_letter SET dead_at = now() - interval '10 days' WHERE event_id = $1`, ids[0])
	require.NoError(t, err)

	count := func(args ...string) (int, string) {
		code, out := e2e.RunCommand(t, b.env, append([]string{"dlq", "list", "--json"}, args...)...)
		require.Equal(t, 0, code, out)
		var listed []struct {
			EventID int64 `json:"event_id"`
		}
		require.NoError(t, json.Unmarshal([]byte(out[strings.Index(out, "["):]), &listed), out)
		return len(listed), out
	}
	n, _ := count()
	require.Equal(t, 1200, n, "every match, no silent cap")
	n, out := count("--limit", "1000")
	require.Equal(t, 1000, n)
	require.Contains(t, out, "200 more dead letter(s) match beyond --limit")
	n, _ = count("--event-id", fmt.Sprintf("%d,%d", ids[5], ids[6]))
	require.Equal(t, 2, n)
	n, _ = count("--since", "7d")
	require.Equal(t, 1199, n, "the one dead 10 days ago is older than 7d")
	n, _ = count("--until", "7d")
	require.Equal(t, 1, n)

	code, out := e2e.RunCommand(t, b.env, "dlq", "purge", "--dry-run", "--limit", "100")
	require.Equal(t, 0, code, out)
	require.Contains(t, out, "would purge 100 dead letter(s)")
	require.Contains(t, out, "1100 more dead letter(s) match beyond --limit")
	code, out = e2e.RunCommand(t, b.env, "dlq", "purge", "--yes")
	require.Equal(t, 0, code, out)
	require.Contains(t, out, "1200 dead letter(s) purged")
}

// A tenant subscription whose endpoint fails every retry for longer than
// OUTBOXD_SUBSCRIPTION_DISABLE_AFTER is disabled with its reason, and
// outboxd inserts an outboxd_subscription_disabled event of the tenant into
// the outbox: the default webhook and the tenant's other subscriptions get
// it like any event, so the application can tell the tenant. The failing
// subscription keeps its parked deliveries (none dead-lettered) and gets
// them once re-enabled.
func TestFailingSubscriptionIsDisabledWithAnEvent(t *testing.T) {
	t.Parallel()
	b := newBundle(t, pgtest.Shared(t), map[string]string{
		"OUTBOXD_RETRY_SCHEDULE":             "200ms,200ms,200ms,200ms,200ms,200ms,200ms,200ms,200ms,200ms,200ms,200ms,200ms,200ms,200ms,200ms,200ms,200ms,200ms,200ms,200ms,200ms,200ms,200ms,200ms,200ms,200ms,200ms,200ms,200ms",
		"OUTBOXD_SUBSCRIPTION_DISABLE_AFTER": "1500ms",
		"OUTBOXD_WEBHOOK_MAX_ATTEMPTS":       "1",
	})
	failing := e2e.NewReceiver(t)
	var down atomic.Bool
	down.Store(true)
	failing.Respond = func(*e2e.Delivery) int {
		if down.Load() {
			return http.StatusServiceUnavailable
		}
		return http.StatusOK
	}
	healthy := e2e.NewReceiver(t)
	other := e2e.NewReceiver(t) // another tenant's: must not hear of it
	id := addSubscription(t, b.pool, org(4), failing.URL, nil, nil)
	addSubscription(t, b.pool, org(4), healthy.URL, nil, nil)
	addSubscription(t, b.pool, org(5), other.URL, nil, nil)
	d := e2e.StartDaemon(t, b.env)
	ids := e2e.Insert(t, b.pool, 3, 1, func(int) int64 { return 4 })
	healthy.WaitAccepted(t, ids, time.Minute)

	ctx := context.Background()
	var enabled bool
	var reason string
	e2e.WaitFor(t, time.Minute, func() bool {
		require.NoError(t, b.pool.QueryRow(ctx, `SELECT enabled, coalesce(disabled_reason, '') FROM outboxd_subscription WHERE id = $1`, id).Scan(&enabled, &reason))
		return !enabled
	}, func() string { return "subscription not disabled" })
	require.Contains(t, reason, "failing for more than 1.5s")
	require.Contains(t, reason, "last status 503")

	var eventID, eventOrg int64
	var props map[string]any
	require.NoError(t, b.pool.QueryRow(ctx, `SELECT id, organization_id, properties FROM domain_event
WHERE event_name = 'outboxd_subscription_disabled' AND entity_type = 'subscription' AND entity_id = $1 AND source = 'outboxd'`, strconv.FormatInt(id, 10)).
		Scan(&eventID, &eventOrg, &props))
	require.Equal(t, int64(4), eventOrg)
	require.Equal(t, float64(id), props["subscription_id"])
	require.Contains(t, props["reason"], "failing for more than")
	require.EqualValues(t, 503, props["last_status"])
	b.recv.WaitAccepted(t, append(slices.Clone(ids), eventID), time.Minute)
	healthy.WaitAccepted(t, append(slices.Clone(ids), eventID), time.Minute)
	for _, dl := range append(b.recv.Deliveries(), healthy.Deliveries()...) {
		require.True(t, dl.SigOK, "every copy is signed")
	}
	require.Zero(t, other.Len(), "another tenant's subscription hears nothing of it")

	var parked, dead int
	require.NoError(t, b.pool.QueryRow(ctx, `SELECT (SELECT count(*) FROM outboxd_parked WHERE target = $1), (SELECT count(*) FROM outboxd_dead_letter)`,
		fmt.Sprintf("subscription:%d", id)).Scan(&parked, &dead))
	require.Equal(t, len(ids), parked, "the disabled subscription keeps its parked deliveries")
	require.Zero(t, dead)

	down.Store(false)
	code, out := e2e.RunCommand(t, b.env, "subscription", "enable", strconv.FormatInt(id, 10))
	require.Equal(t, 0, code, out)
	failing.WaitAccepted(t, ids, time.Minute)
	b.waitProcessed(t, int64(len(ids))+1, time.Minute)
	require.Equal(t, 0, d.Stop(30*time.Second))
}
