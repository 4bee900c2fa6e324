package main

import (
	"context"
	"errors"
	"flag"
	"os"
	"path/filepath"
	"testing"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/stretchr/testify/require"
)

var update = flag.Bool("update", false, "rewrite the golden files of testdata/")

// golden compares got with testdata/name, or rewrites the file with -update.
func golden(t *testing.T, name, got string) {
	t.Helper()
	path := filepath.Join("testdata", name)
	if *update {
		require.NoError(t, os.WriteFile(path, []byte(got), 0o644))
		return
	}
	want, err := os.ReadFile(path)
	require.NoError(t, err, "run the test with -update to create it")
	require.Equal(t, string(want), got, "%s differs; run the test with -update if the change is right", path)
}

const examplePlanFile = "../../examples/tracking-plan/plan.yaml"

// plan check without a database: the lint only, exit 0 when clean, 1 with
// findings (a renamed required property is a breaking change), 2 for a
// file that is not a plan.
func TestPlanCheckLint(t *testing.T) {
	t.Parallel()
	env := map[string]string{"OUTBOXD_LOG_LEVEL": "warn"}
	code, out, errOut := opsRun(t, env, "plan", "check", examplePlanFile)
	require.Equal(t, 0, code, errOut)
	golden(t, "plan/check_example.golden", out)

	code, out, errOut = opsRun(t, env, "plan", "check", "testdata/plan/renamed.yaml")
	require.Equal(t, 1, code, errOut)
	require.Contains(t, errOut, "plan check: 3 findings")
	golden(t, "plan/check_renamed.golden", out)
	code, out, _ = opsRun(t, env, "plan", "check", "--json", "testdata/plan/renamed.yaml")
	require.Equal(t, 1, code)
	golden(t, "plan/check_renamed.json.golden", out)

	for _, args := range [][]string{
		{"plan", "check", "testdata/plan/malformed.yaml"},
		{"plan", "check", "testdata/plan/missing.yaml"},
		{"plan", "check"},
		{"plan", "check", examplePlanFile, "--sample", "-1"},
		{"plan"},
	} {
		code, _, errOut := opsRun(t, env, args...)
		require.Equal(t, 2, code, "%v: %s", args, errOut)
	}
	_, _, errOut = opsRun(t, env, "plan", "check", "testdata/plan/malformed.yaml")
	require.Contains(t, errOut, `testdata/plan/malformed.yaml:6: event inventory_adjusted: schema_version "one" is not a positive integer`)
}

// plan check with a database: the table's event names and versions the
// plan lacks, with counts, and the newest rows validated.
func TestPlanCheckTable(t *testing.T) {
	t.Parallel()
	db := newOpsDB(t)
	for _, r := range []struct {
		name    string
		version int
		org     any
		etype   string
		props   string
	}{
		{"inventory_adjusted", 1, 7, "sku", `{"sku":"s1","delta":-2,"reason":"sale","on_hand":7}`},
		{"inventory_adjusted", 1, 7, "sku", `{"sku":"s1","delta":"2","reason":"lost"}`},
		{"inventory_adjusted", 1, nil, "sku", `{"reason":"count"}`},
		{"inventory_adjusted", 2, 7, "sku", `{"sku":"s1","quantity_change":2}`},
		{"inventory_adjusted", 2, 7, "sku", `{"sku":"s1","quantity_change":3}`},
		{"timer_stopped", 1, 7, "timer", `{"timer_id":"t1","batch_id":"b1","duration_seconds":90}`},
		{"timer_stopped", 1, 7, "stopwatch", `{"timer_id":"t1","batch_id":"b1","duration_seconds":1.5}`},
		{"batchStarted", 1, 7, "batch", `{}`},
		{"recipe_created", 1, 7, "recipe", `{"recipe_id":"r1","name":"Rye"}`},
	} {
		db.exec(t, `INSERT INTO domain_event (event_name, schema_version, organization_id, entity_type, entity_id, properties)
VALUES ($1, $2, $3, $4, 'e-1', $5)`, r.name, r.version, r.org, r.etype, r.props)
	}
	code, out, errOut := opsRun(t, db.env, "plan", "check", examplePlanFile)
	require.Equal(t, 1, code, errOut)
	golden(t, "plan/check_table.golden", out)
	code, out, _ = opsRun(t, db.env, "plan", "check", "--json", "--sample", "4", examplePlanFile)
	require.Equal(t, 1, code)
	golden(t, "plan/check_table_sample4.json.golden", out)
}

// plan apply through the CLI: stored, the trigger installed, an insert that
// breaks the plan refused with SQLSTATE OB001; a plan with lint errors is
// refused; --trigger off removes the trigger.
func TestPlanApplyCommand(t *testing.T) {
	t.Parallel()
	db := newOpsDB(t)
	ctx := context.Background()
	code, out, errOut := opsRun(t, db.env, "plan", "apply", examplePlanFile, "--trigger", "enforce")
	require.Equal(t, 0, code, errOut)
	require.Contains(t, out, "applied: 14 events, 14 schema versions")
	require.Contains(t, out, "trigger on public.domain_event: enforce")

	_, err := db.pool.Exec(ctx, `INSERT INTO domain_event (event_name, organization_id, entity_type, entity_id, properties)
VALUES ('inventory_adjusted', 7, 'sku', 'SKU-1', '{"sku":"SKU-1","reason":"sale"}')`)
	var pgErr *pgconn.PgError
	require.True(t, errors.As(err, &pgErr), "%v", err)
	require.Equal(t, "OB001", pgErr.Code)
	require.Equal(t, `outboxd plan: inventory_adjusted v1 requires property "delta" (number)`, pgErr.Message)

	code, _, errOut = opsRun(t, db.env, "plan", "apply", "testdata/plan/renamed.yaml")
	require.Equal(t, 1, code)
	require.Contains(t, errOut, "warning: line 17: breaking change inventory_adjusted v1 -> v2")
	require.Contains(t, errOut, `event name "batchStarted" is not snake_case`)
	require.Contains(t, errOut, "not applied")

	code, _, errOut = opsRun(t, db.env, "plan", "apply", examplePlanFile, "--trigger", "sometimes")
	require.Equal(t, 2, code, errOut)
	code, out, errOut = opsRun(t, db.env, "plan", "apply", examplePlanFile, "--trigger", "off")
	require.Equal(t, 0, code, errOut)
	require.Contains(t, out, "trigger on public.domain_event: off")
	db.exec(t, `INSERT INTO domain_event (event_name, organization_id) VALUES ('anything', 7)`)
}
