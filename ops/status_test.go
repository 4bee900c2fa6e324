package ops

import (
	"context"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"github.com/stretchr/testify/require"

	"github.com/outboxd/outboxd/internal/pgtest"
	"github.com/outboxd/outboxd/store"
)

// A fresh slot with its checkpoint is healthy; every documented JSON field is
// present with the values the database holds.
func TestStatusReportsEveryField(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	_, err := b.client.CreateSlot(ctx, SlotOptions{})
	require.NoError(t, err)
	old := time.Date(2020, 1, 2, 3, 4, 5, 0, time.UTC)
	ids := b.insert(t, 3, "a", 1, old)
	b.insert(t, 2, "b", 1, time.Now())
	b.exec(t, `UPDATE domain_event SET is_processed = true WHERE id = $1`, ids[1])
	b.exec(t, `INSERT INTO outboxd_dead_letter (event_id, sink, last_error, attempts) VALUES ($1, 'webhook', 'HTTP 400', 1)`, ids[2])

	st, err := b.client.Status(ctx, StatusOptions{Config: map[string]string{"OUTBOXD_SLOT": b.target.Slot}})
	require.NoError(t, err)
	require.True(t, st.OK, "problems: %v", st.Problems)
	require.True(t, st.Slot.Exists)
	require.Equal(t, "pgoutput", st.Slot.Plugin)
	require.False(t, st.Slot.Active)
	require.Nil(t, st.Slot.ActivePID)
	require.Equal(t, "reserved", st.Slot.WALStatus)
	require.NotNil(t, st.Slot.LagBytes)
	require.GreaterOrEqual(t, *st.Slot.RetainedWALBytes, *st.Slot.LagBytes, "restart_lsn is never ahead of confirmed_flush_lsn")
	require.True(t, st.Checkpoint.Exists)
	require.True(t, st.Checkpoint.CatchupPending)
	require.NotNil(t, st.Checkpoint.SystemIdentifierMatch)
	require.True(t, *st.Checkpoint.SystemIdentifierMatch)
	require.Equal(t, *st.Slot.ConfirmedFlushLSN, *st.Checkpoint.LSN)
	require.EqualValues(t, 3, *st.Backlog.UnprocessedRows, "5 rows, 1 processed, 1 dead-lettered")
	require.Equal(t, old, *st.Backlog.OldestUnprocessedAt)
	require.EqualValues(t, 1, *st.Backlog.DeadLetters)
	require.True(t, st.Publication.Exists && st.Publication.IncludesTable && st.Publication.PublishesInsert)
	require.Contains(t, strings.Join(st.Warnings, "\n"), "not active")

	raw, err := json.Marshal(st)
	require.NoError(t, err)
	var m map[string]any
	require.NoError(t, json.Unmarshal(raw, &m))
	for section, keys := range map[string][]string{
		"":           {"ok", "problems", "warnings", "checked_at", "server", "slot", "checkpoint", "publication", "backlog", "config"},
		"server":     {"version", "database", "in_recovery", "current_wal_lsn", "system_identifier"},
		"slot":       {"name", "exists", "plugin", "database", "active", "active_pid", "restart_lsn", "confirmed_flush_lsn", "wal_status", "safe_wal_size_bytes", "retained_wal_bytes", "lag_bytes"},
		"checkpoint": {"exists", "lsn", "updated_at", "age_seconds", "system_identifier", "system_identifier_match", "timeline", "catchup_pending"},
		"backlog":    {"unprocessed_rows", "oldest_unprocessed_at", "oldest_unprocessed_age_seconds", "dead_letters", "parked"},
	} {
		obj := m
		if section != "" {
			obj = m[section].(map[string]any)
		}
		for _, k := range keys {
			require.Contains(t, obj, k, "%s.%s", section, k)
		}
	}
	require.Regexp(t, `^[0-9A-F]+/[0-9A-F]+$`, m["slot"].(map[string]any)["confirmed_flush_lsn"])
	require.Equal(t, b.target.Slot, m["config"].(map[string]any)["OUTBOXD_SLOT"])
}

// Each state that needs an operator is a problem with its reason.
func TestStatusProblems(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	problems := func(opts StatusOptions) string {
		t.Helper()
		st, err := b.client.Status(ctx, opts)
		require.NoError(t, err)
		require.Equal(t, len(st.Problems) == 0, st.OK)
		return strings.Join(st.Problems, "\n")
	}

	require.Contains(t, problems(StatusOptions{}), "does not exist: `outboxd run` creates it")

	_, err := b.client.CreateSlot(ctx, SlotOptions{})
	require.NoError(t, err)
	require.Empty(t, problems(StatusOptions{}))

	// WAL written elsewhere makes the unconsumed slot lag.
	b.exec(t, `CREATE TABLE filler AS SELECT g, repeat('x', 100) AS pad FROM generate_series(1, 2000) g`)
	require.Contains(t, problems(StatusOptions{MaxLagBytes: 1024}), "lags")

	b.exec(t, `UPDATE outboxd_checkpoint SET updated_at = now() - interval '2 hours'`)
	require.Contains(t, problems(StatusOptions{}), "catch-up of slot")
	require.Empty(t, problems(StatusOptions{MaxCatchupAge: 3 * time.Hour}))

	b.exec(t, `UPDATE outboxd_checkpoint SET system_identifier = '1', updated_at = now()`)
	require.Contains(t, problems(StatusOptions{}), "written on cluster 1")

	b.exec(t, `SELECT pg_drop_replication_slot($1)`, b.target.Slot)
	require.Contains(t, problems(StatusOptions{}), "missing although a checkpoint exists")

	b.exec(t, `ALTER PUBLICATION outboxd DROP TABLE domain_event`)
	require.Contains(t, problems(StatusOptions{}), "does not include table public.domain_event")
}

// slot status reports the slot and the checkpoint only.
func TestSlotOnlyStatus(t *testing.T) {
	t.Parallel()
	b := setup(t)
	st, err := b.client.Status(context.Background(), StatusOptions{SlotOnly: true, Config: map[string]string{"x": "y"}})
	require.NoError(t, err)
	require.Nil(t, st.Backlog)
	require.Nil(t, st.Publication)
	require.Nil(t, st.Config)
	require.False(t, st.OK)
}

// A least-privilege role (REPLICATION, SELECT on the tables, as in
// migrations/roles.sql) can run status: the system identifier comes from
// IDENTIFY_SYSTEM when pg_control_system() is refused.
func TestStatusAsLeastPrivilegeRole(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	_, err := b.client.CreateSlot(ctx, SlotOptions{})
	require.NoError(t, err)
	role := "r_" + b.target.Slot
	b.exec(t, `CREATE ROLE `+role+` LOGIN REPLICATION`)
	admin := pgtest.Shared(t).AdminConn(t)
	t.Cleanup(func() {
		// Roles are cluster-wide: drop this one (its grants live in the test's
		// database, dropped later).
		_, err := b.pool.Exec(context.Background(), `DROP OWNED BY `+role)
		require.NoError(t, err)
		_, err = admin.Exec(context.Background(), `DROP ROLE `+role)
		require.NoError(t, err)
	})
	b.exec(t, `GRANT SELECT ON ALL TABLES IN SCHEMA public TO `+role)
	b.exec(t, `REVOKE SELECT ON outboxd_dead_letter FROM `+role)
	b.exec(t, `REVOKE EXECUTE ON FUNCTION pg_control_system() FROM PUBLIC`)
	target := b.target
	target.DatabaseURL = strings.Replace(b.url, "postgres://postgres@", "postgres://"+role+"@", 1)
	c, err := Open(ctx, target, zerolog.Nop())
	require.NoError(t, err)
	defer c.Close()
	st, err := c.Status(ctx, StatusOptions{})
	require.NoError(t, err)
	require.NotEmpty(t, st.Server.SystemIdentifier)
	require.True(t, *st.Checkpoint.SystemIdentifierMatch)
	require.True(t, st.OK, "%v", st.Problems)
	require.Nil(t, st.Backlog.DeadLetters, "no privilege: unknown, not a failure")
	require.Contains(t, strings.Join(st.Warnings, "\n"), "no privilege to count dead letters")

	// A role that may read outboxd's tables but not the outbox table: the
	// per-target counts do not need it (the lag falls back to the time
	// parked).
	b.exec(t, `GRANT SELECT ON outboxd_dead_letter TO `+role)
	b.exec(t, `REVOKE SELECT ON domain_event FROM `+role)
	ids := b.insert(t, 1, "a", 1, time.Now())
	b.exec(t, `INSERT INTO outboxd_parked (target, event_id, ordering_key, commit_lsn, commit_index, next_attempt_at, parked_at)
VALUES ('webhook', $1, 1, '0/1', 0, now(), now() - interval '10 minutes')`, ids[0])
	st, err = c.Status(ctx, StatusOptions{})
	require.NoError(t, err)
	require.NotNil(t, st.Backlog.Targets, "%v", st.Warnings)
	require.Len(t, st.Backlog.Targets, 1)
	require.Equal(t, int64(1), st.Backlog.Targets[0].Parked)
	require.GreaterOrEqual(t, st.Backlog.Targets[0].LagSeconds, 600.0)
}

// With subscriptions and without commit timestamps (the test server's
// default), status says that a catch-up cannot route re-read rows by the
// subscriptions of their commit; without subscriptions it has nothing to say.
func TestStatusWarnsOfCatchupRoutingWithoutCommitTimestamps(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	const warning = "track_commit_timestamp is off"
	st, err := b.client.Status(ctx, StatusOptions{})
	require.NoError(t, err)
	require.NotContains(t, strings.Join(st.Warnings, "\n"), warning)
	b.exec(t, `INSERT INTO outboxd_subscription (url, secrets) VALUES ('https://example.test/hook', '{whsec_dGVzdHRlc3R0ZXN0dGVzdHRlc3R0ZXN0dGVzdA==}')`)
	st, err = b.client.Status(ctx, StatusOptions{})
	require.NoError(t, err)
	require.Contains(t, strings.Join(st.Warnings, "\n"), warning)
}

// status says whether the slot survives a promotion: on PostgreSQL 17+ the
// slot made with OUTBOXD_SLOT_FAILOVER has failover on, and what is missing
// on the primary (synchronized_standby_slots) is a warning; before 17 there
// are no failover slots, and no warning about them.
func TestStatusFailover(t *testing.T) {
	t.Parallel()
	pgtest.ForEachMajor(t, func(t *testing.T) {
		b := setup(t)
		ctx := context.Background()
		target := b.target
		target.SlotFailover = true
		client, err := Open(ctx, target, zerolog.Nop())
		require.NoError(t, err)
		t.Cleanup(client.Close)
		_, err = client.CreateSlot(ctx, SlotOptions{})
		require.NoError(t, err)
		st, err := client.Status(ctx, StatusOptions{SlotOnly: true})
		require.NoError(t, err)
		f := st.Failover
		require.NotNil(t, f)
		warnings := strings.Join(st.Warnings, "\n")
		if pgtest.Shared(t).Major() < 17 {
			require.False(t, f.Supported)
			require.False(t, f.Ready)
			require.Nil(t, f.SlotFailover)
			require.NotContains(t, warnings, "failover:")
			require.Contains(t, strings.Join(f.Missing, "\n"), "OUTBOXD_SLOT_RECREATE=true")
			return
		}
		require.True(t, f.Supported && f.Wanted)
		require.NotNil(t, f.SlotFailover)
		require.True(t, *f.SlotFailover, "slot create sets failover on 17+")
		require.False(t, f.Ready)
		require.NotNil(t, f.StandbySlotsPhysical)
		require.False(t, *f.StandbySlotsPhysical)
		require.Contains(t, warnings, "failover: synchronized_standby_slots is empty")
		require.True(t, st.OK, "missing failover settings are warnings, not problems: %v", st.Problems)

		// A slot without failover (made by hand, or by an older outboxd).
		b.exec(t, `SELECT pg_drop_replication_slot($1)`, b.target.Slot)
		b.exec(t, `SELECT pg_create_logical_replication_slot($1, 'pgoutput', false, false, false)`, b.target.Slot)
		st, err = client.Status(ctx, StatusOptions{SlotOnly: true})
		require.NoError(t, err)
		require.False(t, *st.Failover.SlotFailover)
		require.Contains(t, strings.Join(st.Failover.Missing, "\n"), "has failover off")

		raw, err := json.Marshal(st)
		require.NoError(t, err)
		var m map[string]any
		require.NoError(t, json.Unmarshal(raw, &m))
		for _, k := range []string{"server_major", "supported", "wanted", "slot_failover", "slot_synced", "wal_level", "synchronized_standby_slots",
			"standby_slots_physical", "sync_replication_slots", "hot_standby_feedback", "primary_slot_name", "primary_conninfo_dbname", "ready", "missing"} {
			require.Contains(t, m["failover"].(map[string]any), k)
		}
	})
}

// status reports each target's parked deliveries, dead letters and lag (the
// age of its oldest parked event): every own target, also a healthy one
// with nothing waiting (lag 0), and the subscriptions that have anything.
func TestStatusTargetLag(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	ids := b.insert(t, 3, "a", 1, time.Now())
	// Event 0 happened an hour ago and was parked half an hour ago; event 1
	// is younger; event 2 claims to happen in a day (a client's clock) and
	// was parked 5 minutes ago.
	b.exec(t, `UPDATE domain_event SET occurred_at = now() - interval '1 hour' WHERE id = $1`, ids[0])
	b.exec(t, `UPDATE domain_event SET occurred_at = now() + interval '1 day' WHERE id = $1`, ids[2])
	park := func(target string, id int64, parkedAgo string) {
		t.Helper()
		b.exec(t, `INSERT INTO outboxd_parked (target, event_id, ordering_key, commit_lsn, commit_index, next_attempt_at, parked_at)
VALUES ($1, $2, 1, '0/1', 0, now(), now() - $3::interval)`, target, id, parkedAgo)
	}
	park("posthog", ids[1], "1 minute")
	park("posthog", ids[0], "30 minutes")
	park("kafka", ids[2], "5 minutes")
	// The event of subscription 7's parked delivery is gone: the time it was
	// parked stands in.
	park("subscription:7", 999999, "10 minutes")
	b.exec(t, `INSERT INTO outboxd_dead_letter (event_id, sink, last_error, attempts) VALUES ($1, 'ga4', 'HTTP 400', 1), ($1, 'subscription:8', 'HTTP 400', 1)`, ids[1])

	opts := StatusOptions{Targets: []string{"webhook", "posthog", "ga4", "kafka"}}
	st, err := b.client.Status(ctx, opts)
	require.NoError(t, err)
	byName := map[string]int{}
	var names []string
	for i, tc := range st.Backlog.Targets {
		byName[tc.Target] = i
		names = append(names, tc.Target)
	}
	require.Equal(t, []string{"ga4", "kafka", "posthog", "subscription:7", "subscription:8", "webhook"}, names)
	get := func(name string) store.TargetCount { return st.Backlog.Targets[byName[name]] }
	within := func(name string, lo, hi float64) {
		t.Helper()
		lag := get(name).LagSeconds
		require.True(t, lag >= lo && lag < hi, "%s: lag %v not in [%v, %v)", name, lag, lo, hi)
	}

	webhook := get("webhook")
	require.Equal(t, store.TargetCount{Target: "webhook"}, webhook, "a healthy own target: listed, nothing waiting, lag 0")
	ph := get("posthog")
	require.EqualValues(t, 2, ph.Parked)
	require.Equal(t, ids[0], *ph.OldestParkedEventID, "the oldest parked event")
	within("posthog", 3600, 3600+300)
	require.WithinDuration(t, st.CheckedAt.Add(-time.Hour), *ph.OldestParkedAt, 5*time.Minute, "its occurred_at")
	within("kafka", 300, 300+300) // an occurred_at ahead: the parking time bounds it
	within("subscription:7", 600, 600+300)
	require.Equal(t, store.TargetCount{Target: "ga4", DeadLetters: 1}, get("ga4"), "dead letters only: no lag")
	require.EqualValues(t, 1, get("subscription:8").DeadLetters)

	// The lag grows while the delivery stays parked.
	again, err := b.client.Status(ctx, opts)
	require.NoError(t, err)
	require.Greater(t, again.Backlog.Targets[byName["posthog"]].LagSeconds, ph.LagSeconds)

	// Stable JSON field names (README, `status --json` fields).
	raw, err := json.Marshal(st)
	require.NoError(t, err)
	var m struct {
		Backlog struct {
			Targets []map[string]any `json:"targets"`
		} `json:"backlog"`
	}
	require.NoError(t, json.Unmarshal(raw, &m))
	require.Equal(t, map[string]any{"target": "webhook", "parked": 0.0, "dead_letters": 0.0, "lag_seconds": 0.0,
		"oldest_parked_event_id": nil, "oldest_parked_at": nil}, m.Backlog.Targets[byName["webhook"]])
	p := m.Backlog.Targets[byName["posthog"]]
	require.Equal(t, float64(ids[0]), p["oldest_parked_event_id"])
	require.IsType(t, "", p["oldest_parked_at"])
	require.Greater(t, p["lag_seconds"], 3600.0)

	// An ORM's occurred_at held as text: the time parked stands in (least()
	// of text and a timestamp failed the whole status).
	b.exec(t, `ALTER TABLE domain_event ALTER COLUMN occurred_at TYPE text USING occurred_at::text`)
	st, err = b.client.Status(ctx, opts)
	require.NoError(t, err)
	within("posthog", 1800, 1800+300)

	// A table without occurred_at (an ORM's): the time parked stands in.
	b.exec(t, `ALTER TABLE domain_event DROP COLUMN occurred_at CASCADE`)
	st, err = b.client.Status(ctx, opts)
	require.NoError(t, err)
	within("posthog", 1800, 1800+300)
	require.Equal(t, ids[0], *get("posthog").OldestParkedEventID)
}
