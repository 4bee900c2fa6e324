package fault

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// After a restart of Postgres the rig's pool hands out working connections
// at once: a connection left idle in the pool across a fast stop used to
// return the server's 57P01 FATAL to the first statement made on it when
// the restart took less than pgxpool's 1 s ping threshold (pg-stop-fast-
// attached failed so in CI). The restart here is timed: when it takes
// longer than the threshold the pool checks the connection itself and the
// test cannot tell, which it says.
func TestRigStartServerDropsConnectionsFromBeforeTheStop(t *testing.T) {
	r := newRig(t, rigOpts{settings: map[string]string{}})
	ctx := context.Background()
	_, err := r.pool.Exec(ctx, `SELECT 1`) // one connection, idle in the pool
	require.NoError(t, err)
	require.EqualValues(t, 1, r.pool.Stat().IdleConns())
	begin := time.Now()
	r.srv.Stop(t, "fast")
	r.startServer()
	took := time.Since(begin)
	_, err = r.pool.Exec(ctx, `SELECT 1`)
	require.NoError(t, err, "the first statement after the restart (%s)", took)
	if took >= time.Second {
		t.Logf("the restart took %s, beyond pgxpool's ping threshold: the pool would have checked the connection anyway", took)
	}
}
