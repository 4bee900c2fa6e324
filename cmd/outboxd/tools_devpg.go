package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/outboxd/outboxd/internal/pgserver"
)

// devPostgres is the Postgres server `outboxd dev` runs for itself: a child
// process on a loopback port, with wal_level=logical and trust
// authentication on loopback only.
type devPostgres interface {
	// Port is the TCP port on 127.0.0.1.
	Port() int
	// DataDir is the data directory (postmaster.pid is in it).
	DataDir() string
	// Running reports whether the postmaster is up.
	Running() bool
	// Close stops the server and removes its files unless they were asked
	// to be kept (--data-dir).
	Close() error
}

// startDevPostgres starts the server of `outboxd dev`. Without a data
// directory or port, it is a throwaway cluster made by internal/pgserver in
// a temporary directory. With --data-dir (kept, reused on the next run) or a
// fixed --port, which pgserver does not offer, the cluster is run by
// dirPostgres below.
func startDevPostgres(binDir, dataDir string, port int) (devPostgres, error) {
	if dataDir == "" && port == 0 {
		in, err := pgserver.Start(binDir, nil)
		if err != nil {
			return nil, err
		}
		return tempPostgres{in}, nil
	}
	return startDirPostgres(binDir, dataDir, port)
}

// tempPostgres is a pgserver cluster, removed on Close.
type tempPostgres struct{ *pgserver.Instance }

func (p tempPostgres) Close() error { return p.Teardown() }

// dirPostgres runs postgres on a data directory of the user's choice, made by
// initdb on first use and reused afterwards, or on a temporary one when only
// the port is fixed. Like pgserver it runs the server as user postgres when
// running as root, as a child that the kernel stops (SIGQUIT, Pdeathsig) if
// outboxd dies, in its own process group (^C is for outboxd, which then
// stops the server in order).
type dirPostgres struct {
	binDir  string
	dataDir string
	port    int
	keep    bool // a --data-dir: never removed
	tmpDir  string
	cred    *syscall.Credential
	pid     int
	done    chan struct{} // closed when the postmaster has exited
	log     *os.File
}

// devConf is the settings file dirPostgres writes before every start and
// includes from postgresql.conf.
const devConf = "outboxd-dev.conf"

func startDirPostgres(binDir, dataDir string, port int) (_ *dirPostgres, err error) {
	p := &dirPostgres{binDir: binDir, keep: dataDir != "", port: port}
	if p.cred, err = devPostgresCredential(); err != nil {
		return nil, err
	}
	if dataDir == "" {
		if p.tmpDir, err = os.MkdirTemp("", "outboxd-dev-"); err != nil {
			return nil, fmt.Errorf("create temporary directory: %w", err)
		}
		if err := os.Chmod(p.tmpDir, 0o755); err != nil {
			return nil, fmt.Errorf("open temporary directory to user %s: %w", pgserver.Superuser, err)
		}
		dataDir = filepath.Join(p.tmpDir, "data")
	}
	defer func() {
		if err != nil && p.tmpDir != "" {
			_ = os.RemoveAll(p.tmpDir)
		}
	}()
	if p.dataDir, err = filepath.Abs(dataDir); err != nil {
		return nil, fmt.Errorf("data directory %s: %w", dataDir, err)
	}
	if err := p.prepare(); err != nil {
		return nil, err
	}
	if p.port == 0 {
		if p.port, err = devFreePort(); err != nil {
			return nil, err
		}
	}
	if err := p.writeConf(); err != nil {
		return nil, err
	}
	if err := p.launch(); err != nil {
		return nil, err
	}
	if err := p.waitReady(); err != nil {
		_ = p.stop()
		return nil, err
	}
	return p, nil
}

// prepare creates the data directory and runs initdb unless it already
// holds a cluster.
func (p *dirPostgres) prepare() error {
	if _, err := os.Stat(filepath.Join(p.dataDir, "PG_VERSION")); err == nil {
		return p.chown(p.dataDir) // a cluster from an earlier run
	}
	if entries, err := os.ReadDir(p.dataDir); err == nil && len(entries) > 0 {
		return fmt.Errorf("data directory %s is not empty and holds no PostgreSQL cluster (no PG_VERSION)", p.dataDir)
	}
	if err := os.MkdirAll(p.dataDir, 0o700); err != nil {
		return fmt.Errorf("create data directory: %w", err)
	}
	if err := p.chown(p.dataDir); err != nil {
		return err
	}
	if p.cred != nil {
		if dir := devNotEnterable(filepath.Dir(p.dataDir)); dir != "" {
			return fmt.Errorf("data directory %s: user %s (who runs postgres when outboxd runs as root) cannot enter %s; pick a directory under /tmp or allow it (chmod o+x %s)",
				p.dataDir, pgserver.Superuser, dir, dir)
		}
	}
	var out []byte
	var err error
	for _, locale := range []string{"C.UTF-8", "C"} {
		args := []string{"-D", p.dataDir, "-A", "trust", "-U", pgserver.Superuser, "-E", "UTF8", "--locale=" + locale}
		if !p.keep {
			args = append(args, "--no-sync")
		}
		if out, err = p.command("initdb", args...).CombinedOutput(); err == nil {
			break
		}
	}
	if err != nil {
		return fmt.Errorf("initdb: %w\n%s", err, out)
	}
	hba := "# Written by outboxd dev: trust on loopback and the socket directory only.\n" +
		"local all all trust\nlocal replication all trust\n" +
		"host all all 127.0.0.1/32 trust\nhost replication all 127.0.0.1/32 trust\n"
	if err := p.writeFile("pg_hba.conf", hba); err != nil {
		return err
	}
	f, err := os.OpenFile(filepath.Join(p.dataDir, "postgresql.conf"), os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		return fmt.Errorf("open postgresql.conf: %w", err)
	}
	_, err = f.WriteString("\n# Added by outboxd dev.\ninclude_if_exists '" + devConf + "'\n")
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("write postgresql.conf: %w", err)
	}
	return nil
}

func (p *dirPostgres) writeConf() error {
	settings := [][2]string{
		{"listen_addresses", "127.0.0.1"},
		{"port", strconv.Itoa(p.port)},
		{"unix_socket_directories", p.dataDir},
		{"wal_level", "logical"},
		{"max_wal_senders", "10"},
		{"max_replication_slots", "10"},
		{"logging_collector", "off"},
		{"log_destination", "stderr"},
	}
	if !p.keep {
		settings = append(settings, [2]string{"fsync", "off"}, [2]string{"full_page_writes", "off"})
	}
	var b strings.Builder
	b.WriteString("# Written by outboxd dev before each start.\n")
	for _, kv := range settings {
		fmt.Fprintf(&b, "%s = '%s'\n", kv[0], strings.ReplaceAll(kv[1], "'", "''"))
	}
	return p.writeFile(devConf, b.String())
}

func (p *dirPostgres) writeFile(name, content string) error {
	path := filepath.Join(p.dataDir, name)
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		return fmt.Errorf("write %s: %w", name, err)
	}
	return p.chown(path)
}

func (p *dirPostgres) chown(path string) error {
	if p.cred == nil {
		return nil
	}
	if err := os.Chown(path, int(p.cred.Uid), int(p.cred.Gid)); err != nil {
		return fmt.Errorf("hand %s to user %s: %w", path, pgserver.Superuser, err)
	}
	return nil
}

func (p *dirPostgres) command(name string, args ...string) *exec.Cmd {
	cmd := exec.Command(filepath.Join(p.binDir, name), args...)
	cmd.Dir = p.dataDir
	env := []string{"LC_ALL=C"}
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "PG") && !strings.HasPrefix(kv, "LC_ALL=") {
			env = append(env, kv)
		}
	}
	cmd.Env = env
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: p.cred}
	return cmd
}

// launch starts the postmaster on a goroutine locked to its thread: the
// Pdeathsig fires when the forking thread ends, which must be when outboxd
// ends, not when the Go scheduler retires a thread.
func (p *dirPostgres) launch() error {
	logPath := filepath.Join(p.dataDir, "outboxd-dev.log")
	logFile, err := os.OpenFile(logPath, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	if err != nil {
		return fmt.Errorf("open server log: %w", err)
	}
	if err := p.chown(logPath); err != nil {
		logFile.Close()
		return err
	}
	p.log = logFile
	cmd := p.command("postgres", "-D", p.dataDir)
	cmd.Stdout, cmd.Stderr = logFile, logFile
	cmd.SysProcAttr.Setpgid = true
	cmd.SysProcAttr.Pdeathsig = syscall.SIGQUIT
	p.done = make(chan struct{})
	started := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread ends with the goroutine
		if err := cmd.Start(); err != nil {
			started <- err
			close(p.done)
			return
		}
		p.pid = cmd.Process.Pid
		started <- nil
		_ = cmd.Wait()
		close(p.done)
	}()
	if err := <-started; err != nil {
		logFile.Close()
		return fmt.Errorf("run postgres: %w", err)
	}
	return nil
}

func (p *dirPostgres) waitReady() error {
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	url := p.url()
	tick := time.NewTicker(25 * time.Millisecond)
	defer tick.Stop()
	for {
		conn, err := pgx.Connect(ctx, url)
		if err == nil {
			return conn.Close(ctx)
		}
		select {
		case <-p.done:
			return fmt.Errorf("postgres exited during start:\n%s", p.logTail())
		case <-ctx.Done():
			return fmt.Errorf("postgres not accepting connections after 90s: %w\n%s", err, p.logTail())
		case <-tick.C:
		}
	}
}

func (p *dirPostgres) url() string {
	return fmt.Sprintf("postgres://%s@127.0.0.1:%d/postgres?sslmode=disable&connect_timeout=5", pgserver.Superuser, p.port)
}

func (p *dirPostgres) logTail() string {
	data, _ := os.ReadFile(filepath.Join(p.dataDir, "outboxd-dev.log"))
	if len(data) > 4096 {
		data = data[len(data)-4096:]
	}
	return string(bytes.TrimSpace(data))
}

// stop ends the postmaster with a fast shutdown and waits for it; a server
// that does not stop within a minute is killed (it is ours).
func (p *dirPostgres) stop() error {
	defer p.log.Close()
	select {
	case <-p.done:
		return nil
	default:
	}
	out, ctlErr := p.command("pg_ctl", "stop", "-D", p.dataDir, "-m", "fast", "-w", "-t", "60").CombinedOutput()
	select {
	case <-p.done:
		return nil
	case <-time.After(60 * time.Second):
	}
	_ = syscall.Kill(p.pid, syscall.SIGKILL)
	<-p.done
	return fmt.Errorf("postgres did not stop within 60s, killed it (pg_ctl: %v: %s)", ctlErr, bytes.TrimSpace(out))
}

// Port implements devPostgres.
func (p *dirPostgres) Port() int { return p.port }

// DataDir implements devPostgres.
func (p *dirPostgres) DataDir() string { return p.dataDir }

// Running implements devPostgres.
func (p *dirPostgres) Running() bool {
	select {
	case <-p.done:
		return false
	default:
		return true
	}
}

// Close implements devPostgres.
func (p *dirPostgres) Close() error {
	err := p.stop()
	if p.tmpDir != "" {
		if rmErr := os.RemoveAll(p.tmpDir); rmErr != nil {
			err = errors.Join(err, fmt.Errorf("remove %s: %w", p.tmpDir, rmErr))
		}
	}
	return err
}

// devPostgresCredential is user postgres's when running as root (initdb and
// postgres refuse to run as root), nil otherwise.
func devPostgresCredential() (*syscall.Credential, error) {
	if os.Geteuid() != 0 {
		return nil, nil
	}
	u, err := user.Lookup(pgserver.Superuser)
	if err != nil {
		return nil, fmt.Errorf("running as root, look up user %s to run postgres as: %w", pgserver.Superuser, err)
	}
	uid, err := strconv.ParseUint(u.Uid, 10, 32)
	if err != nil {
		return nil, fmt.Errorf("parse uid of user %s: %w", pgserver.Superuser, err)
	}
	gid, err := strconv.ParseUint(u.Gid, 10, 32)
	if err != nil {
		return nil, fmt.Errorf("parse gid of user %s: %w", pgserver.Superuser, err)
	}
	return &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}, nil
}

// devNotEnterable returns the first directory on the way to dir that other
// users cannot enter (no o+x), or "".
func devNotEnterable(dir string) string {
	for d := dir; ; d = filepath.Dir(d) {
		fi, err := os.Stat(d)
		if err != nil {
			return d
		}
		if fi.Mode().Perm()&0o001 == 0 {
			return d
		}
		if d == filepath.Dir(d) {
			return ""
		}
	}
}

func devFreePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("pick a free port: %w", err)
	}
	port := l.Addr().(*net.TCPAddr).Port
	return port, l.Close()
}
