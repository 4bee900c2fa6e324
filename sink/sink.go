// Package sink delivers decoded outbox events to their destinations.
//
// A Sink's Deliver call blocks until every event it was given is either
// acknowledged by the destination or has failed, and returns one Outcome per
// event, in the order given. The invariants every sink keeps, checked for each
// implementation by the shared suite in package sinktest:
//
//   - An Outcome with a nil Err means the destination acknowledged the event
//     (for webhooks: a 2xx answer). Nothing else settles an event.
//   - errors.Is(Err, ErrPermanent): retrying cannot help; the caller
//     dead-letters the event.
//   - errors.Is(Err, ErrGone): the destination says it no longer exists; the
//     caller disables it and parks its events. ErrGone is not ErrPermanent.
//   - Any other non-nil Err is retryable: the in-memory retry budget of the call
//     ran out, or ctx ended, in which case errors.Is(Err, ctx.Err()) holds.
//
// No webhook secret, signature, URL userinfo or URL query string ever appears in
// an error or a log line written by this package (docs/DESIGN.md §1 G8).
package sink

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/outboxd/outboxd/decode"
)

// ErrPermanent marks a delivery failure that retrying cannot fix: a 4xx other
// than 408, 410, 425 and 429, a redirect, or a refused destination address.
var ErrPermanent = errors.New("permanent delivery failure")

// ErrGone marks a 410 Gone answer: the endpoint no longer exists. It is
// deliberately not ErrPermanent: the caller disables the endpoint and parks its
// events instead of dead-lettering them.
var ErrGone = errors.New("endpoint gone (status 410)")

// Outcome is the result of delivering one event.
type Outcome struct {
	// Err is nil when the destination acknowledged the event (2xx).
	// errors.Is(Err, ErrPermanent) means never retry; errors.Is(Err, ErrGone)
	// means the endpoint is gone. Otherwise Err is a retryable failure whose
	// in-memory budget ran out, or the ctx of the call ended, in which case
	// errors.Is(Err, context.Canceled) or errors.Is(Err,
	// context.DeadlineExceeded) holds.
	Err error
	// Status is the last HTTP status received, 0 when none.
	Status int
	// Attempts is the number of HTTP attempts made by this call.
	Attempts int
	// RetryAfter is the most recent Retry-After the receiver asked for, as asked
	// (not clamped), 0 if none.
	RetryAfter time.Duration
}

// Sink delivers events. Deliver blocks until each event is acknowledged or has
// failed and returns one Outcome per event, in order.
type Sink interface {
	// Name is the sink's name in logs, metrics and dead letters.
	Name() string
	// Deliver delivers events and returns one Outcome per event, in order.
	Deliver(ctx context.Context, events []*decode.Event) []Outcome
}

// Scoped is implemented by a sink that sends each event to one of several
// destinations whose orders no consumer can compare (Kafka topics from a
// template): the caller keeps order per ordering key and destination, so an
// event its destination refuses (a topic not created yet) holds back only
// the events of its key bound for the same destination.
type Scoped interface {
	// Scope names the destination of e; "" when the sink has one.
	Scope(e *decode.Event) string
}

// ExtraHeader is a request header added to deliveries by WithHeader.
type ExtraHeader struct {
	Key   string
	Value string
}

type extraHeadersKey struct{}

// WithHeader returns a copy of ctx that makes Deliver add the header key: value
// to the requests it sends (replay uses it to set "webhook-replay: true").
// Headers the webhook sink sets itself (Content-Type, User-Agent, webhook-id,
// webhook-timestamp, webhook-signature, traceparent) take precedence. Extra
// headers are not covered by the signature, which Standard Webhooks computes
// over id, timestamp and body only.
//
// WithHeader panics if key is not a valid header field name or value contains
// CR, LF or NUL: both are programming errors, caught at the call site instead
// of as a delivery failure of some later event.
func WithHeader(ctx context.Context, key, value string) context.Context {
	if !validHeaderName(key) {
		panic(fmt.Sprintf("sink.WithHeader: invalid header name %q", key))
	}
	if !validHeaderValue(value) {
		panic(fmt.Sprintf("sink.WithHeader: invalid value for header %q", key))
	}
	prev := ExtraHeaders(ctx)
	next := make([]ExtraHeader, len(prev), len(prev)+1)
	copy(next, prev)
	next = append(next, ExtraHeader{Key: key, Value: value})
	return context.WithValue(ctx, extraHeadersKey{}, next)
}

// ExtraHeaders returns the headers added to ctx by WithHeader, in the order
// they were added. The caller must not modify the returned slice.
func ExtraHeaders(ctx context.Context) []ExtraHeader {
	h, _ := ctx.Value(extraHeadersKey{}).([]ExtraHeader)
	return h
}

// validHeaderName reports whether s is an RFC 9110 token.
func validHeaderName(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9':
		case c == '!', c == '#', c == '$', c == '%', c == '&', c == '\'', c == '*',
			c == '+', c == '-', c == '.', c == '^', c == '_', c == '`', c == '|', c == '~':
		default:
			return false
		}
	}
	return true
}

// validHeaderValue reports whether s can be sent as a header value.
func validHeaderValue(s string) bool {
	for i := 0; i < len(s); i++ {
		if c := s[i]; c == '\r' || c == '\n' || c == 0 {
			return false
		}
	}
	return true
}

type maxAttemptsKey struct{}

// WithMaxAttempts returns a copy of ctx that limits Deliver to n attempts,
// fewer than the sink's configured budget (the retrier of parked deliveries
// makes one attempt per step of its schedule).
func WithMaxAttempts(ctx context.Context, n int) context.Context {
	return context.WithValue(ctx, maxAttemptsKey{}, n)
}

// MaxAttempts returns the limit set by WithMaxAttempts, or 0.
func MaxAttempts(ctx context.Context) int {
	n, _ := ctx.Value(maxAttemptsKey{}).(int)
	return n
}

// fieldCheck collects what is wrong with a sink's configuration, field by
// field.
type fieldCheck struct {
	problems []string
}

// bad notes that field is wrong, and why.
func (v *fieldCheck) bad(field, format string, args ...any) {
	v.problems = append(v.problems, field+": "+fmt.Sprintf(format, args...))
}

// err joins the problems noted, each as an error naming the sink (kind and
// name) and the field; nil when there are none.
func (v *fieldCheck) err(kind, name string) error {
	errs := make([]error, len(v.problems))
	for i, p := range v.problems {
		errs[i] = fmt.Errorf("%s sink %q: %s", kind, name, p)
	}
	return errors.Join(errs...)
}

// quote is s quoted after ": ", for the end of an error; "" for "".
func quote(s string) string {
	if s == "" {
		return ""
	}
	return ": " + strconv.Quote(s)
}

func lastStatus(code int) string {
	if code == 0 {
		return ""
	}
	return fmt.Sprintf(" (last status %d)", code)
}
