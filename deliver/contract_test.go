package deliver

import (
	"context"
	"encoding/json"
	"os"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"github.com/stretchr/testify/require"

	"github.com/outboxd/outboxd/checkpoint"
	"github.com/outboxd/outboxd/decode"
	"github.com/outboxd/outboxd/plan"
	"github.com/outboxd/outboxd/store"
)

// contractSettler records settlements and the last routing state.
type contractSettler struct {
	mu    sync.Mutex
	marks map[int64]bool
	dead  map[int64][]store.DeadLetter
	state []byte
	n     int
}

func (s *contractSettler) Settle(_ uint64, st checkpoint.Settlement) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.n++
	if st.Mark != nil {
		s.marks[st.Mark.ID] = true
	}
	s.dead[st.EventID] = append(s.dead[st.EventID], st.Dead...)
	if st.State != nil {
		s.state = st.State
	}
	return nil
}

var planRelation = &decode.Relation{Name: "outboxd_plan", Columns: []decode.Column{{Name: "singleton"}, {Name: "source"}, {Name: "source_sha256"}}}

func planChangeEvent(seq uint64, kind decode.Kind, source string, unchanged bool) *decode.Event {
	row := &decode.Row{Relation: planRelation, Values: [][]byte{[]byte("t"), []byte(source), []byte("sha-" + source[:min(len(source), 4)])}}
	if unchanged {
		row.Values[1], row.Unchanged = nil, []bool{false, true, false}
	}
	if kind == decode.KindDelete {
		row.Values = [][]byte{[]byte("t"), nil, nil}
	}
	return &decode.Event{TxnSeq: seq, Change: &decode.Change{Kind: kind, Row: row}}
}

func contractEvent(id int64, seq uint64, valid bool) *decode.Event {
	delta := `-2`
	if !valid {
		delta = `"two"`
	}
	body := `{"id":` + itoa(id) + `,"event_name":"inventory_adjusted","organization_id":7,"entity_type":"sku","entity_id":"s","schema_version":1,"properties":{"sku":"s","delta":` + delta + `,"reason":"sale"}}`
	return &decode.Event{ID: id, TxnSeq: seq, Name: "inventory_adjusted", OrganizationID: 7, HasOrganization: true, Body: []byte(body)}
}

func itoa(n int64) string { b, _ := json.Marshal(n); return string(b) }

func examplePlan(t *testing.T) string {
	t.Helper()
	data, err := os.ReadFile("../examples/tracking-plan/plan.yaml")
	require.NoError(t, err)
	return string(data)
}

// Three destinations with the three policies. Events before the plan's
// change are not validated; after it, an invalid event is delivered by the
// deliver destination, settled unsent by the skip one, dead-lettered by the
// dead-letter one with the rule; a plan change whose source pgoutput left
// unchanged keeps the plan, one that does not parse keeps the previous
// plan, and a delete turns validation off. The routing state carries the
// plan, and a router made from it validates as the first did.
func TestRouterContractPolicies(t *testing.T) {
	t.Parallel()
	cfg := Config{}.WithDefaults()
	web, ph, kafka := &recorder{}, &recorder{}, &recorder{}
	st := &contractSettler{marks: map[int64]bool{}, dead: map[int64][]store.DeadLetter{}}
	var mu sync.Mutex
	var verdicts []plan.Verdict
	settledBy := map[string]int{}
	cc := ContractConfig{
		Targets: map[string]ContractPolicy{"webhook": ContractDeliver, "posthog": ContractSkip, "kafka": ContractDeadLetter},
		OnCheck: func(v plan.Verdict, _ time.Duration) { mu.Lock(); verdicts = append(verdicts, v); mu.Unlock() },
		OnSettled: func(target string, p ContractPolicy) {
			mu.Lock()
			settledBy[target+"/"+string(p)]++
			mu.Unlock()
		},
	}
	dests := []Destination{{Name: "webhook", Sink: web}, {Name: "posthog", Sink: ph}, {Name: "kafka", Sink: kafka}}
	r, err := NewRouter(RouterConfig{Deliver: cfg, Destinations: dests, Contract: cc}, st, zerolog.Nop())
	require.NoError(t, err)
	source := examplePlan(t)
	in := make(chan *decode.Event, 16)
	in <- contractEvent(1, 1, false) // no plan yet
	in <- planChangeEvent(2, decode.KindInsert, source, false)
	in <- contractEvent(3, 3, true)
	in <- contractEvent(4, 4, false)
	in <- planChangeEvent(5, decode.KindUpdate, "", true) // applied_at only
	in <- contractEvent(6, 6, false)
	in <- planChangeEvent(7, decode.KindUpdate, "format: 1\nevents: [", false) // does not parse
	in <- contractEvent(8, 8, false)
	close(in)
	require.NoError(t, r.Run(context.Background(), in))

	require.Equal(t, []int64{1, 3, 4, 6, 8}, web.ids())
	require.Equal(t, []int64{1, 3}, ph.ids())
	require.Equal(t, []int64{1, 3}, kafka.ids())
	for _, id := range []int64{4, 6, 8} {
		require.False(t, st.marks[id], "event %d is dead-lettered for kafka: not marked", id)
		require.Len(t, st.dead[id], 1)
		require.Equal(t, "kafka", st.dead[id][0].Sink)
		require.Equal(t, "contract: properties.delta: got string, want number", st.dead[id][0].Reason)
	}
	require.True(t, st.marks[1] && st.marks[3])
	require.Len(t, verdicts, 4, "events 3, 4, 6, 8 validated; 1 came before the plan")
	require.Equal(t, map[string]int{"posthog/skip": 3, "kafka/dead-letter": 3}, settledBy)

	var rs routingState
	require.NoError(t, json.Unmarshal(st.state, &rs))
	require.NotNil(t, rs.Plan)
	require.Equal(t, source, rs.Plan.Source)
	require.JSONEq(t, "[]", string(rs.Subscriptions))

	// A router made from that state validates with the plan; Load is not
	// asked.
	web2, kafka2 := &recorder{}, &recorder{}
	cc.Load = func() ([]byte, string, bool, error) {
		t.Error("Load called with a state holding the plan")
		return nil, "", false, nil
	}
	st2 := &contractSettler{marks: map[int64]bool{}, dead: map[int64][]store.DeadLetter{}}
	r2, err := NewRouter(RouterConfig{Deliver: cfg, Routing: st.state, Contract: cc,
		Destinations: []Destination{{Name: "webhook", Sink: web2}, {Name: "kafka", Sink: kafka2}}}, st2, zerolog.Nop())
	require.NoError(t, err)
	in = make(chan *decode.Event, 4)
	in <- contractEvent(9, 9, false)
	in <- planChangeEvent(10, decode.KindDelete, "x", false)
	in <- contractEvent(11, 11, false)
	close(in)
	require.NoError(t, r2.Run(context.Background(), in))
	require.Equal(t, []int64{9, 11}, web2.ids())
	require.Equal(t, []int64{11}, kafka2.ids(), "after the plan's delete nothing is validated")
	require.NoError(t, json.Unmarshal(st2.state, &rs))
	require.Nil(t, rs.Plan, "the state says: no plan")
}

// A routing state without the plan (written by an earlier version, or none
// at all) takes the plan stored now, through Load; a state of an earlier
// version (the registry's array) still reads.
func TestRouterContractLoadsWithoutState(t *testing.T) {
	t.Parallel()
	source := examplePlan(t)
	for name, state := range map[string][]byte{"none": nil, "array": []byte(`[]`)} {
		web := &recorder{}
		st := &contractSettler{marks: map[int64]bool{}, dead: map[int64][]store.DeadLetter{}}
		loads := 0
		cc := ContractConfig{Default: ContractSkip, Load: func() ([]byte, string, bool, error) {
			loads++
			return []byte(source), "sha", true, nil
		}}
		r, err := NewRouter(RouterConfig{Deliver: Config{}.WithDefaults(), Routing: state, Contract: cc, Default: web}, st, zerolog.Nop())
		require.NoError(t, err, name)
		require.Equal(t, 1, loads, name)
		in := make(chan *decode.Event, 2)
		in <- contractEvent(1, 1, false)
		in <- contractEvent(2, 2, true)
		close(in)
		require.NoError(t, r.Run(context.Background(), in))
		require.Equal(t, []int64{2}, web.ids(), name)
		require.True(t, st.marks[1], "%s: a skipped event is settled as delivered", name)
	}
}

// A subscription's own policy (column contract) wins over the
// subscriptions' default; NULL takes the default. It survives the routing
// state.
func TestRouterSubscriptionContractColumn(t *testing.T) {
	t.Parallel()
	rel := &decode.Relation{Name: "outboxd_subscription", Columns: []decode.Column{
		{Name: "id"}, {Name: "organization_id"}, {Name: "url"}, {Name: "secrets"}, {Name: "events"}, {Name: "enabled"}, {Name: "contract"}}}
	sub := func(id, contract string) *decode.Event {
		row := &decode.Row{Relation: rel, Values: [][]byte{[]byte(id), []byte("7"), []byte("https://a"), []byte("{whsec_x}"), []byte("{}"), []byte("t"), nil}}
		if contract != "" {
			row.Values[6] = []byte(contract)
		}
		return &decode.Event{TxnSeq: 1, Change: &decode.Change{Kind: decode.KindInsert, Row: row}}
	}
	subs := &recordingSinks{got: map[int64][]int64{}, secrets: map[int64][]string{}}
	st := &contractSettler{marks: map[int64]bool{}, dead: map[int64][]store.DeadLetter{}}
	r, err := NewRouter(RouterConfig{Deliver: Config{}.WithDefaults(), Default: &recorder{}, Subscription: subs.build,
		Contract: ContractConfig{Subscriptions: ContractDeadLetter}}, st, zerolog.Nop())
	require.NoError(t, err)
	in := make(chan *decode.Event, 8)
	in <- sub("3", "skip")
	in <- sub("4", "")
	in <- sub("5", "deliver")
	in <- planChangeEvent(2, decode.KindInsert, examplePlan(t), false)
	in <- contractEvent(10, 3, false)
	in <- contractEvent(11, 4, true)
	close(in)
	require.NoError(t, r.Run(context.Background(), in))
	require.Equal(t, map[int64][]int64{3: {11}, 4: {11}, 5: {10, 11}}, subs.got)
	require.Len(t, st.dead[10], 1)
	require.Equal(t, "subscription:4", st.dead[10][0].Sink)
	require.Contains(t, string(st.state), `"contract":"skip"`)
	require.Contains(t, string(st.state), `"contract":"deliver"`)
}

// A destination's property filter comes before its contract policy: an
// invalid event its filter leaves out is not routed there at all (not
// dead-lettered there), and is marked once the others settle it; an invalid
// event the filter lets through gets the policy.
func TestRouterFilterBeforeContractPolicy(t *testing.T) {
	t.Parallel()
	cfg := Config{}.WithDefaults()
	web, kafka := &recorder{}, &recorder{}
	st := &contractSettler{marks: map[int64]bool{}, dead: map[int64][]store.DeadLetter{}}
	filter, err := CompileFilter(`id != 4`)
	require.NoError(t, err)
	cc := ContractConfig{Targets: map[string]ContractPolicy{"webhook": ContractDeliver, "kafka": ContractDeadLetter}}
	dests := []Destination{{Name: "webhook", Sink: web}, {Name: "kafka", Sink: kafka, Filter: filter}}
	r, err := NewRouter(RouterConfig{Deliver: cfg, Destinations: dests, Contract: cc}, st, zerolog.Nop())
	require.NoError(t, err)
	in := make(chan *decode.Event, 8)
	in <- planChangeEvent(2, decode.KindInsert, examplePlan(t), false)
	in <- contractEvent(3, 3, true)
	in <- contractEvent(4, 4, false) // invalid, filtered out of kafka
	in <- contractEvent(5, 5, false) // invalid, let through: dead-lettered there
	close(in)
	require.NoError(t, r.Run(context.Background(), in))

	require.Equal(t, []int64{3, 4, 5}, web.ids())
	require.Equal(t, []int64{3}, kafka.ids())
	require.Empty(t, st.dead[4], "filtered out of kafka: no dead letter there")
	require.True(t, st.marks[4], "delivered to the webhook, routed nowhere else: marked")
	require.Len(t, st.dead[5], 1)
	require.Equal(t, "kafka", st.dead[5][0].Sink)
	require.False(t, st.marks[5])
}

// The routing state with a plan is what json.Marshal makes of it: the
// registry's snapshot written in place, with a plan and without one.
func TestRoutingStateAsMarshalled(t *testing.T) {
	t.Parallel()
	r, err := NewRouter(RouterConfig{Deliver: Config{}.WithDefaults(), Default: &fakeSink{}}, newSettler(1), zerolog.Nop())
	require.NoError(t, err)
	for i := 1; i <= 3; i++ {
		_, err := r.reg.Apply(&decode.Change{Kind: decode.KindInsert,
			Row: subRow(strconv.Itoa(i), strconv.Itoa(i), "https://a/<"+strconv.Itoa(i)+">", "{whsec_x}", "{}", "t", "NULL", "2026-01-01", "2026-01-01")})
		require.NoError(t, err)
	}
	source := examplePlan(t)
	for _, src := range []string{"", source} {
		require.NoError(t, r.contract.set(src, "sha-"+strconv.Itoa(len(src))))
		want, err := json.Marshal(routingState{Subscriptions: r.reg.Snapshot(), Plan: r.contract.state()})
		require.NoError(t, err)
		got := r.snapshot()
		require.Equal(t, string(want), string(got))
		subs, plan, known, err := splitRouting(got)
		require.NoError(t, err)
		require.True(t, known)
		require.JSONEq(t, string(r.reg.Snapshot()), string(subs))
		if src == "" {
			require.Nil(t, plan)
		} else {
			require.Equal(t, src, plan.Source)
		}
	}
}
