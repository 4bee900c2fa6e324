package main

import (
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// invalidInsert breaks the example plan: inventory_adjusted without its
// required delta.
const invalidInsert = `INSERT INTO domain_event (event_name, organization_id, entity_type, entity_id, properties)
VALUES ('inventory_adjusted', 7, 'sku', 'SKU-1', '{"sku":"SKU-1","reason":"sale"}')`

const enforceMessage = `outboxd plan: inventory_adjusted v1 requires property "delta" (number)`

// An application's insert that breaks the plan, in enforce mode, fails in
// the application's own client with the rule's message: psql and Node's pg.
func TestContractEnforcedInClients(t *testing.T) {
	t.Parallel()
	db := newOpsDB(t)
	code, _, errOut := opsRun(t, db.env, "plan", "apply", examplePlanFile, "--trigger", "enforce")
	require.Equal(t, 0, code, errOut)

	t.Run("psql", func(t *testing.T) {
		if _, err := exec.LookPath("psql"); err != nil {
			t.Skip("psql is not installed")
		}
		out, err := exec.Command("psql", db.url, "-X", "-v", "ON_ERROR_STOP=1", "-c", invalidInsert).CombinedOutput()
		require.Error(t, err, string(out))
		require.Contains(t, string(out), "ERROR:  "+enforceMessage)
		require.Contains(t, string(out), "HINT:  the tracking plan is in outboxd_plan_event")
	})

	t.Run("node-pg", func(t *testing.T) {
		if _, err := exec.LookPath("node"); err != nil {
			t.Skip("node is not installed")
		}
		dir := t.TempDir()
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
		defer cancel()
		install := exec.CommandContext(ctx, "npm", "install", "--no-audit", "--no-fund", "--silent", "--prefix", dir, "pg@8")
		install.Env = append(os.Environ(), "npm_config_cache="+filepath.Join(dir, ".npm"))
		out, err := install.CombinedOutput()
		require.NoError(t, err, "npm install pg: %s", out)
		script := filepath.Join(dir, "insert.js")
		require.NoError(t, os.WriteFile(script, []byte(`const { Client } = require('pg');
(async () => {
  const c = new Client({ connectionString: process.env.DATABASE_URL });
  await c.connect();
  try {
    await c.query(process.env.SQL);
    console.log(JSON.stringify({ ok: true }));
  } catch (e) {
    console.log(JSON.stringify({ code: e.code, message: e.message, hint: e.hint }));
  } finally {
    await c.end();
  }
})();
`), 0o600))
		node := exec.CommandContext(ctx, "node", script)
		node.Dir = dir
		node.Env = append(os.Environ(), "DATABASE_URL="+db.url, "SQL="+invalidInsert)
		out, err = node.Output()
		require.NoError(t, err, string(out))
		var got struct {
			OK                  bool
			Code, Message, Hint string
		}
		require.NoError(t, json.Unmarshal([]byte(strings.TrimSpace(string(out))), &got), string(out))
		require.False(t, got.OK, "the insert went through")
		require.Equal(t, "OB001", got.Code)
		require.Equal(t, enforceMessage, got.Message)
		require.Contains(t, got.Hint, "outboxd plan apply")
	})

	var n int
	require.NoError(t, db.pool.QueryRow(context.Background(), "SELECT count(*) FROM domain_event").Scan(&n))
	require.Zero(t, n, "no client's insert went through")
}
