package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/rs/zerolog"
	"github.com/stretchr/testify/require"

	"github.com/outboxd/outboxd/internal/e2e"
	"github.com/outboxd/outboxd/internal/pgtest"
	"github.com/outboxd/outboxd/metrics"
)

// Tests of the daemon's operations side (issue 4): metrics and health
// endpoints after a run, high availability with kill -9 of the leader, an idle
// outbox on a busy server (G7), slot loss, and trace context propagation.

// watched is a daemon whose HTTP address (OUTBOXD_HTTP_ADDR=127.0.0.1:0) was
// read from its log.
type watched struct {
	*e2e.Daemon
	addr string
}

var httpAddrRE = regexp.MustCompile(`"addr":"([^"]+)"`)

// startWatched starts a daemon and waits until it serves HTTP.
func startWatched(t *testing.T, env map[string]string) *watched {
	t.Helper()
	d := e2e.StartDaemon(t, env)
	w := &watched{Daemon: d}
	e2e.WaitFor(t, 30*time.Second, func() bool {
		for line := range strings.SplitSeq(d.Log(), "\n") {
			if strings.Contains(line, "serving /metrics") {
				if m := httpAddrRE.FindStringSubmatch(line); m != nil {
					w.addr = m[1]
					return true
				}
			}
		}
		return d.Exited()
	}, func() string { return "no HTTP address in the log" })
	require.NotEmpty(t, w.addr, "daemon exited before serving HTTP:\n%s", d.Log())
	return w
}

var httpClient = &http.Client{Timeout: 5 * time.Second}

// get fetches path and returns the status and body.
func (w *watched) get(path string) (int, string, error) {
	resp, err := httpClient.Get("http://" + w.addr + path)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), err
}

// metric returns the value of the series whose name and labels start the line
// (e.g. `outboxd_leader` or `outboxd_events_delivered_total{sink="webhook"}`).
func (w *watched) metric(series string) (float64, error) {
	code, body, err := w.get("/metrics")
	if err != nil {
		return 0, err
	}
	if code != http.StatusOK {
		return 0, fmt.Errorf("/metrics answered %d", code)
	}
	return parseMetric(body, series)
}

func parseMetric(body, series string) (float64, error) {
	sc := bufio.NewScanner(strings.NewReader(body))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if rest, ok := strings.CutPrefix(line, series); ok && strings.HasPrefix(rest, " ") {
			f := strings.Fields(rest)
			return strconv.ParseFloat(f[0], 64)
		}
	}
	return 0, fmt.Errorf("no series %s", series)
}

func (w *watched) mustMetric(t *testing.T, series string) float64 {
	t.Helper()
	v, err := w.metric(series)
	require.NoError(t, err)
	return v
}

// leader reports whether the daemon's leader gauge is 1; false when it cannot
// be scraped (dead).
func (w *watched) leader() bool {
	if w.Exited() {
		return false
	}
	v, err := w.metric("outboxd_leader")
	return err == nil && v == 1
}

// After a run, the scrape has the documented series with the right values,
// and the health endpoints answer for the leader.
func TestMetricsAndHealthAfterARun(t *testing.T) {
	t.Parallel()
	b := newBundle(t, pgtest.Shared(t), map[string]string{
		"OUTBOXD_SLOT_POLL_INTERVAL":    "200ms",
		"OUTBOXD_BACKLOG_POLL_INTERVAL": "300ms",
	})
	// Event 3 is refused for good (dead-lettered); every fifth request is
	// answered 503 once.
	var mu sync.Mutex
	seen := map[string]bool{}
	b.recv.Respond = func(d *e2e.Delivery) int {
		mu.Lock()
		defer mu.Unlock()
		if len(d.IDs) == 1 && d.IDs[0]%5 == 0 && !seen[d.WebhookID] {
			seen[d.WebhookID] = true
			return http.StatusServiceUnavailable
		}
		if len(d.IDs) == 1 && d.IDs[0] == 3 {
			return http.StatusUnprocessableEntity
		}
		return http.StatusOK
	}
	w := startWatched(t, b.env)
	ids := e2e.Insert(t, b.pool, 10, 5, one)
	require.Equal(t, int64(3), ids[2])
	want := append(append([]int64(nil), ids[:2]...), ids[3:]...)
	b.recv.WaitAccepted(t, want, time.Minute)
	b.waitProcessed(t, int64(len(want)), time.Minute)

	// The polled gauges catch up within a few polls.
	e2e.WaitFor(t, 30*time.Second, func() bool {
		v, err := w.metric("outboxd_backlog_rows")
		return err == nil && v == 0
	}, func() string { return "backlog_rows not 0 (the dead-lettered row does not count)" })
	e2e.WaitFor(t, 30*time.Second, func() bool {
		v, err := w.metric("outboxd_slot_active")
		return err == nil && v == 1
	}, func() string { return "slot_active not 1" })

	_, scrape, err := w.get("/metrics")
	require.NoError(t, err)
	val := func(series string) float64 {
		t.Helper()
		v, err := parseMetric(scrape, series)
		require.NoError(t, err, series)
		return v
	}
	require.EqualValues(t, 50, val("outboxd_events_received_total"))
	require.EqualValues(t, 49, val(`outboxd_events_delivered_total{sink="webhook"}`))
	require.EqualValues(t, 1, val(`outboxd_events_failed_total{reason="permanent",sink="webhook"}`))
	require.EqualValues(t, 49, val(`outboxd_delivery_attempts_total{sink="webhook",status_class="2xx"}`))
	require.EqualValues(t, 1, val(`outboxd_delivery_attempts_total{sink="webhook",status_class="4xx"}`))
	require.EqualValues(t, 10, val(`outboxd_delivery_attempts_total{sink="webhook",status_class="retried"}`),
		"ten 503s answered before a 2xx")
	require.EqualValues(t, 50, val(`outboxd_delivery_duration_seconds_count{sink="webhook"}`))
	require.EqualValues(t, 49, val(`outboxd_end_to_end_latency_seconds_count{sink="webhook"}`))
	require.EqualValues(t, 1, val("outboxd_leader"))
	require.InDelta(t, float64(time.Now().Unix()), val("outboxd_last_delivered_event_timestamp_seconds"), 120)
	require.Greater(t, val("outboxd_checkpoint_lsn"), 0.0)
	require.GreaterOrEqual(t, val("outboxd_received_lsn"), val("outboxd_checkpoint_lsn"))
	require.EqualValues(t, 1, val("outboxd_slot_exists"))
	require.GreaterOrEqual(t, val("outboxd_replication_lag_bytes"), 0.0)
	require.Greater(t, val("outboxd_retained_wal_bytes"), 0.0)
	require.Contains(t, scrape, `outboxd_build_info{goversion="go`)
	require.Contains(t, scrape, "go_goroutines ")
	require.Contains(t, scrape, "process_resident_memory_bytes ")
	require.NotContains(t, scrape, e2e.Secret, "no secret in metrics")
	require.NotContains(t, scrape, "organization", "no tenant labels")

	// The checkpoint gauge is the slot's confirmed position (the LSN number).
	e2e.WaitFor(t, 30*time.Second, func() bool {
		v, err := w.metric("outboxd_checkpoint_lsn")
		return err == nil && pglogrepl.LSN(uint64(v)) == b.confirmedFlush(t)
	}, func() string { return "checkpoint_lsn gauge differs from confirmed_flush_lsn" })

	for path, want := range map[string]int{"/healthz": 200, "/readyz": 200, "/health/replication": 200} {
		code, body, err := w.get(path)
		require.NoError(t, err)
		require.Equal(t, want, code, "%s: %s", path, body)
	}
	_, body, err := w.get("/readyz")
	require.NoError(t, err)
	require.Contains(t, body, `"role": "leader"`)
	require.Equal(t, 0, w.Stop(30*time.Second))
}

// Without OUTBOXD_HTTP_ADDR nothing listens and nothing polls.
func TestNoHTTPAddrMeansNoMetrics(t *testing.T) {
	t.Parallel()
	b := newBundle(t, pgtest.Shared(t), map[string]string{"OUTBOXD_HTTP_ADDR": ""})
	d := e2e.StartDaemon(t, b.env)
	ids := e2e.Insert(t, b.pool, 3, 1, one)
	b.recv.WaitAccepted(t, ids, time.Minute)
	require.NotContains(t, d.Log(), "serving /metrics")
	var monitors int
	require.NoError(t, b.pool.QueryRow(context.Background(),
		`SELECT count(*) FROM pg_stat_activity WHERE application_name = 'outboxd-monitor' AND datname = current_database()`).Scan(&monitors))
	require.Zero(t, monitors, "no monitor pool when metrics are off")
	require.Equal(t, 0, d.Stop(30*time.Second))
}

// insertLog inserts one row per transaction at a steady pace and records when
// each id committed.
type insertLog struct {
	mu  sync.Mutex
	ids []int64
	at  []time.Time
}

// run inserts until stop is closed. An insert is never cancelled half-way:
// it could commit without its id being recorded.
func (l *insertLog) run(stop <-chan struct{}, pool *pgxpool.Pool, every time.Duration) error {
	tick := time.NewTicker(every)
	defer tick.Stop()
	for {
		select {
		case <-stop:
			return nil
		case <-tick.C:
		}
		got, err := e2e.InsertErr(context.Background(), pool, 1, 1, func(i int) int64 { return int64(i % 3) })
		if err != nil {
			return err
		}
		now := time.Now()
		l.mu.Lock()
		for _, id := range got {
			l.ids = append(l.ids, id)
			l.at = append(l.at, now)
		}
		l.mu.Unlock()
	}
}

// after returns the ids committed after t.
func (l *insertLog) after(t time.Time) map[int64]bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := map[int64]bool{}
	for i, at := range l.at {
		if at.After(t) {
			out[l.ids[i]] = true
		}
	}
	return out
}

func (l *insertLog) all() []int64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]int64(nil), l.ids...)
}

// High availability: n instances on one slot, started together; exactly one
// streams. kill -9 of the leader (n-1 times) hands the slot to a standby:
// nothing is lost, two instances never stream at once, and the takeover time
// (kill → a standby's leader gauge at 1, and kill → first delivery of an event
// committed after the kill) is printed.
func TestHighAvailabilityKill9Takeover(t *testing.T) {
	t.Parallel()
	for _, n := range []int{2, 3} {
		t.Run(fmt.Sprintf("instances=%d", n), func(t *testing.T) {
			t.Parallel()
			b := newBundle(t, pgtest.Shared(t), nil)
			insts := make([]*watched, n)
			var wg sync.WaitGroup
			for i := range insts {
				wg.Add(1)
				go func() {
					defer wg.Done()
					insts[i] = startWatched(t, b.env)
				}()
			}
			wg.Wait()
			findLeader := func() *watched {
				var found *watched
				for _, w := range insts {
					if w.leader() {
						require.Nil(t, found, "two leaders")
						found = w
					}
				}
				return found
			}
			e2e.WaitFor(t, time.Minute, func() bool { return findLeader() != nil }, func() string { return "no leader" })
			for _, w := range insts {
				code, body, err := w.get("/readyz")
				require.NoError(t, err)
				require.Equal(t, http.StatusOK, code, "leader and standbys are all ready: %s", body)
			}

			// Sample the leader gauges of the live instances all along.
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			var (
				sampleMu        sync.Mutex
				samples, maxSum int
			)
			sampled := make(chan struct{})
			go func() {
				defer close(sampled)
				tick := time.NewTicker(25 * time.Millisecond)
				defer tick.Stop()
				for ctx.Err() == nil {
					sum := 0
					for _, w := range insts {
						if w.leader() {
							sum++
						}
					}
					sampleMu.Lock()
					samples++
					maxSum = max(maxSum, sum)
					sampleMu.Unlock()
					select {
					case <-ctx.Done():
					case <-tick.C:
					}
				}
			}()
			var ins insertLog
			insertErr := make(chan error, 1)
			stopInserting := make(chan struct{})
			go func() { insertErr <- ins.run(stopInserting, b.pool, 10*time.Millisecond) }()

			for k := range n - 1 {
				before := len(b.recv.Accepted())
				e2e.WaitFor(t, time.Minute, func() bool { return len(b.recv.Accepted()) >= before+50 },
					func() string { return "deliveries stalled before the kill" })
				old := findLeader()
				require.NotNil(t, old)
				old.Kill()
				killedAt := time.Now()
				var next *watched
				e2e.WaitFor(t, time.Minute, func() bool { next = findLeader(); return next != nil },
					func() string { return "no standby took over" })
				gaugeTakeover := time.Since(killedAt)
				require.NotSame(t, old, next)
				fresh := ins.after(killedAt)
				var firstAt time.Time
				e2e.WaitFor(t, time.Minute, func() bool {
					for _, d := range b.recv.Deliveries() {
						if d.Status/100 == 2 && len(d.IDs) > 0 && fresh[d.IDs[0]] {
							firstAt = d.At
							return true
						}
					}
					fresh = ins.after(killedAt)
					return false
				}, func() string { return "no event committed after the kill was delivered" })
				t.Logf("takeover %d of %d instances: kill -9 -> standby leader gauge 1 in %s; kill -9 -> first delivery of an event committed after the kill in %s",
					k+1, n, gaugeTakeover.Round(time.Millisecond), firstAt.Sub(killedAt).Round(time.Millisecond))
			}
			close(stopInserting)
			require.NoError(t, <-insertErr)
			cancel()
			<-sampled
			all := ins.all()
			b.recv.WaitAccepted(t, all, 2*time.Minute)
			c := b.recv.Count(all)
			sampleMu.Lock()
			t.Logf("HA with %d instances: %s; leader gauge sum max %d over %d samples", n, c, maxSum, samples)
			require.LessOrEqual(t, maxSum, 1, "two instances streamed at once")
			sampleMu.Unlock()
			require.Zero(t, c.Lost)
			require.Zero(t, c.Unexpected)
			require.Zero(t, c.BadSignatures)
			alive := 0
			for _, w := range insts {
				if !w.Exited() {
					alive++
				}
			}
			require.Equal(t, 1, alive, "only the killed instances are gone")
			last := findLeader()
			require.NotNil(t, last)
			require.Equal(t, 0, last.Stop(30*time.Second))
		})
	}
}

// slotState reads the slot's retained WAL (pg_current_wal_lsn - restart_lsn),
// confirmed_flush_lsn and wal_status.
func slotState(t *testing.T, pool *pgxpool.Pool, slot string) (retained int64, confirmed pglogrepl.LSN, walStatus string) {
	t.Helper()
	require.NoError(t, pool.QueryRow(context.Background(), `SELECT coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn), 0)::bigint,
  coalesce(confirmed_flush_lsn, '0/0'), coalesce(wal_status, '') FROM pg_replication_slots WHERE slot_name = $1`, slot).
		Scan(&retained, &confirmed, &walStatus))
	return retained, confirmed, walStatus
}

// writeWAL writes about mb MiB of WAL into a ballast table of the database of
// pool, in transactions of about 16 MiB. Rows are kept under the TOAST
// threshold, so nothing is compressed.
func writeWAL(t *testing.T, pool *pgxpool.Pool, table string, mb int) {
	t.Helper()
	ctx := context.Background()
	_, err := pool.Exec(ctx, `CREATE TABLE IF NOT EXISTS `+table+` (id int, pad text)`)
	require.NoError(t, err)
	const rowsPer16MB = 16 << 20 / 1850
	for range (mb + 15) / 16 {
		_, err := pool.Exec(ctx, `INSERT INTO `+table+` SELECT g, repeat(chr(65 + g % 26), 1800) FROM generate_series(1, $1) g`, rowsPer16MB)
		require.NoError(t, err)
	}
}

// G7: with the daemon running and no outbox inserts, ≥ 200 MB of WAL written
// in another table of the same database and in another database: the slot
// still advances and its retained WAL settles below 64 MiB, while a slot that
// nobody reads retains it all. With and without the heartbeat.
func TestIdleOutboxOnBusyServerAdvances(t *testing.T) {
	t.Parallel()
	srv := pgtest.New(t, map[string]string{"max_wal_size": "4GB"})
	for _, hb := range []string{"", "1s"} {
		name := "keepalive"
		if hb != "" {
			name = "heartbeat"
		}
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			extra := map[string]string{}
			if hb != "" {
				extra["OUTBOXD_HEARTBEAT_INTERVAL"] = hb
			}
			b := newBundle(t, srv, extra)
			slot := b.env["OUTBOXD_SLOT"]
			d := e2e.StartDaemon(t, b.env)
			ids := e2e.Insert(t, b.pool, 5, 1, one)
			b.recv.WaitAccepted(t, ids, time.Minute)
			other := e2e.Pool(t, srv.NewDatabase(t))

			ctx := context.Background()
			control := slot + "_ctl"
			_, err := b.pool.Exec(ctx, `SELECT pg_create_logical_replication_slot($1, 'pgoutput')`, control)
			require.NoError(t, err)
			t.Cleanup(func() {
				_, _ = b.pool.Exec(context.Background(), `SELECT pg_drop_replication_slot($1)`, control)
			})
			start := b.currentLSN(t)
			_, confirmed0, _ := slotState(t, b.pool, slot)

			// Sample the retained WAL while writing.
			sctx, stopSampling := context.WithCancel(ctx)
			var peak, peakLag int64
			sampled := make(chan struct{})
			go func() {
				defer close(sampled)
				tick := time.NewTicker(100 * time.Millisecond)
				defer tick.Stop()
				for sctx.Err() == nil {
					var r, l int64
					if err := b.pool.QueryRow(sctx, `SELECT coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn), 0)::bigint,
  coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn), 0)::bigint
FROM pg_replication_slots WHERE slot_name = $1`, slot).Scan(&r, &l); err == nil {
						peak, peakLag = max(peak, r), max(peakLag, l)
					}
					select {
					case <-sctx.Done():
					case <-tick.C:
					}
				}
			}()
			began := time.Now()
			writeWAL(t, b.pool, "ballast", 200)
			writeWAL(t, other, "ballast", 48)
			end := b.currentLSN(t)
			wrote := int64(end - start)
			wroteFor := time.Since(began)
			require.GreaterOrEqual(t, wrote, int64(248<<20), "the test must write ≥ 200 MB of WAL")

			// The slot confirms past the written WAL, and its restart_lsn
			// follows at the next xl_running_xacts (the background writer
			// logs one every 15 s on a busy server).
			var retained int64
			var confirmed pglogrepl.LSN
			e2e.WaitFor(t, 90*time.Second, func() bool {
				retained, confirmed, _ = slotState(t, b.pool, slot)
				return confirmed >= end && retained < 64<<20
			}, func() string {
				return fmt.Sprintf("slot did not settle: retained %d bytes, confirmed_flush_lsn %s, WAL end %s", retained, confirmed, end)
			})
			settled := time.Since(began)
			stopSampling()
			<-sampled
			ctlRetained, _, _ := slotState(t, b.pool, control)
			t.Logf("idle outbox (%s): wrote 200 MiB in another table and 48 MiB in another database in %s (server WAL +%d MiB, including the other subtest's writes when both run); "+
				"outboxd slot: peak retained %.1f MiB, peak lag %.1f MiB, settled at retained %.1f MiB after %s, confirmed_flush_lsn %s -> %s; a slot nobody reads retains %.1f MiB",
				name, wroteFor.Round(time.Millisecond), wrote>>20, float64(peak)/(1<<20), float64(peakLag)/(1<<20), float64(retained)/(1<<20),
				settled.Round(time.Millisecond), confirmed0, confirmed, float64(ctlRetained)/(1<<20))
			require.Less(t, retained, int64(64<<20))
			require.Greater(t, confirmed, confirmed0)
			require.GreaterOrEqual(t, ctlRetained, wrote, "a slot nobody reads pins everything: the measurement means something")

			rows, _ := e2e.Processed(t, b.pool)
			require.EqualValues(t, 5, rows, "no event lost or invented by the idle advance")
			if hb != "" {
				require.Contains(t, d.Log(), "heartbeat received", "the heartbeat message came back through the slot")
			} else {
				require.NotContains(t, d.Log(), "heartbeat")
			}
			// Events after the idle stretch are delivered as usual.
			more := e2e.Insert(t, b.pool, 3, 1, one)
			b.recv.WaitAccepted(t, more, time.Minute)
			require.Equal(t, 0, d.Stop(30*time.Second))
		})
	}
}

// runOnce streams a few events so that a checkpoint exists, then stops; it
// returns their ids.
func runOnce(t *testing.T, b *bundle) []int64 {
	t.Helper()
	d := e2e.StartDaemon(t, b.env)
	ids := e2e.Insert(t, b.pool, 5, 2, one)
	b.recv.WaitAccepted(t, ids, time.Minute)
	b.waitProcessed(t, int64(len(ids)), time.Minute)
	require.Equal(t, 0, d.Stop(30*time.Second))
	return ids
}

// requireRefusesOnce starts the daemon on a lost slot without
// OUTBOXD_SLOT_RECREATE: it exits 1, once, naming the repair.
func requireRefusesOnce(t *testing.T, env map[string]string, what string) {
	t.Helper()
	d := e2e.StartDaemon(t, env)
	code := d.Wait(time.Minute)
	log := d.Log()
	require.Equal(t, 1, code, log)
	require.Contains(t, log, what)
	require.Contains(t, log, "outboxd slot reset")
	require.Contains(t, log, "OUTBOXD_SLOT_RECREATE=true")
	require.Equal(t, 1, strings.Count(log, "cannot be reconciled"), "one attempt, no restart loop:\n%s", log)
	require.Equal(t, 1, strings.Count(log, "outboxd starting"))
}

// Slot dropped by an operator while outboxd was stopped, rows inserted
// meanwhile: without OUTBOXD_SLOT_RECREATE outboxd exits 1 naming the repair;
// with it, the slot is recreated and every unprocessed row is delivered.
func TestSlotDroppedWhileStopped(t *testing.T) {
	t.Parallel()
	b := newBundle(t, pgtest.Shared(t), nil)
	first := runOnce(t, b)
	// The walsender of the stopped daemon lets go of the slot shortly after
	// the daemon exits; drop the slot then, as an operator would.
	e2e.WaitFor(t, 30*time.Second, func() bool {
		_, err := b.pool.Exec(context.Background(), `SELECT pg_drop_replication_slot($1)`, b.env["OUTBOXD_SLOT"])
		return err == nil
	}, func() string { return "slot not dropped" })
	missed := e2e.Insert(t, b.pool, 10, 3, func(i int) int64 { return int64(i % 2) })

	requireRefusesOnce(t, b.env, "is missing")

	env := e2e.Env(b.url, b.env["OUTBOXD_SLOT"], b.recv.URL, map[string]string{"OUTBOXD_SLOT_RECREATE": "true"})
	d := e2e.StartDaemon(t, env)
	b.recv.WaitAccepted(t, missed, time.Minute)
	later := e2e.Insert(t, b.pool, 5, 1, one)
	b.recv.WaitAccepted(t, later, time.Minute)
	b.waitProcessed(t, 10+int64(len(missed)+len(later)), time.Minute)
	c := b.recv.Count(append(append(append([]int64(nil), first...), missed...), later...))
	t.Logf("slot dropped while stopped, recreated: %s", c)
	require.Zero(t, c.Lost)
	require.Zero(t, c.Duplicates, "rows processed before the slot was dropped are not delivered again")
	require.Zero(t, c.Unexpected)
	require.Contains(t, d.Log(), "recreating slot")
	require.Equal(t, 0, d.Stop(30*time.Second))
}

// A slot invalidated by max_slot_wal_keep_size while outboxd was stopped
// (wal_status lost) is detected before streaming and reported (exit 1 and
// /health/replication 503); with OUTBOXD_SLOT_RECREATE it is recreated and
// every row inserted meanwhile is delivered.
func TestSlotInvalidatedByMaxSlotWalKeepSize(t *testing.T) {
	t.Parallel()
	srv := pgtest.New(t, map[string]string{
		"max_slot_wal_keep_size": "1MB", "wal_keep_size": "0", "max_wal_size": "64MB", "min_wal_size": "32MB",
	})
	b := newBundle(t, srv, nil)
	slot := b.env["OUTBOXD_SLOT"]
	first := runOnce(t, b)
	missed := e2e.Insert(t, b.pool, 10, 3, func(i int) int64 { return int64(i % 2) })

	ctx := context.Background()
	e2e.WaitFor(t, 2*time.Minute, func() bool {
		if _, _, st := slotState(t, b.pool, slot); st == "lost" {
			return true
		}
		writeWAL(t, b.pool, "ballast", 16)
		_, err := b.pool.Exec(ctx, `SELECT pg_switch_wal()`)
		require.NoError(t, err)
		_, err = b.pool.Exec(ctx, `CHECKPOINT`)
		require.NoError(t, err)
		return false
	}, func() string { return "slot not invalidated" })

	// The health endpoint reports it.
	mon, err := metrics.NewMonitor(metrics.MonitorConfig{DatabaseURL: b.url, Slot: slot, PollInterval: 50 * time.Millisecond, BacklogInterval: -1},
		nil, zerolog.Nop())
	require.NoError(t, err)
	mctx, stop := context.WithCancel(ctx)
	monDone := make(chan error, 1)
	go func() { monDone <- mon.Run(mctx) }()
	web := httptest.NewServer(metrics.Handler(metrics.New(metrics.Options{}), mon))
	var h metrics.Health
	e2e.WaitFor(t, 30*time.Second, func() bool {
		resp, err := http.Get(web.URL + "/health/replication")
		require.NoError(t, err)
		defer resp.Body.Close()
		require.NoError(t, json.NewDecoder(resp.Body).Decode(&h))
		return resp.StatusCode == http.StatusServiceUnavailable && h.WALStatus == "lost"
	}, func() string { return fmt.Sprintf("health: %+v", h) })
	require.Contains(t, strings.Join(h.Reasons, "; "), "outboxd slot reset")
	web.Close()
	stop()
	require.NoError(t, <-monDone)

	requireRefusesOnce(t, b.env, "invalidated (wal_status lost)")

	env := e2e.Env(b.url, slot, b.recv.URL, map[string]string{"OUTBOXD_SLOT_RECREATE": "true"})
	d := e2e.StartDaemon(t, env)
	b.recv.WaitAccepted(t, missed, time.Minute)
	later := e2e.Insert(t, b.pool, 5, 1, one)
	b.recv.WaitAccepted(t, later, time.Minute)
	b.waitProcessed(t, 10+int64(len(missed)+len(later)), time.Minute)
	_, _, st := slotState(t, b.pool, slot)
	require.Equal(t, "reserved", st)
	c := b.recv.Count(append(append(append([]int64(nil), first...), missed...), later...))
	t.Logf("slot invalidated by max_slot_wal_keep_size, recreated: %s", c)
	require.Zero(t, c.Lost)
	require.Zero(t, c.Duplicates, "rows processed before the invalidation are not delivered again")
	require.Zero(t, c.Unexpected)
	require.Equal(t, 0, d.Stop(30*time.Second))
}

// A W3C traceparent carried by the row (a traceparent column, or
// properties.traceparent) reaches the webhook as the traceparent header.
func TestTraceparentReachesWebhook(t *testing.T) {
	t.Parallel()
	var (
		mu     sync.Mutex
		traces = map[string]string{} // event id -> traceparent header
	)
	recv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var env struct {
			ID int64 `json:"id"`
		}
		body, _ := io.ReadAll(r.Body)
		_ = json.Unmarshal(body, &env)
		mu.Lock()
		traces[fmt.Sprint(env.ID)] = r.Header.Get("traceparent")
		mu.Unlock()
		w.WriteHeader(http.StatusNoContent)
	}))
	defer recv.Close()
	b := newBundle(t, pgtest.Shared(t), nil)
	ctx := context.Background()
	_, err := b.pool.Exec(ctx, `ALTER TABLE domain_event ADD COLUMN traceparent text`)
	require.NoError(t, err)
	env := e2e.Env(b.url, b.env["OUTBOXD_SLOT"], recv.URL, nil)
	d := e2e.StartDaemon(t, env)

	const (
		fromColumn = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
		fromProps  = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
	)
	var idCol, idProps, idNone int64
	require.NoError(t, b.pool.QueryRow(ctx, `INSERT INTO domain_event (event_name, traceparent) VALUES ('traced', $1) RETURNING id`, fromColumn).Scan(&idCol))
	require.NoError(t, b.pool.QueryRow(ctx, `INSERT INTO domain_event (event_name, properties) VALUES ('traced', jsonb_build_object('traceparent', $1::text)) RETURNING id`, fromProps).Scan(&idProps))
	require.NoError(t, b.pool.QueryRow(ctx, `INSERT INTO domain_event (event_name) VALUES ('untraced') RETURNING id`).Scan(&idNone))
	e2e.WaitFor(t, time.Minute, func() bool {
		mu.Lock()
		defer mu.Unlock()
		return len(traces) >= 3
	}, func() string { return "not all events delivered" })
	mu.Lock()
	defer mu.Unlock()
	require.Equal(t, fromColumn, traces[fmt.Sprint(idCol)], "traceparent column")
	require.Equal(t, fromProps, traces[fmt.Sprint(idProps)], "properties.traceparent")
	require.Empty(t, traces[fmt.Sprint(idNone)], "no trace context, no header")
	require.Equal(t, 0, d.Stop(30*time.Second))
}

// The operations settings are checked at start: exit 2 naming the variable.
func TestOpsConfigErrorsNameTheVariable(t *testing.T) {
	t.Parallel()
	base := map[string]string{
		"OUTBOXD_DATABASE_URL": "postgres://u:hunter2@127.0.0.1:1/db",
		"OUTBOXD_WEBHOOK_URL":  "https://example.com/hook",
		"OUTBOXD_HTTP_ADDR":    "127.0.0.1:0",
	}
	cases := []struct{ key, value string }{
		{"OUTBOXD_HEARTBEAT_INTERVAL", "-1s"},
		{"OUTBOXD_HEARTBEAT_INTERVAL", "often"},
		{"OUTBOXD_LAG_ALERT_BYTES", "lots"},
		{"OUTBOXD_LAG_ALERT_BYTES", "0"},
		{"OUTBOXD_SLOT_POLL_INTERVAL", "0s"},
		{"OUTBOXD_SLOT_STALL_TIMEOUT", "-5m"},
		{"OUTBOXD_BACKLOG_POLL_INTERVAL", "-30s"},
	}
	for _, tc := range cases {
		t.Run(tc.key+"="+tc.value, func(t *testing.T) {
			t.Parallel()
			environ := []string{tc.key + "=" + tc.value}
			for k, v := range base {
				environ = append(environ, k+"="+v)
			}
			var stdout, stderr strings.Builder
			err := run(context.Background(), []string{"run"}, nil, environ, &stdout, &stderr)
			require.Error(t, err)
			require.Equal(t, 2, exitCode(err, &stderr), stderr.String())
			require.Contains(t, stderr.String(), tc.key)
			require.NotContains(t, stderr.String(), "hunter2")
		})
	}
}

// On a first start the slot is created after the monitor's first poll:
// /health/replication must not keep reporting it missing until the next poll
// (FINDING-7 of the fault suite).
func TestReplicationHealthyRightAfterFirstStart(t *testing.T) {
	t.Parallel()
	b := newBundle(t, pgtest.Shared(t), map[string]string{"OUTBOXD_SLOT_POLL_INTERVAL": "1h"})
	w := startWatched(t, b.env)
	e2e.WaitFor(t, 30*time.Second, func() bool { return strings.Contains(w.Log(), `"streaming"`) }, func() string { return "not streaming" })
	e2e.WaitFor(t, 10*time.Second, func() bool {
		code, _, err := w.get("/health/replication")
		return err == nil && code == http.StatusOK
	}, func() string {
		_, body, err := w.get("/health/replication")
		return fmt.Sprintf("still unhealthy with a 1h poll interval: %s %v", body, err)
	})
	require.Equal(t, 0, w.Stop(30*time.Second))
}
