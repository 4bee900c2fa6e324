package security

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/outboxd/outboxd/internal/e2e"
	"github.com/outboxd/outboxd/internal/pgtest"
)

// echoReceiver records what it gets and answers with a body that echoes
// everything secret it saw (basic-auth header, signature, the query token,
// the shared webhook secret), the way a careless receiver's error page does.
type echoReceiver struct {
	*httptest.Server
	mu         sync.Mutex
	signatures []string
	attempts   map[string]int
	accepted   map[string]bool
}

func newEchoReceiver(t *testing.T, secret string) *echoReceiver {
	r := &echoReceiver{attempts: map[string]int{}, accepted: map[string]bool{}}
	r.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		id := req.Header.Get("webhook-id")
		sig := req.Header.Get("webhook-signature")
		r.mu.Lock()
		r.signatures = append(r.signatures, sig)
		r.attempts[id]++
		n := r.attempts[id]
		r.mu.Unlock()
		echo := fmt.Sprintf("auth=%s sig=%s secret=%s query=%s", req.Header.Get("Authorization"), sig, secret, req.URL.RawQuery)
		// The event id is the body's (webhook-id is the message id).
		var env struct {
			ID int64 `json:"id"`
		}
		body, _ := io.ReadAll(req.Body)
		_ = json.Unmarshal(body, &env) // a batch (an array) stays 0
		eventID := env.ID
		switch {
		case eventID%5 == 0:
			w.WriteHeader(http.StatusBadRequest) // dead letter
		case n == 1:
			w.WriteHeader(http.StatusServiceUnavailable) // retried
		default:
			r.mu.Lock()
			r.accepted[fmt.Sprint(eventID)] = true
			r.mu.Unlock()
			w.WriteHeader(http.StatusOK)
		}
		fmt.Fprint(w, echo)
	}))
	t.Cleanup(r.Close)
	return r
}

func (r *echoReceiver) waitAccepted(t *testing.T, ids []int64) {
	t.Helper()
	e2e.WaitFor(t, time.Minute, func() bool {
		r.mu.Lock()
		defer r.mu.Unlock()
		for _, id := range ids {
			if id%5 != 0 && !r.accepted[fmt.Sprint(id)] {
				return false
			}
		}
		return true
	}, func() string { return "not all events accepted" })
}

// No secret leaks: with a known DSN password, webhook secret, webhook
// credentials and query token, at debug level, through retries, dead letters
// echoing secrets, dropped connections, a Postgres restart, a restart of
// outboxd, bad configuration and unreachable databases: no log line, error
// output, dead-letter reason, /metrics, /healthz, /readyz or `outboxd status`
// output contains any of them, nor any signature sent.
func TestNoSecretLeaks(t *testing.T) {
	t.Parallel()
	const (
		dsnPass  = "dsn-Pa55-SECRET-q7"
		hookUser = "hookuser"
		hookPass = "hook-Pa55-SECRET-z3"
		queryTok = "query-SECRET-tok-81"
	)
	srv := pgtest.New(t, nil)
	w := newWorld(t, srv)
	ctx := context.Background()
	_, err := w.pool.Exec(ctx, `CREATE ROLE leaky LOGIN REPLICATION SUPERUSER PASSWORD '`+dsnPass+`'`)
	require.NoError(t, err)
	leakyURL := asRole(t, w.url, "leaky", dsnPass)

	recv := newEchoReceiver(t, e2e.Secret)
	hook, err := url.Parse(recv.URL + "/hook?token=" + queryTok)
	require.NoError(t, err)
	hook.User = url.UserPassword(hookUser, hookPass)
	httpAddr := e2e.FreeAddr(t)
	env := w.env(hook.String(), map[string]string{
		"OUTBOXD_LOG_LEVEL":            "trace",
		"OUTBOXD_HTTP_ADDR":            httpAddr,
		"OUTBOXD_WEBHOOK_MAX_ATTEMPTS": "3",
	})
	env["OUTBOXD_DATABASE_URL"] = leakyURL

	var texts []struct{ what, text string }
	add := func(what, text string) { texts = append(texts, struct{ what, text string }{what, text}) }

	// Bad configuration and unreachable databases, password in the URL.
	withURL := func(u string) map[string]string {
		e := map[string]string{}
		for k, v := range env {
			e[k] = v
		}
		e["OUTBOXD_DATABASE_URL"] = u
		return e
	}
	code, out := e2e.RunCommand(t, withURL("postgres://leaky:"+dsnPass+"@[::1"), "run")
	require.Equal(t, 2, code, out)
	add("run with an unparsable URL", out)
	closed := "postgres://leaky:" + dsnPass + "@" + e2e.FreeAddr(t) + "/db?sslmode=disable&connect_timeout=2"
	code, out = e2e.RunCommand(t, withURL(closed), "migrate")
	require.Equal(t, 1, code, out)
	add("migrate against a closed port", out)
	code, out = e2e.RunCommand(t, withURL(closed), "run")
	require.Equal(t, 1, code, out)
	add("run against a closed port", out)
	code, out = e2e.RunCommand(t, withURL("host=127.0.0.1 port=1 user=leaky password="+dsnPass+" dbname=db connect_timeout=2"), "run")
	require.Equal(t, 1, code, out)
	add("run with a key/value DSN against a closed port", out)

	// A tenant's subscription with its own secret and a token in its URL,
	// whose endpoint fails: its deliveries are parked.
	tenantSecret := "whsec_" + base64.StdEncoding.EncodeToString([]byte("tenant-SECRET-signing-key-0042"))
	tenantTok := "tenant-SECRET-tok-55"
	failing := e2e.NewReceiver(t)
	failing.Respond = func(*e2e.Delivery) int { return http.StatusServiceUnavailable }
	_, err = w.pool.Exec(ctx, `INSERT INTO outboxd_subscription (organization_id, url, secrets) VALUES (1, $1, $2)`,
		failing.URL+"/t?token="+tenantTok, []string{tenantSecret})
	require.NoError(t, err)

	// A run with retries and dead letters whose answers echo secrets.
	d := e2e.StartDaemon(t, env)
	ids := w.insert(t, 15)
	recv.waitAccepted(t, ids)
	for _, id := range ids {
		if id%5 == 0 {
			w.deadLetter(t, id)
		}
	}
	for _, path := range []string{"/metrics", "/healthz", "/readyz", "/health/replication"} {
		status, body := readAll(t, "http://"+httpAddr+path)
		t.Logf("GET %s: %d (%d bytes)", path, status, len(body))
		if path != "/metrics" {
			t.Logf("%s", body)
		}
		add("GET "+path, body)
	}
	// Connections dropped under it, then Postgres restarted.
	_, err = w.pool.Exec(ctx, `SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'outboxd' AND pid <> pg_backend_pid()`)
	require.NoError(t, err)
	more := w.insert(t, 5)
	recv.waitAccepted(t, more)
	srv.Restart(t, "fast")
	w.pool.Reset()
	more = w.insert(t, 5)
	recv.waitAccepted(t, more)
	require.Equal(t, 0, d.Stop(30*time.Second))
	add("log of the first run", d.Log())
	require.Contains(t, d.Log(), "reconnecting", "the run must have gone through reconnects")

	d = e2e.StartDaemon(t, env)
	more = w.insert(t, 5)
	recv.waitAccepted(t, more)
	// The operator commands, where this build has them (a missing one is
	// a usage error: exit 2, "unknown command").
	for _, args := range [][]string{{"status"}, {"status", "--json"}, {"slot", "status"}, {"dlq", "list"}, {"dlq", "list", "--json"},
		{"subscription", "list"}, {"subscription", "list", "--json"}} {
		code, out = e2e.RunCommand(t, env, args...)
		cmd := "outboxd " + strings.Join(args, " ")
		if code == 2 && strings.Contains(out, "unknown command") {
			t.Logf("%s does not exist in this build", cmd)
			continue
		}
		t.Logf("%s: exit %d, %d bytes", cmd, code, len(out))
		require.NotEmpty(t, out, cmd)
		add(cmd, out)
	}
	require.Equal(t, 0, d.Stop(30*time.Second))
	add("log of the second run", d.Log())

	// outboxd's own tables, whole rows as text.
	var parked int
	require.NoError(t, w.pool.QueryRow(ctx, `SELECT count(*) FROM outboxd_parked`).Scan(&parked))
	require.Positive(t, parked, "the failing subscription's deliveries are parked")
	for _, table := range []string{"outboxd_checkpoint", "outboxd_parked", "outboxd_dead_letter"} {
		var text string
		require.NoError(t, w.pool.QueryRow(ctx, `SELECT coalesce(string_agg(t::text, E'\n'), '') FROM `+table+` AS t`).Scan(&text))
		require.NotEmpty(t, text, table)
		add("table "+table, text)
	}

	rows, err := w.pool.Query(ctx, `SELECT last_error FROM outboxd_dead_letter`)
	require.NoError(t, err)
	n := 0
	for rows.Next() {
		var reason string
		require.NoError(t, rows.Scan(&reason))
		add("dead-letter reason", reason)
		n++
	}
	require.NoError(t, rows.Err())
	require.Positive(t, n)

	secrets := map[string]string{
		"DSN password":        dsnPass,
		"webhook secret":      e2e.Secret,
		"webhook secret key":  strings.TrimPrefix(e2e.Secret, "whsec_"),
		"webhook password":    hookPass,
		"webhook basic auth":  base64.StdEncoding.EncodeToString([]byte(hookUser + ":" + hookPass)),
		"webhook query token": queryTok,
		"tenant secret":       tenantSecret,
		"tenant secret key":   strings.TrimPrefix(tenantSecret, "whsec_"),
		"tenant URL token":    tenantTok,
	}
	recv.mu.Lock()
	for i, sig := range recv.signatures {
		for _, part := range strings.Fields(sig) {
			secrets[fmt.Sprintf("signature %d", i)] = strings.TrimPrefix(part, "v1,")
		}
	}
	recv.mu.Unlock()
	for _, tx := range texts {
		for name, secret := range secrets {
			require.NotContains(t, tx.text, secret, "%s leaks the %s", tx.what, name)
		}
	}
	t.Logf("checked %d texts against %d secrets", len(texts), len(secrets))
}
