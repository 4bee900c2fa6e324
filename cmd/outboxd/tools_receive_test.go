package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"github.com/stretchr/testify/require"

	"github.com/outboxd/outboxd/decode"
	"github.com/outboxd/outboxd/internal/e2e"
	"github.com/outboxd/outboxd/internal/pgtest"
	"github.com/outboxd/outboxd/sink"
)

// toolsBuffer is an io.Writer safe for the command's goroutines.
type toolsBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (w *toolsBuffer) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.b.Write(p)
}

func (w *toolsBuffer) String() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.b.String()
}

// toolsRun runs the CLI in-process until it returns or the test ends; the
// returned function cancels it and returns its error.
func toolsRun(t *testing.T, env map[string]string, args ...string) (stdout, stderr *toolsBuffer, stop func() error) {
	t.Helper()
	stdout, stderr = &toolsBuffer{}, &toolsBuffer{}
	var environ []string
	for k, v := range env {
		environ = append(environ, k+"="+v)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- run(ctx, args, func(k string) string { return env[k] }, environ, stdout, stderr) }()
	var once sync.Once
	var err error
	stop = func() error {
		once.Do(func() {
			cancel()
			select {
			case err = <-done:
			case <-time.After(30 * time.Second):
				t.Fatalf("outboxd %s did not stop within 30s", args[0])
			}
		})
		return err
	}
	t.Cleanup(func() { _ = stop() })
	return stdout, stderr, stop
}

var toolsListeningLine = regexp.MustCompile(`listening on http://(\S+)/,`)

// toolsListening waits until a receiver's log says where it listens and
// returns that address: receivers listen on 127.0.0.1:0, so no two tests
// ever race for a port.
func toolsListening(t *testing.T, log func() string) string {
	t.Helper()
	var addr string
	e2e.WaitFor(t, 10*time.Second, func() bool {
		if m := toolsListeningLine.FindStringSubmatch(log()); m != nil {
			addr = m[1]
		}
		return addr != ""
	}, func() string { return "receiver not listening; log: " + log() })
	return addr
}

// toolsSign is an independent Standard Webhooks signer for the tests.
func toolsSign(secret, id string, ts int64, body []byte) string {
	key, err := base64.StdEncoding.DecodeString(strings.TrimPrefix(secret, "whsec_"))
	if err != nil {
		panic(err)
	}
	m := hmac.New(sha256.New, key)
	m.Write([]byte(id + "." + strconv.FormatInt(ts, 10) + "."))
	m.Write(body)
	return "v1," + base64.StdEncoding.EncodeToString(m.Sum(nil))
}

// toolsReadLines reads the complete JSON lines of a receive output (a line
// being written is left for the next read).
func toolsReadLines(t *testing.T, data string) []receiveLine {
	t.Helper()
	data = data[:strings.LastIndex(data, "\n")+1]
	var out []receiveLine
	sc := bufio.NewScanner(strings.NewReader(data))
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		var l receiveLine
		require.NoError(t, json.Unmarshal(sc.Bytes(), &l), "not a JSON line: %s", sc.Text())
		out = append(out, l)
	}
	return out
}

func toolsPost(t *testing.T, url string, h map[string]string, body []byte) int {
	t.Helper()
	req, err := http.NewRequest(http.MethodPost, url, bytes.NewReader(body))
	require.NoError(t, err)
	for k, v := range h {
		req.Header.Set(k, v)
	}
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	resp.Body.Close()
	return resp.StatusCode
}

// The webhook sink delivers to `outboxd receive` with a scripted 503, 503,
// 200: three attempts with the same webhook-id, each verified and written to
// --out with the status answered; then hand-made requests with a wrong
// secret, a stale timestamp, a changed body or no headers are answered 401
// and recorded as invalid, and one signed by the second secret of a rotation
// is accepted.
func TestReceiveVerifiesScriptsAndWritesJSONLines(t *testing.T) {
	t.Parallel()
	const other = "whsec_dGhlIG90aGVyIHNlY3JldCBvZiBhIHJvdGF0aW9u"
	out := filepath.Join(t.TempDir(), "deliveries.jsonl")
	stdout, stderr, stop := toolsRun(t, nil, "receive", "--addr", "127.0.0.1:0", "--secret", e2e.Secret+","+other,
		"--script", "503,503,200", "--out", out, "--tolerance", "1m")
	addr := toolsListening(t, stderr.String)
	require.Contains(t, stderr.String(), "signatures checked (2 secret(s), tolerance 1m0s)")

	w, err := sink.NewWebhook(sink.WebhookConfig{URL: "http://" + addr + "/hook", Secrets: []string{e2e.Secret},
		HTTPConfig: sink.HTTPConfig{AllowPrivate: true, RetryConfig: sink.RetryConfig{MaxAttempts: 5, BackoffMin: time.Millisecond, BackoffMax: 20 * time.Millisecond}}}, zerolog.Nop())
	require.NoError(t, err)
	defer w.Close()
	body := []byte(`{"id":42,"event_name":"batch_started","organization_id":7,"properties":{"batch_id":"B-19"}}`)
	const wid = "evt_0a1b2c3d4e5f6789_42"
	outcomes := w.Deliver(context.Background(), []*decode.Event{{ID: 42, Name: "batch_started", Body: body, MessageID: wid}})
	require.NoError(t, outcomes[0].Err)
	require.Equal(t, 3, outcomes[0].Attempts)

	data, err := os.ReadFile(out)
	require.NoError(t, err)
	lines := toolsReadLines(t, string(data))
	require.Len(t, lines, 3)
	for i, want := range []int{503, 503, 200} {
		l := lines[i]
		require.Equal(t, want, l.Status)
		require.Equal(t, wid, l.WebhookID)
		require.NotNil(t, l.SignatureValid)
		require.True(t, *l.SignatureValid, l.Error)
		require.JSONEq(t, string(body), string(l.Body))
		ts, ok := l.Timestamp.(float64)
		require.True(t, ok, "timestamp is a number: %v", l.Timestamp)
		require.InDelta(t, float64(time.Now().Unix()), ts, 60)
	}
	require.Equal(t, 3, strings.Count(stdout.String(), "webhook-id="+wid+" signature=valid"), stdout.String())

	// Hand-made requests; the script is at its last entry (200).
	url := "http://" + addr + "/"
	now := time.Now().Unix()
	signed := func(secret, id string, ts int64, b []byte) map[string]string {
		return map[string]string{"webhook-id": id, "webhook-timestamp": strconv.FormatInt(ts, 10),
			"webhook-signature": toolsSign(secret, id, ts, b), "content-type": "application/json"}
	}
	wrong := "whsec_" + base64.StdEncoding.EncodeToString([]byte("not the secret at all!!"))
	tampered := signed(e2e.Secret, "43", now, body)
	cases := []struct {
		name    string
		headers map[string]string
		body    []byte
		status  int
		problem string
	}{
		{"wrong secret", signed(wrong, "43", now, body), body, 401, "no v1 signature matches"},
		{"stale timestamp", signed(e2e.Secret, "44", now-600, body), body, 401, "off the local clock"},
		{"future timestamp", signed(e2e.Secret, "45", now+600, body), body, 401, "off the local clock"},
		{"changed body", tampered, []byte(`{"id":43,"event_name":"forged"}`), 401, "no v1 signature matches"},
		{"no headers", map[string]string{}, body, 401, "missing header webhook-id, webhook-timestamp, webhook-signature"},
		{"not a number", map[string]string{"webhook-id": "46", "webhook-timestamp": "soon", "webhook-signature": "v1,x"}, body, 401, "not unix seconds"},
		{"rotation: bad entry then the second secret", map[string]string{"webhook-id": "47", "webhook-timestamp": strconv.FormatInt(now, 10),
			"webhook-signature": "v1,AAAA " + "v2,whatever " + toolsSign(other, "47", now, body)}, body, 200, ""},
	}
	for _, c := range cases {
		require.Equal(t, c.status, toolsPost(t, url, c.headers, c.body), c.name)
	}
	data, err = os.ReadFile(out)
	require.NoError(t, err)
	lines = toolsReadLines(t, string(data))[3:]
	require.Len(t, lines, len(cases))
	for i, c := range cases {
		l := lines[i]
		require.Equal(t, c.status, l.Status, c.name)
		require.NotNil(t, l.SignatureValid, c.name)
		require.Equal(t, c.status == 200, *l.SignatureValid, c.name)
		require.Contains(t, l.Error, c.problem, c.name)
	}
	require.NotContains(t, string(data), e2e.Secret, "the secret is never written")

	require.NoError(t, stop(), "a cancelled receive exits cleanly")
}

// Without a secret, requests are not checked (signature_valid null), each is
// printed as a JSON line on stdout, a non-JSON body as a string, and every
// request gets --status.
func TestReceiveWithoutSecretPrintsEachRequest(t *testing.T) {
	t.Parallel()
	stdout, stderr, stop := toolsRun(t, nil, "receive", "--addr", "127.0.0.1:0", "--status", "202")
	addr := toolsListening(t, stderr.String)
	require.Contains(t, stderr.String(), "signatures NOT checked")
	url := "http://" + addr + "/"
	require.Equal(t, 202, toolsPost(t, url, map[string]string{"webhook-id": "batch_1_2_ab", "webhook-replay": "true"}, []byte(`[{"id":1},{"id":2}]`)))
	require.Equal(t, 202, toolsPost(t, url, nil, []byte("plain text")))
	resp, err := http.Get(url)
	require.NoError(t, err)
	resp.Body.Close()
	require.Equal(t, http.StatusMethodNotAllowed, resp.StatusCode)
	require.NoError(t, stop())

	lines := toolsReadLines(t, stdout.String())
	require.Len(t, lines, 2)
	require.Nil(t, lines[0].SignatureValid)
	require.Equal(t, "batch_1_2_ab", lines[0].WebhookID)
	require.True(t, lines[0].Replay)
	require.JSONEq(t, `[{"id":1},{"id":2}]`, string(lines[0].Body))
	require.Nil(t, lines[0].Timestamp)
	require.Equal(t, `"plain text"`, string(lines[1].Body))
	require.Equal(t, 202, lines[1].Status)
}

// The secret defaults to OUTBOXD_WEBHOOK_SECRET; bad flags are usage errors
// (exit 2) that never echo the secret.
func TestReceiveSettings(t *testing.T) {
	t.Parallel()
	_, stderr, stop := toolsRun(t, map[string]string{"OUTBOXD_WEBHOOK_SECRET": e2e.Secret}, "receive", "--addr", "127.0.0.1:0")
	addr := toolsListening(t, stderr.String)
	require.Contains(t, stderr.String(), "signatures checked (1 secret(s)")
	require.Equal(t, 401, toolsPost(t, "http://"+addr+"/", nil, []byte(`{}`)))
	require.NoError(t, stop())

	for _, args := range [][]string{
		{"--secret", "whsec_not base64!"},
		{"--secret", "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"},
		{"--status", "200", "--script", "503,200"},
		{"--script", "503,abc"},
		{"--status", "99"},
		{"--secret", e2e.Secret, "--tolerance", "0s"},
	} {
		var out bytes.Buffer
		err := run(context.Background(), append([]string{"receive", "--addr", "127.0.0.1:0"}, args...), func(string) string { return "" }, nil, &out, &out)
		require.Error(t, err, args)
		require.Equal(t, 2, exitCode(err, &out), args)
		require.NotContains(t, out.String(), "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
	}
}

func TestHookStatusScript(t *testing.T) {
	codes, err := parseHookStatusScript("503, 429,200")
	require.NoError(t, err)
	s := &hookStatusScript{codes: codes}
	var got []int
	for range 5 {
		got = append(got, s.take())
	}
	require.Equal(t, []int{503, 429, 200, 200, 200}, got)
}

// `outboxd healthcheck` asks OUTBOXD_HTTP_ADDR (an unspecified host meaning
// loopback): exit 0 on 2xx, 1 on anything else or no answer.
func TestHealthcheck(t *testing.T) {
	t.Parallel()
	var mu sync.Mutex
	status := map[string]int{"/healthz": 200, "/readyz": 503}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		defer mu.Unlock()
		w.WriteHeader(status[r.URL.Path])
	})}
	go srv.Serve(ln) //nolint:errcheck // closed at cleanup
	t.Cleanup(func() { srv.Close() })
	port := strconv.Itoa(ln.Addr().(*net.TCPAddr).Port)

	check := func(env map[string]string, args ...string) (int, string) {
		var out bytes.Buffer
		var environ []string
		for k, v := range env {
			environ = append(environ, k+"="+v)
		}
		err := run(context.Background(), append([]string{"healthcheck"}, args...), func(k string) string { return env[k] }, environ, &out, &out)
		return exitCode(err, &out), out.String()
	}
	code, out := check(map[string]string{"OUTBOXD_HTTP_ADDR": "0.0.0.0:" + port})
	require.Equal(t, 0, code, out)
	require.Contains(t, out, "http://127.0.0.1:"+port+"/healthz")
	code, out = check(map[string]string{"OUTBOXD_HTTP_ADDR": "127.0.0.1:" + port}, "--path", "/readyz")
	require.Equal(t, 1, code, out)
	require.Contains(t, out, "503")
	code, _ = check(nil, "--addr", "[::]:"+port)
	require.Equal(t, 0, code)
	code, out = check(nil, "--addr", e2e.FreeAddr(t))
	require.Equal(t, 1, code, "nothing listening: %s", out)
	code, _ = check(nil, "--addr", "nonsense")
	require.Equal(t, 2, code)
}

// The docker-compose topology without Docker: `outboxd run` delivers to
// `outboxd receive` (both child processes, sharing the secret through
// OUTBOXD_WEBHOOK_SECRET), which writes every event once with a valid
// signature.
func TestRunDeliversToReceive(t *testing.T) {
	t.Parallel()
	url := pgtest.Shared(t).NewDatabase(t)
	out := filepath.Join(t.TempDir(), "received.jsonl")
	recv := e2e.StartDaemon(t, map[string]string{"OUTBOXD_WEBHOOK_SECRET": e2e.Secret}, "receive", "--addr", "127.0.0.1:0", "--out", out)
	addr := toolsListening(t, recv.Log)
	env := e2e.Env(url, e2e.SlotName(url), "http://"+addr+"/outbox", nil)
	code, log := e2e.RunCommand(t, env, "migrate")
	require.Equal(t, 0, code, log)
	d := e2e.StartDaemon(t, env)
	ids := e2e.Insert(t, e2e.Pool(t, url), 10, 3, func(i int) int64 { return int64(i % 4) })

	var lines []receiveLine
	e2e.WaitFor(t, time.Minute, func() bool {
		data, _ := os.ReadFile(out)
		lines = toolsReadLines(t, string(data))
		return len(lines) >= len(ids)
	}, func() string {
		return fmt.Sprintf("%d of %d received; receiver log:\n%s", len(lines), len(ids), recv.Log())
	})
	seen := map[int64]bool{}
	ns := e2e.Namespace(t, e2e.Pool(t, url))
	for _, l := range lines {
		require.True(t, *l.SignatureValid, l.Error)
		require.Equal(t, 200, l.Status)
		var body struct {
			ID         int64     `json:"id"`
			OccurredAt time.Time `json:"occurred_at"`
		}
		require.NoError(t, json.Unmarshal(l.Body, &body))
		require.Equal(t, e2e.MessageID(ns, body.ID, body.OccurredAt), l.WebhookID)
		seen[body.ID] = true
	}
	for _, id := range ids {
		require.True(t, seen[id], "event %d received", id)
	}
	require.Equal(t, 0, d.Stop(30*time.Second))
	require.Equal(t, 0, recv.Stop(10*time.Second), "receive exits 0 on SIGTERM")
}
