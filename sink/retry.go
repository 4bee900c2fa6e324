package sink

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/outboxd/outboxd/decode"
	"github.com/outboxd/outboxd/internal/backoff"
)

// Defaults of the in-memory retry budget (RetryConfig) of every sink, and of
// the attempt timeout of the sinks that have one.
const (
	DefaultMaxAttempts = 8
	DefaultBackoffMin  = 200 * time.Millisecond
	DefaultBackoffMax  = 30 * time.Second
	DefaultTimeout     = 10 * time.Second
)

// RetryConfig is the in-memory retry budget of one Deliver call, the same for
// every sink.
type RetryConfig struct {
	// MaxAttempts is the number of attempts one Deliver call makes at an event
	// before it gives up with a retryable error. Default 8.
	MaxAttempts int
	// BackoffMin is the first backoff. Default 200ms.
	BackoffMin time.Duration
	// BackoffMax caps the backoff and any Retry-After. Default 30s.
	BackoffMax time.Duration
}

func (c RetryConfig) withDefaults() RetryConfig {
	c.MaxAttempts = cmp.Or(c.MaxAttempts, DefaultMaxAttempts)
	c.BackoffMin = cmp.Or(c.BackoffMin, DefaultBackoffMin)
	c.BackoffMax = cmp.Or(c.BackoffMax, DefaultBackoffMax)
	return c
}

// validate reports each bad field through bad.
func (c RetryConfig) validate(bad func(field, format string, args ...any)) {
	if c.MaxAttempts < 0 {
		bad("MaxAttempts", "must be positive, got %d", c.MaxAttempts)
	}
	if c.BackoffMin < 0 {
		bad("BackoffMin", "must be positive, got %s", c.BackoffMin)
	}
	if c.BackoffMax < 0 {
		bad("BackoffMax", "must be positive, got %s", c.BackoffMax)
	}
	if c.BackoffMin > 0 && c.BackoffMax > 0 && c.BackoffMin > c.BackoffMax {
		bad("BackoffMin", "%s is greater than BackoffMax %s", c.BackoffMin, c.BackoffMax)
	}
}

// policy is the retry policy c configures; c has its defaults.
func (c RetryConfig) policy() retryPolicy {
	return retryPolicy{maxAttempts: c.MaxAttempts, backoff: backoff.Policy{Min: c.BackoffMin, Max: c.BackoffMax}}
}

// retryPolicy is the one retry policy of the sinks: how many attempts one
// Deliver call makes, and how long it waits between them. The sinks that run
// their own attempt loop use it through deliverEach, the HTTP sinks through
// go-retryablehttp's hooks (httpClient). What is retryable is each sink's
// classification (classify for HTTP statuses).
type retryPolicy struct {
	maxAttempts int
	backoff     backoff.Policy
}

// limit is the attempt budget of one Deliver call: maxAttempts, or the
// smaller one WithMaxAttempts put in ctx.
func (p retryPolicy) limit(ctx context.Context) int {
	if n := MaxAttempts(ctx); n > 0 && n < p.maxAttempts {
		return n
	}
	return p.maxAttempts
}

// wait is the pause before retry number retry (0 for the first): the
// Retry-After of resp when it has one (delta-seconds or HTTP-date), clamped
// to the backoff's maximum, else exponential backoff with jitter. resp may be
// nil.
func (p retryPolicy) wait(retry int, resp *http.Response) time.Duration {
	if resp != nil {
		if ra, ok := parseRetryAfter(resp.Header.Get("Retry-After"), time.Now()); ok {
			return min(ra, p.backoff.Max)
		}
	}
	return p.backoff.Wait(retry)
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
}

// attemptFunc makes one attempt at delivering events[i] for each i in
// pending, in order.
type attemptFunc func(ctx context.Context, pending []int) attemptResult

// deliverEach runs the attempts of the sinks that have their own attempt
// loop (stdout, Kafka, NATS) over the events still pending until each one is
// acknowledged, has failed permanently, has exhausted the retry budget (p's,
// or the smaller one WithMaxAttempts put in ctx), or ctx has ended. what
// names the destination in errors ("produce to kafka").
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
	maxAttempts := p.limit(ctx)
	for n := 1; len(pending) > 0; n++ {
		began := time.Now()
		res := attempt(ctx, pending)
		ctxErr := ctx.Err()
		observeAttempt(ctx, Attempt{Number: n, Err: firstSentErr(res.errs), Start: began, End: time.Now()})
		var next []int
		for j, i := range pending {
			err := res.errs[j]
			if !errors.Is(err, errNotSent) {
				out[i].Attempts++
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
		if err := backoff.Sleep(ctx, p.wait(n-1, nil)); err != nil {
			for _, i := range pending {
				out[i].Err = fmt.Errorf("%s: stopped after %d attempt(s) (last error: %v): %w", what, out[i].Attempts, out[i].Err, err)
			}
			break
		}
	}
	return out
}

// firstSentErr is the first error of an attempt's events that it sent, nil
// when all it sent were acknowledged.
func firstSentErr(errs []error) error {
	for _, err := range errs {
		if err != nil && !errors.Is(err, errNotSent) {
			return err
		}
	}
	return nil
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

// maxRetryAfter bounds a delta-seconds Retry-After so that it cannot overflow.
const maxRetryAfter = 365 * 24 * time.Hour

// parseRetryAfter parses a Retry-After value, delta-seconds or HTTP-date
// (RFC 9110 §10.2.3), relative to now. A date in the past means no wait.
func parseRetryAfter(v string, now time.Time) (time.Duration, bool) {
	v = strings.TrimSpace(v)
	if v == "" {
		return 0, false
	}
	if isDigits(v) {
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil || n > int64(maxRetryAfter/time.Second) {
			return maxRetryAfter, true
		}
		return time.Duration(n) * time.Second, true
	}
	t, err := http.ParseTime(v)
	if err != nil {
		return 0, false
	}
	return max(t.Sub(now), 0), true
}

func isDigits(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return false
		}
	}
	return s != ""
}
