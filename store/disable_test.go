package store_test

import (
	"context"
	"strconv"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/outboxd/outboxd/internal/pgtest"
	"github.com/outboxd/outboxd/store"
)

// DisableFailing disables a subscription only once its oldest parked
// delivery is older than the limit by the database's clock; the event it
// inserts carries the subscription's organization (none for a platform-wide
// one); an outbox that refuses the event (a tracking plan's trigger, a
// missing privilege) does not keep the subscription enabled.
func TestDisableFailingSubscription(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	db := pgtest.NewMigrated(t)
	tables := store.On(db.Pool, "public", "domain_event")
	org := int64(7)
	tenant, err := tables.AddSubscription(ctx, &org, "https://example.com/a", []string{"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"}, []string{})
	require.NoError(t, err)
	platform, err := tables.AddSubscription(ctx, nil, "https://example.com/b", []string{"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"}, []string{})
	require.NoError(t, err)
	var eventID int64
	require.NoError(t, db.Conn.QueryRow(ctx, `INSERT INTO domain_event (event_name, organization_id) VALUES ('batch_started', 7) RETURNING id`).Scan(&eventID))
	park := func(target string, age time.Duration) {
		t.Helper()
		_, err := db.Conn.Exec(ctx, `INSERT INTO outboxd_parked (target, event_id, ordering_key, commit_lsn, commit_index, next_attempt_at, parked_at)
VALUES ($1, $2, 7, '0/10', 0, now(), now() - $3 * interval '1 microsecond')`, target, eventID, age.Microseconds())
		require.NoError(t, err)
	}
	enabled := func(id int64) bool {
		var on bool
		require.NoError(t, db.Conn.QueryRow(ctx, `SELECT enabled FROM outboxd_subscription WHERE id = $1`, id).Scan(&on))
		return on
	}

	tenantTarget := "subscription:" + strconv.FormatInt(tenant, 10)
	park(tenantTarget, 10*time.Minute)
	d, err := tables.DisableFailing(ctx, tenantTarget, tenant, time.Hour, 503)
	require.NoError(t, err)
	require.False(t, d.Disabled, "failing for 10 minutes, the limit is an hour")
	require.True(t, enabled(tenant))

	d, err = tables.DisableFailing(ctx, tenantTarget, tenant, 5*time.Minute, 503)
	require.NoError(t, err)
	require.True(t, d.Disabled)
	require.NoError(t, d.EventErr)
	require.False(t, enabled(tenant))
	var name, entity, source string
	var eventOrg *int64
	require.NoError(t, db.Conn.QueryRow(ctx, `SELECT event_name, organization_id, entity_id, source FROM domain_event WHERE id = $1`, d.EventID).
		Scan(&name, &eventOrg, &entity, &source))
	require.Equal(t, store.SubscriptionDisabledEvent, name)
	require.Equal(t, &org, eventOrg)
	require.Equal(t, strconv.FormatInt(tenant, 10), entity)
	require.Equal(t, "outboxd", source)

	again, err := tables.DisableFailing(ctx, tenantTarget, tenant, 5*time.Minute, 503)
	require.NoError(t, err)
	require.False(t, again.Disabled, "already disabled: no second event")

	// An outbox that refuses outboxd's event.
	_, err = db.Conn.Exec(ctx, `CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN RAISE EXCEPTION 'event % is not in the tracking plan', NEW.event_name; END $$;
CREATE TRIGGER refuse BEFORE INSERT ON domain_event FOR EACH ROW EXECUTE FUNCTION refuse()`)
	require.NoError(t, err)
	platformTarget := "subscription:" + strconv.FormatInt(platform, 10)
	park(platformTarget, 10*time.Minute)
	d, err = tables.DisableFailing(ctx, platformTarget, platform, 5*time.Minute, 0)
	require.NoError(t, err)
	require.True(t, d.Disabled)
	require.ErrorContains(t, d.EventErr, "not in the tracking plan")
	require.False(t, enabled(platform))
	var reason string
	require.NoError(t, db.Conn.QueryRow(ctx, `SELECT disabled_reason FROM outboxd_subscription WHERE id = $1`, platform).Scan(&reason))
	require.Contains(t, reason, "failing for more than 5m0s since")
}
