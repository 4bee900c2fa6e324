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
// the application's own client with the rule's message: psql, Node's pg and
// Python's psycopg2.
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
		requireRefused(t, node)
	})

	t.Run("python-psycopg2", func(t *testing.T) {
		python := pythonWithPsycopg2()
		if python == "" {
			t.Skip("no python3 with psycopg2 (Debian: apt-get install python3-psycopg2)")
		}
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		py := exec.CommandContext(ctx, python, "-c", `import json, os, psycopg2
conn = psycopg2.connect(os.environ["DATABASE_URL"])
try:
    with conn.cursor() as cur:
        cur.execute(os.environ["SQL"])
    conn.commit()
    print(json.dumps({"ok": True}))
except psycopg2.Error as e:
    conn.rollback()
    print(json.dumps({"code": e.pgcode, "message": e.diag.message_primary, "hint": e.diag.message_hint}))
finally:
    conn.close()
`)
		py.Env = append(os.Environ(), "DATABASE_URL="+db.url, "SQL="+invalidInsert)
		requireRefused(t, py)
	})

	var n int
	require.NoError(t, db.pool.QueryRow(context.Background(), "SELECT count(*) FROM domain_event").Scan(&n))
	require.Zero(t, n, "no client's insert went through")
}

// pythonWithPsycopg2 returns a Python interpreter that imports psycopg2:
// Debian's (python3-psycopg2 installs for /usr/bin/python3) or the one on
// PATH; "" when there is none.
func pythonWithPsycopg2() string {
	for _, p := range []string{"/usr/bin/python3", "python3"} {
		path, err := exec.LookPath(p)
		if err != nil {
			continue
		}
		if exec.Command(path, "-c", "import psycopg2").Run() == nil {
			return path
		}
	}
	return ""
}

// requireRefused runs a client script that prints its insert's outcome as
// JSON ({"ok": true}, or the error's code, message and hint) and checks
// that the plan refused it with the rule's message.
func requireRefused(t *testing.T, client *exec.Cmd) {
	t.Helper()
	out, err := client.Output()
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
}
