package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/outboxd/outboxd/deliver"
	"github.com/outboxd/outboxd/ops"
)

// statusFlags are the flags of `status` and `slot status`.
type statusFlags struct {
	json          bool
	slot          string
	maxLag        string
	maxCatchupAge time.Duration
	backlogWait   time.Duration
	daemon        string // base URL of a running daemon's OUTBOXD_HTTP_ADDR (status only)
}

func (f *statusFlags) register(cmd *cobra.Command, backlog bool) {
	cmd.Flags().BoolVar(&f.json, "json", false, "print JSON (stable field names, see README)")
	cmd.Flags().StringVar(&f.slot, "slot", "", "slot name (overrides OUTBOXD_SLOT)")
	cmd.Flags().StringVar(&f.maxLag, "max-lag-bytes", "1GiB", "lag above which the slot needs attention (bytes, or with a unit: 512MiB); default OUTBOXD_LAG_ALERT_BYTES when set")
	cmd.Flags().DurationVar(&f.maxCatchupAge, "max-catchup-age", ops.DefaultMaxCatchupAge, "how long a catch-up may stay pending before it needs attention")
	if backlog {
		cmd.Flags().DurationVar(&f.backlogWait, "backlog-timeout", ops.DefaultBacklogTimeout, "give up counting unprocessed rows after this long (the count scans the table)")
		cmd.Flags().StringVar(&f.daemon, "daemon", "", "also show a running daemon's destinations (breaker, rate limit) from its OUTBOXD_HTTP_ADDR, e.g. http://127.0.0.1:9187")
	}
}

// options converts the flags; the lag threshold defaults to the daemon's
// alert threshold (OUTBOXD_LAG_ALERT_BYTES), so status and
// /health/replication agree.
func (f *statusFlags) options(cmd *cobra.Command, envMap map[string]string) (ops.StatusOptions, error) {
	if v := envMap[envPrefix+"LAG_ALERT_BYTES"]; v != "" && !cmd.Flags().Changed("max-lag-bytes") {
		lag, err := ops.ParseBytes(v)
		if err != nil || lag <= 0 {
			return ops.StatusOptions{}, badVar("LAG_ALERT_BYTES", "%q is not a positive number of bytes", v)
		}
		f.maxLag = v
	}
	lag, err := ops.ParseBytes(f.maxLag)
	if err != nil || lag <= 0 {
		return ops.StatusOptions{}, usageError{fmt.Errorf("--max-lag-bytes: %q is not a positive size", f.maxLag)}
	}
	if f.maxCatchupAge <= 0 {
		return ops.StatusOptions{}, usageError{fmt.Errorf("--max-catchup-age must be positive")}
	}
	if f.backlogWait < 0 {
		return ops.StatusOptions{}, usageError{fmt.Errorf("--backlog-timeout must not be negative")}
	}
	return ops.StatusOptions{MaxLagBytes: lag, MaxCatchupAge: f.maxCatchupAge, BacklogTimeout: f.backlogWait}, nil
}

func statusCommand(envMap map[string]string, stdout, stderr io.Writer) *cobra.Command {
	var f statusFlags
	cmd := &cobra.Command{
		Use:   "status",
		Short: "Show the slot, checkpoint, backlog and configuration; exit 1 when something needs attention",
		Long: `Show the replication slot (lag, retained WAL, wal_status), the checkpoint, the
publication, the backlog of unprocessed rows, dead letters and parked
deliveries, and the effective configuration with secrets redacted.

Exit code 0 when all is well, 1 when something needs attention (each reason is
printed): the slot is missing, lost or unreserved, its lag exceeds
--max-lag-bytes, the checkpoint belongs to another cluster, a catch-up has been
pending longer than --max-catchup-age, or the publication does not carry the
table's inserts.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			opts, err := f.options(cmd, envMap)
			if err != nil {
				return err
			}
			return runStatus(cmd, envMap, stdout, stderr, &f, opts)
		},
	}
	f.register(cmd, true)
	return cmd
}

func runStatus(cmd *cobra.Command, envMap map[string]string, stdout, stderr io.Writer, f *statusFlags, opts ops.StatusOptions) (err error) {
	if f.json {
		// A script reading --json gets JSON also when the status cannot be
		// read (the database down, say): ok false and the error, which
		// carries no secret (the same text goes to stderr).
		defer func() {
			var usage usageError
			var cfgErr configError
			var attention attentionError
			if err == nil || errors.As(err, &usage) || errors.As(err, &cfgErr) || errors.As(err, &attention) {
				return
			}
			enc := json.NewEncoder(stdout)
			enc.SetIndent("", "  ")
			_ = enc.Encode(map[string]any{"ok": false, "error": err.Error(), "problems": []string{err.Error()}})
		}()
	}
	ctx := cmd.Context()
	env, err := openOps(ctx, envMap, stderr, slotOverride(cmd, &f.slot))
	if err != nil {
		return err
	}
	defer env.client.Close()
	if !opts.SlotOnly {
		opts.Config = effectiveConfig(env.cfg, envMap)
		opts.Targets = env.cfg.targetNames()
	}
	st, err := env.client.Status(ctx, opts)
	if err != nil {
		return err
	}
	dests := daemonDestinations(ctx, f.daemon, st)
	if f.json {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		if err := enc.Encode(withDestinations{st, dests}); err != nil {
			return fmt.Errorf("write status: %w", err)
		}
	} else {
		printStatus(stdout, st, dests)
	}
	if !st.OK {
		return attentionError{len(st.Problems)}
	}
	return nil
}

// printStatus writes the human-readable status.
func printStatus(w io.Writer, st *ops.Status, dests []deliver.GuardStatus) {
	p := func(format string, args ...any) { fmt.Fprintf(w, format+"\n", args...) }
	p("outboxd status at %s: database %q, PostgreSQL %s%s", st.CheckedAt.Format(time.RFC3339), st.Server.Database, st.Server.Version, ifThen(st.Server.InRecovery, " (standby)"))
	p("")
	s := st.Slot
	if !s.Exists {
		p("Slot         %s: does not exist", s.Name)
	} else {
		state := "inactive"
		if s.Active {
			state = "active"
			if s.ActivePID != nil {
				state = fmt.Sprintf("active (pid %d)", *s.ActivePID)
			}
		}
		p("Slot         %s: %s, plugin %s, wal_status %s", s.Name, state, s.Plugin, orNone(s.WALStatus))
		p("             confirmed_flush_lsn %s, restart_lsn %s, current WAL %s", lsnOr(s.ConfirmedFlushLSN), lsnOr(s.RestartLSN), st.Server.CurrentWALLSN)
		p("             lag %s, retained WAL %s, safe_wal_size %s", bytesOr(s.LagBytes, "unknown"), bytesOr(s.RetainedWALBytes, "unknown"), bytesOr(s.SafeWALSizeBytes, "unlimited"))
	}
	cp := st.Checkpoint
	if !cp.Exists {
		p("Checkpoint   none")
	} else {
		cluster := "cluster unknown"
		if cp.SystemIdentifierMatch != nil {
			cluster = "same cluster"
			if !*cp.SystemIdentifierMatch {
				cluster = "ANOTHER cluster (" + cp.SystemIdentifier + ")"
			}
		}
		catchup := "catch-up done"
		if cp.CatchupPending {
			catchup = "catch-up PENDING"
		}
		p("Checkpoint   lsn %s, updated %s ago, %s, %s", lsnOr(cp.LSN), ago(cp.AgeSeconds), cluster, catchup)
	}
	if f := st.Failover; f != nil {
		switch {
		case !f.Supported:
			p("Failover     no failover slots before PostgreSQL 17: a promotion needs OUTBOXD_SLOT_RECREATE=true (recreate + catch-up)")
		case f.Ready:
			p("Failover     ready: the slot is synchronized to the standby and survives a promotion")
		default:
			p("Failover     NOT ready: %d missing (see warnings)", len(f.Missing))
		}
	}
	if pub := st.Publication; pub != nil {
		switch {
		case !pub.Exists:
			p("Publication  %s: does not exist", pub.Name)
		default:
			p("Publication  %s: %s table, %s inserts", pub.Name, ifElse(pub.IncludesTable, "includes the", "does NOT include the"), ifElse(pub.PublishesInsert, "publishes", "does NOT publish"))
		}
	}
	if b := st.Backlog; b != nil {
		rows := "unknown"
		if b.UnprocessedRows != nil {
			rows = fmt.Sprint(*b.UnprocessedRows)
		}
		oldest := ""
		if b.OldestUnprocessedAt != nil {
			oldest = fmt.Sprintf(" (oldest occurred %s, %s ago)", b.OldestUnprocessedAt.Format(time.RFC3339), ago(b.OldestUnprocessedAgeSeconds))
		}
		p("Backlog      %s unprocessed rows%s, %s dead letters, %s parked", rows, oldest, countOr(b.DeadLetters), countOr(b.Parked))
		for _, tc := range b.Targets {
			lag := "lag 0"
			if tc.OldestParkedEventID != nil {
				lag = fmt.Sprintf("lag %s (oldest parked event %d, %s)", ago(&tc.LagSeconds), *tc.OldestParkedEventID, tc.OldestParkedAt.UTC().Format(time.RFC3339))
			}
			p("  %-10s %d parked, %d dead letters, %s", tc.Target, tc.Parked, tc.DeadLetters, lag)
		}
	}
	printDestinations(p, dests)
	if len(st.Config) > 0 {
		p("")
		p("Configuration (secrets redacted)")
		for _, k := range sortedKeys(st.Config) {
			p("  %s=%s", k, st.Config[k])
		}
	}
	if len(st.Warnings) > 0 {
		p("")
		p("Warnings")
		for _, m := range st.Warnings {
			p("  - %s", m)
		}
	}
	p("")
	if st.OK {
		p("OK")
		return
	}
	p("NEEDS ATTENTION")
	for _, m := range st.Problems {
		p("  - %s", m)
	}
}

func ifThen(cond bool, s string) string {
	if cond {
		return s
	}
	return ""
}

func ifElse(cond bool, a, b string) string {
	if cond {
		return a
	}
	return b
}

func orNone(s string) string {
	if s == "" {
		return "none"
	}
	return s
}

func lsnOr(l *ops.LSN) string {
	if l == nil {
		return "none"
	}
	return l.String()
}

func bytesOr(n *int64, none string) string {
	if n == nil {
		return none
	}
	return ops.FormatBytes(*n)
}

func countOr(n *int64) string {
	if n == nil {
		return "n/a"
	}
	return fmt.Sprint(*n)
}

func ago(secs *float64) string {
	if secs == nil {
		return "?"
	}
	d := time.Duration(*secs * float64(time.Second))
	switch {
	case d < time.Minute:
		return d.Round(100 * time.Millisecond).String()
	case d < 48*time.Hour:
		return d.Round(time.Second).String()
	default:
		return fmt.Sprintf("%.1fd", d.Hours()/24)
	}
}

// stepsOut prints a slot command's result.
// stepsOut prints a slot command's result; cmdErr is the command's error, if
// any (a refusal, a failure part way), which the JSON carries too.
func stepsOut(w io.Writer, what string, res *ops.SlotResult, cmdErr error, asJSON bool) error {
	res.OK = cmdErr == nil
	if cmdErr != nil {
		res.Refused = errors.Is(cmdErr, ops.ErrRefused)
		res.Error = cmdErr.Error()
	}
	if asJSON {
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		if err := enc.Encode(res); err != nil {
			return fmt.Errorf("write result: %w", err)
		}
		return nil
	}
	head := fmt.Sprintf("slot %s %q", what, res.Slot)
	if res.DryRun {
		head += " (dry run: nothing changed; it would)"
	}
	fmt.Fprintln(w, head+":")
	for _, s := range res.Steps {
		fmt.Fprintln(w, "  - "+strings.TrimSpace(s))
	}
	return nil
}
