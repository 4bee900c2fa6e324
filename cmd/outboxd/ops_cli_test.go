package main

import (
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/require"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/outboxd/outboxd/internal/e2e"
	"github.com/outboxd/outboxd/internal/pgtest"
)

// Tests of the operator commands run in process (run(...)); the ones that
// need the daemon are in ops_repair_test.go.

// opsDB is a migrated database of its own with the environment of the
// commands; the DSN carries a password (ignored by the test server's trust
// authentication) to check it is never printed.
type opsDB struct {
	url  string
	pool *pgxpool.Pool
	recv *e2e.Receiver
	env  map[string]string
}

const opsPassword = "hunter2pw"

func newOpsDB(t *testing.T) *opsDB {
	t.Helper()
	url := pgtest.Shared(t).NewDatabase(t)
	db := &opsDB{url: url, pool: e2e.Pool(t, url), recv: e2e.NewReceiver(t)}
	withPassword := strings.Replace(url, "postgres://postgres@", "postgres://postgres:"+opsPassword+"@", 1)
	db.env = e2e.Env(withPassword, e2e.SlotName(url), db.recv.URL, map[string]string{"OUTBOXD_LOG_FORMAT": "console", "OUTBOXD_LOG_LEVEL": "warn"})
	code, out, errOut := opsRun(t, db.env, "migrate")
	require.Equal(t, 0, code, out+errOut)
	return db
}

// opsRun runs one command in process and returns its exit code, stdout and
// stderr.
func opsRun(t *testing.T, env map[string]string, args ...string) (int, string, string) {
	t.Helper()
	var environ []string
	for k, v := range env {
		environ = append(environ, k+"="+v)
	}
	var stdout, stderr strings.Builder
	err := run(context.Background(), args, nil, environ, &stdout, &stderr)
	code := exitCode(err, &stderr)
	require.NotContains(t, stdout.String()+stderr.String(), opsPassword, "the DSN password leaked")
	require.NotContains(t, stdout.String()+stderr.String(), strings.TrimPrefix(e2e.Secret, "whsec_"), "the webhook secret leaked")
	return code, stdout.String(), stderr.String()
}

func (db *opsDB) exec(t *testing.T, sql string, args ...any) {
	t.Helper()
	_, err := db.pool.Exec(context.Background(), sql, args...)
	require.NoError(t, err)
}

func (db *opsDB) insert(t *testing.T, n int, name string, org int64, at time.Time) []int64 {
	t.Helper()
	rows, err := db.pool.Query(context.Background(), `INSERT INTO domain_event (event_name, organization_id, occurred_at)
SELECT $1, $2, $3 FROM generate_series(1, $4) ORDER BY 1 RETURNING id`, name, org, at, n)
	require.NoError(t, err)
	ids, err := pgx.CollectRows(rows, pgx.RowTo[int64])
	require.NoError(t, err)
	return ids
}

func (db *opsDB) slotLSN(t *testing.T) (pglogrepl.LSN, bool) {
	t.Helper()
	var l pglogrepl.LSN
	err := db.pool.QueryRow(context.Background(), `SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = $1`, db.env["OUTBOXD_SLOT"]).Scan(&l)
	if err == pgx.ErrNoRows {
		return 0, false
	}
	require.NoError(t, err)
	return l, true
}

func (db *opsDB) slotActive(t *testing.T) bool {
	t.Helper()
	var active bool
	err := db.pool.QueryRow(context.Background(), `SELECT active FROM pg_replication_slots WHERE slot_name = $1`, db.env["OUTBOXD_SLOT"]).Scan(&active)
	return err == nil && active
}

func statusJSON(t *testing.T, out string) map[string]any {
	t.Helper()
	var m map[string]any
	require.NoError(t, json.Unmarshal([]byte(out), &m), out)
	return m
}

// status: exit 1 with the reason while the slot is missing, 0 once created;
// JSON with the documented fields; the configuration with secrets redacted.
func TestStatusCommand(t *testing.T) {
	t.Parallel()
	db := newOpsDB(t)
	code, out, errOut := opsRun(t, db.env, "status", "--json")
	require.Equal(t, 1, code, errOut)
	m := statusJSON(t, out)
	require.Equal(t, false, m["ok"])
	require.Contains(t, fmt.Sprint(m["problems"]), "does not exist")
	require.Contains(t, errOut, "1 problem needs attention")

	code, out, errOut = opsRun(t, db.env, "slot", "create")
	require.Equal(t, 0, code, out+errOut)
	require.Contains(t, out, "created slot")

	code, out, errOut = opsRun(t, db.env, "status", "--json")
	require.Equal(t, 0, code, out+errOut)
	m = statusJSON(t, out)
	require.Equal(t, true, m["ok"])
	slot := m["slot"].(map[string]any)
	for _, k := range []string{"exists", "active", "active_pid", "confirmed_flush_lsn", "restart_lsn", "wal_status", "safe_wal_size_bytes", "retained_wal_bytes", "lag_bytes"} {
		require.Contains(t, slot, k)
	}
	require.Equal(t, true, slot["exists"])
	cfg := m["config"].(map[string]any)
	require.Equal(t, "***", cfg["OUTBOXD_WEBHOOK_SECRET"])
	require.Contains(t, cfg["OUTBOXD_DATABASE_URL"], "postgres:***@")
	require.Equal(t, db.env["OUTBOXD_SLOT"], cfg["OUTBOXD_SLOT"])
	cp := m["checkpoint"].(map[string]any)
	require.Equal(t, true, cp["system_identifier_match"])

	code, out, _ = opsRun(t, db.env, "status")
	require.Equal(t, 0, code)
	require.Contains(t, out, "Slot         "+db.env["OUTBOXD_SLOT"]+": inactive")
	require.Contains(t, out, "catch-up PENDING")
	require.Contains(t, out, "OUTBOXD_DATABASE_URL=postgres://postgres:***@")
	require.True(t, strings.HasSuffix(out, "OK\n"), out)

	db.insert(t, 50, "filler", 1, time.Now())
	code, out, _ = opsRun(t, db.env, "status", "--max-lag-bytes", "1")
	require.Equal(t, 1, code)
	require.Contains(t, out, "NEEDS ATTENTION")
	require.Contains(t, out, "lags")
	env := maps.Clone(db.env)
	env["OUTBOXD_LAG_ALERT_BYTES"] = "1"
	code, out, _ = opsRun(t, env, "status")
	require.Equal(t, 1, code, "the daemon's alert threshold is the default")
	require.Contains(t, out, "lags")

	code, out, _ = opsRun(t, db.env, "slot", "status", "--json")
	require.Equal(t, 0, code, out)
	m = statusJSON(t, out)
	require.NotContains(t, m, "backlog")
	require.NotContains(t, m, "config")

	code, _, errOut = opsRun(t, db.env, "status", "--max-lag-bytes", "lots")
	require.Equal(t, 2, code, errOut)
}

// status lists each destination of OUTBOXD_SINKS with its parked
// deliveries, dead letters and lag, a healthy one too (lag 0), and a
// subscription that has anything waiting.
func TestStatusCommandTargetLag(t *testing.T) {
	t.Parallel()
	db := newOpsDB(t)
	env := maps.Clone(db.env)
	env["OUTBOXD_SINKS"], env["OUTBOXD_STDOUT_PATH"] = "webhook,stdout", filepath.Join(t.TempDir(), "events.jsonl")
	ids := db.insert(t, 2, "batch_started", 1, time.Now())
	db.exec(t, `UPDATE domain_event SET occurred_at = now() - interval '2 hours' WHERE id = $1`, ids[0])
	db.exec(t, `INSERT INTO outboxd_parked (target, event_id, ordering_key, commit_lsn, commit_index, next_attempt_at, parked_at)
SELECT 'stdout', id, 1, '0/1', 0, now(), now() - interval '1 hour' FROM domain_event`)
	db.exec(t, `INSERT INTO outboxd_dead_letter (event_id, sink, last_error, attempts) VALUES ($1, 'subscription:3', 'HTTP 400', 1)`, ids[1])

	_, out, errOut := opsRun(t, env, "status", "--json")
	var st struct {
		Backlog struct {
			Targets []struct {
				Target      string     `json:"target"`
				Parked      int64      `json:"parked"`
				DeadLetters int64      `json:"dead_letters"`
				LagSeconds  float64    `json:"lag_seconds"`
				OldestID    *int64     `json:"oldest_parked_event_id"`
				OldestAt    *time.Time `json:"oldest_parked_at"`
			} `json:"targets"`
		} `json:"backlog"`
	}
	require.NoError(t, json.Unmarshal([]byte(out), &st), out+errOut)
	targets := st.Backlog.Targets
	require.Len(t, targets, 3, out)
	require.Equal(t, []string{"stdout", "subscription:3", "webhook"}, []string{targets[0].Target, targets[1].Target, targets[2].Target})
	require.EqualValues(t, 2, targets[0].Parked)
	require.Equal(t, ids[0], *targets[0].OldestID)
	require.True(t, targets[0].LagSeconds >= 7200 && targets[0].LagSeconds < 7200+300, "lag %v: the oldest event's occurred_at", targets[0].LagSeconds)
	require.NotNil(t, targets[0].OldestAt)
	require.EqualValues(t, 1, targets[1].DeadLetters)
	require.Zero(t, targets[1].LagSeconds)
	require.Zero(t, targets[2].Parked+targets[2].DeadLetters)
	require.Zero(t, targets[2].LagSeconds, "a healthy destination: lag 0")
	require.Nil(t, targets[2].OldestID)

	_, out, _ = opsRun(t, env, "status")
	require.Regexp(t, `\n  stdout +2 parked, 0 dead letters, lag 2h0m[0-9]+s \(oldest parked event `+fmt.Sprint(ids[0])+`, `, out)
	require.Regexp(t, `\n  webhook +0 parked, 0 dead letters, lag 0\n`, out)
}

// The slot commands: --yes required for the destructive ones, dry runs change
// nothing, advance moves forward only, an active slot needs --force.
func TestSlotCommands(t *testing.T) {
	t.Parallel()
	db := newOpsDB(t)
	for _, args := range [][]string{
		{"slot", "drop"}, {"slot", "reset"}, {"slot", "advance", "--to-lsn", "0/1"},
		{"slot", "advance", "--yes"}, {"slot", "advance", "--yes", "--to-lsn", "nope"},
	} {
		code, _, errOut := opsRun(t, db.env, args...)
		require.Equal(t, 2, code, "%v: %s", args, errOut)
	}
	_, _, errOut := opsRun(t, db.env, "slot", "reset")
	require.Contains(t, errOut, "add --yes to confirm, or --dry-run")

	code, out, _ := opsRun(t, db.env, "slot", "create", "--dry-run")
	require.Equal(t, 0, code)
	require.Contains(t, out, "dry run")
	_, exists := db.slotLSN(t)
	require.False(t, exists)
	code, out, errOut = opsRun(t, db.env, "slot", "create")
	require.Equal(t, 0, code, errOut)
	from, exists := db.slotLSN(t)
	require.True(t, exists)

	db.insert(t, 20, "a", 1, time.Now())
	var to pglogrepl.LSN
	require.NoError(t, db.pool.QueryRow(context.Background(), `SELECT pg_current_wal_lsn()`).Scan(&to))
	code, out, _ = opsRun(t, db.env, "slot", "advance", "--to-lsn", to.String(), "--dry-run")
	require.Equal(t, 0, code, out)
	got, _ := db.slotLSN(t)
	require.Equal(t, from, got, "dry run")
	code, out, errOut = opsRun(t, db.env, "slot", "advance", "--to-lsn", to.String(), "--yes")
	require.Equal(t, 0, code, out+errOut)
	got, _ = db.slotLSN(t)
	require.Equal(t, to, got)
	code, _, errOut = opsRun(t, db.env, "slot", "advance", "--to-lsn", from.String(), "--yes")
	require.Equal(t, 1, code)
	require.Contains(t, errOut, "forward only")
	got, _ = db.slotLSN(t)
	require.Equal(t, to, got, "a backwards advance changed the slot")

	// Another process streams from the slot.
	cfg, err := pgconn.ParseConfig(db.url)
	require.NoError(t, err)
	cfg.RuntimeParams["replication"] = "database"
	holder, err := pgconn.ConnectConfig(context.Background(), cfg)
	require.NoError(t, err)
	defer holder.Close(context.Background()) //nolint:errcheck // terminated below
	require.NoError(t, pglogrepl.StartReplication(context.Background(), holder, db.env["OUTBOXD_SLOT"], 0,
		pglogrepl.StartReplicationOptions{PluginArgs: []string{"proto_version '1'", "publication_names 'outboxd'"}}))
	e2e.WaitFor(t, 10*time.Second, func() bool { return db.slotActive(t) }, func() string { return "slot not active" })

	code, _, errOut = opsRun(t, db.env, "slot", "drop", "--yes")
	require.Equal(t, 1, code)
	require.Contains(t, errOut, "is active in process")
	require.Contains(t, errOut, "--force")
	// Refused, in JSON: a script reads that nothing was done, and why.
	code, out, _ = opsRun(t, db.env, "slot", "drop", "--yes", "--json")
	require.Equal(t, 1, code)
	var refusal struct {
		OK      *bool  `json:"ok"`
		Refused bool   `json:"refused"`
		Error   string `json:"error"`
	}
	require.NoError(t, json.Unmarshal([]byte(out), &refusal), out)
	require.NotNil(t, refusal.OK, out)
	require.False(t, *refusal.OK, out)
	require.True(t, refusal.Refused, out)
	require.Contains(t, refusal.Error, "is active in process")
	require.True(t, db.slotActive(t), "a refused drop dropped the slot")
	code, out, _ = opsRun(t, db.env, "slot", "drop", "--yes", "--force", "--dry-run")
	require.Equal(t, 0, code)
	require.Contains(t, out, "terminate process")
	require.True(t, db.slotActive(t), "a dry run terminated the holder")

	code, out, errOut = opsRun(t, db.env, "slot", "drop", "--yes", "--force", "--json")
	require.Equal(t, 0, code, errOut)
	var res struct {
		OK           bool    `json:"ok"`
		Terminated   []int32 `json:"terminated"`
		RowsToReread int64   `json:"rows_to_reread"`
	}
	require.NoError(t, json.Unmarshal([]byte(out), &res), out)
	require.True(t, res.OK, out)
	require.Len(t, res.Terminated, 1)
	require.EqualValues(t, 20, res.RowsToReread)
	_, exists = db.slotLSN(t)
	require.False(t, exists)
}

// replay: filters select exactly the rows, requests carry the message id and
// webhook-replay; --dry-run sends nothing; failures exit 1; a subscription
// target gets only its organization's events, signed with its secret.
func TestReplayCommand(t *testing.T) {
	t.Parallel()
	db := newOpsDB(t)
	day := func(d int) time.Time { return time.Date(2026, 3, d, 0, 0, 0, 0, time.UTC) }
	a7 := db.insert(t, 4, "order.created", 7, day(1))
	b7 := db.insert(t, 4, "order.paid", 7, day(2))
	a8 := db.insert(t, 4, "order.created", 8, day(3))
	c8 := db.insert(t, 4, "user.created", 8, day(4))
	db.exec(t, `UPDATE domain_event SET is_processed = true, processed_at = now()`)

	code, out, errOut := opsRun(t, db.env, "replay", "--event", "order.*", "--organization", "8", "--dry-run")
	require.Equal(t, 0, code, errOut)
	require.Contains(t, out, "4 events match")
	require.Empty(t, db.recv.Deliveries())

	code, out, errOut = opsRun(t, db.env, "replay", "--event", "order.*,user.*", "--organization", "7,8", "--since", "2026-03-02", "--until", "2026-03-04T00:00:00Z", "--json")
	require.Equal(t, 0, code, out+errOut)
	var res struct {
		Matched, Replayed, Failed int64
	}
	require.NoError(t, json.Unmarshal([]byte(out), &res))
	want := slices.Concat(b7, a8)
	require.EqualValues(t, len(want), res.Replayed)
	require.Equal(t, want, db.recv.Accepted())
	for _, d := range db.recv.Deliveries() {
		require.True(t, d.Replay)
		require.True(t, d.SigOK)
		require.Equal(t, e2e.WebhookIDOf(e2e.Namespace(t, db.pool), d), d.WebhookID)
	}

	// The default webhook gets only OUTBOXD_WEBHOOK_EVENTS.
	filtered := e2e.NewReceiver(t)
	env := maps.Clone(db.env)
	env["OUTBOXD_WEBHOOK_EVENTS"] = "user.*"
	env["OUTBOXD_WEBHOOK_URL"] = filtered.URL
	code, out, errOut = opsRun(t, env, "replay")
	require.Equal(t, 0, code, out+errOut)
	require.Equal(t, c8, filtered.Accepted())

	// No secret and no OUTBOXD_WEBHOOK_UNSIGNED: nothing is replayed unsigned.
	unsigned := maps.Clone(env)
	delete(unsigned, "OUTBOXD_WEBHOOK_SECRET")
	before := len(filtered.Deliveries())
	code, out, errOut = opsRun(t, unsigned, "replay")
	require.Equal(t, 2, code, out+errOut)
	require.Contains(t, errOut, "OUTBOXD_WEBHOOK_SECRET")
	require.Len(t, filtered.Deliveries(), before, "nothing was sent")

	// An id range, a receiver that refuses one event: exit 1 naming it.
	recv := e2e.NewReceiver(t)
	recv.Respond = func(d *e2e.Delivery) int {
		if d.IDs[0] == a7[2] {
			return http.StatusBadRequest
		}
		return http.StatusOK
	}
	code, out, errOut = opsRun(t, db.env, "replay", "--from-id", fmt.Sprint(a7[1]), "--to-id", fmt.Sprint(a7[3]), "--webhook-url", recv.URL)
	require.Equal(t, 1, code)
	require.Contains(t, out, "replayed 2, failed 1")
	require.Contains(t, out, fmt.Sprintf("failed event ids: %d", a7[2]))
	require.Contains(t, errOut, "1 of 3 events failed")

	// A subscription target.
	db.exec(t, `CREATE TABLE IF NOT EXISTS outboxd_subscription (id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
  organization_id bigint, url text NOT NULL, secrets text[] NOT NULL DEFAULT '{}', events text[] NOT NULL DEFAULT '{}',
  enabled boolean NOT NULL DEFAULT true)`)
	subRecv := e2e.NewReceiver(t)
	var sub int64
	require.NoError(t, db.pool.QueryRow(context.Background(), `INSERT INTO outboxd_subscription (organization_id, url, secrets, events)
VALUES (8, $1, $2, '{user.*}') RETURNING id`, subRecv.URL, []string{e2e.Secret}).Scan(&sub))
	code, out, errOut = opsRun(t, db.env, "replay", "--subscription", fmt.Sprint(sub))
	require.Equal(t, 0, code, out+errOut)
	require.Equal(t, c8, subRecv.Accepted(), "organization 8's user.* events only")
	code, _, errOut = opsRun(t, db.env, "replay", "--subscription", fmt.Sprint(sub), "--organization", "7")
	require.Equal(t, 2, code, errOut)
	code, _, errOut = opsRun(t, db.env, "replay", "--subscription", "999999")
	require.Equal(t, 2, code)
	require.Contains(t, errOut, "no such subscription")
	db.exec(t, `DROP TABLE outboxd_subscription CASCADE`)
	code, _, errOut = opsRun(t, db.env, "replay", "--subscription", fmt.Sprint(sub))
	require.Equal(t, 2, code)
	require.Contains(t, errOut, "no subscriptions")

	for _, args := range [][]string{
		{"replay", "--since", "yesterday"}, {"replay", "--event", "[x"}, {"replay", "--from-id", "9", "--to-id", "1"},
		{"replay", "--rate", "-1"}, {"replay", "--concurrency", "0"}, {"replay", "--subscription", "1", "--webhook-url", "https://x"},
	} {
		code, _, errOut := opsRun(t, db.env, args...)
		require.Equal(t, 2, code, "%v: %s", args, errOut)
	}
}

// replay --rate: n events take at least (n-1)/rate seconds.
func TestReplayCommandRate(t *testing.T) {
	t.Parallel()
	db := newOpsDB(t)
	db.insert(t, 9, "a", 1, time.Now())
	db.env["OUTBOXD_LOG_LEVEL"] = "info"
	start := time.Now()
	code, out, errOut := opsRun(t, db.env, "replay", "--rate", "20", "--concurrency", "3")
	elapsed := time.Since(start)
	require.Equal(t, 0, code, out+errOut)
	require.Contains(t, out, "replayed 9, failed 0")
	t.Logf("9 events at 20/s: %s", elapsed)
	require.GreaterOrEqual(t, elapsed, 400*time.Millisecond)
	require.Contains(t, errOut, "replay progress", "off a terminal, progress is logged")
}

// replay goes to the sink run delivers to: here stdout into a file, and a
// Kafka cluster (kfake), with the events' message ids. It used to need
// OUTBOXD_WEBHOOK_URL whatever OUTBOXD_SINK said (exit 2).
func TestReplayToOtherSinks(t *testing.T) {
	t.Parallel()
	db := newOpsDB(t)
	ids := db.insert(t, 4, "batch_started", 3, time.Now())
	db.exec(t, `UPDATE domain_event SET is_processed = true, processed_at = now()`)

	path := filepath.Join(t.TempDir(), "replay.jsonl")
	env := maps.Clone(db.env)
	delete(env, "OUTBOXD_WEBHOOK_URL")
	env["OUTBOXD_SINK"], env["OUTBOXD_STDOUT_PATH"] = "stdout", path
	code, out, errOut := opsRun(t, env, "replay", "--organization", "3")
	require.Equal(t, 0, code, out+errOut)
	require.Contains(t, out, "replayed 4, failed 0")
	require.Contains(t, out, "the stdout sink")
	data, err := os.ReadFile(path)
	require.NoError(t, err)
	var got []int64
	for line := range strings.SplitSeq(strings.TrimSpace(string(data)), "\n") {
		var env struct{ ID int64 }
		require.NoError(t, json.Unmarshal([]byte(line), &env), line)
		got = append(got, env.ID)
	}
	require.ElementsMatch(t, ids, got)

	c, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.SeedTopics(1, "events"))
	require.NoError(t, err)
	t.Cleanup(c.Close)
	env = maps.Clone(db.env)
	delete(env, "OUTBOXD_WEBHOOK_URL")
	env["OUTBOXD_SINK"], env["OUTBOXD_KAFKA_BROKERS"], env["OUTBOXD_KAFKA_TOPIC"] = "kafka", strings.Join(c.ListenAddrs(), ","), "events"
	code, out, errOut = opsRun(t, env, "replay")
	require.Equal(t, 0, code, out+errOut)
	require.Contains(t, out, "replayed 4, failed 0")
	cl, err := kgo.NewClient(kgo.SeedBrokers(c.ListenAddrs()...), kgo.ConsumeTopics("events"), kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()))
	require.NoError(t, err)
	defer cl.Close()
	ns := e2e.Namespace(t, db.pool)
	var msgIDs []string
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	for len(msgIDs) < 4 && ctx.Err() == nil {
		cl.PollFetches(ctx).EachRecord(func(r *kgo.Record) {
			for _, h := range r.Headers {
				if h.Key == "outboxd-message-id" {
					msgIDs = append(msgIDs, string(h.Value))
				}
			}
		})
	}
	require.Len(t, msgIDs, 4)
	for _, m := range msgIDs {
		require.True(t, strings.HasPrefix(m, "evt_"+ns+"_"), "message id %q is the outbox's", m)
	}
}

// prune: usage errors (no retention, no --yes), a dry run, then only old
// processed rows go.
func TestPruneCommand(t *testing.T) {
	t.Parallel()
	db := newOpsDB(t)
	old := db.insert(t, 5, "a", 1, time.Now())
	young := db.insert(t, 3, "a", 1, time.Now())
	pending := db.insert(t, 2, "a", 1, time.Now().Add(-400*24*time.Hour))
	db.exec(t, `UPDATE domain_event SET is_processed = true, processed_at = now() - interval '10 days' WHERE id = ANY($1)`, old)
	db.exec(t, `UPDATE domain_event SET is_processed = true, processed_at = now() WHERE id = ANY($1)`, young)

	for _, args := range [][]string{
		{"prune"}, {"prune", "--yes"}, {"prune", "--older-than", "soon", "--yes"},
		{"prune", "--older-than", "7d", "--batch-size", "0", "--yes"},
		{"prune", "--older-than", "7d"}, {"prune", "--older-than", "7d", "--json"},
	} {
		code, out, errOut := opsRun(t, db.env, args...)
		require.Equal(t, 2, code, "%v: %s", args, errOut)
		require.Empty(t, out, args)
	}
	_, _, errOut := opsRun(t, db.env, "prune", "--older-than", "7d")
	require.Contains(t, errOut, "rerun with --yes to confirm, or with --dry-run to count them")
	code, out, _ := opsRun(t, db.env, "prune", "--help")
	require.Equal(t, 0, code)
	require.Contains(t, out, "source of truth for analytics")
	require.Contains(t, out, "--yes")
	var n int
	require.NoError(t, db.pool.QueryRow(context.Background(), `SELECT count(*) FROM domain_event`).Scan(&n))
	require.Equal(t, 10, n, "nothing deleted without --yes")
	code, out, _ = opsRun(t, db.env, "prune", "--older-than", "7d", "--dry-run")
	require.Equal(t, 0, code)
	require.Contains(t, out, "would delete (dry run) 5 processed rows")
	code, out, errOut = opsRun(t, db.env, "prune", "--older-than", "7d", "--batch-size", "2", "--yes")
	require.Equal(t, 0, code, errOut)
	require.Contains(t, out, "deleted 5 processed rows")
	require.Contains(t, out, "in 3 batches")
	var left []int64
	rows, err := db.pool.Query(context.Background(), `SELECT id FROM domain_event ORDER BY id`)
	require.NoError(t, err)
	left, err = pgx.CollectRows(rows, pgx.RowTo[int64])
	require.NoError(t, err)
	require.Equal(t, slices.Concat(young, pending), left)
}

// The effective configuration never shows a secret, whatever the variable.
func TestEffectiveConfigRedactsSecrets(t *testing.T) {
	t.Parallel()
	env := map[string]string{
		"OUTBOXD_DATABASE_URL":   "host=db user=app password=hunter2pw dbname=app",
		"OUTBOXD_WEBHOOK_URL":    "https://u:hunter2pw@hooks.example.com/in?token=hunter2pw",
		"OUTBOXD_WEBHOOK_SECRET": e2e.Secret,
	}
	c, _, err := loadConfig(env)
	require.NoError(t, err)
	cfg := effectiveConfig(c, env)
	all := fmt.Sprint(cfg)
	require.NotContains(t, all, "hunter2pw")
	require.NotContains(t, all, strings.TrimPrefix(e2e.Secret, "whsec_"))
	require.Equal(t, "host=db user=app password=*** dbname=app", cfg["OUTBOXD_DATABASE_URL"])
	require.Equal(t, "https://u:***@hooks.example.com/in?token=***", cfg["OUTBOXD_WEBHOOK_URL"])
	require.Equal(t, "***", cfg["OUTBOXD_WEBHOOK_SECRET"])
	require.Equal(t, "public.domain_event", cfg["OUTBOXD_TABLE"])
	require.Equal(t, "organization", cfg["OUTBOXD_ORDERING_KEY"], "not a secret")

	// NATS: a token URL and a server list with a password in each URL.
	for _, nurl := range []string{"nats://hunter2tok@nats.example:4222", "nats://a:hunter2a@n1:4222,nats://b:hunter2b@n2:4222"} {
		env := map[string]string{"OUTBOXD_SINK": "nats", "OUTBOXD_NATS_URL": nurl, "OUTBOXD_NATS_STREAM": "EVENTS"}
		c, _, err := loadConfig(env)
		require.NoError(t, err)
		got := effectiveConfig(c, env)["OUTBOXD_NATS_URL"]
		require.NotContains(t, got, "hunter2", nurl)
		require.Contains(t, got, "***", nurl)
	}
}

// status --json gives JSON also when the database cannot be reached: ok
// false and the error, exit 1; nothing of the password.
func TestStatusJSONWhenTheDatabaseIsDown(t *testing.T) {
	t.Parallel()
	env := map[string]string{
		"OUTBOXD_DATABASE_URL":   "postgres://u:" + opsPassword + "@" + e2e.FreeAddr(t) + "/db?connect_timeout=2",
		"OUTBOXD_WEBHOOK_URL":    "https://example.com/hook",
		"OUTBOXD_WEBHOOK_SECRET": e2e.Secret,
	}
	code, out, errOut := opsRun(t, env, "status", "--json")
	require.Equal(t, 1, code, errOut)
	var st struct {
		OK    *bool  `json:"ok"`
		Error string `json:"error"`
	}
	require.NoError(t, json.Unmarshal([]byte(out), &st), out)
	require.NotNil(t, st.OK)
	require.False(t, *st.OK)
	require.Contains(t, st.Error, "connect")
}
