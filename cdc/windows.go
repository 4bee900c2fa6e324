package cdc

import (
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"strconv"
	"time"

	"github.com/jackc/pgx/v5"

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

// commitMicros is the SQL expression of the commit time of the transaction
// whose id is xid, in microseconds since the Unix epoch (NULL when unknown).
func commitMicros(xid string) string {
	return "(extract(epoch FROM pg_xact_commit_timestamp(" + xid + ")) * 1000000)::bigint"
}

// history reads the subscriptions' routing history in the snapshot. Its
// commit times need track_commit_timestamp.
func (s *snapshot) history(ctx context.Context) (windows, error) {
	t := s.r.cfg.Table
	sql := `SELECT id, subscription_id, deleted, enabled, organization_id, array_to_json(events)::text,
  CASE WHEN since_always THEN NULL ELSE ` + commitMicros("xmin") + ` END
FROM ` + pgx.Identifier{t.Schema, store.SubscriptionHistoryTable}.Sanitize()
	rr := s.conn.ExecParams(ctx, sql, nil, nil, nil, nil)
	w := windows{}
	for rr.NextRow() {
		v := rr.Values()
		var e historyEntry
		var err error
		var sub int64
		if e.seq, err = strconv.ParseInt(string(v[0]), 10, 64); err == nil {
			sub, err = strconv.ParseInt(string(v[1]), 10, 64)
		}
		if err == nil && v[4] != nil {
			var org int64
			org, err = strconv.ParseInt(string(v[4]), 10, 64)
			e.state.OrganizationID = &org
		}
		if err == nil && v[5] != nil {
			err = json.Unmarshal(v[5], &e.state.Events)
		}
		if err == nil && v[6] != nil {
			var us int64
			us, err = strconv.ParseInt(string(v[6]), 10, 64)
			e.at = time.UnixMicro(us)
		}
		if err != nil {
			rr.Close() //nolint:errcheck // failing anyway
			return nil, fmt.Errorf("read subscription history: %w", err)
		}
		e.deleted = string(v[2]) == "t"
		e.state.Enabled = string(v[3]) == "t"
		w.add(sub, e)
	}
	if _, err := rr.Close(); err != nil {
		return nil, fmt.Errorf("read subscription history: %w", err)
	}
	w.sort()
	return w, nil
}
