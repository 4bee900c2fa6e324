package ops

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// create makes the slot behind a pending checkpoint, once; a dry run changes
// nothing.
func TestCreateSlot(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	b.insert(t, 4, "a", 1, time.Now())

	res, err := b.client.CreateSlot(ctx, SlotOptions{DryRun: true})
	require.NoError(t, err)
	require.True(t, res.DryRun)
	require.EqualValues(t, 4, *res.RowsToReread)
	require.False(t, b.slot(t).exists, "dry run created the slot")
	require.False(t, b.checkpoint(t).exists)

	res, err = b.client.CreateSlot(ctx, SlotOptions{})
	require.NoError(t, err)
	require.False(t, res.Unchanged)
	s, cp := b.slot(t), b.checkpoint(t)
	require.True(t, s.exists)
	require.True(t, cp.exists)
	require.True(t, cp.pending, "the next run must catch up from the table")
	require.Equal(t, s.confirmed, cp.lsn)
	require.Equal(t, LSN(cp.lsn), *res.LSN)
	var sysID string
	require.NoError(t, b.pool.QueryRow(ctx, `SELECT system_identifier::text FROM pg_control_system()`).Scan(&sysID))
	require.Equal(t, sysID, cp.sysID)

	res, err = b.client.CreateSlot(ctx, SlotOptions{})
	require.NoError(t, err)
	require.True(t, res.Unchanged)
	require.Equal(t, cp, b.checkpoint(t), "an existing slot is left alone")
}

// A lost slot's checkpoint (slot dropped behind outboxd's back) is marked for
// catch-up by create, so nothing committed since is skipped.
func TestCreateSlotAfterLossMarksCatchup(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	_, err := b.client.CreateSlot(ctx, SlotOptions{})
	require.NoError(t, err)
	b.exec(t, `UPDATE outboxd_checkpoint SET catchup_pending = false`)
	b.exec(t, `SELECT pg_drop_replication_slot($1)`, b.target.Slot)
	_, err = b.client.CreateSlot(ctx, SlotOptions{})
	require.NoError(t, err)
	require.True(t, b.slot(t).exists)
	require.True(t, b.checkpoint(t).pending)
}

// drop removes the slot and its checkpoint; a dry run changes nothing.
func TestDropSlot(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	_, err := b.client.CreateSlot(ctx, SlotOptions{})
	require.NoError(t, err)
	b.insert(t, 2, "a", 1, time.Now())

	res, err := b.client.DropSlot(ctx, SlotOptions{DryRun: true})
	require.NoError(t, err)
	require.EqualValues(t, 2, *res.RowsToReread)
	require.True(t, b.slot(t).exists)
	require.True(t, b.checkpoint(t).exists)

	res, err = b.client.DropSlot(ctx, SlotOptions{})
	require.NoError(t, err)
	require.False(t, res.Unchanged)
	require.False(t, b.slot(t).exists)
	require.False(t, b.checkpoint(t).exists)

	res, err = b.client.DropSlot(ctx, SlotOptions{})
	require.NoError(t, err)
	require.True(t, res.Unchanged)
}

// A slot streamed by another process is refused, dry run included, unless
// forced; forced, its backend is terminated first.
func TestActiveSlotNeedsForce(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	_, err := b.client.CreateSlot(ctx, SlotOptions{})
	require.NoError(t, err)
	b.hold(t)

	for name, op := range map[string]func(SlotOptions) (*SlotResult, error){
		"drop":    func(o SlotOptions) (*SlotResult, error) { return b.client.DropSlot(ctx, o) },
		"reset":   func(o SlotOptions) (*SlotResult, error) { return b.client.ResetSlot(ctx, o) },
		"advance": func(o SlotOptions) (*SlotResult, error) { return b.client.AdvanceSlot(ctx, LSN(b.currentLSN(t)), o) },
	} {
		for _, dry := range []bool{true, false} {
			_, err := op(SlotOptions{DryRun: dry})
			require.ErrorIs(t, err, ErrRefused, "%s dry=%v", name, dry)
			require.ErrorContains(t, err, "--force")
		}
	}
	require.True(t, b.slot(t).exists)
	require.True(t, b.slot(t).active)

	res, err := b.client.DropSlot(ctx, SlotOptions{DryRun: true, Force: true})
	require.NoError(t, err)
	require.True(t, b.slot(t).active, "a dry run terminates nothing")
	require.Contains(t, res.Steps[0], "terminate process")

	res, err = b.client.DropSlot(ctx, SlotOptions{Force: true})
	require.NoError(t, err)
	require.Len(t, res.Terminated, 1)
	require.False(t, b.slot(t).exists)
	require.False(t, b.checkpoint(t).exists)

	// A forced reset leaves neither slot nor checkpoint: the terminated
	// instance must stop, not stream from a slot without a catch-up.
	_, err = b.client.CreateSlot(ctx, SlotOptions{})
	require.NoError(t, err)
	b.hold(t)
	res, err = b.client.ResetSlot(ctx, SlotOptions{Force: true})
	require.NoError(t, err)
	require.Len(t, res.Terminated, 1)
	require.Contains(t, strings.Join(res.Steps, "\n"), "left it dropped")
	require.False(t, b.slot(t).exists)
	require.False(t, b.checkpoint(t).exists)
}

// reset drops and recreates the slot behind a pending checkpoint on this
// cluster, and counts the rows the next run reads again: unprocessed ones
// without a dead letter.
func TestResetSlot(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	_, err := b.client.CreateSlot(ctx, SlotOptions{})
	require.NoError(t, err)
	ids := b.insert(t, 10, "a", 1, time.Now())
	b.exec(t, `UPDATE domain_event SET is_processed = true, processed_at = now() WHERE id = ANY($1)`, ids[:3])
	b.exec(t, `INSERT INTO outboxd_dead_letter (event_id, sink, last_error, attempts) VALUES ($1, 'webhook', 'HTTP 400', 1)`, ids[3])
	// As if restored from another cluster's backup, and not pending.
	b.exec(t, `UPDATE outboxd_checkpoint SET system_identifier = '42', catchup_pending = false`)
	before := b.slot(t)

	res, err := b.client.ResetSlot(ctx, SlotOptions{DryRun: true})
	require.NoError(t, err)
	require.EqualValues(t, 6, *res.RowsToReread)
	require.Equal(t, "42", b.checkpoint(t).sysID, "dry run changed the checkpoint")

	res, err = b.client.ResetSlot(ctx, SlotOptions{})
	require.NoError(t, err)
	require.EqualValues(t, 6, *res.RowsToReread)
	after, cp := b.slot(t), b.checkpoint(t)
	require.True(t, after.exists)
	require.Greater(t, after.confirmed, before.confirmed, "a new slot")
	require.True(t, cp.pending)
	require.Equal(t, after.confirmed, cp.lsn)
	require.NotEqual(t, "42", cp.sysID)
	st, err := b.client.Status(ctx, StatusOptions{})
	require.NoError(t, err)
	require.True(t, st.OK, "after a reset: %v", st.Problems)

	// A lost or missing slot is reset too.
	b.exec(t, `SELECT pg_drop_replication_slot($1)`, b.target.Slot)
	_, err = b.client.ResetSlot(ctx, SlotOptions{})
	require.NoError(t, err)
	require.True(t, b.slot(t).exists)
}

// advance moves the slot and the checkpoint forward only.
func TestAdvanceSlot(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	_, err := b.client.CreateSlot(ctx, SlotOptions{})
	require.NoError(t, err)
	b.exec(t, `UPDATE outboxd_checkpoint SET catchup_pending = false`)
	from := b.slot(t).confirmed
	b.insert(t, 100, "a", 1, time.Now())
	to := b.currentLSN(t)

	res, err := b.client.AdvanceSlot(ctx, LSN(to), SlotOptions{DryRun: true})
	require.NoError(t, err)
	require.Equal(t, from, b.slot(t).confirmed, "dry run moved the slot")
	require.Equal(t, LSN(to), *res.LSN)

	_, err = b.client.AdvanceSlot(ctx, LSN(to+1<<30), SlotOptions{})
	require.ErrorIs(t, err, ErrRefused, "beyond the current WAL position")

	res, err = b.client.AdvanceSlot(ctx, LSN(to), SlotOptions{})
	require.NoError(t, err)
	require.Equal(t, LSN(from), *res.FromLSN)
	require.Equal(t, to, b.slot(t).confirmed)
	require.Equal(t, to, b.checkpoint(t).lsn, "the checkpoint follows the slot")

	_, err = b.client.AdvanceSlot(ctx, LSN(from), SlotOptions{})
	require.True(t, errors.Is(err, ErrRefused), "backwards: %v", err)
	require.ErrorContains(t, err, "forward only")
	require.Equal(t, to, b.slot(t).confirmed)

	res, err = b.client.AdvanceSlot(ctx, LSN(to), SlotOptions{})
	require.NoError(t, err)
	require.True(t, res.Unchanged)
}

// The slot commands take the daemon's advisory lock of the slot: while an
// instance prepares the slot (holding it), they wait, then give up.
func TestSlotCommandsTakeTheDaemonsLock(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	conn, err := b.pool.Acquire(ctx)
	require.NoError(t, err)
	defer conn.Release()
	_, err = conn.Exec(ctx, `SELECT pg_advisory_lock(hashtext('outboxd slot ' || $1))`, b.target.Slot)
	require.NoError(t, err)

	_, err = b.client.ResetSlot(ctx, SlotOptions{Wait: 200 * time.Millisecond})
	require.ErrorIs(t, err, ErrRefused)
	require.ErrorContains(t, err, "preparing slot")
	require.False(t, b.slot(t).exists)

	_, err = conn.Exec(ctx, `SELECT pg_advisory_unlock(hashtext('outboxd slot ' || $1))`, b.target.Slot)
	require.NoError(t, err)
	_, err = b.client.ResetSlot(ctx, SlotOptions{Wait: 200 * time.Millisecond})
	require.NoError(t, err)
	require.True(t, b.slot(t).exists)
}
