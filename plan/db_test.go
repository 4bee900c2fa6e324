package plan

import (
	"context"
	"fmt"
	"os"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/stretchr/testify/require"

	"github.com/outboxd/outboxd/internal/pgtest"
	"github.com/outboxd/outboxd/migrations"
)

func TestMain(m *testing.M) { pgtest.Main(m) }

var outbox = Table{Schema: "public", Name: "domain_event"}

func examplePlan(t testing.TB) (*Plan, []byte) {
	t.Helper()
	data, err := os.ReadFile("../examples/tracking-plan/plan.yaml")
	require.NoError(t, err)
	p, err := Parse("plan.yaml", data)
	require.NoError(t, err)
	return p, data
}

func parse(t testing.TB, src string) (*Plan, []byte) {
	t.Helper()
	p, err := Parse("p.yaml", []byte(src))
	require.NoError(t, err)
	return p, []byte(src)
}

const insertSQL = `INSERT INTO domain_event (event_name, schema_version, organization_id, entity_type, entity_id, properties)
VALUES ($1, $2, $3, $4, $5, $6) RETURNING id`

type row struct {
	name    string
	version int
	org     any
	etype   any
	props   string
}

func insert(ctx context.Context, q Querier, r row) (int64, error) {
	var id int64
	err := q.QueryRow(ctx, insertSQL, r.name, r.version, r.org, r.etype, "e-1", r.props).Scan(&id)
	return id, err
}

var validAdjust = row{"inventory_adjusted", 1, 7, "sku", `{"sku":"SKU-1","delta":-2,"reason":"sale","on_hand":7}`}

// enforce: each broken rule is an error with SQLSTATE OB001 and a message
// naming it, as any client sees it through SQL; valid rows go in.
func TestTriggerEnforce(t *testing.T) {
	t.Parallel()
	db := pgtest.NewMigrated(t)
	ctx := context.Background()
	p, src := examplePlan(t)
	res, err := Apply(ctx, db.Conn, outbox, p, src, TriggerEnforce)
	require.NoError(t, err)
	require.Equal(t, ApplyResult{Events: 14, Versions: 14, SHA256: res.SHA256, Trigger: TriggerEnforce}, res)

	_, err = insert(ctx, db.Pool, validAdjust)
	require.NoError(t, err)
	_, err = insert(ctx, db.Pool, row{"timer_stopped", 1, 7, "timer", `{"timer_id":"t","batch_id":"b","duration_seconds":30}`})
	require.NoError(t, err)
	// The events examples/ emit (go, psql, python, node) follow the plan.
	for _, r := range []row{
		{"batch_started", 1, 7, "batch", `{"batch_id":"B-1000","sku":"SKU-SD-800","planned_units":120}`},
		{"batch_completed", 1, 7, "batch", `{"batch_id":"B-1000","sku":"SKU-SD-800","produced_units":114,"planned_units":120}`},
		{"inventory_adjusted", 1, 7, "sku", `{"sku":"SKU-SD-800","delta":-3,"reason":"sale","on_hand":7}`},
	} {
		_, err = insert(ctx, db.Pool, r)
		require.NoError(t, err, r)
	}

	for _, c := range []struct {
		r      row
		msg    string
		detail string
	}{
		{row{"inventory_adjusted", 1, 7, "sku", `{"sku":"SKU-1","reason":"sale"}`},
			`outboxd plan: inventory_adjusted v1 requires property "delta" (number)`, ""},
		{row{"inventory_adjusted", 1, 7, "sku", `{"sku":"SKU-1","delta":"2","reason":"sale"}`},
			`outboxd plan: inventory_adjusted v1 requires property "delta" (number), got string`, ""},
		{row{"timer_stopped", 1, 7, "timer", `{"timer_id":"t","batch_id":"b","duration_seconds":1.5}`},
			`outboxd plan: timer_stopped v1 requires property "duration_seconds" (integer), got number`, ""},
		{row{"inventory_adjusted", 2, 7, "inventory", validAdjust.props},
			`outboxd plan: inventory_adjusted has no schema_version 2 in the tracking plan`, ""},
		{row{"InventoryAdjusted", 1, 7, "inventory", `{}`},
			`outboxd plan: event "InventoryAdjusted" is not in the tracking plan`, ""},
		{row{"inventory_adjusted", 1, nil, "warehouse", `{"delta":1,"reason":"sale"}`},
			`outboxd plan: every event requires organization_id (not NULL)`,
			`also: entity_type "warehouse" is not one of inventory, batch, timer, recipe, product, product_variant, sku; inventory_adjusted v1 requires property "sku" (string)`},
	} {
		_, err := insert(ctx, db.Pool, c.r)
		var pgErr *pgconn.PgError
		require.ErrorAs(t, err, &pgErr, c.r)
		require.Equal(t, SQLState, pgErr.Code)
		require.Equal(t, c.msg, pgErr.Message)
		require.Equal(t, c.detail, pgErr.Detail)
	}
	// outboxd_emit's inserts are checked too.
	_, err = db.Pool.Exec(ctx, `SELECT outboxd_emit('recipe_deleted', 7, '{}', entity_type => 'recipe', entity_id => 'r1')`)
	require.ErrorContains(t, err, `recipe_deleted v1 requires property "recipe_id" (string) (SQLSTATE OB001)`)
	_, err = db.Pool.Exec(ctx, `SELECT outboxd_emit('recipe_deleted', 7, '{"recipe_id": "r1"}', entity_type => 'recipe', entity_id => 'r1')`)
	require.NoError(t, err)
	var n int
	require.NoError(t, db.Pool.QueryRow(ctx, `SELECT count(*) FROM domain_event`).Scan(&n))
	require.Equal(t, 6, n)

	// A new plan changes what the trigger checks, without re-creating it:
	// v2 of inventory_adjusted renames delta to quantity_change.
	p2, src2 := parse(t, `format: 1
events:
  inventory_adjusted:
    description: d
    owner: o
    versions:
      1: {type: object, required: [delta], properties: {delta: {type: number}}}
      2: {type: object, required: [quantity_change], properties: {quantity_change: {type: number}}}
`)
	res, err = Apply(ctx, db.Conn, outbox, p2, src2, "")
	require.NoError(t, err)
	require.Equal(t, TriggerEnforce, res.Trigger, "left as it was")
	_, err = insert(ctx, db.Pool, row{"inventory_adjusted", 2, nil, nil, `{"quantity_change": 3}`})
	require.NoError(t, err)
	_, err = insert(ctx, db.Pool, row{"inventory_adjusted", 2, nil, nil, `{"delta": 3}`})
	require.ErrorContains(t, err, `inventory_adjusted v2 requires property "quantity_change" (number)`)

	// off removes it.
	res, err = Apply(ctx, db.Conn, outbox, p2, src2, TriggerOff)
	require.NoError(t, err)
	require.Equal(t, TriggerOff, res.Trigger)
	_, err = insert(ctx, db.Pool, row{"anything", 9, nil, nil, `[]`})
	require.NoError(t, err)
}

// record: rows that break the plan go in, and each broken rule is a row of
// outboxd_plan_violation.
func TestTriggerRecord(t *testing.T) {
	t.Parallel()
	db := pgtest.NewMigrated(t)
	ctx := context.Background()
	p, src := examplePlan(t)
	_, err := Apply(ctx, db.Conn, outbox, p, src, TriggerRecord)
	require.NoError(t, err)
	mode, err := TriggerMode(ctx, db.Pool, outbox)
	require.NoError(t, err)
	require.Equal(t, TriggerRecord, mode)

	_, err = insert(ctx, db.Pool, validAdjust)
	require.NoError(t, err)
	bad, err := insert(ctx, db.Pool, row{"inventory_adjusted", 1, nil, "sku", `{"sku":"SKU-1","reason":"sale"}`})
	require.NoError(t, err)
	rows, err := db.Pool.Query(ctx, `SELECT event_id, event_name, schema_version, rule FROM outboxd_plan_violation ORDER BY id`)
	require.NoError(t, err)
	got, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (string, error) {
		var id int64
		var name, rule string
		var v int
		err := r.Scan(&id, &name, &v, &rule)
		return fmt.Sprintf("%d %s v%d: %s", id, name, v, rule), err
	})
	require.NoError(t, err)
	require.Equal(t, []string{
		fmt.Sprintf("%d inventory_adjusted v1: every event requires organization_id (not NULL)", bad),
		fmt.Sprintf(`%d inventory_adjusted v1: inventory_adjusted v1 requires property "delta" (number)`, bad),
	}, got)
}

// Without a plan applied, the trigger lets every row in.
func TestTriggerWithoutPlan(t *testing.T) {
	t.Parallel()
	db := pgtest.NewMigrated(t)
	ctx := context.Background()
	_, err := db.Conn.Exec(ctx, `CREATE TRIGGER outboxd_plan BEFORE INSERT ON domain_event FOR EACH ROW EXECUTE FUNCTION outboxd_plan_check('enforce')`)
	require.NoError(t, err)
	_, err = insert(ctx, db.Pool, row{"anything", 1, nil, nil, `{}`})
	require.NoError(t, err)
}

// The trigger's cost per insert: single-row INSERT statements, without the
// trigger and with it in enforce mode (the product's plan, a valid
// inventory_adjusted row). Compare the ns/op of the two.
//
//	go test -run '^$' -bench 'PlanTrigger$' -benchtime 2000x ./plan/
func BenchmarkPlanTrigger(b *testing.B) {
	for _, mode := range []string{TriggerOff, TriggerEnforce, TriggerRecord} {
		b.Run(mode, func(b *testing.B) {
			db := pgtest.NewMigrated(b)
			ctx := context.Background()
			p, src := examplePlan(b)
			_, err := Apply(ctx, db.Conn, outbox, p, src, mode)
			require.NoError(b, err)
			// Warm the plan cache and the connection.
			for range 100 {
				_, err := insert(ctx, db.Conn, validAdjust)
				require.NoError(b, err)
			}
			b.ResetTimer()
			for b.Loop() {
				if _, err := insert(ctx, db.Conn, validAdjust); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// The trigger's cost per row without the round trip and commit of each
// insert: one INSERT ... SELECT of 1000 valid inventory_adjusted rows per
// op, reported as ns/row.
//
//	go test -run '^$' -bench PlanTriggerBulk -benchtime 50x ./plan/
func BenchmarkPlanTriggerBulk(b *testing.B) {
	const rows = 1000
	for _, mode := range []string{TriggerOff, TriggerEnforce, TriggerRecord} {
		b.Run(mode, func(b *testing.B) {
			db := pgtest.NewMigrated(b)
			ctx := context.Background()
			p, src := examplePlan(b)
			_, err := Apply(ctx, db.Conn, outbox, p, src, mode)
			require.NoError(b, err)
			bulk := `INSERT INTO domain_event (event_name, organization_id, entity_type, entity_id, properties)
SELECT 'inventory_adjusted', 7, 'inventory', 'e-' || g, jsonb_build_object('sku', 'SKU-1', 'delta', g, 'reason', 'count', 'on_hand', g)
FROM generate_series(1, $1) g`
			_, err = db.Conn.Exec(ctx, bulk, rows)
			require.NoError(b, err)
			b.ResetTimer()
			for b.Loop() {
				if _, err := db.Conn.Exec(ctx, bulk, rows); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*rows), "ns/row")
		})
	}
}

// Apply on a database that was never migrated says to migrate.
func TestApplyNeedsMigrate(t *testing.T) {
	t.Parallel()
	url := pgtest.Shared(t).NewDatabase(t)
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, url)
	require.NoError(t, err)
	defer conn.Close(ctx)
	p, src := examplePlan(t)
	_, err = Apply(ctx, conn, outbox, p, src, TriggerEnforce)
	require.ErrorContains(t, err, "run `outboxd migrate`")
	_, err = Apply(ctx, conn, outbox, p, src, "sometimes")
	require.ErrorContains(t, err, `trigger mode "sometimes"`)
}

// The trigger works on a partitioned outbox (the trigger is created on the
// root) and on a table an ORM made: integer ids, no entity_type column,
// properties as text.
func TestTriggerOnOtherTables(t *testing.T) {
	t.Parallel()
	for name, ddl := range map[string]string{
		"partitioned": `CREATE TABLE domain_event (
  id bigint GENERATED BY DEFAULT AS IDENTITY, event_name text NOT NULL, occurred_at timestamptz NOT NULL DEFAULT now(),
  organization_id bigint, entity_type text, entity_id text, schema_version integer NOT NULL DEFAULT 1,
  properties jsonb NOT NULL DEFAULT '{}', PRIMARY KEY (id, occurred_at)
) PARTITION BY RANGE (occurred_at);
CREATE TABLE domain_event_default PARTITION OF domain_event DEFAULT`,
		"orm": `CREATE TABLE domain_event (id serial PRIMARY KEY, event_name varchar(100) NOT NULL, organization_id integer,
  entity_id integer, schema_version integer NOT NULL DEFAULT 1, properties text NOT NULL DEFAULT '{}',
  occurred_at timestamp NOT NULL DEFAULT now())`,
		// An ORM that stores versions as text ("1", "v2").
		"orm text version": `CREATE TABLE domain_event (id serial PRIMARY KEY, event_name varchar(100) NOT NULL, organization_id integer,
  entity_id integer, schema_version varchar(10) NOT NULL DEFAULT '1', properties text NOT NULL DEFAULT '{}',
  occurred_at timestamp NOT NULL DEFAULT now())`,
	} {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			ctx := context.Background()
			conn, err := pgx.Connect(ctx, pgtest.Shared(t).NewDatabase(t))
			require.NoError(t, err)
			defer conn.Close(ctx)
			_, err = conn.Exec(ctx, ddl)
			require.NoError(t, err)
			_, err = migrations.Migrate(ctx, conn, migrations.Options{})
			require.NoError(t, err)
			p, src := parse(t, `format: 1
envelope: {required: [organization_id, entity_id], entity_type: [sku]}
events:
  inventory_adjusted:
    description: d
    owner: o
    versions:
      1: {type: object, required: [sku, delta], properties: {sku: {type: string}, delta: {type: integer}}}
`)
			_, err = Apply(ctx, conn, outbox, p, src, TriggerEnforce)
			require.NoError(t, err)
			_, err = conn.Exec(ctx, `INSERT INTO domain_event (event_name, organization_id, entity_id, properties) VALUES ('inventory_adjusted', 7, '12', '{"sku": "S", "delta": 2}')`)
			require.NoError(t, err)
			_, err = conn.Exec(ctx, `INSERT INTO domain_event (event_name, organization_id, entity_id, properties) VALUES ('inventory_adjusted', 7, '12', '{"sku": "S"}')`)
			var pgErr *pgconn.PgError
			require.ErrorAs(t, err, &pgErr)
			require.Equal(t, SQLState, pgErr.Code)
			require.Equal(t, `outboxd plan: inventory_adjusted v1 requires property "delta" (integer)`, pgErr.Message)
			_, err = conn.Exec(ctx, `INSERT INTO domain_event (event_name, organization_id, properties) VALUES ('inventory_adjusted', 7, '{"sku": "S", "delta": 2}')`)
			require.ErrorContains(t, err, "outboxd plan: every event requires entity_id (not NULL)")
			if name == "orm text version" {
				// A version that is no number breaks a rule of the plan,
				// named as such, rather than the insert with a cast error.
				_, err = conn.Exec(ctx, `INSERT INTO domain_event (event_name, organization_id, entity_id, schema_version, properties) VALUES ('inventory_adjusted', 7, '12', 'v2', '{"sku": "S", "delta": 2}')`)
				require.ErrorAs(t, err, &pgErr)
				require.Equal(t, SQLState, pgErr.Code, "%v", err)
				require.Equal(t, `outboxd plan: schema_version "v2" is not a whole number`, pgErr.Message)
			}
		})
	}
}
