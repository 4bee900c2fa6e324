package cdc

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/outboxd/outboxd/store"
)

// replicationReadBuffer is the read buffer of the replication connection.
const replicationReadBuffer = 64 << 10

// connect opens a replication (or a regular) connection with the session
// settings decode relies on: UTC timestamps in ISO format.
func (r *Reader) connect(ctx context.Context, replication bool) (*pgconn.PgConn, error) {
	cfg, err := pgconn.ParseConfig(r.cfg.ConnString)
	if err != nil {
		return nil, fmt.Errorf("parse database URL: %w", redactParseError(err))
	}
	if replication {
		cfg.RuntimeParams["replication"] = "database"
		// The stream is read in chunks of up to replicationReadBuffer bytes
		// instead of pgproto3's 8 KiB: a draining session reads a hundred
		// rows per system call instead of a dozen, and hands them to the
		// router with one wake-up (stream.emit).
		cfg.BuildFrontend = func(r io.Reader, w io.Writer) *pgproto3.Frontend {
			return pgproto3.NewFrontend(bufio.NewReaderSize(r, replicationReadBuffer), w)
		}
	}
	cfg.RuntimeParams["application_name"] = "outboxd"
	cfg.RuntimeParams["TimeZone"] = "UTC"
	cfg.RuntimeParams["DateStyle"] = "ISO, YMD"
	cfg.RuntimeParams["extra_float_digits"] = "1"
	if cfg.ConnectTimeout == 0 {
		cfg.ConnectTimeout = 10 * time.Second
	}
	conn, err := pgconn.ConnectConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("connect: %w", err)
	}
	return conn, nil
}

// redactParseError drops the connection string pgconn may quote when it
// cannot parse it: it can hold a password.
func redactParseError(err error) error {
	var pe *pgconn.ParseConfigError
	if errors.As(err, &pe) {
		return errors.New("invalid connection string")
	}
	return err
}

// querySlot reads the slot's row; nil when there is none. A slot of another
// database with the same name is irreconcilable.
func querySlot(ctx context.Context, conn *pgconn.PgConn, slot string) (*store.Slot, error) {
	s, _, err := store.ReadSlotSimple(ctx, conn, slot)
	if err != nil || s == nil {
		return nil, err
	}
	if !s.SameDatabase {
		return nil, fmt.Errorf("%w: slot %q belongs to database %q, connected to %q", ErrIrreconcilable, slot, s.Database, s.CurrentDatabase)
	}
	return s, nil
}

// prepare reconciles the slot with the stored checkpoint and returns where to
// start streaming, plus a snapshot to catch up from when the slot was created.
func (r *Reader) prepare(ctx context.Context, conn *pgconn.PgConn, sys pglogrepl.IdentifySystemResult) (pglogrepl.LSN, *snapshot, error) {
	r.sysID, r.timeline = sys.SystemID, sys.Timeline
	// Instances sharing the slot prepare it one at a time: without this, a
	// standby could see a slot another instance has just created (and not
	// yet recorded) and recreate it under it.
	slot, err := querySlot(ctx, conn, r.cfg.Slot)
	if err != nil {
		return 0, nil, err
	}
	if slot != nil && slot.Active {
		return 0, nil, errRetry{fmt.Sprintf("slot %q is active in process %d", r.cfg.Slot, slot.ActivePID)}
	}
	if major := store.ServerMajor(conn); r.cfg.SlotFailover && major < store.FailoverSlotsMajor && !r.failoverNoted {
		r.failoverNoted = true
		r.log.Info().Int("server_major", major).Msg("OUTBOXD_SLOT_FAILOVER ignored: failover slots need PostgreSQL 17 or later; after a promotion the slot is recreated and caught up from the table (OUTBOXD_SLOT_RECREATE)")
	}
	cp, err := r.store.Load(ctx)
	haveCP := err == nil
	if err != nil && !errors.Is(err, store.ErrNoCheckpoint) {
		return 0, nil, err
	}
	if haveCP && cp.SystemID != sys.SystemID {
		return 0, nil, fmt.Errorf("%w: the checkpoint of slot %q was written on cluster %s but this server is cluster %s; run `outboxd slot reset --yes` to recreate the slot and deliver every unprocessed row from the table",
			ErrIrreconcilable, r.cfg.Slot, cp.SystemID, sys.SystemID)
	}
	log := r.log.With().Bool("checkpoint", haveCP).Stringer("checkpoint_lsn", cp.LSN).Logger()
	promoted := haveCP && sys.Timeline > cp.Timeline
	if promoted {
		// Same cluster, a later timeline: a standby was promoted (or the
		// cluster recovered to a point in time) since the checkpoint was
		// written. The checkpoint and the rows' marks came along with the
		// WAL; the slot did only if it was synchronized (failover slots,
		// PostgreSQL 17 and later).
		log.Warn().Int32("checkpoint_timeline", cp.Timeline).Int32("timeline", sys.Timeline).Bool("slot_present", slot != nil).
			Msg("the server was promoted since the checkpoint (same system identifier, later timeline)")
	}
	switch {
	case slot == nil && !haveCP:
		log.Info().Msg("creating slot (first start)")
	case slot == nil || slot.WALStatus == "lost":
		what := "is missing"
		if slot != nil {
			what = "was invalidated (wal_status lost)"
		}
		if promoted && slot == nil {
			what = fmt.Sprintf("is missing on this promoted server (timeline %d, the checkpoint's %d): it was not synchronized to the standby (failover slots need PostgreSQL 17 and sync_replication_slots on the standby; see `outboxd status`)",
				sys.Timeline, cp.Timeline)
		}
		if !r.cfg.SlotRecreate {
			return 0, nil, fmt.Errorf("%w: slot %q %s although a checkpoint exists; set OUTBOXD_SLOT_RECREATE=true or run `outboxd slot reset --yes` to recreate it and deliver every unprocessed row from the table",
				ErrIrreconcilable, r.cfg.Slot, what)
		}
		log.Warn().Str("slot_state", what).Msg("recreating slot; unprocessed rows will be caught up from the table")
	case slot.Plugin != "pgoutput":
		return 0, nil, fmt.Errorf("%w: slot %q uses plugin %q, outboxd needs pgoutput", ErrIrreconcilable, r.cfg.Slot, slot.Plugin)
	case !haveCP:
		log.Warn().Msg("slot exists without a checkpoint; recreating it and catching up from the table")
	case cp.CatchupPending:
		log.Warn().Msg("the previous catch-up did not finish; recreating the slot and catching up again")
	case cp.ConfirmsRecorded && slot.Confirmed() > cp.LSN:
		// outboxd records every position before confirming it: a slot ahead
		// of the checkpoint was advanced by someone else (pg_replication_slot_advance,
		// another consumer), and whatever it passed may never have been
		// delivered. Streaming from there would skip those rows silently.
		what := fmt.Sprintf("confirms %s, beyond the checkpoint %s: it was advanced outside outboxd, past rows that may not have been delivered", slot.Confirmed(), cp.LSN)
		if !r.cfg.SlotRecreate {
			return 0, nil, fmt.Errorf("%w: slot %q %s; run `outboxd slot reset --yes` (or set OUTBOXD_SLOT_RECREATE=true) to recreate it and deliver every unprocessed row from the table",
				ErrIrreconcilable, r.cfg.Slot, what)
		}
		log.Warn().Str("slot_state", what).Msg("recreating slot; unprocessed rows will be caught up from the table")
	default:
		if cp.Timeline > sys.Timeline {
			log.Warn().Int32("checkpoint_timeline", cp.Timeline).Int32("timeline", sys.Timeline).Msg("the server's timeline is older than the checkpoint's")
		}
		if promoted {
			// A synchronized slot may confirm less than the checkpoint
			// (it is copied every few seconds): streaming starts at the
			// checkpoint, and what lies between was delivered already.
			if err := r.store.SetTimeline(ctx, sys.SystemID, sys.Timeline); err != nil {
				return 0, nil, err
			}
			log.Info().Bool("synced", slot.Synced).Stringer("confirmed_flush_lsn", slot.Confirmed()).Msg("continuing from the slot synchronized before the promotion")
		}
		if err := r.syncFailover(ctx, conn, slot); err != nil {
			return 0, nil, err
		}
		start := max(cp.LSN, slot.Confirmed())
		log.Info().Stringer("confirmed_flush_lsn", slot.Confirmed()).Str("wal_status", slot.WALStatus).Stringer("start_lsn", start).Msg("slot and checkpoint reconciled")
		return start, nil, nil
	}
	if slot != nil {
		if err := pglogrepl.DropReplicationSlot(ctx, conn, r.cfg.Slot, pglogrepl.DropReplicationSlotOptions{Wait: true}); err != nil {
			return 0, nil, fmt.Errorf("drop slot %q: %w", r.cfg.Slot, err)
		}
	}
	// Creating a logical slot waits for every transaction running in the
	// cluster to end: say so while it waits, rather than look stuck.
	waiting := time.AfterFunc(5*time.Second, func() {
		r.log.Warn().Msg("creating the slot waits for transactions still running in the cluster (see pg_stat_activity: idle in transaction)")
	})
	var res pglogrepl.CreateReplicationSlotResult
	if failover := r.failover(conn); failover {
		res, err = store.CreateLogicalSlot(ctx, conn, r.cfg.Slot, "export", true)
	} else {
		res, err = pglogrepl.CreateReplicationSlot(ctx, conn, r.cfg.Slot, "pgoutput",
			pglogrepl.CreateReplicationSlotOptions{SnapshotAction: "EXPORT_SNAPSHOT", Mode: pglogrepl.LogicalReplication})
	}
	waiting.Stop()
	if err != nil {
		return 0, nil, fmt.Errorf("create slot %q: %w", r.cfg.Slot, err)
	}
	consistent, err := pglogrepl.ParseLSN(res.ConsistentPoint)
	if err != nil {
		return 0, nil, fmt.Errorf("parse consistent point of slot %q: %w", r.cfg.Slot, err)
	}
	if err := r.store.Save(ctx, store.Checkpoint{LSN: consistent, SystemID: sys.SystemID, Timeline: sys.Timeline, CatchupPending: true}); err != nil {
		return 0, nil, err
	}
	r.log.Info().Stringer("consistent_lsn", consistent).Bool("failover", r.failover(conn)).Msg("slot created")
	return consistent, &snapshot{r: r, name: res.SnapshotName, lsn: consistent}, nil
}

// failover reports whether the slot is to have failover set: asked for
// (OUTBOXD_SLOT_FAILOVER) and possible (PostgreSQL 17 or later).
func (r *Reader) failover(conn *pgconn.PgConn) bool {
	return r.cfg.SlotFailover && store.ServerMajor(conn) >= store.FailoverSlotsMajor
}

// syncFailover makes an existing slot's failover property what
// OUTBOXD_SLOT_FAILOVER asks for, on PostgreSQL 17 and later (a slot made by
// an older outboxd, or before an upgrade, has none). The slot is inactive:
// prepare runs before streaming, under the slot lock.
func (r *Reader) syncFailover(ctx context.Context, conn *pgconn.PgConn, slot *store.Slot) error {
	if store.ServerMajor(conn) < store.FailoverSlotsMajor || slot.Failover == nil {
		return nil
	}
	if *slot.Failover == r.cfg.SlotFailover || slot.Synced {
		return nil
	}
	if err := store.AlterSlotFailover(ctx, conn, r.cfg.Slot, r.cfg.SlotFailover); err != nil {
		return err
	}
	r.log.Info().Bool("failover", r.cfg.SlotFailover).Msg("slot failover set as OUTBOXD_SLOT_FAILOVER asks")
	return nil
}
