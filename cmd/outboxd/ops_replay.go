package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/outboxd/outboxd/decode"
	"github.com/outboxd/outboxd/deliver"
	"github.com/outboxd/outboxd/ops"
	"github.com/outboxd/outboxd/plan"
	"github.com/outboxd/outboxd/sink"
)

func replayCommand(envMap map[string]string, stdout, stderr io.Writer) *cobra.Command {
	var (
		fromID, toID, subscription int64
		since, until, webhookURL   string
		destination                string
		orgs                       []int64
		events                     []string
		dryRun, asJSON, asIs       bool
		rate                       float64
		concurrency, maxAttempts   int
	)
	cmd := &cobra.Command{
		Use:   "replay",
		Short: "Re-deliver events from the table, processed or not, to the sink (filters, rate limit, --dry-run)",
		Long: `Re-deliver events from the outbox table whatever their processed flag, in id
order, to the sink run delivers to (OUTBOXD_SINK with its variables: the
default webhook, OUTBOXD_WEBHOOK_URL signed with OUTBOXD_WEBHOOK_SECRET, or
stdout, Kafka, NATS, PostHog, GA4; with OUTBOXD_SINKS, the destination
--destination names), or to a subscription (--subscription), or to
--webhook-url. Each delivery carries the event's message id as the first
one did (webhook-id, outboxd-message-id, Nats-Msg-Id, the PostHog uuid) and
the header "webhook-replay: true" where the sink has headers.
Replay marks nothing and does not touch the slot; rows inserted after it starts
are left to the daemon.

A replay sends the target only what run would: the target's mask applies, and
so do its property filter and its contract policy (skip or dead-letter
withhold an event that breaks the tracking plan stored now); withheld events
are counted, not sent. --as-is sends every selected event, the mask still
applied. --dry-run with a filter or policy reads the rows to count them.

Filters combine (all must hold):
  --from-id/--to-id     id range, inclusive
  --since/--until       occurred_at range (since inclusive, until exclusive):
                        RFC 3339, a date, or a duration back from now (24h, 7d)
  --organization        organization ids (comma list or repeated)
  --event               event-name globs, path.Match syntax (order.*, comma list)

Exit code 1 when any event failed (after the sink's retries).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			now := time.Now()
			var f ops.Filter
			if cmd.Flags().Changed("from-id") {
				f.FromID = &fromID
			}
			if cmd.Flags().Changed("to-id") {
				f.ToID = &toID
			}
			var err error
			if since != "" {
				if f.Since, err = ops.ParseTime(since, now); err != nil {
					return usageError{fmt.Errorf("--since: %w", err)}
				}
			}
			if until != "" {
				if f.Until, err = ops.ParseTime(until, now); err != nil {
					return usageError{fmt.Errorf("--until: %w", err)}
				}
			}
			f.Organizations = orgs
			for _, e := range events {
				globs, err := ops.ParseGlobs(e)
				if err != nil {
					return usageError{fmt.Errorf("--event: %w", err)}
				}
				f.Events = append(f.Events, globs...)
			}
			if err := f.Validate(); err != nil {
				return usageError{err}
			}
			if rate < 0 {
				return usageError{errors.New("--rate must not be negative")}
			}
			if concurrency <= 0 {
				return usageError{errors.New("--concurrency must be positive")}
			}
			if cmd.Flags().Changed("subscription") && cmd.Flags().Changed("webhook-url") {
				return usageError{errors.New("--subscription and --webhook-url name two targets: give one")}
			}

			ctx := cmd.Context()
			env, err := openOps(ctx, envMap, stderr, func(c *config) {
				if cmd.Flags().Changed("webhook-url") {
					c.WebhookURL = webhookURL
				}
				if cmd.Flags().Changed("max-attempts") {
					c.WebhookMaxAttempts = maxAttempts
				}
			})
			if err != nil {
				return err
			}
			defer env.client.Close()
			c := env.cfg

			wc := sink.WebhookConfig{Name: "webhook", URL: c.WebhookURL, Secrets: splitSecrets(c.WebhookSecret),
				HTTPConfig: sink.HTTPConfig{Timeout: c.WebhookTimeout, AllowPrivate: c.AllowPrivateSinks,
					RetryConfig: sink.RetryConfig{MaxAttempts: c.WebhookMaxAttempts, BackoffMax: c.WebhookBackoffMax}},
				AllowPrivateSetting:      envPrefix + "ALLOW_PRIVATE_SINKS",
				SubscriptionAllowPrivate: c.AllowPrivateSubscriptions, SubscriptionAllowPrivateSetting: envPrefix + "ALLOW_PRIVATE_SUBSCRIPTIONS"}
			target := "the default webhook"
			var sub *ops.Subscription
			var subSink sink.Sink // a subscription of another kind than webhook
			if cmd.Flags().Changed("subscription") {
				sub, err = env.client.Subscription(ctx, subscription)
				if err != nil {
					if errors.Is(err, ops.ErrNoSubscriptions) || errors.Is(err, ops.ErrUnknownSubscription) {
						return usageError{fmt.Errorf("--subscription: %w", err)}
					}
					return err
				}
				if f, err = f.Restrict(sub); err != nil {
					return usageError{fmt.Errorf("--subscription: %w", err)}
				}
				if sub.Kind != "webhook" {
					target = fmt.Sprintf("subscription %d (%s)", sub.ID, sub.Kind)
					if !dryRun {
						s, err := c.subscriptionSinkOf(envMap, env.log)(deliver.Subscription{ID: sub.ID, Kind: sub.Kind, Settings: sub.Settings})
						if err != nil {
							return fmt.Errorf("%s: %w", target, err)
						}
						if cl, ok := s.(interface{ Close() }); ok {
							defer cl.Close()
						}
						subSink = s
					}
				} else if len(sub.Secrets) == 0 {
					// Never unsigned by accident: a subscription without a
					// secret gets nothing from the daemon either.
					return usageError{fmt.Errorf("--subscription: subscription %d has no signing secret; add one with `outboxd subscription rotate-secret`", sub.ID)}
				}
				if !sub.Enabled {
					env.log.Warn().Int64("subscription", sub.ID).Msg("the subscription is disabled; replaying to it anyway, as asked")
				}
				if sub.Kind == "webhook" {
					// A tenant's URL: the subscriptions' own address guard.
					wc = wc.ForSubscription(fmt.Sprintf("subscription:%d", sub.ID), sub.URL, sub.Secrets)
					target = fmt.Sprintf("subscription %d", sub.ID)
				}
			}
			// Without --subscription or --webhook-url, the events go where
			// run sends them: the sink OUTBOXD_SINK names, or the destination
			// of OUTBOXD_SINKS --destination names (needed when it lists
			// several: a replay never guesses which).
			kind := "webhook"
			if !cmd.Flags().Changed("subscription") && !cmd.Flags().Changed("webhook-url") {
				if kind, err = replayKind(c, destination, cmd.Flags().Changed("destination")); err != nil {
					return err
				}
			} else if cmd.Flags().Changed("destination") {
				return usageError{errors.New("--destination and --subscription or --webhook-url name two targets: give one")}
			}
			otherSink := target == "the default webhook" && kind != "webhook" && !cmd.Flags().Changed("webhook-url")
			if otherSink {
				target = "the " + kind + " sink"
				if c.Sinks != "" {
					// The destination gets only its OUTBOXD_<KIND>_EVENTS.
					name := strings.ToUpper(kind) + "_EVENTS"
					globs, err := ops.ParseGlobs(envMap[envPrefix+name])
					if err != nil {
						return badVar(name, "%v", err)
					}
					f.TargetEvents = globs
				}
			}
			if target == "the default webhook" {
				// Unsigned only when OUTBOXD_WEBHOOK_UNSIGNED says so, as for run.
				if err := c.checkSigning(); err != nil {
					return err
				}
				// The default webhook receives only OUTBOXD_WEBHOOK_EVENTS
				// (all when empty): a replay sends it nothing else.
				globs, err := ops.ParseGlobs(envMap[envPrefix+"WEBHOOK_EVENTS"])
				if err != nil {
					return badVar("WEBHOOK_EVENTS", "%v", err)
				}
				f.TargetEvents = globs
			}
			opts := ops.ReplayOptions{Filter: f, DryRun: dryRun, Rate: rate, Concurrency: concurrency}
			if subSink != nil {
				opts.Sink = subSink
			} else if !dryRun && otherSink {
				s, err := buildSink(kind, envMap, env.log)
				if err != nil {
					return err
				}
				defer s.Close()
				opts.Sink = s
			} else if !dryRun {
				if wc.URL == "" {
					return badVar("WEBHOOK_URL", "required: the URL events are replayed to (or --webhook-url, or --subscription)")
				}
				if wc.MaxAttempts <= 0 {
					return usageError{errors.New("--max-attempts must be positive")}
				}
				w, err := sink.NewWebhook(wc, env.log)
				if err != nil {
					if target != "the default webhook" {
						return fmt.Errorf("%s: %w", target, err)
					}
					name := "WEBHOOK_URL"
					if strings.Contains(strings.ToLower(err.Error()), "secret") {
						name = "WEBHOOK_SECRET"
					}
					return badVar(name, "%v", err)
				}
				defer w.Close()
				opts.Sink = w
			}
			if opts.Sink != nil && !cmd.Flags().Changed("subscription") && !cmd.Flags().Changed("webhook-url") {
				// The destination's own headers (a token it requires), and
				// only to its configured address: never to --webhook-url.
				gc, err := guardConfig(kind, envMap)
				if err != nil {
					return err
				}
				if len(gc.Headers) > 0 {
					opts.Sink = deliver.NewGuard(kind, deliver.GuardConfig{Headers: gc.Headers}).Wrap(opts.Sink)
				}
			}
			// A replay never sends what run would not send the target: its
			// mask applies, and unless --as-is so do its property filter and
			// its contract policy (the plan stored now decides validity).
			var pf *deliver.Filter
			policy := deliver.ContractDeliver
			switch {
			case cmd.Flags().Changed("subscription"):
				if pf, err = deliver.CompileFilter(sub.Filter); err != nil {
					return fmt.Errorf("%s: its filter does not compile (outboxd subscription update --filter): %w", target, err)
				}
				cc, err := c.contract(envMap)
				if err != nil {
					return err
				}
				policy = cc.Subscriptions
				if sub.Contract != "" {
					if policy, err = deliver.ParseContractPolicy(sub.Contract); err != nil {
						return fmt.Errorf("%s: %w", target, err)
					}
				}
			case otherSink || target == "the default webhook":
				filterKind, name := kind, kind
				if !otherSink {
					filterKind = "webhook"
				}
				if _, multi, _ := c.sinkKinds(); !multi {
					name = deliver.DefaultTarget
				}
				var mask *sink.Mask
				if pf, mask, err = filterMask(envMap, filterKind); err != nil {
					return err
				}
				if opts.Sink != nil {
					opts.Sink = sink.Masked(opts.Sink, mask)
				}
				cc, err := c.contract(envMap)
				if err != nil {
					return err
				}
				if policy = cc.Targets[name]; policy == "" {
					policy = cc.Default
				}
			}
			if !asIs {
				var v *plan.Validator
				if policy != deliver.ContractDeliver && policy != "" {
					if v, err = env.client.StoredPlan(ctx); err != nil {
						return err
					}
				}
				opts.Check = replayCheck(pf, v)
			}

			progress := ops.NewProgress()
			opts.Progress = progress
			var stop func()
			if !dryRun {
				rep := &ops.ProgressReporter{Terminal: isTerminal(stderr), Out: stderr, Log: env.log.With().Str("component", "replay").Logger()}
				stop = rep.Start(ctx, progress)
			}
			start := time.Now()
			res, err := env.client.Replay(ctx, opts)
			if stop != nil {
				stop()
			}
			if res == nil {
				return err
			}
			if asJSON {
				out := struct {
					*ops.ReplayResult
					DryRun         bool    `json:"dry_run"`
					Target         string  `json:"target"`
					ElapsedSeconds float64 `json:"elapsed_seconds"`
				}{res, dryRun, target, time.Since(start).Seconds()}
				enc := json.NewEncoder(stdout)
				enc.SetIndent("", "  ")
				if perr := enc.Encode(out); perr != nil && err == nil {
					err = fmt.Errorf("write result: %w", perr)
				}
			} else {
				printReplay(stdout, res, dryRun, opts.Check != nil, target, time.Since(start))
			}
			switch {
			case err != nil && ctx.Err() != nil:
				return fmt.Errorf("replay interrupted after %d of %d events", res.Replayed+res.Failed, res.Matched)
			case err != nil:
				return err
			case res.Failed > 0 || res.Skipped > 0:
				return fmt.Errorf("replay: %d of %d events failed, %d skipped", res.Failed, res.Matched, res.Skipped)
			}
			return nil
		},
	}
	fl := cmd.Flags()
	fl.Int64Var(&fromID, "from-id", 0, "first id to replay (inclusive)")
	fl.Int64Var(&toID, "to-id", 0, "last id to replay (inclusive)")
	fl.StringVar(&since, "since", "", "occurred_at at or after: RFC 3339, a date, or a duration back from now (24h, 7d)")
	fl.StringVar(&until, "until", "", "occurred_at before: RFC 3339, a date, or a duration back from now")
	fl.Int64SliceVar(&orgs, "organization", nil, "organization ids (comma list or repeated)")
	fl.StringArrayVar(&events, "event", nil, "event-name globs (path.Match syntax; comma list or repeated)")
	fl.Int64Var(&subscription, "subscription", 0, "replay to this subscription (its URL, secrets, organization and events) instead of the default webhook")
	fl.StringVar(&webhookURL, "webhook-url", "", "webhook URL (overrides OUTBOXD_WEBHOOK_URL)")
	fl.StringVar(&destination, "destination", "", "with OUTBOXD_SINKS: the destination (a kind it lists) to replay to; required when it lists several")
	fl.IntVar(&maxAttempts, "max-attempts", 0, "attempts per event before it counts as failed (overrides OUTBOXD_WEBHOOK_MAX_ATTEMPTS)")
	fl.BoolVar(&dryRun, "dry-run", false, "count the matching events, deliver nothing")
	fl.Float64Var(&rate, "rate", 0, "at most this many events per second (0: no limit)")
	fl.IntVar(&concurrency, "concurrency", 1, "deliveries in flight; above 1 events of one organization may arrive out of order")
	fl.BoolVar(&asJSON, "json", false, "print the result as JSON")
	fl.BoolVar(&asIs, "as-is", false, "send every selected event: ignore the target's property filter and contract policy (its mask still applies)")
	return cmd
}

// replayKind returns the sink kind a replay without --subscription or
// --webhook-url delivers to: OUTBOXD_SINK's, or with OUTBOXD_SINKS the one
// --destination names (or the only one listed).
func replayKind(c config, destination string, given bool) (string, error) {
	kinds, multi, err := c.sinkKinds()
	if err != nil {
		return "", err
	}
	if !multi {
		if given {
			return "", usageError{errors.New("--destination applies with OUTBOXD_SINKS; OUTBOXD_SINK names the one sink")}
		}
		return c.Sink, nil
	}
	if !given {
		if len(kinds) == 1 {
			return kinds[0], nil
		}
		return "", usageError{fmt.Errorf("OUTBOXD_SINKS lists %s: name the one to replay to with --destination", strings.Join(kinds, ", "))}
	}
	d := strings.ToLower(strings.TrimSpace(destination))
	if !slices.Contains(kinds, d) {
		return "", usageError{fmt.Errorf("--destination %q is not one of OUTBOXD_SINKS (%s)", destination, strings.Join(kinds, ", "))}
	}
	return d, nil
}

// splitSecrets splits OUTBOXD_WEBHOOK_SECRET (comma or space separated, for
// rotation) as `run` does.
func splitSecrets(s string) []string {
	return strings.Fields(strings.ReplaceAll(s, ",", " "))
}

func printReplay(w io.Writer, res *ops.ReplayResult, dryRun, checked bool, target string, elapsed time.Duration) {
	var parts []string
	for _, name := range sortedKeys(res.ByEvent) {
		label := name
		if label == "" {
			label = "(no name)"
		}
		parts = append(parts, fmt.Sprintf("%s %d", label, res.ByEvent[name]))
	}
	breakdown := ""
	if len(parts) > 0 {
		breakdown = " (" + strings.Join(parts, ", ") + ")"
	}
	withheld := ""
	if checked {
		withheld = fmt.Sprintf(", withheld %d (property filter) and %d (contract policy)", res.Filtered, res.Invalid)
	}
	if dryRun {
		fmt.Fprintf(w, "replay (dry run): %d events match%s; nothing was sent to %s\n", res.Matched, breakdown, target)
		if checked {
			fmt.Fprintf(w, "would send %d%s, skip %d\n", res.Matched-res.Filtered-res.Invalid-res.Skipped, withheld, res.Skipped)
		}
		return
	}
	fmt.Fprintf(w, "replay to %s: %d events matched%s\n", target, res.Matched, breakdown)
	fmt.Fprintf(w, "replayed %d, failed %d, skipped %d%s in %s\n", res.Replayed, res.Failed, res.Skipped, withheld, elapsed.Round(time.Millisecond))
	if len(res.FailedIDs) > 0 {
		ids := make([]string, len(res.FailedIDs))
		for i, id := range res.FailedIDs {
			ids[i] = fmt.Sprint(id)
		}
		more := ""
		if res.Failed > int64(len(res.FailedIDs)) {
			more = ", …"
		}
		fmt.Fprintf(w, "failed event ids: %s%s\n", strings.Join(ids, ", "), more)
	}
}

// replayCheck withholds from a replay what run would not send the target:
// an event its property filter pf does not let through (one it cannot
// evaluate included, as run), and with a validator (a plan stored and a
// policy skip or dead-letter) an event that breaks the plan. nil when
// neither applies.
func replayCheck(pf *deliver.Filter, v *plan.Validator) func(*decode.Event) ops.Verdict {
	if pf == nil && v == nil {
		return nil
	}
	return func(e *decode.Event) ops.Verdict {
		if pf != nil {
			if ok, err := pf.Match(deliver.NewEventEnv(e)); err != nil || !ok {
				return ops.Filtered
			}
		}
		if v != nil && !v.Check(e.Body).Valid {
			return ops.Invalid
		}
		return ops.Send
	}
}
