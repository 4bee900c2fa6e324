package security

import (
	"context"
	"errors"
	"net/http"
	"net/url"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/stretchr/testify/require"

	"github.com/outboxd/outboxd/internal/e2e"
	"github.com/outboxd/outboxd/internal/pgtest"
	"github.com/outboxd/outboxd/migrations"
)

// asRole returns raw with its user replaced by role (and password, if any).
func asRole(t *testing.T, raw, role, password string) string {
	t.Helper()
	u, err := url.Parse(raw)
	require.NoError(t, err)
	if password != "" {
		u.User = url.UserPassword(role, password)
	} else {
		u.User = url.User(role)
	}
	return u.String()
}

// Least privilege: after `outboxd migrate` (as the table owner), the role of
// migrations/roles.sql (LOGIN REPLICATION, no superuser, minimal grants)
// runs the whole pipeline: catch-up, streaming, marks, dead letters, the
// checkpoint across a restart. It cannot change or delete events.
func TestLeastPrivilegeRoleRunsThePipeline(t *testing.T) {
	t.Parallel()
	srv := pgtest.New(t, nil) // roles are cluster-wide: keep this one to itself
	w := newWorld(t, srv)
	ctx := context.Background()
	_, err := w.pool.Exec(ctx, migrations.RolesSQL)
	require.NoError(t, err, "apply migrations/roles.sql")

	var super, repl, createRole, createDB bool
	require.NoError(t, w.pool.QueryRow(ctx, `SELECT rolsuper, rolreplication, rolcreaterole, rolcreatedb FROM pg_roles WHERE rolname = 'outboxd'`).
		Scan(&super, &repl, &createRole, &createDB))
	require.False(t, super)
	require.True(t, repl)
	require.False(t, createRole)
	require.False(t, createDB)

	roleURL := asRole(t, w.url, "outboxd", "")
	// What the role must not do: touch events beyond the three columns.
	conn, err := pgx.Connect(ctx, roleURL)
	require.NoError(t, err)
	defer conn.Close(ctx)
	for _, sql := range []string{
		`INSERT INTO domain_event (event_name) VALUES ('forged')`,
		`DELETE FROM domain_event`,
		`UPDATE domain_event SET event_name = 'changed'`,
		`TRUNCATE domain_event`,
		`DROP TABLE domain_event`,
	} {
		_, err := conn.Exec(ctx, sql)
		var pgErr *pgconn.PgError
		require.True(t, errors.As(err, &pgErr) && (pgErr.Code == "42501" || pgErr.Code == "42P01"), "%s: want permission denied, got %v", sql, err)
	}

	// Subscriptions: the role reads them and may disable one (410 Gone),
	// never repoint a tenant's URL or change its secrets or globs.
	var subID int64
	require.NoError(t, w.pool.QueryRow(ctx, `INSERT INTO outboxd_subscription (url, secrets) VALUES ('https://tenant.example/h', '{whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw}') RETURNING id`).Scan(&subID))
	for _, sql := range []string{
		`UPDATE outboxd_subscription SET url = 'https://attacker.example/' WHERE id = $1`,
		`UPDATE outboxd_subscription SET secrets = '{whsec_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA}' WHERE id = $1`,
		`UPDATE outboxd_subscription SET events = '{}' WHERE id = $1`,
		`DELETE FROM outboxd_subscription WHERE id = $1`,
	} {
		_, err := conn.Exec(ctx, sql, subID)
		var pgErr *pgconn.PgError
		require.True(t, errors.As(err, &pgErr) && pgErr.Code == "42501", "%s: want permission denied, got %v", sql, err)
	}
	_, err = conn.Exec(ctx, `UPDATE outboxd_subscription SET enabled = false, disabled_reason = 'test', updated_at = now() WHERE id = $1`, subID)
	require.NoError(t, err, "the columns a 410 disables")
	_, err = w.pool.Exec(ctx, `DELETE FROM outboxd_subscription`)
	require.NoError(t, err)

	// status says what the role could do beyond outboxd's needs: this test
	// server accepts physical replication from every role (pg_hba.conf
	// `replication`); the superuser is named as such.
	statusEnv := w.env("https://hooks.example/outbox", nil)
	statusEnv["OUTBOXD_DATABASE_URL"] = roleURL
	_, out := e2e.RunCommand(t, statusEnv, "status", "--json")
	require.Contains(t, out, `accepts physical replication connections from role \"outboxd\"`)
	require.NotContains(t, out, "connected as superuser")
	_, out = e2e.RunCommand(t, w.env("https://hooks.example/outbox", nil), "status", "--json")
	require.Contains(t, out, "connected as superuser")

	before := w.insert(t, 20) // caught up from the table on first start
	recv := e2e.NewReceiver(t)
	bad := before[3]
	recv.Respond = func(d *e2e.Delivery) int {
		if len(d.IDs) == 1 && d.IDs[0] == bad {
			return http.StatusBadRequest
		}
		return http.StatusOK
	}
	env := w.env(recv.URL, nil)
	env["OUTBOXD_DATABASE_URL"] = roleURL
	d := e2e.StartDaemon(t, env)
	after := w.insert(t, 20)
	var good []int64
	for _, id := range append(append([]int64(nil), before...), after...) {
		if id != bad {
			good = append(good, id)
		}
	}
	recv.WaitAccepted(t, good, time.Minute)
	status, _ := w.deadLetter(t, bad)
	require.Equal(t, http.StatusBadRequest, status)
	e2e.WaitFor(t, time.Minute, func() bool {
		rows, _ := e2e.Processed(t, w.pool)
		return rows == int64(len(good))
	}, func() string { return "rows not marked by the restricted role" })
	require.Equal(t, 0, d.Stop(30*time.Second), d.Log())

	d = e2e.StartDaemon(t, env)
	more := w.insert(t, 5)
	recv.WaitAccepted(t, more, time.Minute)
	require.Equal(t, 0, d.Stop(30*time.Second), d.Log())
	c := recv.Count(append(good, more...))
	require.Zero(t, c.Duplicates, "restart as the restricted role resumes from its checkpoint")

	// The column grants are enough for what outboxd writes there: a
	// subscription whose endpoint answers 410 is disabled by the role.
	gone := e2e.NewReceiver(t)
	gone.Respond = func(*e2e.Delivery) int { return http.StatusGone }
	require.NoError(t, w.pool.QueryRow(ctx, `INSERT INTO outboxd_subscription (url, secrets) VALUES ($1, '{whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw}') RETURNING id`, gone.URL).Scan(&subID))
	d = e2e.StartDaemon(t, env)
	w.insert(t, 1)
	var reason string
	e2e.WaitFor(t, time.Minute, func() bool {
		var enabled bool
		return w.pool.QueryRow(ctx, `SELECT enabled, coalesce(disabled_reason, '') FROM outboxd_subscription WHERE id = $1`, subID).Scan(&enabled, &reason) == nil && !enabled
	}, func() string { return "the role did not disable the gone subscription; log:\n" + d.Log() })
	require.Contains(t, reason, "410")
	require.Equal(t, 0, d.Stop(30*time.Second), d.Log())
}
