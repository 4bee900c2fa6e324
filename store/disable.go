package store

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
)

// SubscriptionDisabledEvent is the event_name of the event outboxd inserts
// into the outbox when it disables a failing subscription, so that the
// application can tell the tenant (snake_case, as tracking plans want it).
const SubscriptionDisabledEvent = "outboxd_subscription_disabled"

// Disabled is what DisableFailing did.
type Disabled struct {
	// Disabled is true when the subscription was disabled by this call.
	Disabled bool
	// FailingSince is when its oldest undelivered event was parked.
	FailingSince time.Time
	// EventID is the id of the outboxd_subscription_disabled event, 0 when
	// the outbox refused it (EventErr says why).
	EventID  int64
	EventErr error
}

// DisableFailing disables subscription id, if it is enabled and the oldest
// of its parked deliveries (target) was parked more than after ago by the
// database's clock (a parked delivery stays parked only while every retry
// fails), and inserts an outboxd_subscription_disabled event of its
// organization into the outbox in the same transaction. The function of
// migration 9 does both: the daemon's role may not insert into the outbox
// otherwise. The subscription is disabled even when the outbox refuses the
// event (EventErr).
func (t Tables) DisableFailing(ctx context.Context, target string, id int64, after time.Duration, lastStatus int) (Disabled, error) {
	var d Disabled
	reason := fmt.Sprintf("failing for more than %s", after)
	var status *int32
	if lastStatus != 0 {
		reason += fmt.Sprintf(" (last status %d)", lastStatus)
		st := int32(lastStatus)
		status = &st
	}
	var eventID *int64
	var eventErr *string
	err := t.q.QueryRow(ctx, `SELECT failing_since, new_event_id, event_error FROM `+t.own("outboxd_disable_failing_subscription")+
		`($1, $2, $3 * interval '1 microsecond', $4, $5)`, id, target, after.Microseconds(), reason, status).
		Scan(&d.FailingSince, &eventID, &eventErr)
	if errors.Is(err, pgx.ErrNoRows) {
		return d, nil
	}
	if err != nil {
		return d, fmt.Errorf("disable failing subscription %d: %w", id, err)
	}
	d.Disabled = true
	if eventID != nil {
		d.EventID = *eventID
	}
	if eventErr != nil {
		d.EventErr = fmt.Errorf("insert %s: %s", SubscriptionDisabledEvent, *eventErr)
	}
	return d, nil
}
