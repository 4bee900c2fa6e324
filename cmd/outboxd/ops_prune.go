package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/spf13/cobra"

	"github.com/outboxd/outboxd/ops"
)

func pruneCommand(envMap map[string]string, stdout, stderr io.Writer) *cobra.Command {
	var (
		olderThan                   string
		batchSize                   int
		dryRun, deadLetters, asJSON bool
		yes                         bool
	)
	cmd := &cobra.Command{
		Use:   "prune --older-than DURATION --yes",
		Short: "Delete processed rows older than a duration, in small batches (retention); needs --yes",
		Long: `Delete rows with is_processed = true whose processed_at is older than
--older-than (90m, 36h, 30d), in batches of --batch-size rows, each its own
short transaction. Unprocessed rows are never deleted, whatever their age:
dead-lettered events stay in the table until you replay or remove them.

--dead-letters also deletes outboxd_dead_letter rows older than the cutoff;
their events stay unprocessed in the table, and a later catch-up (slot reset,
slot loss) would deliver them again.

The outbox table may be your source of truth for analytics: a deleted event
is gone for every later replay, backfill or audit. So prune refuses to run
without both an explicit retention (--older-than; there is no default) and
--yes. --dry-run needs no --yes: it counts and deletes nothing.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if olderThan == "" {
				return usageError{errors.New("prune needs --older-than (for example --older-than 30d)")}
			}
			d, err := ops.ParseDuration(olderThan)
			if err != nil || d <= 0 {
				return usageError{fmt.Errorf("--older-than: %q is not a positive duration such as 30d or 36h", olderThan)}
			}
			if batchSize <= 0 {
				return usageError{errors.New("--batch-size must be positive")}
			}
			if !yes && !dryRun {
				return usageError{fmt.Errorf("prune deletes events for good (processed before now - %s): "+
					"rerun with --yes to confirm, or with --dry-run to count them", olderThan)}
			}
			ctx := cmd.Context()
			env, err := openOps(ctx, envMap, stderr, nil)
			if err != nil {
				return err
			}
			defer env.client.Close()
			log := env.log.With().Str("component", "prune").Logger()
			lastLog := time.Now()
			res, err := env.client.Prune(ctx, ops.PruneOptions{OlderThan: d, BatchSize: batchSize, DryRun: dryRun, DeadLetters: deadLetters,
				OnBatch: func(n int64) {
					if time.Since(lastLog) >= 5*time.Second {
						lastLog = time.Now()
						log.Info().Int64("deleted", n).Msg("prune progress")
					}
				}})
			if res == nil {
				return err
			}
			if asJSON {
				out := struct {
					*ops.PruneResult
					DryRun bool `json:"dry_run"`
				}{res, dryRun}
				enc := json.NewEncoder(stdout)
				enc.SetIndent("", "  ")
				if perr := enc.Encode(out); perr != nil && err == nil {
					err = fmt.Errorf("write result: %w", perr)
				}
				return err
			}
			verb := "deleted"
			if dryRun {
				verb = "would delete (dry run)"
			}
			fmt.Fprintf(stdout, "prune: %s %d processed rows of %s processed before %s", verb, res.Rows, env.cfg.Table, res.Cutoff.Format(time.RFC3339))
			if !dryRun {
				fmt.Fprintf(stdout, " in %d batches", res.Batches)
			}
			fmt.Fprintln(stdout)
			if deadLetters {
				fmt.Fprintf(stdout, "prune: %s %d dead letters older than the cutoff\n", verb, res.DeadLetters)
			}
			return err
		},
	}
	cmd.Flags().StringVar(&olderThan, "older-than", "", "delete rows processed longer ago than this (90m, 36h, 30d)")
	cmd.Flags().IntVar(&batchSize, "batch-size", 1000, "rows per DELETE statement")
	cmd.Flags().BoolVar(&dryRun, "dry-run", false, "count what would be deleted, delete nothing")
	cmd.Flags().BoolVar(&deadLetters, "dead-letters", false, "also delete dead letters older than the cutoff")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print the result as JSON")
	cmd.Flags().BoolVar(&yes, "yes", false, "confirm the deletion (required unless --dry-run)")
	return cmd
}
