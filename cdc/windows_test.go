package cdc

import (
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/outboxd/outboxd/decode"
)

func TestWindowsAt(t *testing.T) {
	t.Parallel()
	t0 := time.UnixMicro(1_000_000)
	at := func(d int) time.Time { return t0.Add(time.Duration(d) * time.Microsecond) }
	org := int64(5)
	w := windows{}
	// Subscription 1: since always enabled, disabled at 10, enabled at 20,
	// filtered at 30 and, in the same transaction as that (same moment,
	// later entry), its organization set; deleted at 40.
	w.add(1, historyEntry{seq: 1, state: decode.SubscriptionAt{Enabled: true}})
	w.add(1, historyEntry{at: at(20), seq: 3, state: decode.SubscriptionAt{Enabled: true}})
	w.add(1, historyEntry{at: at(10), seq: 2})
	w.add(1, historyEntry{at: at(30), seq: 5, state: decode.SubscriptionAt{Enabled: true, Events: []string{"batch_*"}, OrganizationID: &org}})
	w.add(1, historyEntry{at: at(30), seq: 4, state: decode.SubscriptionAt{Enabled: true, Events: []string{"batch_*"}}})
	w.add(1, historyEntry{at: at(40), seq: 6, deleted: true, state: decode.SubscriptionAt{Enabled: false}})
	// Subscription 2: created at 25.
	w.add(2, historyEntry{at: at(25), seq: 7, state: decode.SubscriptionAt{Enabled: true}})
	w.sort()

	for _, tc := range []struct {
		sub     int64
		t       int
		enabled bool
		known   bool
		events  []string
		org     bool
	}{
		{1, 5, true, true, nil, false},
		{1, 10, false, true, nil, false}, // the change's own moment: the change applies
		{1, 15, false, true, nil, false},
		{1, 20, true, true, nil, false},
		{1, 30, true, true, []string{"batch_*"}, true}, // the later entry of the moment wins
		{1, 35, true, true, []string{"batch_*"}, true},
		{1, 40, false, true, nil, false},
		{2, 24, false, true, nil, false}, // did not exist yet
		{2, 25, true, true, nil, false},
		{3, 25, false, false, nil, false}, // no history: unknown
	} {
		got, known := w.At(tc.sub, at(tc.t))
		require.Equal(t, tc.known, known, "sub %d at %d", tc.sub, tc.t)
		require.Equal(t, tc.enabled, got.Enabled, "sub %d at %d", tc.sub, tc.t)
		require.Equal(t, tc.events, got.Events, "sub %d at %d", tc.sub, tc.t)
		require.Equal(t, tc.org, got.OrganizationID != nil, "sub %d at %d", tc.sub, tc.t)
	}
}
