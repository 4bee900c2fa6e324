package main

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/outboxd/outboxd/internal/e2e"
	"github.com/outboxd/outboxd/internal/pgtest"
)

// webhook-id (docs/DESIGN.md §4): receivers deduplicate on it, so it never
// names two different events, and every copy of one event carries the same.

// waitRequests waits until recv answered n requests 2xx.
func waitRequests(t *testing.T, recv *e2e.Receiver, n int) {
	t.Helper()
	e2e.WaitProgress(t, time.Minute, func() (bool, int64) {
		got := len(recv.Accepted())
		return got >= n, int64(got)
	}, func() string { return fmt.Sprintf("%d of %d requests accepted", len(recv.Accepted()), n) })
}

// Two services' outboxes (two databases) post to one endpoint, and both have
// events 1, 2 and 3: six events, six webhook-ids. With the bare row id as
// webhook-id, a receiver that deduplicates took the second outbox's events for
// redeliveries of the first's and dropped them.
func TestTwoOutboxesToOneReceiverNeverShareAWebhookID(t *testing.T) {
	t.Parallel()
	srv := pgtest.Shared(t)
	a := newBundle(t, srv, nil)
	urlB := srv.NewDatabase(t)
	envB := e2e.Env(urlB, e2e.SlotName(urlB), a.recv.URL, nil)
	code, out := e2e.RunCommand(t, envB, "migrate")
	require.Equal(t, 0, code, out)
	poolB := e2e.Pool(t, urlB)

	da := e2e.StartDaemon(t, a.env)
	db := e2e.StartDaemon(t, envB)
	idsA := e2e.Insert(t, a.pool, 3, 1, one)
	idsB := e2e.Insert(t, poolB, 3, 1, one)
	require.Equal(t, idsA, idsB, "the same row ids in both outboxes")
	waitRequests(t, a.recv, 6)

	seen := map[string]int{}
	for _, dl := range a.recv.Deliveries() {
		seen[dl.WebhookID]++
	}
	require.Len(t, seen, 6, "six events, six webhook-ids: %v", seen)

	nsA, nsB := e2e.Namespace(t, a.pool), e2e.Namespace(t, poolB)
	require.NotEqual(t, nsA, nsB, "each outbox has a namespace of its own")
	perNS := map[string]int{}
	for _, dl := range a.recv.Deliveries() {
		switch dl.WebhookID {
		case e2e.WebhookIDOf(nsA, dl):
			perNS[nsA]++
		case e2e.WebhookIDOf(nsB, dl):
			perNS[nsB]++
		default:
			t.Fatalf("webhook-id %q is the message id of neither outbox's event %v", dl.WebhookID, dl.IDs)
		}
		require.True(t, dl.SigOK)
	}
	require.Equal(t, map[string]int{nsA: 3, nsB: 3}, perNS)
	require.Equal(t, 0, da.Stop(30*time.Second))
	require.Equal(t, 0, db.Stop(30*time.Second))
}

// TRUNCATE … RESTART IDENTITY, and new events reuse ids 1-3 (as after a
// restore from a backup): they are new events and must not carry the
// webhook-ids the receiver has seen already. A replay of them is a
// redelivery: the same webhook-ids as their first delivery.
func TestRestartedIdentityGetsNewWebhookIDs(t *testing.T) {
	t.Parallel()
	b := newBundle(t, pgtest.Shared(t), nil)
	d := e2e.StartDaemon(t, b.env)
	first := e2e.Insert(t, b.pool, 3, 1, one)
	b.recv.WaitAccepted(t, first, time.Minute)
	b.waitProcessed(t, 3, time.Minute)
	before := b.recv.Len()

	_, err := b.pool.Exec(context.Background(), "TRUNCATE domain_event RESTART IDENTITY")
	require.NoError(t, err)
	second := e2e.Insert(t, b.pool, 3, 1, one)
	require.Equal(t, first, second, "the ids are reused")
	waitRequests(t, b.recv, 6)
	b.waitProcessed(t, 3, time.Minute)

	seen := map[string]int{}
	for _, dl := range b.recv.Deliveries() {
		seen[dl.WebhookID]++
	}
	require.Len(t, seen, 6, "six events, six webhook-ids: %v", seen)
	ns := e2e.Namespace(t, b.pool)
	now := map[int64]string{} // webhook-ids of the events in the table now
	for i, dl := range b.recv.Deliveries() {
		require.Equal(t, e2e.WebhookIDOf(ns, dl), dl.WebhookID)
		if i >= before {
			now[dl.IDs[0]] = dl.WebhookID
		}
	}
	require.Len(t, now, 3)
	require.Equal(t, 0, d.Stop(30*time.Second))

	code, out := e2e.RunCommand(t, b.env, "replay")
	require.Equal(t, 0, code, out)
	replayed := 0
	for _, dl := range b.recv.Deliveries() {
		if !dl.Replay {
			continue
		}
		replayed++
		require.Equal(t, now[dl.IDs[0]], dl.WebhookID, "a replay carries the webhook-id of the first delivery")
	}
	require.Equal(t, 3, replayed)
}
