package backoff

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func TestWaitGrowsWithJitterWithinBounds(t *testing.T) {
	t.Parallel()
	p := Policy{Min: 100 * time.Millisecond, Max: 10 * time.Second}
	for attempt := range 70 {
		d := p.Max
		if attempt < 10 { // 100ms·2^7 = 12.8s is past the cap
			d = min(p.Min<<attempt, p.Max)
		}
		for range 50 {
			w := p.Wait(attempt)
			require.GreaterOrEqual(t, w, max(d/2, p.Min), "attempt %d", attempt)
			require.LessOrEqual(t, w, d, "attempt %d", attempt)
		}
	}
	// Degenerate bounds stay bounded: no minimum, a minimum above the
	// maximum, a negative attempt.
	require.LessOrEqual(t, Policy{Max: time.Second}.Wait(3), time.Second)
	require.Equal(t, time.Second, Policy{Min: 5 * time.Second, Max: time.Second}.Wait(0))
	require.LessOrEqual(t, Policy{Min: time.Millisecond, Max: time.Second}.Wait(-1), time.Second)
}

func TestBackoffResetsToTheMinimum(t *testing.T) {
	t.Parallel()
	b := New(100*time.Millisecond, 10*time.Second)
	for range 20 {
		b.Next()
	}
	require.GreaterOrEqual(t, b.Next(), 5*time.Second, "capped at the maximum after many failures")
	b.Reset()
	require.LessOrEqual(t, b.Next(), 100*time.Millisecond, "back to the minimum after a reset")
	require.LessOrEqual(t, b.Next(), 200*time.Millisecond)
}

func TestSleepEndsWithTheContext(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	require.ErrorIs(t, Sleep(ctx, time.Hour), context.Canceled)
	require.NoError(t, Sleep(context.Background(), time.Nanosecond))
}
