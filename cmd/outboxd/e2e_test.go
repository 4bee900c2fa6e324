package main

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/require"

	"github.com/outboxd/outboxd/internal/e2e"
	"github.com/outboxd/outboxd/internal/pgtest"
)

func TestMain(m *testing.M) { pgtest.Main(m) }

// bundle is what every end-to-end test starts from: a fresh database,
// migrated by the binary, a receiver and the daemon's environment.
type bundle struct {
	url  string
	pool *pgxpool.Pool
	recv *e2e.Receiver
	env  map[string]string
}

func newBundle(t *testing.T, srv *pgtest.Server, extra map[string]string) *bundle {
	t.Helper()
	return newBundleWith(t, srv, extra, "")
}

// newBundleWith runs setup (e.g. the application's own CREATE TABLE) in the
// fresh database before `outboxd migrate`.
func newBundleWith(t *testing.T, srv *pgtest.Server, extra map[string]string, setup string) *bundle {
	t.Helper()
	url := srv.NewDatabase(t)
	b := &bundle{url: url, pool: e2e.Pool(t, url), recv: e2e.NewReceiver(t)}
	if setup != "" {
		_, err := b.pool.Exec(context.Background(), setup)
		require.NoError(t, err, setup)
	}
	b.env = e2e.Env(url, e2e.SlotName(url), b.recv.URL, extra)
	code, out := e2e.RunCommand(t, b.env, "migrate")
	require.Equal(t, 0, code, out)
	return b
}

// waitProcessed waits until n rows are marked processed.
func (b *bundle) waitProcessed(t *testing.T, n int64, stall time.Duration) {
	t.Helper()
	e2e.WaitProgress(t, stall, func() (bool, int64) {
		rows, _ := e2e.Processed(t, b.pool)
		return rows >= n, rows
	}, func() string {
		rows, _ := e2e.Processed(t, b.pool)
		return fmt.Sprintf("%d of %d rows processed", rows, n)
	})
}

// confirmedFlush returns the slot's confirmed_flush_lsn.
func (b *bundle) confirmedFlush(t *testing.T) pglogrepl.LSN {
	t.Helper()
	var lsn pglogrepl.LSN
	require.NoError(t, b.pool.QueryRow(context.Background(),
		`SELECT coalesce(confirmed_flush_lsn, '0/0') FROM pg_replication_slots WHERE slot_name = $1`, b.env["OUTBOXD_SLOT"]).Scan(&lsn))
	return lsn
}

func (b *bundle) currentLSN(t *testing.T) pglogrepl.LSN {
	t.Helper()
	var lsn pglogrepl.LSN
	require.NoError(t, b.pool.QueryRow(context.Background(), `SELECT pg_current_wal_lsn()`).Scan(&lsn))
	return lsn
}

func one(int) int64 { return 1 }

// Test 1: 4,000 events in transactions of 1, 10 and 1,000 rows are each
// delivered exactly once, in commit order, all marked processed, and the
// slot confirms past the last commit.
func TestDeliversEveryEventOnceInCommitOrder(t *testing.T) {
	t.Parallel()
	pgtest.ForEachMajor(t, func(t *testing.T) {
		b := newBundle(t, pgtest.Shared(t), nil)
		d := e2e.StartDaemon(t, b.env)

		var ids []int64
		// Transactions of 1, 10 and 1000 rows (the last larger than one
		// pipeline's worth of events), all on one ordering key: the whole run is
		// one ordered sequence.
		ids = append(ids, e2e.Insert(t, b.pool, 500, 1, one)...)
		ids = append(ids, e2e.Insert(t, b.pool, 150, 10, one)...)
		ids = append(ids, e2e.Insert(t, b.pool, 2, 1000, one)...)
		const total = 500 + 150*10 + 2*1000
		require.Len(t, ids, total)
		last := b.currentLSN(t)

		b.recv.WaitAccepted(t, ids, 2*time.Minute)
		b.waitProcessed(t, total, time.Minute)
		e2e.WaitFor(t, 30*time.Second, func() bool { return b.confirmedFlush(t) >= last },
			func() string {
				return fmt.Sprintf("confirmed_flush_lsn %s < last commit %s", b.confirmedFlush(t), last)
			})

		c := b.recv.Count(ids)
		t.Logf("fault-free run: %s", c)
		require.Zero(t, c.Lost)
		require.Zero(t, c.Duplicates)
		require.Zero(t, c.Unexpected)
		require.Zero(t, c.BadSignatures)
		require.Equal(t, ids, b.recv.Accepted(), "one ordering key: receipt order must be commit order")
		ns := e2e.Namespace(t, b.pool)
		for _, dl := range b.recv.Deliveries() {
			require.Equal(t, e2e.WebhookIDOf(ns, dl), dl.WebhookID, "webhook-id is the event's message id")
		}
		rows, attempts := e2e.Processed(t, b.pool)
		require.EqualValues(t, total, rows)
		require.EqualValues(t, total, attempts, "one attempt each")
		require.Equal(t, 0, d.Stop(30*time.Second))
	})
}

// Test 5: rows inserted before the first run are delivered (catch-up from the
// snapshot), and rows inserted right after are delivered once too.
func TestRowsBeforeFirstRunAreDelivered(t *testing.T) {
	t.Parallel()
	pgtest.ForEachMajor(t, func(t *testing.T) {
		b := newBundle(t, pgtest.Shared(t), nil)
		before := e2e.Insert(t, b.pool, 50, 10, func(i int) int64 { return int64(i % 5) })
		// One row was already handled by the dispatcher being replaced.
		_, err := b.pool.Exec(context.Background(), `UPDATE domain_event SET is_processed = true, processed_at = now() WHERE id = $1`, before[0])
		require.NoError(t, err)
		d := e2e.StartDaemon(t, b.env)
		after := e2e.Insert(t, b.pool, 20, 5, func(i int) int64 { return int64(i % 5) })
		want := append(append([]int64(nil), before[1:]...), after...)
		b.recv.WaitAccepted(t, want, time.Minute)
		b.waitProcessed(t, int64(len(want))+1, time.Minute)
		c := b.recv.Count(want)
		t.Logf("catch-up: %s", c)
		require.Zero(t, c.Duplicates)
		require.Zero(t, c.Unexpected, "the row processed before the first run must not be delivered")
		require.Equal(t, 0, d.Stop(30*time.Second))
	})
}

// Test 4: the webhook answers 503 for a while, then 200: no row is marked
// before its 2xx, and delivery_attempts counts every attempt.
func TestRetriesUntilAcceptedAndCountsAttempts(t *testing.T) {
	t.Parallel()
	pgtest.ForEachMajor(t, func(t *testing.T) {
		b := newBundle(t, pgtest.Shared(t), map[string]string{"OUTBOXD_WEBHOOK_MAX_ATTEMPTS": "1000"})
		var failing atomic.Bool
		failing.Store(true)
		var refused atomic.Int64
		b.recv.Respond = func(*e2e.Delivery) int {
			if failing.Load() {
				refused.Add(1)
				return http.StatusServiceUnavailable
			}
			return http.StatusOK
		}
		d := e2e.StartDaemon(t, b.env)
		ids := e2e.Insert(t, b.pool, 5, 1, one)
		e2e.WaitFor(t, time.Minute, func() bool { return refused.Load() >= 5 }, func() string { return "not enough 503s" })
		rows, _ := e2e.Processed(t, b.pool)
		require.Zero(t, rows, "nothing may be marked before a 2xx")
		failing.Store(false)
		b.recv.WaitAccepted(t, ids, time.Minute)
		b.waitProcessed(t, 5, time.Minute)

		// Attempts per id as the receiver saw them must equal delivery_attempts.
		seen := map[int64]int32{}
		for _, dl := range b.recv.Deliveries() {
			seen[dl.IDs[0]]++
		}
		for _, id := range ids {
			var attempts int32
			require.NoError(t, b.pool.QueryRow(context.Background(), `SELECT delivery_attempts FROM domain_event WHERE id = $1 AND is_processed`, id).Scan(&attempts))
			require.Equal(t, seen[id], attempts, "event %d", id)
		}
		require.Greater(t, seen[ids[0]], int32(1))
		require.Equal(t, 0, d.Stop(30*time.Second))
	})
}

// Test 6: a webhook answering 400 for one event dead-letters that event; all
// others are delivered and the stream does not stop.
func TestPermanentFailureIsDeadLettered(t *testing.T) {
	t.Parallel()
	pgtest.ForEachMajor(t, func(t *testing.T) {
		b := newBundle(t, pgtest.Shared(t), nil)
		ids := e2e.Insert(t, b.pool, 20, 1, func(i int) int64 { return int64(i % 3) })
		bad := ids[7]
		b.recv.Respond = func(dl *e2e.Delivery) int {
			if dl.IDs[0] == bad {
				return http.StatusBadRequest
			}
			return http.StatusOK
		}
		d := e2e.StartDaemon(t, b.env)
		more := e2e.Insert(t, b.pool, 20, 1, func(i int) int64 { return int64(i % 3) })
		want := append(append([]int64(nil), ids...), more...)
		var good []int64
		for _, id := range want {
			if id != bad {
				good = append(good, id)
			}
		}
		b.recv.WaitAccepted(t, good, time.Minute)
		b.waitProcessed(t, int64(len(good)), time.Minute)
		var (
			status   int
			reason   string
			attempts int
		)
		e2e.WaitFor(t, 30*time.Second, func() bool {
			return b.pool.QueryRow(context.Background(), `SELECT last_status, last_error, attempts FROM outboxd_dead_letter WHERE event_id = $1`, bad).
				Scan(&status, &reason, &attempts) == nil
		}, func() string { return "no dead letter" })
		require.Equal(t, 400, status)
		require.Equal(t, 1, attempts, "a 400 is not retried")
		var processed bool
		var rowAttempts int
		require.NoError(t, b.pool.QueryRow(context.Background(), `SELECT is_processed, delivery_attempts FROM domain_event WHERE id = $1`, bad).Scan(&processed, &rowAttempts))
		require.False(t, processed, "a dead-lettered event was not acknowledged")
		require.Equal(t, 1, rowAttempts)
		require.Equal(t, 0, d.Stop(30*time.Second))
	})
}

// Test 2: kill -9 at five random moments while inserts continue, then a clean
// finish: nothing lost; duplicates only for events delivered after the last
// checkpoint, with the same webhook-id.
func TestKill9WhileInserting(t *testing.T) {
	t.Parallel()
	pgtest.ForEachMajor(t, func(t *testing.T) {
		b := newBundle(t, pgtest.Shared(t), nil)
		// The inserter stops between transactions, never in the middle of a
		// commit: an id whose commit outcome is unknown would be miscounted.
		var stop atomic.Bool
		defer stop.Store(true)
		ctx := context.Background()
		var (
			mu  sync.Mutex
			ids []int64
		)
		// The slot exists before the inserts start, so the kills hit streaming.
		first := e2e.StartDaemon(t, b.env)
		e2e.WaitFor(t, time.Minute, func() bool { return strings.Contains(first.Log(), `"streaming"`) }, func() string { return "not streaming" })
		insertDone := make(chan error, 1)
		go func() {
			rng := rand.New(rand.NewPCG(7, 7))
			for n := 0; !stop.Load() && n < 20000; {
				got, err := e2e.InsertErr(ctx, b.pool, 1, 1+rng.IntN(20), func(i int) int64 { return int64(i % 4) })
				mu.Lock()
				ids = append(ids, got...)
				n = len(ids)
				mu.Unlock()
				if err != nil {
					insertDone <- err
					return
				}
			}
			insertDone <- nil
		}()
		rng := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 1))
		processedAtKill := map[int64]time.Time{} // id -> the kill after which it was seen processed
		for k := range 5 {
			d := first
			if k > 0 {
				d = e2e.StartDaemon(t, b.env)
			}
			// A random moment: after a random number of further deliveries.
			target := b.recv.Len() + 500 + rng.IntN(3000)
			e2e.WaitProgress(t, time.Minute, func() (bool, int64) {
				n := b.recv.Len()
				return n >= target, int64(n)
			}, func() string { return "deliveries stalled" })
			d.Kill()
			killedAt := time.Now()
			rs, err := b.pool.Query(context.Background(), `SELECT id FROM domain_event WHERE is_processed`)
			require.NoError(t, err)
			for rs.Next() {
				var id int64
				require.NoError(t, rs.Scan(&id))
				if _, ok := processedAtKill[id]; !ok {
					processedAtKill[id] = killedAt
				}
			}
			require.NoError(t, rs.Err())
			t.Logf("kill %d: %d deliveries so far, %d rows processed", k+1, b.recv.Len(), len(processedAtKill))
		}
		stop.Store(true)
		require.NoError(t, <-insertDone)
		d := e2e.StartDaemon(t, b.env)
		mu.Lock()
		all := append([]int64(nil), ids...)
		mu.Unlock()
		b.recv.WaitAccepted(t, all, 2*time.Minute)
		b.waitProcessed(t, int64(len(all)), time.Minute)
		c := b.recv.Count(all)
		t.Logf("kill -9 x5: %s", c)
		require.Zero(t, c.Lost)
		require.Zero(t, c.Unexpected)
		require.Zero(t, c.BadSignatures)

		// A duplicate is only allowed for an event that was not yet marked
		// processed when outboxd was killed (it was past the checkpoint): a row
		// marked processed is never delivered again. Every copy carries the
		// event's message id as webhook-id, the same on every copy.
		ns := e2e.Namespace(t, b.pool)
		firstID := map[int64]string{}
		for _, dl := range b.recv.Deliveries() {
			if dl.Status/100 != 2 {
				continue
			}
			require.Equal(t, e2e.WebhookIDOf(ns, dl), dl.WebhookID)
			if w, ok := firstID[dl.IDs[0]]; ok {
				require.Equal(t, w, dl.WebhookID, "a redelivery of event %d carries another webhook-id", dl.IDs[0])
			}
			firstID[dl.IDs[0]] = dl.WebhookID
			if at, ok := processedAtKill[dl.IDs[0]]; ok {
				require.True(t, dl.At.Before(at), "event %d was delivered again after it was marked processed", dl.IDs[0])
			}
		}
		require.Equal(t, 0, d.Stop(30*time.Second))
	})
}

// Test 3: Postgres stopped with -m immediate and restarted while streaming:
// nothing lost, and outboxd recovers without being restarted.
func TestPostgresImmediateRestart(t *testing.T) {
	t.Parallel()
	pgtest.ForEachMajor(t, func(t *testing.T) {
		srv := pgtest.New(t, nil)
		b := newBundle(t, srv, nil)
		d := e2e.StartDaemon(t, b.env)
		first := e2e.Insert(t, b.pool, 100, 5, func(i int) int64 { return int64(i % 3) })
		e2e.WaitFor(t, time.Minute, func() bool { return len(b.recv.Accepted()) >= 200 }, func() string { return "no deliveries" })
		srv.Restart(t, "immediate")
		require.False(t, d.Exited(), "outboxd must survive a Postgres restart")
		b.pool.Reset()
		second := e2e.Insert(t, b.pool, 100, 5, func(i int) int64 { return int64(i % 3) })
		all := append(append([]int64(nil), first...), second...)
		b.recv.WaitAccepted(t, all, 2*time.Minute)
		b.waitProcessed(t, int64(len(all)), 2*time.Minute)
		c := b.recv.Count(all)
		t.Logf("postgres immediate restart: %s", c)
		require.Zero(t, c.Lost)
		require.Zero(t, c.Unexpected)
		require.False(t, d.Exited())
		require.Equal(t, 0, d.Stop(30*time.Second))
	})
}

// Test 7: the sink stalls for longer than wal_sender_timeout: the replication
// connection is not dropped, and nothing is lost.
func TestSinkStallLongerThanWalSenderTimeout(t *testing.T) {
	t.Parallel()
	pgtest.ForEachMajor(t, func(t *testing.T) {
		srv := pgtest.New(t, map[string]string{"wal_sender_timeout": "2s"})
		b := newBundle(t, srv, map[string]string{"OUTBOXD_WEBHOOK_TIMEOUT": "30s", "OUTBOXD_MAX_IN_FLIGHT": "50"})
		release := make(chan struct{})
		var stalled sync.Once
		stallStarted := make(chan struct{})
		b.recv.Respond = func(*e2e.Delivery) int {
			stalled.Do(func() {
				close(stallStarted)
				<-release
			})
			return http.StatusOK
		}
		d := e2e.StartDaemon(t, b.env)
		ids := e2e.Insert(t, b.pool, 1, 1, one)
		<-stallStarted
		var pid int
		slot := b.env["OUTBOXD_SLOT"]
		require.NoError(t, b.pool.QueryRow(context.Background(), `SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1`, slot).Scan(&pid))
		// While the receiver hangs, more rows arrive and fill the pipeline.
		ids = append(ids, e2e.Insert(t, b.pool, 200, 5, one)...)
		// Stall for three wal_sender_timeouts, measured by the server's clock.
		var start time.Time
		require.NoError(t, b.pool.QueryRow(context.Background(), `SELECT now()`).Scan(&start))
		e2e.WaitFor(t, time.Minute, func() bool {
			var now time.Time
			require.NoError(t, b.pool.QueryRow(context.Background(), `SELECT clock_timestamp()`).Scan(&now))
			return now.Sub(start) > 6*time.Second
		}, func() string { return "clock" })
		var pidAfter int
		require.NoError(t, b.pool.QueryRow(context.Background(), `SELECT coalesce(active_pid, 0) FROM pg_replication_slots WHERE slot_name = $1`, slot).Scan(&pidAfter))
		require.Equal(t, pid, pidAfter, "the walsender must be the same process: no disconnect")
		close(release)
		b.recv.WaitAccepted(t, ids, time.Minute)
		b.waitProcessed(t, int64(len(ids)), time.Minute)
		require.NotContains(t, d.Log(), "reconnecting")
		require.Equal(t, 0, d.Stop(30*time.Second))
	})
}

// SIGTERM drains, checkpoints and sends a final status: the slot confirms
// everything, and a restart delivers nothing again.
func TestSigtermDrainsAndRestartsWithoutDuplicates(t *testing.T) {
	t.Parallel()
	pgtest.ForEachMajor(t, func(t *testing.T) {
		b := newBundle(t, pgtest.Shared(t), nil)
		d := e2e.StartDaemon(t, b.env)
		ids := e2e.Insert(t, b.pool, 30, 20, func(i int) int64 { return int64(i % 6) })
		b.recv.WaitAccepted(t, ids, time.Minute)
		require.Equal(t, 0, d.Stop(30*time.Second))
		rows, _ := e2e.Processed(t, b.pool)
		require.EqualValues(t, len(ids), rows, "everything delivered is marked at stop")
		require.Contains(t, d.Log(), "final standby status sent")

		d2 := e2e.StartDaemon(t, b.env)
		more := e2e.Insert(t, b.pool, 5, 1, one)
		all := append(append([]int64(nil), ids...), more...)
		b.recv.WaitAccepted(t, all, time.Minute)
		c := b.recv.Count(all)
		t.Logf("sigterm + restart: %s", c)
		require.Zero(t, c.Duplicates)
		require.Equal(t, 0, d2.Stop(30*time.Second))
	})
}

// Bad configuration exits 2 and names the variable; secrets are not echoed.
func TestBadConfigurationExits2NamingTheVariable(t *testing.T) {
	t.Parallel()
	base := map[string]string{
		"OUTBOXD_DATABASE_URL": "postgres://u:hunter2@127.0.0.1:1/db",
		"OUTBOXD_WEBHOOK_URL":  "https://example.com/hook",
	}
	cases := []struct {
		name, key, value, want string
	}{
		{"missing database", "OUTBOXD_DATABASE_URL", "", "OUTBOXD_DATABASE_URL"},
		{"bad duration", "OUTBOXD_WEBHOOK_TIMEOUT", "soon", "OUTBOXD_WEBHOOK_TIMEOUT"},
		{"bad ordering", "OUTBOXD_ORDERING_KEY", "tenant", "OUTBOXD_ORDERING_KEY"},
		{"bad secret", "OUTBOXD_WEBHOOK_SECRET", "whsec_!!notbase64hunter3", "OUTBOXD_WEBHOOK_SECRET"},
		{"bad slot", "OUTBOXD_SLOT", "Bad-Slot", "OUTBOXD_SLOT"},
		{"bad int", "OUTBOXD_WEBHOOK_CONCURRENCY", "many", "OUTBOXD_WEBHOOK_CONCURRENCY"},
		{"zero batch", "OUTBOXD_WEBHOOK_BATCH_SIZE", "0", "OUTBOXD_WEBHOOK_BATCH_SIZE"},
		{"bad log level", "OUTBOXD_LOG_LEVEL", "loud", "OUTBOXD_LOG_LEVEL"},
		{"missing webhook", "OUTBOXD_WEBHOOK_URL", "", "OUTBOXD_WEBHOOK_URL"},
		{"bad url", "OUTBOXD_DATABASE_URL", "postgres://u:hunter2@[::1", "OUTBOXD_DATABASE_URL"},
		{"zero backoff", "OUTBOXD_WEBHOOK_BACKOFF_MAX", "0s", "OUTBOXD_WEBHOOK_BACKOFF_MAX"},
		{"bad failover", "OUTBOXD_SLOT_FAILOVER", "sometimes", "OUTBOXD_SLOT_FAILOVER"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			var environ []string
			for k, v := range base {
				if k != tc.key {
					environ = append(environ, k+"="+v)
				}
			}
			if tc.value != "" {
				environ = append(environ, tc.key+"="+tc.value)
			}
			var stdout, stderr strings.Builder
			err := run(context.Background(), []string{"run"}, nil, environ, &stdout, &stderr)
			require.Error(t, err)
			code := exitCode(err, &stderr)
			require.Equal(t, 2, code, stderr.String())
			require.Contains(t, stderr.String(), tc.want)
			require.NotContains(t, stderr.String(), "hunter2")
			require.NotContains(t, stderr.String(), "hunter3")
		})
	}

	// A maximum backoff below the default first backoff is a valid setting
	// (the first backoff follows it), not an error blamed on the URL.
	var stdout, stderr strings.Builder
	environ := []string{"OUTBOXD_DATABASE_URL=postgres://u:hunter2@127.0.0.1:1/db?connect_timeout=2", "OUTBOXD_WEBHOOK_URL=https://example.com/hook",
		"OUTBOXD_WEBHOOK_SECRET=" + e2e.Secret, "OUTBOXD_WEBHOOK_BACKOFF_MAX=100ms", "OUTBOXD_HTTP_ADDR="}
	err := run(context.Background(), []string{"run"}, nil, environ, &stdout, &stderr)
	require.Error(t, err)
	require.Equal(t, 1, exitCode(err, &stderr), stderr.String())
	require.NotContains(t, stderr.String(), "OUTBOXD_WEBHOOK_URL", "the database is what fails here")
}

func TestUnknownCommandIsUsageError(t *testing.T) {
	t.Parallel()
	var out strings.Builder
	err := run(context.Background(), []string{"frobnicate"}, nil, nil, &out, &out)
	require.Equal(t, 2, exitCode(err, &out))
	err = run(context.Background(), []string{"run", "--no-such-flag"}, nil, nil, &out, &out)
	require.Equal(t, 2, exitCode(err, &out))
}

func TestVersion(t *testing.T) {
	t.Parallel()
	var out strings.Builder
	require.NoError(t, run(context.Background(), []string{"version"}, nil, nil, &out, &out))
	require.Contains(t, out.String(), "outboxd ")
}
