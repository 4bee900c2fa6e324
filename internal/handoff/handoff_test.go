package handoff

import (
	"testing"
)

func ready[T any](q *Queue[T]) bool {
	select {
	case <-q.Ready():
		return true
	default:
		return false
	}
}

func TestWakesOnlyOnFlush(t *testing.T) {
	q := New[int](4)
	if got, open := q.Take(nil); len(got) != 0 || !open {
		t.Fatalf("empty queue: took %v, open %v", got, open)
	}
	q.Put(1)
	q.Put(2)
	if ready(q) {
		t.Fatal("the receiver was woken before the sender flushed")
	}
	q.Flush()
	if !ready(q) {
		t.Fatal("a flush did not wake the waiting receiver")
	}
	got, open := q.Take(nil)
	if len(got) != 2 || got[0] != 1 || got[1] != 2 || !open {
		t.Fatalf("took %v, open %v; want [1 2], open", got, open)
	}
	// A receiver busy elsewhere finds the signal when it next waits.
	q.Put(3)
	q.Flush()
	if got, _ := q.Take(nil); len(got) != 1 || got[0] != 3 {
		t.Fatalf("took %v, want [3]", got)
	}
	if !ready(q) {
		t.Fatal("no signal left for a receiver that took before it waited")
	}
	// A flush of an empty queue wakes nobody.
	q.Flush()
	if ready(q) {
		t.Fatal("a flush of an empty queue woke the receiver")
	}
}

func TestFullQueueWakesBothSides(t *testing.T) {
	q := New[int](2)
	q.Take(nil) // the receiver waits
	if !q.Put(1) || !q.Put(2) {
		t.Fatal("put refused below capacity")
	}
	if q.Put(3) {
		t.Fatal("put accepted beyond capacity")
	}
	if !ready(q) {
		t.Fatal("a full queue did not wake the waiting receiver")
	}
	select {
	case <-q.Space():
		t.Fatal("space signalled before the receiver took anything")
	default:
	}
	if got, _ := q.Take(nil); len(got) != 2 {
		t.Fatalf("took %v", got)
	}
	select {
	case <-q.Space():
	default:
		t.Fatal("taking from a full queue did not signal space")
	}
	if !q.Put(3) {
		t.Fatal("put refused after the receiver took")
	}
}

func TestCloseHandsOverTheRest(t *testing.T) {
	q := New[int](4)
	q.Take(nil)
	q.Put(1)
	q.Close()
	if !ready(q) {
		t.Fatal("close did not wake the receiver")
	}
	got, open := q.Take(nil)
	if len(got) != 1 || !open {
		t.Fatalf("took %v, open %v; want [1], open", got, open)
	}
	if got, open := q.Take(nil); len(got) != 0 || open {
		t.Fatalf("took %v, open %v from a closed, empty queue", got, open)
	}
}

// TestOrderAcrossGoroutines sends values with flushes at random points and
// a full queue now and then; the receiver gets each once, in order.
func TestOrderAcrossGoroutines(t *testing.T) {
	const n = 200000
	q := New[int](64)
	go func() {
		for i := range n {
			for !q.Put(i) {
				<-q.Space()
			}
			if i%7 == 0 || i%13 == 0 {
				q.Flush()
			}
		}
		q.Close()
	}()
	next := 0
	var buf []int
	for {
		var open bool
		buf, open = q.Take(buf[:0])
		if !open {
			break
		}
		if len(buf) == 0 {
			<-q.Ready()
			continue
		}
		for _, v := range buf {
			if v != next {
				t.Fatalf("got %d, want %d", v, next)
			}
			next++
		}
	}
	if next != n {
		t.Fatalf("received %d of %d values", next, n)
	}
}
