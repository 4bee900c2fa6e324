package pgserver

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"
)

// envMajors is pgtest.EnvMajors, which this package cannot import (pgtest
// imports it).
const envMajors = "OUTBOXD_TEST_PG_MAJORS"

func TestStartFailureReportsLog(t *testing.T) {
	t.Parallel()
	bin, err := FindBinDir()
	require.NoError(t, err)
	_, err = Start(bin, map[string]string{"no_such_setting_xyz": "1"})
	require.ErrorContains(t, err, `unrecognized configuration parameter "no_such_setting_xyz"`, "the log tail is in the error")
	require.NotErrorIs(t, err, errPortInUse)
}

func TestStartPortTaken(t *testing.T) {
	t.Parallel()
	bin, err := FindBinDir()
	require.NoError(t, err)
	in, err := Start(bin, nil)
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, in.Teardown()) })
	require.NoError(t, in.Stop("fast"))

	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer l.Close()
	in.port = l.Addr().(*net.TCPAddr).Port
	err = in.Start()
	require.ErrorIs(t, err, errPortInUse, "a first start retries on another port")
	require.False(t, in.Running())
}

// TestMajors starts a cluster of each selected major (OUTBOXD_TEST_PG_MAJORS,
// else the default binaries' major) with Start as the tests use it, and
// checks that it is that major and can decode with pgoutput. A selected major
// without binaries fails: a run asked for it.
func TestMajors(t *testing.T) {
	t.Parallel()
	type target struct {
		major int
		bin   string // "" to look it up with BinDirFor
	}
	var targets []target
	if raw := strings.TrimSpace(os.Getenv(envMajors)); raw != "" {
		majors, err := ParseMajors(raw)
		require.NoError(t, err, envMajors)
		for _, m := range majors {
			targets = append(targets, target{major: m})
		}
	} else {
		bin, err := FindBinDir()
		require.NoError(t, err)
		m, err := ServerMajor(bin)
		require.NoError(t, err)
		targets = append(targets, target{major: m, bin: bin})
	}
	for _, tg := range targets {
		t.Run(fmt.Sprintf("pg%d", tg.major), func(t *testing.T) {
			t.Parallel()
			bin := tg.bin
			if bin == "" {
				var err error
				bin, err = BinDirFor(tg.major)
				require.NoError(t, err, "binaries of a selected major must be installed")
			}
			begin := time.Now()
			in, err := Start(bin, nil)
			require.NoError(t, err)
			t.Cleanup(func() { require.NoError(t, in.Teardown()) })
			t.Logf("PostgreSQL %d from %s started in %s", in.Major(), bin, time.Since(begin).Round(time.Millisecond))
			require.Equal(t, tg.major, in.Major())
			requireLogicalDecoding(t, in, tg.major)
		})
	}
}

// requireLogicalDecoding checks the server's version and that a pgoutput slot
// can be made and dropped: the least outboxd needs of a server.
func requireLogicalDecoding(t *testing.T, in *Instance, major int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	conn, err := pgx.Connect(ctx, fmt.Sprintf("postgres://%s@127.0.0.1:%d/postgres?sslmode=disable", Superuser, in.Port()))
	require.NoError(t, err)
	defer conn.Close(ctx)

	var versionNum int
	require.NoError(t, conn.QueryRow(ctx, "SELECT current_setting('server_version_num')::int").Scan(&versionNum))
	require.Equal(t, major, versionNum/10000, "server_version_num %d", versionNum)

	var slot, plugin string
	require.NoError(t, conn.QueryRow(ctx, "SELECT slot_name FROM pg_create_logical_replication_slot('majors_check', 'pgoutput')").Scan(&slot))
	require.NoError(t, conn.QueryRow(ctx, "SELECT plugin FROM pg_replication_slots WHERE slot_name = $1", slot).Scan(&plugin))
	require.Equal(t, "pgoutput", plugin)
	_, err = conn.Exec(ctx, "SELECT pg_drop_replication_slot($1)", slot)
	require.NoError(t, err)
}

func TestParseServerMajor(t *testing.T) {
	t.Parallel()
	for in, want := range map[string]int{
		"postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)\n": 15,
		"postgres (PostgreSQL) 16.14\n":                          16,
		"postgres (PostgreSQL) 18.4":                             18,
		"postgres (PostgreSQL) 19beta1":                          19,
	} {
		got, err := parseServerMajor(in)
		require.NoError(t, err, in)
		require.Equal(t, want, got, in)
	}
	for _, in := range []string{"", "postgres 16.1", "postgres (PostgreSQL) 9.6.24"} {
		_, err := parseServerMajor(in)
		require.Error(t, err, in)
	}
}

func TestParseMajors(t *testing.T) {
	t.Parallel()
	got, err := ParseMajors(" 18, 15,,16,18 ")
	require.NoError(t, err)
	require.Equal(t, []int{18, 15, 16}, got, "order kept, blanks and repeats dropped")
	for _, in := range []string{"", " , ", "16,x", "9", "16.2"} {
		_, err := ParseMajors(in)
		require.Error(t, err, "%q", in)
	}
}

func TestBinDirForMissingMajor(t *testing.T) {
	t.Setenv(EnvCache, t.TempDir())
	dir, err := CacheDir()
	require.NoError(t, err)
	_, err = BinDirFor(99)
	require.ErrorContains(t, err, "scripts/install-postgres.sh 99", "the error says how to install")
	require.ErrorContains(t, err, filepath.Join(dir, "99", "bin"), "and where it looked")
}

// A kept data directory (Options.DataDir) on a fixed port: the cluster is
// made on the first Open, left in place by Teardown and reused, data
// included, by the next Open; a directory with other files is refused.
func TestOpenKeptDataDir(t *testing.T) {
	t.Parallel()
	bin, err := FindBinDir()
	require.NoError(t, err)
	// Not t.TempDir: when the tests run as root, user postgres must be able
	// to enter the directory.
	base, err := os.MkdirTemp("", "outboxd-pgserver-test-")
	require.NoError(t, err)
	require.NoError(t, os.Chmod(base, 0o755))
	t.Cleanup(func() { os.RemoveAll(base) })
	dataDir := filepath.Join(base, "pgdata")
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	port := l.Addr().(*net.TCPAddr).Port
	require.NoError(t, l.Close())

	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	exec := func(in *Instance, sql string) error {
		conn, err := pgx.Connect(ctx, fmt.Sprintf("postgres://%s@127.0.0.1:%d/postgres?sslmode=disable", Superuser, in.Port()))
		if err != nil {
			return err
		}
		defer conn.Close(ctx)
		_, err = conn.Exec(ctx, sql)
		return err
	}

	in, err := Open(bin, Options{DataDir: dataDir, Port: port})
	require.NoError(t, err)
	require.Equal(t, port, in.Port())
	require.Equal(t, dataDir, in.DataDir())
	require.NoError(t, exec(in, "CREATE TABLE kept (id int)"))
	require.NoError(t, in.Teardown())
	_, err = os.Stat(filepath.Join(dataDir, "PG_VERSION"))
	require.NoError(t, err, "the cluster is kept")

	in, err = Open(bin, Options{DataDir: dataDir, Port: port})
	require.NoError(t, err)
	require.NoError(t, exec(in, "INSERT INTO kept VALUES (1)"), "the table of the first run is there")
	require.NoError(t, in.Teardown())
	conf, err := os.ReadFile(filepath.Join(dataDir, "postgresql.conf"))
	require.NoError(t, err)
	require.Equal(t, 1, strings.Count(string(conf), "include '"+settingsFile+"'"), "included once")

	other := filepath.Join(base, "other")
	require.NoError(t, os.MkdirAll(other, 0o755))
	require.NoError(t, os.WriteFile(filepath.Join(other, "notes.txt"), nil, 0o644))
	_, err = Open(bin, Options{DataDir: other})
	require.ErrorContains(t, err, "is not empty and holds no PostgreSQL cluster")
	_, err = os.Stat(filepath.Join(other, "notes.txt"))
	require.NoError(t, err, "left as it was")
}
