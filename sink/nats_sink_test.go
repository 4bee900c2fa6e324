package sink_test

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"
	"github.com/stretchr/testify/require"

	"github.com/outboxd/outboxd/decode"
	"github.com/outboxd/outboxd/sink"
	"github.com/outboxd/outboxd/sink/sinktest"
)

// newNATSServer starts an embedded NATS server on loopback, with JetStream
// (its store in a temp dir) when withJS, shut down at cleanup.
func newNATSServer(t *testing.T, withJS bool, tweak ...func(*server.Options)) *server.Server {
	t.Helper()
	opts := &server.Options{Host: "127.0.0.1", Port: -1, NoLog: true, NoSigs: true}
	if withJS {
		opts.JetStream = true
		opts.StoreDir = t.TempDir()
	}
	for _, f := range tweak {
		f(opts)
	}
	s, err := server.NewServer(opts)
	require.NoError(t, err)
	s.Start()
	require.True(t, s.ReadyForConnections(10*time.Second), "nats server ready")
	t.Cleanup(func() {
		s.Shutdown()
		s.WaitForShutdown()
	})
	return s
}

func fastNATS(url, subject string) sink.NATSConfig {
	return sink.NATSConfig{
		Name: "nats-test", URL: url, Subject: subject,
		Timeout: 5 * time.Second, RetryConfig: sink.RetryConfig{MaxAttempts: 4, BackoffMin: time.Millisecond, BackoffMax: 5 * time.Millisecond},
	}
}

func newNATS(t *testing.T, cfg sink.NATSConfig, log zerolog.Logger) *sink.NATS {
	t.Helper()
	n, err := sink.NewNATS(t.Context(), cfg, log)
	require.NoError(t, err)
	t.Cleanup(n.Close)
	return n
}

func connect(t *testing.T, s *server.Server) *nats.Conn {
	t.Helper()
	nc, err := nats.Connect(s.ClientURL())
	require.NoError(t, err)
	t.Cleanup(nc.Close)
	return nc
}

// fakeJetStream answers publishes on subjects like a JetStream stream would,
// per answer: a PubAck, a 503 API error (retryable) or a 400 "message size
// exceeds maximum" API error (permanent).
func fakeJetStream(t *testing.T, nc *nats.Conn, subjects string, answer func(ids []int64) sinktest.Response) {
	t.Helper()
	var seq sync.Mutex
	n := 0
	_, err := nc.Subscribe(subjects, func(m *nats.Msg) {
		go func() {
			ids, err := sinktest.IDsFromJSON(m.Data)
			if err != nil {
				t.Errorf("decode message: %v", err)
				return
			}
			if got := m.Header.Get("Nats-Msg-Id"); got != sinktest.MessageID(ids[0]) {
				t.Errorf("Nats-Msg-Id %q, want the message id of event %d", got, ids[0])
			}
			var reply string
			switch answer(ids) {
			case sinktest.Ack:
				seq.Lock()
				n++
				reply = fmt.Sprintf(`{"stream":"FAKE","seq":%d}`, n)
				seq.Unlock()
			case sinktest.FailPermanent:
				reply = `{"error":{"code":400,"err_code":10054,"description":"message size exceeds maximum allowed"}}`
			default:
				reply = `{"error":{"code":503,"err_code":10008,"description":"JetStream system temporarily unavailable"}}`
			}
			_ = m.Respond([]byte(reply))
		}()
	})
	require.NoError(t, err)
	require.NoError(t, nc.Flush())
}

// TestNATSConformance runs the shared suite against the NATS sink, with a
// responder on a real (embedded) server standing in for JetStream, so that
// the receiver decides each PubAck.
func TestNATSConformance(t *testing.T) {
	t.Parallel()
	srv := newNATSServer(t, false)
	sinktest.Run(t, func(t *testing.T, rcv *sinktest.Receiver) sink.Sink {
		// One subject per sink: the suite's subtests run in parallel.
		prefix := "c" + strings.NewReplacer("/", "_", " ", "_").Replace(t.Name())
		nc := connect(t, srv)
		fakeJetStream(t, nc, prefix+".>", func(ids []int64) sinktest.Response {
			return rcv.Receive(context.Background(), ids)
		})
		return newNATS(t, fastNATS(srv.ClientURL(), prefix+".{event_name}"), zerolog.Nop())
	}, sinktest.InOrder())
}

// natsNS is the message namespace of the events natsEvent makes.
const natsNS = "0a1b2c3d4e5f6789"

func natsEvent(id int64, name string) *decode.Event {
	return natsEventIn(natsNS, id, name)
}

// natsEventIn makes an event with row id id in the outbox of namespace ns.
func natsEventIn(ns string, id int64, name string) *decode.Event {
	at := time.Date(2026, 11, 26, 10, 0, 0, 0, time.UTC)
	return &decode.Event{ID: id, Name: name, OccurredAt: at, MessageID: decode.MessageID(ns, id, at),
		Body: fmt.Appendf(nil, `{"id":%d,"event_name":%q,"organization_id":7}`, id, name)}
}

func TestNATSJetStreamDeliversAndDeduplicates(t *testing.T) {
	t.Parallel()
	srv := newNATSServer(t, true)
	var logs syncBuffer
	cfg := fastNATS(srv.ClientURL(), "events.{event_name}")
	cfg.Stream = "EVENTS"
	n := newNATS(t, cfg, zerolog.New(&logs).Level(zerolog.DebugLevel))

	js, err := jetstream.New(connect(t, srv))
	require.NoError(t, err)
	stream, err := js.Stream(t.Context(), "EVENTS")
	require.NoError(t, err, "the sink created the stream")
	require.Equal(t, []string{"events.*"}, stream.CachedInfo().Config.Subjects)

	evs := []*decode.Event{natsEvent(1, "batch_started"), natsEvent(2, "inventory adjusted.v2"), natsEvent(3, "batch_started")}
	evs[0].Traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
	out := n.Deliver(sink.WithHeader(t.Context(), "webhook-replay", "true"), evs)
	for _, o := range out {
		require.NoError(t, o.Err)
		require.Equal(t, 1, o.Attempts)
	}
	wantSubjects := []string{"events.batch_started", "events.inventory_adjusted_v2", "events.batch_started"}
	for i, ev := range evs {
		m, err := stream.GetMsg(t.Context(), uint64(i+1))
		require.NoError(t, err)
		require.Equal(t, wantSubjects[i], m.Subject, "in order, subject from the template")
		require.Equal(t, string(ev.Body), string(m.Data))
		require.Equal(t, ev.MessageID, m.Header.Get("Nats-Msg-Id"), "the message id, which the stream deduplicates on")
		require.Equal(t, ev.MessageID, m.Header.Get(sink.HeaderMessageID))
		require.Equal(t, strconv.FormatInt(ev.ID, 10), m.Header.Get(sink.HeaderEventID), "the row id, as the body's")
		require.Equal(t, ev.Name, m.Header.Get(sink.HeaderEventName))
		require.Equal(t, "application/json", m.Header.Get("Content-Type"))
		require.Equal(t, "true", m.Header.Get("webhook-replay"))
		require.Equal(t, ev.Traceparent, m.Header.Get(sink.HeaderTraceparent))
	}

	// A redelivery (after a crash, say) is acknowledged and dropped by the
	// stream: PubAck.Duplicate.
	out = n.Deliver(t.Context(), evs[:1])
	require.NoError(t, out[0].Err)
	info, err := stream.Info(t.Context())
	require.NoError(t, err)
	require.Equal(t, uint64(3), info.State.Msgs, "the duplicate is not stored")
	require.Contains(t, logs.String(), `"duplicate":true`)
	require.Equal(t, uint64(1), n.DuplicatesAcknowledged(), "counted, for the metric")
	ack, err := js.PublishMsg(t.Context(), &nats.Msg{Subject: "events.batch_started", Data: evs[0].Body},
		jetstream.WithMsgID(evs[0].MessageID))
	require.NoError(t, err)
	require.True(t, ack.Duplicate, "the id the sink set is the one the stream deduplicates on")
	require.NotContains(t, logs.String(), `"id":1,"event_name"`, "payloads are not logged")

	// Restarting with the stream present leaves it alone.
	newNATS(t, cfg, zerolog.Nop())
}

// Two outboxes (two databases) publishing to one stream both have an event
// with row id 5, and a table whose identity restarted has a new event 5: the
// stream stores all three. With the bare row id as Nats-Msg-Id it acked the
// later ones as duplicates and dropped them (silent loss). A true redelivery
// is still dropped.
func TestNATSSameRowIDFromTwoOutboxesIsStored(t *testing.T) {
	t.Parallel()
	srv := newNATSServer(t, true)
	cfg := fastNATS(srv.ClientURL(), "events.{event_name}")
	cfg.Stream = "EVENTS"
	a, b := newNATS(t, cfg, zerolog.Nop()), newNATS(t, cfg, zerolog.Nop())
	js, err := jetstream.New(connect(t, srv))
	require.NoError(t, err)
	stream, err := js.Stream(t.Context(), "EVENTS")
	require.NoError(t, err)

	first := natsEventIn("0a1b2c3d4e5f6789", 5, "batch_started")
	other := natsEventIn("fedcba9876543210", 5, "batch_started")
	restarted := natsEventIn("0a1b2c3d4e5f6789", 5, "batch_started")
	restarted.OccurredAt = first.OccurredAt.Add(time.Hour)
	restarted.MessageID = decode.MessageID("0a1b2c3d4e5f6789", 5, restarted.OccurredAt)
	require.NoError(t, a.Deliver(t.Context(), []*decode.Event{first})[0].Err)
	require.NoError(t, b.Deliver(t.Context(), []*decode.Event{other})[0].Err)
	require.NoError(t, a.Deliver(t.Context(), []*decode.Event{restarted})[0].Err)
	info, err := stream.Info(t.Context())
	require.NoError(t, err)
	require.Equal(t, uint64(3), info.State.Msgs, "three different events with row id 5, all stored")
	seen := map[string]bool{}
	for seq := uint64(1); seq <= 3; seq++ {
		m, err := stream.GetMsg(t.Context(), seq)
		require.NoError(t, err)
		require.Equal(t, "5", m.Header.Get(sink.HeaderEventID))
		seen[m.Header.Get("Nats-Msg-Id")] = true
	}
	require.Len(t, seen, 3)

	// The same event again (a redelivery after a crash) is still a duplicate.
	require.NoError(t, b.Deliver(t.Context(), []*decode.Event{natsEventIn("fedcba9876543210", 5, "batch_started")})[0].Err)
	info, err = stream.Info(t.Context())
	require.NoError(t, err)
	require.Equal(t, uint64(3), info.State.Msgs)
}

func TestNATSFailuresClassified(t *testing.T) {
	t.Parallel()
	srv := newNATSServer(t, true)
	js, err := jetstream.New(connect(t, srv))
	require.NoError(t, err)
	_, err = js.CreateStream(t.Context(), jetstream.StreamConfig{Name: "SMALL", Subjects: []string{"small.*"}, MaxMsgSize: 1024})
	require.NoError(t, err)

	t.Run("MessageLargerThanStreamAllowsIsPermanent", func(t *testing.T) {
		n := newNATS(t, fastNATS(srv.ClientURL(), "small.{event_name}"), zerolog.Nop())
		big := natsEvent(1, "x")
		big.Body = fmt.Appendf(nil, `{"id":1,"pad":%q}`, strings.Repeat("x", 2048))
		out := n.Deliver(t.Context(), []*decode.Event{big, natsEvent(2, "x")})
		require.ErrorIs(t, out[0].Err, sink.ErrPermanent)
		require.Equal(t, 1, out[0].Attempts)
		require.NoError(t, out[1].Err, "a permanent failure does not hold up the rest")
	})
	t.Run("MessageLargerThanMaxPayloadIsPermanent", func(t *testing.T) {
		n := newNATS(t, fastNATS(srv.ClientURL(), "small.{event_name}"), zerolog.Nop())
		big := natsEvent(1, "x")
		big.Body = fmt.Appendf(nil, `{"id":1,"pad":%q}`, strings.Repeat("x", 2<<20))
		out := n.Deliver(t.Context(), []*decode.Event{big})
		require.ErrorIs(t, out[0].Err, sink.ErrPermanent)
		require.ErrorIs(t, out[0].Err, nats.ErrMaxPayload)
	})
	t.Run("NoStreamForSubjectIsRetryable", func(t *testing.T) {
		cfg := fastNATS(srv.ClientURL(), "nostream.{event_name}")
		cfg.MaxAttempts = 2
		n := newNATS(t, cfg, zerolog.Nop())
		out := n.Deliver(t.Context(), []*decode.Event{natsEvent(1, "x")})
		require.Error(t, out[0].Err)
		require.NotErrorIs(t, out[0].Err, sink.ErrPermanent)
		require.Equal(t, 2, out[0].Attempts)
	})
}

// With the server down, publishes fail retryably (nothing waits in a
// reconnect buffer); a caller's deadline ends the call with its own error.
func TestNATSServerDownIsRetryable(t *testing.T) {
	t.Parallel()
	srv := newNATSServer(t, true)
	cfg := fastNATS(srv.ClientURL(), "events.{event_name}")
	cfg.Stream = "EVENTS"
	cfg.MaxAttempts = 3
	// The timeout is the sink's whole budget, the stream look-up at start
	// included: a loaded machine needs more than a few hundred ms for it. A
	// publish to a server that is down must fail at once, not by timing out
	// (asserted below), so a generous timeout costs nothing.
	n := newNATS(t, cfg, zerolog.Nop())
	patient := cfg
	patient.MaxAttempts = 1000
	nPatient := newNATS(t, patient, zerolog.Nop())
	require.NoError(t, n.Deliver(t.Context(), []*decode.Event{natsEvent(1, "x")})[0].Err)
	srv.Shutdown()
	srv.WaitForShutdown()

	out := n.Deliver(t.Context(), []*decode.Event{natsEvent(2, "x"), natsEvent(3, "x")})
	require.Error(t, out[0].Err)
	require.NotErrorIs(t, out[0].Err, sink.ErrPermanent)
	require.NotErrorIs(t, out[0].Err, context.DeadlineExceeded)
	require.NotErrorIs(t, out[0].Err, context.Canceled)
	require.Equal(t, 3, out[0].Attempts)
	require.Error(t, out[1].Err, "never sent after the first failed")
	require.NotErrorIs(t, out[1].Err, sink.ErrPermanent)
	require.Equal(t, 0, out[1].Attempts)

	ctx, cancel := context.WithTimeout(t.Context(), 50*time.Millisecond)
	defer cancel()
	out = nPatient.Deliver(ctx, []*decode.Event{natsEvent(4, "x")})
	require.ErrorIs(t, out[0].Err, context.DeadlineExceeded)

	// Starting against a server that is not there fails at start.
	_, err := sink.NewNATS(t.Context(), cfg, zerolog.Nop())
	require.Error(t, err)
}

func TestNATSCredentialsStayOutOfErrors(t *testing.T) {
	t.Parallel()
	srv := newNATSServer(t, false, func(o *server.Options) { o.Username, o.Password = "outboxd", "right-pass" })
	port := srv.Addr().(interface{ String() string }).String()
	port = port[strings.LastIndex(port, ":")+1:]

	n := newNATS(t, fastNATS("nats://outboxd:right-pass@127.0.0.1:"+port, "events.x"), zerolog.Nop())
	require.Equal(t, "nats-test", n.Name())

	cfg := fastNATS("nats://outboxd:wrong-pass-s3cret@127.0.0.1:"+port, "events.x")
	_, err := sink.NewNATS(t.Context(), cfg, zerolog.Nop())
	require.Error(t, err)
	require.NotContains(t, err.Error(), "wrong-pass-s3cret")
	require.Contains(t, err.Error(), "nats://127.0.0.1:"+port)
}

func TestNATSConfigErrorsNameTheField(t *testing.T) {
	t.Parallel()
	for field, mutate := range map[string]func(*sink.NATSConfig){
		"URL":         func(c *sink.NATSConfig) { c.URL = "" },
		"Subject":     func(c *sink.NATSConfig) { c.Subject = "events.{name}" },
		"Stream":      func(c *sink.NATSConfig) { c.Stream = "a.b" },
		"MaxAttempts": func(c *sink.NATSConfig) { c.MaxAttempts = -2 },
	} {
		cfg := sink.NATSConfig{URL: "nats://127.0.0.1:4222", Subject: "events.{event_name}"}
		mutate(&cfg)
		require.ErrorContains(t, cfg.Validate(), field+":", field)
	}
	for _, subject := range []string{"events.*", "events..x", "events.>", "a b"} {
		cfg := sink.NATSConfig{URL: "nats://127.0.0.1:4222", Subject: subject}
		require.ErrorContains(t, cfg.Validate(), "Subject:", subject)
	}
	cfg := sink.NATSConfig{URL: "nats://u:pw-s3cret@h:4222", Subject: ""}
	require.NotContains(t, cfg.Validate().Error(), "pw-s3cret")
}
