package decode

import (
	"encoding/json"
	"errors"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5/pgtype"
	"github.com/stretchr/testify/require"
)

const outboxRelID = 16385

// testNS is the message namespace of the decoders made by setup.
const testNS = "0a1b2c3d4e5f6789"

// setup returns a Decoder for public.domain_event that has seen the outbox
// relation message with cols.
func setup(t *testing.T, cols ...col) *Decoder {
	t.Helper()
	if cols == nil {
		cols = outboxCols
	}
	d := NewDecoder(Table{Schema: "public", Name: "domain_event", MessageNamespace: testNS})
	m, err := d.Decode(relationMsg(outboxRelID, "public", "domain_event", cols...))
	require.NoError(t, err)
	require.Equal(t, KindRelation, m.Kind)
	return d
}

// decodeEvent decodes an insert that must produce an Event with a valid body.
func decodeEvent(t *testing.T, d *Decoder, data []byte) *Event {
	t.Helper()
	m, err := d.Decode(data)
	require.NoError(t, err)
	require.Equal(t, KindEvent, m.Kind)
	require.True(t, json.Valid(m.Event.Body), "invalid body %s", m.Event.Body)
	return m.Event
}

// bodyField returns one key of a body, as raw JSON.
func bodyField(t *testing.T, body []byte, key string) string {
	t.Helper()
	var v map[string]json.RawMessage
	require.NoError(t, json.Unmarshal(body, &v), "%s", body)
	raw, ok := v[key]
	require.True(t, ok, "no %s in %s", key, body)
	return string(raw)
}

func TestDecodeExample(t *testing.T) {
	t.Parallel()
	d := setup(t)
	at := time.Date(2026, 11, 26, 10, 0, 0, 654321000, time.UTC)

	m, err := d.Decode(beginMsg(0x16B3748, at, 771))
	require.NoError(t, err)
	require.Equal(t, Message{Kind: KindBegin, Begin: Begin{FinalLSN: 0x16B3748, CommitTime: at, Xid: 771}}, m)

	ev := decodeEvent(t, d, insertMsg(outboxRelID, exampleRow()...))
	require.Equal(t, exampleBody, string(ev.Body))
	require.Equal(t, &Event{
		ID: 42, Name: "batch_started", OrganizationID: 7, HasOrganization: true,
		EntityType: "batch", EntityID: "B-19",
		OccurredAt: time.Date(2026, 11, 26, 10, 0, 0, 123456000, time.UTC),
		Body:       []byte(exampleBody), CommitLSN: 0x16B3748, Index: 0,
		// 1795687200123456 µs is hoinb7omdc in base 36.
		MessageID: "evt_0a1b2c3d4e5f6789_42_hoinb7omdc",
	}, ev)

	ev = decodeEvent(t, d, insertMsg(outboxRelID, exampleRow()...))
	require.Equal(t, 1, ev.Index)
	require.Equal(t, pglogrepl.LSN(0x16B3748), ev.CommitLSN)

	m, err = d.Decode(commitMsg(0x16B3748, 0x16B3778, at))
	require.NoError(t, err)
	require.Equal(t, Message{Kind: KindCommit, Commit: Commit{CommitLSN: 0x16B3748, EndLSN: 0x16B3778, CommitTime: at}}, m)

	// Outside a transaction an event has no commit LSN; a new Begin restarts the index.
	require.Zero(t, decodeEvent(t, d, insertMsg(outboxRelID, exampleRow()...)).CommitLSN)
	_, err = d.Decode(beginMsg(0x2000000, at, 772))
	require.NoError(t, err)
	ev = decodeEvent(t, d, insertMsg(outboxRelID, exampleRow()...))
	require.Equal(t, 0, ev.Index)
	require.Equal(t, pglogrepl.LSN(0x2000000), ev.CommitLSN)
}

func TestDecodeTimes(t *testing.T) {
	t.Parallel()
	d := NewDecoder(Table{Name: "domain_event"})
	for _, at := range []time.Time{
		time.Date(2000, 1, 1, 0, 0, 0, 0, time.UTC),
		time.Date(1999, 12, 31, 23, 59, 59, 999999000, time.UTC),
		time.Date(2026, 11, 26, 10, 0, 0, 1000, time.UTC),
	} {
		m, err := d.Decode(beginMsg(1, at, 1))
		require.NoError(t, err)
		require.Equal(t, at, m.Begin.CommitTime)
		require.Equal(t, time.UTC, m.Begin.CommitTime.Location())
		m, err = d.Decode(commitMsg(1, 2, at))
		require.NoError(t, err)
		require.Equal(t, at, m.Commit.CommitTime)
	}
}

func TestDecodeCopiesInput(t *testing.T) {
	t.Parallel()
	d := NewDecoder(Table{Name: "domain_event"})

	scribble := func(b []byte) {
		for i := range b {
			b[i] = 0xAA
		}
	}
	rel := relationMsg(outboxRelID, "public", "domain_event", outboxCols...)
	m, err := d.Decode(rel)
	require.NoError(t, err)
	scribble(rel)
	require.Equal(t, "domain_event", m.Relation.Name)
	require.Equal(t, "occurred_at", d.Relation(outboxRelID).Columns[2].Name)

	in := insertMsg(outboxRelID, exampleRow()...)
	ev := decodeEvent(t, d, in)
	scribble(in)
	require.Equal(t, exampleBody, string(ev.Body))
	require.Equal(t, "batch_started", ev.Name)
	require.Equal(t, "B-19", ev.EntityID)

	_, err = d.Decode(relationMsg(7, "public", "other", col{"a", pgtype.TextOID}, col{"b", pgtype.TextOID}))
	require.NoError(t, err)
	in = insertMsg(7, txt("hello"), txt("world"))
	m, err = d.Decode(in)
	require.NoError(t, err)
	scribble(in)
	require.Equal(t, [][]byte{[]byte("hello"), []byte("world")}, m.Row.Values)
	// Values share one allocation but cannot grow into each other.
	m.Row.Values[0] = append(m.Row.Values[0], '!')
	require.Equal(t, []byte("world"), m.Row.Values[1])

	in = logicalMsg(true, 5, "outboxd", []byte("content"))
	m, err = d.Decode(in)
	require.NoError(t, err)
	scribble(in)
	require.Equal(t, &Logical{LSN: 5, Prefix: "outboxd", Content: []byte("content"), Transactional: true}, m.Logical)
}

func TestDecodeUpdateAndDeleteOfOtherRelation(t *testing.T) {
	t.Parallel()
	d := setup(t)
	_, err := d.Decode(relationMsg(9, "public", "outboxd_subscription", col{"id", pgtype.Int8OID}, col{"url", pgtype.TextOID}))
	require.NoError(t, err)

	// Update without and with the old key.
	for _, data := range [][]byte{
		msg('U').u32(9).u8('N').u16(2).u8('t').u32(1).raw([]byte("7")).u8('t').u32(5).raw([]byte("https")).b,
		msg('U').u32(9).u8('K').u16(2).u8('t').u32(1).raw([]byte("7")).u8('n').
			u8('N').u16(2).u8('t').u32(1).raw([]byte("7")).u8('t').u32(5).raw([]byte("https")).b,
	} {
		m, err := d.Decode(data)
		require.NoError(t, err)
		require.Equal(t, KindUpdate, m.Kind)
		require.Equal(t, [][]byte{[]byte("7"), []byte("https")}, m.Row.Values)
	}
	m, err := d.Decode(msg('D').u32(9).u8('K').u16(2).u8('t').u32(1).raw([]byte("7")).u8('n').b)
	require.NoError(t, err)
	require.Equal(t, KindDelete, m.Kind)
	require.Equal(t, []byte("7"), m.Row.Values[0])
	require.Nil(t, m.Row.Values[1])

	// Malformed updates and deletes are errors, not panics.
	for _, data := range [][]byte{
		{'U'}, {'D'},
		msg('U').u32(9).u8('K').u16(3).b,
		msg('U').u32(9).u8('X').b,
		msg('D').u32(9).u8('N').u16(2).b,
		msg('U').u32(77).u8('N').u16(0).b,
	} {
		_, err := d.Decode(data)
		require.Error(t, err, "%q", data)
	}
}

func TestDecodeOtherRelation(t *testing.T) {
	t.Parallel()
	d := NewDecoder(Table{Name: "domain_event"})
	_, err := d.Decode(relationMsg(9, "public", "subscription", col{"id", pgtype.Int4OID}, col{"note", pgtype.TextOID}, col{"empty", pgtype.TextOID}))
	require.NoError(t, err)
	m, err := d.Decode(insertMsg(9, txt("1"), null, txt("")))
	require.NoError(t, err)
	require.Equal(t, KindInsert, m.Kind)
	require.Same(t, d.Relation(9), m.Row.Relation)
	require.Equal(t, []byte("1"), m.Row.Values[0])
	require.Nil(t, m.Row.Values[1], "NULL is nil")
	require.NotNil(t, m.Row.Values[2], "empty text is not NULL")
	require.Empty(t, m.Row.Values[2])

	// The same table name in another schema is not the outbox.
	_, err = d.Decode(relationMsg(10, "audit", "domain_event", outboxCols...))
	require.NoError(t, err)
	m, err = d.Decode(insertMsg(10, exampleRow()...))
	require.NoError(t, err)
	require.Equal(t, KindInsert, m.Kind)

	// An empty Schema is public.
	d = NewDecoder(Table{Name: "domain_event"})
	_, err = d.Decode(relationMsg(10, "public", "domain_event", outboxCols...))
	require.NoError(t, err)
	require.Equal(t, exampleBody, string(decodeEvent(t, d, insertMsg(10, exampleRow()...)).Body))
}

func TestDecodeLogical(t *testing.T) {
	t.Parallel()
	d := NewDecoder(Table{Name: "domain_event"})
	m, err := d.Decode(logicalMsg(false, 0x1234, "outboxd-heartbeat", nil))
	require.NoError(t, err)
	require.Equal(t, KindLogical, m.Kind)
	require.Equal(t, &Logical{LSN: 0x1234, Prefix: "outboxd-heartbeat", Content: []byte{}, Transactional: false}, m.Logical)
}

func TestDecodeIgnored(t *testing.T) {
	t.Parallel()
	d := setup(t)
	for _, data := range [][]byte{
		// Update: relation id, 'N' and a new tuple.
		msg('U').u32(outboxRelID).u8('N').u16(1).u8('n').b,
		// Delete: relation id, 'K' and a key tuple.
		msg('D').u32(outboxRelID).u8('K').u16(1).u8('t').u32(2).raw([]byte("42")).b,
		// Truncate: relation count, options, relation ids.
		msg('T').u32(1).u8(0).u32(outboxRelID).b,
		// Type: id, namespace, name.
		msg('Y').u32(16398).str("public").str("priority").b,
		// Origin: commit LSN and name.
		msg('O').u64(0x1000).str("capture_origin").b,
		// Ignored kinds are not parsed, so truncated ones are ignored too.
		{'T'}, {'Y'}, {'O'},
	} {
		m, err := d.Decode(data)
		require.NoError(t, err, "%q", data)
		require.Equal(t, Message{Kind: KindIgnored}, m)
	}
}

func TestDecodeUnknownAndUnsupported(t *testing.T) {
	t.Parallel()
	d := setup(t)

	_, err := d.Decode(insertMsg(999, txt("1")))
	require.ErrorIs(t, err, ErrUnknownRelation)

	for _, kind := range []byte("SEcAbPKrp") {
		_, err = d.Decode([]byte{kind, 0, 0, 0, 0})
		require.ErrorIs(t, err, ErrUnsupported, "%q", kind)
	}
	for _, kind := range []byte("Zx\x00w") {
		_, err = d.Decode([]byte{kind, 0, 0, 0, 0})
		require.ErrorIs(t, err, ErrMalformed, "%q", kind)
	}

	// Binary values are only sent in binary mode, which is never asked for.
	row := exampleRow()
	row[1] = val{kind: 'b', data: "batch_started"}
	_, err = d.Decode(insertMsg(outboxRelID, row...))
	require.ErrorIs(t, err, ErrUnsupported)

	// The decoder goes on.
	require.Equal(t, exampleBody, string(decodeEvent(t, d, insertMsg(outboxRelID, exampleRow()...)).Body))
}

func TestDecodeMalformed(t *testing.T) {
	t.Parallel()
	at := time.Date(2026, 11, 26, 10, 0, 0, 0, time.UTC)
	valid := map[string][]byte{
		"begin":    beginMsg(1, at, 2),
		"commit":   commitMsg(1, 2, at),
		"relation": relationMsg(outboxRelID, "public", "domain_event", outboxCols...),
		"insert":   insertMsg(outboxRelID, exampleRow()...),
		"logical":  logicalMsg(true, 1, "p", []byte("content")),
	}
	for name, data := range valid {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			d := setup(t)
			_, err := d.Decode(data)
			require.NoError(t, err)
			for n := 0; n < len(data); n++ {
				_, err := d.Decode(data[:n])
				require.ErrorIs(t, err, ErrMalformed, "truncated to %d bytes", n)
			}
			_, err = d.Decode(append(append([]byte{}, data...), 0))
			require.ErrorIs(t, err, ErrMalformed, "trailing byte")
			// Nothing above broke the cached relation.
			require.Equal(t, exampleBody, string(decodeEvent(t, d, insertMsg(outboxRelID, exampleRow()...)).Body))
		})
	}

	d := setup(t)
	for name, data := range map[string][]byte{
		"insert tuple marker":   msg('I').u32(outboxRelID).u8('K').u16(0).b,
		"insert column count":   insertMsg(outboxRelID, exampleRow()[:13]...),
		"insert extra column":   insertMsg(outboxRelID, append(exampleRow(), txt("x"))...),
		"insert value kind":     insertMsg(outboxRelID, append(exampleRow()[:13], val{kind: 'x'})...),
		"insert length":         msg('I').u32(outboxRelID).u8('N').u16(14).u8('t').u32(0xffffffff).raw([]byte("42")).b,
		"relation column count": msg('R').u32(1).str("public").str("domain_event").u8('d').u16(65535).b,
		"logical length":        msg('M').u8(0).u64(1).str("p").u32(10).raw([]byte("short")).b,
		"empty":                 {},
	} {
		_, err := d.Decode(data)
		require.ErrorIs(t, err, ErrMalformed, name)
	}
}

func TestNulls(t *testing.T) {
	t.Parallel()
	d := setup(t)
	// Every column but id, one at a time.
	for i := 1; i < len(outboxCols); i++ {
		row := exampleRow()
		row[i] = null
		ev := decodeEvent(t, d, insertMsg(outboxRelID, row...))
		name := outboxCols[i].name
		switch name {
		case "is_processed", "processed_at", "delivery_attempts":
			require.Equal(t, exampleBody, string(ev.Body))
		default:
			require.Equal(t, "null", bodyField(t, ev.Body, name))
		}
	}

	// All of them at once.
	row := []val{txt("42")}
	for i := 1; i < len(outboxCols); i++ {
		row = append(row, null)
	}
	ev := decodeEvent(t, d, insertMsg(outboxRelID, row...))
	require.Equal(t, `{"id":42,"event_name":null,"occurred_at":null,"organization_id":null,"user_id":null,"entity_type":null,"entity_id":null,"correlation_id":null,"source":null,"schema_version":null,"properties":null}`, string(ev.Body))
	require.Equal(t, &Event{ID: 42, Body: ev.Body, Index: ev.Index, MessageID: "evt_" + testNS + "_42"}, ev)
}

func TestMissingAndExtraColumns(t *testing.T) {
	t.Parallel()

	d := setup(t, col{"id", pgtype.Int8OID})
	ev := decodeEvent(t, d, insertMsg(outboxRelID, txt("1")))
	require.Equal(t, `{"id":1,"event_name":null,"occurred_at":null,"organization_id":null,"user_id":null,"entity_type":null,"entity_id":null,"correlation_id":null,"source":null,"schema_version":null,"properties":null}`, string(ev.Body))

	d = setup(t, col{"properties", pgtype.JSONOID}, col{"event_name", pgtype.TextOID}, col{"id", pgtype.Int4OID})
	ev = decodeEvent(t, d, insertMsg(outboxRelID, txt(`{"x":true}`), txt("e"), txt("2")))
	require.Equal(t, `{"id":2,"event_name":"e","occurred_at":null,"organization_id":null,"user_id":null,"entity_type":null,"entity_id":null,"correlation_id":null,"source":null,"schema_version":null,"properties":{"x":true}}`, string(ev.Body))

	// Extra columns anywhere, and the known ones shuffled: same body.
	cols := []col{{"tenant", pgtype.TextOID}}
	order := []int{10, 3, 0, 13, 1, 2, 12, 4, 5, 6, 7, 8, 9, 11}
	var row []val
	row = append(row, txt("acme"))
	for _, i := range order {
		cols = append(cols, outboxCols[i])
		row = append(row, exampleRow()[i])
		if i == 6 {
			cols = append(cols, col{"color", pgtype.JSONBOID})
			row = append(row, txt(`{"not":"in the body"}`))
		}
	}
	d = setup(t, cols...)
	ev = decodeEvent(t, d, insertMsg(outboxRelID, row...))
	require.Equal(t, exampleBody, string(ev.Body))
	require.Equal(t, "batch_started", ev.Name)
}

func TestAlterTable(t *testing.T) {
	t.Parallel()
	d := setup(t)
	ev1 := decodeEvent(t, d, insertMsg(outboxRelID, exampleRow()...))
	rel1 := d.Relation(outboxRelID)

	// ADD COLUMN traceparent, DROP COLUMN user_id, organization_id and
	// properties retyped to text: a new relation message with the same id.
	var cols []col
	var row []val
	for i, c := range outboxCols {
		switch c.name {
		case "user_id":
			continue
		case "organization_id", "properties":
			c.oid = pgtype.TextOID
		}
		cols = append(cols, c)
		row = append(row, exampleRow()[i])
	}
	cols = append(cols, col{"traceparent", pgtype.TextOID})
	row = append(row, txt("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"))
	m, err := d.Decode(relationMsg(outboxRelID, "public", "domain_event", cols...))
	require.NoError(t, err)
	require.NotSame(t, rel1, m.Relation)
	require.Same(t, m.Relation, d.Relation(outboxRelID))

	ev2 := decodeEvent(t, d, insertMsg(outboxRelID, row...))
	require.Equal(t, `{"id":42,"event_name":"batch_started","occurred_at":"2026-11-26T10:00:00.123456Z","organization_id":"7","user_id":null,"entity_type":"batch","entity_id":"B-19","correlation_id":"c1","source":"batch_service","schema_version":1,"properties":{"a":1}}`, string(ev2.Body))
	require.Equal(t, "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", ev2.Traceparent)
	require.Equal(t, int64(7), ev2.OrganizationID)

	// An insert of another shape does not fit the relation.
	_, err = d.Decode(insertMsg(outboxRelID, append(exampleRow(), txt("x"))...))
	require.ErrorIs(t, err, ErrMalformed)

	// Earlier results are untouched.
	require.Equal(t, exampleBody, string(ev1.Body))
	require.Len(t, rel1.Columns, 14)
	require.Equal(t, "user_id", rel1.Columns[4].Name)

	// id retyped to numeric: the relation is refused, its rows are bad.
	cols[0].oid = pgtype.NumericOID
	m, err = d.Decode(relationMsg(outboxRelID, "public", "domain_event", cols...))
	require.ErrorContains(t, err, "column id has type oid 1700")
	require.Equal(t, KindRelation, m.Kind)
	_, err = d.Decode(insertMsg(outboxRelID, row...))
	var bad *BadRowError
	require.ErrorAs(t, err, &bad)
	require.Len(t, bad.Row.Values, len(row))
}

func TestBadRow(t *testing.T) {
	t.Parallel()
	d := setup(t)
	for _, tc := range []struct {
		id     val
		reason string
	}{
		{null, "id is null"},
		{txt(""), `id "" is not an integer`},
		{txt("abc"), `id "abc" is not an integer`},
		{txt("1.5"), `id "1.5" is not an integer`},
		{txt("9223372036854775808"), `id "9223372036854775808" is not an integer`},
		{txt("-9223372036854775809"), `id "-9223372036854775809" is not an integer`},
	} {
		row := exampleRow()
		row[0] = tc.id
		m, err := d.Decode(insertMsg(outboxRelID, row...))
		var bad *BadRowError
		require.ErrorAs(t, err, &bad, tc.reason)
		require.Equal(t, tc.reason, bad.Reason)
		require.Equal(t, Message{}, m)
		require.Same(t, d.Relation(outboxRelID), bad.Relation)
		require.Equal(t, []byte("batch_started"), bad.Row.Values[1])
		require.Contains(t, err.Error(), "bad outbox row in public.domain_event: "+tc.reason)

		// The decoder goes on.
		require.Equal(t, exampleBody, string(decodeEvent(t, d, insertMsg(outboxRelID, exampleRow()...)).Body))
	}

	for _, id := range []int64{-9223372036854775808, 9223372036854775807, 0, -1} {
		row := exampleRow()
		row[0] = txt(strconv.FormatInt(id, 10))
		require.Equal(t, id, decodeEvent(t, d, insertMsg(outboxRelID, row...)).ID)
	}
	row := exampleRow()
	row[0] = txt("+5")
	require.Equal(t, int64(5), decodeEvent(t, d, insertMsg(outboxRelID, row...)).ID)

	// A relation without an id column.
	d = NewDecoder(Table{Name: "domain_event"})
	m, err := d.Decode(relationMsg(3, "public", "domain_event", col{"event_name", pgtype.TextOID}))
	require.ErrorContains(t, err, "no id column")
	require.Equal(t, KindRelation, m.Kind)
	_, err = d.Decode(insertMsg(3, txt("e")))
	var bad *BadRowError
	require.ErrorAs(t, err, &bad)
	require.Contains(t, bad.Reason, "no id column")
}

func TestValidate(t *testing.T) {
	t.Parallel()
	rel := func(cols ...Column) *Relation {
		return &Relation{ID: 1, Namespace: "public", Name: "domain_event", Columns: cols}
	}
	for _, oid := range []uint32{pgtype.Int2OID, pgtype.Int4OID, pgtype.Int8OID} {
		require.NoError(t, rel(Column{"event_name", pgtype.TextOID}, Column{"id", oid}).Validate())
	}
	for _, oid := range []uint32{pgtype.NumericOID, pgtype.TextOID, pgtype.UUIDOID, pgtype.OIDOID} {
		require.Error(t, rel(Column{"id", oid}).Validate())
	}
	require.ErrorContains(t, rel(Column{"ID", pgtype.Int8OID}).Validate(), "no id column")
	require.ErrorContains(t, rel().Validate(), "validate relation public.domain_event: no id column")
	require.Error(t, (*Relation)(nil).Validate())
}

func TestKindString(t *testing.T) {
	t.Parallel()
	require.Equal(t, "event", KindEvent.String())
	require.Equal(t, "kind(42)", Kind(42).String())
}

func TestUnicodeAndControl(t *testing.T) {
	t.Parallel()
	d := setup(t)
	var ctl strings.Builder
	for c := 0; c < 0x20; c++ {
		ctl.WriteByte(byte(c))
	}
	for _, s := range []string{
		ctl.String(),
		"\x7f \"quoted\" back\\slash / <html> & ' ",
		"é ünïcode 日本語 ☕ 😀 \u2028 \u2029 \ufeff \U0010FFFF",
		"invalid \xff \xfe \xc3 \xe2\x82 \xed\xa0\x80 end",
		strings.Repeat("\x00", 100),
		"",
	} {
		row := exampleRow()
		row[1] = txt(s) // event_name
		row[7] = txt(s) // correlation_id
		row[10] = txt(`{"k":` + string(appendString(nil, []byte(s))) + `}`)
		ev := decodeEvent(t, d, insertMsg(outboxRelID, row...))
		require.Equal(t, s, ev.Name, "the Event keeps the raw text")

		var v struct {
			EventName     string            `json:"event_name"`
			CorrelationID string            `json:"correlation_id"`
			Properties    map[string]string `json:"properties"`
		}
		require.NoError(t, json.Unmarshal(ev.Body, &v))
		// Each invalid byte is one U+FFFD, as []rune conversion does.
		want := string([]rune(s))
		require.Equal(t, want, v.EventName)
		require.Equal(t, want, v.CorrelationID)
		require.Equal(t, want, v.Properties["k"])
		require.True(t, jsonUTF8Valid(ev.Body))
	}
}

func jsonUTF8Valid(b []byte) bool {
	return json.Valid(b) && strings.ToValidUTF8(string(b), "?") == string(b)
}

func TestBigProperties(t *testing.T) {
	t.Parallel()
	d := setup(t)

	// 5 MB of JSON in a jsonb column, embedded as it is.
	var sb strings.Builder
	sb.WriteString(`{"items": [`)
	for i := 0; sb.Len() < 5<<20; i++ {
		if i > 0 {
			sb.WriteString(", ")
		}
		sb.WriteString(`{"n": 12345, "s": "ünïcode \"q\" \\ \n", "traceparent": "no"}`)
	}
	sb.WriteString(`], "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}`)
	props := sb.String()
	row := exampleRow()
	row[10] = txt(props)
	ev := decodeEvent(t, d, insertMsg(outboxRelID, row...))
	require.Equal(t, props, bodyField(t, ev.Body, "properties"))
	require.Equal(t, "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", ev.Traceparent)

	// 5 MB of text that is not JSON, in a text column: one escaped string.
	d = setup(t, append(append([]col{}, outboxCols[:10]...), col{"properties", pgtype.TextOID})...)
	text := strings.Repeat("line \"one\"\n\ttab \x01 ☕", (5<<20)/24)
	row = exampleRow()[:11]
	row[10] = txt(text)
	ev = decodeEvent(t, d, insertMsg(outboxRelID, row...))
	var got string
	require.NoError(t, json.Unmarshal([]byte(bodyField(t, ev.Body, "properties")), &got))
	require.Equal(t, text, got)
}

func TestDecoderReusesNoState(t *testing.T) {
	t.Parallel()
	d := setup(t)
	// A long row then a short one: scratch space must not leak between them.
	row := exampleRow()
	row[1] = txt(strings.Repeat("n", 1000))
	row[5] = txt(strings.Repeat("t", 1000))
	ev1 := decodeEvent(t, d, insertMsg(outboxRelID, row...))
	ev2 := decodeEvent(t, d, insertMsg(outboxRelID, exampleRow()...))
	require.Equal(t, strings.Repeat("n", 1000), ev1.Name)
	require.Equal(t, strings.Repeat("t", 1000), ev1.EntityType)
	require.Equal(t, "batch_started", ev2.Name)
	require.Equal(t, exampleBody, string(ev2.Body))
}

func TestErrorsAreDistinct(t *testing.T) {
	t.Parallel()
	require.False(t, errors.Is(ErrMalformed, ErrUnsupported))
	require.False(t, errors.Is(ErrUnknownRelation, ErrMalformed))
}
