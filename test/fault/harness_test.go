package fault

import (
	"context"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/require"

	"github.com/outboxd/outboxd/internal/e2e"
	"github.com/outboxd/outboxd/internal/pgtest"
)

// full selects the full matrix (OUTBOXD_FAULT_FULL=1): bigger counts, the
// 1,000,000-row transaction, 30 s stalls.
var full = os.Getenv("OUTBOXD_FAULT_FULL") == "1"

// pick returns short in the default (CI) run and long in the full matrix.
func pick[T any](short, long T) T {
	if full {
		return long
	}
	return short
}

// rigOpts configures a scenario's rig.
type rigOpts struct {
	// settings, when non-nil, start a dedicated Postgres with these
	// postgresql.conf settings (for scenarios that stop or reconfigure it);
	// otherwise the package's shared server is used.
	settings map[string]string
	// env adds to or overrides the daemon's environment.
	env map[string]string
	// orgs is the number of organizations (ordering keys); default 4.
	orgs int
	// before, when set, is SQL run before `migrate` (a table made by the
	// user: partitioned, ORM-made).
	before string
}

// rig is one scenario's world: a database, a proxy in front of its server, a
// receiver, a generator, the daemons started so far and the measurements.
type rig struct {
	t    *testing.T
	srv  *pgtest.Server
	url  string // direct URL (tests, generator)
	pool *pgxpool.Pool
	// proxy sits between the daemon and Postgres.
	proxy *Proxy
	recv  *Receiver
	gen   *Generator
	env   map[string]string
	slot  string

	mu      sync.Mutex
	daemons []*daemon
	notes   []string
	exclude map[int64]string // ids not expected at the receiver, with why

	walPeak  atomic.Int64
	rssPeak  atomic.Int64 // kB
	stopPoll func()

	// faultEnd, when set, is when the scenario's fault ended: recovery is
	// measured from it.
	faultEnd time.Time
}

func newRig(t *testing.T, o rigOpts) *rig {
	t.Helper()
	var srv *pgtest.Server
	if o.settings != nil {
		srv = pgtest.New(t, o.settings)
	} else {
		srv = pgtest.Shared(t)
	}
	if o.orgs == 0 {
		o.orgs = 4
	}
	dbURL := srv.NewDatabase(t)
	r := &rig{t: t, srv: srv, url: dbURL, exclude: map[int64]string{}}
	r.slot = e2e.SlotName(dbURL)
	r.proxy = NewProxy(t, fmt.Sprintf("%s:%d", srv.Host, srv.Port))
	r.recv = NewReceiver(t)

	extra := map[string]string{"OUTBOXD_LOG_LEVEL": "info"}
	for k, v := range o.env {
		extra[k] = v
	}
	if lvl := os.Getenv("OUTBOXD_FAULT_LOG_LEVEL"); lvl != "" {
		extra["OUTBOXD_LOG_LEVEL"] = lvl // e.g. debug, to investigate a failure
	}
	r.env = e2e.Env(viaProxy(t, dbURL, r.proxy.Port()), r.slot, r.recv.URL(), extra)
	if o.before != "" {
		pool := e2e.Pool(t, dbURL)
		_, err := pool.Exec(context.Background(), o.before)
		require.NoError(t, err, "the rig's SQL before migrate")
		pool.Close()
	}
	code, out := e2e.RunCommand(t, e2e.Env(dbURL, r.slot, r.recv.URL(), nil), "migrate")
	require.Equal(t, 0, code, out)

	r.pool = e2e.Pool(t, dbURL)
	r.gen = NewGenerator(r.pool, o.orgs, uint64(len(t.Name())))
	r.startWALPoll()
	return r
}

// viaProxy points a database URL at the proxy's port.
func viaProxy(t testing.TB, raw string, port int) string {
	u, err := url.Parse(raw)
	require.NoError(t, err)
	u.Host = "127.0.0.1:" + strconv.Itoa(port)
	return u.String()
}

// startWALPoll samples the WAL the slot retains (pg_current_wal_lsn() -
// restart_lsn) every 200 ms on a direct connection, keeping the peak.
func (r *rig) startWALPoll() {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		tick := time.NewTicker(200 * time.Millisecond)
		defer tick.Stop()
		for {
			var n int64
			qctx, qcancel := context.WithTimeout(ctx, 2*time.Second)
			err := r.pool.QueryRow(qctx, `SELECT coalesce(max(pg_current_wal_lsn() - restart_lsn), 0)::bigint
FROM pg_replication_slots WHERE slot_name = $1`, r.slot).Scan(&n)
			qcancel()
			if err == nil && n > r.walPeak.Load() {
				r.walPeak.Store(n)
			}
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
			}
		}
	}()
	var once sync.Once
	r.stopPoll = func() { once.Do(func() { cancel(); <-done }) }
	r.t.Cleanup(r.stopPoll)
}

// daemon is a running outboxd whose peak memory is read before it ends.
type daemon struct {
	*e2e.Daemon
	r *rig
	// ended is set when the test killed or stopped the process.
	ended atomic.Bool
}

// start runs `outboxd run` with the rig's environment plus extra.
func (r *rig) start(extra map[string]string) *daemon {
	r.t.Helper()
	env := map[string]string{}
	for k, v := range r.env {
		env[k] = v
	}
	for k, v := range extra {
		env[k] = v
	}
	d := &daemon{Daemon: e2e.StartDaemon(r.t, env), r: r}
	// Runs before e2e's cleanup kills the process: on failure, a goroutine
	// dump (SIGQUIT) and the whole log are kept for the report.
	r.t.Cleanup(func() {
		if r.t.Failed() {
			d.keepLog()
		}
	})
	r.mu.Lock()
	r.daemons = append(r.daemons, d)
	r.mu.Unlock()
	return d
}

// keepLog asks a running daemon for a goroutine dump (SIGQUIT: the Go
// runtime prints every stack and exits) and saves its whole log under
// OUTBOXD_FAULT_LOGDIR (default $TMPDIR/outboxd-fault-logs).
func (d *daemon) keepLog() {
	if !d.Exited() {
		_ = syscall.Kill(d.PID(), syscall.SIGQUIT)
		until(5*time.Second, d.Exited)
	}
	dir := os.Getenv("OUTBOXD_FAULT_LOGDIR")
	if dir == "" {
		dir = filepath.Join(os.TempDir(), "outboxd-fault-logs")
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return
	}
	name := strings.NewReplacer("/", "_", " ", "_").Replace(d.r.t.Name())
	path := filepath.Join(dir, fmt.Sprintf("%s-%d.log", name, d.PID()))
	if os.WriteFile(path, []byte(d.Log()), 0o644) == nil {
		d.r.t.Logf("outboxd log with goroutine dump: %s", path)
	}
}

// hwm records the process's peak resident set (VmHWM) while it still runs.
func (d *daemon) hwm() {
	if d.Exited() {
		return
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", d.PID()))
	if err != nil {
		return
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmHWM:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
			if err == nil && kb > d.r.rssPeak.Load() {
				d.r.rssPeak.Store(kb)
			}
		}
	}
}

// kill sends SIGKILL (after reading the peak memory).
func (d *daemon) kill() {
	d.ended.Store(true)
	d.hwm()
	d.Kill()
}

// stop sends SIGTERM and returns the exit code.
func (d *daemon) stop() int {
	d.ended.Store(true)
	d.hwm()
	return d.Stop(90 * time.Second)
}

// waitLog waits until the daemon's log contains s and returns when that was
// first seen (polled every 25 ms), or false after timeout.
func (d *daemon) waitLog(s string, timeout time.Duration) (time.Time, bool) {
	deadline := time.Now().Add(timeout)
	for {
		if strings.Contains(d.Log(), s) {
			return time.Now(), true
		}
		if time.Now().After(deadline) {
			return time.Time{}, false
		}
		time.Sleep(25 * time.Millisecond) //nolint:forbidigo // polling a file
	}
}

// waitCaughtUp waits until the first catch-up of the rig's slot is recorded
// as finished (catchup_pending false), so that a later crash resumes from the
// slot instead of recreating it.
func (r *rig) waitCaughtUp() {
	r.t.Helper()
	ok := until(time.Minute, func() bool {
		var pending bool
		err := r.pool.QueryRow(context.Background(), `SELECT catchup_pending FROM outboxd_checkpoint WHERE slot_name = $1`, r.slot).Scan(&pending)
		return err == nil && !pending
	})
	require.True(r.t, ok, "the first catch-up is not recorded as done")
}

// countLog counts the lines of the daemon's log that contain s.
func (d *daemon) countLog(s string) int {
	return strings.Count(d.Log(), s)
}

// waitStreaming waits until the daemon streams from its slot.
func (d *daemon) waitStreaming() {
	d.r.t.Helper()
	if _, ok := d.waitLog(`"message":"streaming"`, 90*time.Second); !ok {
		d.r.t.Fatalf("outboxd is not streaming after 90s; log:\n%s", tail(d.Log(), 4000))
	}
}

// waitReady waits until the daemon streams and its first catch-up is
// recorded: the steady state the faults are injected into.
func (d *daemon) waitReady() {
	d.r.t.Helper()
	d.waitStreaming()
	d.r.waitCaughtUp()
}

func tail(s string, n int) string {
	if len(s) > n {
		return "…" + s[len(s)-n:]
	}
	return s
}

// until polls cond every 50 ms until it holds (true) or timeout passes. It is
// for conditions with no count to watch; waits on a count use untilN.
func until(timeout time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(50 * time.Millisecond) //nolint:forbidigo // the poll interval of a wait-or-timeout helper
	}
	return true
}

// untilN polls n every 50 ms until it reaches want (true), or false when n
// has not grown for stall: a loaded machine makes the wait longer, a pipeline
// that stopped moving still fails it.
func untilN(stall time.Duration, n func() int, want int) bool {
	return untilProgress(stall, func() int64 { return int64(n()) }, func() bool { return n() >= want })
}

// untilProgress polls cond every 50 ms until it holds (true), or false when
// mark has not changed for stall.
func untilProgress(stall time.Duration, mark func() int64, cond func() bool) bool {
	last, moved := mark(), time.Now()
	for !cond() {
		time.Sleep(50 * time.Millisecond) //nolint:forbidigo // the poll interval of a wait-on-progress helper
		if v := mark(); v != last {
			last, moved = v, time.Now()
			continue
		}
		if time.Since(moved) > stall {
			return false
		}
	}
	return true
}

var slotRE = regexp.MustCompile(`slot "[^"]*"`)

// note adds a measured figure to the scenario's row.
// startServer starts the rig's Postgres again after a stop or a kill, and
// drops the connections the test's pool held from before: one left idle for
// less than pgxpool's ping threshold (1 s) is handed out unchecked, and its
// first statement returns the FATAL the server sent as it stopped (57P01),
// which failed pg-stop-fast-attached in CI when the restart was quick.
func (r *rig) startServer() {
	r.t.Helper()
	r.srv.Start(r.t)
	r.pool.Reset()
}

func (r *rig) note(format string, args ...any) {
	s := slotRE.ReplaceAllString(fmt.Sprintf(format, args...), "slot")
	r.t.Log(s)
	r.mu.Lock()
	r.notes = append(r.notes, s)
	r.mu.Unlock()
}

// excludeIDs declares rows the receiver must not get (rolled back never
// exist; these are committed rows that are dead-lettered by design or were
// processed before outboxd first ran).
func (r *rig) excludeIDs(why string, ids ...int64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, id := range ids {
		r.exclude[id] = why
	}
}

// tableIDs returns the ids in the outbox table: what committed.
func (r *rig) tableIDs() []int64 {
	r.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	rows, err := r.pool.Query(ctx, `SELECT id FROM domain_event ORDER BY id`)
	require.NoError(r.t, err)
	ids, err := pgx.CollectRows(rows, pgx.RowTo[int64])
	require.NoError(r.t, err)
	return ids
}

// expectedIDs is what must reach the receiver: committed minus excluded.
func (r *rig) expectedIDs() []int64 {
	ids := r.tableIDs()
	r.mu.Lock()
	defer r.mu.Unlock()
	out := ids[:0]
	for _, id := range ids {
		if _, ok := r.exclude[id]; !ok {
			out = append(out, id)
		}
	}
	return out
}

// count returns rows in the table matching a WHERE clause.
func (r *rig) count(where string, args ...any) int64 {
	r.t.Helper()
	var n int64
	require.NoError(r.t, r.pool.QueryRow(context.Background(), `SELECT count(*) FROM domain_event WHERE `+where, args...).Scan(&n))
	return n
}

// processedIDs returns the ids marked processed now.
func (r *rig) processedIDs() map[int64]bool {
	r.t.Helper()
	rows, err := r.pool.Query(context.Background(), `SELECT id FROM domain_event WHERE is_processed`)
	require.NoError(r.t, err)
	ids, err := pgx.CollectRows(rows, pgx.RowTo[int64])
	require.NoError(r.t, err)
	set := make(map[int64]bool, len(ids))
	for _, id := range ids {
		set[id] = true
	}
	return set
}

// slotState returns the slot's confirmed_flush_lsn, active_pid (0 when
// inactive) and wal_status; ok is false when there is no slot.
func (r *rig) slotState() (confirmed pglogrepl.LSN, pid int, walStatus string, ok bool) {
	r.t.Helper()
	err := r.pool.QueryRow(context.Background(), `SELECT coalesce(confirmed_flush_lsn, '0/0'), coalesce(active_pid, 0), coalesce(wal_status, '')
FROM pg_replication_slots WHERE slot_name = $1`, r.slot).Scan(&confirmed, &pid, &walStatus)
	if err == pgx.ErrNoRows {
		return 0, 0, "", false
	}
	require.NoError(r.t, err)
	return confirmed, pid, walStatus, true
}

// checkpointLSN returns the stored checkpoint of the rig's slot.
func (r *rig) checkpointLSN() pglogrepl.LSN {
	r.t.Helper()
	var lsn pglogrepl.LSN
	require.NoError(r.t, r.pool.QueryRow(context.Background(),
		`SELECT lsn FROM outboxd_checkpoint WHERE slot_name = $1`, r.slot).Scan(&lsn))
	return lsn
}

// deadLetters returns event id -> (last_status, last_error) of dead letters.
func (r *rig) deadLetters() map[int64]deadLetter {
	r.t.Helper()
	rows, err := r.pool.Query(context.Background(), `SELECT event_id, coalesce(last_status, 0), coalesce(last_error, ''), attempts FROM outboxd_dead_letter`)
	require.NoError(r.t, err)
	out := map[int64]deadLetter{}
	for rows.Next() {
		var id int64
		var d deadLetter
		require.NoError(r.t, rows.Scan(&id, &d.Status, &d.Reason, &d.Attempts))
		out[id] = d
	}
	require.NoError(r.t, rows.Err())
	return out
}

type deadLetter struct {
	Status   int
	Reason   string
	Attempts int
}

// assertNotRedelivered checks G4: no event marked processed at a crash is
// accepted again after it.
func (r *rig) assertNotRedelivered(processed map[int64]bool, crash time.Time) {
	r.t.Helper()
	again := 0
	var example int64
	for _, d := range r.recv.Deliveries() {
		if !d.Accepted() || sentBefore(d, crash) {
			continue
		}
		for _, id := range d.IDs {
			if processed[id] {
				again++
				example = id
			}
		}
	}
	require.Zero(r.t, again, "events marked processed before the crash were delivered again (e.g. id %d)", example)
}

// finish waits for every expected event to be delivered and marked, computes
// the scenario's row, records it and asserts G1/G5: nothing lost, nothing
// unexpected, no reordering, signatures and webhook-ids right.
func (r *rig) finish(timeout time.Duration) Check {
	r.t.Helper()
	var expected []int64
	var lastFull time.Time
	delivered := untilProgress(timeout, func() int64 { return int64(r.recv.AcceptedCount()) }, func() bool {
		// Cheap test first (recorded commits), the table's truth at most
		// every two seconds: counting a big table is not free.
		if r.recv.AcceptedCount() < r.gen.Len()-len(r.exclude) || time.Since(lastFull) < 2*time.Second && expected != nil {
			return false
		}
		lastFull = time.Now()
		expected = r.expectedIDs()
		return check(expected, nil, r.recv.Deliveries()).Lost == 0
	})
	if expected == nil {
		expected = r.expectedIDs()
	}
	unmarked := int64(-1)
	marked := delivered && untilProgress(timeout, func() int64 { return unmarked }, func() bool {
		unmarked = r.unmarked(expected)
		return unmarked == 0
	})
	r.stopPoll()
	r.mu.Lock()
	for _, d := range r.daemons {
		d.hwm()
	}
	r.mu.Unlock()
	c := check(expected, r.gen.Rows(), r.recv.Deliveries())
	res := Result{Scenario: strings.TrimPrefix(r.t.Name(), "TestFault/"), Check: c, Recovery: -1, Drained: -1,
		PeakWAL: r.walPeak.Load(), PeakRSS: r.rssPeak.Load()}
	if !r.faultEnd.IsZero() {
		res.Recovery, res.Drained = r.recovery(c)
	}
	r.mu.Lock()
	res.Notes = strings.Join(r.notes, "; ")
	r.mu.Unlock()
	res.Pass = delivered && marked && c.Lost == 0 && c.Unexpected == 0 && c.OutOfOrder == 0 && c.BadSig == 0 && c.BadID == 0
	if delivered && !marked {
		res.Notes = strings.TrimPrefix(res.Notes+"; rows left unmarked", "; ")
		r.explainUnmarked(expected)
	}
	i := record(res)
	r.t.Cleanup(func() {
		if r.t.Failed() { // an assertion after finish failed: so does the row
			results.Lock()
			results.rows[i].Pass = false
			results.Unlock()
		}
	})
	r.t.Logf("row: %s", res.line())
	r.t.Logf("check: %s", c)
	require.True(r.t, delivered, "not every committed event was delivered within %s: %s (lost ids %v)", timeout, c, c.LostIDs)
	require.True(r.t, marked, "delivered events left unmarked (G3): %d", r.unmarked(expected))
	require.Zero(r.t, c.Lost, "lost events (G1): %v", c.LostIDs)
	require.Zero(r.t, c.Unexpected, "events delivered that were not committed or must not be delivered")
	require.Zero(r.t, c.OutOfOrder, "deliveries out of commit order within an organization (G5)")
	require.Zero(r.t, c.BadSig, "bad signatures")
	require.Zero(r.t, c.BadID, "webhook-id not the event's namespaced message id, or not the same on every copy")
	return c
}

// explainUnmarked logs, for a few delivered rows left unmarked, every
// request the receiver got for them and whether outboxd parked or
// dead-lettered them: what it takes to tell a lost mark from a pending retry.
func (r *rig) explainUnmarked(expected []int64) {
	ctx := context.Background()
	rows, err := r.pool.Query(ctx, `SELECT id, delivery_attempts FROM domain_event WHERE NOT is_processed AND id = ANY($1) ORDER BY id LIMIT 10`, expected)
	if err != nil {
		return
	}
	type un struct{ ID, Attempts int64 }
	list, err := pgx.CollectRows(rows, pgx.RowToStructByPos[un])
	if err != nil {
		return
	}
	for _, u := range list {
		var reqs []string
		for _, d := range r.recv.Deliveries() {
			for _, id := range d.IDs {
				if id == u.ID {
					reqs = append(reqs, fmt.Sprintf("%s attempt %d status %d client_gone=%t",
						d.At.Format("15:04:05.000"), d.Attempt, d.Status, d.ClientGone))
				}
			}
		}
		var parked, dead string
		_ = r.pool.QueryRow(ctx, `SELECT format('attempts=%s next=%s status=%s error=%s', attempts, next_attempt_at, last_status, last_error)
FROM outboxd_parked WHERE event_id = $1`, u.ID).Scan(&parked)
		_ = r.pool.QueryRow(ctx, `SELECT format('status=%s error=%s', last_status, last_error) FROM outboxd_dead_letter WHERE event_id = $1`, u.ID).Scan(&dead)
		r.t.Logf("unmarked event %d (delivery_attempts %d): requests %v; parked: %q; dead letter: %q", u.ID, u.Attempts, reqs, parked, dead)
	}
}

// unmarked counts expected rows not yet marked processed.
func (r *rig) unmarked(expected []int64) int64 {
	var n int64
	require.NoError(r.t, r.pool.QueryRow(context.Background(),
		`SELECT count(*) FROM domain_event WHERE NOT is_processed AND id = ANY($1)`, expected).Scan(&n))
	return n
}

// recovery measures from faultEnd to the first 2xx of an event committed
// after it (recovery), and to the last first-2xx of any event (drained).
func (r *rig) recovery(c Check) (rec, drained time.Duration) {
	rec, drained = -1, -1
	committedAfter := map[int64]bool{}
	for _, row := range r.gen.Rows() {
		if row.At.After(r.faultEnd) {
			committedAfter[row.ID] = true
		}
	}
	var first, last time.Time
	for id, at := range c.FirstAccepted {
		if at.After(last) {
			last = at
		}
		if committedAfter[id] && (first.IsZero() || at.Before(first)) {
			first = at
		}
	}
	if !first.IsZero() {
		rec = first.Sub(r.faultEnd)
	}
	if last.After(r.faultEnd) {
		drained = last.Sub(r.faultEnd)
	}
	return rec, drained
}

// Result is one row of the suite's table.
type Result struct {
	Scenario          string
	Check             Check
	Recovery, Drained time.Duration // -1: not applicable
	PeakWAL           int64         // bytes
	PeakRSS           int64         // kB
	Notes             string
	Pass              bool
}

var results struct {
	sync.Mutex
	rows []Result
}

// record adds a row and returns its index.
func record(r Result) int {
	results.Lock()
	defer results.Unlock()
	results.rows = append(results.rows, r)
	return len(results.rows) - 1
}

func dur(d time.Duration) string {
	if d < 0 {
		return "–"
	}
	return d.Round(10 * time.Millisecond).String()
}

func size(b int64) string {
	switch {
	case b >= 1<<30:
		return fmt.Sprintf("%.1f GiB", float64(b)/(1<<30))
	case b >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(b)/(1<<20))
	case b >= 1<<10:
		return fmt.Sprintf("%.0f KiB", float64(b)/(1<<10))
	default:
		return fmt.Sprintf("%d B", b)
	}
}

func (res Result) line() string {
	c := res.Check
	verdict := "ok"
	if !res.Pass {
		verdict = "FAIL"
	}
	return fmt.Sprintf("| %s | %s | %d | %d | %d | %d | %d | %d | %s | %s | %s | %s | %s |",
		res.Scenario, verdict, c.Expected, c.Lost, c.Duplicates, c.MaxPerID, c.Unexpected, c.OutOfOrder,
		dur(res.Recovery), dur(res.Drained), size(res.PeakWAL), size(res.PeakRSS*1024), res.Notes)
}

// summary renders the table of every scenario that finished.
func summary() string {
	results.Lock()
	defer results.Unlock()
	var b strings.Builder
	mode := "short"
	if full {
		mode = "full (OUTBOXD_FAULT_FULL=1)"
	}
	fmt.Fprintf(&b, "fault matrix, %s mode, %d scenarios\n\n", mode, len(results.rows))
	b.WriteString("| scenario | result | events | lost | duplicates | max per id | unexpected | out of order | recovery | drained | peak retained WAL | peak RSS | notes |\n")
	b.WriteString("|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
	rows := append([]Result(nil), results.rows...)
	sortResults(rows)
	for _, r := range rows {
		b.WriteString(r.line())
		b.WriteByte('\n')
	}
	return b.String()
}

func sortResults(rows []Result) {
	order := map[string]int{}
	for i, s := range scenarios {
		order[s.name] = i
	}
	for i := 1; i < len(rows); i++ {
		for j := i; j > 0; j-- {
			a, b := rows[j-1], rows[j]
			if order[strings.SplitN(a.Scenario, "/", 2)[0]] <= order[strings.SplitN(b.Scenario, "/", 2)[0]] {
				break
			}
			rows[j-1], rows[j] = b, a
		}
	}
}
