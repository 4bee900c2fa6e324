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
	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kmsg"

	"github.com/outboxd/outboxd/internal/e2e"
	"github.com/outboxd/outboxd/internal/pgtest"
)

// httpGate stands in front of an HTTP destination: it forwards, answers 503
// while down, or holds every request until released.
type httpGate struct {
	URL  string
	down atomic.Bool
	mu   sync.Mutex
	hold chan struct{}
}

func newHTTPGate(t *testing.T, upstream string) *httpGate {
	target, err := url.Parse(upstream)
	require.NoError(t, err)
	proxy := httputil.NewSingleHostReverseProxy(target)
	g := &httpGate{}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		g.mu.Lock()
		hold := g.hold
		g.mu.Unlock()
		if hold != nil {
			select {
			case <-hold:
			case <-r.Context().Done():
				return
			}
		}
		if g.down.Load() {
			http.Error(w, "unavailable", http.StatusServiceUnavailable)
			return
		}
		proxy.ServeHTTP(w, r)
	}))
	t.Cleanup(srv.Close)
	t.Cleanup(g.release) // before the server closes: held requests end
	g.URL = srv.URL
	return g
}

// holdAll makes requests wait until release.
func (g *httpGate) holdAll() {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.hold = make(chan struct{})
}

func (g *httpGate) release() {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.hold != nil {
		close(g.hold)
		g.hold = nil
	}
}

// fanOutDestinations is one outboxd's OUTBOXD_SINKS=webhook,posthog,ga4,kafka
// (and nats, when asked) set up against the test destinations: PostHog and
// GA4 behind gates, Kafka with a switch that makes its broker refuse every
// produce, NATS an embedded JetStream server.
type fanOutDestinations struct {
	b           *bundle
	posthog     *httpGate
	ga4         *httpGate
	kafkaDown   atomic.Bool
	delivered   map[string]deliveredFunc
	destination []string
}

// newFourDestinations is webhook, PostHog, GA4 and Kafka.
func newFourDestinations(t *testing.T, extra map[string]string) *fanOutDestinations {
	return newDestinations(t, extra, false)
}

// newFiveDestinations adds NATS JetStream to the four.
func newFiveDestinations(t *testing.T, extra map[string]string) *fanOutDestinations {
	return newDestinations(t, extra, true)
}

func newDestinations(t *testing.T, extra map[string]string, withNATS bool) *fanOutDestinations {
	f := &fanOutDestinations{delivered: map[string]deliveredFunc{}, destination: []string{"webhook", "posthog", "ga4", "kafka"}}
	if withNATS {
		f.destination = append(f.destination, "nats")
	}
	// Quick retries of parked deliveries, and enough of them that an outage
	// as long as a test makes it (minutes on a loaded machine) parks and
	// never dead-letters: a dead letter leaves its row unprocessed.
	schedule := "200ms,400ms,800ms" + strings.Repeat(",1s", 300+int(testOutage(t)/time.Second))
	env := map[string]string{"OUTBOXD_SINKS": strings.Join(f.destination, ","), "OUTBOXD_RETRY_SCHEDULE": schedule}
	add := func(name string, e map[string]string, d deliveredFunc) {
		delete(e, "OUTBOXD_SINK")
		maps.Copy(env, e)
		f.delivered[name] = d
	}
	pe, pd := posthogCase(t)
	f.posthog = newHTTPGate(t, pe["OUTBOXD_POSTHOG_HOST"])
	pe["OUTBOXD_POSTHOG_HOST"] = f.posthog.URL
	// A held request must outlast the hold, not time out into a retry.
	pe["OUTBOXD_POSTHOG_TIMEOUT"] = "2m"
	add("posthog", pe, pd)
	ge, gd := ga4Case(t)
	f.ga4 = newHTTPGate(t, ge["OUTBOXD_GA4_ENDPOINT"])
	ge["OUTBOXD_GA4_ENDPOINT"] = f.ga4.URL
	add("ga4", ge, gd)
	ke, kd, c := kafkaCaseCluster(t)
	ke["OUTBOXD_KAFKA_MAX_ATTEMPTS"] = "2"
	c.ControlKey(int16(kmsg.Produce), func(kreq kmsg.Request) (kmsg.Response, error, bool) {
		c.KeepControl()
		if !f.kafkaDown.Load() {
			return nil, nil, false
		}
		req := kreq.(*kmsg.ProduceRequest)
		resp := req.ResponseKind().(*kmsg.ProduceResponse)
		for _, rt := range req.Topics {
			st := kmsg.NewProduceResponseTopic()
			st.Topic, st.TopicID = rt.Topic, rt.TopicID
			for _, rp := range rt.Partitions {
				sp := kmsg.NewProduceResponseTopicPartition()
				sp.Partition, sp.ErrorCode = rp.Partition, kerr.NotEnoughReplicas.Code
				st.Partitions = append(st.Partitions, sp)
			}
			resp.Topics = append(resp.Topics, st)
		}
		return resp, nil, true
	})
	add("kafka", ke, kd)
	if withNATS {
		ne, nd := natsCase(t)
		add("nats", ne, nd)
	}
	maps.Copy(env, extra)
	f.b = newBundle(t, pgtest.Shared(t), env)
	f.delivered["webhook"] = func(*testing.T, *e2e.Daemon, int) ([]int64, map[int64]int64) {
		var r received
		for _, d := range f.b.recv.Deliveries() {
			if d.Status/100 == 2 {
				for i, id := range d.IDs {
					r.add(id, d.Orgs[i])
				}
			}
		}
		return r.ids, r.orgs
	}
	return f
}

// has reports whether destination name has every id in want (Kafka's read
// waits for them itself, so it is asked only once the others have theirs).
func (f *fanOutDestinations) has(t *testing.T, d *e2e.Daemon, name string, want []int64) bool {
	got, _ := f.delivered[name](t, d, len(want))
	seen := map[int64]bool{}
	for _, id := range got {
		seen[id] = true
	}
	for _, id := range want {
		if !seen[id] {
			return false
		}
	}
	return true
}

// waitDelivered waits until each of names has every id in want.
func (f *fanOutDestinations) waitDelivered(t *testing.T, d *e2e.Daemon, want []int64, names ...string) {
	t.Helper()
	for _, name := range names {
		if name == "kafka" {
			f.delivered[name](t, d, len(want)) // polls until it has n events
			continue
		}
		e2e.WaitFor(t, time.Minute, func() bool { return f.has(t, d, name, want) },
			func() string { return name + " does not have every event" })
	}
}

// waitProcessedOrSay is bundle.waitProcessed whose failure says which rows
// are unprocessed and what is parked.
func waitProcessedOrSay(t *testing.T, b *bundle, n int64, stall time.Duration) {
	t.Helper()
	e2e.WaitProgress(t, stall, func() (bool, int64) {
		rows, _ := e2e.Processed(t, b.pool)
		return rows >= n, rows
	}, func() string {
		rows, _ := e2e.Processed(t, b.pool)
		var unprocessed []int64
		ctx := context.Background()
		_ = b.pool.QueryRow(ctx, `SELECT coalesce(array_agg(id ORDER BY id), '{}') FROM domain_event WHERE NOT is_processed`).Scan(&unprocessed)
		var parked, dead []string
		_ = b.pool.QueryRow(ctx, `SELECT coalesce(array_agg(target || ':' || event_id || ' (' || attempts || ', ' || next_attempt_at - now() || ', ' || coalesce(last_error, '') || ')' ORDER BY event_id), '{}') FROM outboxd_parked`).Scan(&parked)
		_ = b.pool.QueryRow(ctx, `SELECT coalesce(array_agg(sink || ':' || event_id ORDER BY event_id), '{}') FROM outboxd_dead_letter`).Scan(&dead)
		return fmt.Sprintf("%d of %d rows processed; unprocessed %v; parked %v; dead letters %v", rows, n, unprocessed, parked, dead)
	})
}

func deadLetters(t *testing.T, b *bundle) int {
	var n int
	require.NoError(t, b.pool.QueryRow(context.Background(), `SELECT count(*) FROM outboxd_dead_letter`).Scan(&n))
	return n
}

func parkedTargets(t *testing.T, b *bundle) map[string]int {
	rows, err := b.pool.Query(context.Background(), `SELECT target, count(*) FROM outboxd_parked GROUP BY target`)
	require.NoError(t, err)
	defer rows.Close()
	out := map[string]int{}
	for rows.Next() {
		var name string
		var n int
		require.NoError(t, rows.Scan(&name, &n))
		out[name] = n
	}
	require.NoError(t, rows.Err())
	return out
}

// One outboxd, five destinations of five kinds: each gets every event once,
// formatted by its own sink, in commit order per organization; a row is
// marked processed only once all five settled it (PostHog's answers are held
// while the other four have everything, and no row is processed until they
// are released).
func TestDestinationsFanOut(t *testing.T) {
	t.Parallel()
	f := newFiveDestinations(t, nil)
	b := f.b
	orgOf := func(i int) int64 { return int64(i%3) + 1 }
	f.posthog.holdAll()
	w := startWatched(t, b.env)
	d := w.Daemon
	ids := e2e.Insert(t, b.pool, 6, 10, orgOf)
	f.waitDelivered(t, d, ids, "webhook", "ga4", "kafka", "nats")
	rows, _ := e2e.Processed(t, b.pool)
	require.Zero(t, rows, "rows processed while PostHog had not answered")
	require.False(t, f.has(t, d, "posthog", ids[:1]), "PostHog answered while held")
	f.posthog.release()
	b.waitProcessed(t, int64(len(ids)), time.Minute)
	for _, name := range f.destination {
		got, orgs := f.delivered[name](t, d, len(ids))
		checkDelivered(t, ids, got, orgs)
	}
	// Each in its own format: PostHog's /batch/ body with its key, GA4's
	// /mp/collect with its secret, Kafka's key and message-id header, NATS's
	// subject and Nats-Msg-Id (their cases check them), Standard Webhooks
	// signatures on the webhook.
	require.Zero(t, b.recv.Count(ids).BadSignatures, "webhook requests with a bad signature")
	require.Empty(t, parkedTargets(t, b))
	// Each destination is its own target in the metrics' sink label.
	for _, name := range f.destination {
		require.Equal(t, float64(len(ids)), w.mustMetric(t, `outboxd_events_delivered_total{sink="`+name+`"}`), name)
	}
	require.Equal(t, 0, d.Stop(30*time.Second))
	require.NotContains(t, d.Log(), "unknown variable")
}

// One destination down for a long stretch while the others flow and the
// slot advances; it comes back: nothing lost anywhere, order per key kept at
// every destination, every row processed, and only the down destination
// parked anything.
func TestDestinationDownOthersFlow(t *testing.T) {
	t.Parallel()
	for _, down := range []string{"posthog", "kafka"} {
		t.Run(down, func(t *testing.T) {
			t.Parallel()
			f := newFourDestinations(t, nil)
			b := f.b
			setDown := func(v bool) {
				if down == "kafka" {
					f.kafkaDown.Store(v)
				} else {
					f.posthog.down.Store(v)
				}
			}
			orgOf := func(i int) int64 { return int64(i%3) + 1 }
			env := maps.Clone(b.env)
			env["OUTBOXD_BACKLOG_POLL_INTERVAL"] = "100ms"
			w := startWatched(t, env)
			d := w.Daemon
			ids := e2e.Insert(t, b.pool, 5, 4, orgOf)
			b.waitProcessed(t, int64(len(ids)), time.Minute)
			var up []string
			for _, name := range f.destination {
				if name != down {
					up = append(up, name)
				}
			}
			setDown(true)
			wentDown := time.Now()
			// Three rounds of events while it is down: each round reaches
			// the other three, and the slot moves past it.
			for round := range 5 {
				before := b.confirmedFlush(t)
				ids = append(ids, e2e.Insert(t, b.pool, 5, 4, orgOf)...)
				end := b.currentLSN(t)
				f.waitDelivered(t, d, ids, up...)
				e2e.WaitFor(t, time.Minute, func() bool { return b.confirmedFlush(t) >= end },
					func() string {
						return fmt.Sprintf("round %d: the slot did not advance past %s from %s", round, end, before)
					})
				parked := parkedTargets(t, b)
				require.Positive(t, parked[down], "nothing parked for the down destination")
				require.Len(t, parked, 1, "only the down destination parks: %v", parked)
				require.Zero(t, deadLetters(t, b), "dead letters during the outage")
				if round == 0 {
					// `outboxd status` counts per target, each destination
					// listed: the down one with its parked deliveries and a
					// lag, the others with none.
					code, out, errOut := opsRun(t, b.env, "status", "--json")
					require.Contains(t, []int{0, 1}, code, out+errOut)
					var st struct {
						Backlog struct {
							Targets []struct {
								Target      string  `json:"target"`
								Parked      int64   `json:"parked"`
								DeadLetters int64   `json:"dead_letters"`
								LagSeconds  float64 `json:"lag_seconds"`
							} `json:"targets"`
						} `json:"backlog"`
					}
					require.NoError(t, json.Unmarshal([]byte(out), &st), out)
					require.Len(t, st.Backlog.Targets, len(f.destination), out)
					for _, tc := range st.Backlog.Targets {
						if tc.Target == down {
							require.Positive(t, tc.Parked, out)
							require.Positive(t, tc.LagSeconds, out)
						} else {
							require.Contains(t, up, tc.Target)
							require.Zero(t, tc.Parked, out)
							require.Zero(t, tc.LagSeconds, out)
						}
					}
				}
			}
			// A long stretch: the down destination's parked deliveries have
			// been retried, and refused, five times on the schedule.
			maxRounds := func() int {
				var rounds int
				require.NoError(t, b.pool.QueryRow(context.Background(), `SELECT coalesce(max(rounds), 0) FROM outboxd_parked`).Scan(&rounds))
				return rounds
			}
			e2e.WaitFor(t, 2*time.Minute, func() bool { return maxRounds() >= 5 },
				func() string { return "parked deliveries not retried five times" })
			// OUTBOXD_TEST_OUTAGE stretches the outage (the ten
			// minutes): events keep coming, one round per retry of the
			// parked deliveries, and the others keep receiving them.
			for outage := testOutage(t); time.Since(wentDown) < outage; {
				r := maxRounds()
				ids = append(ids, e2e.Insert(t, b.pool, 5, 4, orgOf)...)
				f.waitDelivered(t, d, ids, up...)
				e2e.WaitFor(t, time.Minute, func() bool { return maxRounds() > r },
					func() string { return "parked deliveries no longer retried" })
				require.Zero(t, deadLetters(t, b), "dead letters during the outage")
			}
			slot := b.currentLSN(t)
			e2e.WaitFor(t, time.Minute, func() bool { return b.confirmedFlush(t) >= slot },
				func() string { return "the slot did not advance during the outage" })
			require.Zero(t, deadLetters(t, b), "dead letters during the outage")
			// The metrics count the down destination's parked deliveries.
			e2e.WaitFor(t, time.Minute, func() bool {
				v, err := w.metric(`outboxd_parked_deliveries{sink="` + down + `"}`)
				return err == nil && v > 0
			}, func() string { return "no parked deliveries in the metrics for " + down })
			e2e.WaitFor(t, time.Minute, func() bool {
				v, err := w.metric(`outboxd_parked_lag_seconds{sink="` + down + `"}`)
				return err == nil && v > 0
			}, func() string { return "no lag in the metrics for " + down })
			stretch := time.Since(wentDown)
			setDown(false)
			ids = append(ids, e2e.Insert(t, b.pool, 5, 4, orgOf)...)
			waitProcessedOrSay(t, b, int64(len(ids)), 2*time.Minute)
			for _, name := range up {
				got, orgs := f.delivered[name](t, d, len(ids))
				checkDelivered(t, ids, got, orgs)
			}
			got, orgs := f.delivered[down](t, d, len(ids))
			copies := checkAfterCrash(t, ids, got, orgs)
			t.Logf("%s down for %s: %d events, lost 0, %d copies at %s", down, stretch.Round(time.Millisecond), len(ids), copies, down)
			require.Empty(t, parkedTargets(t, b))
			require.Zero(t, deadLetters(t, b))
			require.Equal(t, 0, d.Stop(30*time.Second))
		})
	}
}

// Per-destination filters: PostHog takes only recipe_* events, GA4 only
// batch_*: the batch_started events never go to PostHog and never wait for
// it, though it is down the whole time.
func TestDestinationEventFilters(t *testing.T) {
	t.Parallel()
	f := newFourDestinations(t, map[string]string{"OUTBOXD_POSTHOG_EVENTS": "recipe_*", "OUTBOXD_GA4_EVENTS": "batch_*"})
	b := f.b
	f.posthog.down.Store(true)
	orgOf := func(i int) int64 { return int64(i%3) + 1 }
	d := e2e.StartDaemon(t, b.env)
	ids := e2e.Insert(t, b.pool, 5, 5, orgOf)
	b.waitProcessed(t, int64(len(ids)), time.Minute)
	for _, name := range []string{"webhook", "ga4", "kafka"} {
		got, orgs := f.delivered[name](t, d, len(ids))
		checkDelivered(t, ids, got, orgs)
	}
	got, _ := f.delivered["posthog"](t, d, 0)
	require.Empty(t, got, "PostHog got events outside its filter")
	require.Empty(t, parkedTargets(t, b))
	require.Equal(t, 0, d.Stop(30*time.Second))
}

// kill -9 of outboxd in the middle of a fan-out to five destinations, events
// still coming: after a restart every destination has every event, first
// receipts in commit order per organization, and copies only of events not
// yet confirmed when it died.
func TestDestinationsSurviveKill9(t *testing.T) {
	t.Parallel()
	f := newFiveDestinations(t, nil)
	b := f.b
	orgOf := func(i int) int64 { return int64(i%3) + 1 }
	d := e2e.StartDaemon(t, b.env)
	stop := e2e.InsertUntilStopped(b.pool, 3, orgOf)
	b.waitProcessed(t, 60, time.Minute)
	d.Kill()
	// What was confirmed when it died: processed rows, never sent again.
	confirmed := map[int64]bool{}
	rs, err := b.pool.Query(context.Background(), `SELECT id FROM domain_event WHERE is_processed`)
	require.NoError(t, err)
	for rs.Next() {
		var id int64
		require.NoError(t, rs.Scan(&id))
		confirmed[id] = true
	}
	require.NoError(t, rs.Err())
	d2 := e2e.StartDaemon(t, b.env)
	ids := stop()
	b.waitProcessed(t, int64(len(ids)), 2*time.Minute)
	var report []string
	for _, name := range f.destination {
		got, orgs := f.delivered[name](t, d2, len(ids))
		copies := checkAfterCrash(t, ids, got, orgs)
		seen := map[int64]int{}
		for _, id := range got {
			seen[id]++
			if seen[id] > 1 {
				require.False(t, confirmed[id], "%s: event %d confirmed before the kill and sent again", name, id)
			}
		}
		report = append(report, fmt.Sprintf("%s=%d", name, copies))
	}
	t.Logf("kill -9 mid fan-out: %d events (%d confirmed at the kill), lost 0, copies per destination: %s",
		len(ids), len(confirmed), strings.Join(report, " "))
	require.Equal(t, 0, d2.Stop(30*time.Second))
}

// Bad OUTBOXD_SINKS configurations exit 2 at start, naming the variable.
func TestDestinationConfigErrors(t *testing.T) {
	t.Parallel()
	base := e2e.Env("postgres://outboxd@127.0.0.1:1/db", "slot", "http://127.0.0.1:1/", map[string]string{"OUTBOXD_HTTP_ADDR": ""})
	for _, tt := range []struct {
		env  map[string]string
		want string
	}{
		{map[string]string{"OUTBOXD_SINKS": "webhook,carrier-pigeon"}, "OUTBOXD_SINKS: unknown sink \"carrier-pigeon\""},
		{map[string]string{"OUTBOXD_SINKS": "webhook,posthog,webhook"}, "OUTBOXD_SINKS: \"webhook\" is listed twice"},
		{map[string]string{"OUTBOXD_SINKS": "webhook, PostHog ,posthog"}, "OUTBOXD_SINKS: \"posthog\" is listed twice"},
		{map[string]string{"OUTBOXD_SINKS": "webhook,,posthog"}, "OUTBOXD_SINKS: "},
		{map[string]string{"OUTBOXD_SINK": "webhook", "OUTBOXD_SINKS": "webhook,posthog"}, "OUTBOXD_SINK and OUTBOXD_SINKS: both are set"},
		{map[string]string{"OUTBOXD_SINKS": "posthog", "OUTBOXD_POSTHOG_CONCURRENCY": "0"}, "OUTBOXD_POSTHOG_CONCURRENCY: "},
		{map[string]string{"OUTBOXD_SINKS": "ga4", "OUTBOXD_GA4_BATCH_SIZE": "many"}, "OUTBOXD_GA4_BATCH_SIZE: "},
		{map[string]string{"OUTBOXD_SINKS": "kafka", "OUTBOXD_KAFKA_BATCH_WAIT": "-1s"}, "OUTBOXD_KAFKA_BATCH_WAIT: "},
		{map[string]string{"OUTBOXD_SINKS": "nats", "OUTBOXD_NATS_EVENTS": "a[b"}, "OUTBOXD_NATS_EVENTS: "},
		// With OUTBOXD_SINK the per-destination variables would be unused.
		{map[string]string{"OUTBOXD_SINK": "posthog", "OUTBOXD_POSTHOG_EVENTS": "recipe_*"}, "OUTBOXD_POSTHOG_EVENTS: applies only to"},
		// The webhook among them needs its URL and secret, as alone.
		{map[string]string{"OUTBOXD_SINKS": "posthog,webhook", "OUTBOXD_WEBHOOK_URL": ""}, "OUTBOXD_WEBHOOK_URL: "},
		{map[string]string{"OUTBOXD_SINKS": "posthog,webhook", "OUTBOXD_WEBHOOK_SECRET": ""}, "OUTBOXD_WEBHOOK_SECRET: "},
		// Each kind's own settings are checked as with OUTBOXD_SINK.
		{map[string]string{"OUTBOXD_SINKS": "webhook,posthog"}, "OUTBOXD_POSTHOG_PROJECT_API_KEY: "},
	} {
		env := maps.Clone(base)
		maps.Copy(env, tt.env)
		code, out := e2e.RunCommand(t, env, "run")
		require.Equal(t, 2, code, "%v: %s", tt.env, out)
		require.Contains(t, out, tt.want, "%v", tt.env)
	}
}

// The per-destination variables are known (no "unknown variable" warning,
// no near-miss refusal), and a misspelling of one is refused.
func TestDestinationVariablesAreKnown(t *testing.T) {
	t.Parallel()
	_, warnings, err := loadConfig(map[string]string{"OUTBOXD_SINKS": "webhook,posthog,ga4,kafka,nats,stdout",
		"OUTBOXD_POSTHOG_EVENTS": "a", "OUTBOXD_GA4_CONCURRENCY": "2", "OUTBOXD_KAFKA_BATCH_SIZE": "10",
		"OUTBOXD_NATS_BATCH_WAIT": "1s", "OUTBOXD_STDOUT_EVENTS": "b"})
	require.NoError(t, err)
	require.Empty(t, warnings)
	require.Error(t, checkNearMisses(map[string]string{"OUTBOXD_POSTHOG_EVENT": "a"}))

	c, _, err := loadConfig(map[string]string{"OUTBOXD_SINKS": "ga4, webhook"})
	require.NoError(t, err)
	require.Equal(t, []string{"ga4", "webhook"}, c.targetNames())
	c, _, err = loadConfig(map[string]string{"OUTBOXD_SINK": "posthog"})
	require.NoError(t, err)
	require.Equal(t, []string{"webhook"}, c.targetNames(), "OUTBOXD_SINK keeps the name its parked rows have")

	// Unset, a destination's settings are the webhook's.
	c, _, err = loadConfig(map[string]string{"OUTBOXD_SINKS": "webhook,posthog", "OUTBOXD_WEBHOOK_CONCURRENCY": "3",
		"OUTBOXD_WEBHOOK_BATCH_SIZE": "7", "OUTBOXD_WEBHOOK_BATCH_WAIT": "50ms", "OUTBOXD_POSTHOG_BATCH_SIZE": "100"})
	require.NoError(t, err)
	specs, err := c.destinations(map[string]string{"OUTBOXD_POSTHOG_BATCH_SIZE": "100"})
	require.NoError(t, err)
	require.Len(t, specs, 2)
	require.Equal(t, "webhook", specs[0].Name)
	require.Equal(t, []int{3, 7}, []int{specs[0].Concurrency, specs[0].BatchSize})
	require.Equal(t, "posthog", specs[1].Name)
	require.Equal(t, []int{3, 100}, []int{specs[1].Concurrency, specs[1].BatchSize})
	require.Equal(t, 50*time.Millisecond, specs[1].BatchWait)
}

// replay with OUTBOXD_SINKS: --destination names the destination (required
// when several are listed), which gets only its OUTBOXD_<KIND>_EVENTS.
func TestReplayToADestination(t *testing.T) {
	t.Parallel()
	db := newOpsDB(t)
	ids := db.insert(t, 3, "batch_started", 3, time.Now())
	db.insert(t, 2, "recipe_saved", 3, time.Now())
	db.exec(t, `UPDATE domain_event SET is_processed = true, processed_at = now()`)

	path := filepath.Join(t.TempDir(), "replay.jsonl")
	env := maps.Clone(db.env)
	env["OUTBOXD_SINKS"], env["OUTBOXD_STDOUT_PATH"], env["OUTBOXD_STDOUT_EVENTS"] = "webhook,stdout", path, "batch_*"
	code, out, errOut := opsRun(t, env, "replay")
	require.Equal(t, 2, code, out+errOut)
	require.Contains(t, errOut, "OUTBOXD_SINKS lists webhook, stdout: name the one to replay to with --destination")
	code, out, errOut = opsRun(t, env, "replay", "--destination", "kafka")
	require.Equal(t, 2, code, out+errOut)
	require.Contains(t, errOut, `--destination "kafka" is not one of OUTBOXD_SINKS (webhook, stdout)`)
	code, out, errOut = opsRun(t, env, "replay", "--destination", "stdout", "--webhook-url", db.recv.URL)
	require.Equal(t, 2, code, out+errOut)

	code, out, errOut = opsRun(t, env, "replay", "--destination", "stdout")
	require.Equal(t, 0, code, out+errOut)
	require.Contains(t, out, "the stdout sink")
	require.Contains(t, out, "replayed 3, failed 0")
	data, err := os.ReadFile(path)
	require.NoError(t, err)
	var got []int64
	for line := range strings.SplitSeq(strings.TrimSpace(string(data)), "\n") {
		var env struct{ ID int64 }
		require.NoError(t, json.Unmarshal([]byte(line), &env), line)
		got = append(got, env.ID)
	}
	require.Equal(t, ids, got, "only the events of the destination's filter, in id order")

	// --destination with OUTBOXD_SINK is a usage error.
	single := maps.Clone(db.env)
	code, out, errOut = opsRun(t, single, "replay", "--destination", "webhook", "--dry-run")
	require.Equal(t, 2, code, out+errOut)
}

// testOutage is how long TestDestinationDownOthersFlow keeps a destination
// down beyond its five retries: OUTBOXD_TEST_OUTAGE (a duration), none by
// default.
func testOutage(t *testing.T) time.Duration {
	v := os.Getenv("OUTBOXD_TEST_OUTAGE")
	if v == "" {
		return 0
	}
	d, err := time.ParseDuration(v)
	require.NoError(t, err, "OUTBOXD_TEST_OUTAGE")
	return d
}
