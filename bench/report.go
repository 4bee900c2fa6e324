package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"time"
)

// row is one line of the results table.
type row struct {
	Mode          string         `json:"mode"`
	System        string         `json:"system"` // outboxd, poller, pg_recvlogical
	TxnSize       int            `json:"txn_size,omitempty"`
	Events        int64          `json:"events"`
	Seconds       float64        `json:"seconds"`
	EventsPerSec  float64        `json:"events_per_s"`
	VsRecvlogical float64        `json:"vs_recvlogical,omitempty"`
	VsPoller      float64        `json:"vs_poller,omitempty"`
	P50ms         float64        `json:"p50_ms,omitempty"`
	P99ms         float64        `json:"p99_ms,omitempty"`
	P999ms        float64        `json:"p999_ms,omitempty"`
	PeakRSSMB     float64        `json:"peak_rss_mb,omitempty"`
	CPUPer100k    float64        `json:"cpu_s_per_100k,omitempty"`
	CPU           *cpuUse        `json:"cpu,omitempty"`
	Detail        map[string]any `json:"detail,omitempty"`
}

// results is the whole run, as written by -json.
type results struct {
	Command  string            `json:"command"`
	Started  time.Time         `json:"started"`
	TookS    float64           `json:"took_s"`
	Machine  machine           `json:"machine"`
	Config   config            `json:"-"`
	Flags    map[string]string `json:"flags"`
	Rows     []row             `json:"rows"`
	Failures []string          `json:"failures,omitempty"`
}

type machine struct {
	CPUs     int     `json:"cpus"`
	CPUModel string  `json:"cpu_model"`
	MemoryGB float64 `json:"memory_gb"`
	Kernel   string  `json:"kernel"`
	Go       string  `json:"go"`
	Postgres string  `json:"postgres"`
	Commit   string  `json:"commit"`
}

func (b *bench) results() results {
	rows := b.rows
	// Ratios: outboxd drains against pg_recvlogical and the poller on a
	// backlog of the same transaction size.
	rate := func(sys string, txn int) float64 {
		for _, r := range rows {
			if r.System == sys && r.TxnSize == txn && r.P50ms == 0 && r.Detail["target_rate"] == nil {
				return r.EventsPerSec
			}
		}
		return 0
	}
	for i := range rows {
		r := &rows[i]
		if (r.System != "outboxd" && r.System != "floor") || r.Detail["target_rate"] != nil || r.Detail["subscriptions"] != nil {
			continue // latency and tenants runs have backlogs of their own
		}
		if v := rate("pg_recvlogical", r.TxnSize); v > 0 {
			r.VsRecvlogical = r.EventsPerSec / v
		}
		if v := rate("poller", r.TxnSize); v > 0 {
			r.VsPoller = r.EventsPerSec / v
		}
	}
	return results{
		Command:  "go run ./bench " + strings.Join(os.Args[1:], " "),
		Started:  b.started,
		TookS:    time.Since(b.started).Seconds(),
		Machine:  describeMachine(b),
		Config:   b.cfg,
		Flags:    b.cfg.Flags,
		Rows:     rows,
		Failures: b.failures,
	}
}

func describeMachine(b *bench) machine {
	m := machine{CPUs: runtime.NumCPU(), Go: runtime.Version()}
	if f, err := os.Open("/proc/cpuinfo"); err == nil {
		s := bufio.NewScanner(f)
		for s.Scan() {
			if k, v, ok := strings.Cut(s.Text(), ":"); ok && strings.TrimSpace(k) == "model name" {
				m.CPUModel = strings.TrimSpace(v)
				break
			}
		}
		f.Close()
	}
	if f, err := os.Open("/proc/meminfo"); err == nil {
		s := bufio.NewScanner(f)
		for s.Scan() {
			var kb float64
			if _, err := fmt.Sscanf(s.Text(), "MemTotal: %f kB", &kb); err == nil {
				m.MemoryGB = kb / (1 << 20)
				break
			}
		}
		f.Close()
	}
	if out, err := exec.Command("uname", "-sr").Output(); err == nil {
		m.Kernel = strings.TrimSpace(string(out))
	}
	if out, err := exec.Command("git", "describe", "--always", "--dirty").Output(); err == nil {
		m.Commit = strings.TrimSpace(string(out))
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if b.pg != nil {
		m.Postgres = serverVersion(ctx, b.pg)
		if i := strings.Index(m.Postgres, " on "); i > 0 {
			m.Postgres = m.Postgres[:i]
		}
	}
	return m
}

func printTable(w io.Writer, res results) {
	m := res.Machine
	fmt.Fprintf(w, "\noutboxd benchmark: %d CPUs (%s), %.0f GiB, %s, %s, commit %s; took %.0fs\n",
		m.CPUs, m.CPUModel, m.MemoryGB, m.Postgres, m.Go, m.Commit, res.TookS)
	fmt.Fprintf(w, "backlog N=%d, properties %d bytes, %d organizations\n\n", res.Config.N, res.Config.PropsSize, res.Config.Orgs)
	// A Markdown table: readable in a terminal and pasted as is into RESULTS.md.
	fmt.Fprintln(w, "| mode | txn | events | seconds | events/s | × recvlogical | × poller | p50 ms | p99 ms | p999 ms | peak RSS MB | CPU s/100k | Postgres CPU s/100k (walsender) | others' CPU (cores) |")
	fmt.Fprintln(w, "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
	for _, r := range res.Rows {
		others, pg := "-", "-"
		if r.CPU != nil {
			others = fmt.Sprintf("%.2f", r.CPU.OthersCores)
			if r.Events > 0 {
				per := 1e5 / float64(r.Events)
				pg = fmt.Sprintf("%.2f (%.2f)", r.CPU.PostgresS*per, r.CPU.WalsenderS*per)
			}
		}
		fmt.Fprintf(w, "| %s | %s | %d | %.2f | %.0f | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n",
			r.Mode, txnLabel(r), r.Events, r.Seconds, r.EventsPerSec,
			opt(r.VsRecvlogical, "%.2f"), opt(r.VsPoller, "%.2f"),
			opt(r.P50ms, "%.2f"), opt(r.P99ms, "%.2f"), opt(r.P999ms, "%.2f"),
			opt(r.PeakRSSMB, "%.1f"), opt(r.CPUPer100k, "%.2f"), pg, others)
	}
	fmt.Fprintln(w, "\nPostgres CPU: the server's processes over the measurement (decoding, marking, checkpoint, the load where it overlaps), per 100k events; in brackets the walsenders' part.")
	fmt.Fprintln(w, "\nothers' CPU: cores used by processes outside the benchmark (other work on the machine) during the measurement.")
	if len(res.Failures) > 0 {
		fmt.Fprintf(w, "\nFAILED:\n  %s\n", strings.Join(res.Failures, "\n  "))
	}
}

func txnLabel(r row) string {
	if r.TxnSize == 0 {
		return "1"
	}
	return fmt.Sprint(r.TxnSize)
}

func opt(v float64, format string) string {
	if v == 0 {
		return "-"
	}
	return fmt.Sprintf(format, v)
}

func writeJSON(path string, res results) error {
	b, err := json.MarshalIndent(res, "", "  ")
	if err != nil {
		return err
	}
	if err := os.WriteFile(path, append(b, '\n'), 0o644); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}
