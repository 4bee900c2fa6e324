package cdc

import (
	"context"
	"fmt"
	"strconv"
	"strings"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// tableOIDs are the relation OIDs the stream is read by. pgoutput names a
// relation as the catalog had it when the row was written (a rename inside
// the writing transaction gives another name), and sends a partition's rows
// under the root's OID only when the publication publishes via the root: the
// OID is the one identity that holds across both.
type tableOIDs struct {
	outbox       uint32
	subscription uint32 // 0 when there is no subscription table
	// plan is the tracking plan's table (migration 8), published with the
	// subscriptions since migration 11; 0 when there is none.
	plan uint32
}

// lookupTables resolves the outbox and subscription tables and checks that
// the publication sends a partitioned outbox's rows under the root: otherwise
// they would arrive under each partition's OID.
func lookupTables(ctx context.Context, conn *pgconn.PgConn, cfg Config) (tableOIDs, error) {
	outbox := pgx.Identifier{cfg.Table.Schema, cfg.Table.Name}.Sanitize()
	sub := pgx.Identifier{cfg.Table.Schema, SubscriptionTable}.Sanitize()
	planTable := pgx.Identifier{cfg.Table.Schema, PlanTable}.Sanitize()
	res := conn.ExecParams(ctx, `SELECT coalesce(to_regclass($1)::oid, 0), coalesce((SELECT relkind::text FROM pg_catalog.pg_class WHERE oid = to_regclass($1)), ''),
  coalesce(to_regclass($2)::oid, 0), coalesce((SELECT pubviaroot FROM pg_catalog.pg_publication WHERE pubname = $3), false),
  coalesce(to_regclass($4)::oid, 0)`,
		[][]byte{[]byte(outbox), []byte(sub), []byte(cfg.Publication), []byte(planTable)}, nil, nil, nil).Read()
	if res.Err != nil {
		return tableOIDs{}, fmt.Errorf("look up table %s: %w", cfg.Table, res.Err)
	}
	if len(res.Rows) != 1 || len(res.Rows[0]) != 5 {
		return tableOIDs{}, fmt.Errorf("look up table %s: unexpected answer", cfg.Table)
	}
	row := res.Rows[0]
	var t tableOIDs
	oid, err := strconv.ParseUint(string(row[0]), 10, 32)
	if err != nil {
		return tableOIDs{}, fmt.Errorf("look up table %s: oid %q: %w", cfg.Table, row[0], err)
	}
	if oid == 0 {
		return tableOIDs{}, fmt.Errorf("%w: outbox table %s does not exist: run `outboxd migrate`", errFatal, cfg.Table)
	}
	t.outbox = uint32(oid)
	if string(row[1]) == "p" && string(row[3]) != "t" {
		return tableOIDs{}, fmt.Errorf("%w: outbox table %s is partitioned and publication %q does not set publish_via_partition_root: its rows would arrive under each partition's name; run `outboxd migrate` (it sets it)",
			errFatal, cfg.Table, cfg.Publication)
	}
	if cfg.SubscriptionPublication != "" {
		oid, err := strconv.ParseUint(string(row[2]), 10, 32)
		if err != nil {
			return tableOIDs{}, fmt.Errorf("look up table %s: oid %q: %w", sub, row[2], err)
		}
		t.subscription = uint32(oid)
		if oid, err = strconv.ParseUint(string(row[4]), 10, 32); err != nil {
			return tableOIDs{}, fmt.Errorf("look up table %s: oid %q: %w", planTable, row[4], err)
		}
		t.plan = uint32(oid)
	}
	return t, nil
}

// publicationNames renders pgoutput's publication_names option: a string
// literal holding a comma list of identifiers. Each name is quoted as an SQL
// identifier (inner double quotes doubled), then the list as a literal (inner
// single quotes doubled): a name that Go's %q would quote differently, or one
// with a quote in it, still reaches the server as written.
func publicationNames(names ...string) string {
	var ids []string
	for _, n := range names {
		if n != "" {
			ids = append(ids, pgx.Identifier{n}.Sanitize())
		}
	}
	return "'" + strings.ReplaceAll(strings.Join(ids, ","), "'", "''") + "'"
}
