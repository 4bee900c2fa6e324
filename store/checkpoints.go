package store

// The operator commands' statements on a slot's checkpoint row.

import (
	"context"
	"errors"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
)

// CheckpointAge is a slot's checkpoint row and how long ago it was written,
// by the server's clock.
type CheckpointAge struct {
	Checkpoint
	AgeSeconds float64
}

// ReadCheckpoint returns the checkpoint of slot with its age, or
// ErrNoCheckpoint. Routing and ConfirmsRecorded are not read.
func (t Tables) ReadCheckpoint(ctx context.Context, slot string) (CheckpointAge, error) {
	cp := CheckpointAge{Checkpoint: Checkpoint{Slot: slot}}
	err := t.q.QueryRow(ctx, `SELECT lsn, system_identifier, timeline, catchup_pending, updated_at,
  extract(epoch FROM now() - updated_at)::float8
FROM `+t.own(CheckpointTable)+` WHERE slot_name = $1`, slot).
		Scan(&cp.LSN, &cp.SystemID, &cp.Timeline, &cp.CatchupPending, &cp.UpdatedAt, &cp.AgeSeconds)
	if errors.Is(err, pgx.ErrNoRows) {
		return cp, ErrNoCheckpoint
	}
	return cp, err
}

// HasCheckpoint reports whether slot has a checkpoint row.
func (t Tables) HasCheckpoint(ctx context.Context, slot string) (bool, error) {
	var ok bool
	err := t.q.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM `+t.own(CheckpointTable)+` WHERE slot_name = $1)`, slot).Scan(&ok)
	return ok, err
}

// CatchupPending returns the catchup_pending flag of slot's checkpoint;
// pgx.ErrNoRows when it has none.
func (t Tables) CatchupPending(ctx context.Context, slot string) (bool, error) {
	var pending bool
	err := t.q.QueryRow(ctx, `SELECT catchup_pending FROM `+t.own(CheckpointTable)+` WHERE slot_name = $1`, slot).Scan(&pending)
	return pending, err
}

// MarkCatchupPending sets catchup_pending on slot's checkpoint, so that the
// next start recreates the slot and catches up from the table. It reports
// whether there was a checkpoint.
func (t Tables) MarkCatchupPending(ctx context.Context, slot string) (bool, error) {
	tag, err := t.q.Exec(ctx, `UPDATE `+t.own(CheckpointTable)+` SET catchup_pending = true, updated_at = now() WHERE slot_name = $1`, slot)
	return tag.RowsAffected() == 1, err
}

// DeleteCheckpoint deletes slot's checkpoint and reports whether there was
// one.
func (t Tables) DeleteCheckpoint(ctx context.Context, slot string) (bool, error) {
	tag, err := t.q.Exec(ctx, `DELETE FROM `+t.own(CheckpointTable)+` WHERE slot_name = $1`, slot)
	return tag.RowsAffected() == 1, err
}

// AdvanceCheckpoint moves slot's checkpoint forward to lsn (never back) and
// reports whether there was one.
func (t Tables) AdvanceCheckpoint(ctx context.Context, slot string, lsn pglogrepl.LSN) (bool, error) {
	tag, err := t.q.Exec(ctx, `UPDATE `+t.own(CheckpointTable)+` SET lsn = greatest(lsn, $2::pg_lsn), updated_at = now() WHERE slot_name = $1`, slot, lsn.String())
	return tag.RowsAffected() == 1, err
}
