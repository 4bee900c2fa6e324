package main

import (
	"bytes"
	"os"
	"strconv"
	"strings"
	"time"
)

// cpuSample is where CPU time went on the machine up to one moment: the
// machine as a whole (/proc/stat) and this benchmark's process tree, split
// into outboxd, Postgres (a server the benchmark started) and the benchmark
// process itself (receiver, poller, generators). The difference between two
// samples tells how much CPU other work on the machine took meanwhile: the
// figures of a measurement during which others used a core are disturbed.
type cpuSample struct {
	at       time.Time
	busy     int64 // machine: jiffies not idle or iowait
	tree     int64 // our process tree, reaped children included
	self     int64 // this process alone
	postgres int64 // postgres processes in our tree, reaped backends included
	// walsender is the part of postgres spent by the walsenders alive at the
	// sample (decoding for outboxd or pg_recvlogical); the rest is backends
	// (marking, checkpoint, loading) and the server's own processes.
	walsender int64
	outboxd   int64 // the outboxd process given to takeCPU
}

type procEntry struct {
	ppid        int
	comm        string
	own, reaped int64 // utime+stime, cutime+cstime
}

func takeCPU(outboxdPID int) cpuSample {
	s := cpuSample{at: time.Now()}
	if b, err := os.ReadFile("/proc/stat"); err == nil {
		line, _, _ := bytes.Cut(b, []byte("\n"))
		f := strings.Fields(string(line))
		for i := 1; i < len(f) && i <= 8; i++ {
			if i == 4 || i == 5 { // idle, iowait
				continue
			}
			n, _ := strconv.ParseInt(f[i], 10, 64)
			s.busy += n
		}
	}
	procs := map[int]procEntry{}
	dirs, _ := os.ReadDir("/proc")
	for _, d := range dirs {
		pid, err := strconv.Atoi(d.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile("/proc/" + d.Name() + "/stat")
		if err != nil {
			continue
		}
		open, close := bytes.IndexByte(b, '('), bytes.LastIndexByte(b, ')')
		if open < 0 || close < open {
			continue
		}
		f := strings.Fields(string(b[close+1:]))
		if len(f) < 15 {
			continue
		}
		num := func(i int) int64 { n, _ := strconv.ParseInt(f[i], 10, 64); return n }
		ppid, _ := strconv.Atoi(f[1])
		procs[pid] = procEntry{ppid: ppid, comm: string(b[open+1 : close]),
			own: num(11) + num(12), reaped: num(13) + num(14)}
	}
	children := map[int][]int{}
	for pid, p := range procs {
		children[p.ppid] = append(children[p.ppid], pid)
	}
	me := os.Getpid()
	var walk func(pid int, inPG bool)
	walk = func(pid int, inPG bool) {
		p, ok := procs[pid]
		if !ok {
			return
		}
		t := p.own + p.reaped
		s.tree += t
		pg := inPG || p.comm == "postgres"
		if pg {
			s.postgres += p.own
			if isWalsender(pid) {
				s.walsender += p.own
			}
			if !inPG { // the postmaster: its reaped children are backends
				s.postgres += p.reaped
			}
		}
		if pid == outboxdPID {
			s.outboxd = t
		}
		for _, c := range children[pid] {
			walk(c, pg)
		}
	}
	walk(me, false)
	if p, ok := procs[me]; ok {
		s.self = p.own
	}
	return s
}

// cpuUse is the CPU used between two samples, in seconds (and cores for
// others).
type cpuUse struct {
	OutboxdS  float64 `json:"outboxd_s,omitempty"`
	PostgresS float64 `json:"postgres_s"`
	// WalsenderS is the part of PostgresS spent by walsenders that were
	// alive at both samples' end (a walsender that exits before the second
	// sample is counted in PostgresS only).
	WalsenderS   float64 `json:"walsender_s"`
	BenchS       float64 `json:"bench_s"` // receiver, poller, generator
	OthersS      float64 `json:"others_s"`
	OthersCores  float64 `json:"others_cores"`
	MachineCores float64 `json:"machine_busy_cores"`
}

func cpuBetween(a, b cpuSample) cpuUse {
	const hz = clockTick
	secs := b.at.Sub(a.at).Seconds()
	u := cpuUse{
		OutboxdS:  float64(b.outboxd-a.outboxd) / hz,
		PostgresS: float64(b.postgres-a.postgres) / hz,
		// A walsender alive at the first sample and gone at the second
		// would make this negative: count only what grew.
		WalsenderS: float64(max(b.walsender-a.walsender, 0)) / hz,
		BenchS:     float64(b.self-a.self) / hz,
		OthersS:    float64((b.busy-a.busy)-(b.tree-a.tree)) / hz,
	}
	u.OthersS = max(u.OthersS, 0)
	if secs > 0 {
		u.OthersCores = u.OthersS / secs
		u.MachineCores = float64(b.busy-a.busy) / hz / secs
	}
	return u
}

// isWalsender reports whether process pid is a walsender: postgres titles
// its processes "postgres: walsender <user> <host> ...".
func isWalsender(pid int) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cmdline")
	return err == nil && bytes.HasPrefix(b, []byte("postgres: walsender"))
}
