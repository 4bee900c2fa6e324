package cdc

import (
	"context"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"
)

// replConn is what a streaming session needs of the replication connection
// once it is in copy-both mode: the server's next message, and a way to send
// standby status updates. The connection is a *pgconn.PgConn (pgReplConn);
// the tests replay captured pgoutput messages through a fake.
type replConn interface {
	// receive returns the server's next message, or nil and no error when a
	// timeout (ctx's deadline) came first: the session's cue to send a status
	// update.
	receive(ctx context.Context) (pgproto3.BackendMessage, error)
	// sendStatus sends a standby status update.
	sendStatus(ctx context.Context, s pglogrepl.StandbyStatusUpdate) error
}

// pgReplConn is the replConn of a real connection.
type pgReplConn struct{ conn *pgconn.PgConn }

func (c pgReplConn) receive(ctx context.Context) (pgproto3.BackendMessage, error) {
	msg, err := c.conn.ReceiveMessage(ctx)
	if pgconn.Timeout(err) {
		return nil, nil
	}
	return msg, err
}

func (c pgReplConn) sendStatus(ctx context.Context, s pglogrepl.StandbyStatusUpdate) error {
	return pglogrepl.SendStandbyStatusUpdate(ctx, c.conn, s)
}
