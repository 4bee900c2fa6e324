package decode

import (
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgtype"
	"github.com/stretchr/testify/require"
)

// TestConversions checks the JSON form of every type through user_id, which
// has no special meaning, and through properties, which has one.
func TestConversions(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		oid  uint32
		in   string
		want string
	}{
		{"int2", pgtype.Int2OID, "-32768", `-32768`},
		{"int4", pgtype.Int4OID, "2147483647", `2147483647`},
		{"int8", pgtype.Int8OID, "-9223372036854775808", `-9223372036854775808`},
		{"oid", pgtype.OIDOID, "4294967295", `4294967295`},
		{"int4 not a number", pgtype.Int4OID, "12abc", `"12abc"`},
		{"int4 leading zero", pgtype.Int4OID, "012", `"012"`},
		{"int4 empty", pgtype.Int4OID, "", `""`},
		{"numeric", pgtype.NumericOID, "12.50", `12.50`},
		{"numeric big", pgtype.NumericOID, "100000000000000000000000000000.000000000000000000001", `100000000000000000000000000000.000000000000000000001`},
		{"numeric negative", pgtype.NumericOID, "-0.5", `-0.5`},
		{"numeric NaN", pgtype.NumericOID, "NaN", `"NaN"`},
		{"numeric Infinity", pgtype.NumericOID, "Infinity", `"Infinity"`},
		{"numeric -Infinity", pgtype.NumericOID, "-Infinity", `"-Infinity"`},
		{"float4", pgtype.Float4OID, "1.5", `1.5`},
		{"float8 exponent", pgtype.Float8OID, "1e+100", `1e+100`},
		{"float8 small", pgtype.Float8OID, "1.5e-07", `1.5e-07`},
		{"float8 negative zero", pgtype.Float8OID, "-0", `-0`},
		{"float8 NaN", pgtype.Float8OID, "NaN", `"NaN"`},
		{"float8 Infinity", pgtype.Float8OID, "Infinity", `"Infinity"`},
		{"float4 -Infinity", pgtype.Float4OID, "-Infinity", `"-Infinity"`},
		{"float8 dot", pgtype.Float8OID, "1.", `"1."`},
		{"bool t", pgtype.BoolOID, "t", `true`},
		{"bool f", pgtype.BoolOID, "f", `false`},
		{"bool true", pgtype.BoolOID, "true", `true`},
		{"bool false", pgtype.BoolOID, "false", `false`},
		{"bool other", pgtype.BoolOID, "yes", `"yes"`},
		{"json", pgtype.JSONOID, "{\"a\": [1, 2.5, null],\n \"b\": \"\\u00e9\"}", "{\"a\": [1, 2.5, null],\n \"b\": \"\\u00e9\"}"},
		{"jsonb", pgtype.JSONBOID, `{"a": {"b": [true, false]}}`, `{"a": {"b": [true, false]}}`},
		{"jsonb scalar", pgtype.JSONBOID, `"s"`, `"s"`},
		{"jsonb number", pgtype.JSONBOID, `1.5`, `1.5`},
		{"json invalid", pgtype.JSONOID, `{"a":`, `"{\"a\":"`},
		{"json with invalid utf-8", pgtype.JSONOID, "{\"a\": \"x\xffy\"}", "{\"a\": \"x\ufffdy\"}"},
		{"text", pgtype.TextOID, `say "hi"`, `"say \"hi\""`},
		{"text json-like stays a string", pgtype.TextOID, `{"a":1}`, `"{\"a\":1}"`},
		{"varchar", pgtype.VarcharOID, "v", `"v"`},
		{"bpchar", pgtype.BPCharOID, "ab   ", `"ab   "`},
		{"name", pgtype.NameOID, "n", `"n"`},
		{"uuid", pgtype.UUIDOID, "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", `"a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"`},
		{"enum (unknown oid)", 16398, "high", `"high"`},
		{"date", pgtype.DateOID, "2026-11-26", `"2026-11-26"`},
		{"interval", pgtype.IntervalOID, "1 day 02:00:00", `"1 day 02:00:00"`},
		{"array", pgtype.Int4ArrayOID, "{1,2}", `"{1,2}"`},
		{"bytea", pgtype.ByteaOID, `\x00ff`, `"\\x00ff"`},
		{"timestamptz UTC", pgtype.TimestamptzOID, "2026-11-26 10:00:00.123456+00", `"2026-11-26T10:00:00.123456Z"`},
		{"timestamptz +05:30", pgtype.TimestamptzOID, "2026-11-26 15:30:00.123456+05:30", `"2026-11-26T10:00:00.123456Z"`},
		{"timestamptz -03", pgtype.TimestamptzOID, "2026-11-26 07:00:00-03", `"2026-11-26T10:00:00.000000Z"`},
		{"timestamptz no fraction", pgtype.TimestamptzOID, "2026-11-26 10:00:00+00", `"2026-11-26T10:00:00.000000Z"`},
		{"timestamptz 1 digit", pgtype.TimestamptzOID, "2026-11-26 10:00:00.1+00", `"2026-11-26T10:00:00.100000Z"`},
		{"timestamptz 5 digits", pgtype.TimestamptzOID, "2026-11-26 10:00:00.12345+00", `"2026-11-26T10:00:00.123450Z"`},
		{"timestamptz LMT offset", pgtype.TimestamptzOID, "1890-01-01 00:00:00+00:09:21", `"1889-12-31T23:50:39.000000Z"`},
		{"timestamptz crosses a year", pgtype.TimestamptzOID, "2026-12-31 23:30:00-01", `"2027-01-01T00:30:00.000000Z"`},
		{"timestamptz leap day", pgtype.TimestamptzOID, "2024-02-29 00:00:00+00", `"2024-02-29T00:00:00.000000Z"`},
		{"timestamptz T and Z", pgtype.TimestamptzOID, "2026-11-26T10:00:00.5Z", `"2026-11-26T10:00:00.500000Z"`},
		{"timestamptz infinity", pgtype.TimestamptzOID, "infinity", `"infinity"`},
		{"timestamptz -infinity", pgtype.TimestamptzOID, "-infinity", `"-infinity"`},
		{"timestamptz BC", pgtype.TimestamptzOID, "0044-03-15 12:00:00+00 BC", `"0044-03-15 12:00:00+00 BC"`},
		{"timestamptz year 10000", pgtype.TimestamptzOID, "10000-01-01 00:00:00+00", `"10000-01-01 00:00:00+00"`},
		{"timestamptz past 9999 after offset", pgtype.TimestamptzOID, "9999-12-31 23:30:00-01", `"9999-12-31 23:30:00-01"`},
		{"timestamptz 7 digits", pgtype.TimestamptzOID, "2026-11-26 10:00:00.1234567+00", `"2026-11-26 10:00:00.1234567+00"`},
		{"timestamptz Feb 30", pgtype.TimestamptzOID, "2026-02-30 10:00:00+00", `"2026-02-30 10:00:00+00"`},
		{"timestamptz non-ISO DateStyle", pgtype.TimestamptzOID, "Thu Nov 26 10:00:00 2026 UTC", `"Thu Nov 26 10:00:00 2026 UTC"`},
		{"timestamp", pgtype.TimestampOID, "2026-11-26 10:00:00.5", `"2026-11-26T10:00:00.500000Z"`},
		{"timestamp infinity", pgtype.TimestampOID, "infinity", `"infinity"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			cols := append([]col{}, outboxCols...)
			cols[4] = col{"user_id", tc.oid}
			d := setup(t, cols...)
			row := exampleRow()
			row[4] = txt(tc.in)
			ev := decodeEvent(t, d, insertMsg(outboxRelID, row...))
			require.Equal(t, tc.want, bodyField(t, ev.Body, "user_id"))
		})
	}
}

func TestPropertiesConversions(t *testing.T) {
	t.Parallel()
	// encoding/json refuses documents nested deeper than 10000: the body
	// adds one level and a batch another.
	deep := strings.Repeat("[", maxEmbedDepth) + strings.Repeat("]", maxEmbedDepth)
	tooDeep := strings.Repeat("[", maxEmbedDepth+1) + strings.Repeat("]", maxEmbedDepth+1)
	for _, tc := range []struct {
		name string
		oid  uint32
		in   string
		want string
	}{
		{"jsonb", pgtype.JSONBOID, `{"a": 1}`, `{"a": 1}`},
		{"text JSON object", pgtype.TextOID, `{"b":2}`, `{"b":2}`},
		{"text JSON array", pgtype.TextOID, ` [1, "x"] `, ` [1, "x"] `},
		{"text JSON string", pgtype.TextOID, `"s"`, `"s"`},
		{"text JSON number", pgtype.TextOID, `12`, `12`},
		{"text not JSON", pgtype.TextOID, `not json {`, `"not json {"`},
		{"text empty", pgtype.TextOID, ``, `""`},
		{"text trailing garbage", pgtype.TextOID, `{} {}`, `"{} {}"`},
		{"varchar JSON", pgtype.VarcharOID, `{"v":true}`, `{"v":true}`},
		{"bpchar stays a string", pgtype.BPCharOID, `{}`, `"{}"`},
		{"json nested to the limit", pgtype.JSONOID, deep, deep},
		{"json nested past the limit", pgtype.JSONOID, tooDeep, `"` + tooDeep + `"`},
		{"int4", pgtype.Int4OID, `5`, `5`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			cols := append([]col{}, outboxCols...)
			cols[10] = col{"properties", tc.oid}
			d := setup(t, cols...)
			row := exampleRow()
			row[10] = txt(tc.in)
			ev := decodeEvent(t, d, insertMsg(outboxRelID, row...))
			require.True(t, json.Valid(AppendBatch(nil, []*Event{ev})))
			body := string(ev.Body)
			require.True(t, strings.HasPrefix(body, exampleBody[:strings.Index(exampleBody, `"properties":`)]))
			require.Equal(t, tc.want, body[strings.Index(body, `"properties":`)+len(`"properties":`):len(body)-1])
		})
	}
}

func TestTraceparent(t *testing.T) {
	t.Parallel()
	const (
		tp1 = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
		tp2 = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"
	)
	cols := append(append([]col{}, outboxCols...), col{"traceparent", pgtype.TextOID})
	for _, tc := range []struct {
		name   string
		column val
		props  string
		want   string
	}{
		{"column", txt(tp1), `{}`, tp1},
		{"column wins", txt(tp1), `{"traceparent":"` + tp2 + `"}`, tp1},
		{"null column, properties", null, `{"traceparent": "` + tp2 + `"}`, tp2},
		{"invalid column, properties", txt("nope"), `{"traceparent":"` + tp2 + `"}`, tp2},
		{"last member wins", null, `{"traceparent":"` + tp1 + `","traceparent":"` + tp2 + `"}`, tp2},
		{"last member not a string", null, `{"traceparent":"` + tp1 + `","traceparent":1}`, ""},
		{"nested is not top level", null, `{"a":{"traceparent":"` + tp1 + `"}}`, ""},
		{"in an array", null, `[{"traceparent":"` + tp1 + `"}]`, ""},
		{"in a string", null, `{"a":"traceparent ` + tp1 + `"}`, ""},
		{"escaped value", null, `{"traceparent":"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0\u0031"}`, ""},
		{"escaped key", null, `{"trace\u0070arent":"` + tp1 + `"}`, ""},
		{"invalid JSON", null, `{"traceparent":"` + tp1 + `"`, ""},
		{"uppercase hex", null, `{"traceparent":"` + strings.ToUpper(tp1) + `"}`, ""},
		{"zero trace id", null, `{"traceparent":"00-00000000000000000000000000000000-00f067aa0ba902b7-01"}`, ""},
		{"zero parent id", null, `{"traceparent":"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01"}`, ""},
		{"version ff", null, `{"traceparent":"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}`, ""},
		{"version 00 with suffix", null, `{"traceparent":"` + tp1 + `-x"}`, ""},
		{"future version with suffix", null, `{"traceparent":"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what"}`, "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what"},
		{"header injection", txt(tp1[:53] + "0\r\nX: y"), `{}`, ""},
		{"too short", null, `{"traceparent":"00-4bf9-00f0-01"}`, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			d := setup(t, cols...)
			row := append(exampleRow(), tc.column)
			row[10] = txt(tc.props)
			ev := decodeEvent(t, d, insertMsg(outboxRelID, row...))
			require.Equal(t, tc.want, ev.Traceparent)
		})
	}

	// Text properties are searched too; other types are not.
	textCols := append([]col{}, outboxCols...)
	textCols[10] = col{"properties", pgtype.TextOID}
	d := setup(t, textCols...)
	row := exampleRow()
	row[10] = txt(`{"traceparent":"` + tp1 + `"}`)
	require.Equal(t, tp1, decodeEvent(t, d, insertMsg(outboxRelID, row...)).Traceparent)
	textCols[10] = col{"properties", pgtype.BPCharOID}
	d = setup(t, textCols...)
	require.Empty(t, decodeEvent(t, d, insertMsg(outboxRelID, row...)).Traceparent)
}

func TestEventFields(t *testing.T) {
	t.Parallel()
	d := setup(t)
	for _, tc := range []struct {
		name  string
		col   int
		in    val
		check func(t *testing.T, ev *Event)
	}{
		{"organization text", 3, txt("x"), func(t *testing.T, ev *Event) { require.False(t, ev.HasOrganization) }},
		{"organization negative", 3, txt("-7"), func(t *testing.T, ev *Event) {
			require.True(t, ev.HasOrganization)
			require.Equal(t, int64(-7), ev.OrganizationID)
		}},
		{"organization zero", 3, txt("0"), func(t *testing.T, ev *Event) { require.True(t, ev.HasOrganization) }},
		{"occurred_at offset", 2, txt("2026-11-26 15:30:00+05:30"), func(t *testing.T, ev *Event) {
			require.Equal(t, time.Date(2026, 11, 26, 10, 0, 0, 0, time.UTC), ev.OccurredAt)
			require.Equal(t, time.UTC, ev.OccurredAt.Location())
		}},
		{"occurred_at infinity", 2, txt("infinity"), func(t *testing.T, ev *Event) { require.True(t, ev.OccurredAt.IsZero()) }},
		{"processed", 11, txt("t"), func(t *testing.T, ev *Event) { require.True(t, ev.Processed) }},
		{"not processed", 11, txt("f"), func(t *testing.T, ev *Event) { require.False(t, ev.Processed) }},
		{"processed null", 11, null, func(t *testing.T, ev *Event) { require.False(t, ev.Processed) }},
	} {
		row := exampleRow()
		row[tc.col] = tc.in
		tc.check(t, decodeEvent(t, d, insertMsg(outboxRelID, row...)))
	}
}

func TestEventFromText(t *testing.T) {
	t.Parallel()
	d := setup(t)
	stream := decodeEvent(t, d, insertMsg(outboxRelID, exampleRow()...))
	rel := d.Relation(outboxRelID)

	values := make([][]byte, len(exampleRow()))
	for i, v := range exampleRow() {
		if v.kind == 't' {
			values[i] = []byte(v.data)
		}
	}
	ev, err := EventFromText(testNS, rel, values)
	require.NoError(t, err)
	stream.CommitLSN, stream.Index = 0, 0
	require.Equal(t, stream, ev)

	// The event does not alias values.
	for _, v := range values {
		for i := range v {
			v[i] = '#'
		}
	}
	require.Equal(t, exampleBody, string(ev.Body))
	require.Equal(t, "batch_started", ev.Name)

	_, err = EventFromText(testNS, rel, values[:3])
	require.ErrorContains(t, err, "event from text: 3 values for 14 columns of public.domain_event")
	_, err = EventFromText(testNS, nil, values)
	require.Error(t, err)

	values[0] = nil
	_, err = EventFromText(testNS, rel, values)
	var bad *BadRowError
	require.ErrorAs(t, err, &bad)
	require.Equal(t, "id is null", bad.Reason)
	require.Equal(t, values[1:], bad.Row.Values[1:])
	require.Nil(t, bad.Row.Values[0])

	// Any relation shape works, as on the stream.
	ev, err = EventFromText(testNS, &Relation{Namespace: "s", Name: "t", Columns: []Column{{"id", pgtype.Int2OID}, {"color", pgtype.TextOID}}}, [][]byte{[]byte("3"), []byte("red")})
	require.NoError(t, err)
	require.Equal(t, `{"id":3,"event_name":null,"occurred_at":null,"organization_id":null,"user_id":null,"entity_type":null,"entity_id":null,"correlation_id":null,"source":null,"schema_version":null,"properties":null}`, string(ev.Body))
}

func TestAppendBatch(t *testing.T) {
	t.Parallel()
	a := &Event{Body: []byte(`{"id":1}`)}
	b := &Event{Body: []byte(`{"id":2}`)}
	for _, tc := range []struct {
		dst    string
		events []*Event
		want   string
	}{
		{"", nil, `[]`},
		{"", []*Event{a}, `[{"id":1}]`},
		{"", []*Event{a, b, a}, `[{"id":1},{"id":2},{"id":1}]`},
		{"prefix:", []*Event{b}, `prefix:[{"id":2}]`},
		{"", []*Event{a, nil, {}}, `[{"id":1},null,null]`},
	} {
		var dst []byte
		if tc.dst != "" {
			dst = []byte(tc.dst)
		}
		got := AppendBatch(dst, tc.events)
		require.Equal(t, tc.want, string(got))
		require.True(t, json.Valid(got[len(tc.dst):]))
	}

	// Real bodies, and no reallocation when dst has room.
	d := setup(t)
	ev := decodeEvent(t, d, insertMsg(outboxRelID, exampleRow()...))
	buf := make([]byte, 0, 4096)
	out := AppendBatch(buf, []*Event{ev, ev})
	require.Equal(t, "["+exampleBody+","+exampleBody+"]", string(out))
	require.Equal(t, &buf[:1][0], &out[0])
	var arr []map[string]any
	require.NoError(t, json.Unmarshal(out, &arr))
	require.Len(t, arr, 2)
}
