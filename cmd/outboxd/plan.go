package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/jackc/pgx/v5"
	"github.com/spf13/cobra"

	"github.com/outboxd/outboxd/plan"
)

// planCommand is `outboxd plan check|apply`: the tracking plan (README
// "Tracking plan").
func planCommand(envMap map[string]string, stdout, stderr io.Writer) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "plan",
		Short: "Lint, compare and apply the tracking plan (the contract of the events)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return usageError{errors.New("plan needs a subcommand: check or apply")}
		},
	}
	cmd.AddCommand(planCheckCommand(envMap, stdout, stderr), planApplyCommand(envMap, stdout, stderr))
	return cmd
}

// planFileArg wants exactly one argument, the plan file: a usage error
// (exit 2) otherwise.
func planFileArg(cmd *cobra.Command, args []string) error {
	if err := cobra.ExactArgs(1)(cmd, args); err != nil {
		return usageError{fmt.Errorf("%s needs the plan file: %w", cmd.CommandPath(), err)}
	}
	return nil
}

// findingsError is `plan check` finding something: exit 1, the report says
// what.
type findingsError struct{ n int }

func (e findingsError) Error() string {
	if e.n == 1 {
		return "plan check: 1 finding"
	}
	return fmt.Sprintf("plan check: %d findings", e.n)
}

// readPlan reads and parses a plan file; a file that cannot be read or is
// not a plan is a usage error (exit 2).
func readPlan(file string) (*plan.Plan, []byte, error) {
	data, err := os.ReadFile(file)
	if err != nil {
		return nil, nil, usageError{err}
	}
	p, err := plan.Parse(file, data)
	if err != nil {
		return nil, nil, usageError{err}
	}
	return p, data, nil
}

// planDB connects to OUTBOXD_DATABASE_URL for the plan commands; conn is nil
// when it is not set and required is false.
func planDB(ctx context.Context, envMap map[string]string, stderr io.Writer, required bool) (*pgx.Conn, plan.Table, error) {
	c, _, err := setup(envMap, stderr, nil)
	if err != nil {
		return nil, plan.Table{}, err
	}
	if strings.TrimSpace(c.DatabaseURL) == "" && !required {
		return nil, plan.Table{}, nil
	}
	if err := c.requireDatabase(); err != nil {
		return nil, plan.Table{}, err
	}
	table, err := c.table()
	if err != nil {
		return nil, plan.Table{}, err
	}
	conn, err := pgx.Connect(ctx, c.DatabaseURL)
	if err != nil {
		return nil, plan.Table{}, fmt.Errorf("connect: %w", err)
	}
	return conn, plan.Table{Schema: table.Schema, Name: table.Name}, nil
}

// checkReport is `plan check --json`.
type checkReport struct {
	File     string         `json:"file"`
	Events   int            `json:"events"`
	Versions int            `json:"versions"`
	Findings []plan.Finding `json:"findings"`
	// Table is the comparison with the table; null without a database.
	Table *tableReport `json:"table"`
	Clean bool         `json:"clean"`
}

type tableReport struct {
	Name string `json:"name"`
	*plan.Survey
}

func (r checkReport) count() int {
	n := len(r.Findings)
	if r.Table != nil {
		n += len(r.Table.Unknown) + len(r.Table.Invalid)
	}
	return n
}

func planCheckCommand(envMap map[string]string, stdout, stderr io.Writer) *cobra.Command {
	var (
		sample int
		asJSON bool
	)
	cmd := &cobra.Command{
		Use:   "check FILE",
		Short: "Lint a tracking plan and, with a database, compare the outbox table with it",
		Long: `Lint the tracking plan FILE: event and property names in snake_case, a
description and an owner per event, JSON Schemas (draft 2020-12) that compile,
and additive evolution: a schema_version must keep, required and of the same
type, every property the previous version required (else: breaking change).

With OUTBOXD_DATABASE_URL set, also compare the outbox table with the plan:
the event names and (event_name, schema_version) pairs of the table that the
plan lacks, with their row counts (a scan of the whole table), and the
--sample newest rows by id, each checked against the envelope rules and its
version's schema.

Exit code: 0 clean, 1 findings, 2 usage or configuration error (a file that is
not a plan included).`,
		Args: planFileArg,
		RunE: func(cmd *cobra.Command, args []string) error {
			if sample < 0 {
				return usageError{errors.New("--sample must not be negative")}
			}
			p, _, err := readPlan(args[0])
			if err != nil {
				return err
			}
			rep := checkReport{File: args[0], Events: len(p.Events), Findings: p.Lint()}
			for _, e := range p.Events {
				rep.Versions += len(e.Versions)
			}
			if rep.Findings == nil {
				rep.Findings = []plan.Finding{}
			}
			ctx := cmd.Context()
			conn, table, err := planDB(ctx, envMap, stderr, false)
			if err != nil {
				return err
			}
			if conn != nil {
				defer conn.Close(context.WithoutCancel(ctx))
				s, err := plan.Compare(ctx, conn, table, p, sample)
				if err != nil {
					return err
				}
				rep.Table = &tableReport{Name: table.Schema + "." + table.Name, Survey: s}
			}
			n := rep.count()
			rep.Clean = n == 0
			if asJSON {
				enc := json.NewEncoder(stdout)
				enc.SetIndent("", "  ")
				enc.SetEscapeHTML(false)
				if err := enc.Encode(rep); err != nil {
					return fmt.Errorf("write report: %w", err)
				}
			} else {
				writeCheckReport(stdout, rep, sample)
			}
			if n > 0 {
				return findingsError{n}
			}
			return nil
		},
	}
	cmd.Flags().IntVar(&sample, "sample", 1000, "newest rows (by id) to validate against their schemas")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print the report as JSON")
	return cmd
}

func plural(n int, one, many string) string {
	if n == 1 {
		return fmt.Sprintf("%d %s", n, one)
	}
	return fmt.Sprintf("%d %s", n, many)
}

func writeCheckReport(w io.Writer, r checkReport, sample int) {
	fmt.Fprintf(w, "plan %s: %s, %s\n", r.File, plural(r.Events, "event", "events"), plural(r.Versions, "schema version", "schema versions"))
	if len(r.Findings) == 0 {
		fmt.Fprintln(w, "lint: clean")
	} else {
		fmt.Fprintf(w, "lint: %s\n", plural(len(r.Findings), "finding", "findings"))
		for _, f := range r.Findings {
			fmt.Fprintf(w, "  line %d: %s\n", f.Line, f.Message)
		}
	}
	if r.Table == nil {
		fmt.Fprintln(w, "table: not compared (OUTBOXD_DATABASE_URL is not set)")
	} else {
		t := r.Table
		if len(t.Unknown) == 0 {
			fmt.Fprintf(w, "table %s: every event name and version is in the plan\n", t.Name)
		} else {
			fmt.Fprintf(w, "table %s: %s not in the plan\n", t.Name, plural(len(t.Unknown), "event name or version", "event names or versions"))
			for _, u := range t.Unknown {
				why := "event not in the plan"
				if u.EventKnown {
					why = "schema_version not in the plan"
				}
				fmt.Fprintf(w, "  %s v%d: %s (%s)\n", u.Event, u.Version, plural(int(u.Rows), "row", "rows"), why)
			}
		}
		fmt.Fprintf(w, "sample: %s read (the newest %d by id)", plural(t.Sampled, "row", "rows"), sample)
		if len(t.Invalid) == 0 {
			fmt.Fprintln(w, ", every row of a planned event valid")
		} else {
			fmt.Fprintln(w)
			for _, inv := range t.Invalid {
				fmt.Fprintf(w, "  %s v%d: %d of %d invalid\n", inv.Event, inv.Version, inv.Invalid, inv.Sampled)
				for _, e := range inv.Errors {
					fmt.Fprintf(w, "    %s\n", e)
				}
			}
		}
	}
	if n := r.count(); n == 0 {
		fmt.Fprintln(w, "result: clean")
	} else {
		fmt.Fprintf(w, "result: %s\n", plural(n, "finding", "findings"))
	}
}

func planApplyCommand(envMap map[string]string, stdout, stderr io.Writer) *cobra.Command {
	var (
		trigger string
		asJSON  bool
	)
	cmd := &cobra.Command{
		Use:   "apply FILE [--trigger enforce|record|off]",
		Short: "Store the tracking plan in the database; optionally enforce it on every insert",
		Long: `Store the tracking plan FILE in outboxd_plan and outboxd_plan_event (the
outbox table's schema; run ` + "`outboxd migrate`" + ` first), replacing the plan there,
in one transaction. A plan with lint findings is refused (see ` + "`outboxd plan check`" + `),
except breaking changes and a missing description or owner, which are printed
as warnings.

--trigger installs the plan's BEFORE INSERT trigger on the outbox table, or
changes or removes it; without the flag the trigger stays as it is. The
trigger reads the stored plan at every insert: applying a new plan changes what
it checks, without touching the trigger.
  enforce  an insert that breaks the plan fails with SQLSTATE OB001 and a
           message naming the rule, e.g.
           outboxd plan: inventory_adjusted v1 requires property "delta" (number)
  record   the row goes in; each rule it breaks is a row of
           outboxd_plan_violation (event_id, event_name, schema_version, rule)
  off      no trigger`,
		Args: planFileArg,
		RunE: func(cmd *cobra.Command, args []string) error {
			switch trigger {
			case "", plan.TriggerEnforce, plan.TriggerRecord, plan.TriggerOff:
			default:
				return usageError{fmt.Errorf("--trigger: %q is not enforce, record or off", trigger)}
			}
			p, source, err := readPlan(args[0])
			if err != nil {
				return err
			}
			var blocking []string
			for _, f := range p.Lint() {
				if f.Kind == plan.KindBreaking || f.Kind == plan.KindMetadata {
					fmt.Fprintf(stderr, "warning: line %d: %s\n", f.Line, f.Message)
					continue
				}
				blocking = append(blocking, fmt.Sprintf("line %d: %s", f.Line, f.Message))
			}
			if len(blocking) > 0 {
				return fmt.Errorf("plan %s not applied, fix first:\n  %s", args[0], strings.Join(blocking, "\n  "))
			}
			ctx := cmd.Context()
			conn, table, err := planDB(ctx, envMap, stderr, true)
			if err != nil {
				return err
			}
			defer conn.Close(context.WithoutCancel(ctx))
			res, err := plan.Apply(ctx, conn, table, p, source, trigger)
			if err != nil {
				return err
			}
			if asJSON {
				enc := json.NewEncoder(stdout)
				enc.SetIndent("", "  ")
				return enc.Encode(res)
			}
			fmt.Fprintf(stdout, "plan %s applied: %s, %s (sha256 %s)\n", args[0], plural(res.Events, "event", "events"),
				plural(res.Versions, "schema version", "schema versions"), res.SHA256[:16])
			fmt.Fprintf(stdout, "trigger on %s.%s: %s\n", table.Schema, table.Name, res.Trigger)
			return nil
		},
	}
	cmd.Flags().StringVar(&trigger, "trigger", "", "the insert trigger: enforce, record or off (default: leave it as it is)")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print the result as JSON")
	return cmd
}
