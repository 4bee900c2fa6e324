package sink

import (
	"context"
	"time"
)

// Attempt describes one attempt of a Deliver call: one HTTP request for the
// HTTP sinks (webhook, PostHog, GA4), one produce or publish round over the
// events still pending for Kafka, NATS and stdout.
type Attempt struct {
	// Number counts the attempts of the call from 1.
	Number int
	// Status is the HTTP status of the answer, 0 when there was none (a
	// transport error, or a sink that is not HTTP).
	Status int
	// Err is nil when the attempt succeeded; otherwise the failure, with no
	// secret in it (as every error of this package).
	Err error
	// Start and End bound the attempt.
	Start, End time.Time
}

// AttemptObserver is told of each attempt of a Deliver call, from the
// goroutine making the call, once its result is known.
type AttemptObserver func(Attempt)

type attemptObserverKey struct{}

// WithAttemptObserver returns a copy of ctx that makes Deliver tell o of
// each attempt it makes (tracing uses it: one span per attempt). Without
// one, Deliver reports nothing and pays for nothing.
func WithAttemptObserver(ctx context.Context, o AttemptObserver) context.Context {
	return context.WithValue(ctx, attemptObserverKey{}, o)
}

// observeAttempt tells the observer ctx carries, if any, of a.
func observeAttempt(ctx context.Context, a Attempt) {
	if o := attemptObserver(ctx); o != nil {
		o(a)
	}
}

// attemptObserver returns the observer ctx carries, nil when none: the
// attempt it would be told of need not be made.
func attemptObserver(ctx context.Context) AttemptObserver {
	o, _ := ctx.Value(attemptObserverKey{}).(AttemptObserver)
	return o
}
