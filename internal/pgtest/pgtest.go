// Package pgtest starts PostgreSQL servers for tests (docs/DESIGN.md §5): a server
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
// Most tests run against the default server binaries. A test that must hold
// on every supported PostgreSQL major runs its body through [ForEachMajor]
// (majors chosen with OUTBOXD_TEST_PG_MAJORS, e.g. "15,16,17,18"): inside it,
// [Shared] and [New] give servers of the subtest's major. [SharedMajor] and
// [NewMajor] ask for a major by number; scripts/install-postgres.sh installs
// the binaries.
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
	"strings"
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

// EnvMajors names the environment variable that selects the PostgreSQL majors
// of [Majors]: a comma list such as "15,16,17,18". A selected major whose
// binaries are missing fails the tests that use it rather than skipping them,
// so a CI run cannot pass while testing fewer majors than asked for.
const EnvMajors = "OUTBOXD_TEST_PG_MAJORS"

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
	// major is the server's PostgreSQL major, e.g. 17.
	major int

	// inst is the local cluster; nil for external servers.
	inst *pgserver.Instance
}

// sharedSlot is one lazily started shared server. A failed start is kept, so
// that every test asking for the server fails with the same error and log.
type sharedSlot struct {
	mu      sync.Mutex
	started bool
	server  *Server
	err     error
	startup time.Duration
}

var (
	// mainActive is set by Main: Shared refuses to start a server nobody
	// would stop.
	mainActive atomic.Bool

	// sharedMu guards the slot map and sharedUsed, not the slots: servers of
	// different majors start in parallel.
	sharedMu sync.Mutex
	// externalSlot is the server of OUTBOXD_TEST_DATABASE_URL.
	externalSlot sharedSlot
	// majorSlots holds the local shared servers, one per major. Shared's
	// server is the one of the default binaries' major, so a package that
	// also asks for that major by number gets the same server.
	majorSlots = map[int]*sharedSlot{}
	// sharedUsed is the slot Shared returned, for SharedStartup.
	sharedUsed *sharedSlot
)

// binaries are the default server binaries and their major.
type binaries struct {
	dir   string
	major int
}

// defaultBinaries finds the default server binaries once per test process:
// they do not change during a run, and each look-up runs postgres --version.
var defaultBinaries = sync.OnceValues(func() (binaries, error) {
	dir, err := pgserver.FindBinDir()
	if err != nil {
		return binaries{}, err
	}
	major, err := pgserver.ServerMajor(dir)
	if err != nil {
		return binaries{}, err
	}
	return binaries{dir: dir, major: major}, nil
})

// binDirFor returns the binaries a server of major runs: the default ones
// when they are of that major (so Shared and SharedMajor agree), else those
// pgserver.BinDirFor finds.
func binDirFor(major int) (string, error) {
	if d, err := defaultBinaries(); err == nil && d.major == major {
		return d.dir, nil
	}
	return pgserver.BinDirFor(major)
}

var (
	atExitMu sync.Mutex
	atExit   []func()
)

// AtExit registers f to run when Main's tests are done, before the shared
// servers stop (last registered, first run): for what outlives a single
// test, such as a binary built once per test process.
func AtExit(f func()) {
	atExitMu.Lock()
	defer atExitMu.Unlock()
	atExit = append(atExit, f)
}

// Main is called from a package's TestMain: it runs m, then stops the shared
// servers that were started, and exits with m's code.
func Main(m *testing.M) {
	mainActive.Store(true)
	code := m.Run()
	atExitMu.Lock()
	for i := len(atExit) - 1; i >= 0; i-- {
		atExit[i]()
	}
	atExitMu.Unlock()
	sharedMu.Lock()
	var servers []*Server
	for _, slot := range majorSlots {
		slot.mu.Lock() // no test runs any more: a start in flight has ended
		if slot.server != nil && slot.server.inst != nil {
			servers = append(servers, slot.server)
		}
		slot.mu.Unlock()
	}
	sharedMu.Unlock()
	// In parallel: each fast stop waits for a checkpoint.
	var wg sync.WaitGroup
	for _, s := range servers {
		wg.Go(func() {
			if err := s.inst.Teardown(); err != nil {
				fmt.Fprintf(os.Stderr, "pgtest: stop shared PostgreSQL %d server: %v\n", s.major, err)
			}
		})
	}
	wg.Wait()
	os.Exit(code)
}

// Shared returns the package's shared server, started on first use, or the
// server of OUTBOXD_TEST_DATABASE_URL when that is set. Tests sharing it must
// not stop it or change its settings: use [New] for that. A failed start fails
// every test that asks for the server, with the server's log. A local one runs
// the default binaries and is also [SharedMajor] of their major.
func Shared(t testing.TB) *Server {
	t.Helper()
	if m, ok := majorOf(t); ok {
		return SharedMajor(t, m)
	}
	var slot *sharedSlot
	var start func() (*Server, error)
	if raw := os.Getenv(EnvDatabaseURL); raw != "" {
		slot = &externalSlot
		start = func() (*Server, error) { return externalServer(raw) }
	} else {
		d, err := defaultBinaries()
		if err != nil {
			t.Fatalf("pgtest: shared server: %v (or set %s to use an existing server)", err, EnvDatabaseURL)
		}
		slot = majorSlot(d.major)
		start = func() (*Server, error) { return startShared(d.dir) }
	}
	sharedMu.Lock()
	sharedUsed = slot
	sharedMu.Unlock()
	return slot.get(t, "shared server", start)
}

// SharedMajor returns the package's shared server of one PostgreSQL major,
// started on first use from the binaries of that major; it is the server
// Shared returns when the default binaries are of that major. It is always a
// local server, also when OUTBOXD_TEST_DATABASE_URL is set, whose server has
// the one major it has. Missing binaries fail the test, naming the script that
// installs them. The rules of Shared apply: do not stop it or change its
// settings, and call [Main] from TestMain.
func SharedMajor(t testing.TB, major int) *Server {
	t.Helper()
	what := fmt.Sprintf("shared PostgreSQL %d server", major)
	return majorSlot(major).get(t, what, func() (*Server, error) {
		bin, err := binDirFor(major)
		if err != nil {
			return nil, err
		}
		return startShared(bin)
	})
}

// SharedStartup reports how long Shared took to provide the shared server
// (initdb, start and first connection; for an external server, one
// connection), zero before the first call. It is for logs, not assertions.
func SharedStartup() time.Duration {
	sharedMu.Lock()
	slot := sharedUsed
	sharedMu.Unlock()
	if slot == nil {
		return 0
	}
	slot.mu.Lock()
	defer slot.mu.Unlock()
	return slot.startup
}

func majorSlot(major int) *sharedSlot {
	sharedMu.Lock()
	defer sharedMu.Unlock()
	slot := majorSlots[major]
	if slot == nil {
		slot = &sharedSlot{}
		majorSlots[major] = slot
	}
	return slot
}

// get returns the slot's server, starting it with start on first use.
func (slot *sharedSlot) get(t testing.TB, what string, start func() (*Server, error)) *Server {
	t.Helper()
	slot.mu.Lock()
	defer slot.mu.Unlock()
	if !slot.started {
		slot.started = true
		begin := time.Now()
		slot.server, slot.err = start()
		slot.startup = time.Since(begin)
		if slot.err == nil {
			t.Logf("pgtest: %s %s:%d (PostgreSQL %d) ready in %s", what, slot.server.Host, slot.server.Port,
				slot.server.major, slot.startup.Round(time.Millisecond))
		}
	}
	if slot.err != nil {
		t.Fatalf("pgtest: %s: %v", what, slot.err)
	}
	return slot.server
}

func startShared(bin string) (*Server, error) {
	if !mainActive.Load() {
		return nil, fmt.Errorf("call pgtest.Main(m) from the package's TestMain: it stops the shared server when the tests end")
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
	if m, ok := majorOf(t); ok {
		return NewMajor(t, m, settings)
	}
	d, err := defaultBinaries()
	if err != nil {
		if os.Getenv(EnvDatabaseURL) != "" {
			t.Skipf("pgtest: this test needs a dedicated server, and %v", err)
		}
		t.Fatalf("pgtest: %v", err)
	}
	return startDedicated(t, d.dir, settings)
}

// NewMajor is [New] with the server binaries of one PostgreSQL major. Missing
// binaries fail the test, naming the script that installs them: a test that
// asks for a major by number must not pass without it.
func NewMajor(t testing.TB, major int, settings map[string]string) *Server {
	t.Helper()
	bin, err := binDirFor(major)
	if err != nil {
		t.Fatalf("pgtest: dedicated PostgreSQL %d server: %v", major, err)
	}
	return startDedicated(t, bin, settings)
}

// NewEnv is [New] with env ("NAME=value") added to the server process's
// environment.
func NewEnv(t testing.TB, settings map[string]string, env []string) *Server {
	t.Helper()
	if m, ok := majorOf(t); ok {
		bin, err := binDirFor(m)
		if err != nil {
			t.Fatalf("pgtest: dedicated PostgreSQL %d server: %v", m, err)
		}
		return startDedicatedEnv(t, bin, settings, env)
	}
	d, err := defaultBinaries()
	if err != nil {
		t.Fatalf("pgtest: %v", err)
	}
	return startDedicatedEnv(t, d.dir, settings, env)
}

func startDedicated(t testing.TB, bin string, settings map[string]string) *Server {
	t.Helper()
	return startDedicatedEnv(t, bin, settings, nil)
}

func startDedicatedEnv(t testing.TB, bin string, settings map[string]string, env []string) *Server {
	t.Helper()
	inst, err := pgserver.StartEnv(bin, settings, env)
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

// NewStandby starts a physical standby of primary, a dedicated server of the
// same binaries, stopped and removed in t.Cleanup: a base backup of it
// (pgserver.Options.StandbyOf) streaming from it. settings add to the
// standby's postgresql.conf (primary_slot_name, hot_standby_feedback, …).
func NewStandby(t testing.TB, primary *Server, settings map[string]string) *Server {
	t.Helper()
	primary.mustOwn(t, "make a standby of")
	inst, err := pgserver.Open(primary.inst.BinDir(), pgserver.Options{Settings: settings, StandbyOf: primary.inst})
	if err != nil {
		t.Fatalf("pgtest: start standby: %v", err)
	}
	t.Cleanup(func() {
		if err := inst.Teardown(); err != nil {
			t.Errorf("pgtest: stop standby: %v", err)
		}
	})
	return localServer(inst)
}

// Majors returns the PostgreSQL majors a multi-version test runs against:
// those of OUTBOXD_TEST_PG_MAJORS, in its order, or else only the major of the
// default server binaries, so that a plain go test covers one major quickly.
// A malformed list fails the test. With neither the list nor binaries, it
// skips the test when OUTBOXD_TEST_DATABASE_URL is set (as New does) and
// fails it otherwise.
func Majors(t testing.TB) []int {
	t.Helper()
	if raw := os.Getenv(EnvMajors); strings.TrimSpace(raw) != "" {
		majors, err := pgserver.ParseMajors(raw)
		if err != nil {
			t.Fatalf("pgtest: %s: %v", EnvMajors, err)
		}
		return majors
	}
	d, err := defaultBinaries()
	if err != nil {
		if os.Getenv(EnvDatabaseURL) != "" {
			t.Skipf("pgtest: this test starts servers of its own, and %v; set %s to choose majors", err, EnvMajors)
		}
		t.Fatalf("pgtest: %v (set %s to choose majors; scripts/install-postgres.sh installs them)", err, EnvMajors)
	}
	return []int{d.major}
}

var (
	matrixMu sync.Mutex
	// matrix maps the name of each ForEachMajor subtest to its major.
	matrix = map[string]int{}
)

// ForEachMajor runs f as one subtest per major of [Majors], named "pg15",
// "pg16", …. Within f (and the subtests it starts), [Shared] and [New] give
// servers of that major, so a test written for one server runs on every
// selected major unchanged. With OUTBOXD_TEST_PG_MAJORS unset it is one
// subtest on the default binaries.
func ForEachMajor(t *testing.T, f func(t *testing.T)) {
	t.Helper()
	for _, m := range Majors(t) {
		t.Run(fmt.Sprintf("pg%d", m), func(t *testing.T) {
			matrixMu.Lock()
			matrix[t.Name()] = m
			matrixMu.Unlock()
			f(t)
		})
	}
}

// majorOf returns the major of the ForEachMajor subtest t runs in, if any.
func majorOf(t testing.TB) (int, bool) {
	matrixMu.Lock()
	defer matrixMu.Unlock()
	for name := t.Name(); name != ""; {
		if m, ok := matrix[name]; ok {
			return m, true
		}
		i := strings.LastIndexByte(name, '/')
		if i < 0 {
			break
		}
		name = name[:i]
	}
	return 0, false
}

func localServer(inst *pgserver.Instance) *Server {
	return &Server{Host: "127.0.0.1", Port: inst.Port(), adminDB: "postgres", inst: inst, major: inst.Major()}
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
	var version int
	err = conn.QueryRow(ctx, "SELECT current_setting('server_version_num')::int").Scan(&version)
	closeErr := conn.Close(ctx)
	if err != nil {
		return nil, fmt.Errorf("read server version of %s: %w", EnvDatabaseURL, err)
	}
	s.major = version / 10000
	return s, closeErr
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
	d, err := defaultBinaries()
	if err != nil {
		return ""
	}
	return d.dir
}

// Major returns the server's PostgreSQL major, e.g. 17: that of its binaries
// for servers started here, from server_version_num for an external server.
func (s *Server) Major() int { return s.major }

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

// Kill kills the server's postmaster with SIGKILL, by its process id, and
// waits until it has exited: a crashed primary. [Server.Start] runs crash
// recovery.
func (s *Server) Kill(t testing.TB) {
	t.Helper()
	s.mustOwn(t, "kill")
	if err := s.inst.Kill(); err != nil {
		t.Fatalf("pgtest: kill server on port %d: %v", s.Port, err)
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
