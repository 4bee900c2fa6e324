// Package decode turns pgoutput logical replication messages (protocol version 1)
// into outbox events.
//
// It is pure: no I/O, goroutines or logging. A Decoder keeps the relation cache
// (relation messages replace earlier ones, so ALTER TABLE is followed) and matches
// columns by name, so any table with at least an id column works. Malformed input
// returns an error; it never panics.
//
// # Invariants
//
//   - Decode copies everything it returns: XLogData.WALData may be reused as soon
//     as Decode returns. Relations are never modified once built.
//   - Messages are parsed by bounds-checked code of this package, not by
//     pglogrepl.Parse, whose parsers index truncated input unchecked. Every error
//     wraps ErrMalformed, ErrUnknownRelation or ErrUnsupported, or is a
//     *BadRowError (an outbox row without a usable id), or is the
//     Relation.Validate error of an outbox relation message (returned with a
//     KindRelation Message); the Decoder stays usable after any of them.
//   - Every Event.Body is valid JSON (checked by FuzzDecode against
//     encoding/json), valid UTF-8, and has the keys of docs/DESIGN.md §4 in order:
//     id, event_name, occurred_at, organization_id, user_id, entity_type,
//     entity_id, correlation_id, source, schema_version, properties. A missing
//     column or a NULL is null; other columns are not in the body.
//   - EventFromText (table catch-up, rows read in text format) and Decode
//     (stream) build the same Event from the same text values.
//
// # Values
//
// pgoutput sends values in their text form; the column's type OID from the
// relation message picks the JSON form:
//
//	int2, int4, int8, oid, numeric,  a number, verbatim; a text that is not a JSON
//	float4, float8                   number (NaN, Infinity, -Infinity) is a string
//	bool                             true / false ('t' / 'f')
//	json, jsonb                      the JSON text, verbatim (invalid UTF-8 bytes
//	                                 become U+FFFD); invalid JSON, or JSON nested
//	                                 deeper than 9998 levels, is a string
//	timestamptz, timestamp           "2006-01-02T15:04:05.000000Z": UTC (timestamp
//	                                 without time zone is taken as UTC), exactly 6
//	                                 fraction digits; infinity, -infinity, BC and
//	                                 years past 9999 keep their text, as a string
//	anything else                    a JSON string of the text form
//
// The properties column is also embedded as JSON when its type is text or
// varchar and its value is valid JSON. Strings are escaped for quotes,
// backslashes and control characters; each invalid UTF-8 byte becomes U+FFFD.
//
// Timestamps are parsed from the ISO DateStyle that logical replication
// connections should set (options=-c datestyle=ISO, as Postgres's own
// subscriber does); the session time zone does not matter.
//
// Unchanged-TOAST ('u') values are never read as NULL: an insert carrying one
// is malformed, and an update's are taken from its old row when the relation
// sends it (REPLICA IDENTITY FULL) or flagged in Row.Unchanged for the caller.
// Binary ('b') values are only sent when the binary option is requested, which
// outboxd never does: they are ErrUnsupported rather than guessed at.
//
// Protocol reference:
// https://www.postgresql.org/docs/15/protocol-logicalrep-message-formats.html
package decode
