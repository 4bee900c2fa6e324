package deliver

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/jackc/pgx/v5/pgtype"
	"github.com/rs/zerolog"
	"github.com/stretchr/testify/require"

	"github.com/outboxd/outboxd/decode"
)

// bodyEvent is an event whose envelope is the decoder's, with props as its
// properties (raw JSON).
func bodyEvent(id int64, name, props string) *decode.Event {
	return &decode.Event{ID: id, Name: name, OrganizationID: 7, HasOrganization: true,
		Body: fmt.Appendf(nil, `{"id":%d,"event_name":%q,"occurred_at":"2026-11-26T10:00:00Z","organization_id":7,"user_id":"u1","entity_type":"sku","entity_id":"S-1","correlation_id":null,"source":"inventory","schema_version":2,"properties":%s}`, id, name, props)}
}

func TestFilterCompile(t *testing.T) {
	t.Parallel()
	f, err := CompileFilter("  ")
	require.NoError(t, err)
	require.Nil(t, f, "blank: no filter")
	ok, err := f.Match(NewEventEnv(bodyEvent(1, "x", "null")))
	require.NoError(t, err)
	require.True(t, ok, "the nil filter matches everything")

	for src, want := range map[string]string{
		`event_name == `:                       "does not compile",
		`evnt_name == "x"`:                     "unknown name evnt_name",
		`now() > occurred_at`:                  "unknown name now", // no clock: a row routes the same whenever read
		`properties.delta < 0 && foo`:          "unknown name foo",
		strings.Repeat("1 + ", 2000) + "1 > 0": "more than 4096",
	} {
		_, err := CompileFilter(src)
		require.ErrorContains(t, err, want, src)
	}
	// A syntax tree over MaxFilterNodes is refused even when short enough.
	_, err = CompileFilter(strings.Repeat("1+", 1100) + "1 > 0")
	require.Error(t, err)
	require.NotContains(t, err.Error(), "bytes long")
}

func TestFilterMatch(t *testing.T) {
	t.Parallel()
	f, err := CompileFilter(`event_name == "inventory_adjusted" && properties.delta < 0`)
	require.NoError(t, err)
	nested, err := CompileFilter(`properties.sku.warehouse.code in ["W1", "W2"] && schema_version == 2 && organization_id == 7`)
	require.NoError(t, err)
	safe, err := CompileFilter(`properties?.sku?.warehouse?.code == "W1"`)
	require.NoError(t, err)
	notBool, err := CompileFilter(`properties.delta`)
	require.NoError(t, err)

	type want struct {
		ok     bool
		evalOK bool // no evaluation error
	}
	for _, c := range []struct {
		f     *Filter
		event *decode.Event
		want  want
	}{
		{f, bodyEvent(1, "inventory_adjusted", `{"delta":-3}`), want{true, true}},
		{f, bodyEvent(2, "inventory_adjusted", `{"delta":5}`), want{false, true}},
		{f, bodyEvent(3, "inventory_adjusted", `{"delta":-0.5}`), want{true, true}},
		{f, bodyEvent(4, "recipe_saved", `{"delta":-3}`), want{false, true}}, // && short-circuits
		{f, bodyEvent(5, "inventory_adjusted", `{}`), want{false, false}},    // missing: nil < 0
		{f, bodyEvent(6, "inventory_adjusted", `{"delta":"-3"}`), want{false, false}},
		{f, bodyEvent(7, "inventory_adjusted", `null`), want{false, false}},
		{f, &decode.Event{ID: 8, Body: []byte(`not json`)}, want{false, false}},
		{nested, bodyEvent(9, "x", `{"sku":{"warehouse":{"code":"W2"}}}`), want{true, true}},
		{nested, bodyEvent(10, "x", `{"sku":{"warehouse":{"code":"W3"}}}`), want{false, true}},
		{nested, bodyEvent(11, "x", `{"sku":{"warehouse":"W1"}}`), want{false, false}},
		{safe, bodyEvent(12, "x", `{"sku":{"warehouse":{"code":"W1"}}}`), want{true, true}},
		{safe, bodyEvent(13, "x", `{}`), want{false, true}}, // ?. makes a missing path nil, not an error
		{safe, bodyEvent(14, "x", `null`), want{false, true}},
		{notBool, bodyEvent(15, "x", `{"delta":1}`), want{false, false}},
	} {
		ok, err := c.f.Match(NewEventEnv(c.event))
		require.Equal(t, c.want.ok, ok, "event %d", c.event.ID)
		require.Equal(t, c.want.evalOK, err == nil, "event %d: %v", c.event.ID, err)
	}
}

// One filter is evaluated from many goroutines (its machines are pooled).
func TestFilterConcurrent(t *testing.T) {
	t.Parallel()
	f, err := CompileFilter(`int(properties.n) % 2 == 0`) // JSON numbers are float64
	require.NoError(t, err)
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Go(func() {
			for i := range 500 {
				n := g*1000 + i
				ok, err := f.Match(NewEventEnv(bodyEvent(int64(n), "x", fmt.Sprintf(`{"n":%d}`, n))))
				if err != nil || ok != (n%2 == 0) {
					t.Errorf("n=%d: %v %v", n, ok, err)
					return
				}
			}
		})
	}
	wg.Wait()
}

// A destination with a property filter gets only the events it lets
// through; an evaluation error is "not matched" and counted; an event that
// no destination gets is marked (settled without sending).
func TestRouterDestinationFilter(t *testing.T) {
	t.Parallel()
	cfg := Config{Concurrency: 2}.WithDefaults()
	neg, err := CompileFilter(`properties.delta < 0`)
	require.NoError(t, err)
	all, filtered := &recorder{}, &recorder{}
	st := newSettler(16)
	var mu sync.Mutex
	var filterErrors []string
	r, err := NewRouter(RouterConfig{Deliver: cfg, Destinations: []Destination{
		{Name: "webhook", Sink: all, Events: []string{"inventory_*"}},
		{Name: "posthog", Sink: filtered, Filter: neg},
	}, OnFilterError: func(target string) {
		mu.Lock()
		defer mu.Unlock()
		filterErrors = append(filterErrors, target)
	}}, st, zerolog.Nop())
	require.NoError(t, err)
	in := make(chan *decode.Event, 8)
	in <- bodyEvent(1, "inventory_adjusted", `{"delta":-2}`)
	in <- bodyEvent(2, "inventory_adjusted", `{"delta":4}`)
	in <- bodyEvent(3, "recipe_saved", `{"note":"x"}`) // webhook's globs: no; posthog: error
	in <- bodyEvent(4, "recipe_saved", `{"delta":-1}`)
	close(in)
	require.NoError(t, r.Run(context.Background(), in))
	require.Equal(t, []int64{1, 2}, all.ids())
	require.Equal(t, []int64{1, 4}, filtered.ids())
	require.Equal(t, []string{"posthog"}, filterErrors)
	st.mu.Lock()
	defer st.mu.Unlock()
	for id := range int64(4) {
		require.Contains(t, st.marks, id+1, "event %d marked", id+1)
	}
}

var filterSubRel = &decode.Relation{Name: "outboxd_subscription", Columns: append(slices.Clone(subRel.Columns),
	decode.Column{Name: "filter", TypeOID: pgtype.TextOID})}

func filterSubRow(vals ...string) *decode.Row {
	r := subRow(vals...)
	r.Relation = filterSubRel
	return r
}

// A subscription's filter takes effect from its change in the stream, is
// kept in the routing state (a router started from the snapshot applies it),
// survives an update that leaves it unchanged (TOASTed), and a stored filter
// that does not compile makes the subscription get nothing, without failing.
func TestRouterSubscriptionFilter(t *testing.T) {
	t.Parallel()
	subs := &recordingSinks{got: map[int64][]int64{}, secrets: map[int64][]string{}}
	st := runRouter(t, nil, subs,
		change(decode.KindInsert, filterSubRow("3", "7", "https://a", "{whsec_x}", "{}", "t", "NULL", "2026-01-01", "2026-01-01", "NULL")),
		bodyEvent(1, "inventory_adjusted", `{"delta":3}`),
		change(decode.KindUpdate, filterSubRow("3", "7", "https://a", "{whsec_x}", "{}", "t", "NULL", "2026-01-01", "2026-01-02", "properties.delta < 0")),
		bodyEvent(2, "inventory_adjusted", `{"delta":3}`),
		bodyEvent(3, "inventory_adjusted", `{"delta":-3}`),
		// Disabled and enabled again, the filter TOASTed (unchanged).
		change(decode.KindUpdate, filterSubRow("3", "7", "https://a", unchanged, unchanged, "f", "NULL", "2026-01-01", "2026-01-03", unchanged)),
		change(decode.KindUpdate, filterSubRow("3", "7", "https://a", unchanged, unchanged, "t", "NULL", "2026-01-01", "2026-01-04", unchanged)),
		bodyEvent(4, "inventory_adjusted", `{"delta":3}`),
		bodyEvent(5, "inventory_adjusted", `{"delta":-1}`),
		// A filter stored by hand that does not compile: nothing, no crash.
		change(decode.KindInsert, filterSubRow("4", "7", "https://b", "{whsec_y}", "{}", "t", "NULL", "2026-01-01", "2026-01-01", "properties.delta <")),
		bodyEvent(6, "inventory_adjusted", `{"delta":-1}`),
	)
	require.Equal(t, []int64{1, 3, 5, 6}, subs.got[3])
	require.Empty(t, subs.got[4])
	st.mu.Lock()
	for id := range int64(6) {
		require.Contains(t, st.marks, id+1)
	}
	st.mu.Unlock()

	// The routing state carries the filter: a router started from it (a
	// restart from the checkpoint) filters the same way.
	reg := newRegistry()
	for _, row := range []*decode.Row{
		filterSubRow("3", "7", "https://a", "{whsec_x}", "{}", "t", "NULL", "2026-01-01", "2026-01-02", "properties.delta < 0"),
		filterSubRow("4", "7", "https://b", "{whsec_y}", "{}", "t", "NULL", "2026-01-01", "2026-01-01", "properties.delta <"),
	} {
		_, err := reg.Apply(&decode.Change{Kind: decode.KindInsert, Row: row})
		require.NoError(t, err)
	}
	snap := reg.Snapshot()
	require.Contains(t, string(snap), `"filter":"properties.delta \u003c 0"`)
	lookup := tableSecrets(map[int64][]string{3: {"whsec_x"}, 4: {"whsec_y"}})
	again := &recordingSinks{got: map[int64][]int64{}, secrets: map[int64][]string{}}
	cfg := Config{Concurrency: 2}.WithDefaults()
	st2 := newSettler(8)
	r, err := NewRouter(RouterConfig{Deliver: cfg, Default: &recorder{}, Subscription: again.build, Routing: snap, Secrets: lookup}, st2, zerolog.Nop())
	require.NoError(t, err)
	in := make(chan *decode.Event, 4)
	in <- bodyEvent(7, "inventory_adjusted", `{"delta":3}`)
	in <- bodyEvent(8, "inventory_adjusted", `{"delta":-3}`)
	close(in)
	require.NoError(t, r.Run(context.Background(), in))
	require.Equal(t, []int64{8}, again.got[3])
	require.Empty(t, again.got[4])
}
