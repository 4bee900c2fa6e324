package telemetry

import (
	"context"
	"errors"
	"strconv"
	"sync"
	"time"

	"github.com/jackc/pglogrepl"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/trace"

	"github.com/outboxd/outboxd/checkpoint"
	"github.com/outboxd/outboxd/decode"
	"github.com/outboxd/outboxd/sink"
)

// Span names.
const (
	SpanTransaction = "outboxd.transaction"
	SpanAttempt     = "outboxd.delivery.attempt"
)

// Attribute keys of outboxd's spans.
const (
	AttrCommitLSN   = "outboxd.transaction.commit_lsn"
	AttrEndLSN      = "outboxd.transaction.end_lsn"
	AttrEventCount  = "outboxd.transaction.event_count"
	AttrCatchup     = "outboxd.transaction.catchup"
	AttrTarget      = "outboxd.target"
	AttrSink        = "outboxd.sink"
	AttrAttempt     = "outboxd.attempt"
	AttrEventID     = "outboxd.event.id"
	AttrEventIDs    = "outboxd.event.ids"
	AttrEventName   = "outboxd.event.name"
	AttrOutcome     = "outboxd.outcome"
	AttrRetry       = "outboxd.retry"
	AttrHTTPStatus  = "http.response.status_code"
	AttrAbandoned   = "outboxd.transaction.abandoned"
	AttrBatchEvents = "outboxd.batch.size"
)

// Outcomes of an attempt (AttrOutcome).
const (
	OutcomeDelivered = "delivered" // acknowledged
	OutcomeRetried   = "retried"   // failed; the same call tried again
	OutcomePermanent = "permanent" // refused for good: dead-lettered
	OutcomeGone      = "gone"      // 410: the target is disabled, the event parked
	OutcomeRetryable = "retryable" // failed, the call's attempts spent: parked or retried later
	OutcomeCancelled = "cancelled" // outboxd was stopping
)

// Delivery is the tracing of one sink call. A nil *Delivery (tracing off)
// does nothing.
type Delivery struct {
	tracer  trace.Tracer
	parent  context.Context
	opts    []trace.SpanStartOption
	pending trace.Span // the last attempt's span, ended by End with the call's outcome
	pendEnd time.Time
	start   time.Time
	seen    bool // an attempt was observed
}

// StartDelivery starts the tracing of a sink call of the dispatcher of
// target; it returns the ctx to call the sink with. Off, it returns ctx and
// nil, and allocates nothing.
func StartDelivery(ctx context.Context, target, sinkName string, events []*decode.Event) (context.Context, *Delivery) {
	st := active.Load()
	if st == nil || len(events) == 0 {
		return ctx, nil
	}
	return start(ctx, st, target, sinkName, events, txns.lookup(events[0]), false)
}

// StartRetry starts the tracing of the retrier's call of a parked delivery
// to target: its transaction span has long ended, so its spans have the
// row's traceparent as parent, or none.
func StartRetry(ctx context.Context, target, sinkName string, events []*decode.Event) (context.Context, *Delivery) {
	st := active.Load()
	if st == nil || len(events) == 0 {
		return ctx, nil
	}
	return start(ctx, st, target, sinkName, events, trace.SpanContext{}, true)
}

func start(ctx context.Context, st *state, target, sinkName string, events []*decode.Event, txn trace.SpanContext, retry bool) (context.Context, *Delivery) {
	attrs := []attribute.KeyValue{attribute.String(AttrTarget, target), attribute.String(AttrSink, sinkName)}
	if retry {
		attrs = append(attrs, attribute.Bool(AttrRetry, true))
	}
	var links []trace.Link
	if len(events) == 1 {
		attrs = append(attrs, attribute.Int64(AttrEventID, events[0].ID), attribute.String(AttrEventName, events[0].Name))
	} else {
		ids := make([]int64, len(events))
		for i, e := range events {
			ids[i] = e.ID
			if sc, ok := Traceparent(e.Traceparent); ok {
				links = append(links, trace.Link{SpanContext: sc})
			}
		}
		attrs = append(attrs, attribute.Int64Slice(AttrEventIDs, ids), attribute.Int(AttrBatchEvents, len(events)))
	}
	// The parent: the row's traceparent (one event), else the transaction's
	// span, linked to when the traceparent is the parent.
	parent := context.WithoutCancel(ctx)
	if sc, ok := Traceparent(events[0].Traceparent); ok && len(events) == 1 {
		parent = trace.ContextWithRemoteSpanContext(parent, sc)
		if txn.IsValid() {
			links = append(links, trace.Link{SpanContext: txn})
		}
	} else if txn.IsValid() {
		parent = trace.ContextWithSpanContext(parent, txn)
	}
	d := &Delivery{tracer: st.tracer, parent: parent, start: time.Now(),
		opts: []trace.SpanStartOption{trace.WithSpanKind(trace.SpanKindClient), trace.WithAttributes(attrs...), trace.WithLinks(links...)}}
	return sink.WithAttemptObserver(ctx, d.attempt), d
}

// attempt makes the span of one attempt. The last one is kept open until
// End tells the outcome of the call.
func (d *Delivery) attempt(a sink.Attempt) {
	d.seen = true
	if d.pending != nil {
		d.pending.SetAttributes(attribute.String(AttrOutcome, OutcomeRetried))
		d.pending.End(trace.WithTimestamp(d.pendEnd))
	}
	_, sp := d.tracer.Start(d.parent, SpanAttempt, append(d.opts, trace.WithTimestamp(a.Start))...)
	sp.SetAttributes(attribute.Int(AttrAttempt, a.Number))
	if a.Status != 0 {
		sp.SetAttributes(attribute.Int(AttrHTTPStatus, a.Status))
	}
	if a.Err != nil {
		sp.SetStatus(codes.Error, a.Err.Error())
	}
	d.pending, d.pendEnd = sp, a.End
}

// End ends the tracing of the call with its outcomes (the first event's is
// the call's). A call that reported no attempt but made some gets one span
// for the whole call.
func (d *Delivery) End(out []sink.Outcome) {
	if d == nil || len(out) == 0 {
		return
	}
	o := out[0]
	if !d.seen && o.Attempts > 0 {
		d.attempt(sink.Attempt{Number: o.Attempts, Status: o.Status, Err: o.Err, Start: d.start, End: time.Now()})
	}
	if d.pending == nil {
		return
	}
	if o.Err != nil {
		d.pending.SetStatus(codes.Error, o.Err.Error())
	}
	d.pending.SetAttributes(attribute.String(AttrOutcome, outcome(o.Err)))
	d.pending.End(trace.WithTimestamp(d.pendEnd))
	d.pending = nil
}

func outcome(err error) string {
	switch {
	case err == nil:
		return OutcomeDelivered
	case errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded):
		return OutcomeCancelled
	case errors.Is(err, sink.ErrGone):
		return OutcomeGone
	case errors.Is(err, sink.ErrPermanent):
		return OutcomePermanent
	}
	return OutcomeRetryable
}

// Traceparent parses a W3C traceparent (version 00's format; later versions
// are read as 00, per the recommendation) into a remote span context; ok is
// false when v is not one, or names the invalid all-zero trace or span.
func Traceparent(v string) (trace.SpanContext, bool) {
	if len(v) < 55 || v[2] != '-' || v[35] != '-' || v[52] != '-' || v[:2] == "ff" || (len(v) > 55 && v[55] != '-') {
		return trace.SpanContext{}, false
	}
	tid, err := trace.TraceIDFromHex(v[3:35])
	if err != nil {
		return trace.SpanContext{}, false
	}
	sid, err := trace.SpanIDFromHex(v[36:52])
	if err != nil {
		return trace.SpanContext{}, false
	}
	flags, err := strconv.ParseUint(v[53:55], 16, 8)
	if err != nil {
		return trace.SpanContext{}, false
	}
	sc := trace.NewSpanContext(trace.SpanContextConfig{TraceID: tid, SpanID: sid, TraceFlags: trace.TraceFlags(flags) & trace.FlagsSampled, Remote: true})
	return sc, sc.IsValid()
}

// Ledger is the checkpoint tracker as the reader and the router drive it.
type Ledger interface {
	Open(commitLSN pglogrepl.LSN, catchup bool) uint64
	Close(seq uint64, endLSN pglogrepl.LSN, events int) error
	Settle(seq uint64, s checkpoint.Settlement) error
	AdvanceIdle(lsn pglogrepl.LSN) bool
	Resume(lsn pglogrepl.LSN)
	Flushed() pglogrepl.LSN
	InFlight() int
}

// Transactions returns l with a span per transaction when tracing is on:
// opened with the transaction (its Begin, or the start of a catch-up),
// ended when every event of it has settled (delivered, parked or
// dead-lettered by every target). stop ends the spans of the transactions
// still open (the pipeline stopped). Off, it returns l and a no-op.
func Transactions(l Ledger) (ledger Ledger, stop func()) {
	st := active.Load()
	if st == nil {
		return l, func() {}
	}
	t := &txnLedger{Ledger: l, tracer: st.tracer}
	txns.set(t)
	return t, t.stop
}

// txns is the ledger whose transaction spans the dispatchers' spans are
// parented to: the pipeline running now.
var txns txnRegistry

type txnRegistry struct {
	mu sync.Mutex
	l  *txnLedger
}

func (r *txnRegistry) set(l *txnLedger) {
	r.mu.Lock()
	r.l = l
	r.mu.Unlock()
}

func (r *txnRegistry) clear(l *txnLedger) {
	r.mu.Lock()
	if r.l == l {
		r.l = nil
	}
	r.mu.Unlock()
}

// lookup returns the span context of e's transaction, invalid when it has
// none (or tracing of transactions is off).
func (r *txnRegistry) lookup(e *decode.Event) trace.SpanContext {
	r.mu.Lock()
	l := r.l
	r.mu.Unlock()
	if l == nil {
		return trace.SpanContext{}
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if x := l.open[e.TxnSeq]; x != nil {
		return l.span(x).SpanContext()
	}
	return trace.SpanContext{}
}

type txnLedger struct {
	Ledger
	tracer trace.Tracer

	mu   sync.Mutex
	open map[uint64]*txnSpan
}

// txnSpan is an open transaction. Its span is started (with the time of
// the Open) only once the transaction has an event: on servers before
// PostgreSQL 15, pgoutput sends every transaction of the database, empty
// ones included, and those get no span.
type txnSpan struct {
	span           trace.Span // nil until the first event
	opened         time.Time
	commitLSN      pglogrepl.LSN
	catchup        bool
	closed         bool
	total, settled int
}

// span returns x's span, starting it if need be. Caller holds mu.
func (t *txnLedger) span(x *txnSpan) trace.Span {
	if x.span == nil {
		attrs := []attribute.KeyValue{attribute.Bool(AttrCatchup, x.catchup)}
		if !x.catchup {
			attrs = append(attrs, attribute.String(AttrCommitLSN, x.commitLSN.String()))
		}
		_, x.span = t.tracer.Start(context.Background(), SpanTransaction, trace.WithNewRoot(), trace.WithTimestamp(x.opened),
			trace.WithSpanKind(trace.SpanKindConsumer), trace.WithAttributes(attrs...))
	}
	return x.span
}

func (t *txnLedger) Open(commitLSN pglogrepl.LSN, catchup bool) uint64 {
	seq := t.Ledger.Open(commitLSN, catchup)
	t.mu.Lock()
	if t.open == nil {
		t.open = map[uint64]*txnSpan{}
	}
	t.open[seq] = &txnSpan{opened: time.Now(), commitLSN: commitLSN, catchup: catchup}
	t.mu.Unlock()
	return seq
}

func (t *txnLedger) Close(seq uint64, endLSN pglogrepl.LSN, events int) error {
	if err := t.Ledger.Close(seq, endLSN, events); err != nil {
		return err
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	x := t.open[seq]
	if x == nil {
		return nil
	}
	x.closed, x.total = true, events
	if events == 0 && x.span == nil {
		delete(t.open, seq) // nothing in it for outboxd: no span
		return nil
	}
	t.span(x).SetAttributes(attribute.Int(AttrEventCount, events), attribute.String(AttrEndLSN, endLSN.String()))
	t.endIfDone(seq, x)
	return nil
}

func (t *txnLedger) Settle(seq uint64, s checkpoint.Settlement) error {
	if err := t.Ledger.Settle(seq, s); err != nil {
		return err
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if x := t.open[seq]; x != nil {
		x.settled++
		t.endIfDone(seq, x)
	}
	return nil
}

// endIfDone ends x's span once it is closed and all its events settled.
// Caller holds mu.
func (t *txnLedger) endIfDone(seq uint64, x *txnSpan) {
	if x.closed && x.settled >= x.total {
		t.span(x).End()
		delete(t.open, seq)
	}
}

// stop ends the spans still open, marked abandoned.
func (t *txnLedger) stop() {
	txns.clear(t)
	t.mu.Lock()
	defer t.mu.Unlock()
	for seq, x := range t.open {
		if x.span != nil || x.settled > 0 {
			sp := t.span(x)
			sp.SetAttributes(attribute.Bool(AttrAbandoned, true))
			sp.End()
		}
		delete(t.open, seq)
	}
}
