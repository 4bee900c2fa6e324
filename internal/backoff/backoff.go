// Package backoff is outboxd's one retry pace: waits that grow exponentially
// from a minimum, capped at a maximum, with equal jitter so that instances
// retrying the same database or destination spread out. The reader's
// reconnects, the daemon's restarts of its pipeline, the checkpoint flusher
// and the sinks' in-memory attempts all wait by it.
package backoff

import (
	"context"
	"math/rand/v2"
	"time"
)

// Policy bounds the waits.
type Policy struct {
	Min, Max time.Duration
}

// Wait is the wait before retry number attempt (0 for the first retry): a
// value in [d/2, d] where d = Min·2^attempt capped at Max, and never below
// Min (nor above Max).
func (p Policy) Wait(attempt int) time.Duration {
	d := p.Max
	if attempt >= 0 && attempt < 62 && p.Min > 0 {
		if e := p.Min << attempt; e > 0 && e>>attempt == p.Min && e < p.Max {
			d = e
		}
	}
	half := d / 2
	w := half + rand.N(d-half+1)
	return max(w, min(p.Min, p.Max))
}

// Backoff counts the retries of one failing thing.
type Backoff struct {
	Policy
	attempt int
}

// New returns a Backoff with the given bounds.
func New(minWait, maxWait time.Duration) *Backoff {
	return &Backoff{Policy: Policy{Min: minWait, Max: maxWait}}
}

// Next returns the wait before the next retry and counts it.
func (b *Backoff) Next() time.Duration {
	w := b.Wait(b.attempt)
	if b.attempt < 62 {
		b.attempt++
	}
	return w
}

// Reset starts over from Min: the thing worked again.
func (b *Backoff) Reset() { b.attempt = 0 }

// Sleep waits d or until ctx ends, whichever comes first, and returns ctx's
// error in the latter case.
func Sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}
