package decode

import (
	"bytes"
	"encoding/json"
	"errors"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/jackc/pgx/v5/pgtype"
)

// fuzzRelations are the relation messages every fuzz input is decoded
// after: the captured ones (public.domain_event after its ALTER TABLEs,
// other_event, alt.domain_event) and hand-built outbox shapes.
func fuzzRelations(tb testing.TB) [][]byte {
	_, msgs := goldenMessages(tb)
	var rels [][]byte
	for _, m := range msgs {
		if m[0] == 'R' {
			rels = append(rels, m)
		}
	}
	allTypes := []col{
		{"id", pgtype.Int4OID},
		{"event_name", pgtype.VarcharOID},
		{"occurred_at", pgtype.TimestampOID},
		{"organization_id", pgtype.NumericOID},
		{"user_id", pgtype.Float8OID},
		{"entity_type", pgtype.BoolOID},
		{"entity_id", pgtype.JSONOID},
		{"source", pgtype.UUIDOID},
		{"schema_version", pgtype.Int2OID},
		{"properties", pgtype.TextOID},
		{"traceparent", pgtype.TextOID},
		{"is_processed", pgtype.BoolOID},
	}
	return append(rels,
		relationMsg(1, "public", "domain_event", outboxCols...),
		relationMsg(2, "public", "domain_event", allTypes...),
		relationMsg(3, "public", "domain_event", col{"id", pgtype.Int8OID}),
		relationMsg(5, "public", "outboxd_subscription", col{"id", pgtype.Int8OID}, col{"secrets", pgtype.TextArrayOID}),
	)
}

// FuzzDecode decodes arbitrary bytes after the fuzzRelations and checks that
// Decode never panics, that every body is valid JSON, that nothing returned
// aliases the input, and that the Decoder still works afterwards.
func FuzzDecode(f *testing.F) {
	// The seed corpus in testdata/fuzz/FuzzDecode holds the captured
	// messages; these add the hand-built shapes.
	at := time.Date(2026, 11, 26, 10, 0, 0, 0, time.UTC)
	f.Add(insertMsg(1, exampleRow()...))
	f.Add(insertMsg(2, txt("1"), txt("n"), txt("2026-11-26 10:00:00.5"), txt("NaN"), txt("1e+100"), txt("t"),
		txt(`{"a": [1]}`), txt("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"), txt("1"), txt(`{"traceparent":"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}`), null, txt("f")))
	f.Add(insertMsg(3, txt("7")))
	f.Add(insertMsg(3, null))
	f.Add(beginMsg(1, at, 2))
	f.Add(commitMsg(1, 2, at))
	f.Add(logicalMsg(true, 1, "outboxd", []byte("x")))
	f.Add(relationMsg(4, "public", "domain_event", col{"id", pgtype.TextOID}))
	f.Add(msg('Y').u32(1).str("public").str("t").b)
	f.Add(updateMsg(5, 0, nil, txt("1"), val{kind: 'u'}))
	f.Add(updateMsg(5, 'O', []val{txt("1"), txt("{whsec_a}")}, txt("1"), val{kind: 'u'}))
	f.Add(updateMsg(5, 'K', []val{txt("1"), null}, txt("2"), val{kind: 'u'}))
	f.Add(insertMsg(5, txt("1"), val{kind: 'u'}))

	rels := fuzzRelations(f)
	good := insertMsg(1, exampleRow()...)

	f.Fuzz(func(t *testing.T, data []byte) {
		for _, table := range []Table{{Name: "domain_event"}, {Schema: "alt", Name: "domain_event"}} {
			d := NewDecoder(table)
			for _, r := range rels {
				_, _ = d.Decode(r)
			}
			in := bytes.Clone(data)
			m, err := d.Decode(in)
			if err != nil {
				var bad *BadRowError
				switch {
				case errors.Is(err, ErrMalformed), errors.Is(err, ErrUnknownRelation), errors.Is(err, ErrUnsupported),
					errors.As(err, &bad), m.Kind == KindRelation:
				default:
					t.Fatalf("unclassified error %v", err)
				}
				if m.Kind != KindIgnored && m.Kind != KindRelation {
					t.Fatalf("error %v with kind %v", err, m.Kind)
				}
			}

			var keep []byte
			switch m.Kind {
			case KindEvent:
				if !json.Valid(m.Event.Body) || !utf8.Valid(m.Event.Body) || !bytes.HasPrefix(m.Event.Body, []byte(`{"id":`)) {
					t.Fatalf("invalid body %q", m.Event.Body)
				}
				keep = bytes.Clone(m.Event.Body)
				if !json.Valid(AppendBatch(nil, []*Event{m.Event, m.Event})) {
					t.Fatalf("invalid batch")
				}
			case KindInsert, KindUpdate, KindDelete:
				keep = bytes.Join(m.Row.Values, []byte{0})
				// 'u' is never NULL: only updates and deletes may flag it,
				// one flag per column, and a flagged column has no value.
				if m.Kind == KindInsert && m.Row.Unchanged != nil {
					t.Fatalf("insert with unchanged columns %v", m.Row.Unchanged)
				}
				if m.Row.Unchanged != nil {
					if len(m.Row.Unchanged) != len(m.Row.Values) {
						t.Fatalf("%d flags for %d values", len(m.Row.Unchanged), len(m.Row.Values))
					}
					for i, u := range m.Row.Unchanged {
						if u && m.Row.Values[i] != nil {
							t.Fatalf("unchanged column %d has a value", i)
						}
					}
				}
			case KindLogical:
				keep = bytes.Clone(m.Logical.Content)
			}
			// Nothing returned may alias the input.
			for i := range in {
				in[i] ^= 0xff
			}
			switch m.Kind {
			case KindEvent:
				if !bytes.Equal(keep, m.Event.Body) {
					t.Fatalf("body aliases the input")
				}
			case KindInsert, KindUpdate, KindDelete:
				if !bytes.Equal(keep, bytes.Join(m.Row.Values, []byte{0})) {
					t.Fatalf("row aliases the input")
				}
			case KindLogical:
				if !bytes.Equal(keep, m.Logical.Content) {
					t.Fatalf("content aliases the input")
				}
			}

			// The decoder still works.
			if _, err := d.Decode(relationMsg(1, table.schema(), table.Name, outboxCols...)); err != nil {
				t.Fatal(err)
			}
			m, err = d.Decode(good)
			if err != nil || m.Kind != KindEvent || string(m.Event.Body) != exampleBody {
				t.Fatalf("decoder broken after %q: %v", data, err)
			}
		}
	})
}
