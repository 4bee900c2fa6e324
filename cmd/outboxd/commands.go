package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/rs/zerolog"
	"github.com/spf13/cobra"

	"github.com/outboxd/outboxd/cdc"
	"github.com/outboxd/outboxd/deliver"
	"github.com/outboxd/outboxd/internal/backoff"
	"github.com/outboxd/outboxd/internal/telemetry"
	"github.com/outboxd/outboxd/migrations"
	"github.com/outboxd/outboxd/pipeline"
)

// setup reads the configuration, applies flag overrides and builds the logger.
// An unknown OUTBOXD_* variable close to a known name is bad configuration
// (checkNearMisses); other unknown ones are logged as warnings.
func setup(envMap map[string]string, stderr io.Writer, override func(*config)) (config, zerolog.Logger, error) {
	c, warnings, err := loadConfig(envMap)
	if err != nil {
		return c, zerolog.Nop(), err
	}
	if err := checkNearMisses(envMap); err != nil {
		return c, zerolog.Nop(), err
	}
	if override != nil {
		override(&c)
	}
	log, err := c.logger(stderr)
	if err != nil {
		return c, log, err
	}
	for _, w := range warnings {
		log.Warn().Msg(w)
	}
	return c, log, nil
}

func runCommand(envMap map[string]string, stderr io.Writer) *cobra.Command {
	var webhookURL, httpAddr string
	cmd := &cobra.Command{
		Use:   "run",
		Short: "Stream the outbox table and deliver every event (the main job)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, log, err := setup(envMap, stderr, func(c *config) {
				if cmd.Flags().Changed("webhook-url") {
					c.WebhookURL = webhookURL
					warnURLCredentials(stderr, "--webhook-url", webhookURL)
				}
				if cmd.Flags().Changed("http-addr") {
					c.HTTPAddr = httpAddr
				} else if v, ok := envMap[envPrefix+"HTTP_ADDR"]; ok && strings.TrimSpace(v) == "" {
					// Set and empty turns health and metrics off; the env
					// parser would apply the default instead.
					c.HTTPAddr = ""
				}
			})
			if err != nil {
				return err
			}
			pc, err := c.pipelineConfig()
			if err != nil {
				return err
			}
			if c.HTTPAddr != "" {
				if _, err := c.monitorConfig(pc); err != nil {
					return err
				}
			}
			// Signed, or unsigned on purpose: checked before anything starts.
			if err := c.checkSigning(); err != nil {
				return err
			}
			otelEnv := func(k string) string { return envMap[k] }
			if _, err := telemetry.Read(otelEnv); err != nil {
				return configError{err.Error()}
			}
			specs, err := c.destinations(envMap)
			if err != nil {
				return err
			}
			guards, err := c.guards(envMap)
			if err != nil {
				return err
			}
			for i := range specs {
				specs[i].Guard = guards[specs[i].Name]
			}
			pc.DefaultGuard = guards[deliver.DefaultTarget]
			if pc.Contract, err = c.contract(envMap); err != nil {
				return err
			}
			pc.SubscriptionSink = c.subscriptionSinkOf(envMap, log)
			if specs != nil {
				dests, closeAll, err := buildDestinations(specs, envMap, log)
				if err != nil {
					return err
				}
				defer closeAll()
				pc.Sink, pc.Destinations = nil, dests
			} else if pc.DefaultFilter, pc.DefaultMask, err = c.defaultFilterMask(envMap); err != nil {
				return err
			} else if c.Sink != "webhook" {
				s, err := buildSink(c.Sink, envMap, log)
				if err != nil {
					return err
				}
				defer s.Close()
				pc.Sink = s
			}
			ctx := cmd.Context()
			opsSrv, err := startOps(ctx, c, pc, log)
			if err != nil {
				return err
			}
			defer opsSrv.stop()
			pc.Observer = opsSrv.observer()
			tel, err := telemetry.Start(ctx, telemetry.Options{Getenv: otelEnv, Gatherer: opsSrv.gatherer(), Version: version, Log: log})
			if err != nil {
				return configError{err.Error()} // built from the OTEL_* variables
			}
			defer tel.Shutdown()
			log.Info().Str("version", version).Str("slot", pc.Slot).Str("table", c.Table).Msg("outboxd starting")
			if c.usesWebhook() && c.WebhookUnsigned {
				log.Warn().Msg("OUTBOXD_WEBHOOK_UNSIGNED=true: requests to the default webhook are not signed")
			}
			again := false // the pipeline runs again after an interruption
			pace := newRestarts()
			for {
				began := time.Now()
				err := pipeline.Run(ctx, pc, log)
				var connErr *pgconn.ConnectError
				if ctx.Err() == nil && (again && errors.As(err, &connErr) || cdc.ConnectionLost(err)) {
					// Running again right after an interruption, or a
					// connection that broke in a start-up step (Postgres
					// restarting, say): wait for the database, as the
					// reader does, instead of exiting. Only a database that
					// never answered at the very start is an exit.
					again = true
					wait := pace.after(time.Since(began))
					log.Warn().Err(err).Dur("retry_in", wait).Msg("database not reachable; retrying")
					_ = backoff.Sleep(ctx, wait) // ctx's end is seen by the next run
					continue
				}
				again = false
				if errors.Is(err, cdc.ErrCatchupInterrupted) && ctx.Err() == nil {
					// Drained and checkpointed, the catch-up still pending:
					// the next run recreates the slot and catches up again.
					log.Warn().Err(err).Msg("catch-up interrupted; recreating the slot and catching up again")
					again = true
					pace.reset()
					continue
				}
				if errors.Is(err, cdc.ErrReset) && ctx.Err() == nil {
					// An operator's forced slot reset: start over as a first
					// start (a standby may create the slot first; then this
					// instance waits).
					log.Warn().Err(err).Msg("slot reset by an operator; starting over with a catch-up from the table")
					continue
				}
				if errors.Is(err, cdc.ErrTakenOver) && ctx.Err() == nil {
					// Cut off long enough for a standby to take the slot:
					// this instance dropped what it held (the new holder
					// delivers it) and runs again, which waits as a standby.
					log.Warn().Err(err).Msg("slot taken over by another instance; continuing as a standby")
					continue
				}
				if errors.Is(err, cdc.ErrDiverged) && ctx.Err() == nil {
					// A promoted standby that lacks part of what the old
					// primary streamed: what this instance held was dropped;
					// start again from the checkpoint on the new primary.
					log.Warn().Err(err).Msg("the promoted server's history forked before what was received; starting again from the checkpoint")
					continue
				}
				if errors.Is(err, cdc.ErrSlotLost) && ctx.Err() == nil {
					// Everything in flight was drained and checkpointed:
					// start again, which recreates the slot and catches up
					// from the table (OUTBOXD_SLOT_RECREATE=true).
					log.Warn().Err(err).Msg("slot lost while streaming; recreating it")
					continue
				}
				if err != nil {
					return err
				}
				break
			}
			log.Info().Msg("outboxd stopped")
			return nil
		},
	}
	cmd.Flags().StringVar(&webhookURL, "webhook-url", "", "webhook URL (overrides OUTBOXD_WEBHOOK_URL)")
	cmd.Flags().StringVar(&httpAddr, "http-addr", "", "health and metrics address (overrides OUTBOXD_HTTP_ADDR; empty disables)")
	return cmd
}

func migrateCommand(envMap map[string]string, stdout, stderr io.Writer) *cobra.Command {
	return &cobra.Command{
		Use:   "migrate",
		Short: "Create or upgrade the outbox table, outboxd's tables and the publication (idempotent)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, _, err := setup(envMap, stderr, nil)
			if err != nil {
				return err
			}
			if err := c.requireDatabase(); err != nil {
				return err
			}
			table, err := c.table()
			if err != nil {
				return err
			}
			ctx := cmd.Context()
			conn, err := pgx.Connect(ctx, c.DatabaseURL)
			if err != nil {
				return fmt.Errorf("connect: %w", err)
			}
			defer conn.Close(context.WithoutCancel(ctx))
			res, err := migrations.Migrate(ctx, conn, migrations.Options{Schema: table.Schema, Table: table.Name, Publication: c.Publication})
			if err != nil {
				return err
			}
			fmt.Fprintf(stdout, "schema version %d -> %d\n", res.FromVersion, res.ToVersion)
			if res.TableCreated {
				fmt.Fprintf(stdout, "created table %s\n", c.Table)
			}
			for _, col := range res.ColumnsAdded {
				fmt.Fprintf(stdout, "added column %s.%s\n", c.Table, col)
			}
			if res.PublicationCreated {
				fmt.Fprintf(stdout, "created publication %s (publish = insert)\n", c.Publication)
			}
			if res.TableAddedToPublication {
				fmt.Fprintf(stdout, "added %s to publication %s\n", c.Table, c.Publication)
			}
			return nil
		},
	}
}

// restarts paces the daemon's runs of its pipeline after a run that could not
// reach the database: quickly at first, then backing off to 10s while it stays
// unreachable. A run that lasted longer than that cap had reached it and
// worked, so the pace starts over: an outage a day after the last one is
// retried after 100ms, not 10s.
type restarts struct{ b *backoff.Backoff }

func newRestarts() *restarts { return &restarts{b: backoff.New(100*time.Millisecond, 10*time.Second)} }

// after returns the wait before the next run, after a failed run of ranFor.
func (r *restarts) after(ranFor time.Duration) time.Duration {
	if ranFor > r.b.Max {
		r.b.Reset()
	}
	return r.b.Next()
}

func (r *restarts) reset() { r.b.Reset() }
