package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"

	"github.com/outboxd/outboxd/internal/e2e"
	"github.com/outboxd/outboxd/internal/pgserver"
)

// devProcess is `outboxd dev` running as a child, its stdout read line by
// line.
type devProcess struct {
	t      *testing.T
	cmd    *exec.Cmd
	start  time.Time
	stderr *toolsBuffer
	mu     sync.Mutex
	lines  []devLine
	done   chan struct{}
}

type devLine struct {
	text string
	at   time.Time
}

var (
	devEventLine = regexp.MustCompile(`^\d\d:\d\d:\d\d\.\d{3}  #\d+ `)
	devURLLine   = regexp.MustCompile(`^  postgres  (postgres://\S+)$`)
	devDataLine  = regexp.MustCompile(`^  data      (\S+) `)
)

func startDevProcess(t *testing.T, args ...string) *devProcess {
	t.Helper()
	if _, err := pgserver.FindBinDir(); err != nil {
		t.Fatalf("outboxd dev needs the PostgreSQL server binaries: %v", err)
	}
	cmd := exec.Command(e2e.Binary(t), append([]string{"dev"}, args...)...)
	cmd.Env = []string{"PATH=" + os.Getenv("PATH"), "HOME=" + os.Getenv("HOME")}
	p := &devProcess{t: t, cmd: cmd, stderr: &toolsBuffer{}, done: make(chan struct{})}
	cmd.Stderr = p.stderr
	out, err := cmd.StdoutPipe()
	require.NoError(t, err)
	p.start = time.Now()
	require.NoError(t, cmd.Start())
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			p.mu.Lock()
			p.lines = append(p.lines, devLine{sc.Text(), time.Now()})
			p.mu.Unlock()
		}
		_ = cmd.Wait()
		close(p.done)
	}()
	t.Cleanup(func() {
		select {
		case <-p.done:
		default:
			_ = cmd.Process.Signal(syscall.SIGKILL)
			<-p.done
		}
		if t.Failed() {
			t.Logf("outboxd dev stdout:\n%s\nstderr:\n%s", p.output(), p.stderr.String())
		}
	})
	return p
}

func (p *devProcess) output() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	var b strings.Builder
	for _, l := range p.lines {
		b.WriteString(l.text + "\n")
	}
	return b.String()
}

// find returns the first submatch of re in the output so far.
func (p *devProcess) find(re *regexp.Regexp) string {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, l := range p.lines {
		if m := re.FindStringSubmatch(l.text); m != nil {
			return m[len(m)-1]
		}
	}
	return ""
}

// events returns the printed event lines with their arrival times.
func (p *devProcess) events() []devLine {
	p.mu.Lock()
	defer p.mu.Unlock()
	var out []devLine
	for _, l := range p.lines {
		if devEventLine.MatchString(l.text) {
			out = append(out, l)
		}
	}
	return out
}

func (p *devProcess) waitFor(what string, timeout time.Duration, cond func() bool) {
	p.t.Helper()
	e2e.WaitFor(p.t, timeout, func() bool {
		select {
		case <-p.done:
			return cond() // the output is complete
		default:
		}
		return cond()
	}, func() string { return what + "; output so far:\n" + p.output() + "\nstderr:\n" + p.stderr.String() })
}

func (p *devProcess) waitEvent(substr string) {
	p.t.Helper()
	p.waitFor("an event line with "+substr, time.Minute, func() bool {
		for _, l := range p.events() {
			if strings.Contains(l.text, substr) {
				return true
			}
		}
		return false
	})
}

// interrupt sends SIGINT (Ctrl-C) and returns the exit code.
func (p *devProcess) interrupt() int {
	p.t.Helper()
	require.NoError(p.t, p.cmd.Process.Signal(syscall.SIGINT))
	select {
	case <-p.done:
	case <-time.After(90 * time.Second):
		p.t.Fatalf("outboxd dev did not stop within 90s of SIGINT")
	}
	return p.cmd.ProcessState.ExitCode()
}

// postmasterPID reads the server's PID from postmaster.pid.
func postmasterPID(t *testing.T, dataDir string) int {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(dataDir, "postmaster.pid"))
	require.NoError(t, err)
	line, _, _ := strings.Cut(string(data), "\n")
	pid, err := strconv.Atoi(strings.TrimSpace(line))
	require.NoError(t, err)
	return pid
}

func processGone(pid int) bool {
	return errors.Is(syscall.Kill(pid, 0), syscall.ESRCH)
}

func insertByHand(t *testing.T, url, name, props string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, url)
	require.NoError(t, err)
	defer conn.Close(ctx)
	_, err = conn.Exec(ctx, `INSERT INTO domain_event (event_name, organization_id, properties) VALUES ($1, 7, $2)`, name, props)
	require.NoError(t, err)
}

// The README's first command: `outboxd dev --demo` prints the psql URL and
// demo events within seconds; a row inserted by hand through that URL is
// printed too; Ctrl-C exits 0 with the Postgres server stopped and its
// temporary directory removed.
func TestDevDemoShowsEventsAndCleansUp(t *testing.T) {
	t.Parallel()
	p := startDevProcess(t, "--demo")
	p.waitFor("the psql URL and data directory", 2*time.Minute, func() bool {
		return p.find(devURLLine) != "" && p.find(devDataLine) != ""
	})
	url, dataDir := p.find(devURLLine), p.find(devDataLine)
	require.Contains(t, url, "@127.0.0.1:", "loopback only")

	p.waitFor("5 demo events", time.Minute, func() bool { return len(p.events()) >= 5 })
	first := p.events()[0]
	t.Logf("outboxd dev --demo: first event printed %s after the process started", first.at.Sub(p.start).Round(time.Millisecond))
	families := map[string]bool{}
	for _, l := range p.events() {
		families[strings.Fields(l.text)[2]] = true
	}
	require.True(t, families["recipe_created"] || families["batch_started"], "demo event families: %v", families)

	marker := fmt.Sprintf("by-hand-%d", time.Now().UnixNano())
	insertByHand(t, url, "batch_started", `{"batch_id":"B-19","marker":"`+marker+`"}`)
	p.waitEvent(marker)

	pid := postmasterPID(t, dataDir)
	require.False(t, processGone(pid), "postmaster %d running before the stop", pid)
	require.Equal(t, 0, p.interrupt(), "Ctrl-C exits 0")
	require.True(t, processGone(pid), "postmaster %d gone after the stop", pid)
	_, err := os.Stat(filepath.Dir(dataDir))
	require.True(t, os.IsNotExist(err), "temporary directory %s removed: %v", filepath.Dir(dataDir), err)
	out := p.output()
	require.Contains(t, out, "(0 requests with a bad signature)")
	require.NotContains(t, out, "rejected a request")
}

// With --data-dir and --port, the cluster is made on the first run, kept
// after Ctrl-C and reused by the next run on the same port: an event
// delivered in the first run is not delivered again in the second.
func TestDevDataDirIsKeptAndReused(t *testing.T) {
	t.Parallel()
	// Not t.TempDir: when the tests run as root, user postgres must be able
	// to enter the directory.
	base, err := os.MkdirTemp("", "outboxd-devtest-")
	require.NoError(t, err)
	require.NoError(t, os.Chmod(base, 0o755))
	t.Cleanup(func() { os.RemoveAll(base) })
	dataDir := filepath.Join(base, "pgdata")
	port := e2e.FreeAddr(t)
	_, portNum, _ := strings.Cut(port, ":")

	runOnce := func(marker string) {
		p := startDevProcess(t, "--data-dir", dataDir, "--port", portNum)
		p.waitFor("the psql URL", 2*time.Minute, func() bool { return p.find(devURLLine) != "" })
		url := p.find(devURLLine)
		require.Contains(t, url, "127.0.0.1:"+portNum+"/")
		require.Equal(t, dataDir, p.find(devDataLine))
		insertByHand(t, url, "inventory_adjusted", `{"marker":"`+marker+`"}`)
		p.waitEvent(marker)
		pid := postmasterPID(t, dataDir)
		require.Equal(t, 0, p.interrupt())
		require.True(t, processGone(pid), "postmaster %d gone after the stop", pid)
		require.Contains(t, p.output(), "data kept in "+dataDir)
		require.NotContains(t, p.output(), "rejected a request")
		if marker == "second" {
			require.NotContains(t, p.output(), `"marker":"first"`, "delivered in the first run, not again")
		}
	}
	runOnce("first")
	_, err = os.Stat(filepath.Join(dataDir, "PG_VERSION"))
	require.NoError(t, err, "cluster kept")
	runOnce("second")
}

// Bad OUTBOXD_* settings or flags stop `outboxd dev` with exit 2, naming the
// variable, before any Postgres is started.
func TestDevBadSettingsExit2BeforeStarting(t *testing.T) {
	t.Parallel()
	for _, c := range []struct {
		env  map[string]string
		args []string
		want string
	}{
		{map[string]string{"OUTBOXD_LOG_LEVEL": "loud"}, nil, "OUTBOXD_LOG_LEVEL"},
		{map[string]string{"OUTBOXD_ORDERING_KEY": "tenant"}, nil, "OUTBOXD_ORDERING_KEY"},
		{nil, []string{"--port", "70000"}, "--port"},
	} {
		var out toolsBuffer
		var environ []string
		for k, v := range c.env {
			environ = append(environ, k+"="+v)
		}
		err := run(context.Background(), append([]string{"dev"}, c.args...), func(k string) string { return c.env[k] }, environ, &out, &out)
		require.Equal(t, 2, exitCode(err, &out), c.want)
		require.Contains(t, out.String(), c.want)
		require.NotContains(t, out.String(), "starting PostgreSQL")
	}
}
