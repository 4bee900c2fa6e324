package fault

import (
	"context"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// slotWatch samples the slot's active_pid and the number of walsenders of the
// rig's database that are streaming, every 100 ms, until stopped.
type slotWatch struct {
	mu           sync.Mutex
	pids         map[int]bool
	maxStreaming int64
	stop         func()
}

func (r *rig) watchSlot() *slotWatch {
	w := &slotWatch{pids: map[int]bool{}}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		tick := time.NewTicker(100 * time.Millisecond)
		defer tick.Stop()
		for ctx.Err() == nil {
			var pid int
			var streaming int64
			err := r.pool.QueryRow(ctx, `SELECT coalesce((SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1), 0),
 (SELECT count(*) FROM pg_stat_replication s JOIN pg_stat_activity a USING (pid)
   WHERE a.datname = current_database() AND s.state IN ('streaming', 'catchup'))`, r.slot).Scan(&pid, &streaming)
			if err == nil {
				w.mu.Lock()
				if pid != 0 {
					w.pids[pid] = true
				}
				w.maxStreaming = max(w.maxStreaming, streaming)
				w.mu.Unlock()
			}
			select {
			case <-ctx.Done():
			case <-tick.C:
			}
		}
	}()
	var once sync.Once
	w.stop = func() { once.Do(func() { cancel(); <-done }) }
	r.t.Cleanup(w.stop)
	return w
}

func (w *slotWatch) result() (pids int, maxStreaming int64) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return len(w.pids), w.maxStreaming
}

// 11. Two outboxd instances on one slot: only one streams, the other waits;
// a fault-free run delivers every event exactly once. Then the active one is
// killed and the standby takes over (takeover time reported), duplicates
// only from the unconfirmed window.
func scenarioTwoInstances(t *testing.T) {
	r := newRig(t, rigOpts{})
	d1 := r.start(nil)
	d1.waitReady()
	d2 := r.start(nil)
	_, ok := d2.waitLog("waiting for the slot", time.Minute)
	require.True(t, ok, "the second instance must wait for the slot")
	w := r.watchSlot()
	total := pick(3000, 30000)
	stop := r.gen.Start(2*time.Millisecond, 10, total)
	require.True(t, untilN(2*time.Minute, r.gen.Len, total), "generator stalled")
	require.True(t, untilN(2*time.Minute, r.recv.AcceptedCount, total), "fault-free phase stalled")
	stop()
	w.stop()
	pids, maxStreaming := w.result()
	c := check(r.expectedIDs(), r.gen.Rows(), r.recv.Deliveries())
	r.note("fault-free: %d slot holder(s), at most %d streaming walsender(s), %d duplicates", pids, maxStreaming, c.Duplicates)
	require.Equal(t, 1, pids, "one process holds the slot")
	require.EqualValues(t, 1, maxStreaming, "never both streaming")
	require.Zero(t, c.Duplicates, "no event processed twice in a fault-free run")
	require.Zero(t, d2.countLog(`"message":"streaming"`), "the standby never streamed")

	stop = r.gen.Start(5*time.Millisecond, 10, 0)
	defer stop()
	at, processed, win := r.crash(d1)
	took, ok := d2.waitLog(`"message":"streaming"`, time.Minute)
	require.True(t, ok, "the standby takes over")
	r.faultEnd = at
	r.note("standby took over %s after kill -9", took.Sub(at).Round(10*time.Millisecond))
	n := r.gen.Len()
	require.True(t, untilN(time.Minute, r.gen.Len, n+200), "generator stalled")
	stop()
	r.finish(2 * time.Minute)
	r.assertNotRedelivered(processed, at)
	r.assertDuplicatesWithin(win)
}

// 12. wal_sender_timeout shorter than a receiver stall (2 s vs 6 s short,
// 5 s vs 30 s full): outboxd keeps the walsender satisfied, so the same
// walsender streams before and after and nothing reconnects.
func scenarioWalSenderTimeout(t *testing.T) {
	senderTimeout, stall := pick("2s", "5s"), pick(6*time.Second, 30*time.Second)
	r := newRig(t, rigOpts{settings: map[string]string{"wal_sender_timeout": senderTimeout},
		// The stall is longer than the replication silence timeout too:
		// the reader, blocked handing events downstream, must not take its
		// own silence for the server's.
		env: map[string]string{"OUTBOXD_WEBHOOK_TIMEOUT": "90s", "OUTBOXD_MAX_IN_FLIGHT": "100", "OUTBOXD_REPLICATION_TIMEOUT": "4s"}})
	var stalled atomic.Bool
	release := make(chan struct{})
	r.recv.SetBehaviour(func(*Delivery) Answer {
		if stalled.Load() {
			<-release
		}
		return Answer{}
	})
	d := r.start(nil)
	d.waitReady()
	stop := r.gen.Start(10*time.Millisecond, 5, 0)
	defer stop()
	require.True(t, untilN(time.Minute, r.recv.AcceptedCount, 100))
	_, pid, _, _ := r.slotState()
	stalled.Store(true)
	// A burst fills the pipeline (channel and MAX_IN_FLIGHT) at once, so the
	// reader spends the whole stall blocked handing events downstream.
	r.commitRows(4, 500)
	time.Sleep(stall) //nolint:forbidigo // the stall's length is the fault
	_, pidAfter, _, _ := r.slotState()
	stalled.Store(false)
	close(release)
	r.faultEnd = time.Now()
	n := r.gen.Len()
	require.True(t, untilN(time.Minute, r.gen.Len, n+100))
	stop()
	require.True(t, untilN(time.Minute, r.recv.AcceptedCount, r.gen.Len()), "backlog not delivered")
	_, pidDrained, _, _ := r.slotState()
	reconnects := d.countLog("reconnecting")
	r.note("receiver stalled %s (wal_sender_timeout %s, replication timeout 4s); walsender pid %d before, %d after the stall, %d after the drain; %d reconnects",
		stall, senderTimeout, pid, pidAfter, pidDrained, reconnects)
	r.finish(2 * time.Minute)
	require.Equal(t, pid, pidAfter, "same walsender during the stall: no disconnect")
	require.Equal(t, pid, pidDrained, "same walsender after the stall: no disconnect")
	require.Zero(t, reconnects, "no reconnect")
}

// 13. The leader's network fails (its connections reset, new ones hang) long
// enough for the standby to take the slot; when the network is back the old
// leader finds the slot taken. It must drop what it held (the new leader
// delivers it: the checkpoint never passed it) and wait as a standby in
// process, not exit; then the new leader is killed and the old one takes
// over again. Found by the soak: the old leader exited 1 ("taken over").
func scenarioLeaderCutStandbyTakesOver(t *testing.T) {
	r := newRig(t, rigOpts{})
	d1 := r.start(nil) // through the proxy
	d1.waitReady()
	d2 := r.start(map[string]string{"OUTBOXD_DATABASE_URL": r.url}) // direct
	_, ok := d2.waitLog("waiting for the slot", time.Minute)
	require.True(t, ok, "the second instance waits for the slot")
	stop := r.gen.Start(5*time.Millisecond, 5, 0)
	defer stop()
	require.True(t, untilN(time.Minute, r.recv.AcceptedCount, 200), "deliveries stalled")
	r.proxy.BlackHole()
	r.proxy.CloseAll(true)
	cut := time.Now()
	took, ok := d2.waitLog(`"message":"streaming"`, time.Minute)
	require.True(t, ok, "the standby takes over when the leader's connection is gone")
	r.proxy.Pass()
	r.proxy.CloseAll(true) // the reconnects that hung
	r.faultEnd = took
	_, ok = d1.waitLog("continuing as a standby", time.Minute)
	require.True(t, ok, "the old leader finds the slot taken and waits as a standby; log:\n%s", tail(d1.Log(), 3000))
	require.False(t, d1.Exited(), "the old leader does not exit")
	n := r.gen.Len()
	require.True(t, untilN(time.Minute, r.gen.Len, n+200), "generator stalled")
	d2.kill()
	require.True(t, untilProgress(time.Minute, func() int64 { return int64(len(d1.Log())) },
		func() bool { return d1.countLog(`"message":"streaming"`) >= 2 }), "the old leader takes over again")
	n = r.gen.Len()
	require.True(t, untilN(time.Minute, r.gen.Len, n+200), "generator stalled")
	stop()
	r.note("standby took over %s after the cut", took.Sub(cut).Round(10*time.Millisecond))
	r.finish(2 * time.Minute)
	require.False(t, d1.Exited())
}
