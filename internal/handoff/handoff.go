// Package handoff hands values from one goroutine to another in order, like a
// buffered channel, but wakes the receiving goroutine only when the sender
// says so.
//
// A channel wakes its receiver at every send that finds it waiting. Between
// the stages of the pipeline the receiver is usually faster than the sender,
// so it waits after every value, and each value costs a wake-up: a futex and
// a thread switch, which on a virtual machine cost more than the work itself.
// A Queue lets the sender put every value it has at hand (a chunk of the
// replication stream, a batch of routed events) and wake the receiver once,
// before it waits for more: Flush. A value put is handed over at once — it is
// the receiver's as soon as Put returns, exactly as after a channel send —
// only the wake-up waits.
package handoff

import "sync"

// Queue is a bounded FIFO of values from one sender to one receiver.
//
// The sender calls Put, and Flush before it waits for anything (the network,
// the database, room in the queue): values put and not flushed are in the
// queue, but a receiver that is waiting is not woken for them. Close ends the
// queue; it wakes the receiver.
//
// The receiver calls Take, and waits on Ready when it has nothing else to
// do; a signal of Ready may be stale (the values taken already): it takes
// again.
type Queue[T any] struct {
	mu       sync.Mutex
	items    []T
	capacity int
	closed   bool
	full     bool // the sender found no room and may be waiting on space
	flushes  int  // flushes of a queue that held values
	ready    chan struct{}
	space    chan struct{}
}

// New returns a queue that holds at most capacity values (at least 1).
func New[T any](capacity int) *Queue[T] {
	return &Queue[T]{capacity: max(capacity, 1), ready: make(chan struct{}, 1), space: make(chan struct{}, 1)}
}

func signal(c chan struct{}) {
	select {
	case c <- struct{}{}:
	default:
	}
}

// Put appends v and reports true, unless the queue is full: then it reports
// false, wakes the receiver, and the sender waits on Space before it tries
// again. Put never blocks and never wakes the receiver for a value it
// appended (Flush does). Put on a closed queue panics, like a send on a
// closed channel.
func (q *Queue[T]) Put(v T) bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.closed {
		panic("handoff: put on a closed queue")
	}
	if len(q.items) >= q.capacity {
		q.full = true
		signal(q.ready)
		return false
	}
	q.items = append(q.items, v)
	return true
}

// Flush wakes the receiver if there is something to take. A receiver that is
// busy is not woken: it finds the signal when it next waits.
func (q *Queue[T]) Flush() {
	q.mu.Lock()
	defer q.mu.Unlock()
	if len(q.items) > 0 {
		q.flushes++
		signal(q.ready)
	}
}

// Flushes returns how many times the sender flushed the queue while it held
// values: the wake-ups it asked for.
func (q *Queue[T]) Flushes() int {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.flushes
}

// Close ends the queue: the receiver takes what is in it, then learns it is
// closed. It wakes the receiver.
func (q *Queue[T]) Close() {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.closed = true
	signal(q.ready)
}

// Space is signalled when the receiver took values from a queue that the
// sender found full.
func (q *Queue[T]) Space() <-chan struct{} { return q.space }

// Take appends every value in the queue to dst, in order, and returns it with
// open true; or, the queue being empty, dst unchanged with open false if the
// queue is closed.
func (q *Queue[T]) Take(dst []T) (out []T, open bool) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if len(q.items) == 0 {
		return dst, !q.closed
	}
	dst = append(dst, q.items...)
	clear(q.items)
	q.items = q.items[:0]
	if q.full {
		q.full = false
		signal(q.space)
	}
	return dst, true
}

// Ready is signalled when values were flushed, the queue filled up, or it was
// closed. A signal may be stale: take again.
func (q *Queue[T]) Ready() <-chan struct{} { return q.ready }

// Len returns the number of values in the queue.
func (q *Queue[T]) Len() int {
	q.mu.Lock()
	defer q.mu.Unlock()
	return len(q.items)
}

// FromChan returns a queue fed from c, flushed after each value, and closed
// when c is: for a sender that has a channel (a test).
func FromChan[T any](c <-chan T, capacity int) *Queue[T] {
	q := New[T](capacity)
	go func() {
		defer q.Close()
		for v := range c {
			for !q.Put(v) {
				<-q.Space()
			}
			q.Flush()
		}
	}()
	return q
}

// ToChan returns a channel that receives what q hands over, closed when q
// is: for a receiver that wants a channel (a test).
func ToChan[T any](q *Queue[T]) <-chan T {
	c := make(chan T)
	go func() {
		defer close(c)
		var buf []T
		for {
			var open bool
			buf, open = q.Take(buf[:0])
			if !open {
				return
			}
			if len(buf) == 0 {
				<-q.Ready()
				continue
			}
			for _, v := range buf {
				c <- v
			}
		}
	}()
	return c
}
