package plan

import (
	"fmt"
	"slices"
	"strings"
)

// Finding kinds.
const (
	// KindName: an event or property name that is not snake_case.
	KindName = "name"
	// KindMetadata: an event without description or owner.
	KindMetadata = "metadata"
	// KindSchema: a schema that does not compile, or is not an object schema.
	KindSchema = "schema"
	// KindBreaking: a newer schema_version removes, retypes or stops
	// requiring a property the previous version required.
	KindBreaking = "breaking"
)

// Finding is one thing the lint found wrong with a plan.
type Finding struct {
	Kind     string `json:"kind"`
	Event    string `json:"event,omitempty"`
	Version  int    `json:"version,omitempty"`
	From     int    `json:"from_version,omitempty"`
	Property string `json:"property,omitempty"`
	Line     int    `json:"line,omitempty"`
	Message  string `json:"message"`
}

// Lint checks a parsed plan: snake_case event and property names, a
// description and an owner per event, schemas that compile (draft 2020-12)
// and describe an object, and additive evolution: each schema_version keeps
// every property the previous version required, required and of the same
// type. Findings come in event, version order.
func (p *Plan) Lint() []Finding {
	var out []Finding
	for _, e := range p.Events {
		if !SnakeCase(e.Name) {
			out = append(out, Finding{Kind: KindName, Event: e.Name, Line: e.Line,
				Message: fmt.Sprintf("event name %q is not snake_case", e.Name)})
		}
		if strings.TrimSpace(e.Description) == "" || strings.TrimSpace(e.Owner) == "" {
			out = append(out, Finding{Kind: KindMetadata, Event: e.Name, Line: e.Line,
				Message: fmt.Sprintf("event %s needs a description and an owner", e.Name)})
		}
		for i, v := range e.Versions {
			if _, err := v.Compiled(e.Name); err != nil {
				out = append(out, Finding{Kind: KindSchema, Event: e.Name, Version: v.Number, Line: v.Line,
					Message: fmt.Sprintf("%s v%d: schema does not compile: %s", e.Name, v.Number, oneLine(err.Error()))})
				continue
			}
			s := v.shape()
			if t, ok := s.Type.(string); !ok || t != "object" {
				out = append(out, Finding{Kind: KindSchema, Event: e.Name, Version: v.Number, Line: v.Line,
					Message: fmt.Sprintf("%s v%d: the schema of properties must have type: object", e.Name, v.Number)})
			}
			for _, name := range sortedKeys(s.Properties) {
				if !SnakeCase(name) {
					out = append(out, Finding{Kind: KindName, Event: e.Name, Version: v.Number, Property: name, Line: v.Line,
						Message: fmt.Sprintf("%s v%d: property name %q is not snake_case", e.Name, v.Number, name)})
				}
			}
			if i > 0 {
				out = append(out, breaking(e.Name, e.Versions[i-1], v)...)
			}
		}
	}
	return out
}

// breaking compares consecutive versions: every property prev requires must
// still be declared, required, and of the same type in next.
func breaking(event string, prev, next *Version) []Finding {
	ps, ns := prev.shape(), next.shape()
	var out []Finding
	f := func(prop, format string, args ...any) {
		out = append(out, Finding{Kind: KindBreaking, Event: event, From: prev.Number, Version: next.Number, Property: prop, Line: next.Line,
			Message: fmt.Sprintf("breaking change %s v%d -> v%d: ", event, prev.Number, next.Number) + fmt.Sprintf(format, args...)})
	}
	for _, prop := range ps.Required {
		raw, declared := ns.Properties[prop]
		switch {
		case !declared && !slices.Contains(ns.Required, prop):
			f(prop, "required property %q removed", prop)
			continue
		case !slices.Contains(ns.Required, prop):
			f(prop, "property %q is no longer required", prop)
		}
		if declared {
			was, is := types(ps.Properties[prop]), types(raw)
			if !slices.Equal(was, is) {
				f(prop, "property %q retyped from %s to %s", prop, typeLabel(was), typeLabel(is))
			}
		}
	}
	return out
}

func typeLabel(t []string) string {
	if len(t) == 0 {
		return "any"
	}
	return strings.Join(t, "|")
}

func oneLine(s string) string { return strings.Join(strings.Fields(s), " ") }

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}

// Rule is what the database trigger enforces for one (event_name,
// schema_version): the required properties and, for each, the JSON Schema
// type names it may have (empty: any type).
type Rule struct {
	Event    string              `json:"event_name"`
	Version  int                 `json:"schema_version"`
	Required map[string][]string `json:"required"`
}

// Rules returns one rule per event and version, in plan order.
func (p *Plan) Rules() []Rule {
	var out []Rule
	for _, e := range p.Events {
		for _, v := range e.Versions {
			s := v.shape()
			r := Rule{Event: e.Name, Version: v.Number, Required: map[string][]string{}}
			for _, prop := range s.Required {
				t := types(s.Properties[prop])
				if t == nil {
					t = []string{}
				}
				r.Required[prop] = t
			}
			out = append(out, r)
		}
	}
	return out
}

// Path returns the rule as one SQL/JSON path predicate over properties,
// true when every required property is there with an allowed type: the
// trigger's fast check (jsonb_path_match, no query per insert). Strict mode:
// properties that are not an object do not match.
func (r Rule) Path() string {
	if len(r.Required) == 0 {
		return "true"
	}
	var terms []string
	for _, prop := range sortedKeys(r.Required) {
		key := `$."` + strings.NewReplacer(`\`, `\\`, `"`, `\"`).Replace(prop) + `"`
		var alts []string
		for _, t := range r.Required[prop] {
			switch t {
			case "integer":
				alts = append(alts, `@.type() == "number" && @ == @.floor()`)
			default:
				alts = append(alts, `@.type() == "`+t+`"`)
			}
		}
		if len(alts) == 0 {
			terms = append(terms, "exists("+key+")")
			continue
		}
		terms = append(terms, "exists("+key+" ? ("+strings.Join(alts, " || ")+"))")
	}
	return "strict " + strings.Join(terms, " && ")
}
