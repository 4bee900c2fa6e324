package plan

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"

	"github.com/jackc/pgx/v5"
	"github.com/santhosh-tekuri/jsonschema/v6"

	"github.com/outboxd/outboxd/migrations"
)

// OtherLabel is the metric label value of an event name or schema version
// the plan does not know: unknown names collapse into it, so a typo in an
// application cannot add series without bound.
const OtherLabel = "other"

// Validator checks events (their envelope JSON, decode.Event.Body) against
// a plan with full JSON Schema: every schema is compiled once, when the
// validator is made. It is safe for concurrent use.
type Validator struct {
	plan     *Plan
	sha      string
	versions map[versionKey]*compiledVersion
	names    map[string]bool
}

type versionKey struct {
	name    string
	version int
}

type compiledVersion struct {
	schema *jsonschema.Schema
	err    error // the schema does not compile: every event of it is invalid
	label  string
}

// Verdict is what a Validator says of one event.
type Verdict struct {
	Valid bool
	// Reason names the first rule broken (the others follow, "; "
	// separated): "properties.delta: got string, want number", "event
	// \"x\" is not in the tracking plan", "organization_id is NULL".
	Reason string
	// EventLabel and VersionLabel are the metric labels of the event: its
	// name and schema_version when the plan has them, OtherLabel otherwise.
	EventLabel, VersionLabel string
}

// NewValidator compiles every schema of p. sha is the plan file's SHA-256
// (outboxd_plan.source_sha256), kept for logs.
func NewValidator(p *Plan, sha string) *Validator {
	v := &Validator{plan: p, sha: sha, versions: map[versionKey]*compiledVersion{}, names: map[string]bool{}}
	for _, e := range p.Events {
		v.names[e.Name] = true
		for _, ver := range e.Versions {
			s, err := ver.Compiled(e.Name)
			v.versions[versionKey{e.Name, ver.Number}] = &compiledVersion{schema: s, err: err, label: strconv.Itoa(ver.Number)}
		}
	}
	return v
}

// SHA256 is the plan file's SHA-256 the validator was made with.
func (v *Validator) SHA256() string { return v.sha }

// Plan is the validator's plan.
func (v *Validator) Plan() *Plan { return v.plan }

// Check validates one event's envelope (the JSON object of docs/DESIGN.md
// §4: event_name, schema_version, the envelope columns and properties).
// Like the trigger, a NULL schema_version is version 1, and properties held
// as a JSON string (a text column) are read as the JSON it contains.
func (v *Validator) Check(body []byte) Verdict {
	out := Verdict{EventLabel: OtherLabel, VersionLabel: OtherLabel}
	doc, err := jsonschema.UnmarshalJSON(bytes.NewReader(body))
	row, ok := doc.(map[string]any)
	if err != nil || !ok {
		out.Reason = "the event is not a JSON object"
		return out
	}
	var problems []string
	name, _ := row["event_name"].(string)
	if v.names[name] {
		out.EventLabel = name
	}
	version, verr := schemaVersion(row["schema_version"])
	if verr != nil {
		problems = append(problems, verr.Error())
	}
	for _, col := range v.plan.Envelope.Required {
		if row[col] == nil {
			problems = append(problems, col+" is NULL")
		}
	}
	if et, ok := row["entity_type"].(string); ok && len(v.plan.Envelope.EntityTypes) > 0 && !slices.Contains(v.plan.Envelope.EntityTypes, et) {
		problems = append(problems, fmt.Sprintf("entity_type %q is not allowed", et))
	}
	cv := v.versions[versionKey{name, version}]
	switch {
	case verr != nil:
	case cv == nil && v.names[name]:
		problems = append(problems, fmt.Sprintf("%s has no schema_version %d in the tracking plan", name, version))
	case cv == nil:
		problems = append(problems, fmt.Sprintf("event %q is not in the tracking plan", name))
	case cv.err != nil:
		out.VersionLabel = cv.label
		problems = append(problems, fmt.Sprintf("%s v%d: the schema does not compile", name, version))
	default:
		out.VersionLabel = cv.label
		props := row["properties"]
		if s, ok := props.(string); ok {
			if d, err := jsonschema.UnmarshalJSON(strings.NewReader(s)); err == nil {
				props = d
			}
		}
		if err := cv.schema.Validate(props); err != nil {
			problems = append(problems, schemaErrors(err)...)
		}
	}
	if len(problems) == 0 {
		out.Valid = true
		return out
	}
	out.Reason = strings.Join(problems, "; ")
	return out
}

// schemaVersion reads schema_version: NULL is 1; a whole number, or a
// string holding one (an ORM's text column), is itself.
func schemaVersion(x any) (int, error) {
	var s string
	switch x := x.(type) {
	case nil:
		return 1, nil
	case string:
		s = strings.TrimSpace(x)
	default:
		s = fmt.Sprint(x)
	}
	n, err := strconv.Atoi(s)
	if err != nil || n < 0 || n > 999_999_999 {
		return 0, fmt.Errorf("schema_version %q is not a whole number", s)
	}
	return n, nil
}

// schemaErrors flattens a schema validation error into one
// "properties.a.b: message" per failed keyword, sorted.
func schemaErrors(err error) []string {
	return flattenErrors(err, func(loc, msg string) string {
		path := "properties"
		for p := range strings.SplitSeq(strings.Trim(loc, "/"), "/") {
			if p != "" {
				path += "." + strings.NewReplacer("~1", "/", "~0", "~").Replace(p)
			}
		}
		return path + ": " + msg
	})
}

// flattenErrors flattens a schema validation error into one line per failed
// keyword, each made by line from its instance location (a JSON pointer) and
// message, sorted and without repeats.
func flattenErrors(err error, line func(loc, msg string) string) []string {
	var ve *jsonschema.ValidationError
	if !errors.As(err, &ve) {
		return []string{oneLine(err.Error())}
	}
	var out []string
	for _, u := range ve.BasicOutput().Errors {
		if u.Error == nil {
			continue
		}
		msg := u.Error.String()
		if strings.HasPrefix(msg, "validation failed") {
			continue
		}
		out = append(out, line(u.InstanceLocation, msg))
	}
	if len(out) == 0 {
		return []string{oneLine(err.Error())}
	}
	slices.Sort(out)
	return slices.Compact(out)
}

// Stored reads the plan stored in schema's outboxd_plan: its source (the
// YAML file) and SHA-256; ok is false when none is stored.
func Stored(ctx context.Context, q Querier, schema string) (source []byte, sha string, ok bool, err error) {
	err = q.QueryRow(ctx, "SELECT source, source_sha256 FROM "+pgx.Identifier{schema, migrations.PlanTable}.Sanitize()).Scan(&source, &sha)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, "", false, nil
	}
	if err != nil {
		return nil, "", false, undefined(err, "read the tracking plan")
	}
	return source, sha, true, nil
}
