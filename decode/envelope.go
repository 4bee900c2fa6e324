package decode

import (
	"errors"
	"fmt"
	"time"
)

// BadRowError reports an outbox row that cannot become an Event (its id is
// NULL or not an integer, or the table has no integer id column). The
// Decoder stays usable: the caller parks or skips the row and goes on.
type BadRowError struct {
	// Relation is the outbox relation the row was inserted into.
	Relation *Relation
	// Row is the row's values in text form (copied), for parking it.
	Row *Row
	// Reason says what is wrong with the row.
	Reason string
}

// Error implements error.
func (e *BadRowError) Error() string {
	if e.Relation == nil {
		return "bad outbox row: " + e.Reason
	}
	return fmt.Sprintf("bad outbox row in %s.%s: %s", e.Relation.Namespace, e.Relation.Name, e.Reason)
}

// EventFromText builds an Event from a row in text format (nil = NULL),
// columns matched by name; the table catch-up uses it with rows read by SQL
// in text format, so the envelope is identical to the stream's, and so is the
// MessageID, made in namespace ns (Table.MessageNamespace). The returned
// Event does not alias values. A row whose id is NULL or not an integer
// returns a *BadRowError.
func EventFromText(ns string, rel *Relation, values [][]byte) (*Event, error) {
	if rel == nil {
		return nil, errors.New("event from text: nil relation")
	}
	if len(values) != len(rel.Columns) {
		return nil, fmt.Errorf("event from text: %d values for %d columns of %s.%s", len(values), len(rel.Columns), rel.Namespace, rel.Name)
	}
	p := newPlan(rel)
	var scratch [128]byte
	ev, _, err := buildEvent(&p, rel, values, ns, scratch[:0])
	if err != nil {
		var bad *BadRowError
		if errors.As(err, &bad) {
			bad.Row = copyRow(rel, values)
		}
		return nil, fmt.Errorf("event from text: %w", err)
	}
	return ev, nil
}

// AppendBatch appends a JSON array of the events' bodies to dst. A nil event
// or an event without a body is written as null, so the array keeps one
// element per event and stays valid JSON.
func AppendBatch(dst []byte, events []*Event) []byte {
	n := 2 + len(events)
	for _, e := range events {
		if e != nil {
			n += len(e.Body)
		}
	}
	if cap(dst)-len(dst) < n {
		grown := make([]byte, len(dst), len(dst)+n)
		copy(grown, dst)
		dst = grown
	}
	dst = append(dst, '[')
	for i, e := range events {
		if i > 0 {
			dst = append(dst, ',')
		}
		if e == nil || len(e.Body) == 0 {
			dst = append(dst, "null"...)
			continue
		}
		dst = append(dst, e.Body...)
	}
	return append(dst, ']')
}

// buildEvent builds the Event, its Body and its MessageID (in namespace ns)
// from one row of rel, whose fields are located by p. vals are text values,
// nil for NULL; they are not retained. strs is scratch space for the Event's
// strings, returned grown so the Decoder can keep it.
func buildEvent(p *plan, rel *Relation, vals [][]byte, ns string, strs []byte) (*Event, []byte, error) {
	if p.idErr != nil {
		return nil, strs, &BadRowError{Relation: rel, Reason: p.idErr.Error()}
	}
	idVal := vals[p.col[fieldID]]
	if idVal == nil {
		return nil, strs, &BadRowError{Relation: rel, Reason: "id is null"}
	}
	id, ok := parseInt64(idVal)
	if !ok {
		return nil, strs, &BadRowError{Relation: rel, Reason: fmt.Sprintf("id %q is not an integer", truncate(idVal, 64))}
	}

	ev := &Event{ID: id}

	// occurred_at and properties are looked at once, for both the Event
	// fields and the body.
	var pre parsed
	if c := p.col[fieldOccurredAt]; c >= 0 && vals[c] != nil && p.conv[fieldOccurredAt] == convTimestamp {
		ev.OccurredAt, pre.occurredOK = parseTimestamp(vals[c])
		pre.occurredAt = ev.OccurredAt
	}
	var trace []byte
	if c := p.traceparent; c >= 0 && validTraceparent(vals[c]) {
		trace = vals[c]
	}
	if c := p.col[fieldProperties]; c >= 0 && vals[c] != nil && p.conv[fieldProperties] == convJSON {
		var t []byte
		pre.propsChecked = true
		pre.propsValid, t = scanJSON(vals[c], maxEmbedDepth, trace == nil)
		if trace == nil && pre.propsValid && validTraceparent(t) {
			trace = t
		}
	}
	ev.Body = appendBody(nil, p, vals, &pre)

	if c := p.col[fieldOrganizationID]; c >= 0 && vals[c] != nil {
		ev.OrganizationID, ev.HasOrganization = parseInt64(vals[c])
	}
	if c := p.processed; c >= 0 {
		v := vals[c]
		ev.Processed = len(v) > 0 && (v[0] == 't' || v[0] == 'T')
	}

	// Name, EntityType, EntityID, Traceparent and MessageID share one
	// allocation.
	strs = strs[:0]
	var ends [5]int
	for i, c := range [3]int{p.col[fieldEventName], p.col[fieldEntityType], p.col[fieldEntityID]} {
		if c >= 0 {
			strs = append(strs, vals[c]...)
		}
		ends[i] = len(strs)
	}
	strs = append(strs, trace...)
	ends[3] = len(strs)
	strs = AppendMessageID(strs, ns, id, ev.OccurredAt)
	ends[4] = len(strs)
	s := string(strs)
	ev.Name = s[:ends[0]]
	ev.EntityType = s[ends[0]:ends[1]]
	ev.EntityID = s[ends[1]:ends[2]]
	ev.Traceparent = s[ends[2]:ends[3]]
	ev.MessageID = s[ends[3]:ends[4]]
	return ev, strs, nil
}

// parsed carries what buildEvent already learnt about a row to appendBody.
type parsed struct {
	occurredAt   time.Time
	occurredOK   bool
	propsChecked bool // propsValid is known
	propsValid   bool
}

// appendBody appends the envelope object of docs/DESIGN.md §4 for one row.
func appendBody(dst []byte, p *plan, vals [][]byte, pre *parsed) []byte {
	if dst == nil {
		n := prefixesLen + 32
		for f := range numFields {
			if c := p.col[f]; c >= 0 {
				n += len(vals[c]) + 4
			} else {
				n += 4
			}
		}
		dst = make([]byte, 0, n)
	}
	for f := range numFields {
		dst = append(dst, fieldPrefix[f]...)
		c := p.col[f]
		if c < 0 || vals[c] == nil {
			dst = append(dst, "null"...)
			continue
		}
		switch {
		case f == fieldOccurredAt && pre.occurredOK:
			dst = appendTimestamp(dst, pre.occurredAt)
		case f == fieldProperties && pre.propsChecked:
			if pre.propsValid {
				dst = appendRawJSON(dst, vals[c])
			} else {
				dst = appendString(dst, vals[c])
			}
		default:
			dst = appendValue(dst, p.conv[f], vals[c])
		}
	}
	return append(dst, '}')
}

// appendValue appends the JSON form of one non-NULL text value.
func appendValue(dst []byte, cv conv, v []byte) []byte {
	switch cv {
	case convNumber:
		if isJSONNumber(v) {
			return append(dst, v...)
		}
	case convBool:
		switch string(v) {
		case "t", "true":
			return append(dst, "true"...)
		case "f", "false":
			return append(dst, "false"...)
		}
	case convJSON:
		if ok, _ := scanJSON(v, maxEmbedDepth, false); ok {
			return appendRawJSON(dst, v)
		}
	case convTimestamp:
		if t, ok := parseTimestamp(v); ok {
			return appendTimestamp(dst, t)
		}
	}
	return appendString(dst, v)
}

// parseInt64 parses a decimal integer with an optional sign, as Postgres
// prints int2, int4 and int8.
func parseInt64(b []byte) (int64, bool) {
	if len(b) == 0 {
		return 0, false
	}
	neg := false
	switch b[0] {
	case '-':
		neg = true
		b = b[1:]
	case '+':
		b = b[1:]
	}
	if len(b) == 0 || len(b) > 19 {
		return 0, false
	}
	var u uint64
	for _, c := range b {
		if c < '0' || c > '9' {
			return 0, false
		}
		u = u*10 + uint64(c-'0')
	}
	// 19 digits fit in a uint64; check the int64 range.
	if neg {
		if u > 1<<63 {
			return 0, false
		}
		return -int64(u), true
	}
	if u > 1<<63-1 {
		return 0, false
	}
	return int64(u), true
}

// validTraceparent reports whether v is a W3C trace context traceparent
// (https://www.w3.org/TR/trace-context/#traceparent-header): lowercase hex
// version-traceid-parentid-flags, non-zero ids, version ff invalid, and for
// versions above 00 optional "-" suffixes. Sinks put it in an HTTP header, so
// nothing else gets through.
func validTraceparent(v []byte) bool {
	const n = 55 // 2+1+32+1+16+1+2
	if len(v) < n || len(v) > 256 || v[2] != '-' || v[35] != '-' || v[52] != '-' {
		return false
	}
	for _, r := range [][2]int{{0, 2}, {3, 35}, {36, 52}, {53, 55}} {
		zero := true
		for _, c := range v[r[0]:r[1]] {
			if !((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f')) {
				return false
			}
			if c != '0' {
				zero = false
			}
		}
		if zero && (r[0] == 3 || r[0] == 36) {
			return false
		}
	}
	if v[0] == 'f' && v[1] == 'f' {
		return false
	}
	if len(v) == n {
		return true
	}
	if v[0] == '0' && v[1] == '0' || v[n] != '-' {
		return false
	}
	for _, c := range v[n+1:] {
		if c < 0x21 || c > 0x7e {
			return false
		}
	}
	return true
}

// truncate shortens v for an error message.
func truncate(v []byte, n int) string {
	if len(v) > n {
		return string(v[:n]) + "…"
	}
	return string(v)
}
