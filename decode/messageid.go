package decode

import (
	"errors"
	"strconv"
	"strings"
	"time"
)

// Message ids (docs/DESIGN.md §4). Receivers deduplicate on the id a sink
// sends with an event (webhook-id, Nats-Msg-Id, outboxd-message-id, the
// PostHog uuid), so it must never name two different events: not when two
// outboxes post to one endpoint, not after the table's identity restarts or
// the database is restored from a backup and goes on inserting. The row id
// alone is none of that, so the message id of an event is
//
//	evt_<namespace>_<row id>_<occurred_at in microseconds since 1970, base 36>
//
// The namespace is a random name of the outbox, made once by `outboxd
// migrate` (migration 5, table outboxd_outbox) and kept through restarts,
// slot resets and restores. occurred_at tells a new event that reuses an id
// (after TRUNCATE … RESTART IDENTITY, or a restore) from the old one. When
// the row has no usable occurred_at (no such column, NULL, not a timestamp,
// infinite) the id is evt_<namespace>_<row id>. The body's "id" stays the
// row id.
//
// The id is a pure function of the namespace and the row, so every copy of an
// event (retries, redeliveries after a crash, parked retries, the catch-up,
// `outboxd replay`) carries the same one.

// messageIDPrefix starts every message id.
const messageIDPrefix = "evt_"

// MaxNamespaceLen is the longest namespace CheckNamespace accepts.
const MaxNamespaceLen = 32

// CheckNamespace reports whether ns can be a message namespace: 1 to
// MaxNamespaceLen characters of 0-9 and a-z, so that a message id is a plain
// token (an HTTP header value, a NATS header) and splits unambiguously at its
// underscores. `outboxd migrate` makes 16 hex digits.
func CheckNamespace(ns string) error {
	if ns == "" || len(ns) > MaxNamespaceLen {
		return errors.New("a message namespace must be 1-32 characters of 0-9 and a-z")
	}
	for i := range len(ns) {
		if c := ns[i]; !('0' <= c && c <= '9' || 'a' <= c && c <= 'z') {
			return errors.New("a message namespace must be 1-32 characters of 0-9 and a-z")
		}
	}
	return nil
}

// MessageID returns the message id of the row with id id and occurred_at
// occurredAt (zero when it has none) in namespace ns.
func MessageID(ns string, id int64, occurredAt time.Time) string {
	var buf [64]byte
	return string(AppendMessageID(buf[:0], ns, id, occurredAt))
}

// AppendMessageID appends MessageID(ns, id, occurredAt) to dst.
func AppendMessageID(dst []byte, ns string, id int64, occurredAt time.Time) []byte {
	dst = append(dst, messageIDPrefix...)
	dst = append(dst, ns...)
	dst = append(dst, '_')
	dst = strconv.AppendInt(dst, id, 10)
	if !occurredAt.IsZero() {
		dst = append(dst, '_')
		dst = strconv.AppendInt(dst, occurredAt.UnixMicro(), 36)
	}
	return dst
}

// MessageNamespace returns the namespace part of a message id made by
// MessageID, "" when id is not one.
func MessageNamespace(id string) string {
	rest, ok := strings.CutPrefix(id, messageIDPrefix)
	if !ok {
		return ""
	}
	ns, _, ok := strings.Cut(rest, "_")
	if !ok {
		return ""
	}
	return ns
}
