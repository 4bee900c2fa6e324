package main

import (
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/spf13/cobra"

	"github.com/outboxd/outboxd/ops"
)

func slotCommand(envMap map[string]string, stdout, stderr io.Writer) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "slot",
		Short: "Inspect and repair the replication slot: status, create, drop, reset, advance",
		Long: `Inspect and repair the replication slot.

drop, reset and advance are destructive: they need --yes, and --dry-run shows
what they would do without changing anything. A slot that another process is
streaming from (an outboxd instance) is refused unless --force, which
terminates that backend first.

The outbox table is the source of truth: after create, drop or reset the next
` + "`outboxd run`" + ` delivers every row that is still unprocessed.`,
		Args: cobra.NoArgs,
	}
	cmd.AddCommand(
		slotStatusCommand(envMap, stdout, stderr),
		slotCreateCommand(envMap, stdout, stderr),
		slotChangeCommand(envMap, stdout, stderr, "drop",
			"Drop the slot and its checkpoint; the next run starts afresh and delivers every unprocessed row",
			func(env *opsEnv, cmd *cobra.Command, o ops.SlotOptions) (*ops.SlotResult, error) {
				return env.client.DropSlot(cmd.Context(), o)
			}, nil),
		slotChangeCommand(envMap, stdout, stderr, "reset",
			"Drop and recreate the slot; the next run catches up every unprocessed row from the table (nothing is lost)",
			func(env *opsEnv, cmd *cobra.Command, o ops.SlotOptions) (*ops.SlotResult, error) {
				return env.client.ResetSlot(cmd.Context(), o)
			}, nil),
		slotAdvanceCommand(envMap, stdout, stderr),
	)
	return cmd
}

func slotStatusCommand(envMap map[string]string, stdout, stderr io.Writer) *cobra.Command {
	var f statusFlags
	cmd := &cobra.Command{
		Use:   "status",
		Short: "Show the slot and its checkpoint; exit 1 when they need attention",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			opts, err := f.options(cmd, envMap)
			if err != nil {
				return err
			}
			opts.SlotOnly = true
			return runStatus(cmd, envMap, stdout, stderr, &f, opts)
		},
	}
	f.register(cmd, false)
	return cmd
}

func slotCreateCommand(envMap map[string]string, stdout, stderr io.Writer) *cobra.Command {
	var (
		slot           string
		dryRun, asJSON bool
	)
	cmd := &cobra.Command{
		Use:   "create",
		Short: "Create the slot if it is missing; the next run catches up every unprocessed row",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			env, err := openOps(cmd.Context(), envMap, stderr, slotOverride(cmd, &slot))
			if err != nil {
				return err
			}
			defer env.client.Close()
			res, err := env.client.CreateSlot(cmd.Context(), ops.SlotOptions{DryRun: dryRun})
			if res != nil {
				if perr := stepsOut(stdout, "create", res, err, asJSON); perr != nil && err == nil {
					err = perr
				}
			}
			return err
		},
	}
	cmd.Flags().StringVar(&slot, "slot", "", "slot name (overrides OUTBOXD_SLOT)")
	cmd.Flags().BoolVar(&dryRun, "dry-run", false, "show what would be done, change nothing")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print the result as JSON")
	return cmd
}

// destructiveFlags are the flags of drop, reset and advance.
type destructiveFlags struct {
	slot                       string
	yes, dryRun, force, asJSON bool
	wait                       time.Duration
}

func (f *destructiveFlags) register(cmd *cobra.Command) {
	cmd.Flags().StringVar(&f.slot, "slot", "", "slot name (overrides OUTBOXD_SLOT)")
	cmd.Flags().BoolVar(&f.yes, "yes", false, "confirm: this command changes the slot")
	cmd.Flags().BoolVar(&f.dryRun, "dry-run", false, "show what would be done, change nothing")
	cmd.Flags().BoolVar(&f.force, "force", false, "terminate the process streaming from the slot instead of refusing")
	cmd.Flags().DurationVar(&f.wait, "wait", ops.DefaultSlotWait, "how long to wait for an instance preparing the slot and, with --force, to keep freeing it")
	cmd.Flags().BoolVar(&f.asJSON, "json", false, "print the result as JSON")
}

func (f *destructiveFlags) check(what string) error {
	if !f.yes && !f.dryRun {
		return usageError{fmt.Errorf("slot %s changes the replication slot: add --yes to confirm, or --dry-run to see what it would do", what)}
	}
	if f.wait <= 0 {
		return usageError{errors.New("--wait must be positive")}
	}
	return nil
}

func (f *destructiveFlags) options() ops.SlotOptions {
	return ops.SlotOptions{DryRun: f.dryRun, Force: f.force, Wait: f.wait}
}

type slotAction func(env *opsEnv, cmd *cobra.Command, o ops.SlotOptions) (*ops.SlotResult, error)

func slotChangeCommand(envMap map[string]string, stdout, stderr io.Writer, what, short string, act slotAction, extra func(*cobra.Command) error) *cobra.Command {
	var f destructiveFlags
	cmd := &cobra.Command{
		Use:   what,
		Short: short,
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := f.check(what); err != nil {
				return err
			}
			if extra != nil {
				if err := extra(cmd); err != nil {
					return err
				}
			}
			env, err := openOps(cmd.Context(), envMap, stderr, slotOverride(cmd, &f.slot))
			if err != nil {
				return err
			}
			defer env.client.Close()
			res, err := act(env, cmd, f.options())
			if res != nil {
				if perr := stepsOut(stdout, what, res, err, f.asJSON); perr != nil && err == nil {
					err = perr
				}
			}
			return err
		},
	}
	f.register(cmd)
	return cmd
}

func slotAdvanceCommand(envMap map[string]string, stdout, stderr io.Writer) *cobra.Command {
	var (
		toRaw string
		to    pglogrepl.LSN
	)
	cmd := slotChangeCommand(envMap, stdout, stderr, "advance",
		"Move the slot (and the checkpoint) forward to --to-lsn, skipping the WAL before it; never backwards",
		func(env *opsEnv, cmd *cobra.Command, o ops.SlotOptions) (*ops.SlotResult, error) {
			return env.client.AdvanceSlot(cmd.Context(), ops.LSN(to), o)
		},
		func(*cobra.Command) error {
			if toRaw == "" {
				return usageError{errors.New("slot advance needs --to-lsn (for example --to-lsn 16/B374D848)")}
			}
			var err error
			if to, err = pglogrepl.ParseLSN(toRaw); err != nil {
				return usageError{fmt.Errorf("--to-lsn %q is not an LSN such as 16/B374D848", toRaw)}
			}
			return nil
		})
	cmd.Long = `Move the slot's confirmed position forward to --to-lsn with
pg_replication_slot_advance, and the checkpoint with it. Transactions committed
before that position are no longer streamed: their rows stay unprocessed in the
table (and in the backlog) until a catch-up (slot reset) delivers and marks
them. A replay delivers them again but marks nothing. Use it to release WAL you
have decided not to stream; it refuses to move backwards.`
	cmd.Flags().StringVar(&toRaw, "to-lsn", "", "the LSN to move to (forward only)")
	return cmd
}
