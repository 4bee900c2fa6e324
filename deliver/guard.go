package deliver

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/sony/gobreaker/v2"
	"golang.org/x/time/rate"

	"github.com/outboxd/outboxd/decode"
	"github.com/outboxd/outboxd/sink"
)

// Defaults of GuardConfig's breaker.
const (
	DefaultBreakerFailures = 5
	DefaultBreakerCooldown = 30 * time.Second
)

// ErrBreakerOpen is the outcome of a delivery the circuit breaker of its
// destination refused without calling it: the destination failed
// BreakerFailures calls in a row and its cool-down has not passed, or a
// probe is already on its way. It is retryable: the dispatcher parks the
// delivery and the retrier retries it on its schedule.
var ErrBreakerOpen = errors.New("circuit breaker open: destination not called")

// GuardConfig is what a Guard does to the calls of one destination.
type GuardConfig struct {
	// RateLimit is the events handed to the destination per second; 0: no
	// limit. RateBurst is how many may go at once (default: one second's
	// worth, at least 1).
	RateLimit float64
	RateBurst int
	// BreakerFailures is the number of failed calls in a row that opens the
	// breaker; 0: no breaker. A call fails when the destination did not
	// acknowledge any of its events and at least one failed retryably (its
	// in-call attempts ran out, or 410 Gone); a call refused for good (4xx)
	// proves the destination answers and counts as a success.
	BreakerFailures int
	// BreakerCooldown is how long an open breaker refuses every call before
	// it lets one probe through (half-open). Default 30s.
	BreakerCooldown time.Duration
	// Headers are added to every request of the destination
	// (sink.WithHeader); the sink's own headers win.
	Headers []sink.ExtraHeader
}

// WithDefaults returns c with unset fields given their defaults.
func (c GuardConfig) WithDefaults() GuardConfig {
	if c.RateLimit > 0 && c.RateBurst <= 0 {
		c.RateBurst = max(1, int(c.RateLimit+0.999999))
	}
	if c.BreakerCooldown <= 0 {
		c.BreakerCooldown = DefaultBreakerCooldown
	}
	return c
}

// BreakerState is a breaker's state, with the values of the metric
// outboxd_breaker_state.
type BreakerState int

// Breaker states.
const (
	BreakerClosed   BreakerState = 0
	BreakerHalfOpen BreakerState = 1
	BreakerOpen     BreakerState = 2
)

func (s BreakerState) String() string {
	switch s {
	case BreakerHalfOpen:
		return "half-open"
	case BreakerOpen:
		return "open"
	}
	return "closed"
}

// Guard stands between one destination's dispatcher and retrier and its
// sink: it adds the destination's extra headers, holds calls to its rate
// limit and keeps its circuit breaker. It outlives the pipeline runs of a
// process (its state is the destination's, not a run's), so the router wraps
// the sink of each run with the same Guard.
//
// The breaker is sony/gobreaker's; the rate limit is a token bucket of
// golang.org/x/time/rate, waited for before the sink is called: the wait is
// not an attempt, it is outside the attempts' timeouts, and it ends with
// the call's ctx (shutdown).
type Guard struct {
	target  string
	cfg     GuardConfig
	limiter *rate.Limiter
	cb      *gobreaker.CircuitBreaker[[]sink.Outcome]

	mu       sync.Mutex
	since    time.Time // of the current breaker state; zero while never opened
	lastErr  string    // of the last failed call
	openings atomic.Int64
}

// NewGuard returns the guard of target; cfg has its defaults.
func NewGuard(target string, cfg GuardConfig) *Guard {
	g := &Guard{target: target, cfg: cfg}
	if cfg.RateLimit > 0 {
		g.limiter = rate.NewLimiter(rate.Limit(cfg.RateLimit), cfg.RateBurst)
	}
	if cfg.BreakerFailures > 0 {
		n := uint32(cfg.BreakerFailures)
		g.cb = gobreaker.NewCircuitBreaker[[]sink.Outcome](gobreaker.Settings{
			Name:        target,
			MaxRequests: 1, // one probe at a time when half-open; its success closes
			Timeout:     cfg.BreakerCooldown,
			ReadyToTrip: func(c gobreaker.Counts) bool { return c.ConsecutiveFailures >= n },
			IsExcluded:  func(err error) bool { return errors.Is(err, errCallAbandoned) },
			OnStateChange: func(_ string, _, to gobreaker.State) {
				// Called with the breaker's lock held: only g's own state here.
				g.mu.Lock()
				g.since = time.Now()
				g.mu.Unlock()
				if to == gobreaker.StateOpen {
					g.openings.Add(1)
				}
			},
		})
	}
	return g
}

// Target is the name of the guarded destination.
func (g *Guard) Target() string { return g.target }

// Config is the guard's configuration (its headers' values included: never
// log it).
func (g *Guard) Config() GuardConfig { return g.cfg }

// GuardStatus is the live state of a guard, for metrics and status. It holds
// no header value.
type GuardStatus struct {
	Target string `json:"target"`
	// Breaker is closed, open or half-open; "disabled" without a breaker.
	Breaker         string     `json:"breaker"`
	BreakerSince    *time.Time `json:"breaker_since"`
	LastError       string     `json:"last_error,omitempty"`
	BreakerOpenings int64      `json:"breaker_openings"`
	BreakerFailures int        `json:"breaker_failures"`
	BreakerCooldown float64    `json:"breaker_cooldown_seconds"`
	// RateLimit is in events per second, 0 when none.
	RateLimit float64 `json:"rate_limit"`
	RateBurst int     `json:"rate_burst"`
	// Headers names the extra headers (never their values).
	Headers []string `json:"headers"`
}

// State returns the breaker's state (closed without a breaker). An open
// breaker whose cool-down has passed is half-open.
func (g *Guard) State() BreakerState {
	if g == nil || g.cb == nil {
		return BreakerClosed
	}
	switch g.cb.State() {
	case gobreaker.StateOpen:
		return BreakerOpen
	case gobreaker.StateHalfOpen:
		return BreakerHalfOpen
	}
	return BreakerClosed
}

// Openings returns how many times the breaker opened.
func (g *Guard) Openings() int64 { return g.openings.Load() }

// Status returns the guard's live state.
func (g *Guard) Status() GuardStatus {
	s := GuardStatus{Target: g.target, Breaker: "disabled", RateLimit: g.cfg.RateLimit, RateBurst: g.cfg.RateBurst,
		BreakerFailures: g.cfg.BreakerFailures, Headers: []string{}}
	for _, h := range g.cfg.Headers {
		s.Headers = append(s.Headers, h.Key)
	}
	if g.cb == nil {
		return s
	}
	s.Breaker = g.State().String()
	s.BreakerCooldown = g.cfg.BreakerCooldown.Seconds()
	s.BreakerOpenings = g.Openings()
	g.mu.Lock()
	if !g.since.IsZero() {
		since := g.since.UTC()
		s.BreakerSince = &since
	}
	s.LastError = g.lastErr
	g.mu.Unlock()
	return s
}

// errCallAbandoned and errCallFailed are what a call's outcomes tell the
// breaker: neither leaves the guard.
var (
	errCallAbandoned = errors.New("call abandoned") // ctx ended: says nothing of the destination
	errCallFailed    = errors.New("call failed")
)

// Wrap returns s guarded by g; s itself when g is nil. A sink with several
// destinations (sink.Scoped) stays one.
func (g *Guard) Wrap(s sink.Sink) sink.Sink {
	if g == nil || s == nil {
		return s
	}
	w := guarded{g: g, s: s}
	if sc, ok := s.(sink.Scoped); ok {
		return guardedScoped{guarded: w, sc: sc}
	}
	return w
}

type guarded struct {
	g *Guard
	s sink.Sink
}

func (w guarded) Name() string { return w.s.Name() }

func (w guarded) Deliver(ctx context.Context, events []*decode.Event) []sink.Outcome {
	return w.g.deliver(ctx, w.s, events)
}

type guardedScoped struct {
	guarded
	sc sink.Scoped
}

func (w guardedScoped) Scope(e *decode.Event) string { return w.sc.Scope(e) }

// deliver is one call of s through the guard.
func (g *Guard) deliver(ctx context.Context, s sink.Sink, events []*decode.Event) []sink.Outcome {
	for _, h := range g.cfg.Headers {
		ctx = sink.WithHeader(ctx, h.Key, h.Value)
	}
	call := func() ([]sink.Outcome, error) {
		if err := g.wait(ctx, len(events)); err != nil {
			return every(len(events), sink.Outcome{Err: err}), errCallAbandoned
		}
		out := g.redact(s.Deliver(ctx, events))
		return out, g.judge(out)
	}
	if g.cb == nil {
		out, _ := call()
		return out
	}
	out, err := g.cb.Execute(call)
	if errors.Is(err, gobreaker.ErrOpenState) || errors.Is(err, gobreaker.ErrTooManyRequests) {
		g.mu.Lock()
		last := g.lastErr
		g.mu.Unlock()
		refused := fmt.Errorf("%w (%s)", ErrBreakerOpen, cmp.Or(last, "probe in progress"))
		return every(len(events), sink.Outcome{Err: refused})
	}
	return out
}

// wait takes n tokens from the rate limit, a burst at a time, until ctx
// ends.
func (g *Guard) wait(ctx context.Context, n int) error {
	if g.limiter == nil {
		return nil
	}
	for n > 0 {
		k := min(n, g.limiter.Burst())
		if err := g.limiter.WaitN(ctx, k); err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			// The wait would outlast ctx's deadline: it ends with it.
			<-ctx.Done()
			return ctx.Err()
		}
		n -= k
	}
	return nil
}

// judge tells the breaker what a call's outcomes say of the destination:
// an acknowledged event or a refusal for good means it answers; a
// retryable failure of every event means it fails; an ended ctx says
// nothing.
func (g *Guard) judge(out []sink.Outcome) error {
	var failed error
	abandoned := false
	for _, o := range out {
		switch {
		case o.Err == nil, errors.Is(o.Err, sink.ErrPermanent):
			return nil
		case errors.Is(o.Err, context.Canceled), errors.Is(o.Err, context.DeadlineExceeded):
			abandoned = true
		default:
			failed = o.Err
		}
	}
	switch {
	case failed == nil && abandoned:
		return errCallAbandoned
	case failed == nil: // no outcome at all
		return nil
	}
	g.mu.Lock()
	g.lastErr = failed.Error()
	g.mu.Unlock()
	return errCallFailed
}

func every(n int, o sink.Outcome) []sink.Outcome {
	out := make([]sink.Outcome, n)
	for i := range out {
		out[i] = o
	}
	return out
}

// redact replaces the destination's header values in the errors of out: a
// receiver that echoes a request header (a token) in its error body must not
// get it into logs, parked rows or dead letters.
func (g *Guard) redact(out []sink.Outcome) []sink.Outcome {
	if len(g.cfg.Headers) == 0 {
		return out
	}
	for i, o := range out {
		if o.Err == nil {
			continue
		}
		msg := o.Err.Error()
		clean := msg
		for _, h := range g.cfg.Headers {
			clean = strings.ReplaceAll(clean, h.Value, "[REDACTED]")
		}
		if clean != msg {
			out[i].Err = &redactedError{msg: clean, err: o.Err}
		}
	}
	return out
}

// redactedError is err with the message msg: errors.Is and As still see err.
type redactedError struct {
	msg string
	err error
}

func (e *redactedError) Error() string { return e.msg }
func (e *redactedError) Unwrap() error { return e.err }
