package store

import (
	"context"
	"crypto/rand"
	"encoding/hex"
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
	// XID is the transaction's id (pg_current_xact_id), PID its backend and
	// ServerStart the server's pg_postmaster_start_time when it began.
	XID         uint64
	PID         uint32
	ServerStart time.Time
	Err         error
	// written reports, once the transaction is over, whether its writes are
	// in the database: the answer when the server restarted meanwhile, as
	// a transaction id that never became durable is given again then.
	written func(ctx context.Context, q Querier) (bool, error)
}

func (e *InDoubtError) Error() string {
	return fmt.Sprintf("%s: outcome of the commit unknown (transaction %d): %v", e.What, e.XID, e.Err)
}

func (e *InDoubtError) Unwrap() error { return e.Err }

// writeTx is a write transaction whose identity is known, so that a lost
// COMMIT answer can be resolved later (commit, Committed).
type writeTx struct {
	pgx.Tx
	what  string
	xid   uint64
	start time.Time
}

// begin starts a write transaction and reads its id and the server's start
// time, so that commit can report a lost answer as an *InDoubtError.
func (s *SlotStore) begin(ctx context.Context, what string) (*writeTx, error) {
	tx, err := s.pool.Begin(ctx)
	if err != nil {
		return nil, fmt.Errorf("%s: begin: %w", what, err)
	}
	w := &writeTx{Tx: tx, what: what}
	var xid string
	if err := tx.QueryRow(ctx, `SELECT pg_current_xact_id()::text, pg_postmaster_start_time()`).Scan(&xid, &w.start); err != nil {
		_ = tx.Rollback(context.WithoutCancel(ctx))
		return nil, fmt.Errorf("%s: read transaction id: %w", what, err)
	}
	if w.xid, err = strconv.ParseUint(xid, 10, 64); err != nil {
		_ = tx.Rollback(context.WithoutCancel(ctx))
		return nil, fmt.Errorf("%s: transaction id %q: %w", what, xid, err)
	}
	return w, nil
}

// beginFenced is begin, then the fence (SetFence): a write of the slot
// holder. The caller rolls the transaction back unless it commits.
func (s *SlotStore) beginFenced(ctx context.Context, what string) (*writeTx, error) {
	tx, err := s.begin(ctx, what)
	if err != nil {
		return nil, err
	}
	if err := s.fenced(ctx, tx); err != nil {
		_ = tx.Rollback(context.WithoutCancel(ctx))
		return nil, err
	}
	return tx, nil
}

// commit commits the transaction. An error the server answered leaves it
// rolled back; any other leaves its outcome unknown and is an *InDoubtError
// whose written checks the transaction's writes (pgx reports an answer lost
// after the COMMIT was sent as "conn closed", an error it calls safe to
// retry: it is not).
func (w *writeTx) commit(ctx context.Context, written func(ctx context.Context, q Querier) (bool, error)) error {
	pid := w.Conn().PgConn().PID()
	err := w.Commit(ctx)
	if err == nil {
		return nil
	}
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		return fmt.Errorf("%s: commit: %w", w.what, err)
	}
	return &InDoubtError{What: w.what, XID: w.xid, PID: pid, ServerStart: w.start, Err: err, written: written}
}

// newToken returns a random write token.
func newToken() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// Committed finds out whether the transaction of d committed. On the server
// it began on, the transaction's id answers (pg_xact_status); while it is
// still in progress (the connection was cut before the COMMIT reached its
// backend, which has not noticed yet, or the commit waits on a synchronous
// standby), that backend is terminated: it is this process's own old
// connection, holding the locks of the rows a retry would write, and a
// terminated transaction is committed or rolled back for good. After a
// restart (or on another server, after a failover) the id may have been given
// to another transaction, so the transaction's own writes answer. Committed
// waits for the answer until ctx ends.
func (s *SlotStore) Committed(ctx context.Context, d *InDoubtError) (bool, error) {
	xid := strconv.FormatUint(d.XID, 10)
	wait := 2 * time.Millisecond
	terminated := false
	for {
		var start time.Time
		if err := s.pool.QueryRow(ctx, `SELECT pg_postmaster_start_time()`).Scan(&start); err != nil {
			return false, fmt.Errorf("%s: find out whether transaction %s committed: %w", d.What, xid, err)
		}
		if !start.Equal(d.ServerStart) {
			// Restarted: whatever was in progress is over.
			ok, err := d.written(ctx, s.pool)
			if err != nil {
				return false, fmt.Errorf("%s: find out whether transaction %s committed: %w", d.What, xid, err)
			}
			return ok, nil
		}
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
