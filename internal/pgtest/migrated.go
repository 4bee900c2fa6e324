package pgtest

import (
	"context"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/outboxd/outboxd/migrations"
)

// Migrated is a fresh database of the shared server with outboxd's default
// schema (public.domain_event, publication outboxd): its URL, a connection
// and a pool, all closed at cleanup.
type Migrated struct {
	URL  string
	Conn *pgx.Conn
	Pool *pgxpool.Pool
}

// NewMigrated creates and migrates a database on the shared server.
func NewMigrated(t testing.TB) *Migrated {
	t.Helper()
	ctx := context.Background()
	m := &Migrated{URL: Shared(t).NewDatabase(t)}
	var err error
	if m.Conn, err = pgx.Connect(ctx, m.URL); err != nil {
		t.Fatalf("pgtest: connect: %v", err)
	}
	t.Cleanup(func() { _ = m.Conn.Close(context.Background()) })
	if _, err := migrations.Migrate(ctx, m.Conn, migrations.Options{Schema: "public", Table: "domain_event", Publication: "outboxd"}); err != nil {
		t.Fatalf("pgtest: migrate: %v", err)
	}
	if m.Pool, err = pgxpool.New(ctx, m.URL); err != nil {
		t.Fatalf("pgtest: pool: %v", err)
	}
	t.Cleanup(m.Pool.Close)
	return m
}
