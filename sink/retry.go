package sink

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/outboxd/outboxd/decode"
	"github.com/outboxd/outboxd/internal/backoff"
)

// Defaults of the in-memory retry budget and attempt timeout of the sinks
// other than the webhook (stdout, Kafka, NATS, PostHog); the same values as
// the webhook's.
const (
	DefaultMaxAttempts = 8
	DefaultBackoffMin  = 200 * time.Millisecond
	DefaultBackoffMax  = 30 * time.Second
	DefaultTimeout     = 10 * time.Second
)

// retryPolicy is the in-memory retry budget of one Deliver call of the sinks
// that run their own attempt loop (the webhook delegates to retryablehttp).
type retryPolicy struct {
	maxAttempts int
	backoffMin  time.Duration
	backoffMax  time.Duration
}

// validateRetry fills in the defaults of a retry budget and reports the
// first bad field through bad.
func validateRetry(maxAttempts *int, backoffMin, backoffMax *time.Duration, bad func(field, format string, args ...any)) {
	if *maxAttempts == 0 {
		*maxAttempts = DefaultMaxAttempts
	}
	if *backoffMin == 0 {
		*backoffMin = DefaultBackoffMin
	}
	if *backoffMax == 0 {
		*backoffMax = DefaultBackoffMax
	}
	if *maxAttempts < 0 {
		bad("MaxAttempts", "must be positive, got %d", *maxAttempts)
	}
	if *backoffMin < 0 {
		bad("BackoffMin", "must be positive, got %s", *backoffMin)
	}
	if *backoffMax < 0 {
		bad("BackoffMax", "must be positive, got %s", *backoffMax)
	}
	if *backoffMin > 0 && *backoffMax > 0 && *backoffMin > *backoffMax {
		bad("BackoffMin", "%s is greater than BackoffMax %s", *backoffMin, *backoffMax)
	}
}

// pause waits before attempt number next (2, 3, …): the destination's
// retryAfter when it asked for one, clamped to backoffMax, else an
// exponential backoff with jitter. It returns ctx's error if ctx ends first.
func (p retryPolicy) pause(ctx context.Context, next int, retryAfter time.Duration) error {
	d := backoff.Policy{Min: p.backoffMin, Max: p.backoffMax}.Wait(next - 2)
	if retryAfter > 0 {
		d = min(retryAfter, p.backoffMax)
	}
	return backoff.Sleep(ctx, d)
}

// errNotSent marks an event an attempt did not send (an earlier event of the
// same ordered batch failed first); it does not count as an attempt.
var errNotSent = errors.New("not sent")

// errAttemptTimeout is the cause of an attempt that ran out of its own time
// while the Deliver call's ctx was still live: a retryable failure, which
// must not look like the end of the caller's ctx.
var errAttemptTimeout = errors.New("attempt timed out")

// attemptResult is what one attempt over the pending events produced.
type attemptResult struct {
	// errs holds one error per pending event, in order: nil when the
	// destination acknowledged it, wrapping ErrPermanent when retrying cannot
	// help, wrapping errNotSent when the attempt did not send it, any other
	// error when it is worth another attempt.
	errs []error
	// status is the attempt's HTTP status, 0 when none.
	status int
	// retryAfter is the wait the destination asked for, 0 when none.
	retryAfter time.Duration
}

// attemptFunc makes one attempt at delivering events[i] for each i in
// pending, in order.
type attemptFunc func(ctx context.Context, pending []int) attemptResult

// deliverEach runs attempts over the events still pending until each one is
// acknowledged, has failed permanently, has exhausted the retry budget (p's,
// or the smaller one WithMaxAttempts put in ctx), or ctx has ended. what names the destination in errors ("produce to kafka").
// Events that are nil, or whose rejected[i] is not nil (an event the sink
// cannot send, found before any attempt), fail permanently without an
// attempt; rejected may be nil.
func deliverEach(ctx context.Context, p retryPolicy, what string, events []*decode.Event, rejected []error, attempt attemptFunc) []Outcome {
	out := make([]Outcome, len(events))
	pending := make([]int, 0, len(events))
	for i, ev := range events {
		switch {
		case ev == nil:
			out[i].Err = fmt.Errorf("%s: %w: event %d is nil", what, ErrPermanent, i)
		case rejected != nil && rejected[i] != nil:
			out[i].Err = fmt.Errorf("%s: %w: event %d: %w", what, ErrPermanent, ev.ID, rejected[i])
		default:
			pending = append(pending, i)
		}
	}
	if err := ctx.Err(); err != nil {
		for _, i := range pending {
			out[i].Err = fmt.Errorf("%s: %w", what, err)
		}
		return out
	}
	maxAttempts := p.maxAttempts
	if n := MaxAttempts(ctx); n > 0 && n < maxAttempts {
		maxAttempts = n
	}
	for n := 1; len(pending) > 0; n++ {
		res := attempt(ctx, pending)
		ctxErr := ctx.Err()
		var next []int
		for j, i := range pending {
			err := res.errs[j]
			if !errors.Is(err, errNotSent) {
				out[i].Attempts++
				out[i].Status = res.status
				if res.retryAfter > 0 {
					out[i].RetryAfter = res.retryAfter
				}
			}
			switch {
			case err == nil:
				out[i].Err = nil
			case errors.Is(err, ErrPermanent):
				out[i].Err = fmt.Errorf("%s: %w", what, err)
			case ctxErr != nil:
				out[i].Err = fmt.Errorf("%s: stopped after %d attempt(s): %w", what, out[i].Attempts, ctxErr)
			default:
				out[i].Err = err
				next = append(next, i)
			}
		}
		pending = next
		if len(pending) == 0 {
			break
		}
		if n >= maxAttempts {
			for _, i := range pending {
				out[i].Err = fmt.Errorf("%s: giving up after %d attempt(s): %w", what, out[i].Attempts, out[i].Err)
			}
			break
		}
		if err := p.pause(ctx, n+1, res.retryAfter); err != nil {
			for _, i := range pending {
				out[i].Err = fmt.Errorf("%s: stopped after %d attempt(s) (last error: %v): %w", what, out[i].Attempts, out[i].Err, err)
			}
			break
		}
	}
	return out
}

// attemptErr turns the error of an attempt run under its own deadline into
// the error deliverEach expects: when the attempt's ctx ended but the call's
// ctx did not, a retryable timeout that does not wrap the ctx error.
func attemptErr(callCtx context.Context, timeout time.Duration, err error) error {
	if err == nil || callCtx.Err() != nil {
		return err
	}
	if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled) {
		return fmt.Errorf("%w after %s", errAttemptTimeout, timeout)
	}
	return err
}
