package security

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/outboxd/outboxd/internal/e2e"
	"github.com/outboxd/outboxd/internal/pgtest"
)

// startExpectingRefusal starts `outboxd run` on rows already in the table and
// waits until it exits or recv gets a request, whichever comes first: a
// daemon that should have refused its configuration but runs fails the test
// at its first delivery instead of hanging. It returns the exit code and log.
func startExpectingRefusal(t *testing.T, env map[string]string, recv *e2e.Receiver) (int, string) {
	t.Helper()
	d := e2e.StartDaemon(t, env)
	e2e.WaitFor(t, 2*time.Minute, func() bool { return d.Exited() || recv.Len() > 0 },
		func() string { return "outboxd neither exited nor delivered" })
	require.Zero(t, recv.Len(), "outboxd started and delivered instead of refusing:\n%s", d.Log())
	return d.Wait(time.Minute), d.Log()
}

// A misspelt secret variable (OUTBOXD_WEBHOOK_SECRETS) with no
// OUTBOXD_WEBHOOK_SECRET stops `run` with exit 2 naming the variable meant,
// before anything is delivered: no unsigned request, and the value is never
// printed. (Security round 2, item 1.)
func TestMisspeltSecretVariableRefusesToStart(t *testing.T) {
	t.Parallel()
	// base64 of "security-round-2-typo-secret".
	const value = "whsec_c2VjdXJpdHktcm91bmQtMi10eXBvLXNlY3JldA=="
	w := newWorld(t, pgtest.Shared(t))
	recv := e2e.NewReceiver(t)
	ids := w.insert(t, 3)
	env := w.env(recv.URL, map[string]string{"OUTBOXD_WEBHOOK_SECRETS": value})
	delete(env, "OUTBOXD_WEBHOOK_SECRET")
	code, log := startExpectingRefusal(t, env, recv)
	require.Equal(t, 2, code, log)
	require.Contains(t, log, "OUTBOXD_WEBHOOK_SECRETS is not a setting; did you mean OUTBOXD_WEBHOOK_SECRET?")
	require.NotContains(t, log, value)
	require.NotContains(t, log, strings.TrimPrefix(value, "whsec_"))
	require.NotContains(t, strings.ToLower(log), "unsigned")
	require.Zero(t, recv.Len(), "nothing delivered")
	require.False(t, w.processed(t, ids[0]))
}

// Unsigned webhooks are a choice: with no secret and no
// OUTBOXD_WEBHOOK_UNSIGNED, `run` exits 2 naming both variables; a secret
// with OUTBOXD_WEBHOOK_UNSIGNED=true is a contradiction (exit 2); with
// OUTBOXD_WEBHOOK_UNSIGNED=true alone it starts, says so in its log, and
// delivers requests without a webhook-signature header. (Security round 2,
// item 1.)
func TestUnsignedWebhookOnlyWhenExplicit(t *testing.T) {
	t.Parallel()
	srv := pgtest.Shared(t)
	t.Run("no secret", func(t *testing.T) {
		t.Parallel()
		w := newWorld(t, srv)
		recv := e2e.NewReceiver(t)
		w.insert(t, 2)
		env := w.env(recv.URL, nil)
		delete(env, "OUTBOXD_WEBHOOK_SECRET")
		code, log := startExpectingRefusal(t, env, recv)
		require.Equal(t, 2, code, log)
		require.Contains(t, log, "OUTBOXD_WEBHOOK_SECRET: required")
		require.Contains(t, log, "OUTBOXD_WEBHOOK_UNSIGNED=true")
	})
	t.Run("secret and unsigned", func(t *testing.T) {
		t.Parallel()
		w := newWorld(t, srv)
		recv := e2e.NewReceiver(t)
		w.insert(t, 2)
		code, log := startExpectingRefusal(t, w.env(recv.URL, map[string]string{"OUTBOXD_WEBHOOK_UNSIGNED": "true"}), recv)
		require.Equal(t, 2, code, log)
		require.Contains(t, log, "OUTBOXD_WEBHOOK_UNSIGNED: true contradicts OUTBOXD_WEBHOOK_SECRET")
		require.NotContains(t, log, strings.TrimPrefix(e2e.Secret, "whsec_"))
	})
	t.Run("unsigned on purpose", func(t *testing.T) {
		t.Parallel()
		w := newWorld(t, srv)
		recv := e2e.NewReceiver(t)
		d := e2e.StartDaemon(t, w.env(recv.URL, map[string]string{"OUTBOXD_WEBHOOK_UNSIGNED": "true", "OUTBOXD_WEBHOOK_SECRET": ""}))
		ids := w.insert(t, 3)
		recv.WaitAccepted(t, ids, time.Minute)
		for _, dl := range recv.Deliveries() {
			require.Empty(t, dl.Signature, "request %s carries a webhook-signature header", dl.WebhookID)
			require.NotEmpty(t, dl.WebhookID, "the other Standard Webhooks headers are still sent")
		}
		require.Equal(t, 0, d.Stop(30*time.Second))
		require.Contains(t, d.Log(), "OUTBOXD_WEBHOOK_UNSIGNED=true: requests to the default webhook are not signed")
	})
}

// addSubscription inserts a subscription for every organization and event
// with plain SQL, signed with e2e.Secret, and returns its id.
func (w *world) addSubscription(t *testing.T, url string) int64 {
	t.Helper()
	var id int64
	require.NoError(t, w.pool.QueryRow(context.Background(), `INSERT INTO outboxd_subscription (url, secrets) VALUES ($1, $2) RETURNING id`,
		url, []string{e2e.Secret}).Scan(&id))
	return id
}

// OUTBOXD_ALLOW_PRIVATE_SINKS=true lets the default webhook reach a loopback
// receiver, but not tenant subscriptions: a subscription pointing at
// loopback, whether present at start, inserted while streaming or changed to
// another loopback URL by plain SQL, is never contacted; its deliveries are
// dead-lettered, after one attempt, with a reason naming the guard and
// OUTBOXD_ALLOW_PRIVATE_SUBSCRIPTIONS, while the default webhook gets every
// event. With OUTBOXD_ALLOW_PRIVATE_SUBSCRIPTIONS=true the subscription
// receives. (Security round 2, item 5.)
func TestPrivateSubscriptionsNeedTheirOwnAllowance(t *testing.T) {
	t.Parallel()
	srv := pgtest.Shared(t)
	t.Run("refused", func(t *testing.T) {
		t.Parallel()
		w := newWorld(t, srv)
		def, tenant, tenant2 := e2e.NewReceiver(t), e2e.NewReceiver(t), e2e.NewReceiver(t)
		contacted := func() int { return tenant.Len() + tenant2.Len() }
		subA := w.addSubscription(t, tenant.URL+"/a")
		d := e2e.StartDaemon(t, w.env(def.URL, map[string]string{
			"OUTBOXD_ALLOW_PRIVATE_SINKS":         "true",
			"OUTBOXD_ALLOW_PRIVATE_SUBSCRIPTIONS": "false",
		}))
		e2e.WaitFor(t, time.Minute, func() bool { return strings.Contains(d.Log(), "catch-up read the table") },
			func() string { return "not streaming" })
		ids := w.insert(t, 3)
		// Added through SQL while streaming, by name (localhost resolves to
		// loopback: the guard judges the address dialled).
		port := tenant2.URL[strings.LastIndex(tenant2.URL, ":")+1:]
		subB := w.addSubscription(t, "http://localhost:"+port+"/b")
		idsB := w.insert(t, 2)
		// Changed through SQL to another loopback URL.
		_, err := w.pool.Exec(context.Background(), `UPDATE outboxd_subscription SET url = $1, updated_at = now() WHERE id = $2`, tenant.URL+"/changed", subB)
		require.NoError(t, err)
		idsC := w.insert(t, 2)
		all := append(append(append([]int64(nil), ids...), idsB...), idsC...)

		def.WaitAccepted(t, all, time.Minute)
		sinkA, sinkB := fmt.Sprintf("subscription:%d", subA), fmt.Sprintf("subscription:%d", subB)
		want := map[string][]int64{sinkA: all, sinkB: append(append([]int64(nil), idsB...), idsC...)}
		count := func() int {
			var n int
			require.NoError(t, w.pool.QueryRow(context.Background(),
				`SELECT count(*) FROM outboxd_dead_letter WHERE sink IN ($1, $2)`, sinkA, sinkB).Scan(&n))
			return n
		}
		e2e.WaitFor(t, 2*time.Minute, func() bool { return contacted() > 0 || count() >= len(want[sinkA])+len(want[sinkB]) },
			func() string { return fmt.Sprintf("%d subscription deliveries dead-lettered", count()) })
		require.Zero(t, contacted(), "a subscription on loopback must never be contacted")
		for name, evs := range want {
			for _, id := range evs {
				var status, attempts int
				var reason string
				require.NoError(t, w.pool.QueryRow(context.Background(),
					`SELECT coalesce(last_status, 0), last_error, attempts FROM outboxd_dead_letter WHERE event_id = $1 AND sink = $2`, id, name).
					Scan(&status, &reason, &attempts), "event %d to %s", id, name)
				require.Zero(t, status, "no HTTP status: no connection was made")
				require.Equal(t, 1, attempts, "a refused address is not retried")
				require.Contains(t, reason, "forbidden destination address")
				require.Contains(t, reason, "loopback")
				require.Contains(t, reason, "OUTBOXD_ALLOW_PRIVATE_SUBSCRIPTIONS=true")
			}
		}
		var defaultDead int
		require.NoError(t, w.pool.QueryRow(context.Background(), `SELECT count(*) FROM outboxd_dead_letter WHERE sink = 'webhook'`).Scan(&defaultDead))
		require.Zero(t, defaultDead, "the default webhook is allowed by OUTBOXD_ALLOW_PRIVATE_SINKS")
		require.Equal(t, 0, d.Stop(30*time.Second))
		require.Zero(t, contacted())
	})
	t.Run("allowed", func(t *testing.T) {
		t.Parallel()
		w := newWorld(t, srv)
		def, tenant := e2e.NewReceiver(t), e2e.NewReceiver(t)
		w.addSubscription(t, tenant.URL+"/a")
		d := e2e.StartDaemon(t, w.env(def.URL, map[string]string{
			"OUTBOXD_ALLOW_PRIVATE_SINKS":         "false",
			"OUTBOXD_ALLOW_PRIVATE_SUBSCRIPTIONS": "true",
		}))
		ids := w.insert(t, 2)
		tenant.WaitAccepted(t, ids, time.Minute)
		for _, dl := range tenant.Deliveries() {
			require.True(t, dl.SigOK, "signed with the subscription's secret")
		}
		// The default webhook, on loopback too, is refused by its own switch.
		_, reason := w.deadLetter(t, ids[0])
		require.Contains(t, reason, "OUTBOXD_ALLOW_PRIVATE_SINKS=true")
		require.Zero(t, def.Len())
		require.Equal(t, 0, d.Stop(30*time.Second))
	})
}

// No tenant secret at rest in the checkpoint (security round 2, item 2): the
// routing state outboxd keeps in outboxd_checkpoint names a subscription's
// secrets by fingerprint only, and an instance that resumes from it after a
// kill -9 still signs the subscription's requests with the secret, read from
// outboxd_subscription (and the URL, whose query carries a token, likewise).
func TestCheckpointHoldsNoSubscriptionSecret(t *testing.T) {
	t.Parallel()
	w := newWorld(t, pgtest.Shared(t))
	def, sub := e2e.NewReceiver(t), e2e.NewReceiver(t)
	env := w.env(def.URL, nil)
	d := e2e.StartDaemon(t, env)
	e2e.WaitFor(t, time.Minute, func() bool { return strings.Contains(d.Log(), `"message":"streaming"`) },
		func() string { return "not streaming" })
	w.addSubscription(t, sub.URL+"/hook?token=tenant-tok-123")
	first := w.insert(t, 5)
	sub.WaitAccepted(t, first, time.Minute)
	var routing string
	e2e.WaitFor(t, time.Minute, func() bool {
		return w.pool.QueryRow(context.Background(), `SELECT coalesce(routing::text, '') FROM outboxd_checkpoint WHERE slot_name = $1`, w.slot).Scan(&routing) == nil &&
			strings.Contains(routing, "secret_fingerprints")
	}, func() string { return "routing state not written: " + routing })
	var whole string
	require.NoError(t, w.pool.QueryRow(context.Background(), `SELECT string_agg(c::text, ' ') FROM outboxd_checkpoint AS c`).Scan(&whole))
	require.NotContains(t, whole, strings.TrimPrefix(e2e.Secret, "whsec_"), "no signing key in outboxd_checkpoint")
	require.NotContains(t, whole, "tenant-tok-123", "no URL token in outboxd_checkpoint")

	d.Kill()
	d = e2e.StartDaemon(t, env)
	second := w.insert(t, 5)
	sub.WaitAccepted(t, second, time.Minute)
	for _, dl := range sub.Deliveries() {
		require.True(t, dl.SigOK, "every request to the subscription is signed with its secret; log:\n%s", d.Log())
	}
}
