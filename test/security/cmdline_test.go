package security

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/outboxd/outboxd/internal/e2e"
	"github.com/outboxd/outboxd/internal/pgtest"
)

// runWithStdin runs the binary with env and stdin and returns its exit code
// and combined output.
func runWithStdin(t *testing.T, env map[string]string, stdin string, args ...string) (int, string) {
	t.Helper()
	cmd := exec.Command(e2e.Binary(t), args...)
	cmd.Env = []string{"PATH=" + os.Getenv("PATH"), "HOME=" + os.Getenv("HOME")}
	for k, v := range env {
		cmd.Env = append(cmd.Env, k+"="+v)
	}
	cmd.Stdin = strings.NewReader(stdin)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	if ee, ok := err.(*exec.ExitError); ok {
		return ee.ExitCode(), out.String()
	}
	require.NoError(t, err)
	return 0, out.String()
}

// Secrets need not travel on command lines (security round 2, item 4):
// `subscription add` and `rotate-secret` read them from a file or standard
// input (--secret-file); --secret still works but warns that it shows in ps
// and shell history; `run --webhook-url` warns when the URL carries
// credentials or a query string.
func TestSecretsStayOffCommandLines(t *testing.T) {
	t.Parallel()
	w := newWorld(t, pgtest.Shared(t))
	env := w.env("https://hooks.example/outbox", nil)
	secrets := func(id string) []string {
		var s []string
		require.NoError(t, w.pool.QueryRow(context.Background(), `SELECT secrets FROM outboxd_subscription WHERE id = $1::bigint`, id).Scan(&s))
		return s
	}
	idOf := func(out string) string {
		for _, line := range strings.Split(out, "\n") {
			if f := strings.Fields(line); len(f) == 3 && f[0] == "subscription" && f[2] == "added" {
				return f[1]
			}
		}
		t.Fatalf("no subscription id in %q", out)
		return ""
	}

	file := filepath.Join(t.TempDir(), "secret")
	fromFile := "whsec_" + strings.Repeat("A", 32)
	require.NoError(t, os.WriteFile(file, []byte(fromFile+"\n"), 0o600))
	code, out := runWithStdin(t, env, "", "subscription", "add", "--url", "https://tenant.example/hooks", "--secret-file", file)
	require.Equal(t, 0, code, out)
	require.NotContains(t, out, "warning")
	id := idOf(out)
	require.Equal(t, []string{fromFile}, secrets(id))

	fromStdin := "whsec_" + strings.Repeat("B", 32)
	code, out = runWithStdin(t, env, fromStdin+"\n", "subscription", "rotate-secret", id, "--secret-file", "-")
	require.Equal(t, 0, code, out)
	require.Equal(t, []string{fromStdin, fromFile}, secrets(id))

	onLine := "whsec_" + strings.Repeat("C", 32)
	code, out = runWithStdin(t, env, "", "subscription", "add", "--url", "https://tenant.example/other", "--secret", onLine)
	require.Equal(t, 0, code, out)
	require.Contains(t, out, "warning: a secret given with --secret shows in ps and in shell history")

	code, out = runWithStdin(t, env, "", "subscription", "add", "--url", "https://tenant.example/x", "--secret", onLine, "--secret-file", file)
	require.Equal(t, 2, code, out)
	require.Contains(t, out, "--secret and --secret-file: give one")
	empty := filepath.Join(t.TempDir(), "empty")
	require.NoError(t, os.WriteFile(empty, nil, 0o600))
	code, out = runWithStdin(t, env, "", "subscription", "add", "--url", "https://tenant.example/x", "--secret-file", empty)
	require.Equal(t, 2, code, out)
	require.Contains(t, out, "is empty")

	// receive: the secrets from a file, no warning.
	two := filepath.Join(t.TempDir(), "two")
	require.NoError(t, os.WriteFile(two, []byte(fromFile+" "+fromStdin+"\n"), 0o600))
	rd := e2e.StartDaemon(t, map[string]string{}, "receive", "--addr", "127.0.0.1:0", "--secret-file", two)
	e2e.WaitFor(t, time.Minute, func() bool { return strings.Contains(rd.Log(), "listening on") },
		func() string { return "receive did not start: " + rd.Log() })
	require.Contains(t, rd.Log(), "signatures checked (2 secret(s)")
	require.NotContains(t, rd.Log(), "warning")

	// run: a URL with credentials on the command line is named at once
	// (the run then goes on; here it fails later on the unreachable host,
	// which does not matter).
	code, out = runWithStdin(t, w.env("https://hooks.example/outbox", map[string]string{"OUTBOXD_DATABASE_URL": "postgres://u@127.0.0.1:1/db?connect_timeout=2"}), "",
		"run", "--webhook-url", "https://user:pa55@hooks.example/outbox?token=t0k3n")
	require.NotEqual(t, 0, code, out)
	require.Contains(t, out, "warning: the URL given with --webhook-url carries credentials or a query string")
	require.NotContains(t, out, "pa55")
	require.NotContains(t, out, "t0k3n")
}
