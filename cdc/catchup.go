package cdc

import (
	"context"
	"fmt"
	"strconv"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/outboxd/outboxd/decode"
	"github.com/outboxd/outboxd/store"
)

// snapshot is the snapshot exported when the slot was created. Rows committed
// before it are not in the slot's stream; rows committed after it are only in
// the stream. Reading unprocessed rows in it therefore leaves no gap and no
// overlap at the handoff.
type snapshot struct {
	r    *Reader
	name string
	lsn  pglogrepl.LSN
	conn *pgconn.PgConn
	// commitTimes is true when the server records commit timestamps: the
	// cursor's last column is then each row's commit time.
	commitTimes bool
}

// begin imports the snapshot in a read-only transaction and opens a cursor
// over the unprocessed rows. It must run before the replication connection
// runs its next command.
func (s *snapshot) begin(ctx context.Context) error {
	conn, err := s.r.connect(ctx, false)
	if err != nil {
		return fmt.Errorf("catch-up connection: %w", err)
	}
	s.conn = conn
	// The snapshot name comes from the server; it is a plain token.
	if _, err := conn.Exec(ctx, `BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY;
SET TRANSACTION SNAPSHOT '`+s.name+`'`).ReadAll(); err != nil {
		return fmt.Errorf("import snapshot %s: %w", s.name, err)
	}
	// Commit order is known only with track_commit_timestamp; otherwise
	// rows committed before the slot are read in id order.
	res, err := conn.Exec(ctx, "SELECT current_setting('track_commit_timestamp')").ReadAll()
	s.commitTimes = err == nil && len(res) == 1 && len(res[0].Rows) == 1 && string(res[0].Rows[0][0]) == "on"
	if err := store.DeclarePending(ctx, conn, s.r.cfg.Table, s.commitTimes); err != nil {
		return fmt.Errorf("open catch-up cursor: %w", err)
	}
	return nil
}

func (s *snapshot) close() {
	if s.conn != nil {
		s.conn.Close(context.Background()) //nolint:errcheck // read-only transaction; closing ends it
		s.conn = nil
	}
}

// catchup hands every unprocessed row of the snapshot downstream as one
// pseudo-transaction that ends at the slot's consistent point, before any
// streamed transaction.
func (r *Reader) catchup(ctx context.Context, st *stream, s *snapshot) error {
	seq := r.ledger.Open(0, true)
	n := 0
	var wins windows
	if r.cfg.SubscriptionPublication != "" && s.commitTimes {
		// Each row goes to the subscriptions that were enabled and matched
		// it at its commit, as the stream would have routed it (and still
		// match it now).
		var err error
		if wins, err = s.history(ctx); err != nil {
			return err
		}
	} else if r.cfg.SubscriptionPublication != "" {
		r.log.Warn().Msg("track_commit_timestamp is off: the rows this catch-up reads are routed with the subscriptions as they are now, not as they were at each row's commit")
	}
	if r.cfg.SubscriptionPublication != "" {
		// Seed the routing state with the subscriptions of the snapshot, so
		// routing is exact from the slot's first transaction on.
		changes, err := s.subscriptions(ctx)
		if err != nil {
			return err
		}
		if r.rels.plan != 0 {
			c, err := planChange(ctx, s.conn, r.cfg.Table.Schema)
			if err != nil {
				return err
			}
			changes = append(changes, c)
		}
		for _, c := range changes {
			if err := st.emit(ctx, &decode.Event{Change: c, TxnSeq: seq, Index: n}); err != nil {
				return err
			}
			n++
		}
	}
	var rel *decode.Relation
	for {
		rr := store.FetchPending(ctx, s.conn, r.cfg.CatchupFetch)
		rows := 0
		for rr.NextRow() {
			fields, vals := rr.FieldDescriptions(), rr.Values()
			var commitUs []byte
			if s.commitTimes {
				last := len(vals) - 1
				fields, vals, commitUs = fields[:last], vals[:last], vals[last]
			}
			if rel == nil {
				rel = store.RelationOf(r.cfg.Table, fields)
				if err := rel.Validate(); err != nil {
					rr.Close() //nolint:errcheck // failing anyway
					return fmt.Errorf("table %s.%s: %w", r.cfg.Table.Schema, r.cfg.Table.Name, err)
				}
			}
			rows++
			e, err := decode.EventFromText(r.cfg.Table.MessageNamespace, rel, vals)
			if err != nil {
				r.log.Error().Err(err).Msg("catch-up row skipped: it cannot be delivered or marked")
				continue
			}
			if wins != nil && commitUs != nil {
				if us, err := strconv.ParseInt(string(commitUs), 10, 64); err == nil {
					e.CommitTime, e.Windows = time.UnixMicro(us), wins
				}
			}
			// Every row read here committed before the slot's consistent
			// point, and after whatever was parked before it (a parked head
			// holds its key's later events back, parked too): giving them
			// that point as their commit LSN sorts them after the parked
			// deliveries of their key, in catch-up order (Index), when
			// they are parked in turn. Zero sorted them first.
			e.CommitLSN, e.TxnSeq, e.Index, e.Historical = s.lsn, seq, n, true
			n++
			if err := st.emit(ctx, e); err != nil {
				rr.Close() //nolint:errcheck // failing anyway
				return err
			}
			if err := st.status(false, false); err != nil {
				rr.Close() //nolint:errcheck // failing anyway
				return err
			}
		}
		if _, err := rr.Close(); err != nil {
			return fmt.Errorf("fetch unprocessed rows: %w", err)
		}
		if rows < r.cfg.CatchupFetch {
			break
		}
	}
	if _, err := s.conn.Exec(ctx, "COMMIT").ReadAll(); err != nil {
		return fmt.Errorf("end catch-up transaction: %w", err)
	}
	if err := r.ledger.Close(seq, s.lsn, n); err != nil {
		return err
	}
	r.log.Info().Int("rows", n).Stringer("consistent_lsn", s.lsn).Msg("catch-up read the table")
	return nil
}

// subscriptions reads the subscription table in the snapshot: a reset
// followed by one insert per subscription.
func (s *snapshot) subscriptions(ctx context.Context) ([]*decode.Change, error) {
	rows, err := store.SubscriptionRows(ctx, s.conn, s.r.cfg.Table.Schema)
	if err != nil {
		return nil, err
	}
	out := []*decode.Change{{Kind: decode.KindIgnored}}
	for _, row := range rows {
		out = append(out, &decode.Change{Kind: decode.KindInsert, Row: row})
	}
	return out, nil
}
