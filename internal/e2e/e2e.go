// Package e2e holds the test harness for end-to-end tests: the outboxd binary
// as a child process, a recording webhook receiver that verifies signatures
// with its own implementation of Standard Webhooks, and database helpers. It
// is test-only code.
package e2e

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/require"

	"github.com/outboxd/outboxd/internal/pgtest"
)

var (
	buildOnce sync.Once
	binPath   string
	buildErr  error
)

// Binary builds cmd/outboxd once per test process and returns its path. The
// test process must run its tests through pgtest.Main, which removes it.
func Binary(t testing.TB) string {
	t.Helper()
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "outboxd-bin-")
		if err != nil {
			buildErr = err
			return
		}
		// Removed when the test process is done (pgtest.Main); each
		// run used to leave its 30 MB binary in $TMPDIR.
		pgtest.AtExit(func() { _ = os.RemoveAll(dir) })
		binPath = filepath.Join(dir, "outboxd")
		_, file, _, _ := runtime.Caller(0)
		root := filepath.Join(filepath.Dir(file), "..", "..")
		cmd := exec.Command("go", "build", "-o", binPath, "./cmd/outboxd")
		cmd.Dir = root
		out, err := cmd.CombinedOutput()
		if err != nil {
			buildErr = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	require.NoError(t, buildErr)
	return binPath
}

// Secret is the webhook secret the harness signs with.
const Secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"

// Delivery is one request the receiver got.
type Delivery struct {
	WebhookID string
	Timestamp string
	IDs       []int64 // envelope ids in the body
	Orgs      []int64
	// OccurredAt are the envelopes' occurred_at (zero when null or not a
	// timestamp), for WebhookIDOf.
	OccurredAt []time.Time
	SigOK      bool
	Status     int // what the receiver answered
	At         time.Time
	Replay     bool
	Body       []byte
	Path       string
	Signature  string
}

// Receiver is a webhook endpoint that records every request.
type Receiver struct {
	*httptest.Server
	mu         sync.Mutex
	deliveries []Delivery
	// accepted counts the 2xx-answered copies of each event id, and badSigs
	// the requests whose signature did not verify, kept as requests arrive so
	// that waits and counts never copy the deliveries (on a race-enabled
	// test binary, copying thousands of them every poll held the lock long
	// enough to slow the receiver itself to hundreds of milliseconds per
	// request).
	accepted map[int64]int
	badSigs  int
	// Respond decides the status for a request; nil answers 200. It may block
	// (a slow receiver).
	Respond func(d *Delivery) int
	notify  chan struct{}
}

// NewReceiver starts a receiver, closed at cleanup.
func NewReceiver(t testing.TB) *Receiver {
	r := &Receiver{notify: make(chan struct{}, 1), accepted: map[int64]int{}}
	r.Server = httptest.NewServer(http.HandlerFunc(r.serve))
	t.Cleanup(r.Close)
	return r
}

func (r *Receiver) serve(w http.ResponseWriter, req *http.Request) {
	body, _ := io.ReadAll(req.Body)
	d := Delivery{
		WebhookID: req.Header.Get("webhook-id"), Timestamp: req.Header.Get("webhook-timestamp"),
		At: time.Now(), Body: body, Replay: req.Header.Get("webhook-replay") != "",
		Path: req.URL.Path, Signature: req.Header.Get("webhook-signature"),
	}
	d.SigOK = Verify(Secret, d.WebhookID, d.Timestamp, body, req.Header.Get("webhook-signature"))
	type env struct {
		ID         int64  `json:"id"`
		Org        *int64 `json:"organization_id"`
		OccurredAt any    `json:"occurred_at"`
	}
	var one env
	var many []env
	if bytes.HasPrefix(bytes.TrimSpace(body), []byte("[")) {
		_ = json.Unmarshal(body, &many)
	} else if json.Unmarshal(body, &one) == nil {
		many = []env{one}
	}
	for _, e := range many {
		d.IDs = append(d.IDs, e.ID)
		var org int64 = -1
		if e.Org != nil {
			org = *e.Org
		}
		d.Orgs = append(d.Orgs, org)
		var at time.Time
		if ts, ok := e.OccurredAt.(string); ok {
			at, _ = time.Parse(time.RFC3339Nano, ts)
		}
		d.OccurredAt = append(d.OccurredAt, at)
	}
	d.Status = http.StatusOK
	if r.Respond != nil {
		d.Status = r.Respond(&d)
	}
	r.mu.Lock()
	r.deliveries = append(r.deliveries, d)
	if !d.SigOK {
		r.badSigs++
	}
	if d.Status/100 == 2 {
		for _, id := range d.IDs {
			r.accepted[id]++
		}
	}
	r.mu.Unlock()
	select {
	case r.notify <- struct{}{}:
	default:
	}
	w.WriteHeader(d.Status)
}

// Deliveries returns a copy of everything received so far.
func (r *Receiver) Deliveries() []Delivery {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]Delivery(nil), r.deliveries...)
}

// Accepted returns the event ids of 2xx-answered requests, in receipt order.
func (r *Receiver) Accepted() []int64 {
	var ids []int64
	for _, d := range r.Deliveries() {
		if d.Status/100 == 2 {
			ids = append(ids, d.IDs...)
		}
	}
	return ids
}

// Counts summarises accepted deliveries against the expected ids.
type Counts struct {
	Expected, Unique, Lost, Duplicates, MaxPerID, Unexpected, BadSignatures int
}

func (c Counts) String() string {
	return fmt.Sprintf("expected=%d delivered=%d lost=%d duplicates=%d max_per_id=%d unexpected=%d bad_signatures=%d",
		c.Expected, c.Unique, c.Lost, c.Duplicates, c.MaxPerID, c.Unexpected, c.BadSignatures)
}

// Len returns the number of requests received so far.
func (r *Receiver) Len() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.deliveries)
}

// Count compares accepted deliveries with the expected ids.
func (r *Receiver) Count(expected []int64) Counts {
	want := make(map[int64]bool, len(expected))
	for _, id := range expected {
		want[id] = true
	}
	c := Counts{Expected: len(expected)}
	r.mu.Lock()
	defer r.mu.Unlock()
	c.BadSignatures = r.badSigs
	for id, n := range r.accepted {
		if want[id] {
			c.Unique++
		} else {
			c.Unexpected += n
		}
		c.Duplicates += n - 1
		c.MaxPerID = max(c.MaxPerID, n)
	}
	for id := range want {
		if r.accepted[id] == 0 {
			c.Lost++
		}
	}
	return c
}

// WaitAccepted waits until every expected id was accepted at least once. It
// fails only when no further expected id was accepted for stall: a busy
// machine makes the wait longer, never a failure.
func (r *Receiver) WaitAccepted(t testing.TB, expected []int64, stall time.Duration) {
	t.Helper()
	WaitProgress(t, stall, func() (bool, int64) {
		c := r.Count(expected)
		return c.Lost == 0, int64(len(expected) - c.Lost)
	}, func() string {
		return "not all events delivered: " + r.Count(expected).String()
	})
}

// Verify checks a Standard Webhooks signature header: an independent
// implementation of the spec (base64 secret after "whsec_", HMAC-SHA256 over
// "id.timestamp.body", any of the space-separated "v1,<b64>" entries).
func Verify(secret, id, ts string, body []byte, header string) bool {
	key, err := base64.StdEncoding.DecodeString(strings.TrimPrefix(secret, "whsec_"))
	if err != nil || header == "" {
		return false
	}
	mac := hmac.New(sha256.New, key)
	mac.Write([]byte(id + "." + ts + "."))
	mac.Write(body)
	want := mac.Sum(nil)
	for _, part := range strings.Fields(header) {
		v, sig, ok := strings.Cut(part, ",")
		if !ok || v != "v1" {
			continue
		}
		got, err := base64.StdEncoding.DecodeString(sig)
		if err == nil && hmac.Equal(got, want) {
			return true
		}
	}
	return false
}

// Namespace returns the outbox's message namespace, which `outboxd migrate`
// stored in outboxd_outbox (in the schema search_path finds first).
func Namespace(t testing.TB, pool *pgxpool.Pool) string {
	t.Helper()
	var ns string
	require.NoError(t, pool.QueryRow(context.Background(), `SELECT namespace FROM outboxd_outbox`).Scan(&ns))
	require.Regexp(t, `^[0-9a-f]{16}$`, ns)
	return ns
}

// MessageID is the contract's message id of an event (docs/DESIGN.md §4),
// implemented here on its own: evt_<namespace>_<row id>_<occurred_at in
// microseconds since 1970, base 36>, or evt_<namespace>_<row id> for an event
// without occurred_at.
func MessageID(ns string, id int64, occurredAt time.Time) string {
	s := "evt_" + ns + "_" + strconv.FormatInt(id, 10)
	if !occurredAt.IsZero() {
		s += "_" + strconv.FormatInt(occurredAt.UnixMicro(), 36)
	}
	return s
}

// WebhookIDOf returns the webhook-id the contract gives delivery d of the
// outbox with namespace ns: the message id of its one event, or for a batch
// batch_<namespace>_<first id>_<last id>_<16 hex digits of SHA-256 over the
// members' message ids, each followed by a newline>. Every test that checks a
// webhook-id compares it with this.
func WebhookIDOf(ns string, d Delivery) string {
	switch len(d.IDs) {
	case 0:
		return ""
	case 1:
		return MessageID(ns, d.IDs[0], d.OccurredAt[0])
	}
	h := sha256.New()
	for i, id := range d.IDs {
		h.Write([]byte(MessageID(ns, id, d.OccurredAt[i]) + "\n"))
	}
	return fmt.Sprintf("batch_%s_%d_%d_%x", ns, d.IDs[0], d.IDs[len(d.IDs)-1], h.Sum(nil)[:8])
}

// WaitFor polls cond until it holds or the timeout passes. Use it for
// conditions with no measure of progress; prefer [WaitProgress] for counts.
func WaitFor(t testing.TB, timeout time.Duration, cond func() bool, msg func() string) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s: %s", timeout, msg())
		}
		<-tick.C
	}
}

// WaitProgress polls poll until it reports done. poll also returns a progress
// mark (a count that grows as work gets done); the wait fails only when the
// mark has not changed for stall, so a slow, loaded machine delays the test
// instead of failing it, while a pipeline that stopped moving still fails.
func WaitProgress(t testing.TB, stall time.Duration, poll func() (done bool, mark int64), msg func() string) {
	t.Helper()
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	done, last := poll()
	lastMove := time.Now()
	for !done {
		<-tick.C
		var mark int64
		done, mark = poll()
		if mark != last {
			last, lastMove = mark, time.Now()
			continue
		}
		if !done && time.Since(lastMove) > stall {
			t.Fatalf("no progress for %s: %s", stall, msg())
		}
	}
}

// Daemon is outboxd running as a child process.
type Daemon struct {
	t       testing.TB
	cmd     *exec.Cmd
	logPath string
	done    chan struct{}
	err     error
}

// Env returns the usual environment for a daemon on db with slot slot:
// requests signed with Secret, and the receivers (the default webhook's and
// the subscriptions') on loopback allowed. A test that means unsigned
// requests says so: OUTBOXD_WEBHOOK_UNSIGNED=true with OUTBOXD_WEBHOOK_SECRET
// set to "".
func Env(dbURL, slot, webhookURL string, extra map[string]string) map[string]string {
	env := map[string]string{
		"OUTBOXD_DATABASE_URL":                dbURL,
		"OUTBOXD_SLOT":                        slot,
		"OUTBOXD_WEBHOOK_URL":                 webhookURL,
		"OUTBOXD_WEBHOOK_SECRET":              Secret,
		"OUTBOXD_ALLOW_PRIVATE_SINKS":         "true",
		"OUTBOXD_ALLOW_PRIVATE_SUBSCRIPTIONS": "true",
		"OUTBOXD_HTTP_ADDR":                   "127.0.0.1:0",
		"OUTBOXD_LOG_LEVEL":                   "debug",
		"OUTBOXD_WEBHOOK_BACKOFF_MAX":         "200ms",
	}
	for k, v := range extra {
		env[k] = v
	}
	return env
}

// StartDaemon runs `outboxd run` with env (and nothing else of the process
// environment but PATH and HOME). It is killed at cleanup if still running.
func StartDaemon(t testing.TB, env map[string]string, args ...string) *Daemon {
	t.Helper()
	if len(args) == 0 {
		args = []string{"run"}
	}
	logf, err := os.CreateTemp("", "outboxd-log-*.txt")
	require.NoError(t, err)
	cmd := exec.Command(Binary(t), args...)
	cmd.Env = []string{"PATH=" + os.Getenv("PATH"), "HOME=" + os.Getenv("HOME")}
	for k, v := range env {
		cmd.Env = append(cmd.Env, k+"="+v)
	}
	cmd.Stdout = logf
	cmd.Stderr = logf
	require.NoError(t, cmd.Start())
	d := &Daemon{t: t, cmd: cmd, logPath: logf.Name(), done: make(chan struct{})}
	go func() {
		d.err = cmd.Wait()
		logf.Close()
		close(d.done)
	}()
	t.Cleanup(func() {
		d.Kill()
		if t.Failed() {
			t.Logf("outboxd log (pid %d) tail:\n%s", cmd.Process.Pid, tail(d.Log(), 6000))
		}
		os.Remove(d.logPath)
	})
	return d
}

func tail(s string, n int) string {
	if len(s) > n {
		return "…" + s[len(s)-n:]
	}
	return s
}

// Log returns what the daemon wrote so far.
func (d *Daemon) Log() string {
	b, _ := os.ReadFile(d.logPath)
	return string(b)
}

// PID is the child's process id.
func (d *Daemon) PID() int { return d.cmd.Process.Pid }

// Kill sends SIGKILL and waits for the process to end.
func (d *Daemon) Kill() {
	select {
	case <-d.done:
		return
	default:
	}
	_ = d.cmd.Process.Signal(syscall.SIGKILL)
	<-d.done
}

// Stop sends SIGTERM and waits (up to timeout) for the exit code.
func (d *Daemon) Stop(timeout time.Duration) int {
	d.t.Helper()
	_ = d.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-d.done:
	case <-time.After(timeout):
		d.t.Fatalf("outboxd did not stop within %s after SIGTERM", timeout)
	}
	return d.cmd.ProcessState.ExitCode()
}

// Wait waits for the process to end by itself and returns its exit code.
func (d *Daemon) Wait(timeout time.Duration) int {
	d.t.Helper()
	select {
	case <-d.done:
	case <-time.After(timeout):
		d.t.Fatalf("outboxd did not exit within %s", timeout)
	}
	return d.cmd.ProcessState.ExitCode()
}

// Exited reports whether the process has ended.
func (d *Daemon) Exited() bool {
	select {
	case <-d.done:
		return true
	default:
		return false
	}
}

// RunCommand runs a one-shot outboxd command and returns its exit code and
// combined output.
func RunCommand(t testing.TB, env map[string]string, args ...string) (int, string) {
	t.Helper()
	cmd := exec.Command(Binary(t), args...)
	cmd.Env = []string{"PATH=" + os.Getenv("PATH"), "HOME=" + os.Getenv("HOME")}
	for k, v := range env {
		cmd.Env = append(cmd.Env, k+"="+v)
	}
	out, err := cmd.CombinedOutput()
	if ee, ok := err.(*exec.ExitError); ok {
		return ee.ExitCode(), string(out)
	}
	require.NoError(t, err)
	return 0, string(out)
}

// Pool opens a pool to url, closed at cleanup.
func Pool(t testing.TB, url string) *pgxpool.Pool {
	t.Helper()
	p, err := pgxpool.New(context.Background(), url)
	require.NoError(t, err)
	t.Cleanup(p.Close)
	return p
}

// Insert commits txns transactions of rows rows each into domain_event and
// returns the ids in commit order. org picks the organization of the i-th row
// overall.
func Insert(t testing.TB, pool *pgxpool.Pool, txns, rows int, org func(i int) int64) []int64 {
	t.Helper()
	ids, err := InsertErr(context.Background(), pool, txns, rows, org)
	require.NoError(t, err)
	return ids
}

// InsertErr is Insert for goroutines: it returns the error.
func InsertErr(ctx context.Context, pool *pgxpool.Pool, txns, rows int, org func(i int) int64) ([]int64, error) {
	var ids []int64
	n := 0
	for range txns {
		orgs := make([]int64, rows)
		for j := range orgs {
			orgs[j] = org(n)
			n++
		}
		var got []int64
		err := pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
			rs, err := tx.Query(ctx, `INSERT INTO domain_event (event_name, organization_id, user_id, entity_type, entity_id, source, properties)
SELECT 'batch_started', o, 3, 'batch', 'B-' || o, 'e2e', jsonb_build_object('seq', ord, 'note', 'ünïcødé "quoted"')
FROM unnest($1::bigint[]) WITH ORDINALITY AS u(o, ord) ORDER BY ord RETURNING id`, orgs)
			if err != nil {
				return err
			}
			got, err = pgx.CollectRows(rs, pgx.RowTo[int64])
			return err
		})
		if err != nil {
			return ids, err
		}
		ids = append(ids, got...)
	}
	return ids, nil
}

// InsertUntilStopped commits transactions of rows rows each, one after the
// other, until the returned stop is called (or an insert fails, a Postgres
// restart say); stop returns the ids committed.
func InsertUntilStopped(pool *pgxpool.Pool, rows int, org func(i int) int64) (stop func() []int64) {
	done := make(chan struct{})
	inserted := make(chan []int64, 1)
	go func() {
		var ids []int64
		for {
			select {
			case <-done:
				inserted <- ids
				return
			default:
			}
			more, err := InsertErr(context.Background(), pool, 1, rows, org)
			ids = append(ids, more...)
			if err != nil {
				<-done
				inserted <- ids
				return
			}
		}
	}()
	return func() []int64 {
		close(done)
		return <-inserted
	}
}

// Processed returns how many rows are marked processed, and the sum of their
// delivery attempts.
func Processed(t testing.TB, pool *pgxpool.Pool) (rows, attempts int64) {
	t.Helper()
	require.NoError(t, pool.QueryRow(context.Background(),
		`SELECT count(*), coalesce(sum(delivery_attempts), 0) FROM domain_event WHERE is_processed`).Scan(&rows, &attempts))
	return rows, attempts
}

// FreeAddr returns a free loopback TCP address.
func FreeAddr(t testing.TB) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer l.Close()
	return l.Addr().String()
}

// SlotName derives a slot name from a database URL's database name.
func SlotName(dbURL string) string {
	i := strings.LastIndex(dbURL, "/")
	name := dbURL[i+1:]
	if j := strings.Index(name, "?"); j >= 0 {
		name = name[:j]
	}
	name = strings.ToLower(name)
	var b strings.Builder
	for _, r := range name {
		if (r >= 'a' && r <= 'z') || (r >= '0' && r <= '9') || r == '_' {
			b.WriteRune(r)
		} else {
			b.WriteByte('_')
		}
	}
	s := b.String()
	if len(s) > 50 {
		s = s[len(s)-50:]
	}
	return "s_" + s + "_" + strconv.Itoa(len(s))
}

// OutboxColumns are the outbox table's columns as `outboxd migrate` makes
// them, for tests that create the table themselves (partitioned, say) before
// migrate: CREATE TABLE domain_event (` + OutboxColumns + `, PRIMARY KEY ...).
const OutboxColumns = `
  id                bigint GENERATED BY DEFAULT AS IDENTITY,
  event_name        text        NOT NULL,
  occurred_at       timestamptz NOT NULL DEFAULT now(),
  organization_id   bigint,
  user_id           bigint,
  entity_type       text,
  entity_id         text,
  correlation_id    text,
  source            text,
  schema_version    integer     NOT NULL DEFAULT 1,
  properties        jsonb       NOT NULL DEFAULT '{}',
  is_processed      boolean     NOT NULL DEFAULT false,
  processed_at      timestamptz,
  delivery_attempts integer     NOT NULL DEFAULT 0`
