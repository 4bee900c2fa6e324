package ops

import (
	"context"
	"net/http"
	"slices"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"github.com/stretchr/testify/require"

	"github.com/outboxd/outboxd/internal/e2e"
	"github.com/outboxd/outboxd/sink"
)

func webhook(t *testing.T, url string) *sink.Webhook {
	t.Helper()
	w, err := sink.NewWebhook(sink.WebhookConfig{URL: url, Secrets: []string{e2e.Secret}, HTTPConfig: sink.HTTPConfig{AllowPrivate: true,
		RetryConfig: sink.RetryConfig{MaxAttempts: 2, BackoffMin: time.Millisecond, BackoffMax: 5 * time.Millisecond}}}, zerolog.Nop())
	require.NoError(t, err)
	t.Cleanup(w.Close)
	return w
}

func ptr[T any](v T) *T { return &v }

// Replay delivers exactly the rows the filters select, in id order, signed,
// with the event's message id as webhook-id (the one the daemon sends) and the
// replay header; it marks nothing.
func TestReplayFiltersAndCounts(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	day := func(d int) time.Time { return time.Date(2026, 1, d, 12, 0, 0, 0, time.UTC) }
	ordCreated := b.insert(t, 5, "order.created", 7, day(1))
	ordPaid := b.insert(t, 5, "order.paid", 7, day(2))
	userOther := b.insert(t, 5, "user.created", 8, day(3))
	ordOther := b.insert(t, 5, "order.created", 8, day(4))
	b.exec(t, `UPDATE domain_event SET is_processed = true, processed_at = now() WHERE id = ANY($1)`, ordCreated[:3])
	all := slices.Concat(ordCreated, ordPaid, userOther, ordOther)
	ns := e2e.Namespace(t, b.pool)

	cases := []struct {
		name   string
		filter Filter
		want   []int64
	}{
		{"everything", Filter{}, all},
		{"id range", Filter{FromID: &ordPaid[2], ToID: &userOther[1]}, slices.Concat(ordPaid[2:], userOther[:2])},
		{"organization", Filter{Organizations: []int64{8}}, slices.Concat(userOther, ordOther)},
		{"glob", Filter{Events: []string{"order.*"}}, slices.Concat(ordCreated, ordPaid, ordOther)},
		{"glob list", Filter{Events: []string{"*.paid", "user.*"}}, slices.Concat(ordPaid, userOther)},
		{"time range", Filter{Since: day(2), Until: day(4)}, slices.Concat(ordPaid, userOther)},
		{"all together", Filter{Organizations: []int64{7, 8}, Events: []string{"order.created"}, Since: day(1), ToID: &ordOther[1]},
			slices.Concat(ordCreated, ordOther[:2])},
		{"nothing", Filter{Events: []string{"nope"}}, nil},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			recv := e2e.NewReceiver(t)
			dry, err := b.client.Replay(ctx, ReplayOptions{Filter: tc.filter, DryRun: true})
			require.NoError(t, err)
			require.EqualValues(t, len(tc.want), dry.Matched)
			require.Empty(t, recv.Deliveries(), "a dry run delivers nothing")

			p := NewProgress()
			res, err := b.client.Replay(ctx, ReplayOptions{Filter: tc.filter, Sink: webhook(t, recv.URL), Progress: p, PageSize: 3})
			require.NoError(t, err)
			require.EqualValues(t, len(tc.want), res.Matched)
			require.EqualValues(t, len(tc.want), res.Replayed)
			require.Zero(t, res.Failed)
			require.Equal(t, tc.want, recv.Accepted(), "exactly the selected rows, in id order")
			for _, d := range recv.Deliveries() {
				require.True(t, d.Replay, "webhook-replay header")
				require.True(t, d.SigOK)
				require.Equal(t, e2e.WebhookIDOf(ns, d), d.WebhookID)
			}
			s := p.Snapshot()
			require.EqualValues(t, len(tc.want), s.Done)
			require.EqualValues(t, len(tc.want), s.Total)
		})
	}
	require.EqualValues(t, 3, b.int(t, `SELECT count(*) FROM domain_event WHERE is_processed`), "replay marks nothing")
}

// A failed delivery is counted and named; the others go on.
func TestReplayCountsFailures(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ids := b.insert(t, 6, "a", 1, time.Now())
	recv := e2e.NewReceiver(t)
	recv.Respond = func(d *e2e.Delivery) int {
		if d.IDs[0] == ids[2] {
			return http.StatusBadRequest
		}
		return http.StatusOK
	}
	res, err := b.client.Replay(context.Background(), ReplayOptions{Sink: webhook(t, recv.URL), Concurrency: 3})
	require.NoError(t, err)
	require.EqualValues(t, 5, res.Replayed)
	require.EqualValues(t, 1, res.Failed)
	require.Equal(t, []int64{ids[2]}, res.FailedIDs)
}

// The rate limit spaces deliveries: n events at r/s take at least (n-1)/r.
func TestReplayRateLimit(t *testing.T) {
	t.Parallel()
	b := setup(t)
	b.insert(t, 11, "a", 1, time.Now())
	recv := e2e.NewReceiver(t)
	start := time.Now()
	res, err := b.client.Replay(context.Background(), ReplayOptions{Sink: webhook(t, recv.URL), Rate: 40, Concurrency: 4})
	elapsed := time.Since(start)
	require.NoError(t, err)
	require.EqualValues(t, 11, res.Replayed)
	t.Logf("11 events at 40/s took %s", elapsed)
	require.GreaterOrEqual(t, elapsed, 250*time.Millisecond)
	ds := recv.Deliveries()
	require.GreaterOrEqual(t, ds[len(ds)-1].At.Sub(ds[0].At), 200*time.Millisecond, "first to last request (10 gaps of 25ms, less connection set-up)")
}

// A subscription target restricts the replay to its organization and events.
func TestFilterRestrictToSubscription(t *testing.T) {
	org := int64(7)
	f, err := Filter{Events: []string{"order.*"}}.Restrict(&Subscription{ID: 3, OrganizationID: &org, Events: []string{"*.paid"}})
	require.NoError(t, err)
	require.Equal(t, []int64{7}, f.Organizations)
	require.Equal(t, []string{"*.paid"}, f.TargetEvents)
	_, err = Filter{Organizations: []int64{8}}.Restrict(&Subscription{ID: 3, OrganizationID: &org})
	require.ErrorContains(t, err, "organization 7 only")
	f, err = Filter{Organizations: []int64{8}}.Restrict(&Subscription{ID: 4})
	require.NoError(t, err)
	require.Equal(t, []int64{8}, f.Organizations, "a platform-wide subscription keeps the filter")
}

func TestFilterValidate(t *testing.T) {
	require.Error(t, Filter{FromID: ptr[int64](5), ToID: ptr[int64](4)}.Validate())
	now := time.Now()
	require.Error(t, Filter{Since: now, Until: now}.Validate())
	require.Error(t, Filter{Events: []string{"[a"}}.Validate())
	require.NoError(t, Filter{Events: []string{"a.*"}, FromID: ptr[int64](4), ToID: ptr[int64](4)}.Validate())
	globs, err := ParseGlobs(" a.* , ,b?")
	require.NoError(t, err)
	require.Equal(t, []string{"a.*", "b?"}, globs)
}

// An ORM's occurred_at held as text cannot be compared with a time: a replay
// by --since/--until says so and names what to use instead, rather than
// failing with the server's operator error.
func TestReplaySinceOnATextOccurredAt(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	b.exec(t, `ALTER TABLE domain_event ALTER COLUMN occurred_at TYPE text USING occurred_at::text`)
	_, err := b.client.Replay(ctx, ReplayOptions{DryRun: true, Filter: Filter{Since: time.Unix(0, 0)}})
	require.ErrorContains(t, err, "occurred_at is not a timestamp, so --since/--until cannot filter on it")
	res, err := b.client.Replay(ctx, ReplayOptions{DryRun: true})
	require.NoError(t, err, "without a time filter it replays")
	require.NotNil(t, res)
}
