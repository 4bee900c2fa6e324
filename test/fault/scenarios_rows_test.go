package fault

import (
	"context"
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/stretchr/testify/require"
)

// envelopeKeys are the keys of docs/DESIGN.md §4, in order.
var envelopeKeys = []string{"id", "event_name", "occurred_at", "organization_id", "user_id", "entity_type",
	"entity_id", "correlation_id", "source", "schema_version", "properties"}

// one inserts a single row with sql (which must RETURN id, organization_id)
// and records it in commit order.
func (r *rig) one(sql string, args ...any) int64 {
	r.t.Helper()
	var id int64
	err := r.gen.Commit(func() ([]int64, []int64, error) {
		var org *int64
		if err := r.pool.QueryRow(context.Background(), sql, args...).Scan(&id, &org); err != nil {
			return nil, nil, err
		}
		o := int64(-1)
		if org != nil {
			o = *org
		}
		return []int64{id}, []int64{o}, nil
	})
	require.NoError(r.t, err, sql)
	return id
}

// bodyOf returns the first accepted body of event id, as raw fields, and
// checks the envelope has exactly the contract's keys, in order.
func (r *rig) bodyOf(id int64) map[string]json.RawMessage {
	r.t.Helper()
	for _, d := range r.recv.Deliveries() {
		if d.Accepted() && len(d.IDs) == 1 && d.IDs[0] == id {
			var m map[string]json.RawMessage
			require.NoError(r.t, json.Unmarshal(d.Body, &m), "event %d body is not a JSON object", id)
			dec := json.NewDecoder(strings.NewReader(string(d.Body)))
			_, _ = dec.Token()
			var keys []string
			for dec.More() {
				k, _ := dec.Token()
				keys = append(keys, k.(string))
				var skip json.RawMessage
				require.NoError(r.t, dec.Decode(&skip))
			}
			require.Equal(r.t, envelopeKeys, keys, "event %d: envelope keys", id)
			return m
		}
	}
	r.t.Fatalf("event %d not delivered", id)
	return nil
}

func jsonString(t *testing.T, raw json.RawMessage) string {
	t.Helper()
	var s string
	require.NoError(t, json.Unmarshal(raw, &s), "not a JSON string: %s", raw)
	return s
}

// 8. Rows applications get wrong: 5 MB properties, Unicode and control
// characters, NULL in every nullable column, extra unknown columns, odd
// values; ALTER TABLE adding, dropping and retyping columns while streaming
// and while stopped. Every row is delivered with the right values, and the
// daemon never crash-loops.
func scenarioBadRows(t *testing.T) {
	r := newRig(t, rigOpts{})
	r.recv.KeepBodies = true
	ctx := context.Background()
	exec := func(sql string) {
		t.Helper()
		_, err := r.pool.Exec(ctx, sql)
		require.NoError(t, err, sql)
	}
	exec(`ALTER TABLE domain_event ADD COLUMN extra_unknown text DEFAULT 'x', ADD COLUMN extra_json jsonb DEFAULT '{"k":1}'`)
	d := r.start(nil)
	d.waitReady()

	const ret = ` RETURNING id, organization_id::bigint`
	big := r.one(`INSERT INTO domain_event (event_name, organization_id, properties)
VALUES ('big', 1, jsonb_build_object('blob', repeat('a', 5*1024*1024)))` + ret)
	weird := "名前 \u2028 🎉 \x01\x1f\t\n\"\\ \u202eRTL\u202c end"
	unicode := r.one(`INSERT INTO domain_event (event_name, organization_id, entity_id, correlation_id, properties)
VALUES ($1, 1, $1, $1, jsonb_build_object('weird', $1::text, 'emoji', '🎉'))`+ret, weird)
	nulls := r.one(`INSERT INTO domain_event (event_name, organization_id, user_id, entity_type, entity_id, correlation_id, source)
VALUES ('nulls', NULL, NULL, NULL, NULL, NULL, NULL)` + ret)
	odd := r.one(`INSERT INTO domain_event (event_name, organization_id, user_id, occurred_at, schema_version, properties)
VALUES ('odd', 2, 9223372036854775807, 'infinity', -2147483648, '[1, "two", null, {"n": 1e400}]')` + ret)

	// ALTER TABLE while streaming.
	exec(`ALTER TABLE domain_event ADD COLUMN tenant text`)
	added := r.one(`INSERT INTO domain_event (event_name, organization_id, tenant) VALUES ('added', 1, 't1')` + ret)
	exec(`ALTER TABLE domain_event DROP COLUMN source`)
	dropped := r.one(`INSERT INTO domain_event (event_name, organization_id) VALUES ('dropped', 1)` + ret)
	exec(`ALTER TABLE domain_event ALTER COLUMN user_id TYPE text USING user_id::text`)
	userText := r.one(`INSERT INTO domain_event (event_name, organization_id, user_id) VALUES ('user_text', 1, 'u-42')` + ret)
	exec(`ALTER TABLE domain_event ALTER COLUMN properties TYPE text USING properties::text`)
	propsJSON := r.one(`INSERT INTO domain_event (event_name, organization_id, properties) VALUES ('props_json', 1, '{"a": 1}')` + ret)
	propsText := r.one(`INSERT INTO domain_event (event_name, organization_id, properties) VALUES ('props_text', 1, 'not json')` + ret)
	exec(`ALTER TABLE domain_event ALTER COLUMN organization_id TYPE numeric`)
	orgNumeric := r.one(`INSERT INTO domain_event (event_name, organization_id) VALUES ('org_numeric', 2)` + ret)
	r.settle(2 * time.Minute)
	require.False(t, d.Exited(), "ALTER TABLE while streaming must not stop outboxd")
	require.Equal(t, 0, d.stop())
	firstLog := d.Log()

	// ALTER TABLE while stopped: rows before and after each change.
	beforeAdd := r.one(`INSERT INTO domain_event (event_name, organization_id) VALUES ('before_add', 3)` + ret)
	exec(`ALTER TABLE domain_event ADD COLUMN late integer DEFAULT 7`)
	exec(`ALTER TABLE domain_event DROP COLUMN tenant`)
	exec(`ALTER TABLE domain_event ALTER COLUMN entity_id TYPE varchar(64)`)
	exec(`ALTER TABLE domain_event ALTER COLUMN user_id TYPE bigint USING CASE WHEN user_id ~ '^[0-9]+$' THEN user_id::bigint END`)
	afterAlter := r.one(`INSERT INTO domain_event (event_name, organization_id, entity_id, user_id) VALUES ('after_alter', 3, 'E-1', 5)` + ret)
	r.faultEnd = time.Now()
	d = r.start(nil)
	r.note("5 MB, Unicode/control, NULLs, extra columns, 6 ALTERs streaming + 4 stopped: values checked")
	r.finish(2 * time.Minute)

	// The values, one by one.
	b := r.bodyOf(big)
	var props struct{ Blob string }
	require.NoError(t, json.Unmarshal(b["properties"], &props))
	require.Len(t, props.Blob, 5*1024*1024, "5 MB properties arrive whole")

	b = r.bodyOf(unicode)
	require.Equal(t, weird, jsonString(t, b["event_name"]))
	require.Equal(t, weird, jsonString(t, b["entity_id"]))
	var up struct{ Weird, Emoji string }
	require.NoError(t, json.Unmarshal(b["properties"], &up))
	require.Equal(t, weird, up.Weird)
	require.Equal(t, "🎉", up.Emoji)

	b = r.bodyOf(nulls)
	for _, k := range []string{"organization_id", "user_id", "entity_type", "entity_id", "correlation_id", "source"} {
		require.Equal(t, "null", string(b[k]), "nulls: %s", k)
	}
	require.Equal(t, "{}", string(b["properties"]))

	b = r.bodyOf(odd)
	require.Equal(t, "9223372036854775807", string(b["user_id"]), "a bigint stays an exact number")
	require.Equal(t, `"infinity"`, string(b["occurred_at"]))
	require.Equal(t, "-2147483648", string(b["schema_version"]))
	require.True(t, json.Valid(b["properties"]))

	require.Equal(t, `"added"`, string(r.bodyOf(added)["event_name"]), "an added column is ignored")
	require.Equal(t, "null", string(r.bodyOf(dropped)["source"]), "a dropped column is null")
	require.Equal(t, `"u-42"`, string(r.bodyOf(userText)["user_id"]), "a column retyped to text is a string")
	require.JSONEq(t, `{"a": 1}`, string(r.bodyOf(propsJSON)["properties"]), "JSON in a text properties column is embedded")
	require.Equal(t, `"not json"`, string(r.bodyOf(propsText)["properties"]), "non-JSON text properties is a string")
	require.Equal(t, "2", string(r.bodyOf(orgNumeric)["organization_id"]), "numeric organization_id stays a number")
	require.Equal(t, "null", string(r.bodyOf(beforeAdd)["source"]))
	b = r.bodyOf(afterAlter)
	require.Equal(t, "5", string(b["user_id"]), "retyped back to bigint: a number again")
	require.Equal(t, `"E-1"`, string(b["entity_id"]))

	log := firstLog + d.Log()
	require.Zero(t, strings.Count(log, "row skipped"), "no row skipped")
	require.Zero(t, strings.Count(log, "reconnecting"), "no reconnect loop")
	require.False(t, d.Exited())
}

// 9. One transaction of N rows (1,000,000 in the full matrix) with
// logical_decoding_work_mem = 64kB: feedback keeps flowing (same walsender,
// no reconnect), memory stays bounded (peak RSS reported).
func scenarioBigTransaction(t *testing.T) {
	n := pick(100000, 1000000)
	r := newRig(t, rigOpts{settings: map[string]string{"logical_decoding_work_mem": "64kB"}, orgs: 8,
		env: map[string]string{"OUTBOXD_WEBHOOK_BATCH_SIZE": "50"}})
	d := r.start(nil)
	d.waitReady()
	_, pidBefore, _, _ := r.slotState()
	err := r.gen.Commit(func() ([]int64, []int64, error) {
		rows, err := r.pool.Query(context.Background(), `INSERT INTO domain_event (event_name, organization_id, properties)
SELECT 'bulk', 1 + g % 8, jsonb_build_object('g', g) FROM generate_series(1, $1::int) g ORDER BY g RETURNING id, organization_id`, n)
		if err != nil {
			return nil, nil, err
		}
		var ids, orgs []int64
		for rows.Next() {
			var id, org int64
			if err := rows.Scan(&id, &org); err != nil {
				return nil, nil, err
			}
			ids, orgs = append(ids, id), append(orgs, org)
		}
		return ids, orgs, rows.Err()
	})
	require.NoError(t, err)
	r.faultEnd = time.Now()
	r.note("%d rows in one transaction, batches of 50", n)
	r.finish(pick(5*time.Minute, 30*time.Minute))
	_, pidAfter, _, _ := r.slotState()
	require.Equal(t, pidBefore, pidAfter, "the same walsender streamed the whole transaction")
	require.Zero(t, d.countLog("reconnecting"), "no timeout-reconnect loop")
}

// 10a. INSERT ... SELECT generate_series cancelled mid-way (rolled back)
// while other transactions commit: none of its rows is delivered, all others
// are.
func scenarioCancelledInsert(t *testing.T) {
	r := newRig(t, rigOpts{})
	d := r.start(nil)
	d.waitReady()
	stop := r.gen.Start(20*time.Millisecond, 5, 0)
	defer stop()
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, r.url)
	require.NoError(t, err)
	defer conn.Close(ctx)
	var pid int
	require.NoError(t, conn.QueryRow(ctx, `SELECT pg_backend_pid()`).Scan(&pid))
	errc := make(chan error, 1)
	go func() {
		_, err := conn.Exec(ctx, `INSERT INTO domain_event (event_name, organization_id, properties)
SELECT 'doomed', 1 + g % 4, '{}' FROM generate_series(1, 100000000) g
WHERE g % 2000 <> 0 OR pg_sleep(0.02)::text = ''`) // at most ~100,000 rows a second
		errc <- err
	}()
	require.True(t, until(time.Minute, func() bool {
		var running bool
		_ = r.pool.QueryRow(ctx, `SELECT coalesce(now() - query_start > interval '1 second', false) FROM pg_stat_activity WHERE pid = $1 AND state = 'active'`, pid).Scan(&running)
		return running
	}), "the bulk insert never ran")
	_, err = r.pool.Exec(ctx, `SELECT pg_cancel_backend($1)`, pid)
	require.NoError(t, err)
	var pgErr *pgconn.PgError
	insertErr := <-errc
	require.True(t, errors.As(insertErr, &pgErr) && pgErr.Code == "57014", "the insert is cancelled: %v", insertErr)
	r.faultEnd = time.Now()
	n := r.gen.Len()
	require.True(t, untilN(time.Minute, r.gen.Len, n+100), "generator stalled")
	stop()
	require.Zero(t, r.count("event_name = 'doomed'"))
	r.finish(2 * time.Minute)
	for _, dl := range r.recv.Deliveries() {
		require.NotContains(t, string(dl.Body), "doomed")
	}
	require.False(t, d.Exited())
}

// insertIn inserts rows for orgs inside tx and returns their ids.
func insertIn(t *testing.T, tx pgx.Tx, orgs []int64) []int64 {
	t.Helper()
	rs, err := tx.Query(context.Background(), insertSQL, orgs)
	require.NoError(t, err)
	ids, err := pgx.CollectRows(rs, pgx.RowTo[int64])
	require.NoError(t, err)
	return ids
}

// 10b. A long open transaction interleaved with short ones, across a kill -9
// and restart of outboxd: every row arrives, in commit order per key (the
// long transaction's rows, with the smallest ids, after the short ones that
// committed before it).
func scenarioLongTxn(t *testing.T) {
	r := newRig(t, rigOpts{})
	ctx := context.Background()
	d := r.start(nil)
	d.waitReady()
	long, err := r.pool.Begin(ctx)
	require.NoError(t, err)
	defer long.Rollback(ctx) //nolint:errcheck // no-op after commit
	longOrgs := []int64{1, 1, 2}
	longIDs := insertIn(t, long, longOrgs)
	for range 5 {
		_, err := r.gen.TxnOrgs(ctx, []int64{1, 2, 1})
		require.NoError(t, err)
	}
	require.True(t, untilN(time.Minute, r.recv.AcceptedCount, 15))
	at, processed, win := r.crash(d)
	for range 5 {
		_, err := r.gen.TxnOrgs(ctx, []int64{2, 1})
		require.NoError(t, err)
	}
	d = r.start(nil)
	d.waitStreaming()
	more := []int64{1, 2}
	longIDs = append(longIDs, insertIn(t, long, more)...)
	longOrgs = append(longOrgs, more...)
	require.NoError(t, r.gen.Commit(func() ([]int64, []int64, error) { return longIDs, longOrgs, long.Commit(ctx) }))
	r.faultEnd = time.Now()
	for range 5 {
		_, err := r.gen.TxnOrgs(ctx, []int64{1, 2})
		require.NoError(t, err)
	}
	r.note("long transaction of %d rows committed after 15 others and a kill -9", len(longIDs))
	r.finish(time.Minute)
	r.assertNotRedelivered(processed, at)
	r.assertDuplicatesWithin(win)
}

// 10c. PREPARE TRANSACTION then COMMIT PREPARED (one while outboxd is
// stopped) and ROLLBACK PREPARED: only committed rows arrive, in commit
// order.
func scenarioPrepared(t *testing.T) {
	r := newRig(t, rigOpts{})
	ctx := context.Background()
	gid := func(s string) string { return r.slot + "_" + s }
	t.Cleanup(func() {
		for _, g := range []string{"a", "b", "c"} {
			_, _ = r.pool.Exec(context.Background(), `ROLLBACK PREPARED '`+gid(g)+`'`)
		}
	})
	prepare := func(name string, orgs []int64) []int64 {
		conn, err := pgx.Connect(ctx, r.url)
		require.NoError(t, err)
		defer conn.Close(ctx)
		_, err = conn.Exec(ctx, "BEGIN")
		require.NoError(t, err)
		rs, err := conn.Query(ctx, insertSQL, orgs)
		require.NoError(t, err)
		ids, err := pgx.CollectRows(rs, pgx.RowTo[int64])
		require.NoError(t, err)
		_, err = conn.Exec(ctx, `PREPARE TRANSACTION '`+gid(name)+`'`)
		require.NoError(t, err)
		return ids
	}
	commitPrepared := func(name string, ids, orgs []int64) {
		require.NoError(t, r.gen.Commit(func() ([]int64, []int64, error) {
			_, err := r.pool.Exec(ctx, `COMMIT PREPARED '`+gid(name)+`'`)
			return ids, orgs, err
		}))
	}
	d := r.start(nil)
	d.waitReady()
	aOrgs, bOrgs, cOrgs := []int64{1, 1, 1}, []int64{1, 2}, []int64{2, 2}
	a := prepare("a", aOrgs)
	b := prepare("b", bOrgs)
	for range 3 {
		_, err := r.gen.TxnOrgs(ctx, []int64{1, 2})
		require.NoError(t, err)
	}
	commitPrepared("a", a, aOrgs)
	_, err := r.pool.Exec(ctx, `ROLLBACK PREPARED '`+gid("b")+`'`)
	require.NoError(t, err)
	c := prepare("c", cOrgs)
	for range 2 {
		_, err := r.gen.TxnOrgs(ctx, []int64{1, 2})
		require.NoError(t, err)
	}
	require.Equal(t, 0, d.stop())
	commitPrepared("c", c, cOrgs)
	r.faultEnd = time.Now()
	d = r.start(nil)
	for range 3 {
		_, err := r.gen.TxnOrgs(ctx, []int64{1, 2})
		require.NoError(t, err)
	}
	r.note("2 prepared transactions committed (one while stopped), 1 rolled back")
	r.finish(time.Minute)
	got := map[int64]bool{}
	for _, dl := range r.recv.Deliveries() {
		for _, id := range dl.IDs {
			got[id] = true
		}
	}
	for _, id := range b {
		require.False(t, got[id], "rolled-back prepared row %d delivered", id)
	}
	require.False(t, d.Exited())
}

// 10d. Rows committed out of id order before the first start (a
// transaction that took its ids first commits last): with
// track_commit_timestamp on, the table catch-up delivers them in commit
// order within each organization (FINDING-4; without the setting the
// catch-up can only use id order, see README).
func scenarioCatchupCommitOrder(t *testing.T) {
	r := newRig(t, rigOpts{settings: map[string]string{"track_commit_timestamp": "on"}})
	ctx := context.Background()
	pairs := pick(20, 200)
	for i := range pairs {
		org := int64(1 + i%4)
		early, err := r.pool.Begin(ctx)
		require.NoError(t, err)
		earlyIDs := insertIn(t, early, []int64{org, org})
		_, err = r.gen.TxnOrgs(ctx, []int64{org, org})
		require.NoError(t, err)
		require.NoError(t, r.gen.Commit(func() ([]int64, []int64, error) {
			return earlyIDs, []int64{org, org}, early.Commit(ctx)
		}))
	}
	r.faultEnd = time.Now()
	d := r.start(nil)
	d.waitReady()
	r.commitRows(10, 3)
	r.note("%d transactions committed after a later-id one, before the first start", pairs)
	r.finish(time.Minute)
}

// 10e. outboxd is killed during its catch-up, and an application keeps a
// transaction open: the restart must recreate the slot, which waits for that
// transaction. It must say so (BUG-3) and carry on once the transaction ends.
func scenarioRecreateWaitsForOpenTxn(t *testing.T) {
	r := newRig(t, rigOpts{})
	ctx := context.Background()
	for r.gen.Len() < pick(20000, 100000) {
		_, err := r.gen.Txn(ctx, 200)
		require.NoError(t, err)
	}
	d := r.start(nil)
	require.True(t, untilN(time.Minute, r.recv.AcceptedCount, 2000), "catch-up stalled")
	at, processed, win := r.crash(d)
	open, err := r.pool.Begin(ctx)
	require.NoError(t, err)
	defer open.Rollback(ctx) //nolint:errcheck // no-op after commit
	openIDs := insertIn(t, open, []int64{1, 2})
	d = r.start(nil)
	warned, ok := d.waitLog("waits for transactions", time.Minute)
	begin := time.Now()
	require.True(t, ok, "a start blocked by an open transaction must say so; log:\n%s", tail(d.Log(), 2000))
	require.Zero(t, d.countLog(`"message":"streaming"`), "slot creation cannot finish while the transaction is open")
	require.NoError(t, r.gen.Commit(func() ([]int64, []int64, error) { return openIDs, []int64{1, 2}, open.Commit(ctx) }))
	r.faultEnd = time.Now()
	d.waitStreaming()
	r.note("restart blocked by an open transaction: warned after %s; streaming %s after its commit",
		warned.Sub(at).Round(100*time.Millisecond), time.Since(begin).Round(100*time.Millisecond))
	r.commitRows(10, 3)
	r.finish(2 * time.Minute)
	r.assertNotRedelivered(processed, at)
	r.assertDuplicatesWithin(win)
}
