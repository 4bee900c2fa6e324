package deliver

import (
	"sync"
	"sync/atomic"

	"github.com/outboxd/outboxd/checkpoint"
	"github.com/outboxd/outboxd/decode"
	"github.com/outboxd/outboxd/store"
)

// Delivery is one event on its way to every target it was routed to. It
// settles with the checkpoint tracker once all of them have settled it.
type Delivery struct {
	Event *decode.Event
	// Key is the ordering key of the event; a target whose sink has several
	// destinations scopes it by destination (ScopedKey).
	Key uint64

	remaining atomic.Int32
	mu        sync.Mutex
	attempts  int32
	failed    bool
	dead      []store.DeadLetter
	parked    []store.Park
}

// NewDelivery returns a delivery routed to targets targets.
func NewDelivery(e *decode.Event, key uint64, targets int) *Delivery {
	d := &Delivery{Event: e, Key: key}
	d.remaining.Store(int32(targets))
	return d
}

// settledBy records one target's settlement and returns the event's
// settlement when it was the last target.
func (d *Delivery) settledBy(attempts int32, dead *store.DeadLetter, park *store.Park) (checkpoint.Settlement, bool) {
	d.mu.Lock()
	d.attempts += attempts
	if dead != nil {
		d.failed = true
		d.dead = append(d.dead, *dead)
	}
	if park != nil {
		d.failed = true
		d.parked = append(d.parked, *park)
	}
	d.mu.Unlock()
	if d.remaining.Add(-1) != 0 {
		return checkpoint.Settlement{}, false
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	s := checkpoint.Settlement{EventID: d.Event.ID, Attempts: d.attempts, Dead: d.dead, Parked: d.parked}
	if !d.failed {
		s.Mark = &store.Mark{ID: d.Event.ID, Attempts: d.attempts}
	}
	return s, true
}
