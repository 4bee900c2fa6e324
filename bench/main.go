// Command bench measures outboxd against the physical limit (Postgres's own
// pgoutput decoding, read by pg_recvlogical) and against a well-tuned polling
// dispatcher, on one machine, in one run (issue 6):
//
//	go run ./bench                      # the full run: N=200,000, ~4 minutes
//	go run ./bench -smoke               # a few seconds' worth of everything
//	go run ./bench -json out.json -modes batched,recvlogical -n 100000
//
// It starts its own Postgres (internal/pgserver, settings in serverSettings)
// unless -database-url names a server whose role may create databases and
// replication slots; builds cmd/outboxd and runs it as a child process; and
// serves webhooks from an in-process receiver on loopback. Every measurement
// gets a fresh database, migrated with migrations.Migrate.
//
// Measurements (-modes):
//
//	recvlogical  pg_recvlogical with pgoutput, from a slot created before the
//	             load, to /dev/null until the end of the load: the decode limit
//	perevent     outboxd draining the backlog, one POST per event
//	batched      outboxd draining the backlog, JSON arrays of -batch-size
//	floor        the floor consumer (bench/floor) draining the backlog with
//	             the per-event and the batched settings: the same decoding,
//	             envelopes, signed POSTs and marking, none of outboxd's
//	             guarantees (order, checkpoint, retries, routing): what
//	             Go, pglogrepl, net/http and Postgres cost on the machine
//	poller       the polling baseline (see poller.go) on the same backlog
//	catchup      outboxd's first start on an existing backlog (table catch-up)
//	latency      commit→receipt latency at -latency-rates single-row
//	             transactions/s, for -latency-systems (outboxd, floor, poller)
//	bigtxn       one transaction of -bigtxn-rows rows: time to deliver, peak RSS
//	tenants      -tenant-events events over as many organizations, each with
//	             its own webhook subscription, for each count of
//	             -tenant-subs (0: the default webhook takes every event):
//	             peak RSS and CPU per delivery as tenants grow
//	otel         the per-event drain twice, OpenTelemetry off, then on
//	             (traces and metrics to an OTLP/HTTP endpoint in the
//	             bench's process, every span sampled): CPU µs per event
//
// The slots of the drain measurements exist before the backlog is loaded, so
// the replication stream is measured, not the catch-up (that is "catchup").
//
// Invariant: every measurement verifies that every event arrived (each id of
// the backlog received at least once, nothing else received) and that every
// row ended up marked processed; a run where one did not exits with status 1.
// Duplicates are allowed (at-least-once) but reported.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/url"
	"os"
	"os/signal"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// config is the benchmark's settings, from flags.
type config struct {
	N            int
	TxnSizes     []int
	PropsSize    int
	Orgs         int
	Modes        []string
	PerEventConc int
	BatchSize    int
	BatchConc    int
	PollWorkers  int
	PollBatch    int
	PollInterval time.Duration
	Rates        []int
	LatencyDur   time.Duration
	LatencySys   []string
	BigTxnRows   int
	TenantSubs   []int
	TenantEvents int
	DatabaseURL  string
	PGBinDir     string
	OutboxdBin   string
	JSONPath     string
	Timeout      time.Duration
	Smoke        bool
	FillFactor   int
	LatencyTrace string
	LogDir       string
	FloorProfile string
	RecvDelay    time.Duration
	ParkedN      int
	Extra        map[string]string // OUTBOXD_* for every daemon run
	// Flags are every flag's effective value, for the JSON results.
	Flags map[string]string
}

var allModes = []string{"recvlogical", "perevent", "batched", "floor", "poller", "catchup", "latency", "bigtxn", "tenants", "parked", "otel"}

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		var ue usageError
		if errors.As(err, &ue) {
			os.Exit(2)
		}
		os.Exit(1)
	}
}

type usageError struct{ error }

func parseFlags(args []string, stderr io.Writer) (config, error) {
	var c config
	fs := flag.NewFlagSet("bench", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var txn, modes, rates, sys, extra, tenantSubs string
	fs.IntVar(&c.N, "n", 200000, "backlog rows")
	fs.StringVar(&txn, "txn-sizes", "1000,1", "rows per transaction of the backlog, one measurement set each")
	fs.IntVar(&c.PropsSize, "props-size", 330, "bytes of each row's properties (jsonb text)")
	fs.IntVar(&c.Orgs, "orgs", 1000, "distinct organization_id values (ordering keys)")
	fs.StringVar(&modes, "modes", strings.Join(allModes, ","), "measurements, comma-separated, of: "+strings.Join(allModes, ","))
	fs.IntVar(&c.PerEventConc, "perevent-concurrency", 32, "OUTBOXD_WEBHOOK_CONCURRENCY in per-event mode")
	fs.IntVar(&c.BatchSize, "batch-size", 500, "OUTBOXD_WEBHOOK_BATCH_SIZE in batched mode")
	fs.IntVar(&c.BatchConc, "batch-concurrency", 8, "OUTBOXD_WEBHOOK_CONCURRENCY in batched mode")
	fs.IntVar(&c.PollWorkers, "poller-workers", 4, "poller workers (connections)")
	fs.IntVar(&c.PollBatch, "poller-batch", 500, "poller LIMIT per batch")
	fs.DurationVar(&c.PollInterval, "poller-interval", 100*time.Millisecond, "poller sleep after a short batch")
	fs.StringVar(&rates, "latency-rates", "1000,5000", "single-row transactions per second of the latency runs")
	fs.DurationVar(&c.LatencyDur, "latency-duration", 30*time.Second, "length of each latency run (after a warm-up)")
	fs.StringVar(&sys, "latency-systems", "outboxd,floor,poller", "systems whose latency is measured: outboxd, floor, poller")
	fs.IntVar(&c.BigTxnRows, "bigtxn-rows", 1000000, "rows of the one big transaction")
	fs.StringVar(&tenantSubs, "tenant-subs", "0,10000", "tenant subscriptions of the tenants runs, one run each (0: none, the default webhook takes the events)")
	fs.IntVar(&c.TenantEvents, "tenant-events", 10000, "events of each tenants run, one per organization")
	fs.StringVar(&c.DatabaseURL, "database-url", "", "postgres:// URL of an existing server's administrative database (default: start one)")
	fs.StringVar(&c.PGBinDir, "pg-bin-dir", "", "PostgreSQL server binaries (default: found like the tests do)")
	fs.StringVar(&c.OutboxdBin, "outboxd-bin", "", "a prebuilt outboxd binary (default: go build ./cmd/outboxd)")
	fs.StringVar(&c.JSONPath, "json", "", "also write the results as JSON to this file")
	fs.DurationVar(&c.Timeout, "timeout", 5*time.Minute, "limit for each wait within a measurement")
	fs.BoolVar(&c.Smoke, "smoke", false, "tiny sizes (N=2000, txn sizes 100,1, latency 2s, big txn 20000) to check the benchmark works")
	fs.StringVar(&c.LatencyTrace, "latency-trace", "", "write each latency run's events (id, commit and receipt unix ns) to FILE.<system>.<rate>.csv")
	fs.StringVar(&c.FloorProfile, "floor-cpuprofile", "", "write a CPU profile of each floor run to FILE.<mode>.<txn or rate>.pprof")
	fs.StringVar(&c.LogDir, "log-dir", "", "write each outboxd run's log to this directory")
	fs.IntVar(&c.ParkedN, "parked-n", 20000, "rows of the parked mode: parked during an outage of the receiver, then retried")
	fs.DurationVar(&c.RecvDelay, "receiver-delay", 0, "make the receiver slow: one request at a time, each taking this long (a single-threaded receiver such as Python's http.server); 0: concurrent and immediate")
	fs.IntVar(&c.FillFactor, "fillfactor", 0, "fillfactor of domain_event (0: Postgres's default, 100); below 100 leaves room for HOT marking updates")
	fs.StringVar(&extra, "outboxd-env", "", "extra settings for every outboxd run, KEY=VALUE,...: OUTBOXD_* or GOMAXPROCS, GOGC, GOMEMLIMIT, GODEBUG")
	if err := fs.Parse(args); err != nil {
		return c, usageError{err}
	}
	if fs.NArg() > 0 {
		return c, usageError{fmt.Errorf("unexpected argument %q", fs.Arg(0))}
	}
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	if c.Smoke {
		if !set["n"] {
			c.N = 2000
		}
		if !set["txn-sizes"] {
			txn = "100,1"
		}
		if !set["latency-duration"] {
			c.LatencyDur = 2 * time.Second
		}
		if !set["bigtxn-rows"] {
			c.BigTxnRows = 20000
		}
		if !set["tenant-subs"] {
			tenantSubs = "0,200"
		}
		if !set["parked-n"] {
			c.ParkedN = 1000
		}
		if !set["tenant-events"] {
			c.TenantEvents = 200
		}
		if !set["timeout"] {
			c.Timeout = time.Minute
		}
	}
	c.Flags = map[string]string{}
	fs.VisitAll(func(f *flag.Flag) { c.Flags[f.Name] = f.Value.String() })
	// Smoke mode's sizes, as used.
	c.Flags["n"], c.Flags["txn-sizes"] = strconv.Itoa(c.N), txn
	c.Flags["latency-duration"], c.Flags["bigtxn-rows"] = c.LatencyDur.String(), strconv.Itoa(c.BigTxnRows)
	c.Flags["timeout"] = c.Timeout.String()
	c.Flags["tenant-subs"], c.Flags["tenant-events"] = tenantSubs, strconv.Itoa(c.TenantEvents)
	if u, err := url.Parse(c.DatabaseURL); err == nil && c.DatabaseURL != "" {
		c.Flags["database-url"] = u.Redacted()
	}
	var err error
	if c.TxnSizes, err = ints(txn); err != nil {
		return c, usageError{fmt.Errorf("-txn-sizes: %w", err)}
	}
	for _, f := range splitList(tenantSubs) {
		n, err := strconv.Atoi(f)
		if err != nil || n < 0 {
			return c, usageError{fmt.Errorf("-tenant-subs: %q is not a count", f)}
		}
		c.TenantSubs = append(c.TenantSubs, n)
	}
	if c.Rates, err = ints(rates); err != nil {
		return c, usageError{fmt.Errorf("-latency-rates: %w", err)}
	}
	c.Modes = splitList(modes)
	for _, m := range c.Modes {
		if !slices.Contains(allModes, m) {
			return c, usageError{fmt.Errorf("-modes: unknown mode %q", m)}
		}
	}
	c.LatencySys = splitList(sys)
	for _, s := range c.LatencySys {
		if s != "outboxd" && s != "poller" && s != "floor" {
			return c, usageError{fmt.Errorf("-latency-systems: unknown system %q", s)}
		}
	}
	c.Extra = map[string]string{}
	for _, kv := range splitList(extra) {
		k, v, ok := strings.Cut(kv, "=")
		if !ok || !(strings.HasPrefix(k, "OUTBOXD_") || slices.Contains([]string{"GOMAXPROCS", "GOGC", "GOMEMLIMIT", "GODEBUG"}, k)) {
			return c, usageError{fmt.Errorf("-outboxd-env: %q is not OUTBOXD_KEY=VALUE (or a Go runtime variable)", kv)}
		}
		c.Extra[k] = v
	}
	switch {
	case c.N < 1:
		return c, usageError{errors.New("-n must be positive")}
	case c.PropsSize < 2:
		return c, usageError{errors.New("-props-size must be at least 2")}
	case c.Orgs < 1:
		return c, usageError{errors.New("-orgs must be positive")}
	case c.FillFactor != 0 && (c.FillFactor < 10 || c.FillFactor > 100):
		return c, usageError{errors.New("-fillfactor must be in 10..100")}
	case c.TenantEvents < 1:
		return c, usageError{errors.New("-tenant-events must be positive")}
	case c.LatencyDur <= 0:
		return c, usageError{errors.New("-latency-duration must be positive")}
	}
	for _, t := range c.TxnSizes {
		if t < 1 || t > c.N {
			return c, usageError{fmt.Errorf("-txn-sizes: %d is not in 1..N", t)}
		}
	}
	return c, nil
}

func ints(s string) ([]int, error) {
	var out []int
	for _, f := range splitList(s) {
		n, err := strconv.Atoi(f)
		if err != nil || n < 1 {
			return nil, fmt.Errorf("%q is not a positive integer", f)
		}
		out = append(out, n)
	}
	return out, nil
}

func splitList(s string) []string {
	var out []string
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f != "" {
			out = append(out, f)
		}
	}
	return out
}

func (c config) has(mode string) bool { return slices.Contains(c.Modes, mode) }

// run is the whole benchmark; it returns an error when a measurement failed
// or lost events.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	cfg, err := parseFlags(args, stderr)
	if err != nil {
		return err
	}
	b, err := newBench(ctx, cfg, stderr)
	if err != nil {
		return err
	}
	defer b.close()
	b.runAll(ctx)
	res := b.results()
	printTable(stdout, res)
	if cfg.JSONPath != "" {
		if err := writeJSON(cfg.JSONPath, res); err != nil {
			return err
		}
	}
	if len(res.Failures) > 0 {
		return fmt.Errorf("%d measurement(s) failed:\n  %s", len(res.Failures), strings.Join(res.Failures, "\n  "))
	}
	return nil
}
