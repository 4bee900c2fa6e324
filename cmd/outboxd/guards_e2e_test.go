package main

import (
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/outboxd/outboxd/internal/e2e"
	"github.com/outboxd/outboxd/internal/pgtest"
)

// countingGate stands in front of the webhook receiver: it counts every
// request, records its arrival and whether it carried the expected
// Authorization header, and answers 503 itself while down (the receiver
// behind it sees only the requests it accepts).
type countingGate struct {
	URL     string
	down    atomic.Bool
	mu      sync.Mutex
	times   []time.Time
	auths   []string // Authorization of each request
	badAuth int
}

func newCountingGate(t *testing.T, upstream, wantAuth string) *countingGate {
	target, err := url.Parse(upstream)
	require.NoError(t, err)
	proxy := httputil.NewSingleHostReverseProxy(target)
	g := &countingGate{}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		g.mu.Lock()
		g.times = append(g.times, time.Now())
		g.auths = append(g.auths, r.Header.Get("Authorization"))
		if wantAuth != "" && r.Header.Get("Authorization") != wantAuth {
			g.badAuth++
		}
		g.mu.Unlock()
		if g.down.Load() {
			http.Error(w, "unavailable", http.StatusServiceUnavailable)
			return
		}
		proxy.ServeHTTP(w, r)
	}))
	t.Cleanup(srv.Close)
	g.URL = srv.URL
	return g
}

func (g *countingGate) requests() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return len(g.times)
}

func (g *countingGate) auth() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.badAuth
}

// destinationsStatus is GET /health/destinations.
type destinationsStatus struct {
	Destinations []struct {
		Target          string     `json:"target"`
		Breaker         string     `json:"breaker"`
		BreakerSince    *time.Time `json:"breaker_since"`
		LastError       string     `json:"last_error"`
		BreakerOpenings int64      `json:"breaker_openings"`
		RateLimit       float64    `json:"rate_limit"`
		Headers         []string   `json:"headers"`
	} `json:"destinations"`
}

func (w *watched) destinations(t *testing.T) (destinationsStatus, string) {
	t.Helper()
	code, body, err := w.get("/health/destinations")
	require.NoError(t, err)
	require.Equal(t, http.StatusOK, code, body)
	var st destinationsStatus
	require.NoError(t, json.Unmarshal([]byte(body), &st), body)
	return st, body
}

// The webhook of OUTBOXD_SINKS=webhook,posthog fails (503) for a while:
// after OUTBOXD_WEBHOOK_BREAKER_FAILURES failed calls its breaker opens and
// the receiver sees no more calls but a probe per cool-down, although the
// retrier keeps going through the parked rows; its events park, the metric
// and the daemon's /health/destinations say open; PostHog receives every
// event meanwhile and the rows stay unprocessed (the webhook has not
// delivered them). The receiver recovers: a probe closes the breaker, the
// parked events arrive once each and in order per organization, every row
// is processed. Every request carried the header read from a file, whose
// value appears nowhere in the log, the metrics or the status.
func TestDestinationBreakerEndToEnd(t *testing.T) {
	t.Parallel()
	const token = "Bearer e2e-t0ken-from-a-file"
	tokenFile := filepath.Join(t.TempDir(), "token")
	require.NoError(t, os.WriteFile(tokenFile, []byte(token+"\n"), 0o600))
	const failures, cooldown = 3, 2 * time.Second

	pe, posthogGot := posthogCase(t)
	delete(pe, "OUTBOXD_SINK")
	env := map[string]string{
		"OUTBOXD_SINKS":                    "webhook,posthog",
		"OUTBOXD_RETRY_SCHEDULE":           "200ms,400ms" + strings.Repeat(",500ms", 600),
		"OUTBOXD_WEBHOOK_MAX_ATTEMPTS":     "1",
		"OUTBOXD_WEBHOOK_CONCURRENCY":      "1",
		"OUTBOXD_WEBHOOK_HEADERS":          "Authorization: @" + tokenFile + "; X-Outboxd-Test: yes",
		"OUTBOXD_WEBHOOK_BREAKER_FAILURES": fmt.Sprint(failures),
		"OUTBOXD_WEBHOOK_BREAKER_COOLDOWN": cooldown.String(),
		"OUTBOXD_POSTHOG_BREAKER_FAILURES": "0",
		"OUTBOXD_BACKLOG_POLL_INTERVAL":    "100ms",
	}
	maps.Copy(env, pe)
	b := newBundle(t, pgtest.Shared(t), env)
	gate := newCountingGate(t, b.recv.URL, token)
	b.env["OUTBOXD_WEBHOOK_URL"] = gate.URL
	w := startWatched(t, b.env)
	d := w.Daemon
	orgOf := func(i int) int64 { return int64(i%10) + 1 }

	ids := e2e.Insert(t, b.pool, 2, 10, orgOf)
	b.waitProcessed(t, int64(len(ids)), time.Minute)
	require.Zero(t, w.mustMetric(t, `outboxd_breaker_state{target="webhook"}`))
	require.Zero(t, w.mustMetric(t, `outboxd_breaker_state{target="posthog"}`))

	// Down: ten organizations' events, so that the retrier has ten keys to
	// retry all the time.
	gate.down.Store(true)
	before := gate.requests()
	wentDown := time.Now()
	down := e2e.Insert(t, b.pool, 4, 10, orgOf)
	ids = append(ids, down...)
	e2e.WaitFor(t, time.Minute, func() bool {
		v, err := w.metric(`outboxd_breaker_openings_total{target="webhook"}`)
		return err == nil && v >= 1
	}, func() string { return "the webhook's breaker did not open" })
	// PostHog has every event, though the webhook is down.
	e2e.WaitFor(t, time.Minute, func() bool {
		got, _ := posthogGot(t, d, len(ids))
		return len(got) >= len(ids)
	}, func() string { return "PostHog does not have every event" })
	// The retrier goes on through the parked rows (40 retries at least),
	// each a call of the webhook without a breaker.
	e2e.WaitFor(t, 2*time.Minute, func() bool {
		var rounds int
		return b.pool.QueryRow(context.Background(), `SELECT coalesce(sum(rounds), 0) FROM outboxd_parked WHERE target = 'webhook'`).Scan(&rounds) == nil && rounds >= 40
	}, func() string { return "parked deliveries not retried" })
	calls := gate.requests() - before
	probes := int(time.Since(wentDown)/cooldown) + 1
	// failures calls open it; calls already under way then (the
	// dispatcher's one, the retrier's 8 workers) may still arrive; after
	// that only probes, one per cool-down at most.
	require.LessOrEqual(t, calls, failures+1+8+probes, "calls while the breaker was open")
	state := w.mustMetric(t, `outboxd_breaker_state{target="webhook"}`)
	require.Contains(t, []float64{1, 2}, state, "open or half-open")
	require.Zero(t, w.mustMetric(t, `outboxd_breaker_state{target="posthog"}`))
	st, body := w.destinations(t)
	require.Len(t, st.Destinations, 2, body)
	require.Equal(t, "posthog", st.Destinations[0].Target)
	require.Equal(t, "disabled", st.Destinations[0].Breaker, "OUTBOXD_POSTHOG_BREAKER_FAILURES=0")
	wh := st.Destinations[1]
	require.Equal(t, "webhook", wh.Target)
	require.Contains(t, []string{"open", "half-open"}, wh.Breaker, body)
	require.NotNil(t, wh.BreakerSince, body)
	require.Contains(t, wh.LastError, "503", body)
	require.Equal(t, []string{"Authorization", "X-Outboxd-Test"}, wh.Headers)
	require.NotContains(t, body, "t0ken")
	// `outboxd status --daemon` shows the daemon's breakers with the
	// database's parked counts and lag per destination.
	code, out, errOut := opsRun(t, b.env, "status", "--json", "--daemon", "http://"+w.addr)
	require.Contains(t, []int{0, 1}, code, out+errOut)
	var status struct {
		Backlog struct {
			Targets []struct {
				Target     string  `json:"target"`
				Parked     int64   `json:"parked"`
				LagSeconds float64 `json:"lag_seconds"`
			} `json:"targets"`
		} `json:"backlog"`
		Destinations []struct {
			Target  string `json:"target"`
			Breaker string `json:"breaker"`
		} `json:"destinations"`
	}
	require.NoError(t, json.Unmarshal([]byte(out), &status), out)
	require.Len(t, status.Destinations, 2, out)
	require.Equal(t, "webhook", status.Destinations[1].Target)
	require.Contains(t, []string{"open", "half-open"}, status.Destinations[1].Breaker, out)
	// Both destinations, by name: PostHog has nothing waiting.
	require.Len(t, status.Backlog.Targets, 2, out)
	require.Equal(t, "posthog", status.Backlog.Targets[0].Target, out)
	require.Zero(t, status.Backlog.Targets[0].Parked, out)
	require.Zero(t, status.Backlog.Targets[0].LagSeconds, out)
	require.Equal(t, "webhook", status.Backlog.Targets[1].Target, out)
	require.Positive(t, status.Backlog.Targets[1].Parked, out)
	require.Positive(t, status.Backlog.Targets[1].LagSeconds, out)
	code, out, errOut = opsRun(t, b.env, "status", "--daemon", w.addr)
	require.Contains(t, []int{0, 1}, code, out+errOut)
	require.Regexp(t, `webhook +breaker (open|half-open) since .*last error: .*503`, out)
	require.NotContains(t, out, "t0ken")
	// The rows of the down stretch wait for the webhook.
	rows, _ := e2e.Processed(t, b.pool)
	require.EqualValues(t, 20, rows, "rows processed while the webhook had not delivered them")
	require.Zero(t, deadLetters(t, b))

	// Up again: a probe closes the breaker and the parked events drain.
	gate.down.Store(false)
	ids = append(ids, e2e.Insert(t, b.pool, 2, 10, orgOf)...)
	waitProcessedOrSay(t, b, int64(len(ids)), 2*time.Minute)
	require.Zero(t, w.mustMetric(t, `outboxd_breaker_state{target="webhook"}`))
	require.GreaterOrEqual(t, w.mustMetric(t, `outboxd_breaker_openings_total{target="webhook"}`), float64(1))
	var got []int64
	orgs := map[int64]int64{}
	for _, dl := range b.recv.Deliveries() {
		if dl.Status/100 == 2 {
			for i, id := range dl.IDs {
				got = append(got, id)
				orgs[id] = dl.Orgs[i]
			}
		}
	}
	checkDelivered(t, ids, got, orgs)
	phIDs, phOrgs := posthogGot(t, d, len(ids))
	checkDelivered(t, ids, phIDs, phOrgs)
	require.Empty(t, parkedTargets(t, b))
	require.Zero(t, deadLetters(t, b))
	require.Zero(t, gate.auth(), "requests without the header from the file")
	st, body = w.destinations(t)
	require.Equal(t, "closed", st.Destinations[1].Breaker, body)
	_, metrics, err := w.get("/metrics")
	require.NoError(t, err)
	require.Equal(t, 0, d.Stop(30*time.Second))
	for where, text := range map[string]string{"log": d.Log(), "metrics": metrics, "status": body} {
		require.NotContains(t, text, "t0ken", "the header's value in the %s", where)
	}
	t.Logf("webhook down for a while: %d calls reached it while its breaker was open (%d probes allowed); %d events, lost 0",
		calls, probes, len(ids))
}

// OUTBOXD_WEBHOOK_RATE_LIMIT=20 (burst 20, one second's worth): 100 events
// reach the receiver over at least (100-20)/20 = 4 s, each once, in order
// per organization.
func TestDestinationRateLimitEndToEnd(t *testing.T) {
	t.Parallel()
	b := newBundle(t, pgtest.Shared(t), map[string]string{"OUTBOXD_WEBHOOK_RATE_LIMIT": "20"})
	w := startWatched(t, b.env)
	ids := e2e.Insert(t, b.pool, 10, 10, func(i int) int64 { return int64(i%7) + 1 })
	b.waitProcessed(t, int64(len(ids)), time.Minute)
	var got []int64
	var first, last time.Time
	orgs := map[int64]int64{}
	for _, dl := range b.recv.Deliveries() {
		require.Equal(t, 2, dl.Status/100)
		if first.IsZero() {
			first = dl.At
		}
		last = dl.At
		for i, id := range dl.IDs {
			got = append(got, id)
			orgs[id] = dl.Orgs[i]
		}
	}
	checkDelivered(t, ids, got, orgs)
	span := last.Sub(first)
	require.GreaterOrEqual(t, span, 3500*time.Millisecond, "100 events at 20/s with a burst of 20")
	st, body := w.destinations(t)
	require.Len(t, st.Destinations, 1, body)
	require.Equal(t, "webhook", st.Destinations[0].Target)
	require.Equal(t, float64(20), st.Destinations[0].RateLimit)
	require.Equal(t, "disabled", st.Destinations[0].Breaker)
	require.Equal(t, 0, w.Stop(30*time.Second))
	t.Logf("100 events at 20/s: first to last request %s", span.Round(time.Millisecond))
}

// Bad header, rate and breaker settings exit 2 at start naming the
// variable, never a header's value.
func TestGuardConfigErrors(t *testing.T) {
	t.Parallel()
	base := e2e.Env("postgres://outboxd@127.0.0.1:1/db", "slot", "http://127.0.0.1:1/", map[string]string{"OUTBOXD_HTTP_ADDR": ""})
	missing := filepath.Join(t.TempDir(), "absent")
	for _, tt := range []struct {
		env  map[string]string
		want string
	}{
		{map[string]string{"OUTBOXD_WEBHOOK_HEADERS": "webhook-signature: v1,s3cret"}, "OUTBOXD_WEBHOOK_HEADERS: header webhook-signature is set by outboxd itself"},
		{map[string]string{"OUTBOXD_WEBHOOK_HEADERS": "Authorization: Bearer s3cret; Content-Type: text/plain"}, "OUTBOXD_WEBHOOK_HEADERS: header Content-Type is set by outboxd itself"},
		{map[string]string{"OUTBOXD_SINKS": "posthog", "OUTBOXD_POSTHOG_PROJECT_API_KEY": "phc", "OUTBOXD_POSTHOG_HEADERS": "Traceparent: s3cret"}, "OUTBOXD_POSTHOG_HEADERS: header Traceparent"},
		{map[string]string{"OUTBOXD_SINK": "ga4", "OUTBOXD_GA4_MEASUREMENT_ID": "G-1", "OUTBOXD_GA4_API_SECRET": "x", "OUTBOXD_GA4_HEADERS": "webhook-id: s3cret"}, "OUTBOXD_GA4_HEADERS: header webhook-id"},
		{map[string]string{"OUTBOXD_WEBHOOK_HEADERS": "Bad Name: s3cret"}, "OUTBOXD_WEBHOOK_HEADERS: entry 1 is not"},
		{map[string]string{"OUTBOXD_WEBHOOK_HEADERS": "Authorization: @" + missing}, "OUTBOXD_WEBHOOK_HEADERS: header Authorization: cannot read its value file"},
		{map[string]string{"OUTBOXD_WEBHOOK_HEADERS": "X-A: s3cret; x-a: s3cret"}, "OUTBOXD_WEBHOOK_HEADERS: header x-a is given twice"},
		{map[string]string{"OUTBOXD_POSTHOG_HEADERS": "X-A: s3cret"}, "OUTBOXD_POSTHOG_HEADERS: no destination of that kind"},
		{map[string]string{"OUTBOXD_WEBHOOK_RATE_LIMIT": "fast"}, "OUTBOXD_WEBHOOK_RATE_LIMIT: "},
		{map[string]string{"OUTBOXD_WEBHOOK_RATE_LIMIT": "-1"}, "OUTBOXD_WEBHOOK_RATE_LIMIT: "},
		{map[string]string{"OUTBOXD_WEBHOOK_RATE_BURST": "5"}, "OUTBOXD_WEBHOOK_RATE_BURST: set without"},
		{map[string]string{"OUTBOXD_BREAKER_FAILURES": "-2"}, "OUTBOXD_BREAKER_FAILURES: "},
		{map[string]string{"OUTBOXD_WEBHOOK_BREAKER_COOLDOWN": "0s"}, "OUTBOXD_WEBHOOK_BREAKER_COOLDOWN: "},
	} {
		env := maps.Clone(base)
		maps.Copy(env, tt.env)
		code, out := e2e.RunCommand(t, env, "run")
		require.Equal(t, 2, code, "%v: %s", tt.env, out)
		require.Contains(t, out, tt.want, "%v", tt.env)
		require.NotContains(t, out, "s3cret", "%v", tt.env)
	}
}

// The guard variables are known (no unknown-variable warning), and
// parsed: headers from a file, the breaker's global default and a
// per-kind override.
func TestGuardVariables(t *testing.T) {
	t.Parallel()
	file := filepath.Join(t.TempDir(), "token")
	require.NoError(t, os.WriteFile(file, []byte("Bearer abc\n"), 0o600))
	env := map[string]string{"OUTBOXD_SINKS": "webhook,posthog", "OUTBOXD_BREAKER_FAILURES": "4", "OUTBOXD_BREAKER_COOLDOWN": "1m",
		"OUTBOXD_POSTHOG_BREAKER_FAILURES": "9", "OUTBOXD_POSTHOG_RATE_LIMIT": "2.5", "OUTBOXD_WEBHOOK_RATE_LIMIT": "100",
		"OUTBOXD_WEBHOOK_RATE_BURST": "10", "OUTBOXD_WEBHOOK_HEADERS": "Authorization: @" + file + "\nX-Team: data",
		"OUTBOXD_POSTHOG_HEADERS": "X-Key: k"}
	c, warnings, err := loadConfig(env)
	require.NoError(t, err)
	require.Empty(t, warnings)
	guards, err := c.guards(env)
	require.NoError(t, err)
	wh, ph := guards["webhook"].Config(), guards["posthog"].Config()
	require.Equal(t, 4, wh.BreakerFailures)
	require.Equal(t, time.Minute, wh.BreakerCooldown)
	require.Equal(t, 9, ph.BreakerFailures)
	require.Equal(t, []float64{100, 2.5}, []float64{wh.RateLimit, ph.RateLimit})
	require.Equal(t, []int{10, 3}, []int{wh.RateBurst, ph.RateBurst}, "the burst defaults to one second's worth")
	require.Len(t, wh.Headers, 2)
	require.Equal(t, "Bearer abc", wh.Headers[0].Value)
	require.Equal(t, "data", wh.Headers[1].Value)

	// OUTBOXD_SINK: the variables of its kind guard its one target.
	env = map[string]string{"OUTBOXD_SINK": "posthog", "OUTBOXD_POSTHOG_RATE_LIMIT": "5"}
	c, _, err = loadConfig(env)
	require.NoError(t, err)
	guards, err = c.guards(env)
	require.NoError(t, err)
	require.Equal(t, float64(5), guards["webhook"].Config().RateLimit)
	require.Zero(t, guards["webhook"].Config().BreakerFailures, "no breaker unless asked for")
}

func (g *countingGate) authorizations() []string {
	g.mu.Lock()
	defer g.mu.Unlock()
	return append([]string(nil), g.auths...)
}

// replay sends the destination's headers to its configured address, and
// never to another one given with --webhook-url.
func TestReplaySendsDestinationHeaders(t *testing.T) {
	t.Parallel()
	db := newOpsDB(t)
	db.insert(t, 2, "batch_started", 3, time.Now())
	db.exec(t, `UPDATE domain_event SET is_processed = true, processed_at = now()`)
	own := newCountingGate(t, db.recv.URL, "")
	other := newCountingGate(t, db.recv.URL, "")
	env := maps.Clone(db.env)
	env["OUTBOXD_WEBHOOK_URL"] = own.URL
	env["OUTBOXD_WEBHOOK_HEADERS"] = "Authorization: Bearer replay-t0ken"
	code, out, errOut := opsRun(t, env, "replay")
	require.Equal(t, 0, code, out+errOut)
	require.Equal(t, []string{"Bearer replay-t0ken", "Bearer replay-t0ken"}, own.authorizations())
	code, out, errOut = opsRun(t, env, "replay", "--webhook-url", other.URL)
	require.Equal(t, 0, code, out+errOut)
	require.Equal(t, []string{"", ""}, other.authorizations(), "the token went to another address")
	require.NotContains(t, out+errOut, "t0ken")
}

// status's configuration shows the header names and value files, never a
// header's value.
func TestStatusConfigRedactsHeaders(t *testing.T) {
	t.Parallel()
	env := map[string]string{"OUTBOXD_SINKS": "webhook,posthog",
		"OUTBOXD_WEBHOOK_HEADERS": "Authorization: Bearer s3cret-t0ken; X-Key: @/run/secrets/key",
		"OUTBOXD_POSTHOG_HEADERS": "X-Other: plain-s3cret"}
	c, _, err := loadConfig(env)
	require.NoError(t, err)
	cfg := effectiveConfig(c, env)
	require.Equal(t, "Authorization: ***; X-Key: @/run/secrets/key", cfg["OUTBOXD_WEBHOOK_HEADERS"])
	require.Equal(t, "X-Other: ***", cfg["OUTBOXD_POSTHOG_HEADERS"])
	for k, v := range cfg {
		require.NotContains(t, v, "s3cret", k)
	}
}
