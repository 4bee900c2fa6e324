// Package sinktest is the conformance suite every sink.Sink passes.
//
// A test wires the sink under test to a Receiver, the stand-in for the sink's
// destination, through a small adapter (for webhooks: an httptest server that
// hands the ids of each request to Receiver.Receive and answers 200, 503 or 422
// per the returned Response). Run then checks that the sink settles an event
// only on acknowledgement, classifies retryable and permanent failures, honours
// ctx cancellation and returns one Outcome per event, in order. Options adapt
// the checks to a documented behaviour of the sink (InOrder).
//
// It is test helper code: only _test.go files import it.
package sinktest

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/outboxd/outboxd/decode"
	"github.com/outboxd/outboxd/sink"
)

// Response is how the destination answers one delivery attempt.
type Response int

// The answers a Receiver gives.
const (
	// Ack acknowledges the delivery (HTTP: 2xx).
	Ack Response = iota + 1
	// FailRetryable fails the attempt in a way worth retrying (HTTP: 503).
	FailRetryable
	// FailPermanent fails the attempt in a way never worth retrying (HTTP: 422).
	FailPermanent
)

// String returns the name of the answer.
func (r Response) String() string {
	switch r {
	case Ack:
		return "ack"
	case FailRetryable:
		return "fail-retryable"
	case FailPermanent:
		return "fail-permanent"
	}
	return fmt.Sprintf("Response(%d)", int(r))
}

// Delivery is one delivery attempt as the destination saw it.
type Delivery struct {
	// IDs are the ids of the events the attempt carried, in the order sent.
	IDs []int64
	// Seq is the 1-based number of the attempt at this Receiver.
	Seq int
}

// Policy decides the answer to one delivery attempt. It may block, for example
// to hold a delivery until the test releases it; it must return once ctx (the
// attempt's context at the destination, or the suite's cleanup) is done.
type Policy func(ctx context.Context, d Delivery) Response

// Receiver stands in for a sink's destination. Adapters call Receive for every
// delivery attempt that reaches the destination.
type Receiver struct {
	mu       sync.Mutex
	policy   Policy
	log      []answered
	arrivals chan Delivery
	done     chan struct{}
	seq      atomic.Int64
}

type answered struct {
	Delivery
	resp Response
}

func newReceiver() *Receiver {
	return &Receiver{
		policy:   func(context.Context, Delivery) Response { return Ack },
		arrivals: make(chan Delivery, 1024),
		done:     make(chan struct{}),
	}
}

// Receive records a delivery attempt carrying the events ids and returns the
// answer the destination gives. If ctx ends while the test holds the attempt,
// it returns FailRetryable (the sender has gone anyway).
func (r *Receiver) Receive(ctx context.Context, ids []int64) Response {
	d := Delivery{IDs: slices.Clone(ids), Seq: int(r.seq.Add(1))}
	select {
	case r.arrivals <- d:
	default: // nobody is watching arrivals this closely
	}
	r.mu.Lock()
	policy := r.policy
	r.mu.Unlock()

	// Free held attempts when the suite's test ends.
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() {
		select {
		case <-r.done:
			cancel()
		case <-ctx.Done():
		}
	}()
	resp := policy(ctx, d)
	if resp != Ack && resp != FailRetryable && resp != FailPermanent {
		resp = FailRetryable
	}
	r.mu.Lock()
	r.log = append(r.log, answered{Delivery: d, resp: resp})
	r.mu.Unlock()
	return resp
}

func (r *Receiver) setPolicy(p Policy) {
	r.mu.Lock()
	r.policy = p
	r.mu.Unlock()
}

func (r *Receiver) answers() []answered {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.log)
}

// deliveriesOf returns the answered attempts that carried id.
func (r *Receiver) deliveriesOf(id int64) []answered {
	var out []answered
	for _, a := range r.answers() {
		if slices.Contains(a.IDs, id) {
			out = append(out, a)
		}
	}
	return out
}

// Factory returns the sink under test, wired to deliver to rcv. The sink must
// be configured with a small in-memory retry budget (2 to 10 attempts) and
// backoffs of a few milliseconds; the factory registers its own cleanup.
type Factory func(t *testing.T, rcv *Receiver) sink.Sink

// wait bounds every wait of the suite; it is a safety net, not a timing
// assertion.
const wait = 10 * time.Second

// Option adapts Run to a documented behaviour of the sink under test.
type Option func(*options)

type options struct {
	inOrder bool
}

// InOrder declares that the sink sends the events of one Deliver call one
// after the other and, after a retryable failure of one, holds back the events
// that follow it until it is acknowledged, so that no event overtakes an
// earlier one (NATS JetStream: one publish, one PubAck per event). Run then
// accepts that events after the first failing one made no attempt once the
// retry budget is spent, provided they never reached the destination, and
// checks that a later event never reaches the destination before an earlier
// one is acknowledged.
func InOrder() Option { return func(o *options) { o.inOrder = true } }

// Run runs the conformance suite against the sinks newSink returns.
func Run(t *testing.T, newSink Factory, opts ...Option) {
	t.Helper()
	var o options
	for _, opt := range opts {
		opt(&o)
	}
	setup := func(t *testing.T) (sink.Sink, *Receiver) {
		t.Helper()
		rcv := newReceiver()
		s := newSink(t, rcv)
		require.NotNil(t, s)
		// Registered after the factory's cleanup, so it runs first and frees
		// any attempt still held before the destination shuts down.
		t.Cleanup(func() { close(rcv.done) })
		return s, rcv
	}

	t.Run("Name", func(t *testing.T) {
		t.Parallel()
		s, _ := setup(t)
		require.NotEmpty(t, s.Name())
	})

	t.Run("EmptyBatch", func(t *testing.T) {
		t.Parallel()
		s, rcv := setup(t)
		out := s.Deliver(t.Context(), nil)
		require.Empty(t, out)
		require.Empty(t, rcv.answers(), "nothing to deliver, nothing sent")
	})

	t.Run("AckSettles", func(t *testing.T) {
		t.Parallel()
		s, rcv := setup(t)
		evs := Events(101)
		out := s.Deliver(t.Context(), evs)
		require.Len(t, out, 1)
		require.NoError(t, out[0].Err)
		require.Equal(t, 1, out[0].Attempts)
		got := rcv.deliveriesOf(101)
		require.Len(t, got, 1)
		require.Equal(t, Ack, got[0].resp)
	})

	t.Run("OneOutcomePerEventInOrder", func(t *testing.T) {
		t.Parallel()
		for _, n := range []int{1, 2, 5} {
			t.Run(fmt.Sprint(n), func(t *testing.T) {
				s, rcv := setup(t)
				ids := make([]int64, n)
				for i := range ids {
					ids[i] = int64(200 + 10*n + i)
				}
				// Answer per content, so that a sink delivering one by one
				// gets different answers for different events: permanent
				// for the delivery of the second event alone, ack otherwise.
				rcv.setPolicy(func(_ context.Context, d Delivery) Response {
					if n > 1 && len(d.IDs) == 1 && d.IDs[0] == ids[1] {
						return FailPermanent
					}
					return Ack
				})
				evs := Events(ids...)
				out := s.Deliver(t.Context(), evs)
				require.Len(t, out, n)
				for i, id := range ids {
					seen := rcv.deliveriesOf(id)
					require.NotEmpty(t, seen, "event %d never reached the destination", id)
					last := seen[len(seen)-1]
					switch last.resp {
					case Ack:
						require.NoError(t, out[i].Err, "outcome %d (event %d)", i, id)
					case FailPermanent:
						require.ErrorIs(t, out[i].Err, sink.ErrPermanent, "outcome %d (event %d)", i, id)
					default:
						t.Fatalf("unexpected answer %s", last.resp)
					}
				}
			})
		}
	})

	t.Run("SettlesOnlyOnAcknowledgement", func(t *testing.T) {
		t.Parallel()
		s, rcv := setup(t)
		release := make(chan struct{})
		rcv.setPolicy(func(ctx context.Context, _ Delivery) Response {
			select {
			case <-release:
				return Ack
			case <-ctx.Done():
				return FailRetryable
			}
		})
		result := make(chan []sink.Outcome, 1)
		go func() { result <- s.Deliver(t.Context(), Events(301)) }()
		awaitArrival(t, rcv)
		select {
		case out := <-result:
			t.Fatalf("Deliver returned %+v before the destination answered", out)
		default:
		}
		close(release)
		out := awaitResult(t, result)
		require.Len(t, out, 1)
		require.NoError(t, out[0].Err)
	})

	t.Run("RetryableThenAck", func(t *testing.T) {
		t.Parallel()
		s, rcv := setup(t)
		rcv.setPolicy(func(_ context.Context, d Delivery) Response {
			if d.Seq <= 2 {
				return FailRetryable
			}
			return Ack
		})
		out := s.Deliver(t.Context(), Events(401))
		require.Len(t, out, 1)
		require.NoError(t, out[0].Err)
		seen := rcv.deliveriesOf(401)
		require.Len(t, seen, 3, "two retryable failures, then the acknowledgement")
		require.Equal(t, len(seen), out[0].Attempts)
	})

	t.Run("RetryableExhausted", func(t *testing.T) {
		t.Parallel()
		s, rcv := setup(t)
		rcv.setPolicy(func(context.Context, Delivery) Response { return FailRetryable })
		out := s.Deliver(t.Context(), Events(501, 502))
		require.Len(t, out, 2)
		for i, oc := range out {
			require.Error(t, oc.Err, "never acknowledged, never settled")
			require.NotErrorIs(t, oc.Err, sink.ErrPermanent, "a retryable failure is not permanent")
			require.NotErrorIs(t, oc.Err, sink.ErrGone)
			require.NotErrorIs(t, oc.Err, context.Canceled)
			require.NotErrorIs(t, oc.Err, context.DeadlineExceeded)
			if o.inOrder && i > 0 && oc.Attempts == 0 {
				require.Empty(t, rcv.deliveriesOf(502), "held back, so never sent")
				continue
			}
			require.GreaterOrEqual(t, oc.Attempts, 2, "retryable failures are retried in memory")
		}
		for _, a := range rcv.answers() {
			require.Equal(t, FailRetryable, a.resp)
		}
	})

	if o.inOrder {
		t.Run("InOrderAcrossRetries", func(t *testing.T) {
			t.Parallel()
			s, rcv := setup(t)
			var failed atomic.Bool
			rcv.setPolicy(func(_ context.Context, d Delivery) Response {
				if slices.Contains(d.IDs, 1001) && failed.CompareAndSwap(false, true) {
					return FailRetryable
				}
				return Ack
			})
			out := s.Deliver(t.Context(), Events(1001, 1002, 1003))
			require.Len(t, out, 3)
			for _, oc := range out {
				require.NoError(t, oc.Err)
			}
			var order []int64
			for _, a := range rcv.answers() {
				order = append(order, a.IDs...)
			}
			require.Equal(t, []int64{1001, 1001, 1002, 1003}, order,
				"after the failure of 1001, 1002 and 1003 wait for its acknowledgement")
			require.Equal(t, []int{2, 1, 1}, []int{out[0].Attempts, out[1].Attempts, out[2].Attempts})
		})
	}

	t.Run("PermanentNotRetried", func(t *testing.T) {
		t.Parallel()
		s, rcv := setup(t)
		rcv.setPolicy(func(context.Context, Delivery) Response { return FailPermanent })
		out := s.Deliver(t.Context(), Events(601))
		require.Len(t, out, 1)
		require.ErrorIs(t, out[0].Err, sink.ErrPermanent)
		require.Equal(t, 1, out[0].Attempts)
		require.Len(t, rcv.deliveriesOf(601), 1, "a permanent failure is not retried")
	})

	t.Run("CancelledBeforeDeliver", func(t *testing.T) {
		t.Parallel()
		s, rcv := setup(t)
		ctx, cancel := context.WithCancel(t.Context())
		cancel()
		out := s.Deliver(ctx, Events(701, 702))
		require.Len(t, out, 2)
		for _, o := range out {
			require.ErrorIs(t, o.Err, context.Canceled)
			require.NotErrorIs(t, o.Err, sink.ErrPermanent)
		}
		for _, a := range rcv.answers() {
			require.NotEqual(t, Ack, a.resp, "nothing acknowledged after cancellation")
		}
	})

	t.Run("CancelWhileInFlight", func(t *testing.T) {
		t.Parallel()
		s, rcv := setup(t)
		rcv.setPolicy(func(ctx context.Context, _ Delivery) Response {
			<-ctx.Done()
			return FailRetryable
		})
		ctx, cancel := context.WithCancel(t.Context())
		defer cancel()
		result := make(chan []sink.Outcome, 1)
		go func() { result <- s.Deliver(ctx, Events(801)) }()
		awaitArrival(t, rcv)
		cancel()
		out := awaitResult(t, result)
		require.Len(t, out, 1)
		require.ErrorIs(t, out[0].Err, context.Canceled)
		require.NotErrorIs(t, out[0].Err, sink.ErrPermanent)
	})

	t.Run("DeadlineWhileInFlight", func(t *testing.T) {
		t.Parallel()
		s, rcv := setup(t)
		rcv.setPolicy(func(ctx context.Context, _ Delivery) Response {
			<-ctx.Done()
			return FailRetryable
		})
		ctx, cancel := context.WithTimeout(t.Context(), 50*time.Millisecond)
		defer cancel()
		result := make(chan []sink.Outcome, 1)
		go func() { result <- s.Deliver(ctx, Events(901)) }()
		out := awaitResult(t, result)
		require.Len(t, out, 1)
		require.ErrorIs(t, out[0].Err, context.DeadlineExceeded)
		require.NotErrorIs(t, out[0].Err, sink.ErrPermanent)
	})
}

// Namespace is the message namespace of the events Events makes.
const Namespace = "5e75e75e75e75e75"

// MessageID returns the message id Events gives the event with id id.
func MessageID(id int64) string { return decode.MessageID(Namespace, id, time.Time{}) }

// Events returns events with the given ids, minimal envelope bodies
// {"id":<id>,"event_name":"sinktest"} and message ids MessageID(id).
func Events(ids ...int64) []*decode.Event {
	evs := make([]*decode.Event, len(ids))
	for i, id := range ids {
		evs[i] = &decode.Event{
			ID:        id,
			Name:      "sinktest",
			Body:      fmt.Appendf(nil, `{"id":%d,"event_name":"sinktest"}`, id),
			MessageID: MessageID(id),
		}
	}
	return evs
}

func awaitArrival(t *testing.T, rcv *Receiver) Delivery {
	t.Helper()
	select {
	case d := <-rcv.arrivals:
		return d
	case <-time.After(wait):
		t.Fatal("no delivery reached the destination")
		return Delivery{}
	}
}

func awaitResult(t *testing.T, result <-chan []sink.Outcome) []sink.Outcome {
	t.Helper()
	select {
	case out := <-result:
		return out
	case <-time.After(wait):
		t.Fatal("Deliver did not return")
		return nil
	}
}

// IDsFromJSON returns the "id" members of a JSON envelope or of a JSON array
// of envelopes, for adapters whose destination receives Body bytes.
func IDsFromJSON(body []byte) ([]int64, error) {
	type envelope struct {
		ID *int64 `json:"id"`
	}
	var envs []envelope
	trimmed := bytes.TrimSpace(body)
	if len(trimmed) > 0 && trimmed[0] == '[' {
		if err := json.Unmarshal(trimmed, &envs); err != nil {
			return nil, fmt.Errorf("decode envelope array: %w", err)
		}
	} else {
		var e envelope
		if err := json.Unmarshal(trimmed, &e); err != nil {
			return nil, fmt.Errorf("decode envelope: %w", err)
		}
		envs = []envelope{e}
	}
	ids := make([]int64, len(envs))
	for i, e := range envs {
		if e.ID == nil {
			return nil, fmt.Errorf("envelope %d has no id", i)
		}
		ids[i] = *e.ID
	}
	return ids, nil
}
