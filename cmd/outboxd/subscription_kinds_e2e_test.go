package main

import (
	"context"
	"strings"
	"sync/atomic"

	"os"
	"path/filepath"
	"regexp"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/stretchr/testify/require"

	"github.com/outboxd/outboxd/internal/e2e"
	"github.com/outboxd/outboxd/internal/pgtest"
)

// A subscription of each kind (webhook, PostHog, GA4, Kafka, NATS), added
// with `outboxd subscription add --kind` while the daemon streams, survives
// a kill -9 (its kind and settings come back from the routing state), and
// is removed by an SQL DELETE: each gets exactly the events committed
// between its insert and its delete, in commit order per organization,
// formatted by its own sink (the cases check the bodies, keys and headers).
// PostHog's key comes from an OUTBOXD_SECRET_ variable and GA4's secret
// from a file of OUTBOXD_SECRETS_DIR: the rows hold only references; the
// daemon's own PostHog key is never used for a subscription.
func TestSubscriptionOfEachKindAddedAndRemovedMidStream(t *testing.T) {
	t.Parallel()
	pe, pd := posthogCase(t)
	ge, gd := ga4Case(t)
	ke, kd, _ := kafkaCaseCluster(t)
	ne, nd, _ := natsCaseServer(t)
	secrets := t.TempDir()
	require.NoError(t, os.WriteFile(filepath.Join(secrets, "PLATFORM_ga4-secret"), []byte("ga4-e2e-secret\n"), 0o600))
	// Subscriptions choose subjects under the prefix; the operator's stream
	// captures them.
	nc, err := nats.Connect(ne["OUTBOXD_NATS_URL"])
	require.NoError(t, err)
	js, err := jetstream.New(nc)
	require.NoError(t, err)
	_, err = js.CreateStream(t.Context(), jetstream.StreamConfig{Name: "EVENTS", Subjects: []string{"events.>"}})
	require.NoError(t, err)
	nc.Close()
	b := newBundle(t, pgtest.Shared(t), map[string]string{
		"OUTBOXD_SECRET_PLATFORM_PH":          "phc_e2e",
		"OUTBOXD_SECRET_ORG_8_PH":             "phc_other_tenant",
		"OUTBOXD_SUBSCRIPTION_TOPIC_PREFIX":   "events.",
		"OUTBOXD_POSTHOG_PROJECT_API_KEY":     "phc_daemon_own",
		"OUTBOXD_SECRETS_DIR":                 secrets,
		"OUTBOXD_KAFKA_BROKERS":               ke["OUTBOXD_KAFKA_BROKERS"],
		"OUTBOXD_KAFKA_BACKOFF_MAX":           "100ms",
		"OUTBOXD_NATS_URL":                    ne["OUTBOXD_NATS_URL"],
		"OUTBOXD_NATS_BACKOFF_MAX":            "100ms",
		"OUTBOXD_ALLOW_PRIVATE_SUBSCRIPTIONS": "true",
		"OUTBOXD_RETRY_SCHEDULE":              "200ms,400ms,800ms,1s,1s,1s,1s,1s,1s,1s,1s,1s,1s,1s,1s,1s,1s,1s,1s,1s",
	})
	ctx := context.Background()
	orgOf := func(i int) int64 { return int64(i%3) + 1 }
	d := startWatched(t, b.env).Daemon
	waitStreaming(t, d)
	before := e2e.Insert(t, b.pool, 2, 2, orgOf)

	// Refused before anything is stored: a secret's value, an unknown
	// setting, a reference to a variable that is not a subscription secret.
	for _, bad := range []struct {
		args []string
		want string
	}{
		{[]string{"--kind", "posthog", "--setting", "PROJECT_API_KEY=phc_x"}, "setting PROJECT_API_KEY is a secret: give PROJECT_API_KEY_ENV"},
		{[]string{"--kind", "kafka", "--setting", "BROKERS=10.0.0.1:9092"}, "setting BROKERS is not one of a kafka subscription's (TOPIC)"},
		{[]string{"--kind", "posthog", "--setting", "PROJECT_API_KEY_ENV=OUTBOXD_DATABASE_URL"}, "name a variable OUTBOXD_SECRET_PLATFORM_<NAME>"},
		{[]string{"--kind", "posthog", "--setting", "PROJECT_API_KEY_ENV=OUTBOXD_SECRET_ORG_8_PH"}, "only its own organization's secrets"},
		{[]string{"--kind", "posthog", "--organization", "7", "--setting", "PROJECT_API_KEY_ENV=OUTBOXD_SECRET_ORG_8_PH"}, "name a variable OUTBOXD_SECRET_ORG_7_<NAME>"},
		{[]string{"--kind", "ga4", "--setting", "API_SECRET_FILE=../etc/passwd", "--setting", "MEASUREMENT_ID=G-1"}, "a name, not a path"},
		{[]string{"--kind", "ga4", "--setting", "API_SECRET_FILE=outboxd_mask_key", "--setting", "MEASUREMENT_ID=G-1"}, "name a file PLATFORM_<name>"},
		{[]string{"--kind", "ga4", "--setting", "MEASUREMENT_ID=G-1"}, "a ga4 subscription needs API_SECRET_ENV or API_SECRET_FILE"},
		{[]string{"--kind", "nats", "--setting", "SUBJECT=$JS.API.STREAM.DELETE.EVENTS"}, `does not start with OUTBOXD_SUBSCRIPTION_TOPIC_PREFIX "events."`},
		{[]string{"--kind", "nats", "--setting", "STREAM=EVENTS", "--setting", "SUBJECT=events.x"}, "setting STREAM is not one of a nats subscription's (SUBJECT)"},
		{[]string{"--kind", "kafka", "--setting", "TOPIC=events.{organization_id}"}, "{organization_id} is not a placeholder"},
		{[]string{"--kind", "smtp"}, `kind "smtp"`},
	} {
		code, out := e2e.RunCommand(t, b.env, append([]string{"subscription", "add"}, bad.args...)...)
		require.Equal(t, 2, code, out)
		require.Contains(t, out, bad.want)
	}
	// The table refuses an inline secret written by SQL too.
	_, err = b.pool.Exec(ctx, `INSERT INTO outboxd_subscription (url, kind, settings) VALUES ('', 'posthog', '{"PROJECT_API_KEY":"phc_x"}')`)
	require.ErrorContains(t, err, "outboxd_subscription_settings_check")

	subRecv := e2e.NewReceiver(t)
	secretFile := filepath.Join(t.TempDir(), "sub.secret")
	require.NoError(t, os.WriteFile(secretFile, []byte(e2e.Secret), 0o600))
	add := func(args ...string) string {
		t.Helper()
		code, out := e2e.RunCommand(t, b.env, append([]string{"subscription", "add", "--events", "batch_*"}, args...)...)
		require.Equal(t, 0, code, out)
		m := regexp.MustCompile(`subscription (\d+) added`).FindStringSubmatch(out)
		require.NotNil(t, m, out)
		return m[1]
	}
	add("--url", subRecv.URL, "--secret-file", secretFile)
	add("--kind", "posthog", "--setting", "HOST="+pe["OUTBOXD_POSTHOG_HOST"], "--setting", "PROJECT_API_KEY_ENV=OUTBOXD_SECRET_PLATFORM_PH")
	add("--kind", "ga4", "--setting", "MEASUREMENT_ID=G-E2E0001", "--setting", "ENDPOINT="+ge["OUTBOXD_GA4_ENDPOINT"],
		"--setting", "API_SECRET_FILE=PLATFORM_ga4-secret")
	add("--kind", "kafka", "--setting", "TOPIC=events.{event_name}")
	add("--kind", "nats", "--setting", "SUBJECT=events.{event_name}")
	code, out := e2e.RunCommand(t, b.env, "subscription", "list")
	require.Equal(t, 0, code, out)
	require.Contains(t, out, "PROJECT_API_KEY_ENV=OUTBOXD_SECRET_PLATFORM_PH")
	require.NotContains(t, out, "phc_e2e")

	during := e2e.Insert(t, b.pool, 4, 3, orgOf)
	// Killed mid-stream, restarted: the subscriptions come back from the
	// routing state with their kinds and settings.
	waitProcessedOrSay(t, b, int64(len(before)+len(during)), time.Minute)
	d.Kill()
	during = append(during, e2e.Insert(t, b.pool, 2, 3, orgOf)...)
	d = startWatched(t, b.env).Daemon
	waitProcessedOrSay(t, b, int64(len(before)+len(during)), time.Minute)
	during = append(during, e2e.Insert(t, b.pool, 2, 3, orgOf)...)

	_, err = b.pool.Exec(ctx, `DELETE FROM outboxd_subscription`)
	require.NoError(t, err)
	after := e2e.Insert(t, b.pool, 2, 2, orgOf)
	all := int64(len(before) + len(during) + len(after))
	waitProcessedOrSay(t, b, all, time.Minute)

	webhookSub := func(*testing.T, *e2e.Daemon, int) ([]int64, map[int64]int64) {
		var r received
		for _, dl := range subRecv.Deliveries() {
			if dl.Status/100 == 2 {
				for i, id := range dl.IDs {
					r.add(id, dl.Orgs[i])
				}
			}
		}
		return r.ids, r.orgs
	}
	for name, got := range map[string]deliveredFunc{"webhook": webhookSub, "posthog": pd, "ga4": gd, "kafka": kd, "nats": nd} {
		ids, orgs := got(t, d, len(during))
		t.Run(name, func(t *testing.T) { checkDelivered(t, during, ids, orgs) })
	}
	require.Zero(t, subRecv.Count(during).BadSignatures)
	require.Empty(t, parkedTargets(t, b))
	require.Zero(t, deadLetters(t, b))
	require.NotContains(t, d.Log(), "phc_e2e")
	require.NotContains(t, d.Log(), "ga4-e2e-secret")
	require.NotContains(t, d.Log(), "unknown variable", "OUTBOXD_SECRET_* are read by reference")
	require.Equal(t, 0, d.Stop(30*time.Second), d.Log())
}

// A Kafka subscription whose brokers do not answer when its sink is first
// built: its events park (a broker that does not answer may come back), they
// are not dead-lettered, and the routing of the other targets goes on; once
// the brokers answer, a retry builds the sink and delivers them, in order.
func TestKafkaSubscriptionBuiltOnceTheBrokersAnswer(t *testing.T) {
	t.Parallel()
	ke, kd, c := kafkaCaseCluster(t)
	var down atomic.Bool
	down.Store(true)
	seed := newGate(t, c.ListenAddrs()[0], &down)
	b := newBundle(t, pgtest.Shared(t), map[string]string{
		"OUTBOXD_KAFKA_BROKERS":             seed.addr,
		"OUTBOXD_KAFKA_TIMEOUT":             "2s",
		"OUTBOXD_KAFKA_BACKOFF_MAX":         ke["OUTBOXD_KAFKA_BACKOFF_MAX"],
		"OUTBOXD_SUBSCRIPTION_TOPIC_PREFIX": "events.",
		"OUTBOXD_RETRY_SCHEDULE":            "200ms,400ms,800ms" + strings.Repeat(",1s", 120),
	})
	orgOf := func(i int) int64 { return int64(i%3) + 1 }
	d := startWatched(t, b.env).Daemon
	waitStreaming(t, d)
	code, out := e2e.RunCommand(t, b.env, "subscription", "add", "--kind", "kafka", "--setting", "TOPIC=events.{event_name}")
	require.Equal(t, 0, code, out)
	ids := e2e.Insert(t, b.pool, 4, 3, orgOf)
	// The default webhook gets them all meanwhile; the subscription parks.
	b.recv.WaitAccepted(t, ids, time.Minute)
	e2e.WaitFor(t, time.Minute, func() bool { return parkedTargets(t, b)["subscription:1"] > 0 },
		func() string { return "nothing parked for the subscription: " + d.Log() })
	require.Zero(t, deadLetters(t, b), "a broker that does not answer is not the row's fault")
	require.Contains(t, d.Log(), "subscription sink not ready; its events are parked and retried")

	down.Store(false)
	waitProcessedOrSay(t, b, int64(len(ids)), time.Minute)
	got, orgs := kd(t, d, len(ids))
	checkDelivered(t, ids, got, orgs)
	require.Zero(t, deadLetters(t, b))

	// replay --subscription goes through the same kind of sink.
	code, out = e2e.RunCommand(t, b.env, "replay", "--subscription", "1", "--dry-run")
	require.Equal(t, 0, code, out)
	require.Contains(t, out, "nothing was sent to subscription 1 (kafka)")
	code, out = e2e.RunCommand(t, b.env, "replay", "--subscription", "1")
	require.Equal(t, 0, code, out)
	require.Contains(t, out, "replay to subscription 1 (kafka): 12 events matched")
	require.Contains(t, out, "replayed 12, failed 0")
	require.Equal(t, 0, d.Stop(30*time.Second), d.Log())
}
