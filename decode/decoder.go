package decode

import (
	"encoding/binary"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/jackc/pglogrepl"
)

// Errors that Decode wraps; test them with errors.Is. A row-level problem in
// the outbox table is a *BadRowError instead.
var (
	// ErrMalformed: the message is truncated or does not follow the protocol.
	ErrMalformed = errors.New("malformed pgoutput message")
	// ErrUnknownRelation: an insert names a relation id no relation message
	// announced.
	ErrUnknownRelation = errors.New("unknown relation")
	// ErrUnsupported: a message or value that protocol version 1 in text mode
	// does not send (streaming, two-phase, binary values).
	ErrUnsupported = errors.New("unsupported pgoutput message")
)

// Kind is the kind of a decoded Message.
type Kind int

// Message kinds.
const (
	KindIgnored  Kind = iota // type, origin, update, delete, truncate, messages for other things
	KindBegin                // Message.Begin set
	KindCommit               // Message.Commit set
	KindRelation             // a relation message, now cached; Message.Relation set
	KindEvent                // an insert into the outbox table: Message.Event set
	KindInsert               // an insert into another published relation: Message.Row set (used later for a subscription table)
	KindLogical              // a logical decoding message (pg_logical_emit_message), Message.Logical set
	KindUpdate               // an update of another published relation: Message.Row holds the new row (see Row.Unchanged)
	KindDelete               // a delete from another published relation: Message.Row holds the old key (other columns NULL)
)

// String returns the kind's name.
func (k Kind) String() string {
	switch k {
	case KindIgnored:
		return "ignored"
	case KindBegin:
		return "begin"
	case KindCommit:
		return "commit"
	case KindRelation:
		return "relation"
	case KindEvent:
		return "event"
	case KindInsert:
		return "insert"
	case KindLogical:
		return "logical"
	case KindUpdate:
		return "update"
	case KindDelete:
		return "delete"
	default:
		return fmt.Sprintf("kind(%d)", int(k))
	}
}

// Begin is a pgoutput Begin message.
type Begin struct {
	// FinalLSN is the LSN of the transaction's commit record.
	FinalLSN   pglogrepl.LSN
	CommitTime time.Time
	Xid        uint32
}

// Commit is a pgoutput Commit message.
type Commit struct {
	CommitLSN, EndLSN pglogrepl.LSN
	CommitTime        time.Time
}

// Row is a row of a relation other than the outbox table: inserted, the new
// row of an update, or the old key of a delete.
type Row struct {
	Relation *Relation
	// Values are in text form, one per column of Relation; nil is NULL,
	// unless Unchanged says the column was not sent at all.
	Values [][]byte
	// Unchanged is nil when every column was sent. Otherwise it has one entry
	// per column, true for a column pgoutput sent as 'u': a TOASTed value the
	// update did not change, whose content is not in the message (its Value
	// is nil, but it is NOT NULL: the value is whatever the row held before
	// the update). A caller must take such a column from the row it already
	// knows, or refuse the row; it must never read it as NULL
	// (docs/DESIGN.md G10). Only update rows can have unchanged columns: an
	// insert carrying one is ErrMalformed, and a delete's old key is never
	// TOASTed.
	Unchanged []bool
}

// IsUnchanged reports whether column i was sent as 'u' (unchanged TOAST).
func (r *Row) IsUnchanged(i int) bool {
	return i >= 0 && i < len(r.Unchanged) && r.Unchanged[i]
}

// UnchangedColumns returns the names of the unchanged columns, in column
// order (none: nil).
func (r *Row) UnchangedColumns() []string {
	var out []string
	for i, u := range r.Unchanged {
		if u && i < len(r.Relation.Columns) {
			out = append(out, r.Relation.Columns[i].Name)
		}
	}
	return out
}

// Logical is a logical decoding message written by pg_logical_emit_message.
type Logical struct {
	LSN           pglogrepl.LSN
	Prefix        string
	Content       []byte
	Transactional bool
}

// Message is one decoded pgoutput message; Kind says which field is set.
type Message struct {
	Kind     Kind
	Begin    Begin
	Commit   Commit
	Event    *Event
	Row      *Row
	Logical  *Logical
	Relation *Relation
}

// Decoder decodes pgoutput messages (protocol version 1, text values) and
// keeps the relation cache. It is not safe for concurrent use.
type Decoder struct {
	table Table
	rels  map[uint32]*relEntry

	// Transaction state, for Event.CommitLSN and Event.Index.
	finalLSN pglogrepl.LSN
	index    int

	// Scratch space reused by every insert: column values (slices of the
	// input, cleared before Decode returns) and the Event's strings; for
	// updates also the 'u' flags and the old row.
	vals    [][]byte
	unch    []bool
	oldVals [][]byte
	oldUnch []bool
	strs    []byte
}

type relEntry struct {
	rel    *Relation
	outbox bool
	plan   plan
}

// NewDecoder returns a Decoder for the outbox table.
func NewDecoder(table Table) *Decoder {
	return &Decoder{table: table, rels: make(map[uint32]*relEntry)}
}

// Relation returns the cached relation with the id, or nil.
func (d *Decoder) Relation(id uint32) *Relation {
	if e := d.rels[id]; e != nil {
		return e.rel
	}
	return nil
}

// Decode decodes one pgoutput message (XLogData.WALData). It copies
// everything it keeps: the caller may reuse data once Decode returns.
//
// Errors wrap ErrMalformed, ErrUnknownRelation or ErrUnsupported, or are a
// *BadRowError; in every case the Decoder stays usable. A relation message for
// the outbox table that fails Relation.Validate is cached and returned, as a
// KindRelation Message, with the validation error; inserts into it then
// return *BadRowError.
//
// An Event gets CommitLSN (the FinalLSN of the last Begin; zero outside a
// transaction) and Index (the number of Events decoded since that Begin;
// rows that returned an error are not counted). TxnSeq is left to the caller.
//
// See https://www.postgresql.org/docs/15/protocol-logicalrep-message-formats.html.
func (d *Decoder) Decode(data []byte) (Message, error) {
	if len(data) == 0 {
		return Message{}, fmt.Errorf("decode: empty message: %w", ErrMalformed)
	}
	body := data[1:]
	switch data[0] {
	case 'B':
		return d.begin(body)
	case 'C':
		return d.commit(body)
	case 'R':
		return d.relation(body)
	case 'I':
		return d.insert(body)
	case 'M':
		return decodeLogical(body)
	case 'U':
		return d.update(body)
	case 'D':
		return d.delete(body)
	case 'T', 'Y', 'O':
		// Truncate, type and origin change nothing here.
		return Message{Kind: KindIgnored}, nil
	case 'S', 'E', 'c', 'A', 'b', 'P', 'K', 'r', 'p':
		return Message{}, fmt.Errorf("decode: message type %q needs a protocol version above 1: %w", data[0], ErrUnsupported)
	default:
		return Message{}, fmt.Errorf("decode: unknown message type %q: %w", data[0], ErrMalformed)
	}
}

// pgEpochMicros is 2000-01-01 00:00:00 UTC in microseconds since the Unix
// epoch; pgoutput timestamps count microseconds from it.
const pgEpochMicros = 946684800 * 1000000

func pgTime(b []byte) time.Time {
	return time.UnixMicro(int64(binary.BigEndian.Uint64(b)) + pgEpochMicros).UTC()
}

func malformed(msg, format string, args ...any) error {
	return fmt.Errorf("decode %s: %s: %w", msg, fmt.Sprintf(format, args...), ErrMalformed)
}

// begin: Int64 final LSN, Int64 commit time, Int32 xid.
func (d *Decoder) begin(b []byte) (Message, error) {
	if len(b) != 20 {
		return Message{}, malformed("begin", "length %d, want 20", len(b))
	}
	m := Message{Kind: KindBegin, Begin: Begin{
		FinalLSN:   pglogrepl.LSN(binary.BigEndian.Uint64(b)),
		CommitTime: pgTime(b[8:]),
		Xid:        binary.BigEndian.Uint32(b[16:]),
	}}
	d.finalLSN = m.Begin.FinalLSN
	d.index = 0
	return m, nil
}

// commit: Int8 flags, Int64 commit LSN, Int64 end LSN, Int64 commit time.
func (d *Decoder) commit(b []byte) (Message, error) {
	if len(b) != 25 {
		return Message{}, malformed("commit", "length %d, want 25", len(b))
	}
	m := Message{Kind: KindCommit, Commit: Commit{
		CommitLSN:  pglogrepl.LSN(binary.BigEndian.Uint64(b[1:])),
		EndLSN:     pglogrepl.LSN(binary.BigEndian.Uint64(b[9:])),
		CommitTime: pgTime(b[17:]),
	}}
	d.finalLSN = 0
	d.index = 0
	return m, nil
}

// cstring returns the NUL-terminated string at b[i:] and the index after it.
func cstring(b []byte, i int) ([]byte, int, bool) {
	for j := i; j < len(b); j++ {
		if b[j] == 0 {
			return b[i:j], j + 1, true
		}
	}
	return nil, i, false
}

// relation: Int32 id, String namespace, String name, Int8 replica identity,
// Int16 column count, then per column Int8 flags, String name, Int32 type
// OID, Int32 type modifier.
func (d *Decoder) relation(b []byte) (Message, error) {
	if len(b) < 4 {
		return Message{}, malformed("relation", "truncated id")
	}
	id := binary.BigEndian.Uint32(b)
	ns, i, ok := cstring(b, 4)
	if !ok {
		return Message{}, malformed("relation", "relation %d: truncated namespace", id)
	}
	name, i, ok := cstring(b, i)
	if !ok {
		return Message{}, malformed("relation", "relation %d: truncated name", id)
	}
	if len(b)-i < 3 {
		return Message{}, malformed("relation", "relation %d: truncated column count", id)
	}
	n := int(binary.BigEndian.Uint16(b[i+1:]))
	i += 3
	// Each column takes at least 10 bytes: refuse impossible counts before
	// allocating for them.
	if n*10 > len(b)-i {
		return Message{}, malformed("relation", "relation %d: %d columns in %d bytes", id, n, len(b)-i)
	}
	rel := &Relation{ID: id, Namespace: string(ns), Name: string(name), Columns: make([]Column, n)}
	for c := range rel.Columns {
		cname, next, ok := cstring(b, i+1)
		if !ok || len(b)-next < 8 {
			return Message{}, malformed("relation", "relation %d: truncated column %d", id, c)
		}
		rel.Columns[c] = Column{Name: string(cname), TypeOID: binary.BigEndian.Uint32(b[next:])}
		i = next + 8
	}
	if i != len(b) {
		return Message{}, malformed("relation", "relation %d: %d trailing bytes", id, len(b)-i)
	}
	e := &relEntry{rel: rel, outbox: d.table.Matches(rel)}
	if e.outbox {
		e.plan = newPlan(rel)
	}
	d.rels[id] = e
	m := Message{Kind: KindRelation, Relation: rel}
	if e.outbox && e.plan.idErr != nil {
		return m, fmt.Errorf("decode relation: outbox table: %w", e.plan.idErr)
	}
	return m, nil
}

// insert: Int32 relation id, Byte1 'N', TupleData.
func (d *Decoder) insert(b []byte) (Message, error) {
	if len(b) < 5 {
		return Message{}, malformed("insert", "truncated header")
	}
	id := binary.BigEndian.Uint32(b)
	if b[4] != 'N' {
		return Message{}, malformed("insert", "relation %d: tuple marker %q, want 'N'", id, b[4])
	}
	e := d.rels[id]
	if e == nil {
		return Message{}, fmt.Errorf("decode insert: relation %d: %w", id, ErrUnknownRelation)
	}
	n := len(e.rel.Columns)
	d.vals = scratch(d.vals, n)
	vals := d.vals[:n]
	defer clear(vals) // do not keep the caller's buffer alive
	// An inserted row has no previous value: 'u' cannot occur (nil flags
	// make scanTuple refuse it), and reading it as NULL would invent a value.
	if err := scanTuple(b[5:], vals, nil); err != nil {
		return Message{}, fmt.Errorf("decode insert: relation %d (%s.%s): %w", id, e.rel.Namespace, e.rel.Name, err)
	}
	if !e.outbox {
		return Message{Kind: KindInsert, Row: copyRow(e.rel, vals)}, nil
	}
	ev, strs, err := buildEvent(&e.plan, e.rel, vals, d.table.MessageNamespace, d.strs)
	d.strs = strs
	if err != nil {
		var bad *BadRowError
		if errors.As(err, &bad) {
			bad.Row = copyRow(e.rel, vals)
		}
		return Message{}, fmt.Errorf("decode insert: %w", err)
	}
	ev.CommitLSN = d.finalLSN
	ev.Index = d.index
	d.index++
	return Message{Kind: KindEvent, Event: ev}, nil
}

// update: Int32 relation id, optionally Byte1 'K' or 'O' and the old
// TupleData, then Byte1 'N' and the new TupleData. Updates of the outbox table
// are ignored (the marking UPDATEs never matter); for other relations the new
// row is returned.
//
// A TOASTed column the update did not change comes as 'u', without its value.
// With REPLICA IDENTITY FULL the old row ('O') carries every column in full
// (Postgres inlines its TOASTed values), so such a column takes the old
// row's value, which is by definition the new one; any column still unknown
// is flagged in Row.Unchanged for the caller to resolve.
func (d *Decoder) update(b []byte) (Message, error) {
	if len(b) < 5 {
		return Message{}, malformed("update", "truncated header")
	}
	id := binary.BigEndian.Uint32(b)
	e := d.rels[id]
	if e == nil {
		return Message{}, fmt.Errorf("decode update: relation %d: %w", id, ErrUnknownRelation)
	}
	rest := b[4:]
	var old []byte // the old full row ('O'), if sent
	if rest[0] == 'K' || rest[0] == 'O' {
		n, err := tupleLen(rest[1:])
		if err != nil {
			return Message{}, fmt.Errorf("decode update: relation %d: old tuple: %w", id, err)
		}
		if rest[0] == 'O' {
			old = rest[1 : 1+n]
		}
		rest = rest[1+n:]
	}
	if len(rest) == 0 || rest[0] != 'N' {
		return Message{}, malformed("update", "relation %d: missing new tuple", id)
	}
	if e.outbox {
		return Message{Kind: KindIgnored}, nil
	}
	n := len(e.rel.Columns)
	d.vals = scratch(d.vals, n)
	d.unch = scratch(d.unch, n)
	vals, unch := d.vals[:n], d.unch[:n]
	defer clear(vals)
	defer clear(unch)
	if err := scanTuple(rest[1:], vals, unch); err != nil {
		return Message{}, fmt.Errorf("decode update: relation %d (%s.%s): %w", id, e.rel.Namespace, e.rel.Name, err)
	}
	if old != nil && slices.Contains(unch, true) {
		d.oldVals = scratch(d.oldVals, n)
		d.oldUnch = scratch(d.oldUnch, n)
		oldVals, oldUnch := d.oldVals[:n], d.oldUnch[:n]
		defer clear(oldVals)
		defer clear(oldUnch)
		if err := scanTuple(old, oldVals, oldUnch); err != nil {
			return Message{}, fmt.Errorf("decode update: relation %d (%s.%s): old tuple: %w", id, e.rel.Namespace, e.rel.Name, err)
		}
		for c := range unch {
			// A NULL is never TOASTed: an old NULL under a new 'u' is not
			// a value to take.
			if unch[c] && !oldUnch[c] && oldVals[c] != nil {
				vals[c], unch[c] = oldVals[c], false
			}
		}
	}
	return Message{Kind: KindUpdate, Row: copyRowUnchanged(e.rel, vals, unch)}, nil
}

// delete: Int32 relation id, Byte1 'K' or 'O', TupleData of the old key or row.
func (d *Decoder) delete(b []byte) (Message, error) {
	if len(b) < 5 {
		return Message{}, malformed("delete", "truncated header")
	}
	id := binary.BigEndian.Uint32(b)
	e := d.rels[id]
	if e == nil {
		return Message{}, fmt.Errorf("decode delete: relation %d: %w", id, ErrUnknownRelation)
	}
	if b[4] != 'K' && b[4] != 'O' {
		return Message{}, malformed("delete", "relation %d: tuple marker %q, want 'K' or 'O'", id, b[4])
	}
	if e.outbox {
		return Message{Kind: KindIgnored}, nil
	}
	n := len(e.rel.Columns)
	d.vals = scratch(d.vals, n)
	d.unch = scratch(d.unch, n)
	vals, unch := d.vals[:n], d.unch[:n]
	defer clear(vals)
	defer clear(unch)
	// The old key is never TOASTed, and a full old row is sent inlined; a
	// 'u' here is still kept apart from NULL rather than refused.
	if err := scanTuple(b[5:], vals, unch); err != nil {
		return Message{}, fmt.Errorf("decode delete: relation %d (%s.%s): %w", id, e.rel.Namespace, e.rel.Name, err)
	}
	return Message{Kind: KindDelete, Row: copyRowUnchanged(e.rel, vals, unch)}, nil
}

// scratch returns buf with room for n elements, reused when it has it: the
// decoder's per-message buffers grow to the widest relation and stay.
func scratch[T any](buf []T, n int) []T {
	if cap(buf) < n {
		return make([]T, n)
	}
	return buf
}

// tupleLen returns the length of the TupleData at the start of b.
func tupleLen(b []byte) (int, error) {
	if len(b) < 2 {
		return 0, fmt.Errorf("truncated column count: %w", ErrMalformed)
	}
	n := int(binary.BigEndian.Uint16(b))
	i := 2
	for c := range n {
		if i >= len(b) {
			return 0, fmt.Errorf("column %d: truncated: %w", c, ErrMalformed)
		}
		kind := b[i]
		i++
		switch kind {
		case 'n', 'u':
		case 't', 'b':
			if len(b)-i < 4 {
				return 0, fmt.Errorf("column %d: truncated length: %w", c, ErrMalformed)
			}
			l := uint64(binary.BigEndian.Uint32(b[i:]))
			i += 4
			if l > uint64(len(b)-i) {
				return 0, fmt.Errorf("column %d: length %d past the end: %w", c, l, ErrMalformed)
			}
			i += int(l)
		default:
			return 0, fmt.Errorf("column %d: value kind %q: %w", c, kind, ErrMalformed)
		}
	}
	return i, nil
}

// scanTuple parses TupleData: Int16 column count, then per column Byte1 kind
// ('n' null, 'u' unchanged TOAST, 't' text, 'b' binary) and, for 't' and 'b',
// Int32 length and the bytes. It fills vals (one per relation column) with
// slices of b, nil for NULL.
//
// 'u' (a TOASTed value an update left unchanged, sent without its content)
// is never read as NULL: with unch nil it is ErrMalformed (inserts, where it
// cannot occur); otherwise unch (one per column) gets true for it, false for
// every other column, and its vals entry is nil. 'b' is only sent when binary
// mode is requested, which outboxd never does, so it is ErrUnsupported rather
// than a guess at the value.
func scanTuple(b []byte, vals [][]byte, unch []bool) error {
	if len(b) < 2 {
		return fmt.Errorf("truncated column count: %w", ErrMalformed)
	}
	n := int(binary.BigEndian.Uint16(b))
	if n != len(vals) {
		return fmt.Errorf("tuple has %d columns, relation has %d: %w", n, len(vals), ErrMalformed)
	}
	i := 2
	for c := range vals {
		if i >= len(b) {
			return fmt.Errorf("column %d: truncated: %w", c, ErrMalformed)
		}
		kind := b[i]
		i++
		if unch != nil {
			unch[c] = false
		}
		switch kind {
		case 'n':
			vals[c] = nil
		case 'u':
			if unch == nil {
				return fmt.Errorf("column %d: unchanged TOAST value ('u') where a full row is due: %w", c, ErrMalformed)
			}
			vals[c] = nil
			unch[c] = true
		case 't':
			if len(b)-i < 4 {
				return fmt.Errorf("column %d: truncated length: %w", c, ErrMalformed)
			}
			l := uint64(binary.BigEndian.Uint32(b[i:]))
			i += 4
			if l > uint64(len(b)-i) {
				return fmt.Errorf("column %d: length %d past the end: %w", c, l, ErrMalformed)
			}
			end := i + int(l)
			vals[c] = b[i:end:end]
			i = end
		case 'b':
			return fmt.Errorf("column %d: binary value: %w", c, ErrUnsupported)
		default:
			return fmt.Errorf("column %d: value kind %q: %w", c, kind, ErrMalformed)
		}
	}
	if i != len(b) {
		return fmt.Errorf("%d trailing bytes: %w", len(b)-i, ErrMalformed)
	}
	return nil
}

// copyRow copies vals into one allocation.
func copyRow(rel *Relation, vals [][]byte) *Row {
	return copyRowUnchanged(rel, vals, nil)
}

// copyRowUnchanged copies vals into one allocation, and unch when one of
// its flags is set.
func copyRowUnchanged(rel *Relation, vals [][]byte, unch []bool) *Row {
	n := 0
	for _, v := range vals {
		n += len(v)
	}
	buf := make([]byte, 0, n)
	out := make([][]byte, len(vals))
	for i, v := range vals {
		if v == nil {
			continue
		}
		start := len(buf)
		buf = append(buf, v...)
		out[i] = buf[start:len(buf):len(buf)]
	}
	row := &Row{Relation: rel, Values: out}
	if slices.Contains(unch, true) {
		row.Unchanged = slices.Clone(unch)
	}
	return row
}

// decodeLogical: Int8 flags (1 = transactional), Int64 LSN, String prefix,
// Int32 length, Byten content.
func decodeLogical(b []byte) (Message, error) {
	if len(b) < 9 {
		return Message{}, malformed("logical message", "truncated header")
	}
	flags := b[0]
	lsn := pglogrepl.LSN(binary.BigEndian.Uint64(b[1:]))
	prefix, i, ok := cstring(b, 9)
	if !ok {
		return Message{}, malformed("logical message", "truncated prefix")
	}
	if len(b)-i < 4 {
		return Message{}, malformed("logical message", "truncated length")
	}
	l := uint64(binary.BigEndian.Uint32(b[i:]))
	i += 4
	if l != uint64(len(b)-i) {
		return Message{}, malformed("logical message", "content length %d, have %d bytes", l, len(b)-i)
	}
	content := make([]byte, l)
	copy(content, b[i:])
	return Message{Kind: KindLogical, Logical: &Logical{
		LSN:           lsn,
		Prefix:        string(prefix),
		Content:       content,
		Transactional: flags&1 != 0,
	}}, nil
}
