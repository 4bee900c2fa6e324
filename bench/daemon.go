package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
)

// buildOutboxd builds cmd/outboxd of the module the benchmark belongs to.
func buildOutboxd(ctx context.Context, dir string) (string, error) {
	return buildCommand(ctx, dir, "./cmd/outboxd")
}

// buildCommand builds the command in package pkg (a path relative to the
// module's root) into dir, and returns the binary's path.
func buildCommand(ctx context.Context, dir, pkg string) (string, error) {
	out, err := exec.CommandContext(ctx, "go", "list", "-m", "-f", "{{.Dir}}").Output()
	if err != nil {
		return "", fmt.Errorf("find the module directory (run the benchmark from the repository): %w", err)
	}
	root := strings.TrimSpace(string(out))
	bin := filepath.Join(dir, filepath.Base(pkg))
	cmd := exec.CommandContext(ctx, "go", "build", "-o", bin, pkg)
	cmd.Dir = root
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("go build %s: %w\n%s", pkg, err, out)
	}
	return bin, nil
}

// daemon is outboxd running as a child process.
type daemon struct {
	cmd     *exec.Cmd
	log     *tailBuffer
	logFile *os.File // -log-dir, closed when the process has exited
	done    chan struct{}
	err     error
}

// tailBuffer keeps the last bytes written to it.
type tailBuffer struct {
	mu  sync.Mutex
	buf []byte
	max int
}

func (t *tailBuffer) Write(p []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.buf = append(t.buf, p...)
	if len(t.buf) > 2*t.max {
		t.buf = append(t.buf[:0], t.buf[len(t.buf)-t.max:]...)
	}
	return len(p), nil
}

func (t *tailBuffer) String() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	b := t.buf
	if len(b) > t.max {
		b = b[len(b)-t.max:]
	}
	return string(b)
}

// daemonEnv is the environment of an outboxd run.
func daemonEnv(dbURL, slot, webhookURL string, batch, concurrency int, extra map[string]string) map[string]string {
	env := map[string]string{
		"OUTBOXD_DATABASE_URL":        dbURL,
		"OUTBOXD_SLOT":                slot,
		"OUTBOXD_WEBHOOK_URL":         webhookURL,
		"OUTBOXD_WEBHOOK_SECRET":      benchSecret,
		"OUTBOXD_ALLOW_PRIVATE_SINKS": "true",
		"OUTBOXD_WEBHOOK_BATCH_SIZE":  strconv.Itoa(batch),
		"OUTBOXD_WEBHOOK_CONCURRENCY": strconv.Itoa(concurrency),
		"OUTBOXD_HTTP_ADDR":           "127.0.0.1:0",
		"OUTBOXD_LOG_LEVEL":           "info",
	}
	for k, v := range extra {
		env[k] = v
	}
	return env
}

// benchSecret signs the deliveries (the receiver does not check signatures:
// signing is measured as part of outboxd's cost, verifying is not).
const benchSecret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"

func startDaemon(bin string, env map[string]string, logPath string) (*daemon, error) {
	return startProcess(bin, []string{"run"}, env, logPath)
}

// startProcess starts bin with args and only env (and PATH, HOME) as its
// environment, as a daemon: outboxd, or the floor consumer (bench/floor).
func startProcess(bin string, args []string, env map[string]string, logPath string) (*daemon, error) {
	cmd := exec.Command(bin, args...)
	cmd.Env = []string{"PATH=" + os.Getenv("PATH"), "HOME=" + os.Getenv("HOME")}
	for k, v := range env {
		cmd.Env = append(cmd.Env, k+"="+v)
	}
	d := &daemon{cmd: cmd, log: &tailBuffer{max: 64 << 10}, done: make(chan struct{})}
	cmd.Stdout, cmd.Stderr = d.log, d.log
	if logPath != "" {
		f, err := os.OpenFile(logPath, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
		if err != nil {
			return nil, err
		}
		d.logFile = f
		w := io.MultiWriter(d.log, f)
		cmd.Stdout, cmd.Stderr = w, w
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true}
	if err := cmd.Start(); err != nil {
		if d.logFile != nil {
			d.logFile.Close()
		}
		return nil, fmt.Errorf("start %s: %w", filepath.Base(bin), err)
	}
	go func() {
		d.err = cmd.Wait()
		if d.logFile != nil {
			d.logFile.Close()
		}
		close(d.done)
	}()
	return d, nil
}

func (d *daemon) pid() int { return d.cmd.Process.Pid }

func (d *daemon) exited() bool {
	select {
	case <-d.done:
		return true
	default:
		return false
	}
}

// stop sends SIGTERM and waits for a clean exit; after timeout it kills.
func (d *daemon) stop(timeout time.Duration) error {
	if d.exited() {
		return fmt.Errorf("outboxd exited early: %v\n%s", d.err, d.log)
	}
	_ = d.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-d.done:
		if d.err != nil {
			return fmt.Errorf("outboxd stopped with %v\n%s", d.err, d.log)
		}
		return nil
	case <-time.After(timeout):
		_ = d.cmd.Process.Kill()
		<-d.done
		return fmt.Errorf("outboxd did not stop within %s\n%s", timeout, d.log)
	}
}

// kill ends the process without waiting for an orderly stop.
func (d *daemon) kill() {
	if !d.exited() {
		_ = d.cmd.Process.Kill()
		<-d.done
	}
}

// procStats are a process's resource figures read from /proc.
type procStats struct {
	cpu   time.Duration // utime + stime
	sys   time.Duration // stime: the kernel's part (syscalls, and on a VM, thread switches)
	hwmKB int64         // VmHWM: peak resident set
	rssKB int64         // VmRSS
	// switches is the context switches of the process's threads alive now,
	// voluntary (a thread parked) and not.
	switches int64
}

// clockTick is USER_HZ, the unit of /proc/PID/stat times (100 on Linux).
const clockTick = 100

func readProc(pid int) (procStats, error) {
	var s procStats
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return s, err
	}
	// Fields after the command name, which is in parentheses and may hold spaces.
	i := bytes.LastIndexByte(stat, ')')
	if i < 0 {
		return s, errors.New("malformed /proc/PID/stat")
	}
	f := strings.Fields(string(stat[i+1:]))
	if len(f) < 13 {
		return s, errors.New("malformed /proc/PID/stat")
	}
	ut, _ := strconv.ParseInt(f[11], 10, 64) // field 14: utime
	st, _ := strconv.ParseInt(f[12], 10, 64) // field 15: stime
	s.cpu = time.Duration(ut+st) * time.Second / clockTick
	s.sys = time.Duration(st) * time.Second / clockTick
	tasks, _ := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	for _, task := range tasks {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/status", pid, task.Name()))
		if err != nil {
			continue
		}
		for _, line := range strings.Split(string(b), "\n") {
			if k, v, ok := strings.Cut(line, ":"); ok && strings.HasSuffix(k, "ctxt_switches") {
				n, _ := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
				s.switches += n
			}
		}
	}
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return s, err
	}
	for _, line := range strings.Split(string(status), "\n") {
		k, v, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		n, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
		switch k {
		case "VmHWM":
			s.hwmKB = n
		case "VmRSS":
			s.rssKB = n
		}
	}
	return s, nil
}

// resetPeakRSS resets VmHWM to the current RSS (Linux clear_refs 5), so that
// a steady-state peak excludes start-up.
func resetPeakRSS(pid int) {
	_ = os.WriteFile(fmt.Sprintf("/proc/%d/clear_refs", pid), []byte("5"), 0)
}

// checkpointWatch polls outboxd's checkpoint row.
type checkpointWatch struct {
	conn *pgx.Conn
	slot string
}

func newCheckpointWatch(ctx context.Context, dbURL, slot string) (*checkpointWatch, error) {
	c, err := pgx.Connect(ctx, dbURL)
	if err != nil {
		return nil, fmt.Errorf("connect checkpoint watch: %w", err)
	}
	return &checkpointWatch{conn: c, slot: slot}, nil
}

func (w *checkpointWatch) close() { _ = w.conn.Close(context.Background()) }

// read returns the checkpoint LSN and whether the catch-up is done; found is
// false while there is no checkpoint row.
func (w *checkpointWatch) read(ctx context.Context) (lsn pglogrepl.LSN, catchupDone, found bool, err error) {
	var pending bool
	err = w.conn.QueryRow(ctx, `SELECT lsn, catchup_pending FROM outboxd_checkpoint WHERE slot_name = $1`, w.slot).Scan(&lsn, &pending)
	if errors.Is(err, pgx.ErrNoRows) {
		return 0, false, false, nil
	}
	if err != nil {
		return 0, false, false, fmt.Errorf("read checkpoint: %w", err)
	}
	return lsn, !pending, true, nil
}

// waitFor polls cond every interval until it holds, the daemon exits, or the
// timeout passes.
func waitFor(ctx context.Context, d *daemon, timeout, interval time.Duration, what string, cond func() (bool, error)) error {
	deadline := time.Now().Add(timeout)
	for {
		ok, err := cond()
		if err != nil {
			return err
		}
		if ok {
			return nil
		}
		if d != nil && d.exited() {
			return fmt.Errorf("waiting for %s: outboxd exited: %v\n%s", what, d.err, d.log)
		}
		if time.Now().After(deadline) {
			msg := fmt.Sprintf("waiting for %s: timed out after %s", what, timeout)
			if d != nil {
				msg += "\n" + d.log.String()
			}
			return errors.New(msg)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(interval):
		}
	}
}

// waitReady waits until outboxd has a checkpoint with the catch-up done and
// its slot is active (streaming).
func waitReady(ctx context.Context, d *daemon, w *checkpointWatch, timeout time.Duration) error {
	return waitFor(ctx, d, timeout, 20*time.Millisecond, "outboxd to stream", func() (bool, error) {
		_, done, found, err := w.read(ctx)
		if err != nil || !found || !done {
			return false, err
		}
		var active bool
		err = w.conn.QueryRow(ctx, `SELECT coalesce(bool_or(active), false) FROM pg_replication_slots WHERE slot_name = $1`, w.slot).Scan(&active)
		return active, err
	})
}
