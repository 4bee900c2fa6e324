package sink_test

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"github.com/stretchr/testify/require"
	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/kmsg"

	"github.com/outboxd/outboxd/decode"
	"github.com/outboxd/outboxd/sink"
	"github.com/outboxd/outboxd/sink/sinktest"
)

// newKfake starts an in-process Kafka cluster with the given topics (one
// partition each unless partitions says otherwise), closed at cleanup.
func newKfake(t *testing.T, partitions int32, topics ...string) *kfake.Cluster {
	t.Helper()
	c, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.SeedTopics(partitions, topics...))
	require.NoError(t, err)
	t.Cleanup(c.Close)
	return c
}

// fastKafka is a Kafka config for c with a small, fast retry budget.
func fastKafka(c *kfake.Cluster, topic string) sink.KafkaConfig {
	return sink.KafkaConfig{
		Name: "kafka-test", Brokers: c.ListenAddrs(), Topic: topic,
		Timeout: 5 * time.Second, RetryConfig: sink.RetryConfig{MaxAttempts: 4, BackoffMin: time.Millisecond, BackoffMax: 5 * time.Millisecond},
	}
}

func newKafka(t *testing.T, cfg sink.KafkaConfig) *sink.Kafka {
	t.Helper()
	k, err := sink.NewKafka(cfg, zerolog.Nop())
	require.NoError(t, err)
	t.Cleanup(k.Close)
	return k
}

// produceAnswer answers every partition of req with code.
func produceAnswer(req *kmsg.ProduceRequest, code int16) *kmsg.ProduceResponse {
	resp := req.ResponseKind().(*kmsg.ProduceResponse)
	for _, rt := range req.Topics {
		st := kmsg.NewProduceResponseTopic()
		st.Topic, st.TopicID = rt.Topic, rt.TopicID
		for _, rp := range rt.Partitions {
			sp := kmsg.NewProduceResponseTopicPartition()
			sp.Partition = rp.Partition
			sp.ErrorCode = code
			st.Partitions = append(st.Partitions, sp)
		}
		resp.Topics = append(resp.Topics, st)
	}
	return resp
}

// producedIDs returns the event ids carried by the records of req.
func producedIDs(req *kmsg.ProduceRequest) ([]int64, error) {
	var ids []int64
	for _, rt := range req.Topics {
		for _, rp := range rt.Partitions {
			var b kmsg.RecordBatch
			if err := b.ReadFrom(rp.Records); err != nil {
				return nil, err
			}
			recs, err := kfake.BatchRecords(b)
			if err != nil {
				return nil, err
			}
			for _, r := range recs {
				got, err := sinktest.IDsFromJSON(r.Value)
				if err != nil {
					return nil, err
				}
				ids = append(ids, got...)
			}
		}
	}
	return ids, nil
}

// TestKafkaConformance runs the shared suite with a kfake cluster as the
// destination: a control function hands the ids of every produce request to
// the receiver (sleeping, so that the cluster keeps serving) and lets the
// cluster store the records (ack), or answers NOT_ENOUGH_REPLICAS
// (retryable) or INVALID_RECORD (permanent).
func TestKafkaConformance(t *testing.T) {
	t.Parallel()
	sinktest.Run(t, func(t *testing.T, rcv *sinktest.Receiver) sink.Sink {
		c := newKfake(t, 1, "sinktest")
		c.ControlKey(int16(kmsg.Produce), func(kreq kmsg.Request) (kmsg.Response, error, bool) {
			c.KeepControl()
			req := kreq.(*kmsg.ProduceRequest)
			ids, err := producedIDs(req)
			if err != nil {
				t.Errorf("decode produce request: %v", err)
				return produceAnswer(req, kerr.CorruptMessage.Code), nil, true
			}
			var answer sinktest.Response
			c.SleepControl(func() { answer = rcv.Receive(context.Background(), ids) })
			switch answer {
			case sinktest.Ack:
				return nil, nil, false
			case sinktest.FailPermanent:
				return produceAnswer(req, kerr.InvalidRecord.Code), nil, true
			default:
				return produceAnswer(req, kerr.NotEnoughReplicas.Code), nil, true
			}
		})
		return newKafka(t, fastKafka(c, "sinktest"))
	})
}

// consume reads n records from topic.
func consume(t *testing.T, c *kfake.Cluster, n int, topics ...string) []*kgo.Record {
	t.Helper()
	cl, err := kgo.NewClient(kgo.SeedBrokers(c.ListenAddrs()...), kgo.ConsumeTopics(topics...),
		kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()))
	require.NoError(t, err)
	defer cl.Close()
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	var recs []*kgo.Record
	for len(recs) < n {
		fs := cl.PollFetches(ctx)
		require.NoError(t, ctx.Err(), "got %d of %d records", len(recs), n)
		fs.EachError(func(topic string, p int32, err error) { t.Fatalf("fetch %s/%d: %v", topic, p, err) })
		recs = append(recs, fs.Records()...)
	}
	require.Len(t, recs, n)
	return recs
}

func header(r *kgo.Record, key string) (string, bool) {
	for _, h := range r.Headers {
		if h.Key == key {
			return string(h.Value), true
		}
	}
	return "", false
}

// kafkaEvent is an event with the fields the record key and headers use.
func kafkaEvent(id int64, name string, org int64, entity string) *decode.Event {
	ev := &decode.Event{ID: id, Name: name, OrganizationID: org, HasOrganization: org != 0,
		EntityType: "batch", EntityID: entity, MessageID: decode.MessageID("0a1b2c3d4e5f6789", id, time.Time{})}
	ev.Body = fmt.Appendf(nil, `{"id":%d,"event_name":%q,"organization_id":%d,"entity_type":"batch","entity_id":%q}`, id, name, org, entity)
	return ev
}

func TestKafkaRecordsCarryKeyHeadersAndValue(t *testing.T) {
	t.Parallel()
	tests := []struct {
		keyBy string
		want  []string // keys of the three events
	}{
		{sink.KeyByOrganization, []string{"7", "", "7"}},
		{sink.KeyByEntity, []string{"batch:B-1", "batch:B-2", "batch:B-1"}},
		{sink.KeyByNone, []string{"11", "12", "13"}},
	}
	for _, tt := range tests {
		t.Run(tt.keyBy, func(t *testing.T) {
			t.Parallel()
			c := newKfake(t, 3, "events")
			cfg := fastKafka(c, "events")
			cfg.KeyBy = tt.keyBy
			k := newKafka(t, cfg)
			evs := []*decode.Event{
				kafkaEvent(11, "batch_started", 7, "B-1"),
				kafkaEvent(12, "batch_started", 0, "B-2"),
				kafkaEvent(13, "inventory_adjusted", 7, "B-1"),
			}
			evs[0].Traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
			ctx := sink.WithHeader(t.Context(), "webhook-replay", "true")
			out := k.Deliver(ctx, evs)
			require.Len(t, out, 3)
			for _, o := range out {
				require.NoError(t, o.Err)
				require.Equal(t, 1, o.Attempts)
			}

			recs := consume(t, c, 3, "events")
			slices.SortFunc(recs, func(a, b *kgo.Record) int { return strings.Compare(string(a.Value), string(b.Value)) })
			byID := map[string]*kgo.Record{}
			for _, r := range recs {
				id, ok := header(r, sink.HeaderEventID)
				require.True(t, ok, "every record carries %s", sink.HeaderEventID)
				byID[id] = r
			}
			for i, ev := range evs {
				r := byID[strconv.FormatInt(ev.ID, 10)]
				require.NotNil(t, r, "event %d", ev.ID)
				require.Equal(t, "events", r.Topic)
				require.Equal(t, string(ev.Body), string(r.Value), "value = envelope, unchanged")
				require.Equal(t, tt.want[i], string(r.Key), "key of event %d", ev.ID)
				mid, _ := header(r, sink.HeaderMessageID)
				require.Equal(t, ev.MessageID, mid, "the message id, to deduplicate on")
				name, _ := header(r, sink.HeaderEventName)
				require.Equal(t, ev.Name, name)
				ct, _ := header(r, "content-type")
				require.Equal(t, "application/json", ct)
				replay, _ := header(r, "webhook-replay")
				require.Equal(t, "true", replay, "headers added with WithHeader travel too")
				tp, ok := header(r, sink.HeaderTraceparent)
				require.Equal(t, ev.Traceparent != "", ok)
				require.Equal(t, ev.Traceparent, tp)
			}
			// Same key, same partition: events of one key stay in order.
			if tt.keyBy != sink.KeyByNone {
				require.Equal(t, byID["11"].Partition, byID["13"].Partition)
				require.Less(t, byID["11"].Offset, byID["13"].Offset)
			}
		})
	}
}

func TestKafkaTopicTemplateRoutes(t *testing.T) {
	t.Parallel()
	c := newKfake(t, 1, "events.batch_started", "events.inventory_adjusted", "events.odd_name___-x_y")
	k := newKafka(t, fastKafka(c, "events.{event_name}"))
	out := k.Deliver(t.Context(), []*decode.Event{
		kafkaEvent(1, "batch_started", 1, "a"),
		kafkaEvent(2, "inventory_adjusted", 1, "a"),
		kafkaEvent(3, "odd name/é-x*y", 1, "a"), // ' ', '/', 2-byte 'é', '*' become '_'
		kafkaEvent(4, "batch_started", 2, "b"),
	})
	for _, o := range out {
		require.NoError(t, o.Err)
	}
	got := map[string][]string{}
	for _, r := range consume(t, c, 4, "events.batch_started", "events.inventory_adjusted", "events.odd_name___-x_y") {
		id, _ := header(r, sink.HeaderEventID)
		got[r.Topic] = append(got[r.Topic], id)
	}
	require.ElementsMatch(t, []string{"1", "4"}, got["events.batch_started"])
	require.Equal(t, []string{"2"}, got["events.inventory_adjusted"])
	require.Equal(t, []string{"3"}, got["events.odd_name___-x_y"])

	// A name that makes the topic longer than Kafka allows fails alone,
	// permanently, without an attempt.
	long := kafkaEvent(5, strings.Repeat("n", 260), 1, "a")
	out = k.Deliver(t.Context(), []*decode.Event{long, kafkaEvent(6, "batch_started", 1, "a")})
	require.ErrorIs(t, out[0].Err, sink.ErrPermanent)
	require.Equal(t, 0, out[0].Attempts)
	require.NoError(t, out[1].Err)
}

func TestKafkaTooLargeRecordIsPermanent(t *testing.T) {
	t.Parallel()
	c := newKfake(t, 1, "events")
	k := newKafka(t, fastKafka(c, "events"))
	huge := kafkaEvent(1, "batch_started", 1, "a")
	huge.Body = fmt.Appendf(nil, `{"id":1,"pad":%q}`, strings.Repeat("x", 2<<20))
	out := k.Deliver(t.Context(), []*decode.Event{huge})
	require.ErrorIs(t, out[0].Err, sink.ErrPermanent)
	require.ErrorIs(t, out[0].Err, kerr.MessageTooLarge)
	require.Equal(t, 1, out[0].Attempts, "not retried")

	// The producer goes on with the next events.
	out = k.Deliver(t.Context(), []*decode.Event{kafkaEvent(2, "batch_started", 1, "a")})
	require.NoError(t, out[0].Err)
	consume(t, c, 1, "events")

	// Brokers that take bigger messages: the cap comes from configuration.
	big := fastKafka(c, "events")
	big.MaxRecordBytes = 4 << 20
	require.NoError(t, newKafka(t, big).Deliver(t.Context(), []*decode.Event{huge})[0].Err)
	small := fastKafka(c, "events")
	small.MaxRecordBytes = 10
	require.ErrorContains(t, small.Validate(), "MaxRecordBytes")
}

func TestKafkaBrokerAnswersClassified(t *testing.T) {
	t.Parallel()
	for _, tt := range []struct {
		code      int16
		permanent bool
	}{
		{kerr.NotLeaderForPartition.Code, false},
		{kerr.RequestTimedOut.Code, false},
		{kerr.TopicAuthorizationFailed.Code, true},
		{kerr.MessageTooLarge.Code, true},
		{kerr.InvalidTopicException.Code, true},
	} {
		name := kerr.ErrorForCode(tt.code).Error()
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			c := newKfake(t, 1, "events")
			c.ControlKey(int16(kmsg.Produce), func(kreq kmsg.Request) (kmsg.Response, error, bool) {
				c.KeepControl()
				return produceAnswer(kreq.(*kmsg.ProduceRequest), tt.code), nil, true
			})
			cfg := fastKafka(c, "events")
			cfg.MaxAttempts = 2
			// REQUEST_TIMED_OUT leaves the client unsure whether the
			// broker wrote the batch: it re-sends until the attempt ends,
			// so a retryable answer needs a short attempt. A permanent one
			// ends the attempt at once: a generous timeout keeps a loaded
			// machine from timing the attempt out before the answer is read
			// (seen once: 2 attempts for MESSAGE_TOO_LARGE).
			cfg.Timeout = 300 * time.Millisecond
			if tt.permanent {
				cfg.Timeout = 10 * time.Second
			}
			k := newKafka(t, cfg)
			out := k.Deliver(t.Context(), []*decode.Event{kafkaEvent(1, "batch_started", 1, "a")})
			require.Error(t, out[0].Err)
			require.NotErrorIs(t, out[0].Err, context.Canceled)
			require.NotErrorIs(t, out[0].Err, context.DeadlineExceeded)
			if tt.permanent {
				require.ErrorIs(t, out[0].Err, sink.ErrPermanent)
				require.Equal(t, 1, out[0].Attempts)
			} else {
				require.NotErrorIs(t, out[0].Err, sink.ErrPermanent)
				require.Equal(t, 2, out[0].Attempts)
			}
		})
	}
}

// With the cluster gone, deliveries fail, retryably, once the attempt times
// out; cancelling the call ends it at once.
// An attempt that times out while the broker still holds its records does
// not produce them again: the next attempts wait for the answers of the
// records in flight. A second copy used to follow the first into the
// partition, behind the newer record produced after it: the log read 1 2 1 2,
// an older event after a newer one of the same key.
func TestKafkaTimedOutAttemptDoesNotProduceAgain(t *testing.T) {
	t.Parallel()
	c := newKfake(t, 1, "events")
	var mu sync.Mutex
	held := false
	c.ControlKey(int16(kmsg.Produce), func(kmsg.Request) (kmsg.Response, error, bool) {
		c.KeepControl()
		mu.Lock()
		first := !held
		held = true
		mu.Unlock()
		if first {
			// The broker stalls on the first request for longer than two
			// attempts (the scenario, not a wait for the test).
			c.SleepControl(func() { <-time.After(500 * time.Millisecond) })
		}
		return nil, nil, false
	})
	cfg := fastKafka(c, "events")
	cfg.Timeout = 200 * time.Millisecond
	cfg.MaxAttempts = 4
	k := newKafka(t, cfg)
	events := []*decode.Event{kafkaEvent(1, "batch_started", 7, "a"), kafkaEvent(2, "batch_completed", 7, "a")}
	out := k.Deliver(t.Context(), events)
	for _, o := range out {
		require.NotErrorIs(t, o.Err, sink.ErrPermanent)
	}
	// A later delivery lands behind whatever the first one wrote.
	require.NoError(t, k.Deliver(t.Context(), []*decode.Event{kafkaEvent(3, "batch_failed", 7, "a")})[0].Err)
	recs := consume(t, c, 3, "events")
	var ids []int64
	for _, r := range recs {
		got, err := sinktest.IDsFromJSON(r.Value)
		require.NoError(t, err)
		ids = append(ids, got...)
	}
	require.Equal(t, []int64{1, 2, 3}, ids, "each record once, in order")
}

// writeTestCA makes a CA and a certificate it signs for 127.0.0.1 (for the
// broker), writes the CA and a client certificate and key as PEM files, and
// returns the broker's certificate and the files.
func writeTestCA(t *testing.T) (server tls.Certificate, caFile, certFile, keyFile string) {
	t.Helper()
	dir := t.TempDir()
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	caTmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "outboxd test CA"},
		NotBefore: time.Unix(0, 0), NotAfter: time.Date(9999, 1, 1, 0, 0, 0, 0, time.UTC), IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	require.NoError(t, err)
	ca, err := x509.ParseCertificate(caDER)
	require.NoError(t, err)
	issue := func(serial int64, usage x509.ExtKeyUsage) ([]byte, *ecdsa.PrivateKey) {
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		require.NoError(t, err)
		tmpl := &x509.Certificate{SerialNumber: big.NewInt(serial), Subject: pkix.Name{CommonName: "127.0.0.1"},
			NotBefore: time.Unix(0, 0), NotAfter: time.Date(9999, 1, 1, 0, 0, 0, 0, time.UTC), IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)},
			ExtKeyUsage: []x509.ExtKeyUsage{usage}, KeyUsage: x509.KeyUsageDigitalSignature}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
		require.NoError(t, err)
		return der, key
	}
	srvDER, srvKey := issue(2, x509.ExtKeyUsageServerAuth)
	server = tls.Certificate{Certificate: [][]byte{srvDER}, PrivateKey: srvKey}
	cliDER, cliKey := issue(3, x509.ExtKeyUsageClientAuth)
	keyDER, err := x509.MarshalECPrivateKey(cliKey)
	require.NoError(t, err)
	write := func(name, typ string, der []byte) string {
		p := filepath.Join(dir, name)
		require.NoError(t, os.WriteFile(p, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600))
		return p
	}
	return server, write("ca.pem", "CERTIFICATE", caDER), write("client.pem", "CERTIFICATE", cliDER), write("client.key", "EC PRIVATE KEY", keyDER)
}

// A broker whose certificate a private CA signs, which also asks for a client
// certificate: the CA file and the client certificate get the records
// through; the system roots alone do not.
func TestKafkaTLSWithPrivateCAAndClientCertificate(t *testing.T) {
	t.Parallel()
	server, caFile, certFile, keyFile := writeTestCA(t)
	pool := x509.NewCertPool()
	caPEM, err := os.ReadFile(caFile)
	require.NoError(t, err)
	require.True(t, pool.AppendCertsFromPEM(caPEM))
	c, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.SeedTopics(1, "events"), kfake.TLS(&tls.Config{
		Certificates: []tls.Certificate{server}, ClientCAs: pool, ClientAuth: tls.RequireAndVerifyClientCert, MinVersion: tls.VersionTLS12}))
	require.NoError(t, err)
	t.Cleanup(c.Close)

	cfg := fastKafka(c, "events")
	cfg.TLSCAFile, cfg.TLSCertFile, cfg.TLSKeyFile = caFile, certFile, keyFile
	k := newKafka(t, cfg)
	require.NoError(t, k.Ping(t.Context()))
	require.NoError(t, k.Deliver(t.Context(), []*decode.Event{kafkaEvent(1, "batch_started", 1, "a")})[0].Err)

	// System roots only: the broker's certificate is not trusted.
	plain := fastKafka(c, "events")
	plain.TLS = true
	ctx, cancel := context.WithTimeout(t.Context(), 3*time.Second)
	defer cancel()
	require.Error(t, newKafka(t, plain).Ping(ctx))

	// A key without its certificate is refused at start, naming the field.
	half := fastKafka(c, "events")
	half.TLSKeyFile = keyFile
	require.ErrorContains(t, half.Validate(), "TLSCertFile")
}

func TestKafkaBrokerDownIsRetryable(t *testing.T) {
	t.Parallel()
	c := newKfake(t, 1, "events")
	cfg := fastKafka(c, "events")
	cfg.Timeout = 300 * time.Millisecond
	cfg.MaxAttempts = 2
	k := newKafka(t, cfg)
	require.NoError(t, k.Ping(t.Context()))
	require.NoError(t, k.Deliver(t.Context(), []*decode.Event{kafkaEvent(1, "batch_started", 1, "a")})[0].Err)
	c.Close()

	out := k.Deliver(t.Context(), []*decode.Event{kafkaEvent(2, "batch_started", 1, "a")})
	require.Error(t, out[0].Err)
	require.NotErrorIs(t, out[0].Err, sink.ErrPermanent)
	require.NotErrorIs(t, out[0].Err, context.DeadlineExceeded, "the attempt's own timeout is not the caller's deadline")
	require.Equal(t, 2, out[0].Attempts)

	// The caller's deadline, shorter than the attempt's, ends the call with
	// the caller's error.
	ctx, cancel := context.WithTimeout(t.Context(), 100*time.Millisecond)
	defer cancel()
	cfg.Timeout = time.Minute
	k2 := newKafka(t, cfg)
	out = k2.Deliver(ctx, []*decode.Event{kafkaEvent(3, "batch_started", 1, "a")})
	require.ErrorIs(t, out[0].Err, context.DeadlineExceeded)
	require.NotErrorIs(t, out[0].Err, sink.ErrPermanent)
}

func TestKafkaUnknownTopicIsRetryable(t *testing.T) {
	t.Parallel()
	c := newKfake(t, 1, "events")
	cfg := fastKafka(c, "missing")
	cfg.MaxAttempts = 2
	cfg.Timeout = 2 * time.Second
	k := newKafka(t, cfg)
	out := k.Deliver(t.Context(), []*decode.Event{kafkaEvent(1, "batch_started", 1, "a")})
	require.Error(t, out[0].Err)
	require.NotErrorIs(t, out[0].Err, sink.ErrPermanent, "a missing topic can be created: retry")
}

// SCRAM authentication works; with a wrong password Ping (run at start) and
// deliveries fail, and the password appears in neither error.
func TestKafkaSASL(t *testing.T) {
	t.Parallel()
	c, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.SeedTopics(1, "events"),
		kfake.EnableSASL(), kfake.Superuser("SCRAM-SHA-256", "outboxd", "right-password"))
	require.NoError(t, err)
	t.Cleanup(c.Close)

	cfg := fastKafka(c, "events")
	cfg.SASLMechanism, cfg.SASLUser, cfg.SASLPassword = "scram-sha-256", "outboxd", "right-password"
	k := newKafka(t, cfg)
	require.NoError(t, k.Deliver(t.Context(), []*decode.Event{kafkaEvent(1, "batch_started", 1, "a")})[0].Err)

	cfg.SASLPassword = "wrong-password-s3cret"
	cfg.Timeout = 2 * time.Second
	cfg.MaxAttempts = 2
	k = newKafka(t, cfg)
	pingErr := k.Ping(t.Context())
	require.Error(t, pingErr)
	require.NotContains(t, pingErr.Error(), "wrong-password-s3cret")
	out := k.Deliver(t.Context(), []*decode.Event{kafkaEvent(2, "batch_started", 1, "a")})
	require.Error(t, out[0].Err)
	require.NotContains(t, out[0].Err.Error(), "wrong-password-s3cret")
}

func TestKafkaConfigErrorsNameTheField(t *testing.T) {
	t.Parallel()
	ok := sink.KafkaConfig{Brokers: []string{"127.0.0.1:9092"}, Topic: "events"}
	require.NoError(t, ok.Validate())
	require.Empty(t, ok.KeyBy, "Validate changes nothing")
	ok = ok.WithDefaults()
	require.NoError(t, ok.Validate())
	require.Equal(t, sink.KeyByOrganization, ok.KeyBy)
	for field, mutate := range map[string]func(*sink.KafkaConfig){
		"Brokers":       func(c *sink.KafkaConfig) { c.Brokers = nil },
		"Brokers[1]":    func(c *sink.KafkaConfig) { c.Brokers = append(c.Brokers, "bad host") },
		"Topic":         func(c *sink.KafkaConfig) { c.Topic = "" },
		"KeyBy":         func(c *sink.KafkaConfig) { c.KeyBy = "user" },
		"SASLMechanism": func(c *sink.KafkaConfig) { c.SASLMechanism = "gssapi" },
		"SASLPassword":  func(c *sink.KafkaConfig) { c.SASLMechanism, c.SASLUser = "plain", "u" },
		"MaxAttempts":   func(c *sink.KafkaConfig) { c.MaxAttempts = -1 },
	} {
		cfg := sink.KafkaConfig{Brokers: []string{"127.0.0.1:9092"}, Topic: "events"}
		mutate(&cfg)
		require.ErrorContains(t, cfg.Validate(), field+":", field)
	}
	for _, topic := range []string{"events.{event}", "events/x", "a{event_name}}", strings.Repeat("t", 250)} {
		cfg := sink.KafkaConfig{Brokers: []string{"127.0.0.1:9092"}, Topic: topic}
		require.ErrorContains(t, cfg.Validate(), "Topic:", topic)
	}
	cfg := sink.KafkaConfig{Brokers: []string{"b:9092"}, Topic: "t", SASLMechanism: "plain", SASLUser: "u", SASLPassword: "pw-secret", RetryConfig: sink.RetryConfig{MaxAttempts: -1}}
	require.NotContains(t, cfg.Validate().Error(), "pw-secret")
}

// SASL PLAIN without TLS sends the password in clear text: said at start.
func TestKafkaPlainWithoutTLSWarns(t *testing.T) {
	t.Parallel()
	c := newKfake(t, 1, "events")
	for _, tlsOn := range []bool{false, true} {
		var logs bytes.Buffer
		cfg := fastKafka(c, "events")
		cfg.SASLMechanism, cfg.SASLUser, cfg.SASLPassword, cfg.TLS = "plain", "u", "s3cret-pw", tlsOn
		k, err := sink.NewKafka(cfg, zerolog.New(&logs))
		require.NoError(t, err)
		k.Close()
		require.Equal(t, !tlsOn, strings.Contains(logs.String(), "SASL PLAIN without TLS"), "tls=%v: %s", tlsOn, logs.String())
		require.NotContains(t, logs.String(), "s3cret-pw")
	}
}
