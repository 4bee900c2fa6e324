package fault

import (
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// scenarioFirstStartCut cuts the connection at one step of the first start
// while rows committed before it wait in the table and more are written
// meanwhile. Every row must be delivered, in commit order per key, and the
// rows from before the slot must not wait for a restart (a cut at
// START_REPLICATION used to skip the catch-up for the life of the process).
// exits says whether outboxd stops there (exit 1; a restart recovers): a
// catch-up cut half-way is not resumed in process.
func scenarioFirstStartCut(step string, exits bool) func(t *testing.T) {
	return func(t *testing.T) {
		r := newRig(t, rigOpts{})
		r.commitRows(30, 10) // committed before the first start
		r.proxy.CutOn(step)
		d := r.start(nil)
		stop := r.gen.Start(5*time.Millisecond, 5, r.gen.Len()+300)
		defer stop()
		if exits {
			require.Equal(t, 1, d.Wait(2*time.Minute), "a catch-up cut half-way stops outboxd; log:\n%s", tail(d.Log(), 3000))
			require.Contains(t, d.Log(), "a restart recreates the slot and catches up again")
			r.faultEnd = time.Now()
			d = r.start(nil)
			d.waitStreaming()
			require.Contains(t, d.Log(), "catching up again")
		}
		require.True(t, untilN(time.Minute, r.gen.Len, 600), "generator stalled")
		stop()
		r.finish(time.Minute)
		require.EqualValues(t, 1, r.proxy.Cuts(), "the cut at %s happened", step)
		if !exits {
			require.False(t, d.Exited(), "outboxd recovers from a cut at %s by itself; log:\n%s", step, tail(d.Log(), 3000))
			require.Equal(t, 1, strings.Count(d.Log(), "catch-up read the table"), "one complete catch-up")
		}
		r.note("cut at %s: %d reconnects", step, d.countLog("reconnecting"))
	}
}

// scenarioFirstStartPostgresDown starts outboxd while Postgres is down
// behind the proxy (which accepts and then drops the connection, as a pooler
// or a restarting server does): outboxd waits for it instead of exiting, and
// delivers what was committed before once Postgres is back. Found by the
// soak: an instance started during a Postgres restart exited 1.
func scenarioFirstStartPostgresDown(t *testing.T) {
	r := newRig(t, rigOpts{settings: map[string]string{}})
	r.commitRows(20, 5)
	r.srv.Stop(t, "fast")
	d := r.start(nil)
	_, ok := d.waitLog("database not reachable; retrying", time.Minute)
	require.True(t, ok, "outboxd waits for the database; log:\n%s", tail(d.Log(), 3000))
	require.False(t, d.Exited(), "outboxd waits for the database instead of exiting")
	r.startServer()
	r.faultEnd = time.Now()
	d.waitReady()
	r.commitRows(20, 5)
	r.finish(time.Minute)
	require.False(t, d.Exited())
}
