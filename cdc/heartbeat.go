package cdc

import (
	"context"
	"fmt"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
)

// heartbeatOn reports whether the heartbeat runs in this session: asked for,
// and the server is PostgreSQL 14 or later.
func (r *Reader) heartbeatOn(conn *pgconn.PgConn) bool {
	if r.cfg.HeartbeatInterval <= 0 {
		return false
	}
	var major int
	fmt.Sscanf(conn.ParameterStatus("server_version"), "%d", &major) //nolint:errcheck // 0 when unparsable
	if major < 14 {
		r.log.Warn().Str("server_version", conn.ParameterStatus("server_version")).
			Msg("heartbeat off: logical decoding messages need PostgreSQL 14 or later")
		return false
	}
	return true
}

// heartbeat emits a logical decoding message whenever the stream has carried
// no data for HeartbeatInterval, until ctx ends. It uses its own regular
// connection (a replication connection cannot run it while streaming);
// failures are logged and retried at the next interval.
func (r *Reader) heartbeat(ctx context.Context, lastData *atomic.Int64) {
	every := r.cfg.HeartbeatInterval
	var conn *pgconn.PgConn
	defer func() {
		if conn != nil {
			conn.Close(context.Background()) //nolint:errcheck // best effort
		}
	}()
	var last time.Time // last heartbeat emitted
	timer := time.NewTimer(every)
	defer timer.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-timer.C:
		}
		quiet := time.Unix(0, lastData.Load())
		if last.After(quiet) {
			quiet = last
		}
		if wait := time.Until(quiet.Add(every)); wait > 0 {
			timer.Reset(wait)
			continue
		}
		timer.Reset(every)
		if conn == nil || conn.IsClosed() {
			c, err := r.connect(ctx, false)
			if err != nil {
				r.log.Warn().Err(err).Msg("heartbeat not sent")
				continue
			}
			conn = c
		}
		last = time.Now()
		ectx, cancel := context.WithTimeout(ctx, every)
		_, err := conn.Exec(ectx, `SELECT pg_logical_emit_message(false, '`+HeartbeatPrefix+`', '')`).ReadAll()
		cancel()
		if err != nil {
			if ctx.Err() == nil {
				r.log.Warn().Err(err).Msg("heartbeat not sent")
			}
			conn.Close(context.Background()) //nolint:errcheck // reconnect next time
			conn = nil
			continue
		}
		r.log.Debug().Msg("heartbeat sent")
	}
}
