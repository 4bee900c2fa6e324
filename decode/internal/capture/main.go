//go:build ignore

// Command capture records golden pgoutput messages from a real Postgres 15
// for the decode tests. It starts a throwaway server (initdb as the postgres
// user when run as root), runs a fixed workload, streams it with pglogrepl
// (proto_version 1) and writes each XLogData.WALData to
// decode/testdata/wal_NNN_<type>.bin, plus a fuzz seed per small message
// under decode/testdata/fuzz/FuzzDecode/. It stops the server it started and
// removes its data directory.
//
// Run from the repository root:
//
//	go run ./decode/internal/capture/main.go [-bindir /usr/lib/postgresql/15/bin]
//
// The walsender session uses DateStyle ISO and TimeZone Asia/Kolkata, so the
// golden timestamps carry a +05:30 offset the decoder must normalise.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"
)

func main() {
	bindir := flag.String("bindir", "/usr/lib/postgresql/15/bin", "Postgres server binaries")
	out := flag.String("out", "decode/testdata", "output directory")
	flag.Parse()
	if err := run(*bindir, *out); err != nil {
		log.Fatal(err)
	}
}

func run(bindir, out string) (err error) {
	dir, err := os.MkdirTemp("", "outboxd-capture-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	cred, err := credential(dir)
	if err != nil {
		return err
	}
	data := filepath.Join(dir, "data")

	initdb := exec.Command(filepath.Join(bindir, "initdb"), "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C")
	initdb.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
	if b, err := initdb.CombinedOutput(); err != nil {
		return fmt.Errorf("initdb: %w\n%s", err, b)
	}

	port, err := freePort()
	if err != nil {
		return err
	}
	logf, err := os.Create(filepath.Join(dir, "postgres.log"))
	if err != nil {
		return err
	}
	defer logf.Close()
	pg := exec.Command(filepath.Join(bindir, "postgres"), "-D", data,
		"-c", "listen_addresses=127.0.0.1", "-c", "port="+strconv.Itoa(port),
		"-c", "unix_socket_directories="+dir, "-c", "wal_level=logical",
		"-c", "max_wal_senders=4", "-c", "max_replication_slots=4", "-c", "fsync=off")
	pg.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
	pg.Stdout, pg.Stderr = logf, logf
	if err := pg.Start(); err != nil {
		return fmt.Errorf("start postgres: %w", err)
	}
	log.Printf("postgres pid %d on port %d, data %s", pg.Process.Pid, port, data)
	defer func() {
		// Fast shutdown of the one server this program started.
		_ = pg.Process.Signal(syscall.SIGINT)
		_ = pg.Wait()
		if err != nil {
			if b, rerr := os.ReadFile(logf.Name()); rerr == nil {
				log.Printf("postgres log:\n%s", b)
			}
		}
	}()

	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	url := fmt.Sprintf("postgres://postgres@127.0.0.1:%d/postgres?sslmode=disable", port)
	conn, err := connectRetry(ctx, url)
	if err != nil {
		return err
	}
	defer conn.Close(context.Background())
	if err := execSQL(ctx, conn, setupSQL); err != nil {
		return fmt.Errorf("setup: %w", err)
	}

	repl, err := pgconn.Connect(ctx, url+"&replication=database&options="+
		"-c%20datestyle%3DISO%20-c%20intervalstyle%3Dpostgres%20-c%20extra_float_digits%3D3%20-c%20TimeZone%3DAsia/Kolkata")
	if err != nil {
		return fmt.Errorf("replication connect: %w", err)
	}
	defer repl.Close(context.Background())
	slot, err := pglogrepl.CreateReplicationSlot(ctx, repl, "capture", "pgoutput", pglogrepl.CreateReplicationSlotOptions{})
	if err != nil {
		return fmt.Errorf("create slot: %w", err)
	}
	start, err := pglogrepl.ParseLSN(slot.ConsistentPoint)
	if err != nil {
		return err
	}

	for i, stmt := range workload {
		if err := execSQL(ctx, conn, stmt); err != nil {
			return fmt.Errorf("workload step %d: %w", i, err)
		}
	}

	err = pglogrepl.StartReplication(ctx, repl, "capture", start, pglogrepl.StartReplicationOptions{PluginArgs: []string{
		"proto_version '1'", "publication_names 'outboxd'", "messages 'true'",
	}})
	if err != nil {
		return fmt.Errorf("start replication: %w", err)
	}
	if err := os.MkdirAll(filepath.Join(out, "fuzz", "FuzzDecode"), 0o755); err != nil {
		return err
	}
	old, _ := filepath.Glob(filepath.Join(out, "wal_*.bin"))
	for _, f := range old {
		os.Remove(f)
	}
	n := 0
	for {
		raw, err := repl.ReceiveMessage(ctx)
		if err != nil {
			return fmt.Errorf("receive: %w", err)
		}
		cd, ok := raw.(*pgproto3.CopyData)
		if !ok {
			if e, ok := raw.(*pgproto3.ErrorResponse); ok {
				return fmt.Errorf("walsender: %s", e.Message)
			}
			continue
		}
		if cd.Data[0] != pglogrepl.XLogDataByteID {
			continue
		}
		xld, err := pglogrepl.ParseXLogData(cd.Data[1:])
		if err != nil {
			return err
		}
		wal := xld.WALData
		name := fmt.Sprintf("wal_%03d_%c.bin", n, wal[0])
		if err := os.WriteFile(filepath.Join(out, name), wal, 0o644); err != nil {
			return err
		}
		if len(wal) <= 4096 {
			seed := "go test fuzz v1\n[]byte(" + strconv.Quote(string(wal)) + ")\n"
			if err := os.WriteFile(filepath.Join(out, "fuzz", "FuzzDecode", strings.TrimSuffix(name, ".bin")), []byte(seed), 0o644); err != nil {
				return err
			}
		}
		log.Printf("%s: %d bytes", name, len(wal))
		n++
		if wal[0] == 'M' && strings.Contains(string(wal), "capture-end\x00") {
			break
		}
	}
	_ = execSQL(ctx, conn, "SELECT 1") // keep the regular connection alive until the end
	return nil
}

// credential returns the credentials to run Postgres with: the postgres user
// when running as root (initdb refuses root), else nil.
func credential(dir string) (*syscall.Credential, error) {
	if os.Geteuid() != 0 {
		return nil, nil
	}
	u, err := user.Lookup("postgres")
	if err != nil {
		return nil, fmt.Errorf("running as root needs a postgres user: %w", err)
	}
	uid, _ := strconv.Atoi(u.Uid)
	gid, _ := strconv.Atoi(u.Gid)
	if err := os.Chown(dir, uid, gid); err != nil {
		return nil, err
	}
	return &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}, nil
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

func connectRetry(ctx context.Context, url string) (*pgconn.PgConn, error) {
	for {
		conn, err := pgconn.Connect(ctx, url)
		if err == nil {
			return conn, nil
		}
		select {
		case <-ctx.Done():
			return nil, errors.Join(ctx.Err(), err)
		case <-time.After(100 * time.Millisecond):
		}
	}
}

func execSQL(ctx context.Context, conn *pgconn.PgConn, sql string) error {
	_, err := conn.Exec(ctx, sql).ReadAll()
	return err
}

const setupSQL = `
CREATE TABLE domain_event (
  id                bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
  event_name        text        NOT NULL,
  occurred_at       timestamptz NOT NULL DEFAULT now(),
  organization_id   bigint,
  user_id           bigint,
  entity_type       text,
  entity_id         text,
  correlation_id    text,
  source            text,
  schema_version    integer     NOT NULL DEFAULT 1,
  properties        jsonb       NOT NULL DEFAULT '{}',
  is_processed      boolean     NOT NULL DEFAULT false,
  processed_at      timestamptz,
  delivery_attempts integer     NOT NULL DEFAULT 0
);
CREATE TYPE priority AS ENUM ('low', 'high');
CREATE TABLE other_event (
  id     int PRIMARY KEY,
  note   text,
  prio   priority,
  amount numeric,
  ratio  float8,
  ok     boolean,
  at     timestamp,
  doc    json,
  uid    uuid
);
CREATE SCHEMA alt;
-- An ORM-made outbox: int4 ids without a primary key, varchar names,
-- timestamp without time zone, numeric organisations, text properties,
-- a float schema_version, no entity columns, extra columns.
CREATE TABLE alt.domain_event (
  id              int,
  event_name      varchar(100),
  occurred_at     timestamp,
  organization_id numeric,
  user_id         smallint,
  correlation_id  uuid,
  source          name,
  schema_version  float8,
  properties      text,
  is_processed    boolean,
  traceparent     text,
  color           text
);
CREATE PUBLICATION outboxd FOR TABLE domain_event, other_event, alt.domain_event WITH (publish = 'insert');
SELECT pg_replication_origin_create('capture_origin');
`

// workload runs after the slot exists; each entry is one transaction.
var workload = []string{
	// 1. The envelope example of docs/DESIGN.md §4.
	`INSERT INTO domain_event (id, event_name, occurred_at, organization_id, user_id, entity_type, entity_id, correlation_id, source, schema_version, properties)
	 VALUES (42, 'batch_started', '2026-11-26 10:00:00.123456+00', 7, 3, 'batch', 'B-19', 'c1', 'batch_service', 1, '{"a":1}')`,
	// 2. Every nullable column NULL; a whole second, negative ids elsewhere.
	`INSERT INTO domain_event (id, event_name, occurred_at) VALUES (43, 'nulls', '2026-11-26 10:00:01+00')`,
	// 3. Two rows in one transaction: unicode, control characters, a
	// traceparent in properties, fraction digits, an offset input.
	`BEGIN;
	 INSERT INTO domain_event (id, event_name, occurred_at, organization_id, entity_type, entity_id, source, properties, is_processed)
	 VALUES (44, 'unicode ☕ é 日本 😀', '2026-11-26 12:00:00.5+02', -9223372036854775808, 'ünïcode', E'tab\there "q" back\\slash\nnl\x01\x1f',
	         E'src\u2028line', '{"traceparent":"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01","emoji":"😀","ctl":"\u0001\n","nested":{"traceparent":"x"}}', true);
	 INSERT INTO domain_event (id, event_name, occurred_at, organization_id, properties)
	 VALUES (45, 'second', '1999-12-31 23:59:59.999999-03', 9223372036854775807, '[1, 2.5, -3e10, null, true, "s"]');
	 COMMIT`,
	// 4. A large properties value (TOASTed on disk, sent whole): 8192 md5 hex digests.
	`INSERT INTO domain_event (id, event_name, occurred_at, properties)
	 SELECT 46, 'big', '2026-11-26 10:00:00+00', jsonb_build_object('blob', string_agg(md5(i::text), '' ORDER BY i))
	 FROM generate_series(1, 8192) AS i`,
	// 5. Another published relation with an enum column (a type message).
	`INSERT INTO other_event VALUES
	 (1, 'hello', 'high', 'NaN', 'Infinity', true, '2026-11-26 10:00:00', '{"k": [1, 2]}', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'),
	 (2, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL)`,
	// 6. The ORM-made outbox in schema alt.
	`INSERT INTO alt.domain_event VALUES
	 (1, 'alt_started', '2026-11-26 10:00:00.25', 12.50, 5, 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', 'alt_service', 2.5, '{"b": [1, 2]}', true, '00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01', 'red'),
	 (2, 'alt_nan', 'infinity', 'NaN', NULL, NULL, NULL, 'NaN', 'not json', false, 'garbage', NULL),
	 (3, 'alt_neg', '-infinity', '-Infinity', -32768, NULL, NULL, '-Infinity', '"just a string"', NULL, NULL, NULL),
	 (4, 'alt_bc', '0044-03-15 12:00:00 BC', 1e20, NULL, NULL, NULL, '1e-7', '', NULL, NULL, NULL),
	 (NULL, 'alt_null_id', '2026-11-26 10:00:00', NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL)`,
	// 7. A logical decoding message inside a transaction, and one outside.
	`BEGIN;
	 SELECT pg_logical_emit_message(true, 'outboxd', 'hello');
	 INSERT INTO domain_event (id, event_name, occurred_at) VALUES (47, 'with_message', '2026-11-26 10:00:02+00');
	 COMMIT`,
	`SELECT pg_logical_emit_message(false, 'outboxd-heartbeat', E'\\x00ff'::bytea)`,
	// 8. A transaction with a replication origin (an origin message).
	`SELECT pg_replication_origin_session_setup('capture_origin');
	 BEGIN;
	 SELECT pg_replication_origin_xact_setup('0/1', now());
	 INSERT INTO domain_event (id, event_name, occurred_at) VALUES (48, 'with_origin', '2026-11-26 10:00:03+00');
	 COMMIT;
	 SELECT pg_replication_origin_session_reset()`,
	// 9. ALTER TABLE: a traceparent column added.
	`ALTER TABLE domain_event ADD COLUMN traceparent text`,
	`INSERT INTO domain_event (id, event_name, occurred_at, traceparent, properties)
	 VALUES (49, 'traced', '2026-11-26 10:00:04+00', '00-11111111111111111111111111111111-2222222222222222-00', '{"traceparent":"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}')`,
	// 10. ALTER TABLE: user_id dropped.
	`ALTER TABLE domain_event DROP COLUMN user_id`,
	`INSERT INTO domain_event (id, event_name, occurred_at, organization_id) VALUES (50, 'dropped_user', '2026-11-26 10:00:05+00', 8)`,
	// 11. ALTER TABLE: properties retyped to text, organization_id to text.
	`ALTER TABLE domain_event ALTER COLUMN properties TYPE text USING properties::text,
	                          ALTER COLUMN organization_id TYPE text`,
	`INSERT INTO domain_event (id, event_name, occurred_at, organization_id, properties) VALUES
	 (51, 'text_props', '2026-11-26 10:00:06+00', '9', '{"b":2}'),
	 (52, 'text_not_json', '2026-11-26 10:00:07+00', 'org-x', 'not json {')`,
	// 12. Updates, deletes and truncates are not published (publish = 'insert').
	`UPDATE domain_event SET is_processed = true, processed_at = now() WHERE id = 42`,
	`DELETE FROM domain_event WHERE id = 43`,
	`TRUNCATE other_event`,
	// 13. The end marker the capture stops at.
	`SELECT pg_logical_emit_message(false, 'capture-end', '')`,
}
