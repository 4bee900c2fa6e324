// Package plan reads a tracking plan: the contract of the events applications
// write into the outbox table. A plan names each event (snake_case
// event_name), its description and owner, and per schema_version a JSON Schema
// (draft 2020-12) of its properties; envelope rules apply to every event
// (columns that must not be NULL, the allowed entity_type values).
//
// [Parse] reads the YAML file and refuses a malformed one (errors carry the
// file's line numbers); [Plan.Lint] reports what a well-formed plan gets
// wrong: names, schemas that do not compile, and breaking changes between
// consecutive schema versions. [Plan.Rules] is the part a database trigger
// enforces: per (event_name, schema_version) the required properties and
// their JSON types.
//
// File format:
//
//	format: 1
//	envelope:
//	  required: [organization_id]          # columns that must not be NULL
//	  entity_type: [batch, recipe]          # allowed values (NULL allowed unless required)
//	events:
//	  inventory_adjusted:
//	    description: Stock of one SKU at one location changed.
//	    owner: inventory
//	    versions:
//	      1:
//	        type: object
//	        required: [sku_id, delta]
//	        properties:
//	          sku_id: {type: string}
//	          delta: {type: number}
package plan

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"regexp"
	"slices"
	"strconv"
	"strings"

	"github.com/santhosh-tekuri/jsonschema/v6"
	"go.yaml.in/yaml/v3"
)

// Format is the version of the file format this package reads.
const Format = 1

// EnvelopeColumns are the outbox table's envelope columns an envelope rule
// may name (docs/DESIGN.md §2).
var EnvelopeColumns = []string{"occurred_at", "organization_id", "user_id", "entity_type", "entity_id", "correlation_id", "source"}

// Plan is a parsed tracking plan.
type Plan struct {
	Envelope Envelope
	// Events in file order.
	Events []*Event
}

// Envelope are the rules every event's row follows.
type Envelope struct {
	// Required are columns that must not be NULL.
	Required []string
	// EntityTypes are the allowed entity_type values; empty allows any.
	EntityTypes []string
	Line        int
}

// Event is one event name of the plan.
type Event struct {
	Name        string
	Description string
	Owner       string
	// Versions in ascending schema_version order.
	Versions []*Version
	Line     int
}

// Version is one schema_version of an event.
type Version struct {
	Number int
	// Schema is the JSON Schema of properties, as JSON.
	Schema json.RawMessage
	Line   int

	compiled *jsonschema.Schema
	compErr  error
}

// Version returns the event's schema version n, or nil.
func (e *Event) Version(n int) *Version {
	for _, v := range e.Versions {
		if v.Number == n {
			return v
		}
	}
	return nil
}

// Event returns the plan's event name, or nil.
func (p *Plan) Event(name string) *Event {
	for _, e := range p.Events {
		if e.Name == name {
			return e
		}
	}
	return nil
}

// Parse reads a plan file's content. It refuses YAML that is not a plan:
// unknown keys, wrong shapes, duplicate event names or versions, a version
// that is not a positive integer; each error names its line. The file name
// prefixes the errors.
func Parse(file string, data []byte) (*Plan, error) {
	var doc yaml.Node
	if err := yaml.Unmarshal(data, &doc); err != nil {
		return nil, fmt.Errorf("%s: %w", file, err)
	}
	if doc.Kind != yaml.DocumentNode || len(doc.Content) != 1 {
		return nil, fmt.Errorf("%s: empty plan", file)
	}
	p := &Plan{}
	var errs []error
	fail := func(n *yaml.Node, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s:%d: %s", file, n.Line, fmt.Sprintf(format, args...)))
	}
	root := doc.Content[0]
	if root.Kind != yaml.MappingNode {
		fail(root, "a plan is a mapping with keys format, envelope and events")
		return nil, errors.Join(errs...)
	}
	sawEvents := false
	for k, v := range pairs(root) {
		switch k.Value {
		case "format":
			if n, err := strconv.Atoi(v.Value); v.Kind != yaml.ScalarNode || err != nil || n != Format {
				fail(v, "format: this outboxd reads format %d, not %q", Format, v.Value)
			}
		case "envelope":
			p.Envelope.Line = k.Line
			parseEnvelope(v, &p.Envelope, fail)
		case "events":
			sawEvents = true
			if v.Kind != yaml.MappingNode {
				fail(v, "events: a mapping of event names")
				continue
			}
			for ek, ev := range pairs(v) {
				if p.Event(ek.Value) != nil {
					fail(ek, "event %q is defined twice", ek.Value)
					continue
				}
				if e := parseEvent(ek, ev, fail); e != nil {
					p.Events = append(p.Events, e)
				}
			}
		default:
			fail(k, "unknown key %q (want format, envelope, events)", k.Value)
		}
	}
	if !sawEvents && len(errs) == 0 {
		fail(root, "the plan has no events key")
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	return p, nil
}

type failFunc func(n *yaml.Node, format string, args ...any)

// pairs iterates over a mapping node's keys and values.
func pairs(m *yaml.Node) func(func(k, v *yaml.Node) bool) {
	return func(yield func(k, v *yaml.Node) bool) {
		for i := 0; i+1 < len(m.Content); i += 2 {
			if !yield(m.Content[i], m.Content[i+1]) {
				return
			}
		}
	}
}

func stringList(n *yaml.Node, what string, fail failFunc) []string {
	if n.Kind != yaml.SequenceNode {
		fail(n, "%s: a list of strings", what)
		return nil
	}
	var out []string
	for _, s := range n.Content {
		if s.Kind != yaml.ScalarNode || s.Tag != "!!str" && s.Tag != "" {
			fail(s, "%s: %q is not a string", what, s.Value)
			continue
		}
		out = append(out, s.Value)
	}
	return out
}

func parseEnvelope(n *yaml.Node, env *Envelope, fail failFunc) {
	if n.Kind != yaml.MappingNode {
		fail(n, "envelope: a mapping with keys required and entity_type")
		return
	}
	for k, v := range pairs(n) {
		switch k.Value {
		case "required":
			env.Required = stringList(v, "envelope.required", fail)
			for i, c := range env.Required {
				if !slices.Contains(EnvelopeColumns, c) {
					fail(v.Content[i], "envelope.required: %q is not an envelope column (%s)", c, strings.Join(EnvelopeColumns, ", "))
				}
			}
		case "entity_type":
			env.EntityTypes = stringList(v, "envelope.entity_type", fail)
		default:
			fail(k, "envelope: unknown key %q (want required, entity_type)", k.Value)
		}
	}
}

func parseEvent(k, n *yaml.Node, fail failFunc) *Event {
	e := &Event{Name: k.Value, Line: k.Line}
	if n.Kind != yaml.MappingNode {
		fail(n, "event %s: a mapping with keys description, owner and versions", e.Name)
		return nil
	}
	for vk, v := range pairs(n) {
		switch vk.Value {
		case "description":
			e.Description = v.Value
		case "owner":
			e.Owner = v.Value
		case "versions":
			if v.Kind != yaml.MappingNode {
				fail(v, "event %s: versions is a mapping of schema_version to JSON Schema", e.Name)
				continue
			}
			for nk, nv := range pairs(v) {
				num, err := strconv.Atoi(nk.Value)
				if err != nil || num < 1 {
					fail(nk, "event %s: schema_version %q is not a positive integer", e.Name, nk.Value)
					continue
				}
				if e.Version(num) != nil {
					fail(nk, "event %s: schema_version %d is defined twice", e.Name, num)
					continue
				}
				var doc any
				if err := nv.Decode(&doc); err != nil {
					fail(nv, "event %s v%d: %v", e.Name, num, err)
					continue
				}
				raw, err := json.Marshal(jsonable(doc))
				if err != nil {
					fail(nv, "event %s v%d: the schema is not JSON: %v", e.Name, num, err)
					continue
				}
				e.Versions = append(e.Versions, &Version{Number: num, Schema: raw, Line: nk.Line})
			}
		default:
			fail(vk, "event %s: unknown key %q (want description, owner, versions)", e.Name, vk.Value)
		}
	}
	if len(e.Versions) == 0 {
		fail(k, "event %s has no versions", e.Name)
	}
	slices.SortFunc(e.Versions, func(a, b *Version) int { return a.Number - b.Number })
	return e
}

// jsonable turns YAML's decoded maps (map[string]any, or map[any]any for
// non-string keys) into values encoding/json takes.
func jsonable(v any) any {
	switch v := v.(type) {
	case map[string]any:
		for k, x := range v {
			v[k] = jsonable(x)
		}
		return v
	case map[any]any:
		m := make(map[string]any, len(v))
		for k, x := range v {
			m[fmt.Sprint(k)] = jsonable(x)
		}
		return m
	case []any:
		for i, x := range v {
			v[i] = jsonable(x)
		}
		return v
	}
	return v
}

// Compiled returns the version's compiled schema, compiling it once (draft
// 2020-12 unless the schema says otherwise).
func (v *Version) Compiled(event string) (*jsonschema.Schema, error) {
	if v.compiled != nil || v.compErr != nil {
		return v.compiled, v.compErr
	}
	doc, err := jsonschema.UnmarshalJSON(bytes.NewReader(v.Schema))
	if err != nil {
		v.compErr = err
		return nil, err
	}
	c := jsonschema.NewCompiler()
	c.DefaultDraft(jsonschema.Draft2020)
	loc := fmt.Sprintf("plan:///%s/v%d.json", event, v.Number)
	if err := c.AddResource(loc, doc); err != nil {
		v.compErr = err
		return nil, err
	}
	v.compiled, v.compErr = c.Compile(loc)
	return v.compiled, v.compErr
}

// Validate checks properties (decoded JSON, numbers as json.Number or
// float64) against the version's schema.
func (v *Version) Validate(event string, properties any) error {
	s, err := v.Compiled(event)
	if err != nil {
		return fmt.Errorf("schema does not compile: %w", err)
	}
	return s.Validate(properties)
}

// shape is what the lint and the trigger read of a schema: its top-level
// required keys and each property's type names.
type shape struct {
	Type       any                        `json:"type"`
	Required   []string                   `json:"required"`
	Properties map[string]json.RawMessage `json:"properties"`
}

func (v *Version) shape() shape {
	var s shape
	_ = json.Unmarshal(v.Schema, &s)
	return s
}

// types returns a property's JSON Schema type names ("number", or
// ["string", "null"]); nil when it has no type keyword.
func types(raw json.RawMessage) []string {
	var p struct {
		Type any `json:"type"`
	}
	if json.Unmarshal(raw, &p) != nil {
		return nil
	}
	switch t := p.Type.(type) {
	case string:
		return []string{t}
	case []any:
		var out []string
		for _, x := range t {
			if s, ok := x.(string); ok {
				out = append(out, s)
			}
		}
		slices.Sort(out)
		return out
	}
	return nil
}

var snakeCase = regexp.MustCompile(`^[a-z][a-z0-9]*(_[a-z0-9]+)*$`)

// SnakeCase reports whether name is lower snake_case: a-z, 0-9 and single
// underscores, starting with a letter.
func SnakeCase(name string) bool { return snakeCase.MatchString(name) }
