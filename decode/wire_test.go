package decode

import (
	"encoding/binary"
	"time"

	"github.com/jackc/pgx/v5/pgtype"
)

// This file builds pgoutput protocol version 1 messages for the tests, byte
// for byte as in
// https://www.postgresql.org/docs/15/protocol-logicalrep-message-formats.html.

type wire struct{ b []byte }

func msg(kind byte) *wire { return &wire{b: []byte{kind}} }

func (w *wire) u8(v byte) *wire    { w.b = append(w.b, v); return w }
func (w *wire) u16(v uint16) *wire { w.b = binary.BigEndian.AppendUint16(w.b, v); return w }
func (w *wire) u32(v uint32) *wire { w.b = binary.BigEndian.AppendUint32(w.b, v); return w }
func (w *wire) u64(v uint64) *wire { w.b = binary.BigEndian.AppendUint64(w.b, v); return w }
func (w *wire) str(s string) *wire { w.b = append(append(w.b, s...), 0); return w }
func (w *wire) raw(b []byte) *wire { w.b = append(w.b, b...); return w }

func pgMicros(t time.Time) uint64 { return uint64(t.UnixMicro() - pgEpochMicros) }

func beginMsg(finalLSN uint64, at time.Time, xid uint32) []byte {
	return msg('B').u64(finalLSN).u64(pgMicros(at)).u32(xid).b
}

func commitMsg(commitLSN, endLSN uint64, at time.Time) []byte {
	return msg('C').u8(0).u64(commitLSN).u64(endLSN).u64(pgMicros(at)).b
}

// col is a column of a relation message.
type col struct {
	name string
	oid  uint32
}

func relationMsg(id uint32, ns, name string, cols ...col) []byte {
	w := msg('R').u32(id).str(ns).str(name).u8('d').u16(uint16(len(cols)))
	for i, c := range cols {
		flags := byte(0)
		if i == 0 {
			flags = 1 // part of the key
		}
		w.u8(flags).str(c.name).u32(c.oid).u32(0xffffffff)
	}
	return w.b
}

// val is one tuple column: a text value, or null / unchanged TOAST.
type val struct {
	kind byte // 't', 'n', 'u', 'b'
	data string
}

func txt(s string) val { return val{kind: 't', data: s} }

var null = val{kind: 'n'}

func insertMsg(relID uint32, vals ...val) []byte {
	w := msg('I').u32(relID).u8('N')
	tupleData(w, vals)
	return w.b
}

func tupleData(w *wire, vals []val) {
	w.u16(uint16(len(vals)))
	for _, v := range vals {
		w.u8(v.kind)
		if v.kind == 't' || v.kind == 'b' {
			w.u32(uint32(len(v.data))).raw([]byte(v.data))
		}
	}
}

func logicalMsg(transactional bool, lsn uint64, prefix string, content []byte) []byte {
	flags := byte(0)
	if transactional {
		flags = 1
	}
	return msg('M').u8(flags).u64(lsn).str(prefix).u32(uint32(len(content))).raw(content).b
}

// outboxCols are the columns of docs/DESIGN.md §2, in order.
var outboxCols = []col{
	{"id", pgtype.Int8OID},
	{"event_name", pgtype.TextOID},
	{"occurred_at", pgtype.TimestamptzOID},
	{"organization_id", pgtype.Int8OID},
	{"user_id", pgtype.Int8OID},
	{"entity_type", pgtype.TextOID},
	{"entity_id", pgtype.TextOID},
	{"correlation_id", pgtype.TextOID},
	{"source", pgtype.TextOID},
	{"schema_version", pgtype.Int4OID},
	{"properties", pgtype.JSONBOID},
	{"is_processed", pgtype.BoolOID},
	{"processed_at", pgtype.TimestamptzOID},
	{"delivery_attempts", pgtype.Int4OID},
}

// exampleRow is the docs/DESIGN.md §4 example as pgoutput sends it.
func exampleRow() []val {
	return []val{
		txt("42"), txt("batch_started"), txt("2026-11-26 10:00:00.123456+00"), txt("7"), txt("3"),
		txt("batch"), txt("B-19"), txt("c1"), txt("batch_service"), txt("1"), txt(`{"a":1}`),
		txt("f"), null, txt("0"),
	}
}

const exampleBody = `{"id":42,"event_name":"batch_started","occurred_at":"2026-11-26T10:00:00.123456Z","organization_id":7,"user_id":3,"entity_type":"batch","entity_id":"B-19","correlation_id":"c1","source":"batch_service","schema_version":1,"properties":{"a":1}}`
