package main

import (
	"context"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/kmsg"

	"github.com/outboxd/outboxd/internal/e2e"
	"github.com/outboxd/outboxd/internal/pgtest"
)

// With a topic per event name, an event whose topic does not exist yet
// parks, and holds back only the later events of its organization on that
// topic: the organization's events on the other topics go out meanwhile
// (no consumer can compare orders across topics). Once the topic is created
// the parked events go out, in order.
func TestKafkaMissingTopicHoldsBackOnlyItsTopic(t *testing.T) {
	t.Parallel()
	c, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.SeedTopics(3, "events.batch_started"))
	require.NoError(t, err)
	t.Cleanup(c.Close)
	b := newBundle(t, pgtest.Shared(t), map[string]string{
		"OUTBOXD_SINK": "kafka", "OUTBOXD_KAFKA_BROKERS": c.ListenAddrs()[0],
		"OUTBOXD_KAFKA_TOPIC": "events.{event_name}", "OUTBOXD_KAFKA_TIMEOUT": "500ms",
		// Retries every 200 ms for minutes: the missing topic's events
		// stay parked, not dead-lettered, until the test creates it.
		"OUTBOXD_KAFKA_MAX_ATTEMPTS": "1", "OUTBOXD_RETRY_SCHEDULE": strings.TrimSuffix(strings.Repeat("200ms,", 1000), ","),
	})
	d := e2e.StartDaemon(t, b.env)
	ctx := context.Background()
	insert := func(name string, org int64) int64 {
		var id int64
		require.NoError(t, b.pool.QueryRow(ctx, `INSERT INTO domain_event (event_name, organization_id, entity_type, entity_id, properties)
VALUES ($1, $2, 'batch', 'B-1', '{}') RETURNING id`, name, org).Scan(&id))
		return id
	}
	// Organization 7: two events for the missing topic around events for
	// the existing one; organization 8 only on the existing one.
	missing := []int64{insert("batch_completed", 7)}
	var present []int64
	for range 3 {
		present = append(present, insert("batch_started", 7), insert("batch_started", 8))
	}
	missing = append(missing, insert("batch_completed", 7))
	present = append(present, insert("batch_started", 7))

	b.waitProcessed(t, int64(len(present)), time.Minute)
	var notProcessed []int64
	rows, err := b.pool.Query(ctx, `SELECT id FROM domain_event WHERE is_processed IS NOT TRUE ORDER BY id`)
	require.NoError(t, err)
	for rows.Next() {
		var id int64
		require.NoError(t, rows.Scan(&id))
		notProcessed = append(notProcessed, id)
	}
	require.NoError(t, rows.Err())
	require.Equal(t, missing, notProcessed, "only the events for the missing topic wait")
	var parked, dead int
	require.NoError(t, b.pool.QueryRow(ctx, `SELECT (SELECT count(*) FROM outboxd_parked), (SELECT count(*) FROM outboxd_dead_letter)`).Scan(&parked, &dead))
	require.Equal(t, []int{2, 0}, []int{parked, dead}, "parked, dead-lettered")

	cl, err := kgo.NewClient(kgo.SeedBrokers(c.ListenAddrs()...))
	require.NoError(t, err)
	defer cl.Close()
	req := kmsg.NewPtrCreateTopicsRequest()
	rt := kmsg.NewCreateTopicsRequestTopic()
	rt.Topic, rt.NumPartitions, rt.ReplicationFactor = "events.batch_completed", 1, 1
	req.Topics = append(req.Topics, rt)
	resp, err := req.RequestWith(ctx, cl)
	require.NoError(t, err)
	require.NoError(t, kerr.ErrorForCode(resp.Topics[0].ErrorCode))

	b.waitProcessed(t, int64(len(present)+len(missing)), time.Minute)
	got := consumeIDs(t, c, "events.batch_completed", len(missing))
	require.Equal(t, missing, got, "the parked events went out, in order")
	require.Equal(t, 0, d.Stop(30*time.Second))
}

// consumeIDs reads n distinct events from topic and returns their ids in
// log order (one partition).
func consumeIDs(t *testing.T, c *kfake.Cluster, topic string, n int) []int64 {
	t.Helper()
	cl, err := kgo.NewClient(kgo.SeedBrokers(c.ListenAddrs()...), kgo.ConsumeTopics(topic),
		kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()))
	require.NoError(t, err)
	defer cl.Close()
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	var ids []int64
	seen := map[int64]bool{}
	for len(seen) < n {
		fs := cl.PollRecords(ctx, 100)
		require.NoError(t, ctx.Err(), "%d of %d events", len(seen), n)
		for _, rec := range fs.Records() {
			var env struct {
				ID   int64  `json:"id"`
				Name string `json:"event_name"`
			}
			require.NoError(t, json.Unmarshal(rec.Value, &env))
			require.Equal(t, topic, "events."+env.Name)
			id := env.ID
			if !seen[id] {
				seen[id] = true
				ids = append(ids, id)
			}
		}
	}
	return ids
}
