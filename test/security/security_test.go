// Package security holds outboxd's end-to-end security tests (issue 5, G8):
// the SSRF guard with the real binary, Postgres TLS with sslmode=verify-full,
// the least-privilege role of migrations/roles.sql, and that no secret (DSN
// password, webhook secret, signature, webhook credentials) ever appears in a
// log line, an error, a dead letter, /metrics or `outboxd status`.
//
// Security round 2 (config_test.go):
//   - TestMisspeltSecretVariableRefusesToStart: OUTBOXD_WEBHOOK_SECRETS (a typo)
//     without a secret exits 2 naming OUTBOXD_WEBHOOK_SECRET, before any
//     (unsigned) request, never printing the value.
//   - TestUnsignedWebhookOnlyWhenExplicit: no secret without
//     OUTBOXD_WEBHOOK_UNSIGNED=true exits 2, a secret with it exits 2, and
//     with it alone requests go out without a webhook-signature header.
//   - TestPrivateSubscriptionsNeedTheirOwnAllowance: OUTBOXD_ALLOW_PRIVATE_SINKS
//     does not open loopback to subscription URLs (added or changed by SQL):
//     they are never contacted and their deliveries are dead-lettered naming
//     OUTBOXD_ALLOW_PRIVATE_SUBSCRIPTIONS, which alone allows them.
//   - TestLeastPrivilegeRoleRunsThePipeline (privilege_test.go) also: the
//     role cannot repoint a subscription or change its secrets or globs, yet
//     disables one that answered 410; `status` warns that the server accepts
//     physical replication from the role, and names a superuser.
//   - TestNoSecretLeaks also scans, at log level trace, `subscription list`
//     (text and --json), `dlq list --json` and outboxd_checkpoint,
//     outboxd_parked and outboxd_dead_letter row by row, with a tenant
//     subscription (own secret, token in its URL) whose deliveries park.
//   - TestCheckpointHoldsNoSubscriptionSecret: the routing state in
//     outboxd_checkpoint names a subscription's secrets (and a URL with a
//     token) by fingerprint only;
//     after a kill -9 the next instance still signs with the secret, read
//     from outboxd_subscription.
//   - TestSecretsStayOffCommandLines (cmdline_test.go): subscription add,
//     rotate-secret and receive read secrets from --secret-file (a file or
//     standard input); --secret warns that it shows in ps and shell history;
//     run --webhook-url warns about credentials in the URL without printing
//     them.
//   - TestParkedRetriesFollowTheDatabaseClock (clock_test.go): with the
//     database's clock an hour ahead of the daemon's (libfaketime), parked
//     deliveries are retried one schedule step apart and dead-lettered only
//     when the schedule is over: next_attempt_at is the database's now() plus
//     the step, compared with the database's now().
//
// Run: go test ./test/security/
package security

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/require"

	"github.com/outboxd/outboxd/internal/e2e"
	"github.com/outboxd/outboxd/internal/pgtest"
)

func TestMain(m *testing.M) { pgtest.Main(m) }

// world is a migrated database and the daemon environment for it.
type world struct {
	url  string
	pool *pgxpool.Pool
	slot string
}

func newWorld(t *testing.T, srv *pgtest.Server) *world {
	t.Helper()
	url := srv.NewDatabase(t)
	w := &world{url: url, pool: e2e.Pool(t, url), slot: e2e.SlotName(url)}
	code, out := e2e.RunCommand(t, e2e.Env(url, w.slot, "http://unused.invalid/", nil), "migrate")
	require.Equal(t, 0, code, out)
	return w
}

func (w *world) env(webhookURL string, extra map[string]string) map[string]string {
	return e2e.Env(w.url, w.slot, webhookURL, extra)
}

func (w *world) insert(t *testing.T, n int) []int64 {
	t.Helper()
	return e2e.Insert(t, w.pool, n, 1, func(i int) int64 { return int64(i % 3) })
}

// deadLetter waits for event id's dead letter and returns its status and
// reason.
func (w *world) deadLetter(t *testing.T, id int64) (int, string) {
	t.Helper()
	var status int
	var reason string
	e2e.WaitFor(t, time.Minute, func() bool {
		return w.pool.QueryRow(context.Background(), `SELECT coalesce(last_status, 0), last_error FROM outboxd_dead_letter WHERE event_id = $1`, id).
			Scan(&status, &reason) == nil
	}, func() string { return fmt.Sprintf("event %d not dead-lettered", id) })
	return status, reason
}

func (w *world) processed(t *testing.T, id int64) bool {
	t.Helper()
	var p bool
	require.NoError(t, w.pool.QueryRow(context.Background(), `SELECT is_processed FROM domain_event WHERE id = $1`, id).Scan(&p))
	return p
}

// The SSRF guard end to end: without OUTBOXD_ALLOW_PRIVATE_SINKS, a webhook
// URL whose address is loopback, private, link-local, CGNAT, unspecified or
// an IPv4-mapped form of those is refused when connecting: nothing is
// received, the event is dead-lettered with a forbidden-address reason and not
// retried. With the variable set, the same loopback receiver gets the event.
func TestSSRFGuardRefusesNonPublicSinks(t *testing.T) {
	t.Parallel()
	srv := pgtest.Shared(t)
	var hits sync.Map
	recv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hits.Store(r.Header.Get("webhook-id"), true)
	}))
	t.Cleanup(recv.Close)
	port := recv.URL[strings.LastIndex(recv.URL, ":")+1:]
	cases := []struct{ name, url, why string }{
		{"loopback", "http://127.0.0.1:" + port + "/hook", "loopback"},
		{"localhost", "http://localhost:" + port + "/hook", "loopback"},
		{"ipv6-loopback", "http://[::1]:" + port + "/hook", "loopback"},
		{"ipv4-mapped", "http://[::ffff:127.0.0.1]:" + port + "/hook", "loopback"},
		{"metadata", "http://169.254.169.254/latest/meta-data/", "link-local"},
		{"private", "http://10.1.2.3:8080/hook", "private"},
		{"cgnat", "http://100.64.0.1/hook", "carrier-grade NAT"},
		{"unspecified", "http://0.0.0.0:" + port + "/hook", "unspecified"},
		{"nat64", "http://[64:ff9b::a9fe:a9fe]/hook", "link-local"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			w := newWorld(t, srv)
			d := e2e.StartDaemon(t, w.env(tc.url, map[string]string{"OUTBOXD_ALLOW_PRIVATE_SINKS": "false"}))
			ids := w.insert(t, 1)
			status, reason := w.deadLetter(t, ids[0])
			require.Zero(t, status, "no HTTP status: the connection was never made")
			require.Contains(t, reason, "forbidden destination address")
			require.Contains(t, reason, tc.why)
			var attempts int
			require.NoError(t, w.pool.QueryRow(context.Background(), `SELECT attempts FROM outboxd_dead_letter WHERE event_id = $1`, ids[0]).Scan(&attempts))
			require.Equal(t, 1, attempts, "a forbidden address is not retried")
			require.False(t, w.processed(t, ids[0]))
			_, hit := hits.Load(fmt.Sprint(ids[0]))
			require.False(t, hit, "the receiver must get nothing")
			require.Equal(t, 0, d.Stop(30*time.Second))
		})
	}
	t.Run("allowed", func(t *testing.T) {
		t.Parallel()
		w := newWorld(t, srv)
		recv := e2e.NewReceiver(t)
		d := e2e.StartDaemon(t, w.env(recv.URL, map[string]string{"OUTBOXD_ALLOW_PRIVATE_SINKS": "true"}))
		ids := w.insert(t, 3)
		recv.WaitAccepted(t, ids, time.Minute)
		require.Equal(t, 0, d.Stop(30*time.Second))
	})
}

// readAll GETs url and returns status and body.
func readAll(t *testing.T, url string) (int, string) {
	t.Helper()
	resp, err := http.Get(url) //nolint:noctx // test helper
	if err != nil {
		return 0, err.Error()
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}
