package store

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// InDoubtError is returned by a write whose COMMIT was sent but whose answer
// never came back (the connection was cut, the write ran out of time): the
// server may have committed it or not. Writing the same work again would
// count its attempts and park its deliveries twice when it did, so the caller
// asks Committed first and writes again only on false.
type InDoubtError struct {
	What string
	// XID is the transaction's id (pg_current_xact_id) and PID its backend.
	XID uint64
	PID uint32
	Err error
}

func (e *InDoubtError) Error() string {
	return fmt.Sprintf("%s: outcome of the commit unknown (transaction %d): %v", e.What, e.XID, e.Err)
}

func (e *InDoubtError) Unwrap() error { return e.Err }

// begin starts a write transaction and reads its id, so that commit can
// report a lost answer as an *InDoubtError.
func (s *SlotStore) begin(ctx context.Context, what string) (pgx.Tx, uint64, error) {
	tx, err := s.pool.Begin(ctx)
	if err != nil {
		return nil, 0, fmt.Errorf("%s: begin: %w", what, err)
	}
	var xid string
	if err := tx.QueryRow(ctx, `SELECT pg_current_xact_id()::text`).Scan(&xid); err != nil {
		_ = tx.Rollback(context.WithoutCancel(ctx))
		return nil, 0, fmt.Errorf("%s: read transaction id: %w", what, err)
	}
	id, err := strconv.ParseUint(xid, 10, 64)
	if err != nil {
		_ = tx.Rollback(context.WithoutCancel(ctx))
		return nil, 0, fmt.Errorf("%s: transaction id %q: %w", what, xid, err)
	}
	return tx, id, nil
}

// commit commits tx (of id xid). An error the server answered leaves the
// transaction rolled back; any other leaves its outcome unknown and is an
// *InDoubtError. (pgx reports an answer lost after the COMMIT was sent as
// "conn closed", an error it calls safe to retry: it is not.)
func commit(ctx context.Context, tx pgx.Tx, xid uint64, what string) error {
	pid := tx.Conn().PgConn().PID()
	err := tx.Commit(ctx)
	if err == nil {
		return nil
	}
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		return fmt.Errorf("%s: commit: %w", what, err)
	}
	return &InDoubtError{What: what, XID: xid, PID: pid, Err: err}
}

// Committed finds out whether the transaction of d committed. While it is
// still in progress (the connection was cut before the COMMIT reached its
// backend, which has not noticed yet, or the commit is waiting on a
// synchronous standby), that backend is terminated: it is this process's own
// old connection, holding the locks of the rows a retry would write, and a
// terminated transaction is committed or rolled back for good. Committed
// waits for the answer until ctx ends.
func (s *SlotStore) Committed(ctx context.Context, d *InDoubtError) (bool, error) {
	xid := strconv.FormatUint(d.XID, 10)
	wait := 2 * time.Millisecond
	terminated := false
	for {
		var status *string
		if err := s.pool.QueryRow(ctx, `SELECT pg_xact_status($1::xid8)`, xid).Scan(&status); err != nil {
			return false, fmt.Errorf("%s: find out whether transaction %s committed: %w", d.What, xid, err)
		}
		switch {
		case status == nil:
			// Only for ids older than the commit log keeps: not one of a
			// write this process just made.
			return false, fmt.Errorf("%s: the server no longer knows the outcome of transaction %s", d.What, xid)
		case *status == "committed":
			return true, nil
		case *status == "aborted":
			return false, nil
		}
		if !terminated {
			// backend_xid is the low 32 bits of the full id.
			if _, err := s.pool.Exec(ctx, `SELECT pg_terminate_backend(pid) FROM pg_catalog.pg_stat_activity
WHERE pid = $1 AND backend_xid::text::bigint = $2`, int32(d.PID), int64(d.XID&0xffffffff)); err != nil {
				return false, fmt.Errorf("%s: end the backend of transaction %s: %w", d.What, xid, err)
			}
			terminated = true
		}
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return false, fmt.Errorf("%s: find out whether transaction %s committed: %w", d.What, xid, ctx.Err())
		case <-t.C:
		}
		wait = min(2*wait, 100*time.Millisecond)
	}
}
