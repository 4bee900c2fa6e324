package fault

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// 4a/4b. The proxy cuts every connection (replication, sentinel, pool) at
// once, with a reset or a FIN, several times while rows keep coming:
// outboxd reconnects and nothing is lost or reordered.
func scenarioProxyClose(t *testing.T, rst bool) {
	r := newRig(t, rigOpts{})
	d := r.start(nil)
	d.waitReady()
	stop := r.gen.Start(5*time.Millisecond, 10, 0)
	defer stop()
	cuts := pick(3, 10)
	for i := range cuts {
		target := r.recv.AcceptedCount() + 200
		require.True(t, untilN(time.Minute, r.recv.AcceptedCount, target), "deliveries stalled before cut %d", i+1)
		n := r.proxy.CloseAll(rst)
		r.faultEnd = time.Now()
		t.Logf("cut %d: closed %d connections", i+1, n)
	}
	n := r.gen.Len()
	require.True(t, untilN(time.Minute, r.gen.Len, n+300), "generator stalled")
	stop()
	r.note("%d cuts, %d connections accepted in all", cuts, r.proxy.Accepted())
	r.finish(2 * time.Minute)
	require.False(t, d.Exited(), "outboxd must survive cut connections")
}

// 4c. The proxy black-holes every connection without a reset, then lets new
// connections through again while the old ones stay silent forever: outboxd
// must notice the silent replication connection, reconnect, take the slot
// back once the server's walsender gives it up (wal_sender_timeout), and not
// hang on a silent pool connection either.
func scenarioBlackHole(t *testing.T) {
	senderTimeout := pick("10s", "60s")
	// Detection within about two status intervals (1 s each): a 3 s
	// replication timeout (OUTBOXD_REPLICATION_TIMEOUT, default 10 s).
	r := newRig(t, rigOpts{settings: map[string]string{"wal_sender_timeout": senderTimeout},
		env: map[string]string{"OUTBOXD_REPLICATION_TIMEOUT": "3s"}})
	d := r.start(nil)
	d.waitReady()
	stop := r.gen.Start(5*time.Millisecond, 10, 0)
	defer stop()
	require.True(t, untilN(time.Minute, r.recv.AcceptedCount, 300), "deliveries stalled")
	before := d.countLog("reconnecting")
	frozen := r.proxy.BlackHole()
	holeAt := time.Now()
	detected := until(time.Minute, func() bool { return d.countLog("reconnecting") > before })
	detection := time.Since(holeAt)
	hole := pick(15*time.Second, 30*time.Second)
	if rest := hole - time.Since(holeAt); rest > 0 {
		time.Sleep(rest) //nolint:forbidigo // the outage's length is the fault
	}
	r.proxy.Pass()
	r.faultEnd = time.Now()
	if detected {
		r.note("froze %d connections; stall detected after %s (replication timeout 3s, wal_sender_timeout %s)", frozen, detection.Round(100*time.Millisecond), senderTimeout)
	} else {
		r.note("froze %d connections; stall NOT detected within 1m", frozen)
	}
	n := r.gen.Len()
	require.True(t, untilN(time.Minute, r.gen.Len, n+300), "generator stalled")
	stop()
	r.finish(pick(90*time.Second, 3*time.Minute))
	require.True(t, detected, "a black-holed replication connection must be detected")
	require.False(t, d.Exited())
}

// bulkTxn commits one transaction of n rows over orgs organizations and
// records it.
func (r *rig) bulkTxn(n, orgs int) {
	r.t.Helper()
	err := r.gen.Commit(func() ([]int64, []int64, error) {
		rows, err := r.pool.Query(context.Background(), `INSERT INTO domain_event (event_name, organization_id, properties)
SELECT 'bulk', 1 + g % $2::int, jsonb_build_object('g', g) FROM generate_series(1, $1::int) g ORDER BY g RETURNING id, organization_id`, n, orgs)
		if err != nil {
			return nil, nil, err
		}
		var ids, os []int64
		for rows.Next() {
			var id, org int64
			if err := rows.Scan(&id, &org); err != nil {
				return nil, nil, err
			}
			ids, os = append(ids, id), append(os, org)
		}
		return ids, os, rows.Err()
	})
	require.NoError(r.t, err)
}

// 4d/3c. The connection is cut (proxy reset) or Postgres restarts
// (immediate) while one big transaction is being streamed: the reader
// resumes the transaction that was cut in the middle, skipping the events it
// had already handed downstream, so nothing is lost, reordered or delivered
// twice although outboxd itself never restarted.
func scenarioCutMidTransaction(t *testing.T, restartPostgres bool) {
	o := rigOpts{orgs: 8, env: map[string]string{"OUTBOXD_MAX_IN_FLIGHT": "200"}}
	if restartPostgres {
		o.settings = map[string]string{}
	}
	r := newRig(t, o)
	r.recv.SetBehaviour(func(*Delivery) Answer { return Answer{Delay: time.Millisecond} })
	d := r.start(nil)
	d.waitReady()
	r.commitRows(5, 3)
	n := pick(20000, 200000)
	r.bulkTxn(n, 8)
	r.commitRows(5, 3)
	cuts := 0
	for want := 0; cuts < pick(3, 6); cuts++ {
		want += n / 5
		if !untilN(time.Minute, r.recv.AcceptedCount, want) {
			break
		}
		if r.recv.AcceptedCount() >= n {
			break // too late: the transaction was delivered
		}
		if restartPostgres {
			r.srv.Stop(t, "immediate")
			r.startServer()
		} else {
			r.proxy.CloseAll(true)
		}
		r.faultEnd = time.Now()
	}
	require.Positive(t, cuts, "no cut landed inside the transaction")
	r.note("%d-row transaction cut %d times while streaming", n, cuts)
	c := r.finish(pick(time.Minute, 5*time.Minute))
	require.False(t, d.Exited())
	require.Zero(t, c.Duplicates, "a resumed transaction skips what was already handed downstream")
}
