package plan

import (
	"os"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func exampleValidator(t testing.TB) *Validator {
	t.Helper()
	data, err := os.ReadFile("../examples/tracking-plan/plan.yaml")
	require.NoError(t, err)
	p, err := Parse("plan.yaml", data)
	require.NoError(t, err)
	return NewValidator(p, "sha")
}

const (
	validBody   = `{"id":1,"event_name":"inventory_adjusted","occurred_at":"2026-01-01T00:00:00.000000Z","organization_id":7,"user_id":null,"entity_type":"sku","entity_id":"s1","correlation_id":null,"source":null,"schema_version":1,"properties":{"sku":"s1","delta":-2.5,"reason":"wasted"}}`
	invalidBody = `{"id":2,"event_name":"inventory_adjusted","occurred_at":"2026-01-01T00:00:00.000000Z","organization_id":7,"user_id":null,"entity_type":"sku","entity_id":"s1","correlation_id":null,"source":null,"schema_version":1,"properties":{"sku":"s1","delta":"2","reason":"wasted"}}`
)

// The daemon's check is full JSON Schema plus the envelope rules; the
// reason names the rule and the property's path.
func TestValidatorVerdicts(t *testing.T) {
	v := exampleValidator(t)
	for _, c := range []struct {
		name, body, reason, event, version string
	}{
		{"valid", validBody, "", "inventory_adjusted", "1"},
		{"wrong type", invalidBody, "properties.delta: got string, want number", "inventory_adjusted", "1"},
		{"enum and minLength", `{"event_name":"inventory_adjusted","organization_id":1,"entity_type":"sku","entity_id":"x","schema_version":null,"properties":{"sku":"","delta":1,"reason":"lost"}}`,
			"properties.reason: value must be one of", "inventory_adjusted", "1"},
		{"missing required", `{"event_name":"batch_started","organization_id":1,"entity_type":"batch","entity_id":"b","schema_version":1,"properties":{"batch_id":"b","sku":"s"}}`,
			"properties: missing property 'planned_units'", "batch_started", "1"},
		{"properties as a JSON string", `{"event_name":"recipe_deleted","organization_id":1,"entity_type":"recipe","entity_id":"r","schema_version":"1","properties":"{\"recipe_id\":\"r\"}"}`,
			"", "recipe_deleted", "1"},
		{"envelope", `{"event_name":"recipe_deleted","organization_id":null,"entity_type":"planet","entity_id":"r","schema_version":1,"properties":{"recipe_id":"r"}}`,
			`organization_id is NULL; entity_type "planet" is not allowed`, "recipe_deleted", "1"},
		{"unknown event", `{"event_name":"made_up","organization_id":1,"entity_type":"sku","entity_id":"x","schema_version":1,"properties":{}}`,
			`event "made_up" is not in the tracking plan`, OtherLabel, OtherLabel},
		{"unknown version", `{"event_name":"recipe_deleted","organization_id":1,"entity_type":"recipe","entity_id":"x","schema_version":2,"properties":{"recipe_id":"r"}}`,
			"recipe_deleted has no schema_version 2 in the tracking plan", "recipe_deleted", OtherLabel},
		{"version not a number", `{"event_name":"recipe_deleted","organization_id":1,"entity_type":"recipe","entity_id":"x","schema_version":"v2","properties":{"recipe_id":"r"}}`,
			`schema_version "v2" is not a whole number`, "recipe_deleted", OtherLabel},
		{"nested path", `{"event_name":"recipe_updated","organization_id":1,"entity_type":"recipe","entity_id":"x","schema_version":1,"properties":{"recipe_id":"r","changed_fields":["a",3]}}`,
			"properties.changed_fields.1: got number, want string", "recipe_updated", "1"},
	} {
		t.Run(c.name, func(t *testing.T) {
			got := v.Check([]byte(c.body))
			require.Equal(t, c.reason == "", got.Valid, got.Reason)
			require.Contains(t, got.Reason, c.reason)
			require.Equal(t, c.event, got.EventLabel)
			require.Equal(t, c.version, got.VersionLabel)
		})
	}
}

// BenchmarkValidate measures the daemon's check of one event of the
// example plan (bench/RESULTS.md): a valid one and one that fails its
// schema.
func BenchmarkValidate(b *testing.B) {
	v := exampleValidator(b)
	for _, c := range []struct{ name, body string }{{"valid", validBody}, {"invalid", invalidBody}} {
		b.Run(c.name, func(b *testing.B) {
			body := []byte(c.body)
			b.ReportAllocs()
			cpu0 := processCPU()
			for b.Loop() {
				if got := v.Check(body); got.Valid != (c.name == "valid") {
					b.Fatal(got.Reason)
				}
			}
			// The process's CPU time per event (GC included): on a shared
			// machine wall time per op counts the waits for a core too.
			b.ReportMetric(float64(processCPU()-cpu0)/float64(b.N)/1e3, "cpu-µs/op")
		})
	}
}

// processCPU is the process's user and system CPU time so far.
func processCPU() time.Duration {
	var ru syscall.Rusage
	if syscall.Getrusage(syscall.RUSAGE_SELF, &ru) != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
