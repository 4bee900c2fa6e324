package main

import (
	"bufio"
	"context"
	"encoding/json"
	"io"
	"maps"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"
	"github.com/stretchr/testify/require"
	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/kmsg"

	"github.com/outboxd/outboxd/decode"
	"github.com/outboxd/outboxd/internal/e2e"
	"github.com/outboxd/outboxd/internal/pgtest"
	"github.com/outboxd/outboxd/sink"
)

// received is what a destination got: event ids in arrival order, with the
// organization each came with.
type received struct {
	mu   sync.Mutex
	ids  []int64
	orgs map[int64]int64
}

func (r *received) add(id, org int64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.orgs == nil {
		r.orgs = map[int64]int64{}
	}
	r.ids = append(r.ids, id)
	r.orgs[id] = org
}

// envelopeIDs reads id and organization_id from envelope JSON.
func envelopeIDs(t *testing.T, body []byte) (id, org int64) {
	t.Helper()
	var env struct {
		ID    int64  `json:"id"`
		Org   int64  `json:"organization_id"`
		Name  string `json:"event_name"`
		Props struct {
			Seq int `json:"seq"`
		} `json:"properties"`
	}
	require.NoError(t, json.Unmarshal(body, &env), string(body))
	require.Equal(t, "batch_started", env.Name)
	require.Positive(t, env.Props.Seq)
	return env.ID, env.Org
}

// checkMessageID asserts that got is the message id of event id: the form of
// docs/DESIGN.md §4 (evt_<namespace>_<id>_<occurred_at>), the exact value
// being checked by the webhook tests against the database's namespace.
func checkMessageID(t *testing.T, id int64, got string) {
	t.Helper()
	require.Regexp(t, `^evt_[0-9a-f]{16}_`+strconv.FormatInt(id, 10)+`_[0-9a-z]+$`, got, "message id of event %d", id)
}

// checkDelivered asserts every id arrived exactly once and, per
// organization, in commit order (ids ascend within an organization: each
// transaction commits before the next starts).
func checkDelivered(t *testing.T, want []int64, got []int64, orgs map[int64]int64) {
	t.Helper()
	seen := map[int64]int{}
	for _, id := range got {
		seen[id]++
	}
	for _, id := range want {
		require.Equal(t, 1, seen[id], "event %d delivered %d times", id, seen[id])
	}
	require.Len(t, got, len(want), "nothing else delivered")
	last := map[int64]int64{}
	for _, id := range got {
		o := orgs[id]
		require.Greater(t, id, last[o], "organization %d out of commit order", o)
		last[o] = id
	}
}

// deliveredFunc reads back the n events that reached a destination: ids in
// arrival order (per key for Kafka), and the organization of each.
type deliveredFunc func(t *testing.T, d *e2e.Daemon, n int) ([]int64, map[int64]int64)

// sinkCase is one non-webhook sink run end to end: setup starts the
// destination and returns the sink's variables.
type sinkCase struct {
	name  string
	setup func(t *testing.T) (map[string]string, deliveredFunc)
}

func stdoutFileCase(t *testing.T) (map[string]string, deliveredFunc) {
	path := filepath.Join(t.TempDir(), "events.jsonl")
	return map[string]string{"OUTBOXD_SINK": "stdout", "OUTBOXD_STDOUT_PATH": path},
		func(t *testing.T, _ *e2e.Daemon, _ int) ([]int64, map[int64]int64) {
			f, err := os.Open(path)
			require.NoError(t, err)
			defer f.Close()
			var r received
			sc := bufio.NewScanner(f)
			for sc.Scan() {
				r.add(envelopeIDs(t, sc.Bytes()))
			}
			require.NoError(t, sc.Err())
			return r.ids, r.orgs
		}
}

// stdoutCase reads the daemon's standard output, which the harness merges
// with its JSON log lines: events are the lines without a "level".
func stdoutCase(*testing.T) (map[string]string, deliveredFunc) {
	return map[string]string{"OUTBOXD_SINK": "stdout"},
		func(t *testing.T, d *e2e.Daemon, _ int) ([]int64, map[int64]int64) {
			var r received
			for line := range strings.SplitSeq(d.Log(), "\n") {
				var probe map[string]json.RawMessage
				if json.Unmarshal([]byte(line), &probe) != nil || probe["level"] != nil {
					continue
				}
				r.add(envelopeIDs(t, []byte(line)))
			}
			return r.ids, r.orgs
		}
}

func kafkaCase(t *testing.T) (map[string]string, deliveredFunc) {
	extra, delivered, _ := kafkaCaseCluster(t)
	return extra, delivered
}

// kafkaCaseCluster is kafkaCase with its cluster, for tests that control it.
func kafkaCaseCluster(t *testing.T) (map[string]string, deliveredFunc, *kfake.Cluster) {
	c, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.SeedTopics(3, "events.batch_started"))
	require.NoError(t, err)
	t.Cleanup(c.Close)
	return map[string]string{
			"OUTBOXD_SINK": "kafka", "OUTBOXD_KAFKA_BROKERS": strings.Join(c.ListenAddrs(), ","),
			"OUTBOXD_KAFKA_TOPIC": "events.{event_name}", "OUTBOXD_KAFKA_BACKOFF_MAX": "100ms",
		}, func(t *testing.T, _ *e2e.Daemon, n int) ([]int64, map[int64]int64) {
			cl, err := kgo.NewClient(kgo.SeedBrokers(c.ListenAddrs()...), kgo.ConsumeTopics("events.batch_started"),
				kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()))
			require.NoError(t, err)
			defer cl.Close()
			// Order holds per partition, which is per key: read partition
			// by partition.
			byPart := map[int32][]*kgo.Record{}
			ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
			defer cancel()
			// n distinct events (copies after a crash come on top).
			distinct := map[string]bool{}
			for len(distinct) < n {
				fs := cl.PollRecords(ctx, 1000)
				require.NoError(t, ctx.Err(), "%d of %d events", len(distinct), n)
				for _, rec := range fs.Records() {
					byPart[rec.Partition] = append(byPart[rec.Partition], rec)
					distinct[string(rec.Value)] = true
				}
			}
			var r received
			for _, recs := range byPart {
				for _, rec := range recs {
					id, org := envelopeIDs(t, rec.Value)
					require.Equal(t, strconv.FormatInt(org, 10), string(rec.Key), "key = organization")
					mid := ""
					for _, h := range rec.Headers {
						if h.Key == sink.HeaderMessageID {
							mid = string(h.Value)
						}
					}
					checkMessageID(t, id, mid)
					r.add(id, org)
				}
			}
			return r.ids, r.orgs
		}, c
}

func natsCase(t *testing.T) (map[string]string, deliveredFunc) {
	extra, delivered, _ := natsCaseServer(t)
	return extra, delivered
}

// natsCaseServer is natsCase with its server, for tests that put something
// in front of it.
func natsCaseServer(t *testing.T) (map[string]string, deliveredFunc, *server.Server) {
	s, err := server.NewServer(&server.Options{Host: "127.0.0.1", Port: -1, NoLog: true, NoSigs: true,
		JetStream: true, StoreDir: t.TempDir()})
	require.NoError(t, err)
	s.Start()
	require.True(t, s.ReadyForConnections(10*time.Second))
	t.Cleanup(func() { s.Shutdown(); s.WaitForShutdown() })
	return map[string]string{
			"OUTBOXD_SINK": "nats", "OUTBOXD_NATS_URL": s.ClientURL(), "OUTBOXD_NATS_STREAM": "EVENTS",
			"OUTBOXD_NATS_BACKOFF_MAX": "100ms",
		}, func(t *testing.T, _ *e2e.Daemon, n int) ([]int64, map[int64]int64) {
			nc, err := nats.Connect(s.ClientURL())
			require.NoError(t, err)
			defer nc.Close()
			js, err := jetstream.New(nc)
			require.NoError(t, err)
			stream, err := js.Stream(t.Context(), "EVENTS")
			require.NoError(t, err)
			info, err := stream.Info(t.Context())
			require.NoError(t, err)
			var r received
			for seq := info.State.FirstSeq; seq <= info.State.LastSeq && info.State.Msgs > 0; seq++ {
				m, err := stream.GetMsg(t.Context(), seq)
				require.NoError(t, err)
				require.Equal(t, "events.batch_started", m.Subject)
				id, org := envelopeIDs(t, m.Data)
				checkMessageID(t, id, m.Header.Get("Nats-Msg-Id"))
				require.Equal(t, m.Header.Get("Nats-Msg-Id"), m.Header.Get(sink.HeaderMessageID))
				require.Equal(t, strconv.FormatInt(id, 10), m.Header.Get(sink.HeaderEventID))
				r.add(id, org)
			}
			return r.ids, r.orgs
		}, s
}

func posthogCase(t *testing.T) (map[string]string, deliveredFunc) {
	var r received
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		var body struct {
			APIKey string `json:"api_key"`
			Batch  []struct {
				Event      string `json:"event"`
				DistinctID string `json:"distinct_id"`
				Properties struct {
					ID     int64             `json:"outboxd_event_id"`
					Groups map[string]string `json:"$groups"`
				} `json:"properties"`
			} `json:"batch"`
		}
		if req.URL.Path != "/batch/" || json.NewDecoder(req.Body).Decode(&body) != nil || body.APIKey != "phc_e2e" {
			http.Error(w, "bad request", http.StatusBadRequest)
			return
		}
		for _, ev := range body.Batch {
			if ev.Event != "batch_started" || ev.DistinctID != "3" {
				http.Error(w, "bad event", http.StatusBadRequest)
				return
			}
			org, _ := strconv.ParseInt(ev.Properties.Groups["organization"], 10, 64)
			r.add(ev.Properties.ID, org)
		}
		_, _ = io.WriteString(w, `{"status":1}`)
	}))
	t.Cleanup(srv.Close)
	return map[string]string{
			"OUTBOXD_SINK": "posthog", "OUTBOXD_POSTHOG_HOST": srv.URL,
			"OUTBOXD_POSTHOG_PROJECT_API_KEY": "phc_e2e", "OUTBOXD_POSTHOG_BACKOFF_MAX": "100ms",
		}, func(*testing.T, *e2e.Daemon, int) ([]int64, map[int64]int64) {
			r.mu.Lock()
			defer r.mu.Unlock()
			return append([]int64(nil), r.ids...), r.orgs
		}
}

// ga4Case stands in for GA4's collection endpoint: it checks the URL's
// measurement id and API secret and each event, and records the ids.
func ga4Case(t *testing.T) (map[string]string, deliveredFunc) {
	var r received
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		var body struct {
			ClientID string `json:"client_id"`
			UserID   string `json:"user_id"`
			Events   []struct {
				Name   string `json:"name"`
				Params struct {
					ID  int64 `json:"outboxd_event_id"`
					Org int64 `json:"organization_id"`
					Seq int   `json:"seq"`
				} `json:"params"`
			} `json:"events"`
		}
		q := req.URL.Query()
		if req.URL.Path != "/mp/collect" || q.Get("measurement_id") != "G-E2E0001" || q.Get("api_secret") != "ga4-e2e-secret" ||
			json.NewDecoder(req.Body).Decode(&body) != nil || body.UserID != "3" || body.ClientID == "" {
			http.Error(w, "bad request", http.StatusBadRequest)
			return
		}
		for _, ev := range body.Events {
			if ev.Name != "batch_started" || ev.Params.Seq <= 0 {
				http.Error(w, "bad event", http.StatusBadRequest)
				return
			}
			r.add(ev.Params.ID, ev.Params.Org)
		}
		w.WriteHeader(http.StatusNoContent)
	}))
	t.Cleanup(srv.Close)
	return map[string]string{
			"OUTBOXD_SINK": "ga4", "OUTBOXD_GA4_ENDPOINT": srv.URL, "GOOGLE_ANALYTICS_MEASUREMENT_ID": "G-E2E0001",
			"OUTBOXD_GA4_API_SECRET": "ga4-e2e-secret", "OUTBOXD_GA4_BACKOFF_MAX": "100ms",
		}, func(*testing.T, *e2e.Daemon, int) ([]int64, map[int64]int64) {
			r.mu.Lock()
			defer r.mu.Unlock()
			return append([]int64(nil), r.ids...), r.orgs
		}
}

// otherSinks are the sinks other than the webhook whose destination a test
// can read back whatever the daemon (stdout into a file, not the daemon's
// own standard output).
func otherSinks() []sinkCase {
	return []sinkCase{
		{name: "stdout-file", setup: stdoutFileCase},
		{name: "kafka", setup: kafkaCase},
		{name: "nats", setup: natsCase},
		{name: "posthog", setup: posthogCase},
		{name: "ga4", setup: ga4Case},
	}
}

// TestSinksEndToEnd runs the binary with each sink other than the webhook
// against the test Postgres: every row is delivered once, in commit order
// per organization, and marked processed only once the destination has it.
func TestSinksEndToEnd(t *testing.T) {
	t.Parallel()
	for _, sc := range append(otherSinks(), sinkCase{name: "stdout", setup: stdoutCase}) {
		t.Run(sc.name, func(t *testing.T) {
			t.Parallel()
			extra, delivered := sc.setup(t)
			b := newBundle(t, pgtest.Shared(t), extra)
			d := e2e.StartDaemon(t, b.env)
			orgOf := func(i int) int64 { return int64(i%3) + 1 }
			ids := e2e.Insert(t, b.pool, 4, 10, orgOf)
			b.waitProcessed(t, int64(len(ids)), time.Minute)
			// Processed means acknowledged: everything is at the
			// destination already, no waiting.
			got, orgs := delivered(t, d, len(ids))
			checkDelivered(t, ids, got, orgs)
			rows, attempts := e2e.Processed(t, b.pool)
			require.Equal(t, int64(len(ids)), rows)
			require.Equal(t, int64(len(ids)), attempts, "one attempt each")
			require.Equal(t, 0, d.Stop(30*time.Second))
			require.NotContains(t, d.Log(), "unknown variable", "the sink's variables are known")
		})
	}
}

// Bad sink configuration exits with code 2 and a message naming the
// variable; secrets stay out of it.
func TestSinkConfigErrorsNameTheVariable(t *testing.T) {
	t.Parallel()
	base := e2e.Env("postgres://outboxd@127.0.0.1:1/db", "slot", "http://127.0.0.1:1/", nil)
	for _, tt := range []struct {
		env  map[string]string
		want string
	}{
		{map[string]string{"OUTBOXD_SINK": "carrier-pigeon"}, "OUTBOXD_SINK"},
		{map[string]string{"OUTBOXD_SINK": "stdout", "OUTBOXD_STDOUT_MAX_ATTEMPTS": "many"}, "OUTBOXD_STDOUT_MAX_ATTEMPTS"},
		{map[string]string{"OUTBOXD_SINK": "stdout", "OUTBOXD_STDOUT_PATH": "/nonexistent-dir/x.jsonl"}, "OUTBOXD_STDOUT_PATH"},
		{map[string]string{"OUTBOXD_SINK": "kafka", "OUTBOXD_KAFKA_TOPIC": "t"}, "OUTBOXD_KAFKA_BROKERS"},
		{map[string]string{"OUTBOXD_SINK": "kafka", "OUTBOXD_KAFKA_BROKERS": "b:9092", "OUTBOXD_KAFKA_TOPIC": "events.{name}"}, "OUTBOXD_KAFKA_TOPIC"},
		{map[string]string{"OUTBOXD_SINK": "kafka", "OUTBOXD_KAFKA_BROKERS": "b:9092", "OUTBOXD_KAFKA_TOPIC": "t",
			"OUTBOXD_KAFKA_SASL_MECHANISM": "plain", "OUTBOXD_KAFKA_SASL_USERNAME": "u"}, "OUTBOXD_KAFKA_SASL_PASSWORD"},
		{map[string]string{"OUTBOXD_SINK": "kafka", "OUTBOXD_KAFKA_BROKERS": "b:9092", "OUTBOXD_KAFKA_TOPIC": "t",
			"OUTBOXD_KAFKA_TIMEOUT": "0s"}, "OUTBOXD_KAFKA_TIMEOUT"},
		{map[string]string{"OUTBOXD_SINK": "kafka", "OUTBOXD_KAFKA_BROKERS": "b:9092", "OUTBOXD_KAFKA_TOPIC": "t",
			"OUTBOXD_KAFKA_TLS_CA_FILE": "/nonexistent/ca.pem"}, "OUTBOXD_KAFKA_TLS_CA_FILE"},
		{map[string]string{"OUTBOXD_SINK": "kafka", "OUTBOXD_KAFKA_BROKERS": "b:9092", "OUTBOXD_KAFKA_TOPIC": "t",
			"OUTBOXD_KAFKA_TLS_KEY_FILE": "/nonexistent/key.pem"}, "OUTBOXD_KAFKA_TLS_CERT_FILE"},
		{map[string]string{"OUTBOXD_SINK": "kafka", "OUTBOXD_KAFKA_BROKERS": "b:9092", "OUTBOXD_KAFKA_TOPIC": "t",
			"OUTBOXD_KAFKA_MAX_RECORD_BYTES": "10"}, "OUTBOXD_KAFKA_MAX_RECORD_BYTES"},
		{map[string]string{"OUTBOXD_SINK": "nats"}, "OUTBOXD_NATS_URL"},
		{map[string]string{"OUTBOXD_SINK": "nats", "OUTBOXD_NATS_URL": "nats://u:pw-s3cret@127.0.0.1:1", "OUTBOXD_NATS_SUBJECT": "a..b"}, "OUTBOXD_NATS_SUBJECT"},
		{map[string]string{"OUTBOXD_SINK": "posthog"}, "OUTBOXD_POSTHOG_PROJECT_API_KEY"},
		{map[string]string{"OUTBOXD_SINK": "posthog", "OUTBOXD_POSTHOG_PROJECT_API_KEY": "phc_s3cret", "OUTBOXD_POSTHOG_HOST": "ftp://x"}, "OUTBOXD_POSTHOG_HOST"},
		{map[string]string{"OUTBOXD_SINK": "posthog", "OUTBOXD_POSTHOG_PROJECT_API_KEY": "phc_s3cret", "OUTBOXD_POSTHOG_MAX_ATTEMPTS": "0"}, "OUTBOXD_POSTHOG_MAX_ATTEMPTS"},
		{map[string]string{"OUTBOXD_SINK": "posthog", "OUTBOXD_POSTHOG_PROJECT_API_KEY": "phc_s3cret", "OUTBOXD_POSTHOG_PERSON_PROPERTIES": "email,$set"}, "OUTBOXD_POSTHOG_PERSON_PROPERTIES"},
		{map[string]string{"OUTBOXD_SINK": "posthog", "OUTBOXD_POSTHOG_PROJECT_API_KEY": "phc_s3cret", "OUTBOXD_POSTHOG_GROUP_PROPERTIES": "name,,plan"}, "OUTBOXD_POSTHOG_GROUP_PROPERTIES"},
		{map[string]string{"OUTBOXD_SINK": "posthog", "OUTBOXD_POSTHOG_PROJECT_API_KEY": "phc_s3cret", "OUTBOXD_POSTHOG_GROUP_IDENTIFY": "maybe"}, "OUTBOXD_POSTHOG_GROUP_IDENTIFY"},
		{map[string]string{"OUTBOXD_SINK": "ga4", "OUTBOXD_GA4_API_SECRET": "s3cret"}, "OUTBOXD_GA4_MEASUREMENT_ID"},
		{map[string]string{"OUTBOXD_SINK": "ga4", "GOOGLE_ANALYTICS_MEASUREMENT_ID": "UA-123-1", "OUTBOXD_GA4_API_SECRET": "s3cret"}, "OUTBOXD_GA4_MEASUREMENT_ID"},
		{map[string]string{"OUTBOXD_SINK": "ga4", "OUTBOXD_GA4_MEASUREMENT_ID": "G-ABC123"}, "OUTBOXD_GA4_API_SECRET"},
		{map[string]string{"OUTBOXD_SINK": "ga4", "OUTBOXD_GA4_MEASUREMENT_ID": "G-ABC123", "OUTBOXD_GA4_API_SECRET": "s3cret",
			"OUTBOXD_GA4_ENDPOINT": "ftp://x"}, "OUTBOXD_GA4_ENDPOINT"},
		{map[string]string{"OUTBOXD_SINK": "ga4", "OUTBOXD_GA4_MEASUREMENT_ID": "G-ABC123", "OUTBOXD_GA4_API_SECRET": "s3cret",
			"OUTBOXD_GA4_TIMEOUT": "0s"}, "OUTBOXD_GA4_TIMEOUT"},
	} {
		env := map[string]string{}
		for k, v := range base {
			env[k] = v
		}
		for k, v := range tt.env {
			env[k] = v
		}
		code, out := e2e.RunCommand(t, env, "run")
		require.Equal(t, 2, code, "%v: %s", tt.env, out)
		require.Contains(t, out, tt.want+":", "%v", tt.env)
		require.NotContains(t, out, "s3cret")
	}
}

// A destination that cannot be reached at start is a runtime failure (exit
// 1), not bad configuration.
func TestSinkUnreachableAtStartExitsOne(t *testing.T) {
	t.Parallel()
	addr := e2e.FreeAddr(t)
	for _, tt := range []struct {
		extra map[string]string
		want  string
	}{
		{map[string]string{"OUTBOXD_SINK": "nats", "OUTBOXD_NATS_URL": "nats://" + addr, "OUTBOXD_NATS_TIMEOUT": "1s"},
			`nats sink "nats": connect to nats://` + addr},
		{map[string]string{"OUTBOXD_SINK": "kafka", "OUTBOXD_KAFKA_BROKERS": addr, "OUTBOXD_KAFKA_TOPIC": "t", "OUTBOXD_KAFKA_TIMEOUT": "1s"},
			`kafka sink "kafka": reach brokers`},
	} {
		code, out := e2e.RunCommand(t, e2e.Env("postgres://outboxd@127.0.0.1:1/db", "slot", "http://127.0.0.1:1/", tt.extra), "run")
		require.Equal(t, 1, code, out)
		require.Contains(t, out, tt.want)
	}
}

func TestKnownSinksAndVariables(t *testing.T) {
	t.Parallel()
	for _, k := range []string{"stdout", "kafka", "nats", "posthog", "ga4"} {
		require.True(t, knownSink(k), k)
	}
	require.False(t, knownSink("webhook"), "the webhook is built by the pipeline itself")
	require.False(t, knownSink("smtp"))
	for _, v := range []string{"OUTBOXD_STDOUT_PATH", "OUTBOXD_KAFKA_BROKERS", "OUTBOXD_KAFKA_SASL_PASSWORD",
		"OUTBOXD_NATS_SUBJECT", "OUTBOXD_NATS_STREAM", "OUTBOXD_POSTHOG_PROJECT_API_KEY", "OUTBOXD_POSTHOG_HOST", "OUTBOXD_POSTHOG_PERSON_PROPERTIES", "OUTBOXD_POSTHOG_GROUP_PROPERTIES", "OUTBOXD_POSTHOG_GROUP_IDENTIFY",
		"OUTBOXD_GA4_MEASUREMENT_ID", "OUTBOXD_GA4_API_SECRET", "OUTBOXD_GA4_ENDPOINT", "OUTBOXD_GA4_CLIENT_ID_PROPERTY", "OUTBOXD_GA4_CLIENT_ID_KEY"} {
		require.True(t, sinkVar(v), v)
	}
	require.False(t, sinkVar("OUTBOXD_KAFKA_BROKER"))
	require.False(t, sinkVar("POSTHOG_PROJECT_API_KEY"), "not OUTBOXD_: never warned about anyway")
	require.True(t, passthroughVar("POSTHOG_PROJECT_API_KEY"))
	require.True(t, passthroughVar("POSTHOG_HOST"))
	require.True(t, passthroughVar("GOOGLE_ANALYTICS_MEASUREMENT_ID"))
	require.False(t, passthroughVar("HOME"))

	_, warnings, err := loadConfig(map[string]string{"OUTBOXD_SINK": "kafka", "OUTBOXD_KAFKA_TOPIC": "t", "OUTBOXD_KAFKA_TOPC": "x"})
	require.NoError(t, err)
	require.Equal(t, []string{"unknown variable OUTBOXD_KAFKA_TOPC ignored"}, warnings)
}

// The PostHog key and host are read from the names the product already uses,
// or their OUTBOXD_ forms, which win.
func TestPostHogVariables(t *testing.T) {
	t.Parallel()
	var mu sync.Mutex
	keys := map[string]int{}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var body struct {
			APIKey string `json:"api_key"`
		}
		_ = json.NewDecoder(r.Body).Decode(&body)
		mu.Lock()
		keys[body.APIKey]++
		mu.Unlock()
	}))
	t.Cleanup(srv.Close)
	ev := &decode.Event{ID: 1, Name: "e", Body: []byte(`{"id":1,"event_name":"e"}`)}
	for _, tt := range []struct {
		env  map[string]string
		want string
	}{
		{map[string]string{"POSTHOG_PROJECT_API_KEY": "plain", "POSTHOG_HOST": srv.URL}, "plain"},
		{map[string]string{"POSTHOG_PROJECT_API_KEY": "plain", "OUTBOXD_POSTHOG_PROJECT_API_KEY": "prefixed",
			"POSTHOG_HOST": "https://us.i.posthog.com", "OUTBOXD_POSTHOG_HOST": srv.URL}, "prefixed"},
	} {
		tt.env["OUTBOXD_ALLOW_PRIVATE_SINKS"] = "true"
		s, err := buildSink("posthog", tt.env, zerolog.Nop())
		require.NoError(t, err)
		require.NoError(t, s.Deliver(t.Context(), []*decode.Event{ev})[0].Err)
		s.Close()
		mu.Lock()
		require.Equal(t, 1, keys[tt.want], "key %s used", tt.want)
		mu.Unlock()
	}
	// Without OUTBOXD_ALLOW_PRIVATE_SINKS a loopback host is refused.
	s, err := buildSink("posthog", map[string]string{"POSTHOG_PROJECT_API_KEY": "k", "POSTHOG_HOST": srv.URL}, zerolog.Nop())
	require.NoError(t, err)
	defer s.Close()
	require.ErrorIs(t, s.Deliver(t.Context(), []*decode.Event{ev})[0].Err, sink.ErrForbiddenAddress)
}

// The GA4 measurement id is read from the name the product already uses,
// or its OUTBOXD_ form, which wins.
func TestGA4Variables(t *testing.T) {
	t.Parallel()
	var mu sync.Mutex
	ids := map[string]int{}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		ids[r.URL.Query().Get("measurement_id")]++
		mu.Unlock()
		w.WriteHeader(http.StatusNoContent)
	}))
	t.Cleanup(srv.Close)
	ev := &decode.Event{ID: 1, Name: "e", Body: []byte(`{"id":1,"event_name":"e"}`)}
	for _, tt := range []struct {
		env  map[string]string
		want string
	}{
		{map[string]string{"GOOGLE_ANALYTICS_MEASUREMENT_ID": "G-PLAIN"}, "G-PLAIN"},
		{map[string]string{"GOOGLE_ANALYTICS_MEASUREMENT_ID": "G-PLAIN", "OUTBOXD_GA4_MEASUREMENT_ID": "G-PREFIXED"}, "G-PREFIXED"},
	} {
		tt.env["OUTBOXD_GA4_API_SECRET"] = "secret"
		tt.env["OUTBOXD_GA4_ENDPOINT"] = srv.URL
		tt.env["OUTBOXD_ALLOW_PRIVATE_SINKS"] = "true"
		s, err := buildSink("ga4", tt.env, zerolog.Nop())
		require.NoError(t, err)
		require.NoError(t, s.Deliver(t.Context(), []*decode.Event{ev})[0].Err)
		s.Close()
		mu.Lock()
		require.Equal(t, 1, ids[tt.want], "measurement id %s used", tt.want)
		mu.Unlock()
	}
	// Without OUTBOXD_ALLOW_PRIVATE_SINKS a loopback endpoint is refused.
	s, err := buildSink("ga4", map[string]string{"GOOGLE_ANALYTICS_MEASUREMENT_ID": "G-X1", "OUTBOXD_GA4_API_SECRET": "k", "OUTBOXD_GA4_ENDPOINT": srv.URL}, zerolog.Nop())
	require.NoError(t, err)
	defer s.Close()
	require.ErrorIs(t, s.Deliver(t.Context(), []*decode.Event{ev})[0].Err, sink.ErrForbiddenAddress)
}

// The stdout sink piped into a program that exits: outboxd keeps running,
// says so, and marks nothing. It used to die of SIGPIPE without a word.
func TestStdoutSinkBrokenPipe(t *testing.T) {
	t.Parallel()
	b := newBundle(t, pgtest.Shared(t), map[string]string{"OUTBOXD_SINK": "stdout", "OUTBOXD_STDOUT_MAX_ATTEMPTS": "2"})
	r, w, err := os.Pipe()
	require.NoError(t, err)
	require.NoError(t, r.Close()) // the reader is gone before the first line
	logf, err := os.CreateTemp("", "outboxd-pipe-log-*.txt")
	require.NoError(t, err)
	t.Cleanup(func() { os.Remove(logf.Name()) })
	cmd := exec.Command(e2e.Binary(t), "run")
	cmd.Env = []string{"PATH=" + os.Getenv("PATH"), "HOME=" + os.Getenv("HOME")}
	for k, v := range b.env {
		cmd.Env = append(cmd.Env, k+"="+v)
	}
	cmd.Stdout, cmd.Stderr = w, logf
	require.NoError(t, cmd.Start())
	require.NoError(t, w.Close())
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() { _ = cmd.Process.Kill() })
	logText := func() string { out, _ := os.ReadFile(logf.Name()); return string(out) }

	ids := e2e.Insert(t, b.pool, 1, 3, func(int) int64 { return 1 })
	e2e.WaitFor(t, time.Minute, func() bool {
		select {
		case err := <-exited:
			exited <- err
			return true
		default:
			return strings.Contains(logText(), "broken pipe")
		}
	}, func() string { return "no word of the broken pipe:\n" + logText() })
	select {
	case err := <-exited:
		t.Fatalf("outboxd ended (%v); log:\n%s", err, logText())
	default:
	}
	require.Contains(t, logText(), "output closed by its reader")
	require.NoError(t, cmd.Process.Signal(syscall.SIGTERM))
	select {
	case <-exited:
	case <-time.After(time.Minute):
		t.Fatal("outboxd did not stop on SIGTERM")
	}
	rows, _ := e2e.Processed(t, b.pool)
	require.Zero(t, rows, "nothing written, nothing marked (%d rows inserted)", len(ids))
}

// checkAfterCrash checks what a destination got across a crash: every event
// at least once, and first receipts in commit order per organization (a copy
// is the unconfirmed window at work, G4).
func checkAfterCrash(t *testing.T, want []int64, got []int64, orgs map[int64]int64) (copies int) {
	t.Helper()
	seen := map[int64]int{}
	last := map[int64]int64{}
	for _, id := range got {
		seen[id]++
		if seen[id] > 1 {
			copies++
			continue
		}
		o := orgs[id]
		require.Greater(t, id, last[o], "organization %d: first receipts out of commit order", o)
		last[o] = id
	}
	for _, id := range want {
		require.Positive(t, seen[id], "event %d lost", id)
	}
	return copies
}

// Each sink other than the webhook through a kill -9 of outboxd while
// events keep coming: nothing lost, first receipts in commit order per
// organization, copies only for what was sent and not yet recorded.
func TestSinksSurviveKill9(t *testing.T) {
	t.Parallel()
	eachOtherSink(t, func(t *testing.T, name string, b *bundle, delivered deliveredFunc) {
		orgOf := func(i int) int64 { return int64(i%3) + 1 }
		d := e2e.StartDaemon(t, b.env)
		stop := e2e.InsertUntilStopped(b.pool, 3, orgOf)
		b.waitProcessed(t, 60, time.Minute)
		d.Kill()
		d2 := e2e.StartDaemon(t, b.env)
		ids := stop()
		b.waitProcessed(t, int64(len(ids)), time.Minute)
		got, orgs := delivered(t, d2, len(ids))
		copies := checkAfterCrash(t, ids, got, orgs)
		t.Logf("%s: %d events through a kill -9, %d copies", name, len(ids), copies)
		require.Equal(t, 0, d2.Stop(30*time.Second))
	})
}

// eachOtherSink runs f in parallel for each sink but the webhook, with a
// migrated database whose daemon environment uses that sink.
func eachOtherSink(t *testing.T, f func(t *testing.T, name string, b *bundle, delivered deliveredFunc)) {
	for _, sc := range otherSinks() {
		t.Run(sc.name, func(t *testing.T) {
			t.Parallel()
			extra, delivered := sc.setup(t)
			f(t, sc.name, newBundle(t, pgtest.Shared(t), extra), delivered)
		})
	}
}

// A destination that refuses for a while (PostHog answering 503, GA4 429, a
// Kafka broker answering NOT_ENOUGH_REPLICAS) while events keep coming: they park
// and go out once it recovers, nothing lost, first receipts in commit order
// per organization, every row processed.
func TestSinksThroughADestinationOutage(t *testing.T) {
	t.Parallel()
	type outageCase struct {
		name  string
		setup func(t *testing.T, down *atomic.Bool) (map[string]string, deliveredFunc)
	}
	for _, oc := range []outageCase{
		{"posthog", func(t *testing.T, down *atomic.Bool) (map[string]string, deliveredFunc) {
			extra, delivered := posthogCase(t)
			// Put a gate in front of the case's server.
			target, err := url.Parse(extra["OUTBOXD_POSTHOG_HOST"])
			require.NoError(t, err)
			proxy := httputil.NewSingleHostReverseProxy(target)
			gate := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				if down.Load() {
					http.Error(w, "unavailable", http.StatusServiceUnavailable)
					return
				}
				proxy.ServeHTTP(w, r)
			}))
			t.Cleanup(gate.Close)
			extra["OUTBOXD_POSTHOG_HOST"] = gate.URL
			return extra, delivered
		}},
		{"ga4", func(t *testing.T, down *atomic.Bool) (map[string]string, deliveredFunc) {
			extra, delivered := ga4Case(t)
			target, err := url.Parse(extra["OUTBOXD_GA4_ENDPOINT"])
			require.NoError(t, err)
			proxy := httputil.NewSingleHostReverseProxy(target)
			gate := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				if down.Load() {
					w.Header().Set("Retry-After", "0")
					http.Error(w, "too many requests", http.StatusTooManyRequests)
					return
				}
				proxy.ServeHTTP(w, r)
			}))
			t.Cleanup(gate.Close)
			extra["OUTBOXD_GA4_ENDPOINT"] = gate.URL
			return extra, delivered
		}},
		{"nats", func(t *testing.T, down *atomic.Bool) (map[string]string, deliveredFunc) {
			extra, delivered, s := natsCaseServer(t)
			// A gate in front of the server: while down, it drops every
			// connection and accepts none.
			addr := s.Addr().(*net.TCPAddr).String()
			extra["OUTBOXD_NATS_URL"] = "nats://" + tcpGate(t, addr, down)
			return extra, delivered
		}},
		{"kafka", func(t *testing.T, down *atomic.Bool) (map[string]string, deliveredFunc) {
			extra, delivered, c := kafkaCaseCluster(t)
			extra["OUTBOXD_KAFKA_MAX_ATTEMPTS"] = "2"
			c.ControlKey(int16(kmsg.Produce), func(kreq kmsg.Request) (kmsg.Response, error, bool) {
				c.KeepControl()
				if !down.Load() {
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
			return extra, delivered
		}},
	} {
		t.Run(oc.name, func(t *testing.T) {
			t.Parallel()
			var down atomic.Bool
			extra, delivered := oc.setup(t, &down)
			extra["OUTBOXD_RETRY_SCHEDULE"] = "200ms,400ms,800ms"
			b := newBundle(t, pgtest.Shared(t), extra)
			orgOf := func(i int) int64 { return int64(i%3) + 1 }
			d := e2e.StartDaemon(t, b.env)
			ids := e2e.Insert(t, b.pool, 5, 4, orgOf)
			b.waitProcessed(t, int64(len(ids)), time.Minute)
			down.Store(true)
			ids = append(ids, e2e.Insert(t, b.pool, 10, 4, orgOf)...)
			e2e.WaitFor(t, time.Minute, func() bool {
				var parked int
				return b.pool.QueryRow(context.Background(), `SELECT count(*) FROM outboxd_parked`).Scan(&parked) == nil && parked > 0
			}, func() string { return "nothing parked while the destination refused" })
			down.Store(false)
			ids = append(ids, e2e.Insert(t, b.pool, 5, 4, orgOf)...)
			b.waitProcessed(t, int64(len(ids)), time.Minute)
			got, orgs := delivered(t, d, len(ids))
			copies := checkAfterCrash(t, ids, got, orgs)
			t.Logf("%s: %d events through an outage, %d copies", oc.name, len(ids), copies)
			require.Equal(t, 0, d.Stop(30*time.Second))
		})
	}
}

// Each sink other than the webhook while every connection outboxd holds to
// PostgreSQL (replication stream and pool) is cut, three times, with events
// coming: nothing lost, first receipts in commit order per organization,
// copies only for what was sent and not yet recorded.
func TestSinksThroughPostgresCuts(t *testing.T) {
	t.Parallel()
	eachOtherSink(t, func(t *testing.T, name string, b *bundle, delivered deliveredFunc) {
		u, err := url.Parse(b.env["OUTBOXD_DATABASE_URL"])
		require.NoError(t, err)
		var down atomic.Bool
		g := newGate(t, u.Host, &down)
		u.Host = g.addr
		env := maps.Clone(b.env)
		env["OUTBOXD_DATABASE_URL"] = u.String()
		orgOf := func(i int) int64 { return int64(i%3) + 1 }
		d := e2e.StartDaemon(t, env)
		stop := e2e.InsertUntilStopped(b.pool, 3, orgOf)
		cuts := 0
		for i := range 3 {
			// Cut once outboxd has made progress since the last cut.
			rows, _ := e2e.Processed(t, b.pool)
			b.waitProcessed(t, rows+30, time.Minute)
			n := g.cut()
			require.Positive(t, n, "cut %d: outboxd held no connection", i)
			cuts += n
		}
		ids := stop()
		b.waitProcessed(t, int64(len(ids)), time.Minute)
		got, orgs := delivered(t, d, len(ids))
		copies := checkAfterCrash(t, ids, got, orgs)
		t.Logf("%s: %d events through 3 cuts (%d connections), %d copies", name, len(ids), cuts, copies)
		require.Equal(t, 0, d.Stop(30*time.Second))
	})
}

// tcpGate forwards connections to addr while down is false; when down, it
// closes the connections it carries and every new one. It returns its
// address.
func tcpGate(t *testing.T, addr string, down *atomic.Bool) string {
	return newGate(t, addr, down).addr
}

// gate is a TCP forwarder a test can cut.
type gate struct {
	addr string
	mu   sync.Mutex
	open []net.Conn
}

func newGate(t *testing.T, addr string, down *atomic.Bool) *gate {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	t.Cleanup(func() { l.Close() })
	g := &gate{addr: l.Addr().String()}
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			if down.Load() {
				c.Close()
				continue
			}
			up, err := net.Dial("tcp", addr)
			if err != nil {
				c.Close()
				continue
			}
			g.mu.Lock()
			g.open = append(g.open, c, up)
			g.mu.Unlock()
			// Nothing passes once down, not even on a connection the
			// ticker below has not cut yet: a fast machine delivered every
			// event of an "outage" in the 20 ms before the cut.
			pipe := func(dst, src net.Conn) {
				defer dst.Close()
				defer src.Close()
				buf := make([]byte, 32<<10)
				for {
					n, err := src.Read(buf)
					if n > 0 && (down.Load() || func() bool { _, werr := dst.Write(buf[:n]); return werr != nil }()) {
						return
					}
					if err != nil {
						return
					}
				}
			}
			go pipe(up, c)
			go pipe(c, up)
		}
	}()
	go func() {
		tick := time.NewTicker(20 * time.Millisecond)
		defer tick.Stop()
		for range tick.C {
			if down.Load() {
				g.cut()
			}
			if t.Context().Err() != nil {
				return
			}
		}
	}()
	return g
}

// cut closes every connection the gate carries (both ends) and returns how
// many client connections it cut; new connections are still accepted.
func (g *gate) cut() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	for _, c := range g.open {
		c.Close()
	}
	n := len(g.open) / 2
	g.open = nil
	return n
}
