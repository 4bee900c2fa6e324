package decode

import (
	"testing"

	"github.com/jackc/pgx/v5/pgtype"
	"github.com/stretchr/testify/require"
)

// This file covers pgoutput's 'u' column kind: a TOASTed value that an
// update did not change, sent without its content (docs/DESIGN.md G10: it is
// never read as NULL).

const subRelID = 9

var unchangedTOAST = val{kind: 'u'}

// subscriptionDecoder returns a Decoder that has seen the outbox relation
// and a subscription-like relation with id 9.
func subscriptionDecoder(t *testing.T) *Decoder {
	t.Helper()
	d := setup(t)
	_, err := d.Decode(relationMsg(subRelID, "public", "outboxd_subscription",
		col{"id", pgtype.Int8OID}, col{"url", pgtype.TextOID}, col{"secrets", pgtype.TextArrayOID},
		col{"events", pgtype.TextArrayOID}, col{"enabled", pgtype.BoolOID}))
	require.NoError(t, err)
	return d
}

func updateMsg(relID uint32, oldKind byte, old []val, vals ...val) []byte {
	w := msg('U').u32(relID)
	if oldKind != 0 {
		w.u8(oldKind)
		tupleData(w, old)
	}
	w.u8('N')
	tupleData(w, vals)
	return w.b
}

// An update that leaves TOASTed columns alone sends them as 'u': the row
// flags them, and their Values are nil without meaning NULL.
func TestUpdateUnchangedToastIsFlaggedNotNull(t *testing.T) {
	t.Parallel()
	d := subscriptionDecoder(t)
	in := updateMsg(subRelID, 0, nil, txt("7"), null, unchangedTOAST, unchangedTOAST, txt("t"))
	m, err := d.Decode(in)
	require.NoError(t, err)
	require.Equal(t, KindUpdate, m.Kind)
	require.Equal(t, []bool{false, false, true, true, false}, m.Row.Unchanged)
	require.Equal(t, []string{"secrets", "events"}, m.Row.UnchangedColumns())
	require.False(t, m.Row.IsUnchanged(1), "a NULL is not unchanged")
	require.Nil(t, m.Row.Values[1])
	require.True(t, m.Row.IsUnchanged(2))
	require.True(t, m.Row.IsUnchanged(3))
	require.False(t, m.Row.IsUnchanged(4))
	require.False(t, m.Row.IsUnchanged(-1))
	require.False(t, m.Row.IsUnchanged(5))
	require.Equal(t, []byte("7"), m.Row.Values[0])
	require.Equal(t, []byte("t"), m.Row.Values[4])
	for i := range in {
		in[i] ^= 0xff
	}
	require.Equal(t, []bool{false, false, true, true, false}, m.Row.Unchanged, "the flags do not alias the decoder's scratch")

	// The next update sends every column: no flags are left over.
	m, err = d.Decode(updateMsg(subRelID, 0, nil, txt("7"), txt("https://x"), txt("{}"), txt("{}"), txt("f")))
	require.NoError(t, err)
	require.Nil(t, m.Row.Unchanged)
	require.Nil(t, m.Row.UnchangedColumns())
	require.False(t, m.Row.IsUnchanged(2))
	require.Equal(t, []byte("{}"), m.Row.Values[2])
}

// With REPLICA IDENTITY FULL the old row comes in full ('O'), TOASTed values
// inlined: an unchanged column takes its value from it. An old key ('K')
// holds only key columns (the rest is 'n', not the old value), so it fills
// nothing.
func TestUpdateUnchangedToastFromOldRow(t *testing.T) {
	t.Parallel()
	d := subscriptionDecoder(t)
	oldRow := []val{txt("7"), txt("https://old"), txt("{whsec_a,whsec_b}"), txt("{batch_*}"), txt("t")}
	in := updateMsg(subRelID, 'O', oldRow, txt("7"), txt("https://old"), unchangedTOAST, unchangedTOAST, txt("f"))
	m, err := d.Decode(in)
	require.NoError(t, err)
	require.Equal(t, KindUpdate, m.Kind)
	require.Nil(t, m.Row.Unchanged, "every 'u' was filled from the old row")
	for i := range in {
		in[i] ^= 0xff
	}
	require.Equal(t, [][]byte{[]byte("7"), []byte("https://old"), []byte("{whsec_a,whsec_b}"), []byte("{batch_*}"), []byte("f")}, m.Row.Values)

	// The old row cannot fill what it does not have.
	m, err = d.Decode(updateMsg(subRelID, 'O', []val{txt("7"), txt("https://old"), unchangedTOAST, null, txt("t")},
		txt("7"), txt("https://old"), unchangedTOAST, unchangedTOAST, txt("f")))
	require.NoError(t, err)
	require.Equal(t, []bool{false, false, true, true, false}, m.Row.Unchanged)
	require.Nil(t, m.Row.Values[2])
	require.Nil(t, m.Row.Values[3])

	m, err = d.Decode(updateMsg(subRelID, 'K', []val{txt("7"), null, null, null, null},
		txt("8"), txt("https://old"), unchangedTOAST, txt("{}"), txt("f")))
	require.NoError(t, err)
	require.Equal(t, []bool{false, false, true, false, false}, m.Row.Unchanged)
	require.Nil(t, m.Row.Values[2])

	// A malformed old row is an error, not a guess.
	_, err = d.Decode(updateMsg(subRelID, 'O', []val{txt("7"), {kind: 'b', data: "x"}, txt("{}"), txt("{}"), txt("t")},
		txt("7"), txt("https://old"), unchangedTOAST, txt("{}"), txt("f")))
	require.ErrorIs(t, err, ErrUnsupported)
	_, err = d.Decode(updateMsg(subRelID, 'O', []val{txt("7")},
		txt("7"), txt("https://old"), unchangedTOAST, txt("{}"), txt("f")))
	require.ErrorIs(t, err, ErrMalformed)
}

// An inserted row has no previous value to leave unchanged: 'u' in an insert
// is malformed, for the outbox and any other relation, and the decoder goes on.
func TestInsertWithUnchangedToastIsMalformed(t *testing.T) {
	t.Parallel()
	d := subscriptionDecoder(t)
	for i := range outboxCols {
		row := exampleRow()
		row[i] = unchangedTOAST
		m, err := d.Decode(insertMsg(outboxRelID, row...))
		require.ErrorIs(t, err, ErrMalformed, "outbox column %s", outboxCols[i].name)
		require.Equal(t, Message{}, m)
		require.Equal(t, exampleBody, string(decodeEvent(t, d, insertMsg(outboxRelID, exampleRow()...)).Body))
	}
	m, err := d.Decode(insertMsg(subRelID, txt("7"), txt("https://x"), unchangedTOAST, txt("{}"), txt("t")))
	require.ErrorIs(t, err, ErrMalformed)
	require.Nil(t, m.Row)
	m, err = d.Decode(insertMsg(subRelID, txt("7"), txt("https://x"), txt("{}"), txt("{}"), txt("t")))
	require.NoError(t, err)
	require.Equal(t, KindInsert, m.Kind)
	require.Nil(t, m.Row.Unchanged)
}

// A delete's old tuple keeps 'u' apart from NULL too.
func TestDeleteUnchangedToastIsFlagged(t *testing.T) {
	t.Parallel()
	d := subscriptionDecoder(t)
	m, err := d.Decode(msg('D').u32(subRelID).u8('O').u16(5).u8('t').u32(1).raw([]byte("7")).u8('n').u8('u').u8('n').u8('n').b)
	require.NoError(t, err)
	require.Equal(t, KindDelete, m.Kind)
	require.Equal(t, []bool{false, false, true, false, false}, m.Row.Unchanged)
	m, err = d.Decode(msg('D').u32(subRelID).u8('K').u16(5).u8('t').u32(1).raw([]byte("7")).u8('n').u8('n').u8('n').u8('n').b)
	require.NoError(t, err)
	require.Nil(t, m.Row.Unchanged)
}
