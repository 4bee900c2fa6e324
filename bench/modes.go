package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"
)

// bench holds what the measurements share.
type bench struct {
	cfg      config
	log      io.Writer
	pg       *pgEnv
	recv     *receiver
	bin      string
	floorBin string // bench/floor, built when a measurement runs it
	tmp      string
	props    string
	started  time.Time
	rows     []row
	failures []string
}

func newBench(ctx context.Context, cfg config, log io.Writer) (_ *bench, err error) {
	b := &bench{cfg: cfg, log: log, started: time.Now()}
	defer func() {
		if err != nil {
			b.close()
		}
	}()
	if b.tmp, err = os.MkdirTemp("", "outboxd-bench-"); err != nil {
		return nil, err
	}
	b.bin = cfg.OutboxdBin
	if b.bin == "" {
		b.logf("building cmd/outboxd")
		if b.bin, err = buildOutboxd(ctx, b.tmp); err != nil {
			return nil, err
		}
	}
	if cfg.has("floor") || cfg.has("latency") && slices.Contains(cfg.LatencySys, "floor") {
		b.logf("building bench/floor")
		if b.floorBin, err = buildCommand(ctx, b.tmp, "./bench/floor"); err != nil {
			return nil, err
		}
	}
	if cfg.DatabaseURL != "" {
		b.pg, err = externalPostgres(cfg.DatabaseURL, cfg.PGBinDir)
	} else {
		b.logf("starting postgres")
		b.pg, err = startPostgres(cfg.PGBinDir)
	}
	if err != nil {
		return nil, err
	}
	if b.recv, err = startReceiver(b.cfg.RecvDelay); err != nil {
		return nil, err
	}
	admin, err := b.pg.adminConn(ctx)
	if err != nil {
		return nil, err
	}
	defer admin.Close(context.WithoutCancel(ctx))
	if b.props, err = propertiesTemplate(ctx, admin, cfg.PropsSize); err != nil {
		return nil, err
	}
	return b, nil
}

func (b *bench) close() {
	if b.recv != nil {
		b.recv.close()
	}
	if b.pg != nil {
		b.pg.close()
	}
	if b.tmp != "" {
		_ = os.RemoveAll(b.tmp)
	}
}

func (b *bench) logf(format string, args ...any) {
	fmt.Fprintf(b.log, "%s  %s\n", time.Since(b.started).Round(100*time.Millisecond), fmt.Sprintf(format, args...))
}

func (b *bench) fail(what string, err error) {
	b.logf("FAILED %s: %v", what, err)
	b.failures = append(b.failures, what+": "+firstLine(err.Error()))
}

func firstLine(s string) string {
	for i, c := range s {
		if c == '\n' {
			return s[:i]
		}
	}
	return s
}

// runAll runs the selected measurements in a fixed order.
func (b *bench) runAll(ctx context.Context) {
	c := b.cfg
	for _, t := range c.TxnSizes {
		if c.has("recvlogical") || c.has("perevent") {
			b.guard(ctx, fmt.Sprintf("per-event drain (txn %d)", t), func() error { return b.drain(ctx, t, "perevent", c.has("recvlogical"), c.has("perevent")) })
		}
		if c.has("batched") {
			b.guard(ctx, fmt.Sprintf("batched drain (txn %d)", t), func() error { return b.drain(ctx, t, "batched", false, true) })
		}
		if c.has("floor") {
			for _, mode := range []string{"perevent", "batched"} {
				b.guard(ctx, fmt.Sprintf("floor %s drain (txn %d)", mode, t), func() error { return b.floorDrain(ctx, t, mode) })
			}
		}
		if c.has("poller") {
			b.guard(ctx, fmt.Sprintf("poller drain (txn %d)", t), func() error { return b.pollerDrain(ctx, t) })
		}
		if c.has("otel") {
			b.guard(ctx, fmt.Sprintf("OpenTelemetry off and on (txn %d)", t), func() error { return b.otelDrain(ctx, t) })
		}
		if c.has("catchup") {
			b.guard(ctx, fmt.Sprintf("catch-up drain (txn %d)", t), func() error { return b.catchup(ctx, t) })
		}
	}
	if c.has("latency") {
		for _, sys := range c.LatencySys {
			for _, rate := range c.Rates {
				b.guard(ctx, fmt.Sprintf("%s latency at %d/s", sys, rate), func() error { return b.latency(ctx, sys, rate) })
			}
		}
	}
	if c.has("bigtxn") {
		b.guard(ctx, "big transaction", func() error { return b.bigTxn(ctx) })
	}
	if c.has("parked") {
		b.guard(ctx, "parked drain", func() error { return b.parkedDrain(ctx) })
	}
	if c.has("tenants") {
		for _, subs := range c.TenantSubs {
			b.guard(ctx, fmt.Sprintf("tenants (%d subscriptions)", subs), func() error { return b.tenants(ctx, subs) })
		}
	}
}

// tenants measures a platform with one webhook subscription per
// organization: TenantEvents events, one per organization, each delivered
// to its organization's subscription (subs of them; with none, the default
// webhook takes every event). Deliveries = events; the subscriptions are
// inserted in one transaction after the slot exists, so outboxd applies them
// from its stream during the run.
func (b *bench) tenants(ctx context.Context, subs int) error {
	n := b.cfg.TenantEvents
	if subs > 0 && subs < n {
		return fmt.Errorf("-tenant-subs %d: fewer subscriptions than the %d organizations would leave events undelivered", subs, n)
	}
	name := dbName("tenants", subs)
	dbURL, err := b.pg.createDB(ctx, name, false, b.cfg.FillFactor)
	if err != nil {
		return err
	}
	defer b.dropDB(ctx, name)
	extra := maps.Clone(b.cfg.Extra)
	if subs > 0 {
		extra["OUTBOXD_ALLOW_PRIVATE_SUBSCRIPTIONS"] = "true"
		extra["OUTBOXD_WEBHOOK_EVENTS"] = "no_event_is_named_this" // the default webhook takes none
	}
	env := daemonEnv(dbURL, name, b.recv.url, 1, 16, extra)
	if err := b.createSlotWithDaemon(ctx, env, dbURL, name); err != nil {
		return fmt.Errorf("create outboxd's slot: %w", err)
	}
	if subs > 0 {
		conn, err := pgx.Connect(ctx, dbURL)
		if err != nil {
			return err
		}
		_, err = conn.Exec(ctx, `INSERT INTO outboxd_subscription (organization_id, url, secrets)
SELECT g, $2, ARRAY[$3] FROM generate_series(1, $1::int) AS g`, subs, b.recv.url, benchSecret)
		conn.Close(context.WithoutCancel(ctx))
		if err != nil {
			return fmt.Errorf("insert subscriptions: %w", err)
		}
	}
	bl, err := loadBacklog(ctx, dbURL, n, min(100, n), n, b.props)
	if err != nil {
		return err
	}
	r, err := b.outboxdRun(ctx, env, dbURL, name, bl, false)
	if err != nil {
		return err
	}
	r.Mode = fmt.Sprintf("outboxd tenants: %d subscriptions, %d organizations (batch 1, conc 16)", subs, n)
	r.Detail["subscriptions"] = subs
	r.Detail["cpu_ms_per_delivery"] = r.Detail["cpu_s"].(float64) / float64(n) * 1000
	// From the first delivery on: without outboxd's start and the
	// subscriptions it applied from the stream before the first event.
	r.Detail["cpu_ms_per_delivery_from_first"] = (r.Detail["cpu_s"].(float64) - r.Detail["cpu_s_to_first"].(float64)) / float64(n) * 1000
	b.logf("  CPU per delivery %.3f ms over the run, %.3f ms from the first delivery on (%.2f s before it)",
		r.Detail["cpu_ms_per_delivery"], r.Detail["cpu_ms_per_delivery_from_first"], r.Detail["cpu_s_to_first"])
	b.add(r)
	return nil
}

func (b *bench) guard(ctx context.Context, what string, f func() error) {
	if ctx.Err() != nil {
		b.fail(what, ctx.Err())
		return
	}
	b.logf("%s", what)
	if err := f(); err != nil {
		b.fail(what, err)
	}
}

// outboxdSettings returns the daemon settings of a mode.
func (b *bench) outboxdSettings(mode string) (batch, conc int, label string) {
	if mode == "batched" || mode == "catchup" || mode == "bigtxn" {
		return b.cfg.BatchSize, b.cfg.BatchConc, fmt.Sprintf("batch %d, conc %d", b.cfg.BatchSize, b.cfg.BatchConc)
	}
	return 1, b.cfg.PerEventConc, fmt.Sprintf("batch 1, conc %d", b.cfg.PerEventConc)
}

func dbName(parts ...any) string {
	s := "bench"
	for _, p := range parts {
		s += "_" + fmt.Sprint(p)
	}
	return s
}

// createSlotWithDaemon runs outboxd once on the empty table so that it creates
// its slot and checkpoint, then stops it: the backlog loaded next is in the
// slot's stream.
func (b *bench) createSlotWithDaemon(ctx context.Context, env map[string]string, dbURL, slot string) error {
	d, err := startDaemon(b.bin, env, b.logPath(env))
	if err != nil {
		return err
	}
	defer d.kill()
	w, err := newCheckpointWatch(ctx, dbURL, slot)
	if err != nil {
		return err
	}
	defer w.close()
	if err := waitReady(ctx, d, w, b.cfg.Timeout); err != nil {
		return err
	}
	return d.stop(time.Minute)
}

// drain measures outboxd draining a backlog of N rows in transactions of
// txnSize from its stream (and, first, pg_recvlogical on the same backlog).
func (b *bench) drain(ctx context.Context, txnSize int, mode string, withRecv, withOutboxd bool) error {
	name := dbName("t"+strconv.Itoa(txnSize), mode)
	dbURL, err := b.pg.createDB(ctx, name, false, b.cfg.FillFactor)
	if err != nil {
		return err
	}
	defer b.dropDB(ctx, name)
	slot := name
	batch, conc, label := b.outboxdSettings(mode)
	env := daemonEnv(dbURL, slot, b.recv.url, batch, conc, b.cfg.Extra)
	if withOutboxd {
		if err := b.createSlotWithDaemon(ctx, env, dbURL, slot); err != nil {
			return fmt.Errorf("create outboxd's slot: %w", err)
		}
	}
	if withRecv {
		if err := createSlot(ctx, dbURL, "bench_recvlogical"); err != nil {
			return err
		}
	}
	bl, err := b.load(ctx, dbURL, b.cfg.N, txnSize)
	if err != nil {
		return err
	}
	if withRecv {
		if err := b.recvlogical(ctx, dbURL, "bench_recvlogical", bl); err != nil {
			return err
		}
		if err := dropSlot(ctx, dbURL, "bench_recvlogical"); err != nil {
			return err
		}
	}
	if !withOutboxd {
		return nil
	}
	r, err := b.outboxdRun(ctx, env, dbURL, slot, bl, false)
	if err != nil {
		return err
	}
	r.Mode = "outboxd " + map[string]string{"perevent": "per-event", "batched": "batched"}[mode] + " (" + label + ")"
	b.add(r)
	return nil
}

// catchup measures outboxd's first start on a loaded table: the rows come
// from the table in the slot's snapshot, not from the stream.
func (b *bench) catchup(ctx context.Context, txnSize int) error {
	name := dbName("t"+strconv.Itoa(txnSize), "catchup")
	dbURL, err := b.pg.createDB(ctx, name, false, b.cfg.FillFactor)
	if err != nil {
		return err
	}
	defer b.dropDB(ctx, name)
	bl, err := b.load(ctx, dbURL, b.cfg.N, txnSize)
	if err != nil {
		return err
	}
	batch, conc, label := b.outboxdSettings("catchup")
	env := daemonEnv(dbURL, name, b.recv.url, batch, conc, b.cfg.Extra)
	r, err := b.outboxdRun(ctx, env, dbURL, name, bl, true)
	if err != nil {
		return err
	}
	r.Mode = "outboxd catch-up, first start (" + label + ")"
	b.add(r)
	return nil
}

func (b *bench) dropDB(ctx context.Context, name string) {
	if err := b.pg.dropDB(context.WithoutCancel(ctx), name); err != nil {
		b.logf("warning: %v", err)
	}
}

func (b *bench) load(ctx context.Context, dbURL string, rows, txnSize int) (backlog, error) {
	bl, err := loadBacklog(ctx, dbURL, rows, txnSize, b.cfg.Orgs, b.props)
	if err != nil {
		return bl, err
	}
	b.logf("  loaded %d rows in transactions of %d in %s (%.0f rows/s), properties %.0f bytes",
		rows, txnSize, bl.took.Round(time.Millisecond), float64(rows)/bl.took.Seconds(), bl.avgProps)
	return bl, nil
}

// recvlogical measures pg_recvlogical reading the backlog from slot.
func (b *bench) recvlogical(ctx context.Context, dbURL, slot string, bl backlog) error {
	bin := filepath.Join(b.pg.binDir, "pg_recvlogical")
	args := []string{"-d", dbURL, "--slot=" + slot, "--start", "--no-loop",
		"-o", "proto_version=1", "-o", "publication_names=outboxd",
		"--endpos=" + bl.endLSN.String(), "-F", "0", "-f", "/dev/null"}
	cmd := exec.CommandContext(ctx, bin, args...)
	out := &tailBuffer{max: 8 << 10}
	cmd.Stdout, cmd.Stderr = out, out
	c0 := takeCPU(0)
	start := time.Now()
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("run pg_recvlogical: %w", err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		if err != nil {
			return fmt.Errorf("pg_recvlogical: %w\n%s", err, out)
		}
	case <-time.After(b.cfg.Timeout):
		_ = cmd.Process.Kill()
		<-done
		return fmt.Errorf("pg_recvlogical did not reach %s within %s\n%s", bl.endLSN, b.cfg.Timeout, out)
	}
	took := time.Since(start)
	use := cpuBetween(c0, takeCPU(0))
	ru := cmd.ProcessState.SysUsage().(*syscall.Rusage)
	b.add(row{
		Mode: "pg_recvlogical, pgoutput to /dev/null (decode limit)", System: "pg_recvlogical", TxnSize: bl.txnSize,
		Events: int64(bl.rows), Seconds: took.Seconds(), EventsPerSec: float64(bl.rows) / took.Seconds(),
		PeakRSSMB: float64(ru.Maxrss) / 1024, CPU: &use,
		Detail: map[string]any{"end_lsn": bl.endLSN.String(), "load_s": bl.took.Seconds(),
			"pg_recvlogical_cpu_s": tvSeconds(ru.Utime) + tvSeconds(ru.Stime)},
	})
	return nil
}

func tvSeconds(tv syscall.Timeval) float64 { return float64(tv.Sec) + float64(tv.Usec)/1e6 }

// outboxdRun starts outboxd on a database holding backlog bl and measures it
// until every row is delivered and marked processed.
func (b *bench) outboxdRun(ctx context.Context, env map[string]string, dbURL, slot string, bl backlog, catchup bool) (row, error) {
	w, err := newCheckpointWatch(ctx, dbURL, slot)
	if err != nil {
		return row{}, err
	}
	defer w.close()
	t := b.recv.reset(1, int64(bl.rows), false)
	c0 := takeCPU(0)
	start := time.Now()
	d, err := startDaemon(b.bin, env, b.logPath(env))
	if err != nil {
		return row{}, err
	}
	defer d.kill()
	// outboxd's CPU when the first event arrives: its start, and what the
	// stream held before the events (the tenants' subscriptions).
	atFirst := make(chan procStats, 1)
	go func() {
		select {
		case <-t.started:
			ps, _ := readProc(d.pid())
			atFirst <- ps
		case <-d.done:
			atFirst <- procStats{}
		}
	}()
	if err := b.waitTally(ctx, d, t); err != nil {
		return row{}, err
	}
	before := <-atFirst
	// Marked: the checkpoint passed the last transaction (the rows are marked
	// in the transaction that moves it), or the catch-up is recorded done.
	err = waitFor(ctx, d, b.cfg.Timeout, 2*time.Millisecond, "the checkpoint to cover the backlog", func() (bool, error) {
		lsn, done, _, err := w.read(ctx)
		if catchup {
			return done, err
		}
		return lsn > bl.lastTxnLSN, err
	})
	if err != nil {
		return row{}, err
	}
	marked := time.Now()
	use := cpuBetween(c0, takeCPU(d.pid()))
	ps, err := readProc(d.pid())
	if err != nil {
		return row{}, fmt.Errorf("read outboxd's /proc: %w", err)
	}
	if err := d.stop(time.Minute); err != nil {
		return row{}, err
	}
	if err := b.verify(ctx, dbURL, t, bl.rows); err != nil {
		return row{}, err
	}
	first, last := time.Unix(0, t.first.Load()), time.Unix(0, t.last.Load())
	secs := marked.Sub(first).Seconds()
	return row{
		System: "outboxd", TxnSize: bl.txnSize, Events: int64(bl.rows), Seconds: secs,
		EventsPerSec: float64(bl.rows) / secs,
		PeakRSSMB:    float64(ps.hwmKB) / 1024, CPUPer100k: ps.cpu.Seconds() / float64(bl.rows) * 1e5, CPU: &use,
		Detail: map[string]any{
			"startup_s":          first.Sub(start).Seconds(),
			"receive_s":          last.Sub(first).Seconds(),
			"receive_per_s":      float64(bl.rows) / last.Sub(first).Seconds(),
			"mark_after_last_s":  marked.Sub(last).Seconds(),
			"start_to_marked_s":  marked.Sub(start).Seconds(),
			"requests":           t.requests.Load(),
			"duplicates":         t.duplicates(),
			"cpu_s":              ps.cpu.Seconds(),
			"cpu_s_to_first":     before.cpu.Seconds(),
			"cpu_sys_s":          ps.sys.Seconds(),
			"switches_per_event": float64(ps.switches) / float64(bl.rows),
			"load_s":             bl.took.Seconds(),
		},
	}, nil
}

// waitTally waits until every expected id has arrived.
func (b *bench) waitTally(ctx context.Context, d *daemon, t *tally) error {
	var exited <-chan struct{}
	if d != nil {
		exited = d.done
	}
	timeout := time.NewTimer(b.cfg.Timeout)
	defer timeout.Stop()
	select {
	case <-t.done:
		return nil
	case <-exited:
		return fmt.Errorf("outboxd exited with %v after %d of %d events\n%s", d.err, t.distinct.Load(), t.expected(), d.log)
	case <-timeout.C:
		msg := fmt.Sprintf("%d of %d events arrived within %s (first missing: %v; %d duplicates, first: %v; %d outside the range; %d requests)",
			t.distinct.Load(), t.expected(), b.cfg.Timeout, t.missing(5), t.duplicates(), t.repeated(5), t.outside.Load(), t.requests.Load())
		if d != nil {
			msg += "\n" + d.log.String()
		}
		return errors.New(msg)
	case <-ctx.Done():
		return ctx.Err()
	}
}

// verify checks that every event arrived, nothing else did, and every row is
// marked processed.
func (b *bench) verify(ctx context.Context, dbURL string, t *tally, rows int) error {
	if n := t.distinct.Load(); n != int64(rows) {
		return fmt.Errorf("LOST EVENTS: %d of %d ids received (first missing: %v; %d duplicates, first: %v)", n, rows, t.missing(5), t.duplicates(), t.repeated(5))
	}
	if n := t.outside.Load(); n > 0 {
		return fmt.Errorf("%d unexpected ids received", n)
	}
	if n := t.bad.Load(); n > 0 {
		return fmt.Errorf("%d unparseable request bodies", n)
	}
	conn, err := pgx.Connect(ctx, dbURL)
	if err != nil {
		return err
	}
	defer conn.Close(context.WithoutCancel(ctx))
	pending, total, err := pendingRows(ctx, conn)
	if err != nil {
		return err
	}
	if pending != 0 || total != int64(rows) {
		return fmt.Errorf("%d of %d rows not marked processed (%d duplicate deliveries, first: %v)", pending, total, t.duplicates(), t.repeated(5))
	}
	if d := t.duplicates(); d > 0 {
		b.logf("  note: %d duplicate deliveries (at-least-once)", d)
	}
	return nil
}

// pollerDrain measures the polling baseline on a backlog.
func (b *bench) pollerDrain(ctx context.Context, txnSize int) error {
	name := dbName("t"+strconv.Itoa(txnSize), "poller")
	dbURL, err := b.pg.createDB(ctx, name, true, b.cfg.FillFactor)
	if err != nil {
		return err
	}
	defer b.dropDB(ctx, name)
	bl, err := b.load(ctx, dbURL, b.cfg.N, txnSize)
	if err != nil {
		return err
	}
	t := b.recv.reset(1, int64(bl.rows), false)
	p := newPoller(dbURL, b.recv.url, b.cfg.PollWorkers, b.cfg.PollBatch, b.cfg.PollInterval)
	c0 := takeCPU(0)
	start := time.Now()
	pctx, cancel := context.WithTimeout(ctx, b.cfg.Timeout)
	defer cancel()
	if err := p.run(pctx, int64(bl.rows)); err != nil {
		return err
	}
	use := cpuBetween(c0, takeCPU(0))
	if p.doneAt.Load() == 0 {
		return fmt.Errorf("poller marked %d of %d rows within %s", p.marked.Load(), bl.rows, b.cfg.Timeout)
	}
	if err := b.verify(ctx, dbURL, t, bl.rows); err != nil {
		return err
	}
	first, last, done := time.Unix(0, t.first.Load()), time.Unix(0, t.last.Load()), time.Unix(0, p.doneAt.Load())
	secs := done.Sub(first).Seconds()
	b.add(row{
		Mode:   fmt.Sprintf("poller (SKIP LOCKED, LIMIT %d, %d workers, partial index)", b.cfg.PollBatch, b.cfg.PollWorkers),
		System: "poller", TxnSize: txnSize, Events: int64(bl.rows), Seconds: secs, EventsPerSec: float64(bl.rows) / secs,
		CPU: &use,
		Detail: map[string]any{
			"startup_s":  first.Sub(start).Seconds(),
			"receive_s":  last.Sub(first).Seconds(),
			"requests":   t.requests.Load(),
			"duplicates": t.duplicates(),
			"load_s":     bl.took.Seconds(),
		},
	})
	return nil
}

// latency measures commit→receipt latency at rate single-row transactions
// per second for the configured duration, after a warm-up.
func (b *bench) latency(ctx context.Context, sys string, rate int) error {
	name := dbName("latency", sys, rate)
	dbURL, err := b.pg.createDB(ctx, name, sys == "poller", b.cfg.FillFactor)
	if err != nil {
		return err
	}
	defer b.dropDB(ctx, name)
	warm := min(time.Second, b.cfg.LatencyDur/5)
	planned := int(float64(rate) * (warm + b.cfg.LatencyDur).Seconds())
	var (
		d     *daemon
		p     *poller
		pdone = make(chan error, 1)
		ps0   procStats
		mode  string
	)
	switch sys {
	case "outboxd":
		batch, conc, label := b.outboxdSettings("perevent")
		env := daemonEnv(dbURL, name, b.recv.url, batch, conc, b.cfg.Extra)
		if d, err = startDaemon(b.bin, env, b.logPath(env)); err != nil {
			return err
		}
		defer d.kill()
		w, err := newCheckpointWatch(ctx, dbURL, name)
		if err != nil {
			return err
		}
		err = waitReady(ctx, d, w, b.cfg.Timeout)
		w.close()
		if err != nil {
			return err
		}
		mode = fmt.Sprintf("outboxd latency @ %d/s (%s)", rate, label)
	case "floor":
		if err := createSlot(ctx, dbURL, name); err != nil {
			return err
		}
		args, label := b.floorArgs(dbURL, name, "perevent", 0, fmt.Sprintf("latency.%d", rate))
		if d, err = startProcess(b.floorBin, args, nil, ""); err != nil {
			return err
		}
		defer d.kill()
		mode = fmt.Sprintf("floor latency @ %d/s (%s)", rate, label)
	case "poller":
		p = newPoller(dbURL, b.recv.url, b.cfg.PollWorkers, b.cfg.PollBatch, b.cfg.PollInterval)
		pctx, cancel := context.WithCancel(ctx)
		defer func() { cancel(); <-pdone }()
		go func() { pdone <- p.run(pctx, 0) }()
		mode = fmt.Sprintf("poller latency @ %d/s (interval %s)", rate, b.cfg.PollInterval)
	}
	t := b.recv.reset(1, int64(planned), true)
	var c0 cpuSample
	g := &generator{dbURL: dbURL, rate: rate, planned: planned, orgs: b.cfg.Orgs, props: b.props}
	warmed := make(chan struct{})
	go func() {
		select {
		case <-time.After(warm):
		case <-ctx.Done():
		}
		pid := 0
		if d != nil {
			pid = d.pid()
			resetPeakRSS(pid)
			ps0, _ = readProc(pid)
		}
		c0 = takeCPU(pid)
		close(warmed)
	}()
	if err := g.run(ctx); err != nil {
		return err
	}
	<-warmed
	if err := b.waitTally(ctx, d, t); err != nil {
		return err
	}
	var ps1 procStats
	pid := 0
	if d != nil {
		pid = d.pid()
		ps1, _ = readProc(pid)
	}
	use := cpuBetween(c0, takeCPU(pid))
	// Every row marked: outboxd flushes within its flush interval, the poller
	// within its poll interval.
	conn, err := pgx.Connect(ctx, dbURL)
	if err != nil {
		return err
	}
	err = waitFor(ctx, d, b.cfg.Timeout, 50*time.Millisecond, "every row to be marked", func() (bool, error) {
		pending, _, err := pendingRows(ctx, conn)
		return pending == 0, err
	})
	if err != nil {
		err = fmt.Errorf("%w\n%s", err, b.unmarkedReport(ctx, conn, name, t))
	}
	conn.Close(context.WithoutCancel(ctx))
	if err != nil {
		return err
	}
	if d != nil {
		if err := d.stop(time.Minute); err != nil {
			return err
		}
	}
	if err := b.verify(ctx, dbURL, t, planned); err != nil {
		return err
	}
	if b.cfg.LatencyTrace != "" {
		if err := writeTrace(fmt.Sprintf("%s.%s.%d.csv", b.cfg.LatencyTrace, sys, rate), g.commitAt, t); err != nil {
			return err
		}
	}
	from := g.start.Add(warm).UnixNano()
	var lats []int64
	var negative int
	var firstC, lastC int64
	for i := range planned {
		c := g.commitAt[i]
		if c < from {
			continue
		}
		if firstC == 0 || c < firstC {
			firstC = c
		}
		lastC = max(lastC, c)
		l := t.at[i].Load() - c
		if l < 0 {
			negative++ // the receipt beat COMMIT's reply to the client
			l = 0
		}
		lats = append(lats, l)
	}
	slices.Sort(lats)
	r := row{
		Mode: mode, System: sys, Events: int64(len(lats)), Seconds: b.cfg.LatencyDur.Seconds(),
		EventsPerSec: float64(len(lats)) / (float64(lastC-firstC) / 1e9),
		P50ms:        pct(lats, 0.50), P99ms: pct(lats, 0.99), P999ms: pct(lats, 0.999), CPU: &use,
		Detail: map[string]any{
			"target_rate":                 rate,
			"max_ms":                      pct(lats, 1),
			"receipt_before_commit_reply": negative,
			"generator_lag_p99_ms":        g.lagP99(),
			"duplicates":                  t.duplicates(),
		},
	}
	if d != nil {
		r.PeakRSSMB = float64(ps1.hwmKB) / 1024
		r.CPUPer100k = (ps1.cpu - ps0.cpu).Seconds() / float64(len(lats)) * 1e5
	}
	b.add(r)
	return nil
}

func pct(sorted []int64, q float64) float64 {
	if len(sorted) == 0 {
		return 0
	}
	i := int(q*float64(len(sorted))+0.5) - 1
	i = min(max(i, 0), len(sorted)-1)
	return float64(sorted[i]) / 1e6
}

// generator inserts single-row transactions at a fixed rate (open loop: each
// row has its scheduled time, independent of how long earlier ones took) and
// records when each COMMIT returned, by id.
type generator struct {
	dbURL    string
	rate     int
	planned  int
	orgs     int
	props    string
	start    time.Time
	commitAt []int64 // unix ns by id-1
	lags     []int64
	mu       sync.Mutex
}

func (g *generator) run(ctx context.Context) error {
	g.commitAt = make([]int64, g.planned)
	workers := max(2, (g.rate+999)/1000)
	conns := make([]*pgx.Conn, workers)
	for i := range conns {
		c, err := pgx.Connect(ctx, g.dbURL)
		if err != nil {
			return fmt.Errorf("generator connect: %w", err)
		}
		defer c.Close(context.WithoutCancel(ctx))
		conns[i] = c
	}
	var next atomic.Int64
	interval := time.Second / time.Duration(g.rate)
	g.start = time.Now().Add(20 * time.Millisecond)
	errs := make(chan error, workers)
	for _, c := range conns {
		go func() {
			var lags []int64
			defer func() {
				g.mu.Lock()
				g.lags = append(g.lags, lags...)
				g.mu.Unlock()
			}()
			for {
				i := next.Add(1) - 1
				if i >= int64(g.planned) {
					errs <- nil
					return
				}
				at := g.start.Add(time.Duration(i) * interval)
				if wait := time.Until(at); wait > 0 {
					time.Sleep(wait)
				}
				lags = append(lags, int64(time.Since(at)))
				var id int64
				err := c.QueryRow(ctx, insertSQL+" RETURNING id", i+1, i+1, g.orgs, g.props).Scan(&id)
				now := time.Now().UnixNano()
				if err != nil {
					errs <- fmt.Errorf("generator insert: %w", err)
					return
				}
				if id < 1 || id > int64(g.planned) {
					errs <- fmt.Errorf("generator: id %d outside 1..%d (database not fresh?)", id, g.planned)
					return
				}
				g.commitAt[id-1] = now
			}
		}()
	}
	var first error
	for range workers {
		if err := <-errs; err != nil && first == nil {
			first = err
		}
	}
	return first
}

func (g *generator) lagP99() float64 {
	g.mu.Lock()
	defer g.mu.Unlock()
	s := slices.Clone(g.lags)
	slices.Sort(s)
	return pct(s, 0.99)
}

// bigTxn measures one transaction of BigTxnRows rows delivered by a running
// outboxd (batched settings).
func (b *bench) bigTxn(ctx context.Context) error {
	rows := b.cfg.BigTxnRows
	name := dbName("bigtxn")
	dbURL, err := b.pg.createDB(ctx, name, false, b.cfg.FillFactor)
	if err != nil {
		return err
	}
	defer b.dropDB(ctx, name)
	batch, conc, label := b.outboxdSettings("bigtxn")
	env := daemonEnv(dbURL, name, b.recv.url, batch, conc, b.cfg.Extra)
	d, err := startDaemon(b.bin, env, b.logPath(env))
	if err != nil {
		return err
	}
	defer d.kill()
	w, err := newCheckpointWatch(ctx, dbURL, name)
	if err != nil {
		return err
	}
	defer w.close()
	if err := waitReady(ctx, d, w, b.cfg.Timeout); err != nil {
		return err
	}
	ps0, _ := readProc(d.pid())
	t := b.recv.reset(1, int64(rows), false)
	conn, err := pgx.Connect(ctx, dbURL)
	if err != nil {
		return err
	}
	defer conn.Close(context.WithoutCancel(ctx))
	begin := time.Now()
	tx, err := conn.Begin(ctx)
	if err != nil {
		return err
	}
	if _, err := tx.Exec(ctx, insertSQL, 1, rows, b.cfg.Orgs, b.props); err != nil {
		return fmt.Errorf("insert the big transaction: %w", err)
	}
	if err := tx.Commit(ctx); err != nil {
		return fmt.Errorf("commit the big transaction: %w", err)
	}
	committed := time.Now()
	c0 := takeCPU(d.pid())
	b.logf("  inserted %d rows in one transaction in %s", rows, committed.Sub(begin).Round(time.Millisecond))
	if err := b.waitTally(ctx, d, t); err != nil {
		return err
	}
	// Marked: every row processed. (The checkpoint is no sign: idle
	// advances move it past the transaction's first record, to what the
	// walsender decoded of it, before its commit is even streamed.)
	err = waitFor(ctx, d, b.cfg.Timeout, 20*time.Millisecond, "the transaction's rows to be marked", func() (bool, error) {
		pending, _, err := pendingRows(ctx, conn)
		return pending == 0, err
	})
	if err != nil {
		return err
	}
	marked := time.Now()
	use := cpuBetween(c0, takeCPU(d.pid()))
	ps, err := readProc(d.pid())
	if err != nil {
		return err
	}
	if err := d.stop(time.Minute); err != nil {
		return err
	}
	if err := b.verify(ctx, dbURL, t, rows); err != nil {
		return err
	}
	first, last := time.Unix(0, t.first.Load()), time.Unix(0, t.last.Load())
	secs := last.Sub(committed).Seconds()
	b.add(row{
		Mode:   fmt.Sprintf("outboxd one %d-row transaction (%s)", rows, label),
		System: "outboxd", TxnSize: rows, Events: int64(rows), Seconds: secs, EventsPerSec: float64(rows) / secs,
		PeakRSSMB: float64(ps.hwmKB) / 1024, CPUPer100k: (ps.cpu - ps0.cpu).Seconds() / float64(rows) * 1e5, CPU: &use,
		Detail: map[string]any{
			"insert_s":                  committed.Sub(begin).Seconds(),
			"commit_to_first_receipt_s": first.Sub(committed).Seconds(),
			"commit_to_last_receipt_s":  secs,
			"commit_to_marked_s":        marked.Sub(committed).Seconds(),
			"requests":                  t.requests.Load(),
			"duplicates":                t.duplicates(),
		},
	})
	return nil
}

func (b *bench) add(r row) {
	b.rows = append(b.rows, r)
	b.logf("  %s: %d events, %.2fs, %.0f/s", r.Mode, r.Events, r.Seconds, r.EventsPerSec)
}

// writeTrace writes id, commit time and receipt time (unix ns) per event.
func writeTrace(path string, commitAt []int64, t *tally) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	w := bufio.NewWriter(f)
	fmt.Fprintln(w, "id,commit_ns,receipt_ns")
	for i, c := range commitAt {
		fmt.Fprintf(w, "%d,%d,%d\n", i+1, c, t.at[i].Load())
	}
	if err := w.Flush(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// logPath is where the log of an outboxd run goes with -log-dir ("" without).
func (b *bench) logPath(env map[string]string) string {
	if b.cfg.LogDir == "" {
		return ""
	}
	return filepath.Join(b.cfg.LogDir, env["OUTBOXD_SLOT"]+".log")
}

// unmarkedReport describes rows left unprocessed, for a failure message: what
// the receiver saw of them and where the checkpoint and the slot are.
func (b *bench) unmarkedReport(ctx context.Context, conn *pgx.Conn, slot string, t *tally) string {
	var sb strings.Builder
	rows, err := conn.Query(ctx, `SELECT id, xmin::text, delivery_attempts, occurred_at FROM domain_event WHERE NOT is_processed ORDER BY id LIMIT 10`)
	if err != nil {
		return err.Error()
	}
	for rows.Next() {
		var id int64
		var xmin string
		var attempts int32
		var at time.Time
		if rows.Scan(&id, &xmin, &attempts, &at) == nil {
			received := uint32(0)
			if id >= t.lo && id <= t.hi {
				received = t.counts[id-t.lo].Load()
			}
			fmt.Fprintf(&sb, "unprocessed row id=%d xmin=%s attempts=%d occurred_at=%s received=%d times\n", id, xmin, attempts, at.Format(time.RFC3339Nano), received)
		}
	}
	rows.Close()
	var cp, confirmed, current string
	_ = conn.QueryRow(ctx, `SELECT lsn::text FROM outboxd_checkpoint WHERE slot_name = $1`, slot).Scan(&cp)
	_ = conn.QueryRow(ctx, `SELECT coalesce(confirmed_flush_lsn::text, ''), pg_current_wal_lsn()::text FROM pg_replication_slots WHERE slot_name = $1`, slot).Scan(&confirmed, &current)
	fmt.Fprintf(&sb, "checkpoint lsn %s, slot confirmed_flush_lsn %s, current wal lsn %s; receiver: %d distinct, %d duplicates (first %v), %d requests",
		cp, confirmed, current, t.distinct.Load(), t.duplicates(), t.repeated(5), t.requests.Load())
	return sb.String()
}

// parkedDrain measures the way back from an outage: the receiver refuses
// (503) while ParkedN rows stream, so every delivery is parked in the table
// after one attempt; then it answers again, and the retrier delivers the
// parked deliveries and marks their rows. Measured from the receiver's
// recovery to the last row marked.
func (b *bench) parkedDrain(ctx context.Context) error {
	name := dbName("parked")
	dbURL, err := b.pg.createDB(ctx, name, false, b.cfg.FillFactor)
	if err != nil {
		return err
	}
	defer b.dropDB(ctx, name)
	extra := maps.Clone(b.cfg.Extra)
	extra["OUTBOXD_WEBHOOK_MAX_ATTEMPTS"] = "1"
	extra["OUTBOXD_RETRY_SCHEDULE"] = strings.TrimSuffix(strings.Repeat("1s,", 200), ",")
	env := daemonEnv(dbURL, name, b.recv.url, 1, 16, extra)
	if err := b.createSlotWithDaemon(ctx, env, dbURL, name); err != nil {
		return fmt.Errorf("create outboxd's slot: %w", err)
	}
	bl, err := b.load(ctx, dbURL, b.cfg.ParkedN, 100)
	if err != nil {
		return err
	}
	w, err := newCheckpointWatch(ctx, dbURL, name)
	if err != nil {
		return err
	}
	defer w.close()
	b.recv.failing.Store(true)
	defer b.recv.failing.Store(false)
	d, err := startDaemon(b.bin, env, b.logPath(env))
	if err != nil {
		return err
	}
	defer d.kill()
	conn, err := pgx.Connect(ctx, dbURL)
	if err != nil {
		return err
	}
	defer conn.Close(context.WithoutCancel(ctx))
	// Parked: the checkpoint passed the backlog with every delivery in the
	// parked table.
	err = waitFor(ctx, d, b.cfg.Timeout, 10*time.Millisecond, "every delivery to be parked", func() (bool, error) {
		lsn, _, _, err := w.read(ctx)
		if err != nil || lsn <= bl.lastTxnLSN {
			return false, err
		}
		var n int64
		err = conn.QueryRow(ctx, `SELECT count(*) FROM outboxd_parked`).Scan(&n)
		return n == int64(bl.rows), err
	})
	if err != nil {
		return err
	}
	t := b.recv.reset(1, int64(bl.rows), false)
	c0 := takeCPU(d.pid())
	cpu0, err := readProc(d.pid())
	if err != nil {
		return err
	}
	start := time.Now()
	b.recv.failing.Store(false)
	if err := b.waitTally(ctx, d, t); err != nil {
		return err
	}
	err = waitFor(ctx, d, b.cfg.Timeout, 10*time.Millisecond, "every parked row to be marked", func() (bool, error) {
		pending, _, err := pendingRows(ctx, conn)
		return pending == 0, err
	})
	if err != nil {
		return err
	}
	took := time.Since(start)
	use := cpuBetween(c0, takeCPU(d.pid()))
	ps, err := readProc(d.pid())
	if err != nil {
		return err
	}
	if err := d.stop(time.Minute); err != nil {
		return err
	}
	if err := b.verify(ctx, dbURL, t, bl.rows); err != nil {
		return err
	}
	cpu := ps.cpu - cpu0.cpu
	b.add(row{
		Mode: "outboxd parked drain: retrier after an outage (batch 1, conc 16)", System: "outboxd", TxnSize: bl.txnSize,
		Events: int64(bl.rows), Seconds: took.Seconds(), EventsPerSec: float64(bl.rows) / took.Seconds(),
		PeakRSSMB: float64(ps.hwmKB) / 1024, CPUPer100k: cpu.Seconds() / float64(bl.rows) * 1e5, CPU: &use,
		Detail: map[string]any{"requests": t.requests.Load(), "duplicates": t.duplicates(), "cpu_s": cpu.Seconds()},
	})
	return nil
}
