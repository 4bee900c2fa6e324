package pgtest

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// maxIdentifier is NAMEDATALEN-1: Postgres truncates longer names.
const maxIdentifier = 63

// NewDatabase creates a fresh database named from t.Name() (sanitised,
// lowercased, at most 63 bytes, with a random suffix) and returns its URL.
// Cleanup drops the database's logical replication slots first, terminating
// the walsenders that hold them, then drops the database WITH (FORCE).
func (s *Server) NewDatabase(t testing.TB) string {
	t.Helper()
	name := databaseName(t.Name(), randomSuffix())
	ctx, cancel := context.WithTimeout(context.Background(), opTimeout)
	defer cancel()
	conn, err := pgx.Connect(ctx, s.URL(s.adminDB))
	if err != nil {
		t.Fatalf("pgtest: connect to create database %q: %v", name, err)
	}
	defer conn.Close(ctx)
	if err := createDatabase(ctx, conn, name); err != nil {
		t.Fatalf("pgtest: create database %q: %v", name, err)
	}
	t.Cleanup(func() {
		if err := s.dropDatabase(name); err != nil {
			t.Errorf("pgtest: drop database %q: %v", name, err)
		}
	})
	return s.URL(name)
}

// createDatabase retries while template1 is briefly in use (SQLSTATE 55006),
// which concurrent CREATE DATABASE on older servers can report.
func createDatabase(ctx context.Context, conn *pgx.Conn, name string) error {
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		_, err := conn.Exec(ctx, "CREATE DATABASE "+pgx.Identifier{name}.Sanitize())
		if sqlState(err) != "55006" {
			return err
		}
		select {
		case <-ctx.Done():
			return err
		case <-tick.C:
		}
	}
}

// dropDatabase drops name's logical slots and then name. A dedicated server
// that the test left stopped is skipped: its files go with it.
func (s *Server) dropDatabase(name string) error {
	if s.inst != nil && !s.inst.Running() {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), opTimeout)
	defer cancel()
	conn, err := pgx.Connect(ctx, s.URL(s.adminDB))
	if err != nil {
		return fmt.Errorf("connect: %w", err)
	}
	defer conn.Close(ctx)

	var version int
	if err := conn.QueryRow(ctx, "SELECT current_setting('server_version_num')::int").Scan(&version); err != nil {
		return fmt.Errorf("read server version: %w", err)
	}
	drop := "DROP DATABASE IF EXISTS " + pgx.Identifier{name}.Sanitize()
	if version >= 130000 {
		drop += " WITH (FORCE)"
	}
	tick := time.NewTicker(25 * time.Millisecond)
	defer tick.Stop()
	for {
		// A slot may still be re-acquired by a component that is shutting
		// down, and DROP DATABASE refuses while the database has slots
		// (55006): loop until both are gone.
		err := dropSlots(ctx, conn, name)
		if err == nil {
			if version < 130000 {
				_, err = conn.Exec(ctx, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()", name)
			}
			if err == nil {
				_, err = conn.Exec(ctx, drop)
			}
			if err == nil {
				return nil
			}
		}
		if sqlState(err) != "55006" && !errors.Is(err, errSlotsRemain) {
			return err
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%w (gave up after %s)", err, opTimeout)
		case <-tick.C:
		}
	}
}

var errSlotsRemain = errors.New("replication slots remain")

// dropSlots terminates the walsenders holding db's logical slots and drops
// the inactive ones. It returns errSlotsRemain while some are still active:
// a terminated walsender releases its slot only when it has exited.
func dropSlots(ctx context.Context, conn *pgx.Conn, db string) error {
	rows, err := conn.Query(ctx, "SELECT slot_name, active_pid FROM pg_catalog.pg_replication_slots WHERE database = $1", db)
	if err != nil {
		return fmt.Errorf("list replication slots: %w", err)
	}
	type slot struct {
		name string
		pid  *int32
	}
	slots, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (slot, error) {
		var sl slot
		return sl, r.Scan(&sl.name, &sl.pid)
	})
	if err != nil {
		return fmt.Errorf("list replication slots: %w", err)
	}
	remain := false
	for _, sl := range slots {
		if sl.pid != nil {
			if _, err := conn.Exec(ctx, "SELECT pg_terminate_backend($1)", *sl.pid); err != nil {
				return fmt.Errorf("terminate walsender %d of slot %q: %w", *sl.pid, sl.name, err)
			}
			remain = true
			continue
		}
		_, err := conn.Exec(ctx, "SELECT pg_drop_replication_slot($1)", sl.name)
		switch sqlState(err) {
		case "":
		case "42704": // dropped meanwhile
		case "55006": // acquired meanwhile
			remain = true
		default:
			return fmt.Errorf("drop replication slot %q: %w", sl.name, err)
		}
	}
	if remain {
		return errSlotsRemain
	}
	return nil
}

// databaseName makes a database name from a test name: lowercase ASCII
// letters, digits and underscores, starting with a letter, at most 63 bytes
// including "_" and suffix.
func databaseName(testName, suffix string) string {
	var b strings.Builder
	for _, r := range strings.ToLower(testName) {
		switch {
		case r >= 'a' && r <= 'z', r >= '0' && r <= '9':
			b.WriteRune(r)
		default:
			if s := b.String(); s != "" && s[len(s)-1] != '_' {
				b.WriteByte('_')
			}
		}
	}
	name := strings.Trim(b.String(), "_")
	switch {
	case name == "":
		name = "t"
	case name[0] < 'a':
		name = "t_" + name
	}
	if limit := maxIdentifier - 1 - len(suffix); len(name) > limit {
		name = strings.TrimRight(name[:limit], "_")
	}
	return name + "_" + suffix
}

func randomSuffix() string {
	var b [4]byte
	_, _ = rand.Read(b[:]) // never fails on Linux
	return hex.EncodeToString(b[:])
}

func sqlState(err error) string {
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		return pgErr.Code
	}
	return ""
}
