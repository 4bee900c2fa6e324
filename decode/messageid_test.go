package decode

import (
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func TestMessageID(t *testing.T) {
	t.Parallel()
	at := time.Date(2026, 11, 26, 10, 0, 0, 123456000, time.UTC)
	require.Equal(t, "evt_0a1b2c3d4e5f6789_42_hoinb7omdc", MessageID(testNS, 42, at))
	require.Equal(t, "evt_0a1b2c3d4e5f6789_42", MessageID(testNS, 42, time.Time{}), "no occurred_at: namespace and id")
	require.Equal(t, "evt_0a1b2c3d4e5f6789_-7_hoinb7omdc", MessageID(testNS, -7, at))
	require.Equal(t, MessageID(testNS, 42, at), MessageID(testNS, 42, at.In(time.FixedZone("x", 3600))), "an instant, whatever the zone")
	require.Equal(t, "x", string(AppendMessageID([]byte("x"), testNS, 1, at)[:1]))

	// Never the same id for two different events: another outbox, another
	// row id, the same id reused later (restarted identity, restore).
	ids := map[string]bool{}
	for _, id := range []string{
		MessageID(testNS, 42, at),
		MessageID("ffffffffffffffff", 42, at),
		MessageID(testNS, 43, at),
		MessageID(testNS, 42, at.Add(time.Microsecond)),
		MessageID(testNS, 42, time.Time{}),
		MessageID(testNS, 4, time.Unix(0, 2000)), // "4_2" must not read as "42"
		MessageID(testNS, 4, time.Unix(0, 0).Add(-2*time.Microsecond)),
	} {
		require.False(t, ids[id], "duplicate %s", id)
		ids[id] = true
	}

	require.Equal(t, testNS, MessageNamespace(MessageID(testNS, 42, at)))
	require.Equal(t, testNS, MessageNamespace(MessageID(testNS, 42, time.Time{})))
	require.Empty(t, MessageNamespace("42"))
	require.Empty(t, MessageNamespace("batch_1_2_ab"))

	require.NoError(t, CheckNamespace(testNS))
	require.NoError(t, CheckNamespace("z"))
	for _, bad := range []string{"", "0A1B", "a_b", "a-b", "ü", "0123456789abcdef0123456789abcdef0"} {
		require.Error(t, CheckNamespace(bad), bad)
	}
}

// The stream and the table catch-up give the same row the same message id;
// the namespace is the table's.
func TestMessageIDStreamAndText(t *testing.T) {
	t.Parallel()
	d := setup(t)
	stream := decodeEvent(t, d, insertMsg(outboxRelID, exampleRow()...))
	require.Equal(t, "evt_0a1b2c3d4e5f6789_42_hoinb7omdc", stream.MessageID)

	values := make([][]byte, len(exampleRow()))
	for i, v := range exampleRow() {
		if v.kind == 't' {
			values[i] = []byte(v.data)
		}
	}
	text, err := EventFromText(testNS, d.Relation(outboxRelID), values)
	require.NoError(t, err)
	require.Equal(t, stream.MessageID, text.MessageID)
	other, err := EventFromText("ffffffffffffffff", d.Relation(outboxRelID), values)
	require.NoError(t, err)
	require.Equal(t, "evt_ffffffffffffffff_42_hoinb7omdc", other.MessageID)
	require.Equal(t, text.Body, other.Body, "the body keeps the row id")

	// Without occurred_at (an ORM's table, or NULL): namespace and id only.
	row := exampleRow()
	row[2] = null
	require.Equal(t, "evt_0a1b2c3d4e5f6789_42", decodeEvent(t, d, insertMsg(outboxRelID, row...)).MessageID)
	row[2] = txt("infinity")
	require.Equal(t, "evt_0a1b2c3d4e5f6789_42", decodeEvent(t, d, insertMsg(outboxRelID, row...)).MessageID)
}
