package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"runtime"
	"runtime/pprof"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/rs/zerolog"

	"github.com/outboxd/outboxd/deliver"
	"github.com/outboxd/outboxd/metrics"
	"github.com/outboxd/outboxd/pipeline"
	"github.com/outboxd/outboxd/sink"
)

// The profiling harness: outboxd's pipeline run in-process (pipeline.Run, as
// `outboxd run` does) draining a backlog of b.N rows from its stream into the
// bench receiver, so that `go test -cpuprofile/-memprofile` sees the hot path.
// The pipeline's goroutines carry the pprof label side=outboxd; the
// receiver's do not, so
//
//	go test ./bench -run '^$' -bench 'PipelineDrain/batched/txn1000' -benchtime 200000x -cpuprofile cpu.out
//	go tool pprof -tagfocus side=outboxd -top cpu.out
//
// shows outboxd's own costs. Loading the backlog is outside the timer.

var (
	profOnce sync.Once
	profEnv  *pgEnv
	profRecv *receiver
	profErr  error
)

func TestMain(m *testing.M) {
	code := m.Run()
	if profRecv != nil {
		profRecv.close()
	}
	if profEnv != nil {
		profEnv.close()
	}
	os.Exit(code)
}

func profileServer(b *testing.B) (*pgEnv, *receiver) {
	profOnce.Do(func() {
		if profEnv, profErr = startPostgres(""); profErr != nil {
			return
		}
		profRecv, profErr = startReceiver(0)
	})
	if profErr != nil {
		b.Fatal(profErr)
	}
	return profEnv, profRecv
}

func BenchmarkPipelineDrain(b *testing.B) {
	for _, mode := range []struct {
		name        string
		batch, conc int
	}{{"perevent", 1, 32}, {"batched", 500, 8}} {
		for _, txn := range []int{1000, 1} {
			b.Run(fmt.Sprintf("%s/txn%d", mode.name, txn), func(b *testing.B) {
				drainInProcess(b, mode.batch, mode.conc, txn)
			})
		}
	}
}

func drainInProcess(b *testing.B, batch, conc, txnSize int) {
	env, recv := profileServer(b)
	ctx := b.Context()
	n := b.N
	name := fmt.Sprintf("bench_prof_%d_%d_%d", batch, txnSize, n)
	dbURL, err := env.createDB(ctx, name, false, 0)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = env.dropDB(context.Background(), name) })
	admin, err := pgx.Connect(ctx, dbURL)
	if err != nil {
		b.Fatal(err)
	}
	props, err := propertiesTemplate(ctx, admin, 330)
	admin.Close(ctx)
	if err != nil {
		b.Fatal(err)
	}
	cfg := pipeline.Config{
		DatabaseURL: dbURL, Slot: name,
		Deliver: deliver.Config{BatchSize: batch, Concurrency: conc},
		Webhook: sink.WebhookConfig{URL: recv.url, Secrets: []string{benchSecret}, HTTPConfig: sink.HTTPConfig{AllowPrivate: true}},
		// Metrics on, as `outboxd run` has them.
		Observer: metrics.New(metrics.Options{}),
	}
	// outboxd logs JSON at info level; nothing on the hot path is above debug.
	log := zerolog.New(io.Discard).Level(zerolog.InfoLevel)
	w, err := newCheckpointWatch(ctx, dbURL, name)
	if err != nil {
		b.Fatal(err)
	}
	defer w.close()

	// First start: the slot, then stop, then the backlog into the stream.
	b.StopTimer()
	stop := runPipeline(ctx, b, cfg, log)
	if err := waitReady(ctx, nil, w, time.Minute); err != nil {
		b.Fatal(err)
	}
	stop()
	bl, err := loadBacklog(ctx, dbURL, n, min(txnSize, n), 1000, props)
	if err != nil {
		b.Fatal(err)
	}
	t := recv.reset(1, int64(n), false)
	b.ReportAllocs()
	b.StartTimer()
	start := time.Now()
	stop = runPipeline(ctx, b, cfg, log)
	select {
	case <-t.done:
	case <-time.After(5 * time.Minute):
		b.Fatalf("%d of %d events arrived", t.distinct.Load(), n)
	}
	if err := waitFor(ctx, nil, time.Minute, 2*time.Millisecond, "checkpoint", func() (bool, error) {
		lsn, _, _, err := w.read(ctx)
		return lsn > bl.lastTxnLSN, err
	}); err != nil {
		b.Fatal(err)
	}
	took := time.Since(start)
	b.StopTimer()
	stop()
	b.ReportMetric(float64(n)/took.Seconds(), "events/s")
	if d := t.duplicates(); d > 0 {
		b.Logf("%d duplicates", d)
	}
}

// runPipeline runs pipeline.Run labelled side=outboxd and returns its stop.
func runPipeline(ctx context.Context, b *testing.B, cfg pipeline.Config, log zerolog.Logger) func() {
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go pprof.Do(ctx, pprof.Labels("side", "outboxd"), func(ctx context.Context) {
		done <- pipeline.Run(ctx, cfg, log)
	})
	return func() {
		cancel()
		if err := <-done; err != nil {
			b.Fatalf("pipeline: %v", err)
		}
	}
}

// BenchmarkTenantsDrain is the tenants mode in-process: b.N events, one per
// organization, each to its organization's webhook subscription (b.N of
// them, inserted after the slot exists). It reports the peak of the Go
// heap, of goroutine stacks and of goroutines during the drain, and writes
// the heap profile taken at the peak of goroutines to $OUTBOXD_BENCH_HEAP
// when set:
//
//	OUTBOXD_BENCH_HEAP=heap.out go test ./bench -run '^$' -bench TenantsDrain -benchtime 10000x
//	go tool pprof -sample_index inuse_space -top heap.out
func BenchmarkTenantsDrain(b *testing.B) {
	env, recv := profileServer(b)
	ctx := b.Context()
	n := b.N
	name := fmt.Sprintf("bench_prof_tenants_%d", n)
	dbURL, err := env.createDB(ctx, name, false, 0)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = env.dropDB(context.Background(), name) })
	admin, err := pgx.Connect(ctx, dbURL)
	if err != nil {
		b.Fatal(err)
	}
	defer admin.Close(context.WithoutCancel(ctx))
	props, err := propertiesTemplate(ctx, admin, 330)
	if err != nil {
		b.Fatal(err)
	}
	cfg := pipeline.Config{
		DatabaseURL: dbURL, Slot: name,
		Deliver:       deliver.Config{BatchSize: 1, Concurrency: 16},
		DefaultEvents: []string{"no_event_is_named_this"},
		Webhook: sink.WebhookConfig{URL: recv.url, Secrets: []string{benchSecret}, HTTPConfig: sink.HTTPConfig{AllowPrivate: true},
			SubscriptionAllowPrivate: true, SubscriptionMaxConnsPerHost: 64},
		Observer: metrics.New(metrics.Options{}),
	}
	log := zerolog.New(io.Discard).Level(zerolog.InfoLevel)
	w, err := newCheckpointWatch(ctx, dbURL, name)
	if err != nil {
		b.Fatal(err)
	}
	defer w.close()
	b.StopTimer()
	stop := runPipeline(ctx, b, cfg, log)
	if err := waitReady(ctx, nil, w, time.Minute); err != nil {
		b.Fatal(err)
	}
	stop()
	if _, err := admin.Exec(ctx, `INSERT INTO outboxd_subscription (organization_id, url, secrets)
SELECT g, $2, ARRAY[$3] FROM generate_series(1, $1::int) AS g`, n, recv.url, benchSecret); err != nil {
		b.Fatal(err)
	}
	bl, err := loadBacklog(ctx, dbURL, n, min(100, n), n, props)
	if err != nil {
		b.Fatal(err)
	}
	t := recv.reset(1, int64(n), false)
	var peakHeap, peakStack uint64
	peakG := 0
	sample := func() {
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		peakHeap, peakStack = max(peakHeap, ms.HeapInuse), max(peakStack, ms.StackInuse)
		if g := runtime.NumGoroutine(); g > peakG {
			peakG = g
			if path := os.Getenv("OUTBOXD_BENCH_HEAP"); path != "" {
				if f, err := os.Create(path); err == nil {
					_ = pprof.Lookup("heap").WriteTo(f, 0)
					_ = f.Close()
				}
			}
		}
	}
	b.StartTimer()
	start := time.Now()
	stop = runPipeline(ctx, b, cfg, log)
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
wait:
	for {
		select {
		case <-t.done:
			break wait
		case <-tick.C:
			sample()
		case <-time.After(5 * time.Minute):
			b.Fatalf("%d of %d events arrived", t.distinct.Load(), n)
		}
	}
	if err := waitFor(ctx, nil, time.Minute, 2*time.Millisecond, "checkpoint", func() (bool, error) {
		lsn, _, _, err := w.read(ctx)
		return lsn > bl.lastTxnLSN, err
	}); err != nil {
		b.Fatal(err)
	}
	took := time.Since(start)
	b.StopTimer()
	stop()
	b.ReportMetric(float64(n)/took.Seconds(), "events/s")
	b.ReportMetric(float64(peakHeap)/(1<<20), "peak-heap-MB")
	b.ReportMetric(float64(peakStack)/(1<<20), "peak-stack-MB")
	b.ReportMetric(float64(peakG), "peak-goroutines")
}
