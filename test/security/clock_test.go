package security

import (
	"context"
	"net/http"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/outboxd/outboxd/internal/e2e"
	"github.com/outboxd/outboxd/internal/pgtest"
)

// libfaketime returns the path of libfaketime, which the clock test preloads
// into Postgres to shift its clock (Debian/Ubuntu: apt-get install
// libfaketime; .ci/run installs it).
func libfaketime(t *testing.T) string {
	t.Helper()
	for _, pattern := range []string{"/usr/lib/*/faketime/libfaketime.so.1", "/usr/lib/faketime/libfaketime.so.1", "/usr/local/lib/faketime/libfaketime.so.1"} {
		if m, _ := filepath.Glob(pattern); len(m) > 0 {
			return m[0]
		}
	}
	t.Fatalf("this test shifts Postgres's clock with libfaketime, which is not installed: apt-get install libfaketime")
	return ""
}

// One clock for the retry schedule: with the database's clock an hour ahead
// of the daemon's, parked deliveries are still retried one schedule step
// apart and dead-lettered only when the schedule is over. Before, the daemon
// computed next_attempt_at on its own clock and the retrier compared it with
// the database's now(): every step came due at once (about a second apart,
// the retrier's pace) and the delivery was dead-lettered early.
func TestParkedRetriesFollowTheDatabaseClock(t *testing.T) {
	t.Parallel()
	srv := pgtest.NewEnv(t, nil, []string{"LD_PRELOAD=" + libfaketime(t), "FAKETIME=+1h"})
	w := newWorld(t, srv)
	var skew float64
	require.NoError(t, w.pool.QueryRow(context.Background(), `SELECT extract(epoch FROM now() - $1::timestamptz)`, time.Now()).Scan(&skew))
	require.Greater(t, skew, 3000.0, "the database's clock is an hour ahead of the test's")

	recv := e2e.NewReceiver(t)
	recv.Respond = func(*e2e.Delivery) int { return http.StatusServiceUnavailable }
	const step = 3 * time.Second
	d := e2e.StartDaemon(t, w.env(recv.URL, map[string]string{
		"OUTBOXD_WEBHOOK_MAX_ATTEMPTS": "1",
		"OUTBOXD_RETRY_SCHEDULE":       "3s,3s,3s,3s",
	}))
	ids := w.insert(t, 1)
	status, reason := w.deadLetter(t, ids[0])
	require.Equal(t, http.StatusServiceUnavailable, status, reason)
	require.Contains(t, reason, "retry schedule exhausted")

	var at []time.Time
	for _, dl := range recv.Deliveries() {
		at = append(at, dl.At)
	}
	require.Len(t, at, 5, "one attempt, then one per schedule step")
	for i := 1; i < len(at); i++ {
		gap := at[i].Sub(at[i-1])
		// The retrier looks every second: a step may come up to that much
		// later, never earlier (allowing for the answer's own latency).
		require.GreaterOrEqual(t, gap, step-300*time.Millisecond, "attempt %d came %s after the previous one, before its schedule step (%s); log:\n%s", i+1, gap, step, d.Log())
	}
}
