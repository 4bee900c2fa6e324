package ops

import (
	"context"
	"fmt"
	"io"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rs/zerolog"
)

// Progress counts a replay's deliveries; it is safe for concurrent use.
type Progress struct {
	start        time.Time
	total        atomic.Int64
	done, failed atomic.Int64
}

// NewProgress starts the clock.
func NewProgress() *Progress { return &Progress{start: time.Now()} }

// SetTotal sets the number of events expected.
func (p *Progress) SetTotal(n int64) { p.total.Store(n) }

func (p *Progress) add(ok bool) {
	p.done.Add(1)
	if !ok {
		p.failed.Add(1)
	}
}

// ProgressSnapshot is the progress at one moment.
type ProgressSnapshot struct {
	// Done counts finished deliveries, Failed those of them that failed.
	Done, Failed, Total int64
	Elapsed             time.Duration
	// Rate is in events per second; ETA is -1 while unknown.
	Rate float64
	ETA  time.Duration
}

// Snapshot returns the progress now.
func (p *Progress) Snapshot() ProgressSnapshot { return p.snapshotAt(time.Now()) }

func (p *Progress) snapshotAt(now time.Time) ProgressSnapshot {
	s := ProgressSnapshot{Done: p.done.Load(), Failed: p.failed.Load(), Total: p.total.Load(), Elapsed: now.Sub(p.start), ETA: -1}
	if secs := s.Elapsed.Seconds(); secs > 0 {
		s.Rate = float64(s.Done) / secs
	}
	if s.Rate > 0 && s.Total >= s.Done {
		s.ETA = time.Duration(float64(s.Total-s.Done) / s.Rate * float64(time.Second))
	}
	return s
}

// Bar renders the snapshot as one line of about width characters:
//
//	[=========>          ] 4500/10000  45%  812/s  ETA 7s  failed 3
func (s ProgressSnapshot) Bar(width int) string {
	frac := 0.0
	if s.Total > 0 {
		frac = min(1, float64(s.Done)/float64(s.Total))
	}
	tail := fmt.Sprintf(" %d/%d %3.0f%%  %s/s  ETA %s", s.Done, s.Total, frac*100, rateString(s.Rate), etaString(s.ETA))
	if s.Failed > 0 {
		tail += fmt.Sprintf("  failed %d", s.Failed)
	}
	n := max(10, width-len(tail)-2)
	fill := int(frac * float64(n))
	bar := strings.Repeat("=", fill)
	if fill < n {
		bar += ">" + strings.Repeat(" ", n-fill-1)
	}
	return "[" + bar + "]" + tail
}

func rateString(r float64) string {
	if r >= 100 {
		return fmt.Sprintf("%.0f", r)
	}
	return fmt.Sprintf("%.1f", r)
}

func etaString(d time.Duration) string {
	if d < 0 {
		return "?"
	}
	if d < time.Minute {
		return d.Round(time.Second).String()
	}
	return d.Round(time.Minute).String()
}

// ProgressReporter shows a Progress while a replay runs: a bar redrawn in
// place on a terminal, log lines every LogEvery or every 10% otherwise.
type ProgressReporter struct {
	// Terminal selects the bar; otherwise log lines.
	Terminal bool
	// Out receives the bar.
	Out io.Writer
	// Log receives the progress lines.
	Log zerolog.Logger
	// Redraw is the bar's redraw interval (default 200ms); LogEvery the
	// longest time between log lines (default 5s).
	Redraw, LogEvery time.Duration
	// Width is the bar's width (default 80).
	Width int

	lastLog    time.Time
	lastDecile int64
}

// Start reports p until the returned stop function is called; stop draws
// the final state and waits for the reporter to finish.
func (r *ProgressReporter) Start(ctx context.Context, p *Progress) (stop func()) {
	if r.Redraw == 0 {
		r.Redraw = 200 * time.Millisecond
	}
	if r.LogEvery == 0 {
		r.LogEvery = 5 * time.Second
	}
	if r.Width == 0 {
		r.Width = 80
	}
	r.lastLog = time.Now()
	ctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		tick := time.NewTicker(r.Redraw)
		defer tick.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case now := <-tick.C:
				r.show(p.snapshotAt(now), now, false)
			}
		}
	}()
	return func() {
		cancel()
		wg.Wait()
		r.show(p.Snapshot(), time.Now(), true)
	}
}

func (r *ProgressReporter) show(s ProgressSnapshot, now time.Time, final bool) {
	if r.Terminal {
		// \r returns to the line start, \x1b[K clears what a longer line left.
		line := "\r" + s.Bar(r.Width) + "\x1b[K"
		if final {
			line += "\n"
		}
		io.WriteString(r.Out, line) //nolint:errcheck // a lost progress line changes nothing
		return
	}
	decile := int64(0)
	if s.Total > 0 {
		decile = s.Done * 10 / s.Total
	}
	if final || now.Sub(r.lastLog) >= r.LogEvery || decile > r.lastDecile {
		if final && s.Done == 0 && s.Total == 0 {
			return
		}
		r.lastLog, r.lastDecile = now, decile
		ev := r.Log.Info().Int64("done", s.Done).Int64("total", s.Total).Int64("failed", s.Failed).
			Str("rate", rateString(s.Rate)+"/s")
		if s.ETA >= 0 {
			ev = ev.Str("eta", etaString(s.ETA))
		}
		ev.Msg("replay progress")
	}
}
