// Package pgtest starts PostgreSQL servers for tests (DESIGN.md §5): a server
// shared by a package's tests, and dedicated servers for tests that stop,
// restart or reconfigure Postgres. It is test-only code.
//
// A package that uses [Shared] calls [Main] from its TestMain, which stops the
// shared server when the tests are done:
//
//	func TestMain(m *testing.M) { pgtest.Main(m) }
//
// Each test then takes its own database with [Server.NewDatabase].
//
// Invariants:
//   - Only servers started here are ever stopped, always through their own data
//     directory; a server of OUTBOXD_TEST_DATABASE_URL is never stopped,
//     restarted or reconfigured.
//   - A started postmaster is a child of the test process and is shut down
//     (immediate mode, SIGQUIT) by the kernel if the test process dies, so a
//     crashed or timed-out test run leaves no server behind.
//   - Readiness is established by connecting, never by sleeping.
package pgtest

import (
	"github.com/outboxd/outboxd/internal/pgserver"

	"context"
	"fmt"
	"net/url"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// EnvDatabaseURL names the environment variable that points the tests at an
// existing server instead of one started by pgtest. Its value is a
// postgres:// URL whose role may create and drop databases; its database is
// used as the administrative database.
const EnvDatabaseURL = "OUTBOXD_TEST_DATABASE_URL"

const (
	// superuser is the bootstrap role of clusters made by initdb here.
	superuser = pgserver.Superuser
	// opTimeout bounds every administrative statement or connection made by
	// the helpers, so a wedged server fails the test instead of hanging it.
	opTimeout = time.Minute
)

// Server is a Postgres server for tests.
type Server struct {
	// Host and Port are where the server accepts TCP connections.
	Host string
	Port int

	// external is the base URL of an OUTBOXD_TEST_DATABASE_URL server; nil
	// for servers started here.
	external *url.URL
	// adminDB is the database administrative connections use.
	adminDB string
	// shared marks the package's shared server, which tests must not stop.
	shared bool

	// inst is the local cluster; nil for external servers.
	inst *pgserver.Instance
}

var (
	// mainActive is set by Main: Shared refuses to start a server nobody
	// would stop.
	mainActive atomic.Bool

	sharedMu      sync.Mutex
	sharedServer  *Server
	sharedErr     error
	sharedStarted bool
	sharedStartup time.Duration
)

// Main is called from a package's TestMain: it runs m, then stops the shared
// server if one was started, and exits with m's code.
func Main(m *testing.M) {
	mainActive.Store(true)
	code := m.Run()
	sharedMu.Lock()
	s := sharedServer
	sharedMu.Unlock()
	if s != nil && s.inst != nil {
		if err := s.inst.Teardown(); err != nil {
			fmt.Fprintf(os.Stderr, "pgtest: stop shared server: %v\n", err)
		}
	}
	os.Exit(code)
}

// Shared returns the package's shared server, started on first use, or the
// server of OUTBOXD_TEST_DATABASE_URL when that is set. Tests sharing it must
// not stop it or change its settings: use [New] for that. A failed start fails
// every test that asks for the server, with the server's log.
func Shared(t testing.TB) *Server {
	t.Helper()
	sharedMu.Lock()
	defer sharedMu.Unlock()
	if !sharedStarted {
		sharedStarted = true
		begin := time.Now()
		sharedServer, sharedErr = startShared()
		sharedStartup = time.Since(begin)
		if sharedErr == nil {
			t.Logf("pgtest: shared server %s:%d ready in %s", sharedServer.Host, sharedServer.Port, sharedStartup.Round(time.Millisecond))
		}
	}
	if sharedErr != nil {
		t.Fatalf("pgtest: shared server: %v", sharedErr)
	}
	return sharedServer
}

// SharedStartup reports how long Shared took to provide the shared server
// (initdb, start and first connection; for an external server, one
// connection), zero before the first call. It is for logs, not assertions.
func SharedStartup() time.Duration {
	sharedMu.Lock()
	defer sharedMu.Unlock()
	return sharedStartup
}

func startShared() (*Server, error) {
	if raw := os.Getenv(EnvDatabaseURL); raw != "" {
		return externalServer(raw)
	}
	if !mainActive.Load() {
		return nil, fmt.Errorf("call pgtest.Main(m) from the package's TestMain: it stops the shared server when the tests end")
	}
	bin, err := pgserver.FindBinDir()
	if err != nil {
		return nil, fmt.Errorf("%w (or set %s to use an existing server)", err, EnvDatabaseURL)
	}
	inst, err := pgserver.Start(bin, nil)
	if err != nil {
		return nil, err
	}
	s := localServer(inst)
	s.shared = true
	return s, nil
}

// New starts a dedicated server for one test (for tests that stop or restart
// Postgres or change server settings); it is stopped and its files removed in
// t.Cleanup. settings add to or override the postgresql.conf settings pgtest
// writes, e.g. {"wal_sender_timeout": "3s", "max_slot_wal_keep_size": "64MB"}.
//
// New always starts a local server, also when OUTBOXD_TEST_DATABASE_URL is set;
// it skips the test when that is set and no server binaries are installed.
func New(t testing.TB, settings map[string]string) *Server {
	t.Helper()
	bin, err := pgserver.FindBinDir()
	if err != nil {
		if os.Getenv(EnvDatabaseURL) != "" {
			t.Skipf("pgtest: this test needs a dedicated server, and %v", err)
		}
		t.Fatalf("pgtest: %v", err)
	}
	inst, err := pgserver.Start(bin, settings)
	if err != nil {
		t.Fatalf("pgtest: start dedicated server: %v", err)
	}
	t.Cleanup(func() {
		if err := inst.Teardown(); err != nil {
			t.Errorf("pgtest: stop dedicated server: %v", err)
		}
	})
	return localServer(inst)
}

func localServer(inst *pgserver.Instance) *Server {
	return &Server{Host: "127.0.0.1", Port: inst.Port(), adminDB: "postgres", inst: inst}
}

func externalServer(raw string) (*Server, error) {
	u, err := url.Parse(raw)
	if err != nil || (u.Scheme != "postgres" && u.Scheme != "postgresql") {
		// Not echoing raw: it may hold a password.
		return nil, fmt.Errorf("parse %s: want a postgres:// URL", EnvDatabaseURL)
	}
	s := &Server{Host: u.Hostname(), Port: 5432, external: u, adminDB: "postgres"}
	if s.Host == "" {
		s.Host = "localhost"
	}
	if p := u.Port(); p != "" {
		if s.Port, err = strconv.Atoi(p); err != nil {
			return nil, fmt.Errorf("parse %s: bad port %q", EnvDatabaseURL, p)
		}
	}
	if db := trimSlash(u.Path); db != "" {
		s.adminDB = db
	}
	ctx, cancel := context.WithTimeout(context.Background(), opTimeout)
	defer cancel()
	conn, err := pgx.Connect(ctx, s.URL(s.adminDB))
	if err != nil {
		return nil, fmt.Errorf("connect to %s: %w", EnvDatabaseURL, err)
	}
	return s, conn.Close(ctx)
}

func trimSlash(p string) string {
	for len(p) > 0 && p[0] == '/' {
		p = p[1:]
	}
	return p
}

// Dedicated reports whether pgtest started this server (shared or from New);
// it is false for the server of OUTBOXD_TEST_DATABASE_URL.
func (s *Server) Dedicated() bool { return s.inst != nil }

// BinDir returns the directory of the server binaries (pg_ctl, postgres,
// pg_recvlogical, …), or "" when none is installed (possible only with an
// external server).
func (s *Server) BinDir() string {
	if s.inst != nil {
		return s.inst.BinDir()
	}
	bin, err := pgserver.FindBinDir()
	if err != nil {
		return ""
	}
	return bin
}

// URL returns the URL of database db on the server:
// postgres://postgres@127.0.0.1:PORT/DB?sslmode=disable for servers started
// here; the OUTBOXD_TEST_DATABASE_URL with its database replaced otherwise.
func (s *Server) URL(db string) string {
	if s.external != nil {
		u := *s.external
		u.Path = "/" + db
		u.RawPath = ""
		return u.String()
	}
	u := url.URL{
		Scheme:   "postgres",
		User:     url.User(superuser),
		Host:     fmt.Sprintf("%s:%d", s.Host, s.Port),
		Path:     "/" + db,
		RawQuery: "sslmode=disable",
	}
	return u.String()
}

// AdminConn returns a connection to the administrative database ("postgres",
// or the database of OUTBOXD_TEST_DATABASE_URL), closed in t.Cleanup.
func (s *Server) AdminConn(t testing.TB) *pgx.Conn {
	t.Helper()
	return s.Conn(t, s.adminDB)
}

// Conn returns a connection to database db, closed in t.Cleanup.
func (s *Server) Conn(t testing.TB, db string) *pgx.Conn {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), opTimeout)
	defer cancel()
	conn, err := pgx.Connect(ctx, s.URL(db))
	if err != nil {
		t.Fatalf("pgtest: connect to database %q: %v", db, err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), opTimeout)
		defer cancel()
		_ = conn.Close(ctx) // the server may be gone already: nothing to report
	})
	return conn
}

// Exec runs sql with args in database db (a name, not a URL) on a connection of
// its own, failing the test on error.
func (s *Server) Exec(t testing.TB, db, sql string, args ...any) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), opTimeout)
	defer cancel()
	conn, err := pgx.Connect(ctx, s.URL(db))
	if err != nil {
		t.Fatalf("pgtest: connect to database %q: %v", db, err)
	}
	defer conn.Close(ctx)
	if _, err := conn.Exec(ctx, sql, args...); err != nil {
		t.Fatalf("pgtest: exec in database %q: %v\n%s", db, err, sql)
	}
}

// Stop stops the server with pg_ctl stop -m mode (smart, fast or immediate)
// and waits until the postmaster has exited. The data directory is kept for
// [Server.Start]. It skips the test for an external server and fails it for the
// shared server, which other tests are using.
func (s *Server) Stop(t testing.TB, mode string) {
	t.Helper()
	s.mustOwn(t, "stop")
	if err := s.inst.Stop(mode); err != nil {
		t.Fatalf("pgtest: stop server on port %d: %v", s.Port, err)
	}
}

// Start starts a stopped server again on the same port and data directory and
// waits until it accepts connections (after crash recovery, following an
// immediate stop). Starting a running server is a no-op.
func (s *Server) Start(t testing.TB) {
	t.Helper()
	s.mustOwn(t, "start")
	if err := s.inst.Start(); err != nil {
		t.Fatalf("pgtest: start server on port %d: %v", s.Port, err)
	}
}

// Restart stops the server with mode and starts it again.
func (s *Server) Restart(t testing.TB, mode string) {
	t.Helper()
	s.Stop(t, mode)
	s.Start(t)
}

func (s *Server) mustOwn(t testing.TB, action string) {
	t.Helper()
	if s.inst == nil {
		t.Skipf("pgtest: cannot %s the server of %s: an external server cannot be stopped or restarted; unset it to run this test", action, EnvDatabaseURL)
	}
	if s.shared {
		t.Fatalf("pgtest: cannot %s the shared server: other tests use it; start a dedicated one with pgtest.New", action)
	}
}
