package cdc

import (
	"context"
	"sync/atomic"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"
)

// replConn is what a streaming session needs of the replication connection
// once it is in copy-both mode: the server's next message, and a way to send
// standby status updates. The connection is a *pgconn.PgConn (pgReplConn);
// the tests replay captured pgoutput messages through a fake.
type replConn interface {
	// receive returns the server's next message, or nil and no error when
	// the deadline came first (the session's cue to send a status update)
	// or the session was interrupted.
	receive(deadline time.Time) (pgproto3.BackendMessage, error)
	// interrupt makes the receive in progress, and every later one until
	// reset, return nil at once. It may be called from another goroutine.
	interrupt()
	// reset ends the session's receiving: no deadline, no interruption, for
	// the connection's next user.
	reset()
	// sendStatus sends a standby status update.
	sendStatus(ctx context.Context, s pglogrepl.StandbyStatusUpdate) error
}

// pgReplConn is the replConn of a real connection. A receive waits with a
// read deadline on the connection, set only when it changes, instead of a
// context per message: pgconn watches a cancellable context with a goroutine
// of its own, which cost a goroutine hand-off and a timer per message.
type pgReplConn struct {
	conn        *pgconn.PgConn
	deadline    time.Time // the read deadline set on the connection
	interrupted atomic.Bool
}

func (c *pgReplConn) receive(deadline time.Time) (pgproto3.BackendMessage, error) {
	if !deadline.Equal(c.deadline) {
		if err := c.conn.Conn().SetReadDeadline(deadline); err != nil {
			return nil, err
		}
		c.deadline = deadline
	}
	if c.interrupted.Load() {
		return nil, nil
	}
	// context.Background itself: pgconn watches no other context.
	msg, err := c.conn.ReceiveMessage(context.Background())
	if pgconn.Timeout(err) {
		return nil, nil
	}
	return msg, err
}

func (c *pgReplConn) interrupt() {
	c.interrupted.Store(true)
	_ = c.conn.Conn().SetReadDeadline(time.Now()) // a closed connection needs no interrupting
}

func (c *pgReplConn) reset() {
	_ = c.conn.Conn().SetReadDeadline(time.Time{})
	c.deadline = time.Time{}
	c.interrupted.Store(false)
}

func (c *pgReplConn) sendStatus(ctx context.Context, s pglogrepl.StandbyStatusUpdate) error {
	return pglogrepl.SendStandbyStatusUpdate(ctx, c.conn, s)
}
