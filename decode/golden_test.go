package decode

import (
	"crypto/md5"
	"encoding/hex"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// The golden files are pgoutput messages captured from a real Postgres 15 by
// internal/capture/main.go (see the workload there). The walsender ran with
// TimeZone Asia/Kolkata, so every timestamptz arrives with a +05:30 offset.

// goldenMessages returns the captured messages in stream order.
func goldenMessages(tb testing.TB) (names []string, msgs [][]byte) {
	tb.Helper()
	files, err := filepath.Glob("testdata/wal_*.bin")
	require.NoError(tb, err)
	require.NotEmpty(tb, files, "golden files missing: run go run ./decode/internal/capture/main.go")
	for _, f := range files {
		b, err := os.ReadFile(f)
		require.NoError(tb, err)
		names = append(names, filepath.Base(f))
		msgs = append(msgs, b)
	}
	return names, msgs
}

// bigBlob is the properties.blob of golden row 46: md5 hex of 1..8192.
func bigBlob() string {
	var sb strings.Builder
	for i := 1; i <= 8192; i++ {
		sum := md5.Sum([]byte(strconv.Itoa(i)))
		sb.WriteString(hex.EncodeToString(sum[:]))
	}
	return sb.String()
}

const nullTail = `"user_id":null,"entity_type":null,"entity_id":null,"correlation_id":null,"source":null,"schema_version":1,`

var goldenPublic = map[int64]string{
	42: `{"id":42,"event_name":"batch_started","occurred_at":"2026-11-26T10:00:00.123456Z","organization_id":7,"user_id":3,"entity_type":"batch","entity_id":"B-19","correlation_id":"c1","source":"batch_service","schema_version":1,"properties":{"a": 1}}`,
	43: `{"id":43,"event_name":"nulls","occurred_at":"2026-11-26T10:00:01.000000Z","organization_id":null,` + nullTail + `"properties":{}}`,
	44: `{"id":44,"event_name":"unicode ☕ é 日本 😀","occurred_at":"2026-11-26T10:00:00.500000Z","organization_id":-9223372036854775808,"user_id":null,"entity_type":"ünïcode","entity_id":"tab\there \"q\" back\\slash\nnl\u0001\u001f","correlation_id":null,"source":"src` + "\u2028" + `line","schema_version":1,"properties":{"ctl": "\u0001\n", "emoji": "😀", "nested": {"traceparent": "x"}, "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}}`,
	45: `{"id":45,"event_name":"second","occurred_at":"2000-01-01T02:59:59.999999Z","organization_id":9223372036854775807,` + nullTail + `"properties":[1, 2.5, -30000000000, null, true, "s"]}`,
	46: `{"id":46,"event_name":"big","occurred_at":"2026-11-26T10:00:00.000000Z","organization_id":null,` + nullTail + `"properties":{"blob": "` + bigBlob() + `"}}`,
	47: `{"id":47,"event_name":"with_message","occurred_at":"2026-11-26T10:00:02.000000Z","organization_id":null,` + nullTail + `"properties":{}}`,
	48: `{"id":48,"event_name":"with_origin","occurred_at":"2026-11-26T10:00:03.000000Z","organization_id":null,` + nullTail + `"properties":{}}`,
	// After ALTER TABLE ADD COLUMN traceparent: the column is not in the body.
	49: `{"id":49,"event_name":"traced","occurred_at":"2026-11-26T10:00:04.000000Z","organization_id":null,` + nullTail + `"properties":{"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}}`,
	// After ALTER TABLE DROP COLUMN user_id: still in the body, as null.
	50: `{"id":50,"event_name":"dropped_user","occurred_at":"2026-11-26T10:00:05.000000Z","organization_id":8,` + nullTail + `"properties":{}}`,
	// After properties and organization_id became text.
	51: `{"id":51,"event_name":"text_props","occurred_at":"2026-11-26T10:00:06.000000Z","organization_id":"9",` + nullTail + `"properties":{"b":2}}`,
	52: `{"id":52,"event_name":"text_not_json","occurred_at":"2026-11-26T10:00:07.000000Z","organization_id":"org-x",` + nullTail + `"properties":"not json {"}`,
}

// goldenAlt are the rows of the ORM-style alt.domain_event (int4 id,
// varchar, timestamp without time zone, numeric, float8, text properties,
// no entity columns, extra columns).
var goldenAlt = map[int64]string{
	1: `{"id":1,"event_name":"alt_started","occurred_at":"2026-11-26T10:00:00.250000Z","organization_id":12.50,"user_id":5,"entity_type":null,"entity_id":null,"correlation_id":"a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11","source":"alt_service","schema_version":2.5,"properties":{"b": [1, 2]}}`,
	2: `{"id":2,"event_name":"alt_nan","occurred_at":"infinity","organization_id":"NaN","user_id":null,"entity_type":null,"entity_id":null,"correlation_id":null,"source":null,"schema_version":"NaN","properties":"not json"}`,
	3: `{"id":3,"event_name":"alt_neg","occurred_at":"-infinity","organization_id":"-Infinity","user_id":-32768,"entity_type":null,"entity_id":null,"correlation_id":null,"source":null,"schema_version":"-Infinity","properties":"just a string"}`,
	4: `{"id":4,"event_name":"alt_bc","occurred_at":"0044-03-15 12:00:00 BC","organization_id":100000000000000000000,"user_id":null,"entity_type":null,"entity_id":null,"correlation_id":null,"source":null,"schema_version":1e-07,"properties":""}`,
}

func TestGoldenPublic(t *testing.T) {
	t.Parallel()
	names, msgs := goldenMessages(t)
	d := NewDecoder(Table{Name: "domain_event", MessageNamespace: "0a1b2c3d4e5f6789"})

	var (
		kinds   []string
		begin   Begin
		inTxn   bool
		events  = map[int64]*Event{}
		rows    []*Row
		logical []*Logical

		outboxRelID uint32
	)
	for i, b := range msgs {
		m, err := d.Decode(b)
		require.NoError(t, err, names[i])
		kinds = append(kinds, m.Kind.String())
		switch m.Kind {
		case KindBegin:
			require.False(t, inTxn)
			inTxn, begin = true, m.Begin
			require.NotZero(t, m.Begin.FinalLSN)
			require.NotZero(t, m.Begin.Xid)
			require.Equal(t, time.UTC, m.Begin.CommitTime.Location())
			require.WithinDuration(t, time.Now(), m.Begin.CommitTime, 10*365*24*time.Hour)
		case KindCommit:
			require.True(t, inTxn)
			inTxn = false
			require.Equal(t, begin.FinalLSN, m.Commit.CommitLSN, names[i])
			require.Greater(t, m.Commit.EndLSN, m.Commit.CommitLSN)
			require.Equal(t, begin.CommitTime, m.Commit.CommitTime)
		case KindEvent:
			ev := m.Event
			require.True(t, json.Valid(ev.Body), names[i])
			require.Equal(t, begin.FinalLSN, ev.CommitLSN)
			events[ev.ID] = ev
		case KindInsert:
			rows = append(rows, m.Row)
		case KindLogical:
			logical = append(logical, m.Logical)
		case KindRelation:
			require.NotNil(t, m.Relation)
			if m.Relation.Name == "domain_event" && m.Relation.Namespace == "public" {
				outboxRelID = m.Relation.ID
			}
		}
	}
	require.Equal(t, strings.Fields(`
		begin relation event commit
		begin event commit
		begin event event commit
		begin event commit
		begin ignored relation insert insert commit
		begin relation insert insert insert insert insert commit
		begin logical event commit
		logical
		begin ignored event commit
		begin relation event commit
		begin relation event commit
		begin relation event event commit
		logical`), kinds)

	require.Len(t, events, len(goldenPublic))
	for id, want := range goldenPublic {
		require.Equal(t, want, string(events[id].Body), "id %d", id)
	}

	ev := events[42]
	require.Equal(t, &Event{
		ID: 42, Name: "batch_started", OrganizationID: 7, HasOrganization: true,
		EntityType: "batch", EntityID: "B-19",
		OccurredAt: time.Date(2026, 11, 26, 10, 0, 0, 123456000, time.UTC),
		Body:       ev.Body, CommitLSN: ev.CommitLSN, MessageID: "evt_0a1b2c3d4e5f6789_42_hoinb7omdc",
	}, ev)

	ev = events[44]
	require.Equal(t, "unicode ☕ é 日本 😀", ev.Name)
	require.Equal(t, "ünïcode", ev.EntityType)
	require.Equal(t, "tab\there \"q\" back\\slash\nnl\x01\x1f", ev.EntityID)
	require.Equal(t, int64(-9223372036854775808), ev.OrganizationID)
	require.Equal(t, "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", ev.Traceparent, "from properties")
	require.True(t, ev.Processed)
	require.Equal(t, 0, ev.Index)
	require.Equal(t, 1, events[45].Index)
	require.Equal(t, events[44].CommitLSN, events[45].CommitLSN)

	require.False(t, events[43].HasOrganization)
	require.Equal(t, "00-11111111111111111111111111111111-2222222222222222-00", events[49].Traceparent, "the column wins over properties")
	require.Equal(t, int64(9), events[51].OrganizationID, "text organization_id that holds an integer")
	require.False(t, events[52].HasOrganization)

	// Every body round-trips through encoding/json.
	for id, ev := range events {
		var v map[string]any
		require.NoError(t, json.Unmarshal(ev.Body, &v), "id %d", id)
		require.Len(t, v, 11)
	}

	// other_event and alt.domain_event arrive as rows.
	require.Len(t, rows, 7)
	require.Equal(t, "other_event", rows[0].Relation.Name)
	require.Equal(t, [][]byte{
		[]byte("1"), []byte("hello"), []byte("high"), []byte("NaN"), []byte("Infinity"), []byte("t"),
		[]byte("2026-11-26 10:00:00"), []byte(`{"k": [1, 2]}`), []byte("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
	}, rows[0].Values)
	require.Equal(t, [][]byte{[]byte("2"), nil, nil, nil, nil, nil, nil, nil, nil}, rows[1].Values)
	require.Equal(t, "alt", rows[2].Relation.Namespace)

	require.Len(t, logical, 3)
	require.Equal(t, "outboxd", logical[0].Prefix)
	require.Equal(t, []byte("hello"), logical[0].Content)
	require.True(t, logical[0].Transactional)
	require.NotZero(t, logical[0].LSN)
	require.Equal(t, "outboxd-heartbeat", logical[1].Prefix)
	require.Equal(t, []byte{0x00, 0xff}, logical[1].Content)
	require.False(t, logical[1].Transactional)
	require.Equal(t, "capture-end", logical[2].Prefix)
	require.Empty(t, logical[2].Content)

	// The last relation message (after the ALTER TABLEs) is cached.
	rel := d.Relation(outboxRelID)
	require.NotNil(t, rel)
	require.NoError(t, rel.Validate())
	require.Len(t, rel.Columns, 14)
	require.Equal(t, Column{Name: "properties", TypeOID: 25}, rel.Columns[9])
	require.Equal(t, Column{Name: "traceparent", TypeOID: 25}, rel.Columns[13])
}

func TestGoldenAlt(t *testing.T) {
	t.Parallel()
	names, msgs := goldenMessages(t)
	d := NewDecoder(Table{Schema: "alt", Name: "domain_event"})
	events := map[int64]*Event{}
	var bad *BadRowError
	inserts := 0
	for i, b := range msgs {
		m, err := d.Decode(b)
		if err != nil {
			require.True(t, errors.As(err, &bad), "%s: %v", names[i], err)
			continue
		}
		switch m.Kind {
		case KindEvent:
			events[m.Event.ID] = m.Event
		case KindInsert:
			inserts++
		}
	}
	require.Equal(t, 13, inserts, "public.domain_event and other_event rows")
	require.Len(t, events, len(goldenAlt))
	for id, want := range goldenAlt {
		require.Equal(t, want, string(events[id].Body), "id %d", id)
		require.True(t, json.Valid(events[id].Body))
	}
	ev := events[1]
	require.Equal(t, "alt_started", ev.Name)
	require.Equal(t, time.Date(2026, 11, 26, 10, 0, 0, 250000000, time.UTC), ev.OccurredAt, "timestamp without time zone is UTC")
	require.False(t, ev.HasOrganization, "numeric 12.50 is no organization id")
	require.Equal(t, "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", ev.Traceparent)
	require.True(t, ev.Processed)
	require.Equal(t, []int{0, 1, 2, 3}, []int{events[1].Index, events[2].Index, events[3].Index, events[4].Index})

	require.Empty(t, events[2].Traceparent, "an invalid traceparent column is dropped")
	require.True(t, events[2].OccurredAt.IsZero(), "infinity has no time")
	require.True(t, events[4].OccurredAt.IsZero(), "BC has no time")

	// The row with a NULL id.
	require.NotNil(t, bad)
	require.Equal(t, "id is null", bad.Reason)
	require.Equal(t, "alt", bad.Relation.Namespace)
	require.Nil(t, bad.Row.Values[0])
	require.Equal(t, []byte("alt_null_id"), bad.Row.Values[1])
}
