package fault

import (
	"context"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// commitRows commits txns transactions of rows rows through the generator.
func (r *rig) commitRows(txns, rows int) {
	r.t.Helper()
	for range txns {
		_, err := r.gen.Txn(context.Background(), rows)
		require.NoError(r.t, err)
	}
}

// settle waits until every row in the table is marked processed.
func (r *rig) settle(timeout time.Duration) {
	r.t.Helper()
	require.True(r.t, until(timeout, func() bool { return r.count("NOT is_processed") == 0 }),
		"%d rows not processed", r.count("NOT is_processed"))
}

// errorLine returns the last line of a daemon log that mentions s.
func errorLine(log, s string) string {
	lines := strings.Split(strings.TrimSpace(log), "\n")
	for i := len(lines) - 1; i >= 0; i-- {
		if strings.Contains(lines[i], s) {
			return lines[i]
		}
	}
	return ""
}

// refuseWithoutRecreate starts outboxd without OUTBOXD_SLOT_RECREATE and
// asserts it exits 1 by itself, once, with a message naming both ways out.
func (r *rig) refuseWithoutRecreate(what string) {
	r.t.Helper()
	begin := time.Now()
	d := r.start(map[string]string{"OUTBOXD_SLOT_RECREATE": "false"})
	code := d.Wait(90 * time.Second)
	log := d.Log()
	line := errorLine(log, "OUTBOXD_SLOT_RECREATE")
	require.Equal(r.t, 1, code, "a %s slot without OUTBOXD_SLOT_RECREATE is a runtime failure; log:\n%s", what, tail(log, 3000))
	require.NotEmpty(r.t, line, "the message names OUTBOXD_SLOT_RECREATE; log:\n%s", tail(log, 3000))
	require.Contains(r.t, line, "slot reset", "the message names `outboxd slot reset`")
	require.Equal(r.t, 1, strings.Count(log, "outboxd starting"), "one start, no loop")
	r.note("without recreate: exit %d after %s: %s", code, time.Since(begin).Round(100*time.Millisecond), shorten(line, 160))
}

func shorten(s string, n int) string {
	if i := strings.Index(s, "outboxd: "); i >= 0 {
		s = s[i+len("outboxd: "):]
	}
	s = strings.ReplaceAll(s, "|", "/")
	if len(s) > n {
		return s[:n] + "…"
	}
	return s
}

// 7a. The slot is dropped by an operator while outboxd is stopped, and rows
// are inserted meanwhile: without OUTBOXD_SLOT_RECREATE outboxd refuses to
// start (exit 1, no loop); with it, the slot is recreated and the rows are
// caught up from the table; rows processed before are not delivered again.
func scenarioSlotDropped(t *testing.T) {
	r := newRig(t, rigOpts{})
	d := r.start(nil)
	d.waitReady()
	r.commitRows(20, 10)
	r.settle(time.Minute)
	require.Equal(t, 0, d.stop())
	processed, at := r.processedIDs(), time.Now()
	r.dropSlot()
	r.commitRows(20, 10)
	r.refuseWithoutRecreate("dropped")
	r.faultEnd = time.Now()
	d = r.start(map[string]string{"OUTBOXD_SLOT_RECREATE": "true"})
	r.commitRows(10, 10)
	c := r.finish(time.Minute)
	r.assertNotRedelivered(processed, at)
	require.Zero(t, c.Duplicates)
	require.False(t, d.Exited())
}

// dropSlot drops the rig's slot as an operator would, once the walsender of
// the stopped outboxd has let go of it (its exit reaches the server a moment
// after the process ended, through the proxy).
func (r *rig) dropSlot() {
	r.t.Helper()
	var err error
	ok := until(30*time.Second, func() bool {
		_, err = r.pool.Exec(context.Background(), `SELECT pg_drop_replication_slot($1)`, r.slot)
		return err == nil
	})
	require.True(r.t, ok, "drop slot: %v", err)
}

// burnWAL writes a little and switches WAL segments n times, then
// checkpoints, so that a slot behind max_slot_wal_keep_size is invalidated.
func (r *rig) burnWAL(n int) {
	r.t.Helper()
	ctx := context.Background()
	_, err := r.pool.Exec(ctx, `CREATE TABLE IF NOT EXISTS junk (x text)`)
	require.NoError(r.t, err)
	for range n {
		_, err := r.pool.Exec(ctx, `INSERT INTO junk VALUES (repeat('x', 100))`)
		require.NoError(r.t, err)
		_, err = r.pool.Exec(ctx, `SELECT pg_switch_wal()`)
		require.NoError(r.t, err)
	}
	_, err = r.pool.Exec(ctx, `CHECKPOINT`)
	require.NoError(r.t, err)
}

// waitLost burns WAL until the slot's wal_status is lost.
func (r *rig) waitLost() {
	r.t.Helper()
	require.True(r.t, until(2*time.Minute, func() bool {
		_, _, st, ok := r.slotState()
		if ok && st == "lost" {
			return true
		}
		r.burnWAL(4)
		return false
	}), "slot never invalidated")
}

var keepSmall = map[string]string{"max_slot_wal_keep_size": "1MB", "wal_keep_size": "0"}

// 7b. The slot is invalidated by max_slot_wal_keep_size while outboxd is
// stopped, with rows inserted meanwhile.
func scenarioSlotInvalidatedStopped(t *testing.T) {
	r := newRig(t, rigOpts{settings: keepSmall})
	d := r.start(nil)
	d.waitReady()
	r.commitRows(20, 10)
	r.settle(time.Minute)
	require.Equal(t, 0, d.stop())
	processed, at := r.processedIDs(), time.Now()
	r.commitRows(20, 10)
	r.waitLost()
	r.refuseWithoutRecreate("invalidated")
	r.faultEnd = time.Now()
	d = r.start(map[string]string{"OUTBOXD_SLOT_RECREATE": "true"})
	r.commitRows(10, 10)
	c := r.finish(time.Minute)
	r.assertNotRedelivered(processed, at)
	require.Zero(t, c.Duplicates)
	require.False(t, d.Exited())
}

// 7c. The slot is invalidated while outboxd streams (the receiver refuses
// everything, so the slot cannot advance): with OUTBOXD_SLOT_RECREATE=true
// nothing is lost. If outboxd exits instead of recreating the slot in
// process, the test restarts it as a supervisor would, and says so.
func scenarioSlotInvalidatedStreaming(t *testing.T) {
	r := newRig(t, rigOpts{settings: keepSmall, env: merge(receiverEnv, map[string]string{"OUTBOXD_SLOT_RECREATE": "true"})})
	d := r.start(nil)
	d.waitReady()
	r.commitRows(10, 10)
	r.settle(time.Minute)
	r.recv.SetBehaviour(func(*Delivery) Answer { return Answer{Status: http.StatusServiceUnavailable} })
	r.commitRows(20, 10)
	require.True(t, until(30*time.Second, func() bool { return r.recv.Requests() > 0 }))
	stop := r.gen.Start(20*time.Millisecond, 5, 0)
	defer stop()
	r.waitLost()
	r.recv.SetBehaviour(nil)
	r.faultEnd = time.Now()
	restarts := 0
	exited := until(20*time.Second, d.Exited)
	if exited {
		code := d.Wait(time.Second)
		line := errorLine(d.Log(), "invalidated")
		r.note("outboxd exited %d on invalidation (%s); restarted by the test", code, shorten(line, 120))
		restarts++
		d = r.start(nil)
	} else {
		r.note("slot recreated in process")
	}
	n := r.gen.Len()
	require.True(t, untilN(time.Minute, r.gen.Len, n+100), "generator stalled")
	stop()
	r.finish(2 * time.Minute)
	require.False(t, d.Exited())
	_ = restarts
}
