package main

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/outboxd/outboxd/internal/pgserver"
	"github.com/outboxd/outboxd/migrations"
)

// serverSettings tune the cluster the benchmark starts for throughput on a
// small machine, on top of pgserver's defaults (fsync=off and
// full_page_writes=off: the cluster is thrown away; synchronous_commit=on so
// that a commit has written its WAL before the client hears of it, and wakes
// the walsenders, as in production). Documented in bench/RESULTS.md.
var serverSettings = map[string]string{
	"shared_buffers":            "512MB",
	"max_wal_size":              "8GB", // no checkpoint in the middle of a measurement
	"checkpoint_timeout":        "30min",
	"autovacuum":                "off", // no background vacuum stealing a core mid-run
	"logical_decoding_work_mem": "64MB",
	"max_connections":           "100",
	"wal_sender_timeout":        "60s",
	"max_replication_slots":     "20",
	"max_wal_senders":           "20",
	"jit":                       "off",
}

// pgEnv is the server the benchmark runs against.
type pgEnv struct {
	admin  *url.URL // URL of the administrative database
	binDir string
	inst   *pgserver.Instance // nil for -database-url
}

func startPostgres(binDir string) (*pgEnv, error) {
	if binDir == "" {
		var err error
		if binDir, err = pgserver.FindBinDir(); err != nil {
			return nil, err
		}
	}
	inst, err := pgserver.Start(binDir, serverSettings)
	if err != nil {
		return nil, fmt.Errorf("start postgres: %w", err)
	}
	u := &url.URL{Scheme: "postgres", User: url.User(pgserver.Superuser),
		Host: "127.0.0.1:" + strconv.Itoa(inst.Port()), Path: "/postgres", RawQuery: "sslmode=disable"}
	return &pgEnv{admin: u, binDir: binDir, inst: inst}, nil
}

func externalPostgres(raw, binDir string) (*pgEnv, error) {
	u, err := url.Parse(raw)
	if err != nil || (u.Scheme != "postgres" && u.Scheme != "postgresql") {
		return nil, errors.New("-database-url must be a postgres:// URL")
	}
	if binDir == "" {
		// Only pg_recvlogical is needed from it, a client program.
		binDir, _ = pgserver.FindBinDir()
	}
	return &pgEnv{admin: u, binDir: binDir}, nil
}

func (e *pgEnv) close() {
	if e.inst != nil {
		_ = e.inst.Teardown()
	}
}

// dbURL returns the URL of database name on the server.
func (e *pgEnv) dbURL(name string) string {
	u := *e.admin
	u.Path = "/" + name
	u.RawPath = ""
	return u.String()
}

func (e *pgEnv) adminConn(ctx context.Context) (*pgx.Conn, error) {
	c, err := pgx.Connect(ctx, e.admin.String())
	if err != nil {
		return nil, fmt.Errorf("connect to the administrative database: %w", err)
	}
	return c, nil
}

// createDB creates database name (dropping a leftover of that name) and
// migrates it. partialIndex adds the poller's index on pending rows.
func (e *pgEnv) createDB(ctx context.Context, name string, partialIndex bool, fillfactor int) (string, error) {
	if err := e.dropDB(ctx, name); err != nil {
		return "", err
	}
	admin, err := e.adminConn(ctx)
	if err != nil {
		return "", err
	}
	defer admin.Close(context.WithoutCancel(ctx))
	if _, err := admin.Exec(ctx, "CREATE DATABASE "+pgx.Identifier{name}.Sanitize()); err != nil {
		return "", fmt.Errorf("create database %s: %w", name, err)
	}
	dbURL := e.dbURL(name)
	conn, err := pgx.Connect(ctx, dbURL)
	if err != nil {
		return "", fmt.Errorf("connect to %s: %w", name, err)
	}
	defer conn.Close(context.WithoutCancel(ctx))
	if _, err := migrations.Migrate(ctx, conn, migrations.Options{}); err != nil {
		return "", fmt.Errorf("migrate %s: %w", name, err)
	}
	if fillfactor != 0 {
		if _, err := conn.Exec(ctx, fmt.Sprintf(`ALTER TABLE domain_event SET (fillfactor = %d)`, fillfactor)); err != nil {
			return "", fmt.Errorf("set fillfactor in %s: %w", name, err)
		}
	}
	if partialIndex {
		if _, err := conn.Exec(ctx, `CREATE INDEX domain_event_pending ON domain_event (id) WHERE NOT is_processed`); err != nil {
			return "", fmt.Errorf("create the poller's index in %s: %w", name, err)
		}
	}
	return dbURL, nil
}

// dropDB drops database name and the replication slots in it.
func (e *pgEnv) dropDB(ctx context.Context, name string) error {
	admin, err := e.adminConn(ctx)
	if err != nil {
		return err
	}
	defer admin.Close(context.WithoutCancel(ctx))
	deadline := time.Now().Add(30 * time.Second)
	for {
		_, err = admin.Exec(ctx, `SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE database = $1 AND active_pid IS NOT NULL`, name)
		if err == nil {
			_, err = admin.Exec(ctx, `SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = $1`, name)
		}
		if err == nil || time.Now().After(deadline) {
			break
		}
		// A terminated walsender may still hold its slot for a moment.
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
	if err != nil {
		return fmt.Errorf("drop slots of %s: %w", name, err)
	}
	if _, err := admin.Exec(ctx, "DROP DATABASE IF EXISTS "+pgx.Identifier{name}.Sanitize()+" WITH (FORCE)"); err != nil {
		return fmt.Errorf("drop database %s: %w", name, err)
	}
	return nil
}

// baseProperties is the properties value of the backlog before padding: a
// realistic order event.
const baseProperties = `{"plan": "enterprise", "items": [{"sku": "SKU-1042", "qty": 3, "price": 19.99}, {"sku": "SKU-2210", "qty": 1, "price": 249.0}], "amount": 309.97, "currency": "EUR", "coupon": null, "customer": {"id": 88123, "email": "jane.doe@example.com", "country": "DE"}, "note": "Expedite – gift wrap \"blue\"", "flags": ["vip", "b2b"], "pad": ""}`

// propertiesTemplate returns a jsonb text whose value, once the loader adds
// a "seq" member, prints as about size bytes.
func propertiesTemplate(ctx context.Context, conn *pgx.Conn, size int) (string, error) {
	base := baseProperties
	measure := func(p string) (int, error) {
		var n int
		err := conn.QueryRow(ctx, `SELECT length(($1::jsonb || jsonb_build_object('seq', 1000000))::text)`, p).Scan(&n)
		return n, err
	}
	n, err := measure(base)
	if err != nil {
		return "", fmt.Errorf("measure properties: %w", err)
	}
	if n > size {
		base = `{"pad": ""}`
		if n, err = measure(base); err != nil {
			return "", fmt.Errorf("measure properties: %w", err)
		}
	}
	if n < size {
		base = strings.Replace(base, `"pad": ""`, `"pad": "`+strings.Repeat("x", size-n)+`"`, 1)
	}
	return base, nil
}

// insertSQL inserts the rows numbered $1..$2 of the backlog; $3 is the number
// of organizations (ordering keys), $4 the properties template.
const insertSQL = `INSERT INTO domain_event (event_name, organization_id, user_id, entity_type, entity_id,
  correlation_id, source, properties)
SELECT 'order_placed', g % $3 + 1, g % 100000, 'order', 'ORD-' || g, md5(g::text)::uuid::text,
  'checkout_service', $4::jsonb || jsonb_build_object('seq', g)
FROM generate_series($1::bigint, $2::bigint) AS g`

// backlog describes rows loaded into a bench database.
type backlog struct {
	rows, txnSize int
	// lastTxnLSN is a WAL position inside the last loaded transaction: a
	// checkpoint beyond it covers every row.
	lastTxnLSN pglogrepl.LSN
	// endLSN is a WAL record written after the load (pg_recvlogical --endpos).
	endLSN   pglogrepl.LSN
	took     time.Duration
	avgProps float64 // average length of properties::text
}

// loadBacklog inserts rows rows in transactions of txnSize rows, pipelined
// (each statement its own transaction) on a few connections, and returns
// where the load ended in the WAL. ids are 1..rows in a fresh database.
func loadBacklog(ctx context.Context, dbURL string, rows, txnSize, orgs int, props string) (backlog, error) {
	bl := backlog{rows: rows, txnSize: txnSize}
	start := time.Now()
	// Every transaction but the last; single-row transactions are limited by
	// the backend's commit rate, so they are spread over two connections.
	lastLo := max(int64(rows-txnSize)+1, 1)
	loaders := 1
	if txnSize < 100 {
		loaders = 2
	}
	var next atomic.Int64
	next.Store(1)
	errs := make(chan error, loaders)
	for range loaders {
		go func() { errs <- loadRange(ctx, dbURL, &next, lastLo, txnSize, orgs, props) }()
	}
	for range loaders {
		if err := <-errs; err != nil {
			return bl, err
		}
	}
	conn, err := pgx.Connect(ctx, dbURL)
	if err != nil {
		return bl, fmt.Errorf("connect loader: %w", err)
	}
	defer conn.Close(context.WithoutCancel(ctx))
	// The last transaction also records where it is in the WAL.
	tx, err := conn.Begin(ctx)
	if err != nil {
		return bl, fmt.Errorf("load: %w", err)
	}
	if err := tx.QueryRow(ctx, `SELECT pg_current_wal_insert_lsn()`).Scan(&bl.lastTxnLSN); err != nil {
		_ = tx.Rollback(ctx)
		return bl, fmt.Errorf("load: %w", err)
	}
	if _, err := tx.Exec(ctx, insertSQL, lastLo, int64(rows), orgs, props); err != nil {
		_ = tx.Rollback(ctx)
		return bl, fmt.Errorf("load: %w", err)
	}
	if err := tx.Commit(ctx); err != nil {
		return bl, fmt.Errorf("load: %w", err)
	}
	bl.took = time.Since(start)
	if err := conn.QueryRow(ctx, `SELECT pg_logical_emit_message(false, 'outboxd-bench', 'end')`).Scan(&bl.endLSN); err != nil {
		return bl, fmt.Errorf("mark the end of the load: %w", err)
	}
	var lo, hi, n int64
	if err := conn.QueryRow(ctx, `SELECT coalesce(min(id), 0), coalesce(max(id), 0), count(*), coalesce(avg(length(properties::text)), 0) FROM domain_event`).Scan(&lo, &hi, &n, &bl.avgProps); err != nil {
		return bl, fmt.Errorf("check the load: %w", err)
	}
	if lo != 1 || hi != int64(rows) || n != int64(rows) {
		return bl, fmt.Errorf("load: ids %d..%d (%d rows), want 1..%d", lo, hi, n, rows)
	}
	return bl, nil
}

// loadRange inserts transactions of txnSize rows, taking their first row
// numbers from next, until lastLo; each round trip carries a pipeline of
// statements, each its own transaction.
func loadRange(ctx context.Context, dbURL string, next *atomic.Int64, lastLo int64, txnSize, orgs int, props string) error {
	conn, err := pgx.Connect(ctx, dbURL)
	if err != nil {
		return fmt.Errorf("connect loader: %w", err)
	}
	defer conn.Close(context.WithoutCancel(ctx))
	pg := conn.PgConn()
	if _, err := pg.Prepare(ctx, "ins", insertSQL, nil); err != nil {
		return fmt.Errorf("prepare insert: %w", err)
	}
	orgsText, propsText := []byte(strconv.Itoa(orgs)), []byte(props)
	depth := int64(max(1, 4000/txnSize))
	for {
		// Claim depth transactions at once.
		lo := next.Add(depth*int64(txnSize)) - depth*int64(txnSize)
		if lo >= lastLo {
			return nil
		}
		p := pg.StartPipeline(ctx)
		sent := 0
		for ; sent < int(depth) && lo < lastLo; sent++ {
			hi := min(lo+int64(txnSize)-1, lastLo-1)
			p.SendQueryPrepared("ins", [][]byte{strconv.AppendInt(nil, lo, 10), strconv.AppendInt(nil, hi, 10), orgsText, propsText}, nil, nil)
			p.SendPipelineSync()
			lo = hi + 1
		}
		if err := p.Flush(); err != nil {
			p.Close()
			return fmt.Errorf("load: %w", err)
		}
		for range sent {
			res, err := p.GetResults()
			if err == nil {
				if rr, ok := res.(*pgconn.ResultReader); ok {
					if _, err = rr.Close(); err == nil {
						_, err = p.GetResults() // the PipelineSync
					}
				}
			}
			if err != nil {
				p.Close()
				return fmt.Errorf("load: %w", err)
			}
		}
		if err := p.Close(); err != nil {
			return fmt.Errorf("load: %w", err)
		}
	}
}

// createSlot creates a pgoutput slot named name in the database of dbURL.
func createSlot(ctx context.Context, dbURL, name string) error {
	conn, err := pgx.Connect(ctx, dbURL)
	if err != nil {
		return fmt.Errorf("connect: %w", err)
	}
	defer conn.Close(context.WithoutCancel(ctx))
	if _, err := conn.Exec(ctx, `SELECT pg_create_logical_replication_slot($1, 'pgoutput')`, name); err != nil {
		return fmt.Errorf("create slot %s: %w", name, err)
	}
	return nil
}

func dropSlot(ctx context.Context, dbURL, name string) error {
	conn, err := pgx.Connect(ctx, dbURL)
	if err != nil {
		return fmt.Errorf("connect: %w", err)
	}
	defer conn.Close(context.WithoutCancel(ctx))
	if _, err := conn.Exec(ctx, `SELECT pg_drop_replication_slot($1)`, name); err != nil {
		return fmt.Errorf("drop slot %s: %w", name, err)
	}
	return nil
}

// pendingRows counts unprocessed and all rows (a full scan: never while
// measuring).
func pendingRows(ctx context.Context, conn *pgx.Conn) (pending, total int64, err error) {
	err = conn.QueryRow(ctx, `SELECT count(*) FILTER (WHERE NOT is_processed), count(*) FROM domain_event`).Scan(&pending, &total)
	if err != nil {
		err = fmt.Errorf("count processed rows: %w", err)
	}
	return pending, total, err
}

func serverVersion(ctx context.Context, e *pgEnv) string {
	c, err := e.adminConn(ctx)
	if err != nil {
		return ""
	}
	defer c.Close(context.WithoutCancel(ctx))
	var v string
	_ = c.QueryRow(ctx, `SELECT version()`).Scan(&v)
	return v
}
