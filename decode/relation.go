package decode

import (
	"fmt"

	"github.com/jackc/pgx/v5/pgtype"
)

// Table names the outbox table. An empty Schema means "public".
//
// OID, when not zero, is the table's relation OID, and it alone identifies
// the outbox in the stream: pgoutput names a relation as the catalog had it
// when the row was written, so an insert made while the table was renamed
// carries another name, and a partitioned table published through its root
// (publish_via_partition_root) carries the root's OID. With OID zero the
// relation is matched by schema and name.
//
// MessageNamespace is the outbox's message namespace (docs/DESIGN.md §4),
// stored by `outboxd migrate` in outboxd_outbox: every Event decoded for this
// table gets its MessageID in it. Empty only in tests.
type Table struct {
	Schema, Name     string
	OID              uint32
	MessageNamespace string
}

// String returns the table as schema.name.
func (t Table) String() string { return t.schema() + "." + t.Name }

// Matches reports whether relation rel is this table.
func (t Table) Matches(rel *Relation) bool {
	if t.OID != 0 {
		return rel.ID == t.OID
	}
	return rel.Namespace == t.schema() && rel.Name == t.Name
}

func (t Table) schema() string {
	if t.Schema == "" {
		return "public"
	}
	return t.Schema
}

// Column is one column of a relation. TypeOID is from the relation message.
type Column struct {
	Name    string
	TypeOID uint32
}

// Relation is a cached pgoutput relation.
//
// A Relation is never modified after the decoder built it: a later relation
// message (ALTER TABLE) replaces the cached pointer, so Rows and errors that
// point to an older Relation stay consistent with the values they carry.
type Relation struct {
	ID        uint32
	Namespace string
	Name      string
	Columns   []Column
}

// Validate reports whether the relation can be used as the outbox table: it
// must have a column named id of type int2, int4 or int8. Every other column
// is optional (a missing column is null in the envelope).
func (r *Relation) Validate() error {
	if r == nil {
		return fmt.Errorf("validate relation: nil relation")
	}
	for _, c := range r.Columns {
		if c.Name != "id" {
			continue
		}
		switch c.TypeOID {
		case pgtype.Int2OID, pgtype.Int4OID, pgtype.Int8OID:
			return nil
		default:
			return fmt.Errorf("validate relation %s.%s: column id has type oid %d, want int2, int4 or int8", r.Namespace, r.Name, c.TypeOID)
		}
	}
	return fmt.Errorf("validate relation %s.%s: no id column", r.Namespace, r.Name)
}

// field is one key of the envelope (docs/DESIGN.md §4), in body order.
type field int

const (
	fieldID field = iota
	fieldEventName
	fieldOccurredAt
	fieldOrganizationID
	fieldUserID
	fieldEntityType
	fieldEntityID
	fieldCorrelationID
	fieldSource
	fieldSchemaVersion
	fieldProperties
	numFields
)

// fieldPrefix is what precedes each field's value in the body.
var fieldPrefix = [numFields]string{
	`{"id":`,
	`,"event_name":`,
	`,"occurred_at":`,
	`,"organization_id":`,
	`,"user_id":`,
	`,"entity_type":`,
	`,"entity_id":`,
	`,"correlation_id":`,
	`,"source":`,
	`,"schema_version":`,
	`,"properties":`,
}

// prefixesLen is the total length of fieldPrefix plus the closing brace.
var prefixesLen = func() int {
	n := 1
	for _, p := range fieldPrefix {
		n += len(p)
	}
	return n
}()

// conv is how a column's text value becomes a JSON value.
type conv uint8

const (
	convString    conv = iota // JSON string of the text form
	convNumber                // number verbatim when it is a valid JSON number, else string
	convBool                  // t/f → true/false, else string
	convJSON                  // raw JSON when valid, else string
	convTimestamp             // RFC 3339 UTC with 6 fraction digits, else string
)

// convFor returns the conversion for a column type.
func convFor(oid uint32) conv {
	switch oid {
	case pgtype.Int2OID, pgtype.Int4OID, pgtype.Int8OID, pgtype.OIDOID,
		pgtype.NumericOID, pgtype.Float4OID, pgtype.Float8OID:
		return convNumber
	case pgtype.BoolOID:
		return convBool
	case pgtype.JSONOID, pgtype.JSONBOID:
		return convJSON
	case pgtype.TimestampOID, pgtype.TimestamptzOID:
		return convTimestamp
	default:
		return convString
	}
}

// plan says where each envelope field comes from in a relation. It is
// computed once per relation message, so the insert path does no name
// matching.
type plan struct {
	col         [numFields]int // column index, -1 when missing
	conv        [numFields]conv
	traceparent int // column index of traceparent, -1 when missing
	processed   int // column index of is_processed, -1 when missing
	idErr       error
}

func newPlan(r *Relation) plan {
	p := plan{traceparent: -1, processed: -1}
	for i := range p.col {
		p.col[i] = -1
	}
	for i, c := range r.Columns {
		f := field(-1)
		switch c.Name {
		case "id":
			f = fieldID
		case "event_name":
			f = fieldEventName
		case "occurred_at":
			f = fieldOccurredAt
		case "organization_id":
			f = fieldOrganizationID
		case "user_id":
			f = fieldUserID
		case "entity_type":
			f = fieldEntityType
		case "entity_id":
			f = fieldEntityID
		case "correlation_id":
			f = fieldCorrelationID
		case "source":
			f = fieldSource
		case "schema_version":
			f = fieldSchemaVersion
		case "properties":
			f = fieldProperties
		case "traceparent":
			if p.traceparent < 0 {
				p.traceparent = i
			}
		case "is_processed":
			if p.processed < 0 {
				p.processed = i
			}
		}
		if f < 0 || p.col[f] >= 0 {
			continue
		}
		p.col[f] = i
		p.conv[f] = convFor(c.TypeOID)
		if f == fieldProperties {
			switch c.TypeOID {
			case pgtype.TextOID, pgtype.VarcharOID:
				// Outbox tables made by ORMs often keep JSON in a text column.
				p.conv[f] = convJSON
			}
		}
	}
	p.idErr = r.Validate()
	return p
}
