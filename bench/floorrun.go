package main

import (
	"context"
	"fmt"
	"strconv"
	"syscall"
	"time"
)

// floorArgs are the floor consumer's (bench/floor) arguments for a run with
// outboxd's settings of mode (perevent or batched); n 0 runs until SIGTERM.
// run names the run in the file name of its profile (-floor-cpuprofile).
func (b *bench) floorArgs(dbURL, slot, mode string, n int, run string) (args []string, label string) {
	batch, conc, label := b.outboxdSettings(mode)
	args = []string{"-database-url", dbURL, "-slot", slot, "-url", b.recv.url, "-secret", benchSecret,
		"-n", strconv.Itoa(n), "-batch-size", strconv.Itoa(batch), "-concurrency", strconv.Itoa(conc)}
	if b.cfg.FloorProfile != "" {
		args = append(args, "-cpuprofile", b.cfg.FloorProfile+"."+run+".pprof")
	}
	return args, label
}

// floorDrain measures the floor consumer draining a backlog of N rows in
// transactions of txnSize from a slot created before the load, with
// outboxd's settings of mode: what the same work costs without outboxd's
// guarantees. It ends when the consumer exits, having marked every row.
func (b *bench) floorDrain(ctx context.Context, txnSize int, mode string) error {
	name := dbName("t"+strconv.Itoa(txnSize), "floor", mode)
	dbURL, err := b.pg.createDB(ctx, name, false, b.cfg.FillFactor)
	if err != nil {
		return err
	}
	defer b.dropDB(ctx, name)
	if err := createSlot(ctx, dbURL, name); err != nil {
		return err
	}
	bl, err := b.load(ctx, dbURL, b.cfg.N, txnSize)
	if err != nil {
		return err
	}
	args, label := b.floorArgs(dbURL, name, mode, bl.rows, fmt.Sprintf("%s.txn%d", mode, txnSize))
	t := b.recv.reset(1, int64(bl.rows), false)
	c0 := takeCPU(0)
	start := time.Now()
	d, err := startProcess(b.floorBin, args, nil, "")
	if err != nil {
		return err
	}
	defer d.kill()
	timeout := time.NewTimer(b.cfg.Timeout)
	defer timeout.Stop()
	select {
	case <-d.done:
	case <-timeout.C:
		return fmt.Errorf("the floor consumer did not mark %d rows within %s (%d received)\n%s", bl.rows, b.cfg.Timeout, t.distinct.Load(), d.log)
	case <-ctx.Done():
		return ctx.Err()
	}
	marked := time.Now()
	if d.err != nil {
		return fmt.Errorf("the floor consumer: %v\n%s", d.err, d.log)
	}
	use := cpuBetween(c0, takeCPU(0))
	if err := b.verify(ctx, dbURL, t, bl.rows); err != nil {
		return err
	}
	ru := d.cmd.ProcessState.SysUsage().(*syscall.Rusage)
	cpu := tvSeconds(ru.Utime) + tvSeconds(ru.Stime)
	first := time.Unix(0, t.first.Load())
	secs := marked.Sub(first).Seconds()
	b.add(row{
		Mode:   "floor: the least Go consumer, no guarantees, " + map[string]string{"perevent": "per-event", "batched": "batched"}[mode] + " (" + label + ")",
		System: "floor", TxnSize: bl.txnSize, Events: int64(bl.rows), Seconds: secs,
		EventsPerSec: float64(bl.rows) / secs,
		PeakRSSMB:    float64(ru.Maxrss) / 1024, CPUPer100k: cpu / float64(bl.rows) * 1e5, CPU: &use,
		Detail: map[string]any{
			"startup_s":  first.Sub(start).Seconds(),
			"requests":   t.requests.Load(),
			"duplicates": t.duplicates(),
			"cpu_s":      cpu,
			"cpu_sys_s":  tvSeconds(ru.Stime),
			"load_s":     bl.took.Seconds(),
		},
	})
	return nil
}
