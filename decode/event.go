package decode

import (
	"time"

	"github.com/jackc/pglogrepl"
)

// Event is one row inserted into the outbox table, decoded and ready to deliver.
//
// Body is the JSON envelope of docs/DESIGN.md §4, built once by the decoder so that
// sinks never re-encode it. An Event never aliases the buffer it was decoded
// from: pglogrepl's XLogData.WALData is only valid until the next receive.
type Event struct {
	// ID is the row's id column.
	ID int64
	// Name is event_name ("" when NULL).
	Name string
	// OrganizationID is organization_id; HasOrganization is false when it is NULL
	// or the column is missing.
	OrganizationID  int64
	HasOrganization bool
	// EntityType and EntityID are entity_type and entity_id ("" when NULL).
	EntityType string
	EntityID   string
	// OccurredAt is occurred_at (zero when NULL or missing).
	OccurredAt time.Time
	// Traceparent is a W3C traceparent carried by the row, when it has one.
	Traceparent string
	// Processed is the is_processed value the row was inserted with.
	Processed bool
	// Body is the envelope JSON object. Its "id" is the row id.
	Body []byte
	// MessageID names this event to receivers (webhook-id, Nats-Msg-Id,
	// outboxd-message-id, the PostHog uuid), unique across outboxes:
	// MessageID(namespace, ID, OccurredAt), the same for the same row
	// whoever reads it (stream, catch-up, retrier, replay).
	MessageID string

	// CommitLSN is the LSN of the commit record of the event's transaction
	// (pgoutput Begin.FinalLSN); zero for rows read by the table catch-up.
	CommitLSN pglogrepl.LSN
	// TxnSeq is the sequence number the reader gave the event's transaction;
	// the checkpoint tracker settles by it.
	TxnSeq uint64
	// Index is the event's 0-based position within its transaction.
	Index int

	// Change, when set, makes this not an outbox row but a change of another
	// published table; only CommitLSN, TxnSeq and Index are meaningful then.
	Change *Change

	// CommitTime is when the row's transaction committed, for rows read by a
	// catch-up on a server with track_commit_timestamp; zero otherwise.
	// Windows then tells what each subscription was at that moment, so that
	// the row is routed as the stream would have routed it; nil Windows
	// routes with the subscriptions as they are.
	CommitTime time.Time
	Windows    SubscriptionWindows

	// Historical is true for a row read from the table rather than from the
	// stream (a catch-up, a replay): possibly old, sent late. PostHog routes
	// such events through its historical pipeline.
	Historical bool
}

// SubscriptionWindows tells what a subscription was at a moment in the
// past, from the history of its routing.
type SubscriptionWindows interface {
	// At returns subscription id's routing at t; known is false when the
	// history says nothing of it (route as it is now).
	At(id int64, t time.Time) (s SubscriptionAt, known bool)
}

// SubscriptionAt is a subscription's routing at one moment: whether it
// existed and was enabled, its organization (nil: platform-wide) and its
// event globs.
type SubscriptionAt struct {
	Enabled        bool
	OrganizationID *int64
	Events         []string
}

// Change is a change of a published table other than the outbox (the
// subscription table), handed downstream in commit order with the events.
type Change struct {
	// Kind is KindInsert, KindUpdate or KindDelete; KindIgnored with a nil
	// Row means "forget everything known of that table" (a snapshot follows).
	Kind Kind
	Row  *Row
}
