package main

import (
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// The pipeline's restarts back off while the database stays unreachable and
// start over after a run that worked: the wait used to keep the cap it had
// reached, for the life of the process.
func TestRestartsStartOverAfterAHealthyRun(t *testing.T) {
	t.Parallel()
	r := newRestarts()
	var last time.Duration
	for range 10 {
		last = r.after(0) // runs that failed at once
	}
	require.GreaterOrEqual(t, last, 5*time.Second, "backed off toward the 10s cap")
	require.LessOrEqual(t, r.after(time.Hour), 100*time.Millisecond, "a run of an hour worked: the pace starts over")
	require.LessOrEqual(t, r.after(0), 200*time.Millisecond, "and grows again from there")
	for range 10 {
		r.after(0)
	}
	r.reset()
	require.LessOrEqual(t, r.after(0), 100*time.Millisecond)
}
