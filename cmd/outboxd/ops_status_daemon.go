package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"time"

	"github.com/outboxd/outboxd/deliver"
	"github.com/outboxd/outboxd/ops"
)

// withDestinations is the JSON of `status`: the database's view, plus the
// destinations a running daemon reported (status --daemon).
type withDestinations struct {
	*ops.Status
	// Destinations are the daemon's GET /health/destinations: each own
	// destination's breaker and rate limit. Absent without --daemon, and
	// when the daemon could not be asked (a warning says why).
	Destinations []deliver.GuardStatus `json:"destinations,omitempty"`
}

// daemonTimeout bounds the request to the daemon.
const daemonTimeout = 5 * time.Second

// daemonDestinations asks the daemon at base for its destinations' live
// state; the breaker is the daemon's, not the database's. A daemon that
// cannot be asked is a warning in st, not a problem: status still reports
// the database.
func daemonDestinations(ctx context.Context, base string, st *ops.Status) []deliver.GuardStatus {
	if base == "" {
		return nil
	}
	if !strings.Contains(base, "://") {
		base = "http://" + base
	}
	dests, err := fetchDestinations(ctx, strings.TrimRight(base, "/")+"/health/destinations")
	if err != nil {
		st.Warnings = append(st.Warnings, fmt.Sprintf("destinations of the daemon at %s unknown: %v", base, err))
		return nil
	}
	for _, d := range dests {
		if d.Breaker == deliver.BreakerOpen.String() {
			st.Warnings = append(st.Warnings, fmt.Sprintf("destination %s: circuit breaker open (its events are parked until a probe succeeds)", d.Target))
		}
	}
	return dests
}

func fetchDestinations(ctx context.Context, url string) ([]deliver.GuardStatus, error) {
	ctx, cancel := context.WithTimeout(ctx, daemonTimeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return nil, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
		return nil, fmt.Errorf("GET /health/destinations answered %d (an outboxd without destination guards?)", resp.StatusCode)
	}
	var body struct {
		Destinations []deliver.GuardStatus `json:"destinations"`
	}
	if err := json.NewDecoder(io.LimitReader(resp.Body, 1<<20)).Decode(&body); err != nil {
		return nil, fmt.Errorf("GET /health/destinations: %w", err)
	}
	return body.Destinations, nil
}

// printDestinations writes the daemon's destinations, when asked for.
func printDestinations(p func(format string, args ...any), dests []deliver.GuardStatus) {
	for i, d := range dests {
		if i == 0 {
			p("Destinations (from the daemon)")
		}
		breaker := "no breaker"
		if d.Breaker != "disabled" {
			breaker = "breaker " + d.Breaker
			if d.BreakerSince != nil {
				breaker += " since " + d.BreakerSince.Format(time.RFC3339)
			}
			breaker += fmt.Sprintf(" (%d openings)", d.BreakerOpenings)
			if d.LastError != "" && d.Breaker != "closed" {
				breaker += ", last error: " + d.LastError
			}
		}
		rate := "no rate limit"
		if d.RateLimit > 0 {
			rate = fmt.Sprintf("rate limit %g/s (burst %d)", d.RateLimit, d.RateBurst)
		}
		p("  %-10s %s, %s", d.Target, breaker, rate)
	}
}
