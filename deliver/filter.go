package deliver

import (
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync"

	"github.com/expr-lang/expr"
	"github.com/expr-lang/expr/vm"

	"github.com/outboxd/outboxd/decode"
)

// A property filter selects the events a destination or a subscription gets
// by their content, beside the event-name globs: an expr-lang expression
// (https://expr-lang.org) evaluated against the event's envelope, such as
//
//	event_name == "inventory_adjusted" && properties.delta < 0
//
// It is compiled once, when the configuration or the subscription is read,
// and evaluated per event by a reused virtual machine. The language has no
// side effects (no I/O, no assignment; the clock builtin now() is disabled so
// that a row is routed the same way whenever it is read), no unbounded loop
// (its iterating builtins walk the finite collections of the event), a
// bounded program size (MaxFilterNodes) and a memory budget per evaluation
// (expr's default, 1e6 allocated units): a filter cannot stall or crash the
// router.

// MaxFilterLength bounds the text of a filter, and MaxFilterNodes the size of
// its syntax tree.
const (
	MaxFilterLength = 4096
	MaxFilterNodes  = 1000
)

// filterVars are the names a filter sees: the envelope's fields (README.md,
// "Webhook contract"), properties being the row's parsed JSON. Their values
// are the envelope's, as JSON decodes them: numbers (organization_id of an
// integer column, say) are float64, a NULL is nil.
var filterVars = []string{"id", "event_name", "occurred_at", "organization_id", "user_id", "entity_type",
	"entity_id", "correlation_id", "source", "schema_version", "properties"}

// filterEnv declares filterVars to the compiler: properties is a map, the
// others of any type. A name outside it fails to compile ("unknown name").
var filterEnv = func() map[string]any {
	m := make(map[string]any, len(filterVars))
	for _, v := range filterVars {
		m[v] = nil
	}
	m["properties"] = map[string]any{}
	return m
}()

// Filter is a compiled property filter; the nil *Filter matches every event.
// It is safe for concurrent use.
type Filter struct {
	src  string
	prog *vm.Program
	vms  sync.Pool
}

// CompileFilter compiles a filter expression; an empty (or blank) one is the
// nil filter, which matches everything. The error says what is wrong and
// where, never echoing more than the expression.
func CompileFilter(src string) (*Filter, error) {
	src = strings.TrimSpace(src)
	if src == "" {
		return nil, nil
	}
	if len(src) > MaxFilterLength {
		return nil, fmt.Errorf("filter is %d bytes long, more than %d", len(src), MaxFilterLength)
	}
	prog, err := expr.Compile(src, expr.Env(filterEnv), expr.AsBool(), expr.MaxNodes(MaxFilterNodes),
		expr.DisableBuiltin("now"))
	if err != nil {
		return nil, fmt.Errorf("filter %q does not compile: %w", src, err)
	}
	f := &Filter{src: src, prog: prog}
	f.vms.New = func() any { return &vm.VM{} }
	return f, nil
}

// String returns the filter's expression.
func (f *Filter) String() string {
	if f == nil {
		return ""
	}
	return f.src
}

// EventEnv is the parsed envelope of an event, which filters are evaluated
// against; it is parsed at most once however many filters look at it.
type EventEnv struct {
	e      *decode.Event
	parsed bool
	env    map[string]any
	err    error
}

// NewEventEnv returns the (not yet parsed) environment of e.
func NewEventEnv(e *decode.Event) *EventEnv { return &EventEnv{e: e} }

func (v *EventEnv) get() (map[string]any, error) {
	if !v.parsed {
		v.parsed = true
		if err := json.Unmarshal(v.e.Body, &v.env); err != nil {
			v.err = fmt.Errorf("event %d: envelope is not a JSON object: %w", v.e.ID, err)
		} else if v.env == nil {
			v.err = fmt.Errorf("event %d: envelope is null", v.e.ID)
		}
	}
	return v.env, v.err
}

// ErrFilterResult is wrapped by Match's error for an expression whose value
// is not a boolean.
var ErrFilterResult = errors.New("filter did not give a boolean")

// Match evaluates f against the event. An evaluation error (a missing
// property compared with a number, a property of another type, an envelope
// that is not JSON) is returned with false: the caller counts the event as
// not matched.
func (f *Filter) Match(v *EventEnv) (bool, error) {
	if f == nil {
		return true, nil
	}
	env, err := v.get()
	if err != nil {
		return false, err
	}
	m := f.vms.Get().(*vm.VM)
	out, err := m.Run(f.prog, env)
	f.vms.Put(m)
	if err != nil {
		return false, fmt.Errorf("filter %q on event %d: %w", f.src, v.e.ID, err)
	}
	b, ok := out.(bool)
	if !ok {
		return false, fmt.Errorf("filter %q on event %d: %w (%T)", f.src, v.e.ID, ErrFilterResult, out)
	}
	return b, nil
}
