package pgtest

import (
	"github.com/outboxd/outboxd/internal/pgserver"

	"context"
	"fmt"
	"net/url"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"
	"github.com/stretchr/testify/require"
)

func TestMain(m *testing.M) { Main(m) }

func TestDatabaseName(t *testing.T) {
	t.Parallel()
	long := strings.Repeat("VeryLongSubtestName/", 10)
	tests := []struct {
		in, want string
	}{
		{"TestFoo", "testfoo_abcd1234"},
		{"TestFoo/sub_case#01", "testfoo_sub_case_01_abcd1234"},
		{"Test Ünïcode/ça va", "test_n_code_a_va_abcd1234"},
		{"0leading", "t_0leading_abcd1234"},
		{"///", "t_abcd1234"},
		{long, "verylongsubtestname_verylongsubtestname_verylongsubtes_abcd1234"},
	}
	for _, tt := range tests {
		got := databaseName(tt.in, "abcd1234")
		require.Equal(t, tt.want, got, "databaseName(%q)", tt.in)
		require.LessOrEqual(t, len(got), maxIdentifier)
	}
}

func TestExternalURL(t *testing.T) {
	t.Parallel()
	u, err := url.Parse("postgres://app:s3cret@db.internal:6543/admin?sslmode=verify-full&application_name=x")
	require.NoError(t, err)
	s := &Server{external: u}
	require.Equal(t, "postgres://app:s3cret@db.internal:6543/t_1?sslmode=verify-full&application_name=x", s.URL("t_1"))
	require.False(t, s.Dedicated())

	local := &Server{Host: "127.0.0.1", Port: 5433, inst: &pgserver.Instance{}}
	require.Equal(t, "postgres://postgres@127.0.0.1:5433/my_db?sslmode=disable", local.URL("my_db"))
}

func TestShared(t *testing.T) {
	t.Parallel()
	s := Shared(t)
	require.Same(t, s, Shared(t), "one shared server per package")
	t.Logf("shared server %s:%d, started in %s", s.Host, s.Port, SharedStartup())

	conn := s.AdminConn(t)
	var walLevel string
	require.NoError(t, conn.QueryRow(context.Background(), "SHOW wal_level").Scan(&walLevel))
	require.Equal(t, "logical", walLevel)
	if s.Dedicated() {
		var senders, maxConns string
		require.NoError(t, conn.QueryRow(context.Background(), "SELECT current_setting('max_wal_senders'), current_setting('max_connections')").Scan(&senders, &maxConns))
		require.Equal(t, "40", senders)
		require.Equal(t, "200", maxConns)
		require.NotEmpty(t, s.BinDir())
	}
}

func TestNewDatabaseParallel(t *testing.T) {
	t.Parallel()
	s := Shared(t)
	var mu sync.Mutex
	var names []string
	t.Run("group", func(t *testing.T) {
		for _, sub := range []string{"first", "second"} {
			t.Run(sub, func(t *testing.T) {
				t.Parallel()
				dbURL := s.NewDatabase(t)
				cfg, err := pgx.ParseConfig(dbURL)
				require.NoError(t, err)
				require.True(t, strings.HasPrefix(cfg.Database, "testnewdatabaseparallel_group_"+sub+"_"), cfg.Database)
				require.LessOrEqual(t, len(cfg.Database), maxIdentifier)

				ctx := context.Background()
				conn, err := pgx.Connect(ctx, dbURL)
				require.NoError(t, err)
				defer conn.Close(ctx)
				var current string
				require.NoError(t, conn.QueryRow(ctx, "SELECT current_database()").Scan(&current))
				require.Equal(t, cfg.Database, current)
				// Fresh: the table does not exist yet in either database.
				_, err = conn.Exec(ctx, "CREATE TABLE only_here (id int)")
				require.NoError(t, err)

				mu.Lock()
				names = append(names, cfg.Database)
				mu.Unlock()
			})
		}
	})
	require.Len(t, names, 2)
	require.NotEqual(t, names[0], names[1])
	requireNoDatabases(t, s, names...)
}

func TestNewDatabaseDropsActiveSlot(t *testing.T) {
	t.Parallel()
	s := Shared(t)
	var db string
	t.Run("stream", func(t *testing.T) {
		ctx := context.Background()
		// Registered before NewDatabase so it runs after the database's
		// cleanup: the walsender is still streaming when the drop starts.
		var repl *pgconn.PgConn
		t.Cleanup(func() {
			if repl != nil {
				_ = repl.Close(ctx)
			}
		})
		dbURL := s.NewDatabase(t)
		cfg, err := pgx.ParseConfig(dbURL)
		require.NoError(t, err)
		db = cfg.Database

		conn, err := pgx.Connect(ctx, dbURL)
		require.NoError(t, err)
		defer conn.Close(ctx)
		_, err = conn.Exec(ctx, "CREATE TABLE e (id int); CREATE PUBLICATION p FOR TABLE e")
		require.NoError(t, err)
		_, err = conn.Exec(ctx, "SELECT pg_create_logical_replication_slot($1, 'pgoutput')", db)
		require.NoError(t, err)

		repl, err = pgconn.Connect(ctx, dbURL+"&replication=database")
		require.NoError(t, err)
		startReplication(t, repl, "START_REPLICATION SLOT "+db+" LOGICAL 0/0 (proto_version '1', publication_names 'p')")
		waitFor(t, 10*time.Second, func() bool {
			var active bool
			err := conn.QueryRow(ctx, "SELECT active FROM pg_replication_slots WHERE slot_name = $1", db).Scan(&active)
			return err == nil && active
		})
	})
	require.NotEmpty(t, db)
	requireNoDatabases(t, s, db)
	var slots int
	require.NoError(t, s.AdminConn(t).QueryRow(context.Background(),
		"SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1", db).Scan(&slots))
	require.Zero(t, slots, "slot dropped with its database")
}

func TestDedicatedRestartImmediate(t *testing.T) {
	t.Parallel()
	s := New(t, map[string]string{"wal_sender_timeout": "3s", "max_slot_wal_keep_size": "64MB"})
	require.True(t, s.Dedicated())
	port := s.Port
	ctx := context.Background()

	dbURL := s.NewDatabase(t)
	conn, err := pgx.Connect(ctx, dbURL)
	require.NoError(t, err)
	var timeout, keep string
	require.NoError(t, conn.QueryRow(ctx, "SELECT current_setting('wal_sender_timeout'), current_setting('max_slot_wal_keep_size')").Scan(&timeout, &keep))
	require.Equal(t, "3s", timeout)
	require.Equal(t, "64MB", keep)
	_, err = conn.Exec(ctx, "CREATE TABLE t (id int); INSERT INTO t SELECT generate_series(1, 1000)")
	require.NoError(t, err)

	begin := time.Now()
	s.Restart(t, "immediate")
	t.Logf("immediate restart with crash recovery took %s", time.Since(begin).Round(time.Millisecond))
	require.Equal(t, port, s.Port)

	// The old session died with the server.
	require.Error(t, conn.Ping(ctx))
	_ = conn.Close(ctx)

	conn, err = pgx.Connect(ctx, dbURL)
	require.NoError(t, err)
	defer conn.Close(ctx)
	var n int
	require.NoError(t, conn.QueryRow(ctx, "SELECT count(*) FROM t").Scan(&n))
	require.Equal(t, 1000, n, "committed rows survive an immediate stop")

	s.Stop(t, "fast")
	s.Stop(t, "fast") // stopping a stopped server is a no-op
	s.Start(t)
	s.Start(t) // and so is starting a running one
	s.Exec(t, "postgres", "SELECT 1")
}

// TestMajors runs against the shared server of each selected major
// (OUTBOXD_TEST_PG_MAJORS): it is that major, and a pgoutput slot can be made
// and dropped on it. A selected major without binaries fails the test.
func TestMajors(t *testing.T) {
	t.Parallel()
	for _, major := range Majors(t) {
		t.Run(fmt.Sprintf("pg%d", major), func(t *testing.T) {
			t.Parallel()
			s := SharedMajor(t, major)
			require.Same(t, s, SharedMajor(t, major), "one shared server per major")
			require.Equal(t, major, s.Major())
			require.True(t, s.Dedicated())
			if d, err := defaultBinaries(); err == nil && d.major == major && os.Getenv(EnvDatabaseURL) == "" {
				require.Same(t, Shared(t), s, "Shared is the shared server of the default major")
			}

			ctx := context.Background()
			dbURL := s.NewDatabase(t)
			cfg, err := pgx.ParseConfig(dbURL)
			require.NoError(t, err)
			conn, err := pgx.Connect(ctx, dbURL)
			require.NoError(t, err)
			defer conn.Close(ctx)

			var versionNum int
			require.NoError(t, conn.QueryRow(ctx, "SELECT current_setting('server_version_num')::int").Scan(&versionNum))
			require.Equal(t, major, versionNum/10000, "server_version_num %d", versionNum)

			// The database name is unique on the server, and so is a slot
			// named after it.
			slot := cfg.Database
			_, err = conn.Exec(ctx, "SELECT pg_create_logical_replication_slot($1, 'pgoutput')", slot)
			require.NoError(t, err)
			var plugin string
			require.NoError(t, conn.QueryRow(ctx, "SELECT plugin FROM pg_replication_slots WHERE slot_name = $1", slot).Scan(&plugin))
			require.Equal(t, "pgoutput", plugin)
			_, err = conn.Exec(ctx, "SELECT pg_drop_replication_slot($1)", slot)
			require.NoError(t, err)
		})
	}
}

// TestNewMajor starts a dedicated server of the last selected major with a
// setting of its own.
func TestNewMajor(t *testing.T) {
	t.Parallel()
	majors := Majors(t)
	major := majors[len(majors)-1]
	s := NewMajor(t, major, map[string]string{"wal_sender_timeout": "7s"})
	require.Equal(t, major, s.Major())
	var timeout string
	require.NoError(t, s.AdminConn(t).QueryRow(context.Background(), "SHOW wal_sender_timeout").Scan(&timeout))
	require.Equal(t, "7s", timeout)
}

// startReplication sends START_REPLICATION and waits for CopyBothResponse.
func startReplication(t *testing.T, conn *pgconn.PgConn, sql string) {
	t.Helper()
	fe := conn.Frontend()
	fe.Send(&pgproto3.Query{String: sql})
	require.NoError(t, fe.Flush())
	for {
		msg, err := fe.Receive()
		require.NoError(t, err)
		switch msg := msg.(type) {
		case *pgproto3.CopyBothResponse:
			return
		case *pgproto3.ErrorResponse:
			t.Fatalf("START_REPLICATION: %s", msg.Message)
		}
	}
}

func requireNoDatabases(t *testing.T, s *Server, names ...string) {
	t.Helper()
	var n int
	require.NoError(t, s.AdminConn(t).QueryRow(context.Background(),
		"SELECT count(*) FROM pg_database WHERE datname = ANY($1)", names).Scan(&n))
	require.Zero(t, n, "databases dropped in cleanup: %v", names)
}

// waitFor polls cond until it holds or timeout passes.
func waitFor(t *testing.T, timeout time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("condition not met within %s", timeout)
		}
		<-tick.C
	}
}

// Inside ForEachMajor, Shared gives a server of the subtest's major, also in
// the subtests it starts.
func TestForEachMajorSelectsTheServer(t *testing.T) {
	if os.Getenv(EnvDatabaseURL) != "" {
		t.Skip("an external server has one major of its own")
	}
	seen := 0
	ForEachMajor(t, func(t *testing.T) {
		want, ok := majorOf(t)
		require.True(t, ok)
		require.Equal(t, want, Shared(t).Major())
		t.Run("nested", func(t *testing.T) {
			require.Equal(t, want, Shared(t).Major())
		})
		seen++
	})
	require.Equal(t, len(Majors(t)), seen)
}

// A standby made by NewStandby replays what the primary commits, and after
// the primary is killed and the standby promoted it takes writes.
func TestStandbyFollowsAndIsPromoted(t *testing.T) {
	t.Parallel()
	ForEachMajor(t, func(t *testing.T) {
		primary := New(t, nil)
		primary.Exec(t, "postgres", "SELECT pg_create_physical_replication_slot('standby', true)")
		primary.Exec(t, "postgres", "CREATE TABLE t (id int); INSERT INTO t VALUES (1)")
		standby := NewStandby(t, primary, map[string]string{"primary_slot_name": "standby", "hot_standby": "on"})
		ctx := context.Background()
		p, s := primary.AdminConn(t), standby.AdminConn(t)
		var primarySys, standbySys string
		require.NoError(t, p.QueryRow(ctx, "SELECT system_identifier::text FROM pg_control_system()").Scan(&primarySys))
		require.NoError(t, s.QueryRow(ctx, "SELECT system_identifier::text FROM pg_control_system()").Scan(&standbySys))
		require.Equal(t, primarySys, standbySys)
		_, err := p.Exec(ctx, "INSERT INTO t VALUES (2)")
		require.NoError(t, err)
		var target string
		require.NoError(t, p.QueryRow(ctx, "SELECT pg_current_wal_lsn()::text").Scan(&target))
		waitFor(t, time.Minute, func() bool {
			var ok bool
			return s.QueryRow(ctx, "SELECT coalesce(pg_last_wal_replay_lsn() >= $1::pg_lsn, false)", target).Scan(&ok) == nil && ok
		})
		primary.Kill(t)
		var promoted bool
		require.NoError(t, s.QueryRow(ctx, "SELECT pg_promote()").Scan(&promoted))
		require.True(t, promoted)
		_, err = s.Exec(ctx, "INSERT INTO t VALUES (3)")
		require.NoError(t, err)
		var n int
		require.NoError(t, s.QueryRow(ctx, "SELECT count(*) FROM t").Scan(&n))
		require.Equal(t, 3, n)
		primary.Start(t) // crash recovery of the killed one; it is torn down at cleanup
	})
}
