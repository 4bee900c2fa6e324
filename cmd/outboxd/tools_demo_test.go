package main

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// The demo tells each batch's story in order (started, timers started and
// stopped in pairs, completed, metrics), covers every event family of the
// product, and every event is complete enough to look real.
func TestDemoWorldTellsEachBatchStoryInOrder(t *testing.T) {
	w := newDemoWorld(1)
	txs := w.opening()
	for range 600 {
		txs = append(txs, w.next())
	}
	families := map[string]int{}
	story := map[string][]string{} // batch → event names in order
	for _, tx := range txs {
		require.NotEmpty(t, tx)
		for _, e := range tx {
			families[e.Name]++
			require.Contains(t, []int64{7, 12, 31}, e.Org)
			require.NotEmpty(t, e.EntityType, e.Name)
			require.NotEmpty(t, e.EntityID, e.Name)
			require.NotEmpty(t, e.Source, e.Name)
			_, err := json.Marshal(e.Props)
			require.NoError(t, err)
			if b, ok := e.Props["batch_id"].(string); ok && e.Name != "inventory_adjusted" {
				story[b] = append(story[b], e.Name)
			}
		}
	}
	for _, name := range []string{"recipe_created", "product_created", "sku_created", "batch_started", "timer_started",
		"timer_stopped", "inventory_adjusted", "batch_completed", "batch_metrics_computed"} {
		require.Positive(t, families[name], "family %s missing: %v", name, families)
	}
	complete := 0
	for b, names := range story {
		require.Equal(t, "batch_started", names[0], b)
		for i := 1; i < len(names); i++ {
			switch names[i] {
			case "timer_started":
				require.Contains(t, []string{"batch_started", "timer_stopped"}, names[i-1], "%s: %v", b, names)
			case "timer_stopped":
				require.Equal(t, "timer_started", names[i-1], "%s: %v", b, names)
			case "batch_completed":
				require.Equal(t, "timer_stopped", names[i-1], "%s: %v", b, names)
			case "batch_metrics_computed":
				require.Equal(t, "batch_completed", names[i-1], "%s: %v", b, names)
				complete++
			default:
				t.Fatalf("%s: unexpected %s in %v", b, names[i], names)
			}
		}
	}
	require.Greater(t, complete, 10, "batches run to completion")
}

// The dev printer shows one line per event, batches included, with the
// properties compacted and cut when long, and reports rejected requests.
func TestDevPrinterLines(t *testing.T) {
	// Every time is fixed relative to the events' occurred_at, so the columns
	// (and so the line lengths) are the same on any day.
	occurred := time.Date(2026, 11, 26, 10, 0, 0, 123456000, time.UTC)
	begin := occurred.Add(-1500 * time.Millisecond)
	arrived := occurred.Add(7 * time.Millisecond)
	var out bytes.Buffer
	p := newDevPrinter(&out, begin)
	long := strings.Repeat("x", 400)
	body := `[{"id":1,"event_name":"batch_started","occurred_at":"2026-11-26T10:00:00.123456Z","organization_id":7,
  "entity_type":"batch","entity_id":"B-19","properties":{ "batch_id" : "B-19" }},
 {"id":2,"event_name":"note","occurred_at":"2026-11-26T10:00:00.123456Z","organization_id":null,"entity_type":null,"entity_id":null,"properties":{"text":"` + long + `"}}]`
	valid := true
	require.NoError(t, p.record(&hookRequest{At: arrived, Valid: &valid, Status: 200, Body: []byte(body)}))
	invalid := false
	require.NoError(t, p.record(&hookRequest{At: arrived, Valid: &invalid, Status: 401, Problem: "no v1 signature matches"}))

	lines := strings.Split(strings.TrimSpace(out.String()), "\n")
	require.Len(t, lines, 4, out.String()) // two events, the first-event note, the rejection
	require.Regexp(t, `^\d\d:\d\d:\d\d\.\d{3}  #1 +batch_started +org 7 +batch/B-19 +\{"batch_id":"B-19"\}  \+7ms$`, lines[0])
	require.Regexp(t, `^\d\d:\d\d:\d\d\.\d{3}  #2 +note +org - +- +\{"text":"x+…  \+7ms$`, lines[1])
	shown := lines[1][strings.Index(lines[1], `{"text"`):strings.LastIndex(lines[1], "  +")]
	require.Equal(t, devMaxPropsShown+len("…"), len(shown), "long properties are cut at %d bytes", devMaxPropsShown)
	require.Equal(t, "(first event 1.507s after start)", strings.TrimSpace(lines[2]))
	require.Contains(t, lines[3], "rejected a request (answered 401): no v1 signature matches")
	events, bad := p.counts()
	require.Equal(t, 2, events)
	require.Equal(t, 1, bad)
}
