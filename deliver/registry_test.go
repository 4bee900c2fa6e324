package deliver

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"math/rand/v2"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgtype"
	"github.com/rs/zerolog"
	"github.com/stretchr/testify/require"

	"github.com/outboxd/outboxd/checkpoint"
	"github.com/outboxd/outboxd/decode"
	"github.com/outboxd/outboxd/sink"
)

func TestParseTextArray(t *testing.T) {
	t.Parallel()
	for in, want := range map[string][]string{
		"":                       nil,
		"{}":                     nil,
		"{a}":                    {"a"},
		"{whsec_a+b/c=,whsec_d}": {"whsec_a+b/c=", "whsec_d"},
		`{"a b","c,d","e\"f"}`:   {"a b", "c,d", `e"f`},
		"{NULL,x}":               {"x"},
		`{"NULL"}`:               {"NULL"},
	} {
		got, err := ParseTextArray(in)
		require.NoError(t, err, in)
		require.Equal(t, want, got, in)
	}
	for _, bad := range []string{"a", "{", `{"a}`, `{"a"b}`} {
		_, err := ParseTextArray(bad)
		require.Error(t, err, bad)
	}
}

func TestSubscriptionMatchesTenantsAndGlobs(t *testing.T) {
	t.Parallel()
	seven := int64(7)
	tenant := Subscription{ID: 1, OrganizationID: &seven, Enabled: true, Events: []string{"batch_*"}}
	platform := Subscription{ID: 2, Enabled: true}
	ev := func(org int64, has bool, name string) *decode.Event {
		return &decode.Event{Name: name, OrganizationID: org, HasOrganization: has}
	}
	require.True(t, tenant.Matches(ev(7, true, "batch_started")))
	require.False(t, tenant.Matches(ev(8, true, "batch_started")), "another tenant")
	require.False(t, tenant.Matches(ev(0, false, "batch_started")), "no organization: platform only")
	require.False(t, tenant.Matches(ev(7, true, "timer_started")), "glob")
	require.True(t, platform.Matches(ev(0, false, "anything")))
	require.True(t, platform.Matches(ev(8, true, "timer_started")))
	platform.Enabled = false
	require.False(t, platform.Matches(ev(8, true, "timer_started")))
}

func TestRegistryApplyAndSnapshot(t *testing.T) {
	t.Parallel()
	rel := &decode.Relation{Name: "outboxd_subscription", Columns: []decode.Column{
		{Name: "id", TypeOID: pgtype.Int8OID}, {Name: "organization_id", TypeOID: pgtype.Int8OID},
		{Name: "url", TypeOID: pgtype.TextOID}, {Name: "secrets", TypeOID: pgtype.TextArrayOID},
		{Name: "events", TypeOID: pgtype.TextArrayOID}, {Name: "enabled", TypeOID: pgtype.BoolOID},
	}}
	row := func(vals ...string) *decode.Row {
		r := &decode.Row{Relation: rel}
		for _, v := range vals {
			if v == "NULL" {
				r.Values = append(r.Values, nil)
			} else {
				r.Values = append(r.Values, []byte(v))
			}
		}
		return r
	}
	reg, err := NewRegistry(nil, nil)
	require.NoError(t, err)
	s, err := reg.Apply(&decode.Change{Kind: decode.KindInsert, Row: row("3", "7", "https://a", "{whsec_x}", "{}", "t")})
	require.NoError(t, err)
	require.Equal(t, int64(7), *s.OrganizationID)
	_, err = reg.Apply(&decode.Change{Kind: decode.KindInsert, Row: row("4", "NULL", "https://b", "{}", "{batch_*}", "f")})
	require.NoError(t, err)
	require.Nil(t, reg.Get(4).OrganizationID)

	again, err := NewRegistry(reg.Snapshot(), tableSecrets(map[int64][]string{3: {"whsec_x"}, 4: {}}))
	require.NoError(t, err)
	require.Equal(t, reg.Snapshot(), again.Snapshot(), "a snapshot round-trips")

	_, err = reg.Apply(&decode.Change{Kind: decode.KindDelete, Row: row("3", "NULL", "NULL", "NULL", "NULL", "NULL")})
	require.NoError(t, err)
	require.Nil(t, reg.Get(3))
	_, err = reg.Apply(&decode.Change{Kind: decode.KindIgnored})
	require.NoError(t, err)
	require.Nil(t, reg.Get(4), "a reset forgets everything")
}

// subRel is the subscription table as pgoutput announces it (every column of
// migrations/002_delivery.sql).
var subRel = &decode.Relation{Name: "outboxd_subscription", Columns: []decode.Column{
	{Name: "id", TypeOID: pgtype.Int8OID}, {Name: "organization_id", TypeOID: pgtype.Int8OID},
	{Name: "url", TypeOID: pgtype.TextOID}, {Name: "secrets", TypeOID: pgtype.TextArrayOID},
	{Name: "events", TypeOID: pgtype.TextArrayOID}, {Name: "enabled", TypeOID: pgtype.BoolOID},
	{Name: "disabled_reason", TypeOID: pgtype.TextOID}, {Name: "created_at", TypeOID: pgtype.TimestamptzOID},
	{Name: "updated_at", TypeOID: pgtype.TimestamptzOID},
}}

// unchanged stands for a column pgoutput sent as 'u' in subRow.
const unchanged = "\x00unchanged"

// subRow builds a row of subRel: "NULL" is NULL, unchanged is 'u'.
func subRow(vals ...string) *decode.Row {
	r := &decode.Row{Relation: subRel, Values: make([][]byte, len(vals))}
	for i, v := range vals {
		switch v {
		case "NULL":
		case unchanged:
			if r.Unchanged == nil {
				r.Unchanged = make([]bool, len(vals))
			}
			r.Unchanged[i] = true
		default:
			r.Values[i] = []byte(v)
		}
	}
	return r
}

// An UPDATE that does not touch the TOASTed secrets and events arrays sends
// them as unchanged: the registry keeps what it knew, it never reads them as
// NULL (which sent requests unsigned and matched every event).
func TestRegistryMergesUnchangedColumns(t *testing.T) {
	t.Parallel()
	reg, err := NewRegistry(nil, nil)
	require.NoError(t, err)
	_, err = reg.Apply(&decode.Change{Kind: decode.KindInsert,
		Row: subRow("3", "7", "https://a", "{whsec_x,whsec_y}", "{batch_*,timer_*}", "t", "NULL", "2026-01-01", "2026-01-01")})
	require.NoError(t, err)
	want := Subscription{ID: 3, OrganizationID: func() *int64 { o := int64(7); return &o }(), URL: "https://a",
		Secrets: []string{"whsec_x", "whsec_y"}, Events: []string{"batch_*", "timer_*"}, Enabled: true}
	require.Equal(t, want, *reg.Get(3))

	// subscription disable: only enabled, disabled_reason and updated_at sent.
	s, err := reg.Apply(&decode.Change{Kind: decode.KindUpdate,
		Row: subRow("3", "7", "https://a", unchanged, unchanged, "f", "410 Gone", "2026-01-01", "2026-01-02")})
	require.NoError(t, err)
	want.Enabled = false
	require.Equal(t, want, *s)
	require.Equal(t, want, *reg.Get(3))

	// The routing state kept with the checkpoint round-trips, and a registry
	// seeded from it merges the same way (the update after a restart).
	reg, err = NewRegistry(reg.Snapshot(), tableSecrets(map[int64][]string{3: {"whsec_x", "whsec_y"}}))
	require.NoError(t, err)
	s, err = reg.Apply(&decode.Change{Kind: decode.KindUpdate,
		Row: subRow("3", "7", unchanged, unchanged, unchanged, "t", "NULL", unchanged, "2026-01-03")})
	require.NoError(t, err)
	want.Enabled = true
	require.Equal(t, want, *s)
	require.True(t, s.Matches(&decode.Event{Name: "batch_started", OrganizationID: 7, HasOrganization: true}))
	require.False(t, s.Matches(&decode.Event{Name: "recipe_created", OrganizationID: 7, HasOrganization: true}), "the globs were kept")

	// A changed column is taken from the row, unchanged ones still merge; a
	// real NULL stays NULL.
	s, err = reg.Apply(&decode.Change{Kind: decode.KindUpdate,
		Row: subRow("3", "NULL", "https://b", "{whsec_z}", unchanged, "t", "NULL", unchanged, unchanged)})
	require.NoError(t, err)
	require.Nil(t, s.OrganizationID)
	require.Equal(t, "https://b", s.URL)
	require.Equal(t, []string{"whsec_z"}, s.Secrets)
	require.Equal(t, []string{"batch_*", "timer_*"}, s.Events)

	// The merged subscription shares nothing with the one it came from.
	before := reg.Get(3)
	_, err = reg.Apply(&decode.Change{Kind: decode.KindUpdate,
		Row: subRow("3", "NULL", "https://b", unchanged, unchanged, "f", "NULL", unchanged, unchanged)})
	require.NoError(t, err)
	reg.Get(3).Events[0] = "scribbled"
	require.Equal(t, "batch_*", before.Events[0])
}

// An update with unchanged columns of a subscription the registry does not
// know is refused, not guessed: the subscription is not routed at all, and
// the error says why. Unchanged columns the router does not read need no
// merge.
func TestRegistryUnknownSubscriptionWithUnchangedColumns(t *testing.T) {
	t.Parallel()
	reg, err := NewRegistry(nil, nil)
	require.NoError(t, err)
	s, err := reg.Apply(&decode.Change{Kind: decode.KindUpdate,
		Row: subRow("9", "7", "https://a", unchanged, unchanged, "t", "NULL", "2026-01-01", "2026-01-01")})
	require.ErrorIs(t, err, ErrUnknownUnchanged)
	require.ErrorContains(t, err, "subscription 9")
	require.ErrorContains(t, err, "secrets, events")
	require.Nil(t, s)
	require.Nil(t, reg.Get(9), "not routed with NULL secrets or globs")
	require.Equal(t, "[]", string(reg.Snapshot()))

	_, err = SubscriptionFromRow(subRow("9", "7", "https://a", unchanged, "{}", "t", "NULL", "2026-01-01", "2026-01-01"))
	require.ErrorIs(t, err, ErrUnknownUnchanged, "a row alone cannot stand for unchanged columns")

	// Known, then a delete and an update with unchanged columns: dropped.
	_, err = reg.Apply(&decode.Change{Kind: decode.KindInsert,
		Row: subRow("9", "7", "https://a", "{whsec_x}", "{}", "t", "NULL", "2026-01-01", "2026-01-01")})
	require.NoError(t, err)
	_, err = reg.Apply(&decode.Change{Kind: decode.KindDelete,
		Row: subRow("9", "NULL", "NULL", "NULL", "NULL", "NULL", "NULL", "NULL", "NULL")})
	require.NoError(t, err)
	_, err = reg.Apply(&decode.Change{Kind: decode.KindUpdate,
		Row: subRow("9", "7", "https://a", unchanged, "{}", "t", "NULL", "2026-01-01", "2026-01-01")})
	require.ErrorIs(t, err, ErrUnknownUnchanged)
	require.Nil(t, reg.Get(9))

	// Only columns outboxd does not read are unchanged: nothing to merge.
	s, err = reg.Apply(&decode.Change{Kind: decode.KindUpdate,
		Row: subRow("9", "7", "https://a", "{whsec_x}", "{}", "t", unchanged, unchanged, "2026-01-02")})
	require.NoError(t, err)
	require.Equal(t, []string{"whsec_x"}, s.Secrets)
	require.Equal(t, s, reg.Get(9))
}

// recordingSinks builds subscription sinks that acknowledge and record what
// they were built with and what they got.
type recordingSinks struct {
	mu      sync.Mutex
	built   []Subscription
	got     map[int64][]int64 // subscription id -> event ids
	secrets map[int64][]string
}

func (r *recordingSinks) build(s Subscription) (sink.Sink, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.built = append(r.built, s)
	return &fakeSink{DeliverFunc: func(_ context.Context, evs []*decode.Event) []sink.Outcome {
		r.mu.Lock()
		defer r.mu.Unlock()
		for _, e := range evs {
			r.got[s.ID] = append(r.got[s.ID], e.ID)
		}
		r.secrets[s.ID] = s.Secrets
		out := make([]sink.Outcome, len(evs))
		for i := range out {
			out[i].Attempts = 1
		}
		return out
	}}, nil
}

// runRouter routes items (subscription changes and events, in order)
// through a Router whose subscription sinks come from subs, and returns when
// all of it has settled.
func runRouter(t *testing.T, routing []byte, subs *recordingSinks, items ...*decode.Event) *fakeSettler {
	t.Helper()
	cfg := Config{Concurrency: 2}
	cfg = cfg.WithDefaults()
	require.NoError(t, cfg.Validate())
	ack := &fakeSink{DeliverFunc: func(_ context.Context, evs []*decode.Event) []sink.Outcome {
		out := make([]sink.Outcome, len(evs))
		for i := range out {
			out[i].Attempts = 1
		}
		return out
	}}
	st := newSettler(len(items) * 4)
	r, err := NewRouter(RouterConfig{Deliver: cfg, Default: ack, Subscription: subs.build, Routing: routing}, st, zerolog.Nop())
	require.NoError(t, err)
	in := make(chan *decode.Event, len(items))
	for _, e := range items {
		in <- e
	}
	close(in)
	require.NoError(t, r.Run(context.Background(), in))
	return st
}

func change(kind decode.Kind, row *decode.Row) *decode.Event {
	return &decode.Event{Change: &decode.Change{Kind: kind, Row: row}}
}

func orgEvent(id int64, name string) *decode.Event {
	return &decode.Event{ID: id, Name: name, OrganizationID: 7, HasOrganization: true}
}

// The defect end to end in the router: disable and enable a subscription
// whose secrets and globs are TOASTed, then route. Its sink is built with
// its secrets, and only events matching its globs reach it.
func TestRouterDisableEnableKeepsSecretsAndGlobs(t *testing.T) {
	t.Parallel()
	subs := &recordingSinks{got: map[int64][]int64{}, secrets: map[int64][]string{}}
	runRouter(t, nil, subs,
		change(decode.KindInsert, subRow("3", "7", "https://a", "{whsec_x,whsec_y}", "{batch_*}", "t", "NULL", "2026-01-01", "2026-01-01")),
		orgEvent(1, "batch_started"),
		change(decode.KindUpdate, subRow("3", "7", "https://a", unchanged, unchanged, "f", "NULL", "2026-01-01", "2026-01-02")),
		orgEvent(2, "batch_started"),
		change(decode.KindUpdate, subRow("3", "7", "https://a", unchanged, unchanged, "t", "NULL", "2026-01-01", "2026-01-03")),
		orgEvent(3, "batch_started"),
		orgEvent(4, "recipe_created"),
	)
	require.Equal(t, []int64{1, 3}, subs.got[3])
	require.Equal(t, []string{"whsec_x", "whsec_y"}, subs.secrets[3])
	for _, b := range subs.built {
		require.Equal(t, []string{"whsec_x", "whsec_y"}, b.Secrets, "a sink built without the secrets")
	}

	// An update with unchanged columns for a subscription the routing state
	// does not know: not routed at all (only the default target gets the
	// event), no sink built for it.
	subs = &recordingSinks{got: map[int64][]int64{}, secrets: map[int64][]string{}}
	st := runRouter(t, []byte(`[]`), subs,
		change(decode.KindUpdate, subRow("5", "7", "https://a", unchanged, unchanged, "t", "NULL", "2026-01-01", "2026-01-03")),
		orgEvent(5, "batch_started"),
	)
	require.Empty(t, subs.built)
	require.Empty(t, subs.got)
	require.Contains(t, st.marks, int64(5), "delivered to the default target")
	require.Empty(t, st.dead)
}

// A subscription without a signing secret never sends unsigned: its
// deliveries are dead-lettered with the reason, and its sink is never built.
// Once it gets a secret, it delivers.
func TestRouterSubscriptionWithoutSecretDeadLetters(t *testing.T) {
	t.Parallel()
	subs := &recordingSinks{got: map[int64][]int64{}, secrets: map[int64][]string{}}
	st := runRouter(t, nil, subs,
		change(decode.KindInsert, subRow("4", "7", "https://a", "{}", "{}", "t", "NULL", "2026-01-01", "2026-01-01")),
		orgEvent(1, "batch_started"),
		change(decode.KindInsert, subRow("6", "NULL", "https://b", "{NULL}", "{}", "t", "NULL", "2026-01-01", "2026-01-01")),
		&decode.Event{ID: 2, Name: "batch_started"}, // no organization: platform-wide subscriptions only
	)
	require.Empty(t, subs.built, "no sink for a subscription without a secret")
	require.Empty(t, subs.got)
	for _, id := range []int64{1, 2} {
		d, ok := st.dead[id]
		require.True(t, ok, "event %d not dead-lettered", id)
		require.True(t, strings.HasPrefix(d.Sink, "subscription:"), d.Sink)
	}
	require.Contains(t, st.dead[1].Reason, "subscription 4 has no signing secret")
	require.Contains(t, st.dead[2].Reason, "subscription 6 has no signing secret")
	require.Empty(t, st.marks, "a dead letter is not an acknowledgement")

	// Given a secret (its globs unchanged, merged from the routing state
	// the checkpoint kept), it delivers.
	routing := []byte(`[{"id":4,"organization_id":7,"url":"https://a","secrets":[],"events":["batch_*"],"enabled":true}]`)
	subs = &recordingSinks{got: map[int64][]int64{}, secrets: map[int64][]string{}}
	st = runRouter(t, routing, subs,
		change(decode.KindUpdate, subRow("4", "7", "https://a", "{whsec_x}", unchanged, "t", "NULL", "2026-01-01", "2026-01-02")),
		orgEvent(3, "batch_started"),
		orgEvent(4, "recipe_created"),
	)
	require.Len(t, subs.built, 1)
	require.Equal(t, []string{"whsec_x"}, subs.built[0].Secrets)
	require.Equal(t, []int64{3}, subs.got[4])
	require.Empty(t, st.dead)
}

// tableSecrets is a SecretLookup over a fixed subscription table of secrets
// (URLs https://a).
func tableSecrets(table map[int64][]string) SecretLookup {
	return func(ids []int64) (map[int64]Stored, error) {
		out := map[int64]Stored{}
		for _, id := range ids {
			if s, ok := table[id]; ok {
				out[id] = Stored{URL: "https://a", Secrets: s}
			}
		}
		return out, nil
	}
}

// The routing state kept in outboxd_checkpoint names secrets by fingerprint
// only; a registry seeded from it takes their values from the subscription
// table: the ones the state names, or the current ones when those are gone
// (rotated with --drop-old), or none when the row is gone (dead-lettered,
// never unsigned). A state written before migration 6 still works.
func TestRoutingStateHoldsNoSecret(t *testing.T) {
	t.Parallel()
	reg, err := NewRegistry(nil, nil)
	require.NoError(t, err)
	for _, id := range []string{"3", "4", "5"} {
		_, err = reg.Apply(&decode.Change{Kind: decode.KindInsert,
			Row: subRow(id, "7", "https://a", "{whsec_old,whsec_older}", "{}", "t", "NULL", "2026-01-01", "2026-01-01")})
		require.NoError(t, err)
	}
	snap := reg.Snapshot()
	require.NotContains(t, string(snap), "whsec_", "no secret in the routing state")
	require.Contains(t, string(snap), SecretFingerprint("whsec_old"))
	require.NotEqual(t, SecretFingerprint("whsec_old"), SecretFingerprint("whsec_older"))

	_, err = NewRegistry(snap, nil)
	require.Error(t, err, "fingerprints without a way to look secrets up")

	again, err := NewRegistry(snap, tableSecrets(map[int64][]string{
		3: {"whsec_new", "whsec_old"}, // rotated, the old one kept: sign with the state's
		4: {"whsec_new"},              // rotated with --drop-old: sign with the current one
		// 5 deleted since the checkpoint
	}))
	require.NoError(t, err)
	require.Equal(t, []string{"whsec_old"}, again.Get(3).Secrets)
	require.Equal(t, []string{"whsec_new"}, again.Get(4).Secrets)
	require.Empty(t, again.Get(5).Secrets)
	require.Error(t, again.Get(5).signingError(), "a subscription without a secret never sends unsigned")
	require.Empty(t, again.Get(3).SecretFingerprints)

	// A URL with a token is secret material too: by fingerprint, its value
	// from the table (the current one when it changed); none when the row
	// is gone.
	reg, err = NewRegistry(nil, nil)
	require.NoError(t, err)
	_, err = reg.Apply(&decode.Change{Kind: decode.KindInsert,
		Row: subRow("6", "7", "https://u:pw@a/h?token=t0k3n", "{whsec_old}", "{}", "t", "NULL", "2026-01-01", "2026-01-01")})
	require.NoError(t, err)
	_, err = reg.Apply(&decode.Change{Kind: decode.KindInsert,
		Row: subRow("8", "7", "https://a/h?token=t0k3n", "{whsec_old}", "{}", "t", "NULL", "2026-01-01", "2026-01-01")})
	require.NoError(t, err)
	snap = reg.Snapshot()
	require.NotContains(t, string(snap), "t0k3n")
	require.NotContains(t, string(snap), "pw@")
	again, err = NewRegistry(snap, func(ids []int64) (map[int64]Stored, error) {
		return map[int64]Stored{6: {URL: "https://u:pw@a/h?token=t0k3n", Secrets: []string{"whsec_old"}}}, nil
	})
	require.NoError(t, err)
	require.Equal(t, "https://u:pw@a/h?token=t0k3n", again.Get(6).URL)
	require.Empty(t, again.Get(8).URL, "row gone: no URL to send to")

	old, err := NewRegistry([]byte(`[{"id":9,"organization_id":null,"url":"https://b","secrets":["whsec_plain"],"events":[],"enabled":true}]`), nil)
	require.NoError(t, err)
	require.Equal(t, []string{"whsec_plain"}, old.Get(9).Secrets, "a state from before migration 6")
	require.NotContains(t, string(old.Snapshot()), "whsec_plain", "rewritten without it")
}

// A subscription with deliveries parked in the table that the router learns
// of only through a change (the catch-up after a slot reset seeds the
// registry that way, and skips parked rows) gets its target at once, so the
// retrier sees it among the live targets. Found by the soak: after a reset,
// 41,012 parked deliveries of a subscription were never retried.
func TestRouterStartsTargetsWithParkedDeliveriesOnChange(t *testing.T) {
	t.Parallel()
	cfg := Config{Concurrency: 1}
	cfg = cfg.WithDefaults()
	require.NoError(t, cfg.Validate())
	subs := &recordingSinks{got: map[int64][]int64{}, secrets: map[int64][]string{}}
	r, err := NewRouter(RouterConfig{Deliver: cfg, Default: &fakeSink{}, Subscription: subs.build,
		Parked: map[string]map[uint64]int{"subscription:3": {15: 2}}}, newSettler(8), zerolog.Nop())
	require.NoError(t, err)
	in := make(chan *decode.Event, 4)
	done := make(chan error, 1)
	go func() { done <- r.Run(context.Background(), in) }()
	require.NotContains(t, r.LiveTargets(), "subscription:3")
	in <- change(decode.KindIgnored, nil) // the catch-up's reset of the registry
	in <- change(decode.KindInsert, subRow("3", "7", "https://a", "{whsec_x}", "{}", "t", "NULL", "2026-01-01", "2026-01-01"))
	in <- change(decode.KindInsert, subRow("4", "7", "https://b", "{whsec_x}", "{}", "t", "NULL", "2026-01-01", "2026-01-01"))
	close(in)
	require.NoError(t, <-done)
	require.Contains(t, r.LiveTargets(), "subscription:3", "its parked deliveries are reachable")
	require.NotContains(t, r.LiveTargets(), "subscription:4", "nothing parked, no event: not started")
}

// The organization index offers each event every subscription Matches may
// accept, through inserts, organization changes, deletes and resets in any
// order: routing by candidates equals routing by a scan of all.
func TestRegistryCandidatesEqualAScan(t *testing.T) {
	t.Parallel()
	rng := rand.New(rand.NewPCG(1, 2))
	reg, err := NewRegistry(nil, nil)
	require.NoError(t, err)
	org := func() string {
		if rng.IntN(4) == 0 {
			return "NULL"
		}
		return strconv.Itoa(rng.IntN(5))
	}
	matched := func(each func(*decode.Event, func(*Subscription)), e *decode.Event) []int64 {
		var ids []int64
		each(e, func(s *Subscription) {
			if s.Matches(e) {
				ids = append(ids, s.ID)
			}
		})
		slices.Sort(ids)
		return ids
	}
	scan := func(_ *decode.Event, f func(*Subscription)) { reg.Each(f) }
	for step := range 3000 {
		id := strconv.Itoa(rng.IntN(20) + 1)
		var c *decode.Change
		switch k := rng.IntN(20); {
		case k == 0:
			c = &decode.Change{Kind: decode.KindIgnored} // a reset
		case k < 5:
			c = &decode.Change{Kind: decode.KindDelete, Row: subRow(id, "NULL", "NULL", "NULL", "NULL", "NULL", "NULL", "NULL", "NULL")}
		default:
			enabled := []string{"t", "f"}[rng.IntN(2)]
			events := []string{"{}", "{batch_*}"}[rng.IntN(2)]
			c = &decode.Change{Kind: decode.KindUpdate, Row: subRow(id, org(), "https://h", "{whsec_x}", events, enabled, "NULL", "NULL", "NULL")}
		}
		_, err := reg.Apply(c)
		require.NoError(t, err)
		e := &decode.Event{ID: int64(step), Name: []string{"batch_started", "timer_started"}[rng.IntN(2)]}
		if o := rng.IntN(6); o < 5 {
			e.OrganizationID, e.HasOrganization = int64(o), true
		}
		require.Equal(t, matched(scan, e), matched(reg.EachCandidate, e), "step %d, event %+v", step, e)
	}
	require.NotEmpty(t, reg.subs)
}

// stateSettler records, per transaction, how many settlements came and the
// routing states among them.
type stateSettler struct {
	mu      sync.Mutex
	settled map[uint64]int
	states  map[uint64][][]byte
}

func (s *stateSettler) Settle(seq uint64, st checkpoint.Settlement) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.settled[seq]++
	if st.State != nil {
		s.states[seq] = append(s.states[seq], st.State)
	}
	return nil
}

// A transaction of many subscription changes settles each of them and
// snapshots the registry once, after its last change; each transaction
// keeps its own state, taken before a later transaction's change applies.
func TestRouterSnapshotsOncePerTransactionOfChanges(t *testing.T) {
	t.Parallel()
	cfg := Config{Concurrency: 2}.WithDefaults()
	require.NoError(t, cfg.Validate())
	st := &stateSettler{settled: map[uint64]int{}, states: map[uint64][][]byte{}}
	subs := &recordingSinks{got: map[int64][]int64{}, secrets: map[int64][]string{}}
	r, err := NewRouter(RouterConfig{Deliver: cfg, Default: &fakeSink{}, DefaultEvents: []string{"none"}, Subscription: subs.build}, st, zerolog.Nop())
	require.NoError(t, err)
	const n = 500
	in := make(chan *decode.Event, n+2)
	for i := range n {
		c := change(decode.KindInsert, subRow(strconv.Itoa(i+1), strconv.Itoa(i), "https://a", "{whsec_x}", "{}", "t", "NULL", "2026-01-01", "2026-01-01"))
		c.TxnSeq = 1
		in <- c
	}
	last := change(decode.KindDelete, subRow("1", "NULL", "NULL", "NULL", "NULL", "NULL", "NULL", "NULL", "NULL"))
	last.TxnSeq = 2
	in <- last
	close(in)
	require.NoError(t, r.Run(context.Background(), in))

	require.Equal(t, map[uint64]int{1: n, 2: 1}, st.settled, "every change settles")
	require.Equal(t, 1, len(st.states[1]), "one snapshot for the transaction")
	var first, second []Subscription
	require.NoError(t, json.Unmarshal(st.states[1][0], &first))
	require.NoError(t, json.Unmarshal(st.states[2][0], &second))
	require.Len(t, first, n, "the state after the transaction's last change")
	require.Len(t, second, n-1)
}

// A target's loop runs while it has deliveries to settle: with a thousand
// tenant subscriptions, each sent one event, the loops stop once their
// events settled, and a target sent another event later runs again.
func TestIdleTargetsStopAndRestart(t *testing.T) {
	t.Parallel()
	cfg := Config{Concurrency: 2}.WithDefaults()
	require.NoError(t, cfg.Validate())
	st := newSettler(4000)
	subs := &recordingSinks{got: map[int64][]int64{}, secrets: map[int64][]string{}}
	r, err := NewRouter(RouterConfig{Deliver: cfg, Default: &fakeSink{}, DefaultEvents: []string{"none"}, Subscription: subs.build}, st, zerolog.Nop())
	require.NoError(t, err)
	const n = 1000
	in := make(chan *decode.Event, 2*n+2)
	for i := range n {
		c := change(decode.KindInsert, subRow(strconv.Itoa(i+1), strconv.Itoa(i+1), "https://a", "{whsec_x}", "{}", "t", "NULL", "2026-01-01", "2026-01-01"))
		c.TxnSeq = 1
		in <- c
	}
	for i := range n {
		in <- &decode.Event{ID: int64(i + 1), Name: "batch_started", OrganizationID: int64(i + 1), HasOrganization: true, TxnSeq: 2}
	}
	done := make(chan error, 1)
	go func() { done <- r.Run(context.Background(), in) }()
	settledAll := func(want int) func() bool {
		return func() bool {
			subs.mu.Lock()
			defer subs.mu.Unlock()
			got := 0
			for _, ids := range subs.got {
				got += len(ids)
			}
			return got == want && r.Loops() == 1 // the default target's loop stays
		}
	}
	require.Eventually(t, settledAll(n), 30*time.Second, 5*time.Millisecond, "every event delivered and every subscription's loop stopped")
	require.Len(t, subs.built, n)

	// Organization 7's target runs again for a later event.
	in <- &decode.Event{ID: n + 1, Name: "batch_started", OrganizationID: 7, HasOrganization: true, TxnSeq: 3}
	require.Eventually(t, settledAll(n+1), 30*time.Second, 5*time.Millisecond)
	subs.mu.Lock()
	require.Equal(t, []int64{7, n + 1}, subs.got[7])
	subs.mu.Unlock()
	close(in)
	require.NoError(t, <-done)
}

// kindRel is the subscription table with migration 13's kind and settings.
var kindRel = &decode.Relation{Name: "outboxd_subscription", Columns: []decode.Column{
	{Name: "id", TypeOID: pgtype.Int8OID}, {Name: "url", TypeOID: pgtype.TextOID},
	{Name: "secrets", TypeOID: pgtype.TextArrayOID}, {Name: "events", TypeOID: pgtype.TextArrayOID},
	{Name: "enabled", TypeOID: pgtype.BoolOID}, {Name: "kind", TypeOID: pgtype.TextOID},
	{Name: "settings", TypeOID: pgtype.JSONBOID},
}}

// A subscription's kind and settings are read from the row ('webhook' is
// the webhook kind, ""), merged when sent unchanged (TOASTed settings), and
// kept in the routing state, so a restart builds the same sink; only a
// webhook needs a signing secret. A settings key naming a secret (a row
// written where the column's CHECK was dropped) is never kept in the
// routing state.
func TestRegistrySubscriptionKinds(t *testing.T) {
	t.Parallel()
	row := func(vals ...string) *decode.Row {
		r := subRow(vals...)
		r.Relation = kindRel
		return r
	}
	reg, err := NewRegistry(nil, nil)
	require.NoError(t, err)
	_, err = reg.Apply(&decode.Change{Kind: decode.KindInsert, Row: row("1", "https://a", "{whsec_x}", "{}", "t", "webhook", "{}")})
	require.NoError(t, err)
	require.True(t, reg.Get(1).IsWebhook())
	require.Nil(t, reg.Get(1).Settings)
	_, err = reg.Apply(&decode.Change{Kind: decode.KindInsert,
		Row: row("2", "", "{}", "{}", "t", "posthog", `{"HOST": "https://eu.i.posthog.com", "PROJECT_API_KEY_ENV": "OUTBOXD_SECRET_T2"}`)})
	require.NoError(t, err)
	ph := reg.Get(2)
	require.Equal(t, "posthog", ph.Kind)
	require.Equal(t, map[string]string{"HOST": "https://eu.i.posthog.com", "PROJECT_API_KEY_ENV": "OUTBOXD_SECRET_T2"}, ph.Settings)
	require.NoError(t, ph.signingError(), "no signing secret needed")
	require.Error(t, (&Subscription{ID: 3}).signingError(), "a webhook needs one")

	s, err := reg.Apply(&decode.Change{Kind: decode.KindUpdate, Row: row("2", "", "{}", "{}", "f", unchanged, unchanged)})
	require.NoError(t, err)
	require.Equal(t, "posthog", s.Kind)
	require.Equal(t, ph.Settings, s.Settings)
	require.False(t, s.Enabled)

	reg2, err := NewRegistry(reg.Snapshot(), tableSecrets(map[int64][]string{1: {"whsec_x"}}))
	require.NoError(t, err)
	require.Equal(t, "posthog", reg2.Get(2).Kind)
	require.Equal(t, ph.Settings, reg2.Get(2).Settings)
	require.True(t, reg2.Get(1).IsWebhook())

	_, err = reg.Apply(&decode.Change{Kind: decode.KindInsert, Row: row("4", "", "{}", "{}", "t", "ga4", `{"API_SECRET": "s3cr3t-value", "CLIENT_ID_KEY": "s3cr3t-two"}`)})
	require.NoError(t, err)
	require.NotContains(t, string(reg.Snapshot()), "s3cr3t-value")
	require.NotContains(t, string(reg.Snapshot()), "s3cr3t-two", "every key naming a secret")
	require.Contains(t, string(reg.Snapshot()), `"API_SECRET":""`, "the key stays: the subscription stays refused")

	// Settings that are not an object of strings (only if the CHECK was
	// dropped): the change is applied, enabled flag included, and the
	// subscription refuses its deliveries with the reason, for good.
	_, err = reg.Apply(&decode.Change{Kind: decode.KindInsert, Row: row("5", "", "{}", "{}", "t", "kafka", `{"TOPIC": "a"}`)})
	require.NoError(t, err)
	s, err = reg.Apply(&decode.Change{Kind: decode.KindUpdate, Row: row("5", "", "{}", "{}", "f", "kafka", `{"TOPIC": 7}`)})
	require.NoError(t, err)
	require.False(t, s.Enabled, "the rest of the change applies")
	require.ErrorContains(t, s.settingsErr, "settings are not an object of strings")
	r := &Router{log: zerolog.Nop(), closers: map[string]func(){}}
	snk, err := r.subscriptionSink(*s)
	require.NoError(t, err)
	out := snk.Deliver(context.Background(), []*decode.Event{{ID: 1}})
	require.ErrorIs(t, out[0].Err, sink.ErrPermanent)
	require.ErrorContains(t, out[0].Err, "subscription 5 is unusable")
}

// closingSink is a sink with a Close, as Kafka's and NATS's have.
type closingSink struct {
	fakeSink
	closed chan struct{}
}

func (s *closingSink) Close() { close(s.closed) }

// A subscription of another kind holds a connection: when a change of its
// settings builds its sink anew, the one replaced is closed, and the last
// one when the router stops. Webhook sinks share one client and are not.
func TestRouterClosesReplacedSubscriptionSinks(t *testing.T) {
	t.Parallel()
	row := func(vals ...string) *decode.Row {
		r := subRow(vals...)
		r.Relation = kindRel
		return r
	}
	var mu sync.Mutex
	var built []*closingSink
	build := func(s Subscription) (sink.Sink, error) {
		mu.Lock()
		defer mu.Unlock()
		c := &closingSink{closed: make(chan struct{}), fakeSink: fakeSink{DeliverFunc: func(_ context.Context, evs []*decode.Event) []sink.Outcome {
			out := make([]sink.Outcome, len(evs))
			for i := range out {
				out[i].Attempts = 1
			}
			return out
		}}}
		built = append(built, c)
		return c, nil
	}
	cfg := Config{Concurrency: 2}.WithDefaults()
	require.NoError(t, cfg.Validate())
	r, err := NewRouter(RouterConfig{Deliver: cfg, Default: &fakeSink{DeliverFunc: func(_ context.Context, evs []*decode.Event) []sink.Outcome {
		return make([]sink.Outcome, len(evs))
	}}, Subscription: build}, newSettler(32), zerolog.Nop())
	require.NoError(t, err)
	in := make(chan *decode.Event, 8)
	in <- change(decode.KindInsert, row("5", "", "{}", "{}", "t", "kafka", `{"TOPIC": "a"}`))
	in <- orgEvent(1, "batch_started")
	in <- change(decode.KindUpdate, row("5", "", "{}", "{}", "t", "kafka", `{"TOPIC": "b"}`))
	in <- orgEvent(2, "batch_started")
	close(in)
	require.NoError(t, r.Run(context.Background(), in))
	mu.Lock()
	defer mu.Unlock()
	// Built at a first delivery (both events may go through the second
	// sink, routed after the change): every one built is closed.
	require.NotEmpty(t, built)
	for i, c := range built {
		select {
		case <-c.closed:
		case <-time.After(time.Minute):
			t.Fatalf("sink %d was never closed", i)
		}
	}
}

// A subscription sink of another kind is built at its first delivery; a
// build that fails for a reason that may pass fails the deliveries
// retryably (they park) and is tried again at the next delivery; one the
// row's settings make fail dead-letters them (sink.ErrPermanent); closed,
// it closes what it built and fails retryably.
func TestLazySubscriptionSink(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	evs := []*decode.Event{{ID: 1}}
	var calls int
	var built *closingSink
	l := &lazySink{name: "subscription:9", build: func() (sink.Sink, error) {
		calls++
		if calls == 1 {
			return nil, errors.New("reach brokers: connection refused")
		}
		built = &closingSink{closed: make(chan struct{}), fakeSink: fakeSink{DeliverFunc: func(_ context.Context, evs []*decode.Event) []sink.Outcome {
			return make([]sink.Outcome, len(evs))
		}}}
		return built, nil
	}}
	out := l.Deliver(ctx, evs)
	require.ErrorContains(t, out[0].Err, "connection refused")
	require.NotErrorIs(t, out[0].Err, sink.ErrPermanent, "retryable: the delivery parks")
	require.NoError(t, l.Deliver(ctx, evs)[0].Err, "built again at the next delivery")
	require.NoError(t, l.Deliver(ctx, evs)[0].Err)
	require.Equal(t, 2, calls, "built once it worked")
	l.Close()
	<-built.closed
	require.Error(t, l.Deliver(ctx, evs)[0].Err)

	bad := &lazySink{name: "subscription:10", build: func() (sink.Sink, error) {
		return nil, fmt.Errorf("setting TOPIC is not one of ...: %w", sink.ErrPermanent)
	}}
	require.ErrorIs(t, bad.Deliver(ctx, evs)[0].Err, sink.ErrPermanent, "the row's own settings: dead-lettered")
}

// The snapshot keeps each subscription's element from one snapshot to the
// next, and takes the new one of a subscription changed since, in place
// (an update of its secrets, URL or enabled flag, one whose unchanged
// columns come from the element kept) or gone (a delete): it is what
// json.Marshal makes of the subscriptions in id order, as it was before the
// elements were kept.
func TestSnapshotFollowsChanges(t *testing.T) {
	t.Parallel()
	reg, err := NewRegistry(nil, nil)
	require.NoError(t, err)
	apply := func(kind decode.Kind, vals ...string) {
		t.Helper()
		_, err := reg.Apply(&decode.Change{Kind: kind, Row: subRow(vals...)})
		require.NoError(t, err)
	}
	// want is the snapshot made afresh: every element from the
	// subscriptions as they are now.
	want := func() string {
		var subs []json.RawMessage
		for _, id := range slices.Sorted(maps.Keys(reg.subs)) {
			subs = append(subs, reg.subs[id].snapshot())
		}
		if subs == nil {
			subs = []json.RawMessage{}
		}
		b, err := json.Marshal(subs)
		require.NoError(t, err)
		return string(b)
	}
	for _, i := range []int{1, 2, 9, 3, 4, 5, 7} {
		apply(decode.KindInsert, strconv.Itoa(i), strconv.Itoa(i), "https://a/"+strconv.Itoa(i), "{whsec_x}", "{}", "t", "NULL", "2026-01-01", "2026-01-01")
	}
	first := string(reg.Snapshot())
	require.Equal(t, want(), first)
	apply(decode.KindDelete, "9", "NULL", "NULL", "NULL", "NULL", "NULL", "NULL", "NULL", "NULL")
	apply(decode.KindDelete, "7", "NULL", "NULL", "NULL", "NULL", "NULL", "NULL", "NULL", "NULL")
	require.Equal(t, want(), string(reg.Snapshot()))

	apply(decode.KindUpdate, "2", "2", "https://a/2", "{whsec_y}", "{}", "t", "NULL", "2026-01-01", "2026-01-02")
	apply(decode.KindUpdate, "3", "3", "https://u:p@a/3", "{whsec_x}", "{}", "t", "NULL", "2026-01-01", "2026-01-02")
	apply(decode.KindUpdate, "4", "4", unchanged, unchanged, unchanged, "f", "NULL", "2026-01-01", "2026-01-02")
	apply(decode.KindDelete, "5", "NULL", "NULL", "NULL", "NULL", "NULL", "NULL", "NULL", "NULL")
	second := string(reg.Snapshot())
	require.Equal(t, want(), second)
	var subs []Subscription
	require.NoError(t, json.Unmarshal([]byte(second), &subs))
	require.Len(t, subs, 4)
	require.Equal(t, []string{SecretFingerprint("whsec_y")}, subs[1].SecretFingerprints, "new secrets")
	require.Equal(t, SecretFingerprint("https://u:p@a/3"), subs[2].URLFingerprint, "a URL with credentials")
	require.Empty(t, subs[2].URL)
	require.False(t, subs[3].Enabled)
	require.Equal(t, "https://a/4", subs[3].URL, "unchanged columns kept")
	require.Equal(t, []string{SecretFingerprint("whsec_x")}, subs[3].SecretFingerprints)
	require.NotContains(t, second, "whsec_")

	_, err = reg.Apply(&decode.Change{Kind: decode.KindIgnored})
	require.NoError(t, err)
	require.Equal(t, "[]", string(reg.Snapshot()))
}
