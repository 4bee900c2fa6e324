package plan

import (
	"encoding/json"
	"os"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

// The product's plan shipped as an example parses and lints clean.
func TestExamplePlanIsClean(t *testing.T) {
	data, err := os.ReadFile("../examples/tracking-plan/plan.yaml")
	require.NoError(t, err)
	p, err := Parse("plan.yaml", data)
	require.NoError(t, err)
	require.Len(t, p.Events, 14)
	require.Empty(t, p.Lint())
	require.Equal(t, []string{"organization_id", "entity_type", "entity_id"}, p.Envelope.Required)

	v := p.Event("inventory_adjusted").Version(1)
	require.NoError(t, v.Validate("inventory_adjusted", decode(t, `{"sku":"s1","delta":-2.5,"reason":"wasted"}`)))
	err = v.Validate("inventory_adjusted", decode(t, `{"sku":"s1","delta":"2","reason":"lost"}`))
	require.ErrorContains(t, err, "/delta")
	require.ErrorContains(t, err, "/reason")
}

func decode(t *testing.T, s string) any {
	t.Helper()
	var v any
	require.NoError(t, json.Unmarshal([]byte(s), &v))
	return v
}

// Malformed plans are refused with the line of each mistake.
func TestParseErrorsNameLines(t *testing.T) {
	for _, c := range []struct{ yaml, want string }{
		{"format: 1\nevents:\n  a:\n    versions:\n      1: {type: object}\n      x: {}\n", "p.yaml:6: event a: schema_version \"x\" is not a positive integer"},
		{"format: 1\nevents:\n  a:\n    owner: o\n    colour: red\n    versions: {1: {}}\n", `p.yaml:5: event a: unknown key "colour"`},
		{"format: 2\nevents: {}\n", "p.yaml:1: format: this outboxd reads format 1"},
		{"format: 1\nenvelope:\n  required: [organisation_id]\nevents: {}\n", `p.yaml:3: envelope.required: "organisation_id" is not an envelope column`},
		{"format: 1\nevents:\n  a:\n    owner: o\n", "p.yaml:3: event a has no versions"},
		{"format: 1\nevents:\n  a: [\n", "p.yaml: yaml: line 3"},
		{"format: 1\n", "the plan has no events key"},
	} {
		_, err := Parse("p.yaml", []byte(c.yaml))
		require.ErrorContains(t, err, c.want, c.yaml)
	}
}

// A renamed property (v2 drops the required delta for quantity_change) is a
// breaking change; so are a retyped and a no-longer-required property. An
// added property is not.
func TestLintBreakingChanges(t *testing.T) {
	p, err := Parse("p.yaml", []byte(`format: 1
events:
  inventory_adjusted:
    description: d
    owner: o
    versions:
      1:
        type: object
        required: [sku_id, delta, reason]
        properties:
          sku_id: {type: string}
          delta: {type: number}
          reason: {type: string}
      2:
        type: object
        required: [sku_id, quantity_change]
        properties:
          sku_id: {type: integer}
          quantity_change: {type: number}
          reason: {type: string}
          note: {type: string}
`))
	require.NoError(t, err)
	var got []string
	for _, f := range p.Lint() {
		require.Equal(t, KindBreaking, f.Kind)
		require.Equal(t, 14, f.Line)
		got = append(got, f.Message)
	}
	require.Equal(t, []string{
		`breaking change inventory_adjusted v1 -> v2: property "sku_id" retyped from string to integer`,
		`breaking change inventory_adjusted v1 -> v2: required property "delta" removed`,
		`breaking change inventory_adjusted v1 -> v2: property "reason" is no longer required`,
	}, got)
}

func TestLintNamesAndSchemas(t *testing.T) {
	p, err := Parse("p.yaml", []byte(`format: 1
events:
  BatchStarted:
    owner: o
    versions:
      1:
        type: object
        properties:
          batchId: {type: string}
  ok_event:
    description: d
    owner: o
    versions:
      1: {type: object, properties: {a: {type: strin}}}
      2: {type: array}
`))
	require.NoError(t, err)
	var got []string
	for _, f := range p.Lint() {
		got = append(got, f.Kind+": "+f.Message)
	}
	require.Len(t, got, 5, strings.Join(got, "\n"))
	require.Equal(t, `name: event name "BatchStarted" is not snake_case`, got[0])
	require.Equal(t, `metadata: event BatchStarted needs a description and an owner`, got[1])
	require.Equal(t, `name: BatchStarted v1: property name "batchId" is not snake_case`, got[2])
	require.True(t, strings.HasPrefix(got[3], "schema: ok_event v1: schema does not compile:"), got[3])
	require.Equal(t, `schema: ok_event v2: the schema of properties must have type: object`, got[4])
}

func TestRules(t *testing.T) {
	p, err := Parse("p.yaml", []byte(`format: 1
events:
  timer_stopped:
    description: d
    owner: o
    versions:
      1:
        type: object
        required: [timer_id, duration_seconds, extra]
        properties:
          timer_id: {type: string}
          duration_seconds: {type: [integer, "null"]}
`))
	require.NoError(t, err)
	require.Equal(t, []Rule{{Event: "timer_stopped", Version: 1, Required: map[string][]string{
		"timer_id": {"string"}, "duration_seconds": {"integer", "null"}, "extra": {},
	}}}, p.Rules())
}

func TestRulePath(t *testing.T) {
	r := Rule{Required: map[string][]string{"delta": {"number"}, "n": {"integer", "null"}, `we"ird`: {}}}
	require.Equal(t, `strict exists($."delta" ? (@.type() == "number")) && exists($."n" ? (@.type() == "number" && @ == @.floor() || @.type() == "null")) && exists($."we\"ird")`, r.Path())
	require.Equal(t, "true", Rule{}.Path())
}
