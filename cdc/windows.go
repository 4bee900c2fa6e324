package cdc

import (
	"cmp"
	"context"
	"slices"
	"time"

	"github.com/outboxd/outboxd/decode"
	"github.com/outboxd/outboxd/store"
)

// historyEntry is one change of a subscription's routing: from at on (zero:
// since always, or a change whose commit time is not known), it was state,
// or it no longer existed.
type historyEntry struct {
	at      time.Time
	seq     int64 // the history row's id: order among changes of one moment
	deleted bool
	state   decode.SubscriptionAt
}

// windows is the routing history of every subscription, each sorted by
// (at, seq). It answers what a subscription was when a row committed, for
// the rows a catch-up reads.
type windows map[int64][]historyEntry

// At implements decode.SubscriptionWindows. A subscription with no entry at
// or before t did not exist yet: its state is "not enabled", and known.
func (w windows) At(id int64, t time.Time) (decode.SubscriptionAt, bool) {
	es, ok := w[id]
	if !ok {
		return decode.SubscriptionAt{}, false
	}
	i, _ := slices.BinarySearchFunc(es, t, func(e historyEntry, t time.Time) int {
		if e.at.After(t) {
			return 1
		}
		return -1 // at or before t: keep going right
	})
	if i == 0 || es[i-1].deleted {
		return decode.SubscriptionAt{}, true
	}
	return es[i-1].state, true
}

func (w windows) add(id int64, e historyEntry) { w[id] = append(w[id], e) }

func (w windows) sort() {
	for _, es := range w {
		slices.SortStableFunc(es, func(a, b historyEntry) int {
			return cmp.Or(a.at.Compare(b.at), cmp.Compare(a.seq, b.seq))
		})
	}
}

// history reads the subscriptions' routing history in the snapshot. Its
// commit times need track_commit_timestamp.
func (s *snapshot) history(ctx context.Context) (windows, error) {
	changes, err := store.SubscriptionHistory(ctx, s.conn, s.r.cfg.Table.Schema)
	if err != nil {
		return nil, err
	}
	w := windows{}
	for _, c := range changes {
		w.add(c.SubscriptionID, historyEntry{at: c.At, seq: c.Seq, deleted: c.Deleted, state: c.State})
	}
	w.sort()
	return w, nil
}
