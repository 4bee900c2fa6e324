package ops

// The slot commands and why they are safe.
//
// cdc.Reader.prepare decides at start-up, from the slot and the checkpoint:
//   - no slot, no checkpoint: first start; create the slot with an exported
//     snapshot and catch up every unprocessed row from the table;
//   - slot present, checkpoint absent or catchup_pending: drop the slot,
//     recreate it with a snapshot and catch up;
//   - no slot (or a lost one) but a checkpoint: refuse, unless
//     OUTBOXD_SLOT_RECREATE=true, which recreates and catches up;
//   - both present and catchup_pending false: stream from
//     max(checkpoint LSN, confirmed_flush_lsn).
//
// The exported snapshot only lives as long as the replication connection
// that made it, and the catch-up must deliver what it reads, so only the
// daemon can do a snapshot catch-up. `slot create` and `slot reset` therefore
// create the slot (NOEXPORT_SNAPSHOT) behind a checkpoint with
// catchup_pending = true: the next `outboxd run` drops that slot, recreates it
// with a snapshot and delivers every unprocessed row. Recreating is cheap and
// is the daemon's one code path for catch-ups, which also seeds any state the
// daemon keeps with the checkpoint (routing of subscriptions). Skipping the
// catch-up when the table has no unprocessed row would be exact for the
// outbox rows but not for that state, so create never does.
//
// Order of writes, so that a crash between any two steps stays safe:
//  1. mark the existing checkpoint catchup_pending (before the old slot goes:
//     a checkpoint that is not pending next to a new slot would make the
//     daemon stream from the new slot and skip what was committed in between);
//  2. drop the old slot;
//  3. create the new slot;
//  4. save the checkpoint at the new slot's position, still pending.
//
// After 1 or 2 only, the daemon finds a pending checkpoint and no slot: it
// refuses with a message naming `outboxd slot reset --yes`, which finishes
// the job. After 3, it finds a slot and a pending checkpoint: it catches up.
//
// Every change is made holding the advisory lock the daemon takes while it
// prepares and starts the slot, so no instance looks at the slot half-way.
// A running instance is never left streaming from a slot it did not prepare:
// see ResetSlot.

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"

	"github.com/outboxd/outboxd/cdc"
	"github.com/outboxd/outboxd/store"
)

// SlotOptions control the commands that change the slot.
type SlotOptions struct {
	// DryRun reports what would be done and changes nothing.
	DryRun bool
	// Force terminates the backend holding the slot (pg_terminate_backend)
	// instead of refusing to act on an active slot.
	Force bool
	// Wait bounds how long a command waits for the slot's advisory lock (held
	// by an instance preparing the slot) and, with Force, keeps freeing the
	// slot (an outboxd standby may take it again at once); default 15s.
	Wait time.Duration
}

// DefaultSlotWait is SlotOptions.Wait by default.
const DefaultSlotWait = 15 * time.Second

// SlotResult is what a slot command did, or would do with DryRun.
type SlotResult struct {
	Slot string `json:"slot"`
	// OK is false when the command failed or was refused (Refused, Error
	// say so); the other fields then say what was found and done before.
	OK      bool   `json:"ok"`
	Refused bool   `json:"refused,omitempty"`
	Error   string `json:"error,omitempty"`
	DryRun  bool   `json:"dry_run"`
	// Unchanged is true when there was nothing to do.
	Unchanged bool `json:"unchanged"`
	// Steps say what was done (or would be), in order, for people.
	Steps []string `json:"steps"`
	// Terminated lists the backends terminated to free the slot.
	Terminated []int32 `json:"terminated"`
	// RowsToReread is the number of unprocessed, not dead-lettered rows the
	// next `outboxd run` reads from the table (create, drop, reset).
	RowsToReread *int64 `json:"rows_to_reread,omitempty"`
	// FromLSN is the slot's confirmed_flush_lsn before the command; LSN is the
	// new slot's position (create, reset) or where advance moved it.
	FromLSN *LSN `json:"from_lsn,omitempty"`
	LSN     *LSN `json:"lsn,omitempty"`
}

func (r *SlotResult) step(format string, args ...any) {
	r.Steps = append(r.Steps, fmt.Sprintf(format, args...))
}

// withDefaults returns a copy of o with the defaults filled in.
func (o SlotOptions) withDefaults() SlotOptions {
	o.Wait = cmp.Or(o.Wait, DefaultSlotWait)
	return o
}

// lockSlot takes the slot's advisory lock on a connection of its own, waiting
// at most wait; unlock closes that connection, which releases it.
func (c *Client) lockSlot(ctx context.Context, wait time.Duration) (unlock func(), err error) {
	conn, err := pgx.ConnectConfig(ctx, c.pool.Config().ConnConfig.Copy())
	if err != nil {
		return nil, fmt.Errorf("connect to lock slot %q: %w", c.t.Slot, err)
	}
	unlock = func() { conn.Close(context.WithoutCancel(ctx)) } //nolint:errcheck // closing releases the lock
	if _, err := conn.Exec(ctx, fmt.Sprintf("SET lock_timeout = %d", wait.Milliseconds())); err != nil {
		unlock()
		return nil, fmt.Errorf("lock slot %q: %w", c.t.Slot, err)
	}
	_, err = conn.Exec(ctx, `SELECT pg_advisory_lock(hashtext($1))`, cdc.SlotLockKey(c.t.Slot))
	if sqlState(err) == "55P03" { // lock_not_available: lock_timeout
		unlock()
		return nil, refused("an outboxd instance has been preparing slot %q for more than %s (it holds the slot's lock): try again, or stop it", c.t.Slot, wait)
	}
	if err != nil {
		unlock()
		return nil, fmt.Errorf("lock slot %q: %w", c.t.Slot, err)
	}
	return unlock, nil
}

// checkOwnSlot refuses to act on a slot that is not outboxd's to touch.
func (c *Client) checkOwnSlot(s *store.Slot) error {
	if s != nil && !s.SameDatabase {
		return refused("slot %q belongs to database %q, not this one: another deployment uses this slot name; set OUTBOXD_SLOT", c.t.Slot, s.Database)
	}
	return nil
}

// requireTables refuses when outboxd's tables are missing.
func (c *Client) requireTables(ctx context.Context) error {
	ok, err := c.tables().Migrated(ctx)
	if err != nil {
		return err
	}
	if !ok {
		return refused("outboxd's tables are missing in schema %q: run `outboxd migrate` first", c.t.schema())
	}
	return nil
}

// hasCheckpoint reports whether the slot has a checkpoint row.
func (c *Client) hasCheckpoint(ctx context.Context) (bool, error) {
	ok, err := c.tables().HasCheckpoint(ctx, c.t.Slot)
	if err != nil {
		return false, fmt.Errorf("read checkpoint of slot %q: %w", c.t.Slot, err)
	}
	return ok, nil
}

// rereadFacts sets res.RowsToReread to the rows the next catch-up reads and
// reports whether the slot has a checkpoint.
func (c *Client) rereadFacts(ctx context.Context, res *SlotResult) (hadCP bool, err error) {
	pending, err := c.PendingRows(ctx)
	if err != nil {
		return false, err
	}
	res.RowsToReread = &pending
	return c.hasCheckpoint(ctx)
}

// catchupFacts refuses when outboxd's tables are missing, then sets
// res.RowsToReread as rereadFacts does and returns it too.
func (c *Client) catchupFacts(ctx context.Context, res *SlotResult) (hadCP bool, pending int64, err error) {
	if err := c.requireTables(ctx); err != nil {
		return false, 0, err
	}
	if hadCP, err = c.rereadFacts(ctx, res); err != nil {
		return false, 0, err
	}
	return hadCP, *res.RowsToReread, nil
}

// PendingRows counts the rows a catch-up reads (store.PendingPredicate). It
// scans the table.
func (c *Client) PendingRows(ctx context.Context) (int64, error) {
	cols, err := c.columns(ctx)
	if err != nil {
		return 0, err
	}
	if !cols[store.ProcessedColumn] {
		return 0, fmt.Errorf("table %s has no is_processed column: run `outboxd migrate`", c.t.Table)
	}
	scope, err := c.tables().PresentScope(ctx)
	if err != nil {
		return 0, err
	}
	n, err := c.tables().CountPending(ctx, scope)
	if err != nil {
		return 0, fmt.Errorf("count unprocessed rows: %w", err)
	}
	return n, nil
}

// released runs act once the slot is not held by another process. Without
// Force an active slot is refused; with Force its holder is terminated, again
// if a standby takes it meanwhile, until opts.Wait has passed.
func (c *Client) released(ctx context.Context, opts SlotOptions, res *SlotResult, act func(context.Context) error) error {
	deadline := time.Now().Add(opts.Wait)
	for {
		s, err := c.readSlot(ctx)
		if err != nil {
			return err
		}
		busy := s != nil && s.Active
		if !busy {
			err = act(ctx)
			if sqlState(err) != "55006" { // object_in_use: taken between our look and our act
				return err
			}
			if !opts.Force {
				return refused("slot %q was taken by another process meanwhile: stop the outboxd instances using it, or add --force", c.t.Slot)
			}
		} else if !opts.Force {
			return c.activeRefusal(s)
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("slot %q is still taken after %s of terminating its holder: stop the outboxd instances using it", c.t.Slot, opts.Wait)
		}
		if busy {
			if err := c.terminate(ctx, pidOf(s), res); err != nil {
				return err
			}
		}
		// Give the walsender a moment to exit and release the slot.
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// activeRefusal is the error for acting on a slot another process streams
// from without --force.
func (c *Client) activeRefusal(s *store.Slot) error {
	return refused("slot %q is active in process %d (an outboxd instance is streaming from it): stop it first, or add --force to terminate that backend", c.t.Slot, pidOf(s))
}

func pidOf(s *store.Slot) int32 {
	if s == nil || s.ActivePID == 0 {
		return 0
	}
	return s.ActivePID
}

func (c *Client) terminate(ctx context.Context, pid int32, res *SlotResult) error {
	if pid == 0 {
		return nil
	}
	var ok bool
	if err := c.pool.QueryRow(ctx, `SELECT pg_terminate_backend($1)`, pid).Scan(&ok); err != nil {
		return fmt.Errorf("terminate process %d holding slot %q: %w", pid, c.t.Slot, err)
	}
	for _, p := range res.Terminated {
		if p == pid {
			return nil
		}
	}
	res.Terminated = append(res.Terminated, pid)
	res.step("terminated process %d, which held the slot", pid)
	c.log.Warn().Int32("pid", pid).Msg("terminated the backend holding the slot")
	return nil
}

// markPendingAndDrop sets catchup_pending on the slot's checkpoint (or,
// with forget, deletes the checkpoint), if it has one, and drops the slot, if
// there is one, in one transaction: the drop is refused while the slot is
// active, and then the checkpoint change is rolled back too.
func (c *Client) markPendingAndDrop(ctx context.Context, drop, forget bool) (changed bool, err error) {
	err = pgx.BeginFunc(ctx, c.pool, func(tx pgx.Tx) error {
		tables := store.On(tx, c.t.schema(), c.t.Table.Name)
		var err error
		if forget {
			changed, err = tables.DeleteCheckpoint(ctx, c.t.Slot)
		} else {
			changed, err = tables.MarkCatchupPending(ctx, c.t.Slot)
		}
		if err != nil {
			return fmt.Errorf("mark checkpoint of slot %q for catch-up: %w", c.t.Slot, err)
		}
		if drop {
			if err := dropSlot(ctx, tx, c.t.Slot); err != nil {
				return err
			}
		}
		return nil
	})
	return changed, err
}

// dropSlot drops the slot in tx if it is there, whatever its state when we
// looked.
func dropSlot(ctx context.Context, tx pgx.Tx, slot string) error {
	if _, err := tx.Exec(ctx, `SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1`, slot); err != nil {
		return fmt.Errorf("drop slot %q: %w", slot, err)
	}
	return nil
}

// createSlot creates the pgoutput slot on a replication connection and saves
// a checkpoint at its consistent point with catchup_pending = true.
func (c *Client) createSlot(ctx context.Context, res *SlotResult) error {
	conn, err := c.replConn(ctx)
	if err != nil {
		return err
	}
	defer conn.Close(context.WithoutCancel(ctx)) //nolint:errcheck // done with it
	sys, err := pglogrepl.IdentifySystem(ctx, conn)
	if err != nil {
		return fmt.Errorf("identify system: %w", err)
	}
	var cr pglogrepl.CreateReplicationSlotResult
	failover := c.t.SlotFailover && store.ServerMajor(conn) >= store.FailoverSlotsMajor
	if failover {
		cr, err = store.CreateLogicalSlot(ctx, conn, c.t.Slot, "nothing", true)
	} else {
		cr, err = pglogrepl.CreateReplicationSlot(ctx, conn, c.t.Slot, "pgoutput",
			pglogrepl.CreateReplicationSlotOptions{SnapshotAction: "NOEXPORT_SNAPSHOT", Mode: pglogrepl.LogicalReplication})
	}
	if sqlState(err) == "42710" { // duplicate_object
		return refused("slot %q was created meanwhile by another process (an outboxd instance with OUTBOXD_SLOT_RECREATE=true?); it does its own catch-up, nothing more to do", c.t.Slot)
	}
	if err != nil {
		return fmt.Errorf("create slot %q: %w", c.t.Slot, err)
	}
	lsn, err := pglogrepl.ParseLSN(cr.ConsistentPoint)
	if err != nil {
		return fmt.Errorf("parse consistent point of slot %q: %w", c.t.Slot, err)
	}
	res.LSN = lsnPtr(lsn)
	res.step("created slot %q (pgoutput, failover %t) at %s", c.t.Slot, failover, lsn)
	cps := store.NewSlotStore(c.pool, store.SlotConfig{Schema: c.t.schema(), Table: c.t.Table.Name, Slot: c.t.Slot})
	if err := cps.Save(ctx, store.Checkpoint{LSN: lsn, SystemID: sys.SystemID, Timeline: sys.Timeline, CatchupPending: true}); err != nil {
		return err
	}
	res.step("saved its checkpoint at %s with catchup_pending = true: the next `outboxd run` recreates the slot with a snapshot and delivers every unprocessed row", lsn)
	return nil
}

// slotChange is what a slot command changes: described by a dry run, made
// by a real one. Both go through (*Client).change, so that what a dry run
// says and what a real run does follow one path.
type slotChange struct {
	// free says the slot must not be held by another process while act
	// runs: without Force a held slot is refused, with it its holder is
	// terminated first (released), which a dry run reports.
	free bool
	// plan adds the steps a dry run reports after that; held says whether
	// the slot had a holder to terminate.
	plan func(held bool)
	// act makes the change under the slot's lock (and once the slot is
	// free, with free). Its error comes with the result when free (a
	// holder may have been terminated), without it otherwise.
	act func(ctx context.Context) error
	// after, when set, runs next, still under the lock, and reports what
	// was done; its error comes with the result.
	after func(ctx context.Context) error
}

// inspect applies opts' defaults and returns a command's result, to be
// filled, and the slot, refusing a slot that is not outboxd's to touch.
func (c *Client) inspect(ctx context.Context, opts *SlotOptions) (*SlotResult, *store.Slot, error) {
	*opts = opts.withDefaults()
	res := &SlotResult{Slot: c.t.Slot, DryRun: opts.DryRun, Steps: []string{}, Terminated: []int32{}}
	s, err := c.readSlot(ctx)
	if err != nil {
		return nil, nil, err
	}
	if err := c.checkOwnSlot(s); err != nil {
		return nil, nil, err
	}
	return res, s, nil
}

// change runs ch on slot s as found by inspect: with DryRun it only reports
// the steps it would take, otherwise it takes them.
func (c *Client) change(ctx context.Context, s *store.Slot, opts SlotOptions, res *SlotResult, ch slotChange) (*SlotResult, error) {
	held := ch.free && s != nil && s.Active
	if opts.DryRun {
		if held {
			if !opts.Force {
				return nil, c.activeRefusal(s)
			}
			res.step("terminate process %d, which holds the slot", pidOf(s))
		}
		ch.plan(held)
		return res, nil
	}
	unlock, err := c.lockSlot(ctx, opts.Wait)
	if err != nil {
		return nil, err
	}
	defer unlock()
	if !ch.free {
		if err := ch.act(ctx); err != nil {
			return nil, err
		}
	} else if err := c.released(ctx, opts, res, ch.act); err != nil {
		return res, err
	}
	if ch.after != nil {
		if err := ch.after(ctx); err != nil {
			return res, err
		}
	}
	return res, nil
}

// CreateSlot creates the slot when it is missing, behind a checkpoint that
// asks the next `outboxd run` for a catch-up from the table. An existing
// pgoutput slot is left alone.
func (c *Client) CreateSlot(ctx context.Context, opts SlotOptions) (*SlotResult, error) {
	res, s, err := c.inspect(ctx, &opts)
	if err != nil {
		return nil, err
	}
	if s != nil {
		switch {
		case s.Plugin != "pgoutput":
			return nil, refused("slot %q exists with plugin %q, outboxd needs pgoutput: run `outboxd slot reset --yes` to recreate it", c.t.Slot, s.Plugin)
		case s.WALStatus == "lost":
			return nil, refused("slot %q exists but was invalidated (wal_status lost): run `outboxd slot reset --yes` to recreate it", c.t.Slot)
		}
		res.Unchanged = true
		if s.ConfirmedFlush != nil {
			res.FromLSN = lsnPtr(*s.ConfirmedFlush)
		}
		res.step("slot %q already exists; nothing to do", c.t.Slot)
		return res, nil
	}
	hadCP, pending, err := c.catchupFacts(ctx, res)
	if err != nil {
		return nil, err
	}
	return c.change(ctx, s, opts, res, slotChange{
		plan: func(bool) {
			if hadCP {
				res.step("mark the existing checkpoint of slot %q catchup_pending (the slot is missing)", c.t.Slot)
			}
			res.step("create slot %q (pgoutput) and save its checkpoint with catchup_pending = true", c.t.Slot)
			res.step("the next `outboxd run` recreates the slot with a snapshot and reads %d unprocessed rows from the table", pending)
		},
		act: func(ctx context.Context) error {
			if s, err := c.readSlot(ctx); err != nil || s != nil {
				if err == nil {
					err = refused("slot %q was created meanwhile by another process (an outboxd instance?); nothing more to do", c.t.Slot)
				}
				return err
			}
			if hadCP {
				if _, err := c.markPendingAndDrop(ctx, false, false); err != nil {
					return err
				}
				res.step("marked the existing checkpoint catchup_pending (the slot was missing)")
			}
			return nil
		},
		after: func(ctx context.Context) error {
			if err := c.createSlot(ctx, res); err != nil {
				return err
			}
			res.step("%d unprocessed rows will be read from the table", pending)
			return nil
		},
	})
}

// DropSlot drops the slot and deletes its checkpoint, so that the next
// `outboxd run` starts afresh: it creates the slot and delivers every
// unprocessed row from the table. Nothing is lost.
func (c *Client) DropSlot(ctx context.Context, opts SlotOptions) (*SlotResult, error) {
	res, s, err := c.inspect(ctx, &opts)
	if err != nil {
		return nil, err
	}
	haveTables, err := c.tables().Migrated(ctx)
	if err != nil {
		return nil, err
	}
	hadCP := false
	if haveTables {
		if hadCP, err = c.rereadFacts(ctx, res); err != nil {
			return nil, err
		}
	}
	if s == nil && !hadCP {
		res.Unchanged = true
		res.step("neither slot %q nor its checkpoint exists; nothing to do", c.t.Slot)
		return res, nil
	}
	if s != nil && s.ConfirmedFlush != nil {
		res.FromLSN = lsnPtr(*s.ConfirmedFlush)
	}
	return c.change(ctx, s, opts, res, slotChange{
		free: true,
		plan: func(bool) {
			if hadCP {
				res.step("delete the checkpoint of slot %q", c.t.Slot)
			}
			if s != nil {
				res.step("drop slot %q (confirmed_flush_lsn %s, %s retained)", c.t.Slot, lsnString(s.ConfirmedFlush), retainedString(s))
			}
			c.stepNextRun(res)
		},
		act: func(ctx context.Context) error {
			return pgx.BeginFunc(ctx, c.pool, func(tx pgx.Tx) error {
				// The checkpoint goes first and only with the slot: a checkpoint
				// without its slot makes the daemon refuse to start.
				if haveTables {
					if _, err := store.On(tx, c.t.schema(), c.t.Table.Name).DeleteCheckpoint(ctx, c.t.Slot); err != nil {
						return fmt.Errorf("delete checkpoint of slot %q: %w", c.t.Slot, err)
					}
				}
				return dropSlot(ctx, tx, c.t.Slot)
			})
		},
		after: func(context.Context) error {
			if hadCP {
				res.step("deleted the checkpoint of slot %q", c.t.Slot)
			}
			if s != nil {
				res.step("dropped slot %q", c.t.Slot)
			}
			c.stepNextRun(res)
			return nil
		},
	})
}

func (c *Client) stepNextRun(res *SlotResult) {
	if res.RowsToReread != nil {
		res.step("the next `outboxd run` creates the slot and reads %d unprocessed rows from the table", *res.RowsToReread)
	}
}

// ResetSlot drops the slot and recreates it behind a checkpoint with
// catchup_pending = true: the next `outboxd run` delivers every row still
// unprocessed (RowsToReread of them). It also repairs a lost slot, a slot of
// another plugin and a checkpoint written on another cluster.
//
// When Force had to terminate the process streaming from the slot, the slot
// is left dropped and the checkpoint deleted instead, so that the running
// instance never streams from a new slot without a catch-up: finding both
// gone when it reconnects (cdc.ErrReset), it drops what it held and starts
// over as a first start does, catching up from the table.
func (c *Client) ResetSlot(ctx context.Context, opts SlotOptions) (*SlotResult, error) {
	res, s, err := c.inspect(ctx, &opts)
	if err != nil {
		return nil, err
	}
	hadCP, pending, err := c.catchupFacts(ctx, res)
	if err != nil {
		return nil, err
	}
	if s != nil && s.ConfirmedFlush != nil {
		res.FromLSN = lsnPtr(*s.ConfirmedFlush)
	}
	// A running instance whose walsender we terminate reconnects (after our
	// lock) with its state in memory: given a new slot it would stream from
	// it without the catch-up, leaving the rows committed in between
	// undelivered until its next restart. So when we had to terminate one,
	// reset leaves no slot and no checkpoint: that instance finds both gone
	// (cdc.ErrReset), drops its state and starts over, creating the slot and
	// catching up as on a first start (or waits, if a standby did first).
	var changed, forget bool
	return c.change(ctx, s, opts, res, slotChange{
		free: true,
		plan: func(held bool) {
			if held {
				if hadCP {
					res.step("delete the checkpoint of slot %q", c.t.Slot)
				}
				res.step("drop slot %q and leave it dropped, so that the terminated instance starts over: it (or a standby) creates the slot and reads %d unprocessed rows from the table", c.t.Slot, pending)
				return
			}
			if hadCP {
				res.step("mark the checkpoint of slot %q catchup_pending", c.t.Slot)
			}
			if s != nil {
				res.step("drop slot %q (confirmed_flush_lsn %s, wal_status %s, %s retained)", c.t.Slot, lsnString(s.ConfirmedFlush), s.WALStatus, retainedString(s))
			}
			res.step("create slot %q (pgoutput) and save its checkpoint with catchup_pending = true", c.t.Slot)
			res.step("the next `outboxd run` recreates the slot with a snapshot and reads %d unprocessed rows from the table", pending)
		},
		act: func(ctx context.Context) error {
			var err error
			forget = len(res.Terminated) > 0
			changed, err = c.markPendingAndDrop(ctx, true, forget)
			return err
		},
		after: func(ctx context.Context) error {
			if forget {
				if changed {
					res.step("deleted the checkpoint of slot %q", c.t.Slot)
				}
				res.step("dropped slot %q and left it dropped: the terminated instance starts over when it reconnects (or a standby does): it creates the slot and catches up", c.t.Slot)
				res.step("%d unprocessed rows will be read again from the table", pending)
				return nil
			}
			if changed {
				res.step("marked the checkpoint catchup_pending")
			}
			if s != nil {
				res.step("dropped slot %q (it had confirmed %s)", c.t.Slot, lsnString(s.ConfirmedFlush))
			}
			if err := c.createSlot(ctx, res); err != nil {
				return err
			}
			res.step("%d unprocessed rows will be read again from the table", pending)
			return nil
		},
	})
}

// AdvanceSlot moves the slot's confirmed position forward to `to` with
// pg_replication_slot_advance, and the checkpoint with it, so the daemon's
// start-up reconciliation agrees. Transactions committed before `to` are no
// longer streamed: their rows stay unprocessed in the table until a catch-up
// (`slot reset`) or a replay delivers them. It refuses to move backwards.
func (c *Client) AdvanceSlot(ctx context.Context, to LSN, opts SlotOptions) (*SlotResult, error) {
	res, s, err := c.inspect(ctx, &opts)
	if err != nil {
		return nil, err
	}
	switch {
	case s == nil:
		return nil, refused("slot %q does not exist", c.t.Slot)
	case s.Plugin != "pgoutput":
		return nil, refused("slot %q uses plugin %q, not pgoutput", c.t.Slot, s.Plugin)
	case s.WALStatus == "lost" || s.ConfirmedFlush == nil:
		return nil, refused("slot %q was invalidated (wal_status %s): it cannot be advanced; run `outboxd slot reset --yes`", c.t.Slot, s.WALStatus)
	}
	from := LSN(*s.ConfirmedFlush)
	res.FromLSN = &from
	if to < from {
		return nil, refused("slot %q is at %s: advance moves forward only, %s is behind it", c.t.Slot, from, to)
	}
	if to == from {
		res.Unchanged = true
		res.LSN = &from
		res.step("slot %q is already at %s; nothing to do", c.t.Slot, from)
		return res, nil
	}
	var current pglogrepl.LSN
	if err := c.pool.QueryRow(ctx, `SELECT pg_current_wal_lsn()`).Scan(&current); err != nil {
		return nil, fmt.Errorf("read current WAL position: %w", err)
	}
	if to > LSN(current) {
		return nil, refused("%s is beyond the current WAL position %s", to, current)
	}
	cp, err := c.catchupPending(ctx)
	if err != nil {
		return nil, err
	}
	skip := FormatBytes(int64(to - from))
	noteCatchup := func() {
		if cp {
			res.step("note: the checkpoint is catchup_pending, so the next `outboxd run` recreates the slot anyway")
		}
	}
	var end pglogrepl.LSN
	return c.change(ctx, s, opts, res, slotChange{
		free: true,
		plan: func(bool) {
			res.step("advance slot %q from %s to %s, skipping %s of WAL; rows committed in between stay unprocessed and are not streamed", c.t.Slot, from, to, skip)
			res.step("move the checkpoint of slot %q to %s", c.t.Slot, to)
			noteCatchup()
			res.LSN = &to
		},
		act: func(ctx context.Context) error {
			err := c.pool.QueryRow(ctx, `SELECT end_lsn FROM pg_replication_slot_advance($1, $2::pg_lsn)`, c.t.Slot, to.String()).Scan(&end)
			if err != nil {
				return fmt.Errorf("advance slot %q to %s: %w", c.t.Slot, to, err)
			}
			return nil
		},
		after: func(ctx context.Context) error {
			res.LSN = lsnPtr(end)
			res.step("advanced slot %q from %s to %s (%s of WAL skipped; rows committed in between stay unprocessed and are not streamed)", c.t.Slot, from, end, skip)
			moved, err := c.tables().AdvanceCheckpoint(ctx, c.t.Slot, end)
			switch {
			case sqlState(err) == "42P01": // undefined_table: not migrated
			case err != nil:
				return fmt.Errorf("move checkpoint of slot %q to %s: %w", c.t.Slot, end, err)
			case moved:
				res.step("moved the checkpoint to %s", end)
			}
			noteCatchup()
			return nil
		},
	})
}

func (c *Client) catchupPending(ctx context.Context) (bool, error) {
	pending, err := c.tables().CatchupPending(ctx, c.t.Slot)
	switch {
	case errors.Is(err, pgx.ErrNoRows), sqlState(err) == "42P01":
		return false, nil
	case err != nil:
		return false, fmt.Errorf("read checkpoint of slot %q: %w", c.t.Slot, err)
	}
	return pending, nil
}

func lsnString(l *pglogrepl.LSN) string {
	if l == nil {
		return "none"
	}
	return l.String()
}

func retainedString(s *store.Slot) string {
	if s.RestartLSN == nil {
		return "no WAL"
	}
	return FormatBytes(bytesBehind(LSN(s.CurrentLSN), LSN(*s.RestartLSN))) + " of WAL"
}
