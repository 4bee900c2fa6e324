// Package pgserver runs a PostgreSQL cluster from the local server binaries:
// initdb into a temporary directory, or into a kept one that later runs reuse
// (as user postgres when running as root), a postmaster on a loopback port
// with wal_level=logical, stop and restart through pg_ctl, a physical standby
// of a running cluster (Options.StandbyOf), a crash (Kill). The tests
// (internal/pgtest), the benchmark and `outboxd dev` use it. [FindBinDir]
// finds the default binaries, [BinDirFor] those of one major (15 to 18 are
// tested), which scripts/install-postgres.sh installs where the system has no
// package for them.
//
// Invariants: the postmaster is a child of the calling process and is shut
// down by the kernel if that process dies; only clusters started here are ever
// stopped, always through their own data directory.
package pgserver

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"maps"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"
)

const (
	// Superuser is the bootstrap role of clusters made here.
	Superuser = "postgres"
	// dirPrefix names the temporary directories of clusters made here; stale
	// ones (their test process gone) are removed by later runs.
	dirPrefix = "outboxd-pg-"
	// readyTimeout bounds a start, crash recovery included.
	readyTimeout = 90 * time.Second
	// stopTimeout bounds pg_ctl stop and the postmaster's exit after it.
	stopTimeout = 60 * time.Second
	// startAttempts is how many free ports a first start tries: another
	// process may take the port between picking and binding it.
	startAttempts = 5
	// settingsFile is written before each start with the cluster's
	// settings, port included, and included from postgresql.conf.
	settingsFile = "outboxd.conf"
)

// defaultSettings are written to postgresql.conf of every cluster; New's
// settings override them. Durability is off (fsync, full_page_writes) because
// the data directory is thrown away, but synchronous_commit stays on so that a
// commit has its WAL written before the client hears of it, as in production.
// Each is valid, with the same meaning, on every major from 15 to 18: an
// unknown one stops the server from starting, so none may be major-specific.
var defaultSettings = map[string]string{
	"listen_addresses":          "127.0.0.1",
	"wal_level":                 "logical",
	"max_wal_senders":           "40",
	"max_replication_slots":     "40",
	"max_connections":           "200",
	"max_prepared_transactions": "20",
	"fsync":                     "off",
	"synchronous_commit":        "on",
	"full_page_writes":          "off",
	"shared_buffers":            "64MB",
	"logging_collector":         "off",
	"log_destination":           "stderr",
}

const hbaConf = `# Written by outboxd: trust on loopback and the socket directory only.
local all         all              trust
local replication all              trust
host  all         all 127.0.0.1/32 trust
host  replication all 127.0.0.1/32 trust
`

// Instance is a cluster made by initdb, in a temporary directory or a kept
// one (Options.DataDir), run as a child process of the calling process.
type Instance struct {
	binDir   string
	major    int    // of the binaries, from postgres --version
	baseDir  string // temporary directory: owner file and data directory; "" when kept
	kept     bool   // the data directory is the caller's, never removed
	dataDir  string
	logPath  string
	port     int
	settings map[string]string
	cred     *syscall.Credential // nil unless running as root
	// serverEnv is added to the postmaster's environment (StartEnv).
	serverEnv []string

	mu   sync.Mutex
	proc *postmaster // nil while stopped
}

// postmaster is one run of the server process.
type postmaster struct {
	pid  int
	done chan struct{} // closed when the process has exited and was reaped
	err  error         // exit status, valid after done
	log  *os.File
}

// FindBinDir locates the server binaries: the directory of pg_ctl on PATH,
// else pg_config --bindir, else the newest /usr/lib/postgresql/*/bin.
func FindBinDir() (string, error) {
	var candidates []string
	if p, err := exec.LookPath("pg_ctl"); err == nil {
		if r, err := filepath.EvalSymlinks(p); err == nil {
			p = r
		}
		candidates = append(candidates, filepath.Dir(p))
	}
	if out, err := exec.Command("pg_config", "--bindir").Output(); err == nil {
		candidates = append(candidates, strings.TrimSpace(string(out)))
	}
	dirs, _ := filepath.Glob("/usr/lib/postgresql/*/bin")
	slices.SortFunc(dirs, func(a, b string) int { return majorOf(b) - majorOf(a) })
	candidates = append(candidates, dirs...)
	for _, dir := range candidates {
		if isServerBinDir(dir) {
			return dir, nil
		}
	}
	return "", errors.New("no PostgreSQL server binaries found (pg_ctl on PATH, pg_config --bindir, /usr/lib/postgresql/*/bin)")
}

func majorOf(binDir string) int {
	n, _ := strconv.Atoi(filepath.Base(filepath.Dir(binDir)))
	return n
}

func isServerBinDir(dir string) bool {
	for _, name := range []string{"pg_ctl", "initdb", "postgres"} {
		if fi, err := os.Stat(filepath.Join(dir, name)); err != nil || fi.IsDir() {
			return false
		}
	}
	return true
}

// Options say where a cluster lives and how it runs. The zero value is a
// throwaway cluster: a temporary directory, removed by Teardown, on a free
// port, without durability.
type Options struct {
	// Settings override the defaults written to postgresql.conf.
	Settings map[string]string
	// Env ("NAME=value") is added to the postmaster's environment, e.g. a
	// preloaded library that shifts the server's clock.
	Env []string
	// DataDir, when set, is a data directory kept across runs: initdb makes
	// a cluster in it when it is missing or empty, a cluster already in it is
	// reused, and Teardown leaves it. Its cluster is durable (fsync and
	// full_page_writes on): it outlives the process.
	DataDir string
	// Port, when set, is the port to listen on; a port in use then fails the
	// start instead of another being tried.
	Port int
	// StandbyOf, when set, makes the cluster a physical standby of that
	// running cluster instead of a new one: a base backup of it (the
	// low-level API and a file copy), standby.signal, and primary_conninfo
	// naming it (user postgres, dbname postgres, which PostgreSQL 17's slot
	// synchronization needs). Settings add the rest (primary_slot_name,
	// hot_standby_feedback, …) and may override primary_conninfo. Not with
	// DataDir.
	StandbyOf *Instance
}

// Start makes a new cluster and starts it on a free port.
func Start(binDir string, settings map[string]string) (*Instance, error) {
	return Open(binDir, Options{Settings: settings})
}

// StartEnv is Start with env ("NAME=value") added to the postmaster's
// environment, e.g. a preloaded library that shifts the server's clock.
func StartEnv(binDir string, settings map[string]string, env []string) (*Instance, error) {
	return Open(binDir, Options{Settings: settings, Env: env})
}

// Open makes or reuses a cluster as opt says and starts it.
func Open(binDir string, opt Options) (_ *Instance, err error) {
	sweepOnce.Do(SweepStale)
	in := &Instance{binDir: binDir, settings: maps.Clone(defaultSettings), serverEnv: slices.Clone(opt.Env),
		kept: opt.DataDir != "", port: opt.Port}
	if in.kept {
		// The data outlives the process: keep what the defaults turn off.
		in.settings["fsync"] = "on"
		in.settings["full_page_writes"] = "on"
	}
	if opt.StandbyOf != nil {
		if in.kept {
			return nil, errors.New("start server: a standby is made in a temporary directory, not in DataDir")
		}
		in.settings["primary_conninfo"] = fmt.Sprintf("host=127.0.0.1 port=%d user=%s dbname=postgres", opt.StandbyOf.Port(), Superuser)
	}
	maps.Copy(in.settings, opt.Settings)
	// Also proves the binaries and their libraries load before initdb runs
	// as another user with less telling errors.
	if in.major, err = ServerMajor(binDir); err != nil {
		return nil, fmt.Errorf("start server: %w", err)
	}
	if in.cred, err = credential(); err != nil {
		return nil, err
	}
	if in.cred != nil {
		if dir := unreachable(binDir); dir != "" {
			return nil, fmt.Errorf("server binaries in %s: user %s cannot enter %s", binDir, Superuser, dir)
		}
	}
	defer func() {
		if err != nil {
			_ = in.Teardown() // keep the start error: it has the log
		}
	}()
	if in.kept {
		if in.dataDir, err = filepath.Abs(opt.DataDir); err != nil {
			return nil, fmt.Errorf("data directory %s: %w", opt.DataDir, err)
		}
	} else {
		if in.baseDir, err = in.makeBaseDir(); err != nil {
			return nil, err
		}
		in.dataDir = filepath.Join(in.baseDir, "data")
	}
	in.logPath = filepath.Join(in.dataDir, "postgres.log")
	if opt.StandbyOf != nil {
		err = in.baseBackup(opt.StandbyOf)
	} else {
		err = in.prepare()
	}
	if err != nil {
		return nil, err
	}

	for attempt := 1; ; attempt++ {
		if opt.Port == 0 {
			if in.port, err = freePort(); err != nil {
				return nil, err
			}
		}
		err = in.Start()
		if err == nil {
			return in, nil
		}
		if opt.Port != 0 || attempt == startAttempts || !errors.Is(err, errPortInUse) {
			return nil, err
		}
	}
}

// prepare makes the cluster with initdb, unless a kept data directory already
// holds one, and has postgresql.conf include the settings file written before
// each start.
func (in *Instance) prepare() error {
	if in.kept {
		if _, err := os.Stat(filepath.Join(in.dataDir, "PG_VERSION")); err == nil {
			// A cluster from an earlier run.
			if err := in.chown(in.dataDir); err != nil {
				return err
			}
			return in.includeSettings()
		}
		if entries, err := os.ReadDir(in.dataDir); err == nil && len(entries) > 0 {
			return fmt.Errorf("data directory %s is not empty and holds no PostgreSQL cluster (no PG_VERSION)", in.dataDir)
		}
		if err := os.MkdirAll(in.dataDir, 0o700); err != nil {
			return fmt.Errorf("create data directory: %w", err)
		}
		if err := in.chown(in.dataDir); err != nil {
			return err
		}
		if in.cred != nil {
			if dir := unreachable(filepath.Dir(in.dataDir)); dir != "" {
				return fmt.Errorf("data directory %s: user %s (who runs postgres when outboxd runs as root) cannot enter %s; pick a directory under /tmp or allow it (chmod o+x %s)",
					in.dataDir, Superuser, dir, dir)
			}
		}
	}
	if err := in.initdb(); err != nil {
		return err
	}
	if err := in.writeFile(filepath.Join(in.dataDir, "pg_hba.conf"), hbaConf); err != nil {
		return err
	}
	return in.includeSettings()
}

// includeSettings adds the include of settingsFile to postgresql.conf unless
// it is there already (a kept cluster).
func (in *Instance) includeSettings() error {
	path := filepath.Join(in.dataDir, "postgresql.conf")
	include := "include '" + settingsFile + "'\n"
	conf, err := os.ReadFile(path)
	if err != nil {
		return fmt.Errorf("read postgresql.conf: %w", err)
	}
	if bytes.Contains(conf, []byte("\n"+include)) {
		return nil
	}
	f, err := os.OpenFile(path, os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		return fmt.Errorf("open postgresql.conf: %w", err)
	}
	_, err = f.WriteString("\n# Added by outboxd.\n" + include)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("write postgresql.conf: %w", err)
	}
	return nil
}

// makeBaseDir creates the temporary directory with os.MkdirTemp (not
// t.TempDir: the postgres user must own it) somewhere that user can reach.
func (in *Instance) makeBaseDir() (string, error) {
	root := os.TempDir()
	if in.cred != nil && unreachable(root) != "" {
		root = "/tmp"
	}
	dir, err := os.MkdirTemp(root, dirPrefix)
	if err != nil {
		return "", fmt.Errorf("create temporary directory: %w", err)
	}
	owner := strconv.Itoa(os.Getpid()) + "\n"
	if err := os.WriteFile(filepath.Join(dir, "owner.pid"), []byte(owner), 0o644); err != nil {
		return dir, fmt.Errorf("write owner file: %w", err)
	}
	if in.cred != nil {
		if err := os.Chown(dir, int(in.cred.Uid), int(in.cred.Gid)); err != nil {
			return dir, fmt.Errorf("hand %s to user %s: %w", dir, Superuser, err)
		}
		if d := unreachable(dir); d != "" {
			return dir, fmt.Errorf("temporary directory %s: user %s cannot enter %s", dir, Superuser, d)
		}
	}
	return dir, nil
}

func (in *Instance) initdb() error {
	// C.UTF-8 where the C library has it, plain C otherwise: both are
	// deterministic, and the encoding is UTF8 either way.
	//
	// The flags mean the same from 15 to 18. Data checksums stay at each
	// major's default (on from 18) so that a cluster is like a fresh one of
	// that major in production.
	//
	// A kept data directory exists already (made and handed to the server's
	// user by prepare); initdb empties it again when it fails.
	var out []byte
	var err error
	for _, locale := range []string{"C.UTF-8", "C"} {
		args := []string{"-D", in.dataDir, "-A", "trust", "-U", Superuser, "-E", "UTF8", "--locale=" + locale}
		if !in.kept {
			_ = os.RemoveAll(in.dataDir)
			args = append(args, "--no-sync")
		}
		if out, err = in.command("initdb", args...).CombinedOutput(); err == nil {
			return nil
		}
	}
	return fmt.Errorf("initdb: %w\n%s", err, out)
}

// command prepares a server binary to run as the cluster's owner.
func (in *Instance) command(name string, args ...string) *exec.Cmd {
	cmd := exec.Command(filepath.Join(in.binDir, name), args...)
	cmd.Dir = filepath.Dir(in.dataDir) // the server's user can enter it
	cmd.Env = childEnv()
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: in.cred}
	return cmd
}

// writeFile writes a file the server reads, owned by the server's user.
func (in *Instance) writeFile(path, content string) error {
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		return fmt.Errorf("write %s: %w", filepath.Base(path), err)
	}
	return in.chown(path)
}

// chown hands path to the server's user when running as root.
func (in *Instance) chown(path string) error {
	if in.cred == nil {
		return nil
	}
	if err := os.Chown(path, int(in.cred.Uid), int(in.cred.Gid)); err != nil {
		return fmt.Errorf("hand %s to user %s: %w", path, Superuser, err)
	}
	return nil
}

func (in *Instance) writeSettings() error {
	var b strings.Builder
	b.WriteString("# Written by outboxd before each start.\n")
	conf := maps.Clone(in.settings)
	conf["port"] = strconv.Itoa(in.port)
	conf["unix_socket_directories"] = in.dataDir
	for _, k := range slices.Sorted(maps.Keys(conf)) {
		fmt.Fprintf(&b, "%s = '%s'\n", k, strings.ReplaceAll(conf[k], "'", "''"))
	}
	return in.writeFile(filepath.Join(in.dataDir, settingsFile), b.String())
}

var errPortInUse = errors.New("port in use")

// Start launches the postmaster and waits until it accepts connections. On a
// failed start the postmaster is stopped and the error carries the log tail.
func (in *Instance) Start() error {
	in.mu.Lock()
	defer in.mu.Unlock()
	if in.proc != nil {
		select {
		case <-in.proc.done:
			in.proc.log.Close()
			in.proc = nil
		default:
			return nil // running
		}
	}
	if err := in.writeSettings(); err != nil {
		return err
	}
	logOffset := fileSize(in.logPath)
	p, err := in.launch()
	if err != nil {
		return err
	}
	in.proc = p
	if err := in.waitReady(p); err != nil {
		_ = in.stopLocked("immediate")
		tail := in.LogTail(logOffset)
		if strings.Contains(tail, "could not bind") || strings.Contains(tail, "Address already in use") {
			err = fmt.Errorf("%w: %w", errPortInUse, err)
		}
		return fmt.Errorf("start postgres on port %d: %w\n--- postgres log (%s) ---\n%s", in.port, err, in.logPath, tail)
	}
	return nil
}

// launch starts postgres as a child of the test process. Running the
// postmaster directly rather than through pg_ctl start lets the kernel send
// it SIGQUIT (immediate shutdown) if the test process dies: Pdeathsig. The
// signal fires when the thread that forked the child exits, so the child is
// started and reaped on a goroutine locked to its own thread.
func (in *Instance) launch() (*postmaster, error) {
	logFile, err := os.OpenFile(in.logPath, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	if err != nil {
		return nil, fmt.Errorf("open server log: %w", err)
	}
	_ = in.chown(in.logPath)
	cmd := in.command("postgres", "-D", in.dataDir)
	cmd.Env = append(cmd.Env, in.serverEnv...)
	cmd.Stdout, cmd.Stderr = logFile, logFile
	cmd.SysProcAttr.Setpgid = true // ^C on the test run is for the test binary
	cmd.SysProcAttr.Pdeathsig = syscall.SIGQUIT
	p := &postmaster{done: make(chan struct{}), log: logFile}
	started := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread ends with the goroutine
		if err := cmd.Start(); err != nil {
			started <- err
			return
		}
		p.pid = cmd.Process.Pid
		started <- nil
		p.err = cmd.Wait()
		close(p.done)
	}()
	if err := <-started; err != nil {
		logFile.Close()
		return nil, fmt.Errorf("run postgres: %w", err)
	}
	return p, nil
}

// waitReady polls with connections until one succeeds, the postmaster exits
// or the deadline passes.
func (in *Instance) waitReady(p *postmaster) error {
	ctx, cancel := context.WithTimeout(context.Background(), readyTimeout)
	defer cancel()
	// An attempt in flight is abandoned as soon as the postmaster exits: the
	// port may then belong to someone else, who need not answer.
	go func() {
		select {
		case <-p.done:
			cancel()
		case <-ctx.Done():
		}
	}()
	url := fmt.Sprintf("postgres://%s@127.0.0.1:%d/postgres?sslmode=disable&connect_timeout=5", Superuser, in.port)
	tick := time.NewTicker(25 * time.Millisecond)
	defer tick.Stop()
	var last error
	for {
		conn, err := pgx.Connect(ctx, url)
		if err == nil {
			return conn.Close(ctx)
		}
		last = err
		select {
		case <-p.done:
			return fmt.Errorf("postgres exited during start: %v", p.err)
		default:
		}
		select {
		case <-p.done:
			return fmt.Errorf("postgres exited during start: %v", p.err)
		case <-ctx.Done():
			return fmt.Errorf("not accepting connections after %s: %w", readyTimeout, last)
		case <-tick.C:
		}
	}
}

// Stop runs pg_ctl stop -m mode on this cluster's data directory and waits
// for the postmaster to exit. Stopping a stopped server is a no-op.
func (in *Instance) Stop(mode string) error {
	switch mode {
	case "smart", "fast", "immediate":
	default:
		return fmt.Errorf("unknown stop mode %q: want smart, fast or immediate", mode)
	}
	in.mu.Lock()
	defer in.mu.Unlock()
	return in.stopLocked(mode)
}

func (in *Instance) stopLocked(mode string) error {
	p := in.proc
	if p == nil {
		return nil
	}
	var ctlErr error
	select {
	case <-p.done:
	default:
		out, err := in.command("pg_ctl", "stop", "-D", in.dataDir, "-m", mode, "-w",
			"-t", strconv.Itoa(int(stopTimeout/time.Second))).CombinedOutput()
		if err != nil {
			ctlErr = fmt.Errorf("pg_ctl stop -m %s: %w: %s", mode, err, bytes.TrimSpace(out))
		}
	}
	defer func() {
		p.log.Close()
		in.proc = nil
	}()
	select {
	case <-p.done:
		// Gone, which is all that matters: pg_ctl also fails when the
		// postmaster was already exiting on its own.
		return nil
	case <-time.After(stopTimeout):
	}
	// pg_ctl gave up (smart mode with open sessions, a wedged server): this
	// process is ours, end it rather than leak it.
	_ = syscall.Kill(p.pid, syscall.SIGKILL)
	<-p.done
	return fmt.Errorf("postgres did not exit within %s of pg_ctl stop -m %s, killed it (pg_ctl: %v)", stopTimeout, mode, ctlErr)
}

// Teardown stops the server (fast) and removes its files, unless its data
// directory is kept (Options.DataDir).
func (in *Instance) Teardown() error {
	err := in.Stop("fast")
	if err != nil {
		// The fast stop failed: an immediate one still ends our server.
		err = errors.Join(err, in.Stop("immediate"))
	}
	if in.baseDir == "" {
		return err
	}
	if rmErr := os.RemoveAll(in.baseDir); rmErr != nil {
		err = errors.Join(err, fmt.Errorf("remove %s: %w", in.baseDir, rmErr))
	}
	return err
}

// Running reports whether the postmaster is up.
func (in *Instance) Running() bool {
	in.mu.Lock()
	defer in.mu.Unlock()
	if in.proc == nil {
		return false
	}
	select {
	case <-in.proc.done:
		return false
	default:
		return true
	}
}

// LogTail returns the log written since offset, at most its last 8 KiB.
func (in *Instance) LogTail(offset int64) string {
	const max = 8 << 10
	data, err := os.ReadFile(in.logPath)
	if err != nil {
		return fmt.Sprintf("(no log: %v)", err)
	}
	if offset > 0 && offset <= int64(len(data)) {
		data = data[offset:]
	}
	if len(data) > max {
		data = data[len(data)-max:]
		if i := bytes.IndexByte(data, '\n'); i >= 0 {
			data = data[i+1:]
		}
	}
	return string(data)
}

func fileSize(path string) int64 {
	fi, err := os.Stat(path)
	if err != nil {
		return 0
	}
	return fi.Size()
}

// freePort asks the kernel for a free loopback port. Another process may take
// it before postgres binds it: the caller retries.
func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("pick a free port: %w", err)
	}
	port := l.Addr().(*net.TCPAddr).Port
	return port, l.Close()
}

// credential returns the postgres user's credential when running as root
// (initdb and postgres refuse to run as root), nil otherwise.
func credential() (*syscall.Credential, error) {
	if os.Geteuid() != 0 {
		return nil, nil
	}
	u, err := user.Lookup(Superuser)
	if err != nil {
		return nil, fmt.Errorf("running as root, look up user %s to run postgres as: %w", Superuser, err)
	}
	uid, err := strconv.ParseUint(u.Uid, 10, 32)
	if err != nil {
		return nil, fmt.Errorf("parse uid of user %s: %w", Superuser, err)
	}
	gid, err := strconv.ParseUint(u.Gid, 10, 32)
	if err != nil {
		return nil, fmt.Errorf("parse gid of user %s: %w", Superuser, err)
	}
	return &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}, nil
}

// unreachable returns the first directory on the way to path that other
// users cannot enter (no o+x), or "" when all can be entered. Used only as
// root, when the server runs as postgres and must reach binaries and data.
func unreachable(path string) string {
	path, err := filepath.Abs(path)
	if err != nil {
		return path
	}
	for dir := path; ; dir = filepath.Dir(dir) {
		fi, err := os.Stat(dir)
		if err != nil {
			return dir
		}
		if fi.Mode().Perm()&0o001 == 0 && !ownedBy(fi, Superuser) {
			return dir
		}
		if dir == filepath.Dir(dir) {
			return ""
		}
	}
}

func ownedBy(fi os.FileInfo, name string) bool {
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return false
	}
	u, err := user.LookupId(strconv.FormatUint(uint64(st.Uid), 10))
	return err == nil && u.Username == name
}

// childEnv is the environment for server binaries, without PG* variables that
// would point them at another cluster.
func childEnv() []string {
	env := []string{"LC_ALL=C"}
	for _, kv := range os.Environ() {
		if strings.HasPrefix(kv, "PG") || strings.HasPrefix(kv, "LC_ALL=") {
			continue
		}
		env = append(env, kv)
	}
	return env
}

var sweepOnce sync.Once

// SweepStale removes temporary directories left by test processes that died
// before their cleanup ran (their postmaster got SIGQUIT from Pdeathsig). A
// directory is removed only when its owner process is gone and no postmaster
// runs in it; nothing is ever stopped here.
func SweepStale() {
	roots := []string{os.TempDir()}
	if roots[0] != "/tmp" {
		roots = append(roots, "/tmp")
	}
	for _, root := range roots {
		dirs, _ := filepath.Glob(filepath.Join(root, dirPrefix+"*"))
		for _, dir := range dirs {
			owner := filepath.Join(dir, "owner.pid")
			if _, err := os.Stat(owner); err != nil {
				continue // being created, or not ours to judge
			}
			if !alive(owner) && !alive(filepath.Join(dir, "data", "postmaster.pid")) {
				_ = os.RemoveAll(dir)
			}
		}
	}
}

// alive reports whether the pid on the first line of pidFile is a live
// process. A missing or unreadable file is not alive.
func alive(pidFile string) bool {
	data, err := os.ReadFile(pidFile)
	if err != nil {
		return false
	}
	line, _, _ := strings.Cut(string(data), "\n")
	pid, err := strconv.Atoi(strings.TrimSpace(line))
	if err != nil || pid <= 0 {
		return false
	}
	err = syscall.Kill(pid, 0)
	return err == nil || errors.Is(err, syscall.EPERM)
}

// Port is the TCP port the cluster listens on (127.0.0.1).
func (in *Instance) Port() int { return in.port }

// BinDir is the directory of the server binaries.
func (in *Instance) BinDir() string { return in.binDir }

// Major is the PostgreSQL major of the server binaries, e.g. 17.
func (in *Instance) Major() int { return in.major }

// PID is the process id of the running postmaster, 0 while it is stopped.
func (in *Instance) PID() int {
	in.mu.Lock()
	defer in.mu.Unlock()
	if in.proc == nil {
		return 0
	}
	return in.proc.pid
}

// Kill sends SIGKILL to the postmaster (a crash of the server's host, as far
// as clients can tell) and waits until it has exited. Its backends notice
// the postmaster's death and exit by themselves. Start runs crash recovery.
func (in *Instance) Kill() error {
	in.mu.Lock()
	defer in.mu.Unlock()
	p := in.proc
	if p == nil {
		return nil
	}
	if err := syscall.Kill(p.pid, syscall.SIGKILL); err != nil && !errors.Is(err, syscall.ESRCH) {
		return fmt.Errorf("kill postmaster %d: %w", p.pid, err)
	}
	<-p.done
	p.log.Close()
	in.proc = nil
	return nil
}

// DataDir is the cluster's data directory.
func (in *Instance) DataDir() string { return in.dataDir }
