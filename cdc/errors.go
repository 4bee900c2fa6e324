package cdc

import (
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"syscall"

	"github.com/jackc/pgx/v5/pgconn"
)

// ConnectionLost reports whether err says a database connection broke or
// could not be kept (reset, closed mid-answer, the server shutting down or
// starting up): a transient failure, retried wherever it happens. A
// connection never made (nothing listening, no route, unknown host) is not
// one of them: a *pgconn.ConnectError counts only when something accepted
// the connection and then dropped it (a pooler or proxy in front of a
// Postgres that is down).
func ConnectionLost(err error) bool {
	if err == nil {
		return false
	}
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		switch pgErr.Code {
		case "57P01", "57P02", "57P03": // admin_shutdown, crash_shutdown, cannot_connect_now
			return true
		}
		return strings.HasPrefix(pgErr.Code, "08") // connection_exception
	}
	dropped := errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, syscall.ECONNRESET)
	var connErr *pgconn.ConnectError
	if errors.As(err, &connErr) {
		return dropped
	}
	var netErr net.Error
	return dropped || errors.As(err, &netErr)
}

// ErrReset ends a session whose slot and checkpoint an operator removed
// (`outboxd slot reset --force` does so when it terminates a running
// instance): what this instance holds belongs to a stream that is over. The
// caller drops it and starts again as on a first start: slot creation and a
// catch-up of every unprocessed row from the table.
var ErrReset = errors.New("slot reset by an operator")

// ErrTakenOver ends a session whose slot another instance took while this one
// was disconnected: the other acts now (G9). What this instance still holds
// is past the checkpoint, so the new holder delivers it; the caller drops it
// and starts again as a standby.
var ErrTakenOver = errors.New("slot taken over by another instance")

// ErrDiverged ends a session that reconnected to a promoted server whose
// history forked from the old primary's before positions this instance
// received or recorded from it (a standby that had not received them, with
// asynchronous replication and no synchronized_standby_slots): streaming on
// from there would skip the promoted server's own transactions up to that
// position. What this instance holds beyond the fork is not in the
// database; the caller drops what it holds, as for ErrTakenOver, and runs
// again, which starts at the checkpoint on the promoted server.
var ErrDiverged = errors.New("stream ahead of the promoted server's history")

// ErrIrreconcilable marks start-up states that need an operator: the slot and
// the checkpoint disagree in a way that could lose or re-send events.
var ErrIrreconcilable = errors.New("slot and checkpoint cannot be reconciled")

// ErrSlotLost is returned by Run when the slot disappeared or was
// invalidated while streaming and OUTBOXD_SLOT_RECREATE allows recreating it:
// the caller drains what it holds and runs the pipeline again, which
// recreates the slot and catches up from the table.
var ErrSlotLost = errors.New("slot lost while streaming")

// ErrCatchupInterrupted is returned by Run when the connection broke during
// the catch-up of a slot created in this process: like ErrSlotLost, the
// caller drains what it holds and runs the pipeline again, which recreates
// the slot (the checkpoint's catch-up is still pending) and catches up.
var ErrCatchupInterrupted = errors.New("catch-up interrupted")

func (r *Reader) slotLost(what string) error {
	if r.cfg.SlotRecreate {
		return fmt.Errorf("%w: slot %q %s", ErrSlotLost, r.cfg.Slot, what)
	}
	return fmt.Errorf("%w: slot %q %s while streaming; restart outboxd with OUTBOXD_SLOT_RECREATE=true or run `outboxd slot reset --yes`", errFatal, r.cfg.Slot, what)
}

// errFatal marks errors a reconnect cannot fix.
var errFatal = errors.New("fatal")

// errRetry marks start-up conditions worth waiting out (the slot is active in
// another process: a standby waits for the active instance to go away).
type errRetry struct{ msg string }

func (e errRetry) Error() string { return e.msg }
