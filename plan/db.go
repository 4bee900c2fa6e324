package plan

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/santhosh-tekuri/jsonschema/v6"

	"github.com/outboxd/outboxd/migrations"
)

// SQLState is the SQLSTATE the trigger raises in enforce mode (class OB,
// outboxd's own).
const SQLState = "OB001"

// TriggerName is the name of the plan's trigger on the outbox table.
const TriggerName = "outboxd_plan"

// Trigger modes.
const (
	TriggerEnforce = "enforce"
	TriggerRecord  = "record"
	TriggerOff     = "off"
)

// Table names the outbox table.
type Table struct{ Schema, Name string }

func (t Table) sql() string { return pgx.Identifier{t.Schema, t.Name}.Sanitize() }

func (t Table) own(name string) string { return pgx.Identifier{t.Schema, name}.Sanitize() }

// Querier is what the database functions need of a connection or pool.
type Querier interface {
	Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error)
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
}

// ApplyResult is what Apply did.
type ApplyResult struct {
	Events   int    `json:"events"`
	Versions int    `json:"versions"`
	SHA256   string `json:"sha256"`
	// Trigger is the trigger's mode after Apply: enforce, record or off.
	Trigger string `json:"trigger"`
}

// Apply stores p (source is the file as read) in the plan tables of t's
// schema, replacing the plan there, and sets the trigger to mode (enforce,
// record, off; "" leaves it as it is), in one transaction. Run `outboxd
// migrate` first: the tables and the trigger function come from migration 8.
func Apply(ctx context.Context, conn *pgx.Conn, t Table, p *Plan, source []byte, mode string) (ApplyResult, error) {
	var res ApplyResult
	switch mode {
	case "", TriggerEnforce, TriggerRecord, TriggerOff:
	default:
		return res, fmt.Errorf("trigger mode %q: want enforce, record or off", mode)
	}
	sum := sha256.Sum256(source)
	res.SHA256 = hex.EncodeToString(sum[:])
	err := pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, "SET LOCAL lock_timeout = '15s'"); err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, `INSERT INTO `+t.own(migrations.PlanTable)+` (source, source_sha256, envelope_required, entity_types)
VALUES ($1, $2, $3, $4)
ON CONFLICT (singleton) DO UPDATE SET source = excluded.source, source_sha256 = excluded.source_sha256,
  envelope_required = excluded.envelope_required, entity_types = excluded.entity_types, applied_at = now()`,
			string(source), res.SHA256, nonNil(p.Envelope.Required), nonNil(p.Envelope.EntityTypes)); err != nil {
			return undefined(err, "store the plan")
		}
		if _, err := tx.Exec(ctx, "DELETE FROM "+t.own(migrations.PlanEventTable)); err != nil {
			return undefined(err, "replace the plan's events")
		}
		rules := p.Rules()
		batch := &pgx.Batch{}
		for _, e := range p.Events {
			for _, v := range e.Versions {
				i := slices.IndexFunc(rules, func(r Rule) bool { return r.Event == e.Name && r.Version == v.Number })
				req, err := json.Marshal(rules[i].Required)
				if err != nil {
					return err
				}
				batch.Queue(`INSERT INTO `+t.own(migrations.PlanEventTable)+` (event_name, schema_version, description, owner, required, required_path, schema)
VALUES ($1, $2, $3, $4, $5, $6::jsonpath, $7)`, e.Name, v.Number, e.Description, e.Owner, string(req), rules[i].Path(), string(v.Schema))
				res.Versions++
			}
			res.Events++
		}
		if err := tx.SendBatch(ctx, batch).Close(); err != nil {
			return fmt.Errorf("store the plan's events: %w", err)
		}
		if mode != "" {
			if _, err := tx.Exec(ctx, "DROP TRIGGER IF EXISTS "+pgx.Identifier{TriggerName}.Sanitize()+" ON "+t.sql()); err != nil {
				return fmt.Errorf("drop trigger %s on %s: %w", TriggerName, t.sql(), err)
			}
			if mode != TriggerOff {
				if _, err := tx.Exec(ctx, "CREATE TRIGGER "+pgx.Identifier{TriggerName}.Sanitize()+" BEFORE INSERT ON "+t.sql()+
					" FOR EACH ROW EXECUTE FUNCTION "+t.own(migrations.PlanCheckFunction)+"('"+mode+"')"); err != nil {
					return undefined(fmt.Errorf("create trigger %s on %s: %w", TriggerName, t.sql(), err), "")
				}
			}
		}
		var err error
		res.Trigger, err = TriggerMode(ctx, tx, t)
		return err
	})
	return res, err
}

// undefined turns a missing table or function into the advice to migrate.
func undefined(err error, what string) error {
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) && (pgErr.Code == "42P01" || pgErr.Code == "42883") {
		return fmt.Errorf("%s: %s: run `outboxd migrate` (schema version %d adds the tracking plan)", what, pgErr.Message, 8)
	}
	if what == "" {
		return err
	}
	return fmt.Errorf("%s: %w", what, err)
}

func nonNil(s []string) []string {
	if s == nil {
		return []string{}
	}
	return s
}

// TriggerMode reads the mode of the plan's trigger on t: enforce, record,
// or off when there is none.
func TriggerMode(ctx context.Context, q Querier, t Table) (string, error) {
	var args []byte
	err := q.QueryRow(ctx, `SELECT tgargs FROM pg_catalog.pg_trigger WHERE tgrelid = $1::regclass AND tgname = $2`,
		t.sql(), TriggerName).Scan(&args)
	if errors.Is(err, pgx.ErrNoRows) {
		return TriggerOff, nil
	}
	if err != nil {
		return "", fmt.Errorf("read trigger %s on %s: %w", TriggerName, t.sql(), err)
	}
	return strings.TrimRight(string(args), "\x00"), nil
}

// Seen is an event name, or name and schema_version, found in the table
// that the plan lacks.
type Seen struct {
	Event   string `json:"event_name"`
	Version int    `json:"schema_version"`
	// EventKnown: the plan has the event name, not this version.
	EventKnown bool  `json:"event_known"`
	Rows       int64 `json:"rows"`
}

// Invalid counts the sampled rows of one event and version that do not
// match the plan, with the first few errors.
type Invalid struct {
	Event   string `json:"event_name"`
	Version int    `json:"schema_version"`
	Sampled int    `json:"sampled"`
	Invalid int    `json:"invalid"`
	// Errors are the first MaxErrors, "id N: ...".
	Errors []string `json:"errors"`
}

// MaxErrors is how many errors Survey keeps per event and version.
const MaxErrors = 3

// Survey is what the table holds against the plan.
type Survey struct {
	// Unknown are the names and versions of the table the plan lacks, with
	// their row counts (the whole table).
	Unknown []Seen `json:"unknown"`
	// Sampled is the number of rows read: the newest by id.
	Sampled int `json:"sampled"`
	// Invalid lists the events and versions with rows that break the plan.
	Invalid []Invalid `json:"invalid"`
}

// Compare reads t: every event name and schema_version with its count, and
// the sample newest rows by id, each checked against the plan's envelope
// rules and its version's schema.
func Compare(ctx context.Context, q Querier, t Table, p *Plan, sample int) (*Survey, error) {
	s := &Survey{Unknown: []Seen{}, Invalid: []Invalid{}}
	rows, err := q.Query(ctx, `SELECT event_name::text, schema_version::integer, count(*) FROM `+t.sql()+` GROUP BY 1, 2 ORDER BY 1, 2`)
	if err != nil {
		return nil, fmt.Errorf("count events of %s: %w", t.sql(), err)
	}
	seen, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (Seen, error) {
		var x Seen
		return x, r.Scan(&x.Event, &x.Version, &x.Rows)
	})
	if err != nil {
		return nil, fmt.Errorf("count events of %s: %w", t.sql(), err)
	}
	for _, x := range seen {
		if e := p.Event(x.Event); e == nil || e.Version(x.Version) == nil {
			x.EventKnown = e != nil
			s.Unknown = append(s.Unknown, x)
		}
	}

	rows, err = q.Query(ctx, `SELECT to_jsonb(t) FROM `+t.sql()+` t ORDER BY id DESC LIMIT $1`, sample)
	if err != nil {
		return nil, fmt.Errorf("sample rows of %s: %w", t.sql(), err)
	}
	sampled, err := pgx.CollectRows(rows, pgx.RowTo[[]byte])
	if err != nil {
		return nil, fmt.Errorf("sample rows of %s: %w", t.sql(), err)
	}
	s.Sampled = len(sampled)
	byKey := map[[2]any]*Invalid{}
	var order []*Invalid
	// Oldest first, so that "the first errors" are in id order.
	for _, raw := range slices.Backward(sampled) {
		row, err := jsonschema.UnmarshalJSON(strings.NewReader(string(raw)))
		if err != nil {
			return nil, fmt.Errorf("sample rows of %s: %w", t.sql(), err)
		}
		m, _ := row.(map[string]any)
		name, _ := m["event_name"].(string)
		version := 1
		if n, ok := m["schema_version"].(json.Number); ok {
			if i, err := n.Int64(); err == nil {
				version = int(i)
			}
		}
		e := p.Event(name)
		if e == nil || e.Version(version) == nil {
			continue // counted in Unknown
		}
		key := [2]any{name, version}
		inv := byKey[key]
		if inv == nil {
			inv = &Invalid{Event: name, Version: version, Errors: []string{}}
			byKey[key] = inv
			order = append(order, inv)
		}
		inv.Sampled++
		problems := p.checkRow(e.Version(version), name, m)
		if len(problems) == 0 {
			continue
		}
		inv.Invalid++
		if len(inv.Errors) < MaxErrors {
			inv.Errors = append(inv.Errors, fmt.Sprintf("id %v: %s", m["id"], strings.Join(problems, "; ")))
		}
	}
	for _, inv := range order {
		if inv.Invalid > 0 {
			s.Invalid = append(s.Invalid, *inv)
		}
	}
	slices.SortFunc(s.Invalid, func(a, b Invalid) int {
		if c := strings.Compare(a.Event, b.Event); c != 0 {
			return c
		}
		return a.Version - b.Version
	})
	return s, nil
}

// checkRow checks one row (the table's row as JSON) against the envelope
// rules and the version's schema.
func (p *Plan) checkRow(v *Version, event string, row map[string]any) []string {
	var out []string
	for _, col := range p.Envelope.Required {
		if row[col] == nil {
			out = append(out, col+" is NULL")
		}
	}
	if et, ok := row["entity_type"].(string); ok && len(p.Envelope.EntityTypes) > 0 && !slices.Contains(p.Envelope.EntityTypes, et) {
		out = append(out, fmt.Sprintf("entity_type %q is not allowed", et))
	}
	props := row["properties"]
	if s, ok := props.(string); ok {
		// A json-as-text properties column.
		if doc, err := jsonschema.UnmarshalJSON(strings.NewReader(s)); err == nil {
			props = doc
		}
	}
	if err := v.Validate(event, props); err != nil {
		out = append(out, validationErrors(err)...)
	}
	return out
}

// validationErrors flattens a schema validation error into one "at
// properties/path: message" per failed keyword, sorted.
func validationErrors(err error) []string {
	return flattenErrors(err, func(loc, msg string) string {
		if loc == "" {
			loc = "/"
		}
		return "at properties" + strings.TrimSuffix(loc, "/") + ": " + msg
	})
}
