package main

import (
	"errors"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/outboxd/outboxd/decode"
	"github.com/outboxd/outboxd/ops"
	"github.com/outboxd/outboxd/sink"
)

// ga4Command groups the commands of the GA4 sink.
func ga4Command(envMap map[string]string, stdout, stderr io.Writer) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "ga4",
		Short: "Commands of the GA4 (Google Analytics 4 Measurement Protocol) sink",
		Args:  cobra.NoArgs,
	}
	cmd.AddCommand(ga4ValidateCommand(envMap, stdout, stderr))
	return cmd
}

// ga4ValidationError is `ga4 validate` finding messages: exit 1, the
// messages printed.
type ga4ValidationError struct{ events, messages int }

func (e ga4ValidationError) Error() string {
	return fmt.Sprintf("ga4 validate: %d message(s) about %d event(s)", e.messages, e.events)
}

func ga4ValidateCommand(envMap map[string]string, stdout, stderr io.Writer) *cobra.Command {
	var (
		limit int
		since string
	)
	cmd := &cobra.Command{
		Use:   "validate",
		Short: "Check recent outbox rows against GA4's validation server and limits; sends nothing to reports",
		Long: `Read the most recent rows of the outbox table (processed or not; at most
--limit, at or after --since), build exactly the requests the ga4 sink would
send for them, post them to GA4's validation server (/debug/mp/collect on the
host of OUTBOXD_GA4_ENDPOINT), which records nothing, and print per event the
validation messages GA4 returns (fieldPath, description, validationCode) and
the GA4 limits outboxd itself enforces before sending (the sink dead-letters
such events). Properties the sink does not send (null, object and array
values) are noted, not counted. Nothing is marked.

Reads the GA4 variables (OUTBOXD_GA4_MEASUREMENT_ID or
GOOGLE_ANALYTICS_MEASUREMENT_ID, OUTBOXD_GA4_API_SECRET, ...) whatever
OUTBOXD_SINK says.

Exit code 1 when there is any message.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if limit <= 0 {
				return usageError{errors.New("--limit must be positive")}
			}
			var f ops.Filter
			if since != "" {
				t, err := ops.ParseTime(since, time.Now())
				if err != nil {
					return usageError{fmt.Errorf("--since: %w", err)}
				}
				f.Since = t
			}
			cfg, err := ga4Config(envMap)
			if err != nil {
				return err
			}
			ctx := cmd.Context()
			env, err := openOps(ctx, envMap, stderr, nil)
			if err != nil {
				return err
			}
			defer env.client.Close()
			g, err := sink.NewGA4(cfg, env.log)
			if err != nil {
				return configError{err.Error()}
			}
			defer g.Close()
			events, skipped, err := env.client.Recent(ctx, f, limit)
			if err != nil {
				return err
			}
			plan := g.Plan(events)
			// The messages about each event: its local violation, then what
			// the validation server says of it or of its whole request.
			msgs := make([][]string, len(events))
			for i, err := range plan.Rejected {
				if err != nil {
					msgs[i] = append(msgs[i], "outboxd: "+err.Error()+" (dead-lettered by the sink, never sent)")
				}
			}
			for _, r := range plan.Requests {
				answer, err := g.Debug(ctx, r)
				if err != nil {
					return err
				}
				for _, m := range answer {
					line := fmt.Sprintf("GA4 %s: %s: %s", m.ValidationCode, m.FieldPath, m.Description)
					if m.Event >= 0 {
						msgs[r.Events[m.Event]] = append(msgs[r.Events[m.Event]], line)
						continue
					}
					for _, i := range r.Events {
						msgs[i] = append(msgs[i], line+" (about the request)")
					}
				}
			}
			bad, total := 0, 0
			for i, e := range events {
				status := "ok"
				if len(msgs[i]) > 0 {
					status = fmt.Sprintf("%d message(s)", len(msgs[i]))
					bad++
					total += len(msgs[i])
				}
				fmt.Fprintf(stdout, "event %d %s: %s\n", e.ID, ga4EventLabel(e), status)
				for _, m := range msgs[i] {
					fmt.Fprintf(stdout, "  %s\n", m)
				}
				if len(plan.Dropped[i]) > 0 {
					fmt.Fprintf(stdout, "  note: not sent (null, object or array values): %s\n", strings.Join(plan.Dropped[i], ", "))
				}
			}
			fmt.Fprintf(stdout, "validated %d events in %d requests: %d with messages", len(events), len(plan.Requests), bad)
			if skipped > 0 {
				fmt.Fprintf(stdout, ", %d rows skipped (they cannot become an event)", skipped)
			}
			fmt.Fprintln(stdout)
			if bad > 0 {
				return ga4ValidationError{events: bad, messages: total}
			}
			return nil
		},
	}
	cmd.Flags().IntVar(&limit, "limit", 25, "validate at most this many of the most recent rows")
	cmd.Flags().StringVar(&since, "since", "", "only rows with occurred_at at or after: RFC 3339, a date, or a duration back from now (24h, 7d)")
	return cmd
}

// ga4EventLabel is the event's name, quoted, for the output.
func ga4EventLabel(e *decode.Event) string {
	if e.Name == "" {
		return "(no name)"
	}
	return fmt.Sprintf("%q", e.Name)
}
