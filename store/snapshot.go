package store

import (
	"context"
	"encoding/json"
	"fmt"
	"strconv"
	"time"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/outboxd/outboxd/decode"
)

// The catch-up reads the tables in the snapshot a slot exported, on a
// connection of its own in a read-only REPEATABLE READ transaction, in text
// format, so that its rows become events exactly as streamed ones do.

// pendingCursor is the cursor DeclarePending opens.
const pendingCursor = "outboxd_catchup"

// commitMicros is the SQL expression of the commit time of the transaction
// whose id is xid, in microseconds since the Unix epoch (NULL when unknown).
func commitMicros(xid string) string {
	return "(extract(epoch FROM pg_xact_commit_timestamp(" + xid + ")) * 1000000)::bigint"
}

// DeclarePending declares, in conn's transaction, a cursor over the pending
// rows of the outbox table t (PendingPredicate, every table consulted). With
// commitTimes (track_commit_timestamp on) the rows come in commit order and
// each row's last column is its commit time in microseconds since the Unix
// epoch (NULL when unknown); otherwise they come in id order.
func DeclarePending(ctx context.Context, conn *pgconn.PgConn, t decode.Table, commitTimes bool) error {
	order, cols := "e.id", "e.*"
	if commitTimes {
		order = "pg_xact_commit_timestamp(e.xmin) NULLS FIRST, e.id"
		cols = "e.*, " + commitMicros("e.xmin")
	}
	sql := `DECLARE ` + pendingCursor + ` NO SCROLL CURSOR FOR
  SELECT ` + cols + ` FROM ` + Ident(t.Schema, t.Name) + ` AS e
  WHERE ` + PendingPredicate(t.Schema, "e", All) + `
  ORDER BY ` + order
	_, err := conn.Exec(ctx, sql).ReadAll()
	return err
}

// FetchPending fetches the next n rows of the cursor DeclarePending opened.
func FetchPending(ctx context.Context, conn *pgconn.PgConn, n int) *pgconn.ResultReader {
	return conn.ExecParams(ctx, fmt.Sprintf("FETCH %d FROM %s", n, pendingCursor), nil, nil, nil, nil)
}

// SubscriptionRows reads every subscription, in id order, as rows of the
// subscription table's relation in schema.
func SubscriptionRows(ctx context.Context, conn *pgconn.PgConn, schema string) ([]*decode.Row, error) {
	rr := conn.ExecParams(ctx, "SELECT * FROM "+Ident(schema, SubscriptionTable)+" ORDER BY id", nil, nil, nil, nil)
	var out []*decode.Row
	var rel *decode.Relation
	for rr.NextRow() {
		if rel == nil {
			rel = RelationOf(decode.Table{Schema: schema, Name: SubscriptionTable}, rr.FieldDescriptions())
		}
		vals := make([][]byte, len(rr.Values()))
		for i, v := range rr.Values() {
			if v != nil {
				vals[i] = append([]byte{}, v...)
			}
		}
		out = append(out, &decode.Row{Relation: rel, Values: vals})
	}
	if _, err := rr.Close(); err != nil {
		return nil, fmt.Errorf("read subscriptions: %w", err)
	}
	return out, nil
}

// SubscriptionChange is one row of the subscriptions' routing history: from
// At on (zero: since always, or a change whose commit time is not known),
// subscription SubscriptionID was State, or no longer existed (Deleted).
type SubscriptionChange struct {
	// Seq is the history row's id: the order of changes of one moment.
	Seq            int64
	SubscriptionID int64
	At             time.Time
	Deleted        bool
	State          decode.SubscriptionAt
}

// SubscriptionHistory reads the subscriptions' routing history in schema.
// Its commit times need track_commit_timestamp.
func SubscriptionHistory(ctx context.Context, conn *pgconn.PgConn, schema string) ([]SubscriptionChange, error) {
	sql := `SELECT id, subscription_id, deleted, enabled, organization_id, array_to_json(events)::text,
  CASE WHEN since_always THEN NULL ELSE ` + commitMicros("xmin") + ` END
FROM ` + Ident(schema, SubscriptionHistoryTable)
	rr := conn.ExecParams(ctx, sql, nil, nil, nil, nil)
	var out []SubscriptionChange
	for rr.NextRow() {
		c, err := parseSubscriptionChange(rr.Values())
		if err != nil {
			rr.Close() //nolint:errcheck // failing anyway
			return nil, fmt.Errorf("read subscription history: %w", err)
		}
		out = append(out, c)
	}
	if _, err := rr.Close(); err != nil {
		return nil, fmt.Errorf("read subscription history: %w", err)
	}
	return out, nil
}

// parseSubscriptionChange reads a row of SubscriptionHistory's query.
func parseSubscriptionChange(v [][]byte) (SubscriptionChange, error) {
	var c SubscriptionChange
	var err error
	if c.Seq, err = strconv.ParseInt(string(v[0]), 10, 64); err == nil {
		c.SubscriptionID, err = strconv.ParseInt(string(v[1]), 10, 64)
	}
	if err == nil && v[4] != nil {
		var org int64
		org, err = strconv.ParseInt(string(v[4]), 10, 64)
		c.State.OrganizationID = &org
	}
	if err == nil && v[5] != nil {
		err = json.Unmarshal(v[5], &c.State.Events)
	}
	if err == nil && v[6] != nil {
		var us int64
		us, err = strconv.ParseInt(string(v[6]), 10, 64)
		c.At = time.UnixMicro(us)
	}
	c.Deleted = string(v[2]) == "t"
	c.State.Enabled = string(v[3]) == "t"
	return c, err
}
