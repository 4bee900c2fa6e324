package store

import (
	"context"
	"fmt"
	"strconv"
	"strings"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5/pgconn"
)

// Slot is a logical replication slot's row of pg_replication_slots, read
// with the server's WAL position: the one reading of the slot that the
// reader, status, the slot commands and the metrics share.
type Slot struct {
	Plugin    string
	Database  string
	Active    bool
	ActivePID int32 // 0 when no process streams from it
	WALStatus string
	// RestartLSN and ConfirmedFlush are nil when NULL (an invalidated slot).
	RestartLSN     *pglogrepl.LSN
	ConfirmedFlush *pglogrepl.LSN
	// SafeWALBytes is safe_wal_size; nil when unlimited
	// (max_slot_wal_keep_size = -1).
	SafeWALBytes *int64
	// SameDatabase is whether the slot belongs to the connection's database.
	SameDatabase bool
	// CurrentDatabase is the connection's database.
	CurrentDatabase string
	// CurrentLSN is the server's WAL position read with the row
	// (pg_current_wal_lsn, or the last replayed position on a standby).
	CurrentLSN pglogrepl.LSN
	// Failover is pg_replication_slots.failover: the slot is synchronized to
	// standbys that ask for it (PostgreSQL 17 and later; nil before).
	Failover *bool
	// Synced is pg_replication_slots.synced: on a standby, the slot is a
	// copy the slot synchronization keeps; on a promoted one, it was (false
	// before 17).
	Synced bool
}

// Confirmed is ConfirmedFlush, 0 when NULL.
func (s *Slot) Confirmed() pglogrepl.LSN {
	if s.ConfirmedFlush == nil {
		return 0
	}
	return *s.ConfirmedFlush
}

// slotSQL reads one row whatever happens (the slot's columns NULL when it
// does not exist), every column as text, so that the extended protocol of a
// pool and the simple protocol of a replication connection read it alike.
// $1 is the slot name. The columns of PostgreSQL 17 (failover, synced) are
// read through to_jsonb, NULL on older servers.
const slotSQL = `SELECT (s.slot_name IS NOT NULL)::text, s.plugin::text, s.database::text, s.active::text,
  s.active_pid::text, s.restart_lsn::text, s.confirmed_flush_lsn::text, s.wal_status, s.safe_wal_size::text,
  (s.database IS NOT DISTINCT FROM current_database())::text, current_database()::text,
  (CASE WHEN pg_is_in_recovery() THEN coalesce(pg_last_wal_replay_lsn(), '0/0') ELSE pg_current_wal_lsn() END)::text,
  to_jsonb(s) ->> 'failover', to_jsonb(s) ->> 'synced'
FROM (SELECT 1) AS one LEFT JOIN pg_catalog.pg_replication_slots AS s ON s.slot_name = $1`

// ReadSlot returns the row of slot, nil when there is none, and the
// server's WAL position.
func ReadSlot(ctx context.Context, q Querier, slot string) (*Slot, pglogrepl.LSN, error) {
	v := make([]*string, slotColumns)
	dest := make([]any, len(v))
	for i := range v {
		dest[i] = &v[i]
	}
	if err := q.QueryRow(ctx, slotSQL, slot).Scan(dest...); err != nil {
		return nil, 0, fmt.Errorf("read slot %q: %w", slot, err)
	}
	return parseSlot(slot, v)
}

// ReadSlotSimple is ReadSlot over the simple query protocol, which is all a
// replication connection accepts.
func ReadSlotSimple(ctx context.Context, conn *pgconn.PgConn, slot string) (*Slot, pglogrepl.LSN, error) {
	literal := "'" + strings.ReplaceAll(slot, "'", "''") + "'"
	res, err := conn.Exec(ctx, strings.Replace(slotSQL, "$1", literal, 1)).ReadAll()
	if err != nil {
		return nil, 0, fmt.Errorf("read slot %q: %w", slot, err)
	}
	if len(res) != 1 || len(res[0].Rows) != 1 {
		return nil, 0, fmt.Errorf("read slot %q: no row", slot)
	}
	row := res[0].Rows[0]
	v := make([]*string, len(row))
	for i, b := range row {
		if b != nil {
			s := string(b)
			v[i] = &s
		}
	}
	return parseSlot(slot, v)
}

// slotColumns is the number of columns of slotSQL.
const slotColumns = 14

func parseSlot(name string, v []*string) (*Slot, pglogrepl.LSN, error) {
	if len(v) != slotColumns {
		return nil, 0, fmt.Errorf("read slot %q: %d columns", name, len(v))
	}
	text := func(i int) string {
		if v[i] == nil {
			return ""
		}
		return *v[i]
	}
	lsn := func(i int) (*pglogrepl.LSN, error) {
		if v[i] == nil {
			return nil, nil
		}
		l, err := pglogrepl.ParseLSN(*v[i])
		if err != nil {
			return nil, fmt.Errorf("read slot %q: %w", name, err)
		}
		return &l, nil
	}
	current, err := lsn(11)
	if err != nil || current == nil {
		return nil, 0, fmt.Errorf("read slot %q: no WAL position: %v", name, err)
	}
	if text(0) != "true" {
		return nil, *current, nil
	}
	s := &Slot{Plugin: text(1), Database: text(2), Active: text(3) == "true", WALStatus: text(7),
		SameDatabase: text(9) == "true", CurrentDatabase: text(10), CurrentLSN: *current, Synced: text(13) == "true"}
	if v[12] != nil {
		failover := *v[12] == "true"
		s.Failover = &failover
	}
	if v[4] != nil {
		pid, err := strconv.ParseInt(*v[4], 10, 32)
		if err != nil {
			return nil, 0, fmt.Errorf("read slot %q: active_pid: %w", name, err)
		}
		s.ActivePID = int32(pid)
	}
	if s.RestartLSN, err = lsn(5); err != nil {
		return nil, 0, err
	}
	if s.ConfirmedFlush, err = lsn(6); err != nil {
		return nil, 0, err
	}
	if v[8] != nil {
		n, err := strconv.ParseInt(*v[8], 10, 64)
		if err != nil {
			return nil, 0, fmt.Errorf("read slot %q: safe_wal_size: %w", name, err)
		}
		s.SafeWALBytes = &n
	}
	return s, *current, nil
}

// FailoverSlotsMajor is the first PostgreSQL major with failover slots: a
// logical slot created or altered with FAILOVER true is synchronized to
// standbys with sync_replication_slots on, and survives a promotion.
const FailoverSlotsMajor = 17

// ServerMajor returns the major of the server a connection is to, from its
// server_version parameter; 0 when it cannot be read.
func ServerMajor(conn *pgconn.PgConn) int {
	var major int
	fmt.Sscanf(conn.ParameterStatus("server_version"), "%d", &major) //nolint:errcheck // 0 when unparsable
	return major
}

// CreateLogicalSlot creates a pgoutput slot over a replication connection,
// with snapshot (export, use or nothing, as CREATE_REPLICATION_SLOT's
// SNAPSHOT option), and FAILOVER true when failover is set. failover needs
// PostgreSQL 17 or later: the caller checks the server's major.
func CreateLogicalSlot(ctx context.Context, conn *pgconn.PgConn, slot, snapshot string, failover bool) (pglogrepl.CreateReplicationSlotResult, error) {
	opts := "SNAPSHOT '" + snapshot + "'"
	if failover {
		opts += ", FAILOVER true"
	}
	// The slot name follows the slot rule (a-z, 0-9, _): no quoting needed.
	return pglogrepl.ParseCreateReplicationSlot(conn.Exec(ctx, "CREATE_REPLICATION_SLOT "+slot+" LOGICAL pgoutput ("+opts+")"))
}

// AlterSlotFailover sets the failover property of an inactive slot over a
// replication connection (ALTER_REPLICATION_SLOT, PostgreSQL 17 and later).
func AlterSlotFailover(ctx context.Context, conn *pgconn.PgConn, slot string, failover bool) error {
	_, err := conn.Exec(ctx, "ALTER_REPLICATION_SLOT "+slot+" (FAILOVER "+strconv.FormatBool(failover)+")").ReadAll()
	if err != nil {
		return fmt.Errorf("set failover %t on slot %q: %w", failover, slot, err)
	}
	return nil
}
