package fault

import (
	"fmt"
	"regexp"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// Check is what the checker computes for one scenario.
type Check struct {
	Expected   int // events that had to arrive
	Delivered  int // distinct expected events accepted
	Lost       int // expected events never accepted
	Duplicates int // accepted copies beyond the first, over all events
	MaxPerID   int // most accepted copies of one event
	Unexpected int // accepted events that were not expected
	OutOfOrder int // inversions of first receipts within an ordering key
	BadSig     int // requests whose signature did not verify
	// BadID counts single-event requests whose webhook-id is not a message
	// id of their event (evt_<namespace>_<id>_<occurred_at>, docs/DESIGN.md
	// §4), differs from an earlier copy's, names another event than an
	// earlier request with that webhook-id, or is in another namespace than
	// the others (one outbox per scenario).
	BadID   int
	LostIDs []int64
	// FirstAccepted maps each accepted id to the time of its first 2xx.
	FirstAccepted map[int64]time.Time
}

func (c Check) String() string {
	return fmt.Sprintf("expected=%d delivered=%d lost=%d duplicates=%d max_per_id=%d unexpected=%d out_of_order=%d bad_signatures=%d bad_webhook_ids=%d",
		c.Expected, c.Delivered, c.Lost, c.Duplicates, c.MaxPerID, c.Unexpected, c.OutOfOrder, c.BadSig, c.BadID)
}

// check compares deliveries with the expected ids (the table's truth, minus
// what the scenario excludes) and the generator's commit order.
//
// Order: for each organization, the sequence of first 2xx receipts of the ids
// the generator saw committed must follow commit order; each pair received
// the other way round counts as one inversion.
func check(expected []int64, order []Row, deliveries []Delivery) Check {
	want := make(map[int64]bool, len(expected))
	for _, id := range expected {
		want[id] = true
	}
	c := Check{Expected: len(want), FirstAccepted: map[int64]time.Time{}}
	copies := map[int64]int{}
	receipt := map[int64]int{} // id -> position of its first 2xx receipt
	pos := 0
	var ids webhookIDs
	for _, d := range deliveries {
		if !d.SigOK {
			c.BadSig++
		}
		if len(d.IDs) == 1 && !ids.ok(d.WebhookID, d.IDs[0]) {
			c.BadID++
		}
		if !d.Accepted() {
			continue
		}
		for _, id := range d.IDs {
			copies[id]++
			if copies[id] == 1 {
				receipt[id] = pos
				pos++
				c.FirstAccepted[id] = d.At
			}
		}
	}
	for id, n := range copies {
		if want[id] {
			c.Delivered++
		} else {
			c.Unexpected++
		}
		c.Duplicates += n - 1
		c.MaxPerID = max(c.MaxPerID, n)
	}
	for id := range want {
		if copies[id] == 0 {
			c.Lost++
			c.LostIDs = append(c.LostIDs, id)
		}
	}
	slices.Sort(c.LostIDs)
	if len(c.LostIDs) > 20 {
		c.LostIDs = c.LostIDs[:20]
	}

	// Per organization: receipt positions in commit order; inversions.
	byOrg := map[int64][]int{}
	for _, r := range order {
		if p, ok := receipt[r.ID]; ok {
			byOrg[r.Org] = append(byOrg[r.Org], p)
		}
	}
	for _, seq := range byOrg {
		c.OutOfOrder += inversions(seq)
	}
	return c
}

// messageIDRE is the form of a message id: namespace, row id and, when the
// row has one, occurred_at.
var messageIDRE = regexp.MustCompile(`^evt_([0-9a-f]{16})_(-?[0-9]+)(_[0-9a-z]+)?$`)

// webhookIDs checks the webhook-ids of single-event requests: each is a
// message id of its event, every copy of an event carries the same one, and
// no webhook-id names two events.
type webhookIDs struct {
	ns    string
	byID  map[int64]string
	event map[string]int64
}

func (w *webhookIDs) ok(wid string, id int64) bool {
	if w.byID == nil {
		w.byID, w.event = map[int64]string{}, map[string]int64{}
	}
	m := messageIDRE.FindStringSubmatch(wid)
	if m == nil || m[2] != strconv.FormatInt(id, 10) {
		return false
	}
	if w.ns == "" {
		w.ns = m[1]
	}
	if m[1] != w.ns {
		return false
	}
	if prev, seen := w.byID[id]; seen && prev != wid {
		return false
	}
	if prev, seen := w.event[wid]; seen && prev != id {
		return false
	}
	w.byID[id], w.event[wid] = wid, id
	return true
}

// inversions counts pairs i<j with s[i] > s[j] (merge sort, O(n log n)).
func inversions(s []int) int {
	a := slices.Clone(s)
	tmp := make([]int, len(a))
	var sortCount func(lo, hi int) int
	sortCount = func(lo, hi int) int {
		if hi-lo < 2 {
			return 0
		}
		mid := (lo + hi) / 2
		n := sortCount(lo, mid) + sortCount(mid, hi)
		i, j, k := lo, mid, lo
		for i < mid && j < hi {
			if a[i] <= a[j] {
				tmp[k] = a[i]
				i++
			} else {
				tmp[k] = a[j]
				n += mid - i
				j++
			}
			k++
		}
		copy(tmp[k:], a[i:mid])
		copy(tmp[k+mid-i:], a[j:hi])
		copy(a[lo:hi], tmp[lo:hi])
		return n
	}
	return sortCount(0, len(a))
}

// The checker is the suite's judge: test it on its own.
func TestChecker(t *testing.T) {
	t.Parallel()
	require.Equal(t, 0, inversions([]int{0, 1, 2, 3}))
	require.Equal(t, 6, inversions([]int{3, 2, 1, 0}))
	require.Equal(t, 1, inversions([]int{0, 2, 1, 3}))
	require.Equal(t, 3, inversions([]int{1, 2, 3, 0}))

	at := time.Now()
	mid := func(id int64) string { return "evt_0a1b2c3d4e5f6789_" + strconv.FormatInt(id, 10) + "_hoinb7omdc" }
	ok := func(ids ...int64) Delivery {
		orgs := make([]int64, len(ids))
		wid := "batch"
		if len(ids) == 1 {
			wid = mid(ids[0])
		}
		return Delivery{WebhookID: wid, IDs: ids, Orgs: orgs, SigOK: true, Status: 200, At: at}
	}
	failed := ok(2)
	failed.Status = 503
	order := []Row{{ID: 1, Org: 1}, {ID: 2, Org: 1}, {ID: 3, Org: 2}, {ID: 4, Org: 1}, {ID: 5, Org: 2}}
	// 4 arrives before 2 within org 1 (one inversion); 3 and 5 interleave
	// with org 1 freely; 2 is retried after a 503, 1 arrives twice; 9 was
	// never committed; 5 is lost.
	c := check([]int64{1, 2, 3, 4, 5}, order, []Delivery{ok(1), ok(3), failed, ok(4), ok(2), ok(1), ok(9)})
	require.Equal(t, 5, c.Expected)
	require.Equal(t, 4, c.Delivered)
	require.Equal(t, 1, c.Lost)
	require.Equal(t, []int64{5}, c.LostIDs)
	require.Equal(t, 1, c.Duplicates)
	require.Equal(t, 2, c.MaxPerID)
	require.Equal(t, 1, c.Unexpected)
	require.Equal(t, 1, c.OutOfOrder)
	require.Zero(t, c.BadSig)
	require.Zero(t, c.BadID)

	bad := ok(7)
	bad.WebhookID, bad.SigOK = mid(8), false
	c = check([]int64{7}, nil, []Delivery{bad})
	require.Equal(t, 1, c.BadID)
	require.Equal(t, 1, c.BadSig)
	require.Zero(t, c.Lost)

	// The bare row id (the first version's webhook-id), a copy with another
	// id, one webhook-id for two events, another namespace: all bad.
	with := func(id int64, wid string) Delivery { d := ok(id); d.WebhookID = wid; return d }
	for _, ds := range [][]Delivery{
		{with(7, "7")},
		{ok(7), with(7, "evt_0a1b2c3d4e5f6789_7_hoinb7omdd")},
		{ok(7), with(8, mid(7))},
		{ok(7), with(8, "evt_ffffffffffffffff_8_hoinb7omdc")},
	} {
		c = check([]int64{7, 8}, nil, ds)
		require.Equal(t, 1, c.BadID, "%+v", ds)
	}
}
