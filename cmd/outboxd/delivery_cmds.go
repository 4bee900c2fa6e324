package main

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net/url"
	"os"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/spf13/cobra"

	"github.com/outboxd/outboxd/decode"
	"github.com/outboxd/outboxd/deliver"
	"github.com/outboxd/outboxd/ops"
	"github.com/outboxd/outboxd/sink"
	"github.com/outboxd/outboxd/store"
)

// deliveryCommands are `outboxd subscription ...` and `outboxd dlq ...`.
func deliveryCommands(envMap map[string]string, stdout, stderr io.Writer) []*cobra.Command {
	return []*cobra.Command{subscriptionCommand(envMap, stdout, stderr), dlqCommand(envMap, stdout, stderr)}
}

// dbSession is a connection and outboxd's tables on it.
type dbSession struct {
	conn   *pgx.Conn
	tables store.Tables
	// targets are the names of the daemon's own targets (config.targetNames):
	// with the subscriptions, the targets a running outboxd delivers to.
	targets []string
	// subEnv is what checks of subscription rows need of the configuration.
	subEnv subscriptionEnv
}

func openSession(ctx context.Context, envMap map[string]string, stderr io.Writer) (*dbSession, error) {
	c, _, err := setup(envMap, stderr, nil)
	if err != nil {
		return nil, err
	}
	if err := c.requireDatabase(); err != nil {
		return nil, err
	}
	t, err := c.table()
	if err != nil {
		return nil, err
	}
	conn, err := pgx.Connect(ctx, c.DatabaseURL)
	if err != nil {
		return nil, fmt.Errorf("connect: %w", err)
	}
	return &dbSession{conn: conn, tables: store.On(conn, t.Schema, t.Name), targets: c.targetNames(), subEnv: subscriptionEnv{topicPrefix: c.SubscriptionTopicPrefix}}, nil
}

func (s *dbSession) close(ctx context.Context) { s.conn.Close(context.WithoutCancel(ctx)) }

func subscriptionCommand(envMap map[string]string, stdout, stderr io.Writer) *cobra.Command {
	cmd := &cobra.Command{Use: "subscription", Short: "Manage webhook subscriptions (rows of " + store.SubscriptionTable + ")"}
	var asJSON bool
	list := &cobra.Command{
		Use: "list", Short: "List subscriptions (secrets are not shown)", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx := cmd.Context()
			s, err := openSession(ctx, envMap, stderr)
			if err != nil {
				return err
			}
			defer s.close(ctx)
			subs, err := s.tables.Subscriptions(ctx)
			if err != nil {
				return fmt.Errorf("list subscriptions: %w", err)
			}
			type row struct {
				ID             int64             `json:"id"`
				OrganizationID *int64            `json:"organization_id"`
				URL            string            `json:"url"`
				Secrets        int               `json:"secrets"`
				Events         []string          `json:"events"`
				Enabled        bool              `json:"enabled"`
				DisabledReason string            `json:"disabled_reason,omitempty"`
				CreatedAt      time.Time         `json:"created_at"`
				UpdatedAt      time.Time         `json:"updated_at"`
				Filter         string            `json:"filter,omitempty"`
				Contract       string            `json:"contract,omitempty"`
				Kind           string            `json:"kind"`
				Settings       map[string]string `json:"settings"`
			}
			out := make([]row, len(subs))
			for i, sub := range subs {
				out[i] = row(sub)
				// Credentials and tokens in a URL are secrets too: shown
				// redacted in both forms.
				out[i].URL = ops.RedactURL(out[i].URL)
			}
			if asJSON {
				return json.NewEncoder(stdout).Encode(out)
			}
			tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "ID\tKIND\tORGANIZATION\tURL\tEVENTS\tSECRETS\tENABLED\tREASON\tFILTER\tCONTRACT")
			for _, r := range out {
				org := "(platform)"
				if r.OrganizationID != nil {
					org = strconv.FormatInt(*r.OrganizationID, 10)
				}
				events := strings.Join(r.Events, ",")
				if events == "" {
					events = "*"
				}
				where := r.URL
				if r.Kind != "webhook" {
					where = settingsText(r.Settings)
				}
				fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%s\t%d\t%t\t%s\t%s\t%s\n", r.ID, r.Kind, org, where, events, r.Secrets, r.Enabled, r.DisabledReason, r.Filter, r.Contract)
			}
			return tw.Flush()
		},
	}
	list.Flags().BoolVar(&asJSON, "json", false, "print JSON")

	var (
		url, events, secret, secretFile, filter, contract, kind string
		org                                                     int64
		settingArgs                                             []string
	)
	add := &cobra.Command{
		Use: "add", Short: "Add a subscription; prints its id and signing secret", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			globs, err := deliver.ParseGlobs(events)
			if err != nil {
				return usageError{err}
			}
			filterArg, err := subscriptionFilter(filter)
			if err != nil {
				return err
			}
			contractArg, err := subscriptionContract(contract)
			if err != nil {
				return err
			}
			if globs == nil {
				// No globs: every event. The column is NOT NULL, empty
				// meaning all; a nil slice would be sent as NULL.
				globs = []string{}
			}
			var orgArg *int64
			if cmd.Flags().Changed("organization") {
				orgArg = &org
			}
			settings, err := parseSettings(settingArgs, false)
			if err != nil {
				return err
			}
			if kind = strings.ToLower(strings.TrimSpace(kind)); kind != "webhook" {
				// Another kind: its settings, no URL or signing secret.
				if cmd.Flags().Changed("url") || cmd.Flags().Changed("secret") || secretFile != "" {
					return usageError{fmt.Errorf("--url, --secret and --secret-file are a webhook's; a %s subscription takes --setting KEY=VALUE", kind)}
				}
				ctx := cmd.Context()
				s, err := openSession(ctx, envMap, stderr)
				if err != nil {
					return err
				}
				defer s.close(ctx)
				if err := checkSubscriptionSettings(kind, orgArg, settings, s.subEnv); err != nil {
					return usageError{fmt.Errorf("--kind/--setting: %w", err)}
				}
				id, err := s.tables.AddSubscriptionRow(ctx, store.NewSubscription{OrganizationID: orgArg, Events: globs,
					Filter: filterArg, Contract: contractArg, Kind: kind, Settings: settings})
				if err != nil {
					return fmt.Errorf("add subscription: %w", err)
				}
				fmt.Fprintf(stdout, "subscription %d added (%s: %s)\n", id, kind, settingsText(settings))
				return nil
			}
			if len(settings) > 0 {
				return usageError{errors.New("--setting is for the other kinds (--kind posthog, ga4, kafka, nats); a webhook takes --url and --secret-file")}
			}
			if url == "" {
				return usageError{errors.New("--url is required for a webhook subscription")}
			}
			secret, err := secretFrom(cmd, secret, secretFile, stderr)
			if err != nil {
				return err
			}
			if secret == "" {
				secret = newSecret()
			}
			warnURLCredentials(stderr, "--url", url)
			wc := sink.WebhookConfig{URL: url, Secrets: []string{secret}, HTTPConfig: sink.HTTPConfig{AllowPrivate: true}}
			if err := wc.Validate(); err != nil {
				return usageError{err}
			}
			ctx := cmd.Context()
			s, err := openSession(ctx, envMap, stderr)
			if err != nil {
				return err
			}
			defer s.close(ctx)
			id, err := s.tables.AddFilteredSubscription(ctx, orgArg, url, []string{secret}, globs, filterArg, contractArg)
			if err != nil {
				return fmt.Errorf("add subscription: %w", err)
			}
			fmt.Fprintf(stdout, "subscription %d added\nsecret: %s\n", id, secret)
			return nil
		},
	}
	add.Flags().StringVar(&url, "url", "", "endpoint URL (required for a webhook)")
	add.Flags().StringVar(&kind, "kind", "webhook", "webhook, posthog, ga4, kafka or nats")
	add.Flags().StringArrayVar(&settingArgs, "setting", nil, "a setting of another kind than webhook, KEY=VALUE (repeated): posthog HOST, PROJECT_API_KEY_ENV|_FILE, ...; ga4 MEASUREMENT_ID, API_SECRET_ENV|_FILE, ...; kafka TOPIC; nats SUBJECT, STREAM")
	add.Flags().Int64Var(&org, "organization", 0, "organization the subscription belongs to (omit: platform-wide)")
	add.Flags().StringVar(&events, "events", "", "comma list of event-name globs (omit: every event)")
	add.Flags().StringVar(&secret, "secret", "", "signing secret whsec_... (visible in ps and shell history: prefer --secret-file; omit both: generated)")
	add.Flags().StringVar(&secretFile, "secret-file", "", "read the signing secret from this file (- for standard input)")
	add.Flags().StringVar(&filter, "filter", "", `property filter, an expr-lang expression on the envelope (omit: none), e.g. 'properties.delta < 0'`)
	add.Flags().StringVar(&contract, "contract", "", "contract policy for events that break the tracking plan: deliver, skip or dead-letter (omit: OUTBOXD_SUBSCRIPTION_CONTRACT)")

	var newFilter, newContract string
	var newSettings []string
	update := &cobra.Command{
		Use: "update ID", Short: "Change a subscription's property filter, contract policy ('' removes either) or settings; effective from its commit", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			id, err := strconv.ParseInt(args[0], 10, 64)
			if err != nil {
				return usageError{fmt.Errorf("subscription id %q: %w", args[0], err)}
			}
			setFilter, setContract := cmd.Flags().Changed("filter"), cmd.Flags().Changed("contract")
			if !setFilter && !setContract && len(newSettings) == 0 {
				return usageError{errors.New("nothing to update: give --filter, --contract or --setting ('' removes the filter, or the subscription's own policy; KEY= removes a setting)")}
			}
			settingsArg, err := parseSettings(newSettings, true)
			if err != nil {
				return err
			}
			filterArg, err := subscriptionFilter(newFilter)
			if err != nil {
				return err
			}
			contractArg, err := subscriptionContract(newContract)
			if err != nil {
				return err
			}
			ctx := cmd.Context()
			s, err := openSession(ctx, envMap, stderr)
			if err != nil {
				return err
			}
			defer s.close(ctx)
			// One transaction: both changes take effect from one commit.
			tx, err := s.conn.Begin(ctx)
			if err != nil {
				return fmt.Errorf("update subscription %d: %w", id, err)
			}
			defer tx.Rollback(ctx) //nolint:errcheck // a no-op after Commit
			tables := s.tables.With(tx)
			found := true
			if setFilter {
				if found, err = tables.SetFilter(ctx, id, filterArg); err != nil {
					return fmt.Errorf("update subscription %d: %w", id, err)
				}
			}
			if setContract && found {
				if found, err = tables.SetContract(ctx, id, contractArg); err != nil {
					return fmt.Errorf("update subscription %d: %w", id, err)
				}
			}
			var merged map[string]string
			if settingsArg != nil && found {
				kind, org, current, err := tables.SubscriptionKind(ctx, id)
				if errors.Is(err, store.ErrNoSubscription) {
					return fmt.Errorf("subscription %d not found", id)
				}
				if err != nil {
					return fmt.Errorf("update subscription %d: %w", id, err)
				}
				if kind == "webhook" {
					return usageError{fmt.Errorf("subscription %d is a webhook: --setting is for the other kinds", id)}
				}
				merged = maps.Clone(current)
				if merged == nil {
					merged = map[string]string{}
				}
				for k, v := range settingsArg {
					if v == "" {
						delete(merged, k)
					} else {
						merged[k] = v
					}
				}
				if err := checkSubscriptionSettings(kind, org, merged, s.subEnv); err != nil {
					return usageError{fmt.Errorf("--setting: %w", err)}
				}
				if found, err = tables.SetSettings(ctx, id, settingsArg); err != nil {
					return fmt.Errorf("update subscription %d: %w", id, err)
				}
			}
			if !found {
				return fmt.Errorf("subscription %d not found", id)
			}
			if err := tx.Commit(ctx); err != nil {
				return fmt.Errorf("update subscription %d: %w", id, err)
			}
			if setFilter {
				if filterArg == nil {
					fmt.Fprintf(stdout, "subscription %d has no filter\n", id)
				} else {
					fmt.Fprintf(stdout, "subscription %d filter: %s\n", id, *filterArg)
				}
			}
			if merged != nil {
				fmt.Fprintf(stdout, "subscription %d settings: %s\n", id, settingsText(merged))
			}
			if setContract {
				if contractArg == nil {
					fmt.Fprintf(stdout, "subscription %d contract policy: OUTBOXD_SUBSCRIPTION_CONTRACT's\n", id)
				} else {
					fmt.Fprintf(stdout, "subscription %d contract policy: %s\n", id, *contractArg)
				}
			}
			return nil
		},
	}
	update.Flags().StringVar(&newFilter, "filter", "", "the new property filter ('' removes it)")
	update.Flags().StringArrayVar(&newSettings, "setting", nil, "a setting of a subscription of another kind than webhook, KEY=VALUE (repeated; KEY= removes it)")
	update.Flags().StringVar(&newContract, "contract", "", "the new contract policy: deliver, skip or dead-letter ('' : OUTBOXD_SUBSCRIPTION_CONTRACT's)")

	var reason string
	var yes bool
	disable := &cobra.Command{
		Use: "disable ID", Short: "Disable a subscription: events committed after this get nothing", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if !yes {
				return usageError{fmt.Errorf("disable needs --yes")}
			}
			return setEnabled(cmd.Context(), envMap, stdout, stderr, args[0], false, reason)
		},
	}
	disable.Flags().StringVar(&reason, "reason", "disabled by an operator", "why")
	disable.Flags().BoolVar(&yes, "yes", false, "confirm")
	enable := &cobra.Command{
		Use: "enable ID", Short: "Enable a subscription (its parked deliveries resume)", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return setEnabled(cmd.Context(), envMap, stdout, stderr, args[0], true, "")
		},
	}
	var dropOld, rotYes bool
	var newSecretFlag, newSecretFile string
	rotate := &cobra.Command{
		Use:   "rotate-secret ID",
		Short: "Add a new signing secret (both sign until --drop-old), or drop all but the newest",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			id, err := strconv.ParseInt(args[0], 10, 64)
			if err != nil {
				return usageError{fmt.Errorf("subscription id %q: %w", args[0], err)}
			}
			ctx := cmd.Context()
			s, err := openSession(ctx, envMap, stderr)
			if err != nil {
				return err
			}
			defer s.close(ctx)
			if dropOld {
				if !rotYes {
					return usageError{fmt.Errorf("--drop-old needs --yes")}
				}
				found, err := s.tables.KeepNewestSecret(ctx, id)
				if err != nil {
					return fmt.Errorf("drop old secrets of subscription %d: %w", id, err)
				}
				if !found {
					return fmt.Errorf("subscription %d not found", id)
				}
				fmt.Fprintf(stdout, "subscription %d now signs with its newest secret only\n", id)
				return nil
			}
			sec, err := secretFrom(cmd, newSecretFlag, newSecretFile, stderr)
			if err != nil {
				return err
			}
			if sec == "" {
				sec = newSecret()
			}
			if err := (&sink.WebhookConfig{URL: "https://x.invalid", Secrets: []string{sec}}).Validate(); err != nil {
				return usageError{err}
			}
			found, err := s.tables.AddSecret(ctx, id, sec)
			if err != nil {
				return fmt.Errorf("rotate secret of subscription %d: %w", id, err)
			}
			if !found {
				return fmt.Errorf("subscription %d not found", id)
			}
			fmt.Fprintf(stdout, "subscription %d signs with the new and the old secrets\nnew secret: %s\n", id, sec)
			return nil
		},
	}
	rotate.Flags().BoolVar(&dropOld, "drop-old", false, "keep only the newest secret")
	rotate.Flags().BoolVar(&rotYes, "yes", false, "confirm --drop-old")
	rotate.Flags().StringVar(&newSecretFlag, "secret", "", "the new secret (visible in ps and shell history: prefer --secret-file; omit both: generated)")
	rotate.Flags().StringVar(&newSecretFile, "secret-file", "", "read the new secret from this file (- for standard input)")
	cmd.AddCommand(list, add, update, disable, enable, rotate)
	return cmd
}

// parseSettings reads --setting KEY=VALUE arguments; with removable, an
// empty value (KEY=) is kept, meaning remove the key.
func parseSettings(args []string, removable bool) (map[string]string, error) {
	if len(args) == 0 {
		return nil, nil
	}
	out := map[string]string{}
	for _, a := range args {
		k, v, ok := strings.Cut(a, "=")
		k = strings.TrimSpace(k)
		if !ok || k == "" || (v == "" && !removable) {
			return nil, usageError{fmt.Errorf("--setting %q: want KEY=VALUE", a)}
		}
		if _, dup := out[k]; dup {
			return nil, usageError{fmt.Errorf("--setting %s given twice", k)}
		}
		out[k] = v
	}
	return out, nil
}

// settingsText shows settings as KEY=VALUE, sorted (no secret is among
// them: only references).
func settingsText(settings map[string]string) string {
	parts := make([]string, 0, len(settings))
	for _, k := range slices.Sorted(maps.Keys(settings)) {
		parts = append(parts, k+"="+settings[k])
	}
	return strings.Join(parts, " ")
}

// subscriptionContract checks a --contract value: nil for none (the
// default's), the policy otherwise.
func subscriptionContract(src string) (*string, error) {
	src = strings.TrimSpace(src)
	if src == "" {
		return nil, nil
	}
	p, err := deliver.ParseContractPolicy(src)
	if err != nil {
		return nil, usageError{fmt.Errorf("--contract: %w", err)}
	}
	s := string(p)
	return &s, nil
}

// subscriptionFilter compiles a --filter value: nil for none, the trimmed
// expression otherwise; one that does not compile is a usage error saying
// why, and is never stored.
func subscriptionFilter(src string) (*string, error) {
	f, err := deliver.CompileFilter(src)
	if err != nil {
		return nil, usageError{fmt.Errorf("--filter: %w", err)}
	}
	if f == nil {
		return nil, nil
	}
	out := f.String()
	return &out, nil
}

func setEnabled(ctx context.Context, envMap map[string]string, stdout, stderr io.Writer, arg string, enabled bool, reason string) error {
	id, err := strconv.ParseInt(arg, 10, 64)
	if err != nil {
		return usageError{fmt.Errorf("subscription id %q: %w", arg, err)}
	}
	s, err := openSession(ctx, envMap, stderr)
	if err != nil {
		return err
	}
	defer s.close(ctx)
	var why *string
	if !enabled {
		why = &reason
	}
	found, err := s.tables.SetEnabled(ctx, id, enabled, why)
	if err != nil {
		return fmt.Errorf("update subscription %d: %w", id, err)
	}
	if !found {
		return fmt.Errorf("subscription %d not found", id)
	}
	fmt.Fprintf(stdout, "subscription %d enabled=%t\n", id, enabled)
	return nil
}

// newSecret returns a fresh Standard Webhooks secret.
func newSecret() string {
	b := make([]byte, 24)
	_, _ = rand.Read(b) // crypto/rand never fails on Linux
	return "whsec_" + base64.StdEncoding.EncodeToString(b)
}

// dlqFilter selects dead letters.
type dlqFilter struct {
	target, events, since, until string
	subscription, org            int64
	eventIDs                     []int64
	limit                        int
	// more is set by find: how many matched beyond limit.
	more int
}

func (f *dlqFilter) flags(cmd *cobra.Command) {
	cmd.Flags().StringVar(&f.target, "target", "", "sink name (webhook, subscription:ID, ...)")
	cmd.Flags().Int64Var(&f.subscription, "subscription", 0, "subscription id")
	cmd.Flags().StringVar(&f.events, "event", "", "comma list of event-name globs")
	cmd.Flags().Int64Var(&f.org, "organization", 0, "organization id")
	cmd.Flags().Int64SliceVar(&f.eventIDs, "event-id", nil, "event id(s), comma-separated or repeated")
	cmd.Flags().StringVar(&f.since, "since", "", "dead since (RFC 3339, a date, or a duration back from now: 24h, 7d)")
	cmd.Flags().StringVar(&f.until, "until", "", "dead until (same forms as --since)")
	cmd.Flags().IntVar(&f.limit, "limit", 0, "at most this many (0: all); how many more match is printed")
}

// parseWhen reads --since/--until as replay does (ops.ParseTime).
func parseWhen(s string) (*time.Time, error) {
	if s == "" {
		return nil, nil
	}
	t, err := ops.ParseTime(s, time.Now())
	if err != nil {
		return nil, err
	}
	return &t, nil
}

// deadLetter is the JSON form of a store.DeadLetterRow.
type deadLetter struct {
	ID        int64     `json:"id"`
	EventID   int64     `json:"event_id"`
	Sink      string    `json:"sink"`
	Status    *int32    `json:"last_status"`
	Error     string    `json:"last_error"`
	Attempts  int32     `json:"attempts"`
	DeadAt    time.Time `json:"dead_at"`
	EventName *string   `json:"event_name"`
	Org       *int64    `json:"organization_id"`
}

// find returns the dead letters matching f, with their events' name and
// organization.
func (f *dlqFilter) find(cmd *cobra.Command, s *dbSession) ([]deadLetter, error) {
	ctx := cmd.Context()
	globs, err := deliver.ParseGlobs(f.events)
	if err != nil {
		return nil, usageError{err}
	}
	since, err := parseWhen(f.since)
	if err != nil {
		return nil, usageError{fmt.Errorf("--since: %w", err)}
	}
	until, err := parseWhen(f.until)
	if err != nil {
		return nil, usageError{fmt.Errorf("--until: %w", err)}
	}
	target := f.target
	if f.subscription != 0 {
		target = deliver.SubscriptionTarget(f.subscription)
	}
	var org *int64
	if cmd.Flags().Changed("organization") {
		org = &f.org
	}
	all, err := s.tables.DeadLetters(ctx, store.DeadLetterFilter{Sink: target, OrganizationID: org, Since: since, Until: until, EventIDs: f.eventIDs})
	if err != nil {
		return nil, fmt.Errorf("list dead letters: %w", err)
	}
	if f.limit < 0 {
		return nil, usageError{fmt.Errorf("--limit must not be negative")}
	}
	var out []deadLetter
	f.more = 0
	for _, d := range all {
		name := ""
		if d.EventName != nil {
			name = *d.EventName
		}
		if len(globs) > 0 && !deliver.MatchGlobs(globs, name) {
			continue
		}
		if f.limit > 0 && len(out) == f.limit {
			f.more++
			continue
		}
		out = append(out, deadLetter(d))
	}
	return out, nil
}

func dlqCommand(envMap map[string]string, stdout, stderr io.Writer) *cobra.Command {
	cmd := &cobra.Command{Use: "dlq", Short: "Inspect, retry and purge dead-lettered deliveries"}
	var lf dlqFilter
	var asJSON bool
	list := &cobra.Command{
		Use: "list", Short: "List dead letters", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			out, err := findDead(cmd, envMap, stderr, &lf, nil)
			if err != nil {
				return err
			}
			if asJSON {
				if out == nil {
					out = []deadLetter{} // [] for no match, not null
				}
				moreMatch(stderr, lf.more)
				return json.NewEncoder(stdout).Encode(out)
			}
			tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "EVENT\tNAME\tORG\tSINK\tSTATUS\tATTEMPTS\tDEAD AT\tERROR")
			for _, d := range out {
				fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%s\t%d\t%s\t%s\n", d.EventID, orEmpty(d.EventName), int64OrDash(d.Org), d.Sink,
					int32OrDash(d.Status), d.Attempts, d.DeadAt.UTC().Format(time.RFC3339), clip(d.Error, 80))
			}
			fmt.Fprintf(tw, "%d dead letter(s)\n", len(out))
			if err := tw.Flush(); err != nil {
				return err
			}
			moreMatch(stderr, lf.more)
			return nil
		},
	}
	lf.flags(list)
	list.Flags().BoolVar(&asJSON, "json", false, "print JSON")

	var force bool
	retry := dlqAction(envMap, stdout, stderr, "retry",
		"Move dead letters back to the retry schedule (a running outboxd delivers them); those of events that still break the tracking plan stay unless --force", false,
		func(ctx context.Context, s *dbSession, out []deadLetter) ([]deadLetter, error) {
			if force {
				return out, nil
			}
			return keepStillInvalid(ctx, envMap, stdout, stderr, out)
		},
		func(ctx context.Context, s *dbSession, out []deadLetter) (int64, error) {
			ids := deadLetterIDs(out)
			// A dead letter of a target no running outboxd delivers to (a
			// removed subscription, another sink) would stay parked and due
			// for ever: refuse to revive it, and say which.
			unknown, err := s.tables.UnknownTargets(ctx, ids, s.targets)
			if err != nil {
				return 0, err
			}
			if len(unknown) > 0 {
				return 0, usageError{fmt.Errorf("dead letters of targets this outboxd does not deliver to (%s): nothing retried; select others with --target or --subscription, or purge them",
					strings.Join(unknown, ", "))}
			}
			return s.tables.ReviveDeadLetters(ctx, ids)
		}, "%d dead letter(s) moved back to the retry schedule\n")
	retry.Flags().BoolVar(&force, "force", false, "retry the dead letters of events that still break the tracking plan too (sent as they are)")
	purge := dlqAction(envMap, stdout, stderr, "purge",
		"Delete dead letters (their rows stay unprocessed in the outbox table)", true, nil,
		func(ctx context.Context, s *dbSession, out []deadLetter) (int64, error) {
			return s.tables.PurgeDeadLetters(ctx, deadLetterIDs(out))
		}, "%d dead letter(s) purged\n")
	cmd.AddCommand(list, retry, purge)
	return cmd
}

// findDead opens a session, finds the dead letters f selects and, when then
// is set, calls it with them before the session closes.
func findDead(cmd *cobra.Command, envMap map[string]string, stderr io.Writer, f *dlqFilter,
	then func(ctx context.Context, s *dbSession, out []deadLetter) error) ([]deadLetter, error) {
	ctx := cmd.Context()
	s, err := openSession(ctx, envMap, stderr)
	if err != nil {
		return nil, err
	}
	defer s.close(ctx)
	out, err := f.find(cmd, s)
	if err != nil || then == nil {
		return out, err
	}
	return out, then(ctx, s, out)
}

// dlqAction builds `dlq retry` and `dlq purge`: find the dead letters the
// filters select, then act on them (or only count them with --dry-run).
func dlqAction(envMap map[string]string, stdout, stderr io.Writer, verb, short string, needsYes bool,
	keep func(ctx context.Context, s *dbSession, out []deadLetter) ([]deadLetter, error),
	act func(ctx context.Context, s *dbSession, out []deadLetter) (int64, error), done string) *cobra.Command {
	var f dlqFilter
	var dry, yes bool
	cmd := &cobra.Command{
		Use: verb, Short: short, Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if needsYes && !yes && !dry {
				return usageError{fmt.Errorf("%s needs --yes (or --dry-run)", verb)}
			}
			_, err := findDead(cmd, envMap, stderr, &f, func(ctx context.Context, s *dbSession, out []deadLetter) error {
				if keep != nil {
					// Those it leaves out are kept, dry run or not.
					var err error
					if out, err = keep(ctx, s, out); err != nil {
						return fmt.Errorf("%s dead letters: %w", verb, err)
					}
				}
				if dry {
					fmt.Fprintf(stdout, "would %s %d dead letter(s)\n", verb, len(out))
					moreMatch(stderr, f.more)
					return nil
				}
				n, err := act(ctx, s, out)
				if err != nil {
					return fmt.Errorf("%s dead letters: %w", verb, err)
				}
				fmt.Fprintf(stdout, done, n)
				moreMatch(stderr, f.more)
				return nil
			})
			return err
		},
	}
	f.flags(cmd)
	cmd.Flags().BoolVar(&dry, "dry-run", false, "count only")
	if needsYes {
		cmd.Flags().BoolVar(&yes, "yes", false, "confirm")
	}
	return cmd
}

func deadLetterIDs(out []deadLetter) []int64 {
	ids := make([]int64, len(out))
	for i, d := range out {
		ids[i] = d.ID
	}
	return ids
}

// keepStillInvalid returns out without the dead letters the tracking plan
// put there (reason "contract: ...") whose events still break the plan
// stored now: retried, they would be sent as they are. It says how many
// it keeps, and why for the first. With no plan stored, none is kept.
func keepStillInvalid(ctx context.Context, envMap map[string]string, stdout, stderr io.Writer, out []deadLetter) ([]deadLetter, error) {
	var events []int64
	for _, d := range out {
		if strings.HasPrefix(d.Error, deliver.ContractReasonPrefix) {
			events = append(events, d.EventID)
		}
	}
	if len(events) == 0 {
		return out, nil
	}
	env, err := openOps(ctx, envMap, stderr, nil)
	if err != nil {
		return nil, err
	}
	defer env.client.Close()
	v, err := env.client.StoredPlan(ctx)
	if err != nil || v == nil {
		return out, err
	}
	// Read in pages: a dead-letter table may hold millions.
	rows := make(map[int64]*decode.Event, len(events))
	for page := range slices.Chunk(events, 1000) {
		got, err := env.client.Events(ctx, page)
		if err != nil {
			return nil, fmt.Errorf("read the events of contract dead letters: %w", err)
		}
		maps.Copy(rows, got)
	}
	keep := out[:0:0]
	var kept int
	var first string
	for _, d := range out {
		if e, ok := rows[d.EventID]; ok && strings.HasPrefix(d.Error, deliver.ContractReasonPrefix) {
			if verdict := v.Check(e.Body); !verdict.Valid {
				if kept == 0 {
					first = fmt.Sprintf("event %d: %s", d.EventID, verdict.Reason)
				}
				kept++
				continue
			}
		}
		keep = append(keep, d)
	}
	if kept > 0 {
		fmt.Fprintf(stdout, "%d dead letter(s) kept: their events still break the tracking plan (%s); fix the plan or retry them as they are with --force\n", kept, first)
	}
	return keep, nil
}

// moreMatch says how many dead letters matched beyond --limit.
func moreMatch(w io.Writer, more int) {
	if more > 0 {
		fmt.Fprintf(w, "%d more dead letter(s) match beyond --limit\n", more)
	}
}

func orEmpty(s *string) string {
	if s == nil {
		return ""
	}
	return *s
}

func int64OrDash(v *int64) string {
	if v == nil {
		return "-"
	}
	return strconv.FormatInt(*v, 10)
}

func int32OrDash(v *int32) string {
	if v == nil {
		return "-"
	}
	return strconv.FormatInt(int64(*v), 10)
}

func clip(s string, n int) string {
	if len(s) > n {
		return s[:n] + "…"
	}
	return s
}

// secretFrom returns the secret given by --secret-file (a file, or - for
// standard input; surrounding space trimmed) or else by --secret, which is
// accepted with a warning: a command line shows in ps and shell history.
func secretFrom(cmd *cobra.Command, flagValue, file string, stderr io.Writer) (string, error) {
	if file != "" {
		if cmd.Flags().Changed("secret") {
			return "", usageError{errors.New("--secret and --secret-file: give one")}
		}
		var b []byte
		var err error
		if file == "-" {
			b, err = io.ReadAll(io.LimitReader(cmd.InOrStdin(), 1<<16))
		} else {
			b, err = os.ReadFile(file)
		}
		if err != nil {
			return "", usageError{fmt.Errorf("--secret-file: %w", err)}
		}
		s := strings.TrimSpace(string(b))
		if s == "" {
			return "", usageError{fmt.Errorf("--secret-file %s is empty", file)}
		}
		return s, nil
	}
	if flagValue != "" {
		fmt.Fprintln(stderr, "warning: a secret given with --secret shows in ps and in shell history; use --secret-file (or - for standard input)")
	}
	return flagValue, nil
}

// warnURLCredentials warns when a URL given on the command line carries
// credentials (userinfo, or a query string, where tokens often travel): the
// command line shows in ps and shell history.
func warnURLCredentials(stderr io.Writer, flag, raw string) {
	u, err := url.Parse(raw)
	if err != nil {
		return
	}
	if u.User != nil || u.RawQuery != "" {
		fmt.Fprintf(stderr, "warning: the URL given with %s carries credentials or a query string, which show in ps and shell history; prefer the environment variable (or a file) for secrets\n", flag)
	}
}
