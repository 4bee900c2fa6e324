package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/mattn/go-isatty"
	"github.com/spf13/cobra"
	"golang.org/x/sync/errgroup"

	"github.com/outboxd/outboxd/internal/pgserver"
	"github.com/outboxd/outboxd/migrations"
	"github.com/outboxd/outboxd/pipeline"
)

// demoInterval is the mean pause between two demo transactions.
const demoInterval = 400 * time.Millisecond

// devEnv is the configuration `outboxd dev` runs the pipeline with: the
// user's OUTBOXD_* variables (log level, batching, ordering, …), with the
// database, the sink and the names pinned to what dev itself set up. The
// receiver is on loopback, so private sinks must be allowed. dev signs with a
// secret of its own, which its receiver checks: a user's
// OUTBOXD_WEBHOOK_UNSIGNED does not apply. Subscriptions keep the user's
// OUTBOXD_ALLOW_PRIVATE_SUBSCRIPTIONS.
func devEnv(envMap map[string]string, dbURL, webhookURL, secret string) map[string]string {
	env := maps.Clone(envMap)
	if env == nil {
		env = map[string]string{}
	}
	// dev pins one webhook sink: a user's OUTBOXD_SINKS would contradict
	// it (both set is a configuration error).
	for _, k := range []string{"TABLE", "SLOT", "PUBLICATION", "HTTP_ADDR", "WEBHOOK_UNSIGNED", "SINKS"} {
		delete(env, envPrefix+k)
	}
	env[envPrefix+"DATABASE_URL"] = dbURL
	env[envPrefix+"SINK"] = "webhook"
	env[envPrefix+"WEBHOOK_URL"] = webhookURL
	env[envPrefix+"WEBHOOK_SECRET"] = secret
	env[envPrefix+"ALLOW_PRIVATE_SINKS"] = "true"
	if env[envPrefix+"LOG_FORMAT"] == "" {
		env[envPrefix+"LOG_FORMAT"] = "console"
	}
	return env
}

// devWebhookSecret makes a Standard Webhooks secret: whsec_ + base64 of 24
// random bytes.
func devWebhookSecret() (string, error) {
	key := make([]byte, 24)
	if _, err := rand.Read(key); err != nil {
		return "", fmt.Errorf("make a webhook secret: %w", err)
	}
	return "whsec_" + base64.StdEncoding.EncodeToString(key), nil
}

func devCommand(envMap map[string]string, stdout, stderr io.Writer) *cobra.Command {
	var (
		demo    bool
		dataDir string
		port    int
	)
	cmd := &cobra.Command{
		Use:   "dev",
		Short: "Try outboxd with no setup: a throwaway Postgres, a printing receiver and the pipeline between them",
		Long: `Start everything outboxd needs on this machine, in one process:
a PostgreSQL server from the local server binaries (on 127.0.0.1, trust
authentication, data in a temporary directory unless --data-dir is given),
the outbox table (outboxd migrate), a webhook receiver that verifies each
request's signature and prints each event, and outboxd's pipeline between
them. With --demo, sample events of a few organizations arrive a few times a
second. It prints the psql URL: insert your own rows and watch them arrive.

Ctrl-C stops everything it started and removes the temporary directory.`,
		Example: `  outboxd dev --demo
  outboxd dev --data-dir ./outboxd-dev-data --port 55432`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if port < 0 || port > 65535 {
				return usageError{fmt.Errorf("--port %d is not a TCP port", port)}
			}
			err := runDev(cmd.Context(), envMap, devOptions{demo: demo, dataDir: dataDir, port: port}, stdout, stderr)
			if err != nil && cmd.Context().Err() != nil && !errors.As(err, new(configError)) {
				// Interrupted while starting: what was started is cleaned up.
				fmt.Fprintln(stderr, "outboxd dev: interrupted")
				return nil
			}
			return err
		},
	}
	cmd.Flags().BoolVar(&demo, "demo", false, "insert sample events (a few per second)")
	cmd.Flags().StringVar(&dataDir, "data-dir", "", "keep PostgreSQL's data in this directory, reused on the next run (default: a temporary directory, removed on exit)")
	cmd.Flags().IntVar(&port, "port", 0, "PostgreSQL port on 127.0.0.1 (default: a free port)")
	return cmd
}

type devOptions struct {
	demo    bool
	dataDir string
	port    int
}

func runDev(ctx context.Context, envMap map[string]string, opt devOptions, stdout, stderr io.Writer) (err error) {
	begin := time.Now()
	secret, err := devWebhookSecret()
	if err != nil {
		return err
	}
	// Check the user's OUTBOXD_* settings before starting anything.
	probe, _, err := setup(devEnv(envMap, "postgres://postgres@127.0.0.1:5432/postgres", "http://127.0.0.1:9/", secret), io.Discard, nil)
	if err != nil {
		return err
	}
	if _, err := probe.pipelineConfig(); err != nil {
		return err
	}
	bin, err := pgserver.FindBinDir()
	if err != nil {
		return fmt.Errorf("outboxd dev runs a PostgreSQL server of its own and needs its binaries (initdb, postgres, pg_ctl): %w; on Debian or Ubuntu: apt-get install postgresql", err)
	}
	fmt.Fprintf(stderr, "outboxd dev: starting PostgreSQL from %s\n", bin)
	// A kept --data-dir is durable and reused by the next run; without it the
	// cluster lives in a temporary directory that Teardown removes.
	pg, err := pgserver.Open(bin, pgserver.Options{DataDir: opt.dataDir, Port: opt.port})
	if err != nil {
		return fmt.Errorf("start postgres: %w", err)
	}
	defer func() {
		if cerr := pg.Teardown(); cerr != nil {
			err = errors.Join(err, fmt.Errorf("stop postgres: %w", cerr))
			return
		}
		if opt.dataDir != "" {
			fmt.Fprintf(stdout, "outboxd dev: PostgreSQL stopped, data kept in %s\n", pg.DataDir())
		} else {
			fmt.Fprintf(stdout, "outboxd dev: PostgreSQL stopped, %s removed\n", filepath.Dir(pg.DataDir()))
		}
	}()
	dbURL := fmt.Sprintf("postgres://%s@127.0.0.1:%d/postgres?sslmode=disable", pgserver.Superuser, pg.Port())

	if err := devMigrate(ctx, dbURL); err != nil {
		return err
	}

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return fmt.Errorf("listen for the receiver: %w", err)
	}
	defer ln.Close() // if never served
	webhookURL := "http://" + ln.Addr().String() + "/"

	c, log, err := setup(devEnv(envMap, dbURL, webhookURL, secret), stderr, nil)
	if err != nil {
		return err
	}
	pc, err := c.pipelineConfig()
	if err != nil {
		return err
	}
	v, err := newHookVerifier([]string{secret}, 5*time.Minute)
	if err != nil {
		return err
	}
	printer := newDevPrinter(stdout, begin)
	rc := &webhookReceiver{verify: v, status: func() int { return 200 }, record: printer.record}

	printDevBanner(stdout, devBanner{url: dbURL, dataDir: pg.DataDir(), kept: opt.dataDir != "", receiver: webhookURL,
		demo: opt.demo, psql: devPsqlPath(bin)})

	// The receiver and Postgres outlive the pipeline: on Ctrl-C the demo stops
	// at once, the pipeline drains its in-flight deliveries into the receiver
	// and writes its checkpoint, then the receiver and Postgres stop.
	recvCtx, stopReceiver := context.WithCancel(context.WithoutCancel(ctx))
	recvDone := make(chan error, 1)
	go func() { recvDone <- serveHooks(recvCtx, ln, rc) }()
	defer func() {
		stopReceiver()
		if rerr := <-recvDone; rerr != nil {
			err = errors.Join(err, rerr)
		}
	}()

	var pool *pgxpool.Pool
	if opt.demo {
		if pool, err = pgxpool.New(ctx, dbURL); err != nil {
			return fmt.Errorf("open demo pool: %w", err)
		}
		defer pool.Close()
	}
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error {
		if err := pipeline.Run(gctx, pc, log); err != nil {
			return fmt.Errorf("pipeline: %w", err)
		}
		return nil
	})
	g.Go(func() error { return devWatchPostgres(gctx, pg) })
	if pool != nil {
		g.Go(func() error { return runDemo(gctx, pool, demoInterval) })
	}
	err = g.Wait()
	n, bad := printer.counts()
	fmt.Fprintf(stdout, "\noutboxd dev: pipeline stopped; received %d events (%d requests with a bad signature)\n", n, bad)
	return err
}

// devMigrate applies the migrations with the default names.
func devMigrate(ctx context.Context, dbURL string) error {
	conn, err := pgx.Connect(ctx, dbURL)
	if err != nil {
		return fmt.Errorf("connect to postgres: %w", err)
	}
	defer conn.Close(context.WithoutCancel(ctx))
	if _, err := migrations.Migrate(ctx, conn, migrations.Options{}); err != nil {
		return fmt.Errorf("migrate: %w", err)
	}
	return nil
}

// devWatchPostgres fails when the server exits while dev runs (someone stopped
// it): the pipeline would otherwise retry forever against nothing.
func devWatchPostgres(ctx context.Context, pg *pgserver.Instance) error {
	tick := time.NewTicker(500 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-tick.C:
			if !pg.Running() {
				return errors.New("postgres exited")
			}
		}
	}
}

// devPsqlPath is "psql" when it is on PATH, else the one next to the server.
func devPsqlPath(binDir string) string {
	if _, err := exec.LookPath("psql"); err == nil {
		return "psql"
	}
	return filepath.Join(binDir, "psql")
}

type devBanner struct {
	url, dataDir, receiver, psql string
	kept, demo                   bool
}

func printDevBanner(w io.Writer, b devBanner) {
	data := b.dataDir + " (removed on exit)"
	if b.kept {
		data = b.dataDir + " (kept)"
	}
	demo := "off (add --demo for sample events)"
	if b.demo {
		demo = "sample events from 3 organizations, a few per second"
	}
	fmt.Fprintf(w, `
outboxd dev: ready. Ctrl-C stops everything.

  postgres  %s
  data      %s
  receiver  %s (checks each signature, prints each event)
  demo      %s

Insert an event and watch it arrive:
  %s '%s'
  INSERT INTO domain_event (event_name, organization_id, properties) VALUES ('batch_started', 7, '{"batch_id":"B-19"}');

Events (occurred_at, id, event_name, organization, entity, properties, latency):
`, b.url, data, b.receiver, demo, b.psql, b.url)
}

// devPrinter prints each event the dev receiver gets on one line.
type devPrinter struct {
	mu     sync.Mutex
	w      io.Writer
	color  bool
	begin  time.Time
	first  bool
	events int
	bad    int
}

func newDevPrinter(w io.Writer, begin time.Time) *devPrinter {
	color := false
	if f, ok := w.(*os.File); ok && isatty.IsTerminal(f.Fd()) && os.Getenv("NO_COLOR") == "" && os.Getenv("TERM") != "dumb" {
		color = true
	}
	return &devPrinter{w: w, color: color, begin: begin, first: true}
}

// devEnvelope is the part of the webhook body (docs/DESIGN.md §4) dev prints.
type devEnvelope struct {
	ID             int64           `json:"id"`
	EventName      string          `json:"event_name"`
	OccurredAt     time.Time       `json:"occurred_at"`
	OrganizationID *int64          `json:"organization_id"`
	EntityType     *string         `json:"entity_type"`
	EntityID       *string         `json:"entity_id"`
	Properties     json.RawMessage `json:"properties"`
}

const devMaxPropsShown = 240

func (p *devPrinter) record(d *hookRequest) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if d.Valid != nil && !*d.Valid {
		p.bad++
		_, err := fmt.Fprintf(p.w, "%s rejected a request (answered %d): %s\n", d.At.Format("15:04:05.000"), d.Status, d.Problem)
		return err
	}
	var events []devEnvelope
	body := bytes.TrimSpace(d.Body)
	if len(body) > 0 && body[0] == '[' {
		if err := json.Unmarshal(body, &events); err != nil {
			return fmt.Errorf("decode batch body: %w", err)
		}
	} else {
		var e devEnvelope
		if err := json.Unmarshal(body, &e); err != nil {
			return fmt.Errorf("decode body: %w", err)
		}
		events = []devEnvelope{e}
	}
	var b strings.Builder
	for _, e := range events {
		p.events++
		org := "-"
		if e.OrganizationID != nil {
			org = fmt.Sprint(*e.OrganizationID)
		}
		entity := "-"
		if e.EntityType != nil || e.EntityID != nil {
			entity = devStr(e.EntityType) + "/" + devStr(e.EntityID)
		}
		var props bytes.Buffer
		if json.Compact(&props, e.Properties) != nil {
			props.Reset()
			props.Write(e.Properties)
		}
		shown := props.String()
		if len(shown) > devMaxPropsShown {
			shown = shown[:devMaxPropsShown] + "…"
		}
		latency := d.At.Sub(e.OccurredAt).Round(time.Millisecond)
		name := fmt.Sprintf("%-22s", e.EventName)
		if p.color {
			name = "\x1b[1;36m" + name + "\x1b[0m"
		}
		fmt.Fprintf(&b, "%s  #%-5d %s org %-3s %-18s %s  +%s\n",
			e.OccurredAt.Local().Format("15:04:05.000"), e.ID, name, org, entity, shown, latency)
	}
	if p.first && len(events) > 0 {
		p.first = false
		fmt.Fprintf(&b, "  (first event %s after start)\n", d.At.Sub(p.begin).Round(time.Millisecond))
	}
	_, err := io.WriteString(p.w, b.String())
	return err
}

func (p *devPrinter) counts() (events, bad int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.events, p.bad
}

func devStr(s *string) string {
	if s == nil {
		return ""
	}
	return *s
}
