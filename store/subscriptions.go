package store

import (
	"context"
	"errors"
	"time"

	"github.com/jackc/pgx/v5"
)

// ErrNoSubscription is returned for a subscription id without a row.
var ErrNoSubscription = errors.New("no such subscription")

// Subscription is a subscription's routing and secret material.
type Subscription struct {
	ID             int64
	OrganizationID *int64
	URL            string
	Secrets        []string
	Events         []string
	Enabled        bool
	// Filter is its property filter and Contract its contract policy ("":
	// none, the default's).
	Filter, Contract string
	// Kind is its sink kind (webhook, posthog, ...) and Settings the
	// settings of another kind.
	Kind     string
	Settings map[string]string
}

// Subscription reads subscription id; ErrNoSubscription when it has no row.
func (t Tables) Subscription(ctx context.Context, id int64) (*Subscription, error) {
	s := &Subscription{ID: id}
	err := t.q.QueryRow(ctx, `SELECT organization_id, url, secrets, events, enabled, coalesce(filter, ''), coalesce(contract, ''), kind, settings
  FROM `+t.own(SubscriptionTable)+` WHERE id = $1`, id).
		Scan(&s.OrganizationID, &s.URL, &s.Secrets, &s.Events, &s.Enabled, &s.Filter, &s.Contract, &s.Kind, &s.Settings)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, ErrNoSubscription
	}
	return s, err
}

// SubscriptionSummary is a subscription as `subscription list` shows it: its
// secrets are counted, not read.
type SubscriptionSummary struct {
	ID             int64
	OrganizationID *int64
	URL            string
	Secrets        int
	Events         []string
	Enabled        bool
	DisabledReason string
	CreatedAt      time.Time
	UpdatedAt      time.Time
	// Filter is the property filter ("": none).
	Filter string
	// Contract is the contract policy ("": OUTBOXD_SUBSCRIPTION_CONTRACT).
	Contract string
	// Kind is the sink kind and Settings its settings (no secret: only
	// references to them).
	Kind     string
	Settings map[string]string
}

// Subscriptions lists every subscription by id.
func (t Tables) Subscriptions(ctx context.Context) ([]SubscriptionSummary, error) {
	rows, err := t.q.Query(ctx, `SELECT id, organization_id, url, cardinality(secrets), events, enabled,
  coalesce(disabled_reason, ''), created_at, updated_at, coalesce(filter, ''), coalesce(contract, ''), kind, settings FROM `+t.own(SubscriptionTable)+` ORDER BY id`)
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, pgx.RowToStructByPos[SubscriptionSummary])
}

// AnySubscription reports whether a subscription exists.
func (t Tables) AnySubscription(ctx context.Context) (bool, error) {
	var ok bool
	err := t.q.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM `+t.own(SubscriptionTable)+`)`).Scan(&ok)
	return ok, err
}

// AddSubscription inserts an enabled subscription without a property filter
// and returns its id. events must not be nil (empty means every event).
func (t Tables) AddSubscription(ctx context.Context, org *int64, url string, secrets, events []string) (int64, error) {
	return t.AddFilteredSubscription(ctx, org, url, secrets, events, nil, nil)
}

// AddFilteredSubscription is AddSubscription with a property filter (nil:
// none), which the caller has compiled, and a contract policy (nil: the
// default's), which the caller has checked.
func (t Tables) AddFilteredSubscription(ctx context.Context, org *int64, url string, secrets, events []string, filter, contract *string) (int64, error) {
	return t.AddSubscriptionRow(ctx, NewSubscription{OrganizationID: org, URL: url, Secrets: secrets, Events: events, Filter: filter, Contract: contract})
}

// NewSubscription is a subscription to insert.
type NewSubscription struct {
	OrganizationID *int64
	URL            string
	// Secrets are a webhook's signing secrets; Events must not be nil
	// (empty: every event).
	Secrets, Events  []string
	Filter, Contract *string
	// Kind is the sink kind ("": webhook) and Settings its settings, which
	// the caller has checked.
	Kind     string
	Settings map[string]string
}

// AddSubscriptionRow inserts an enabled subscription and returns its id.
func (t Tables) AddSubscriptionRow(ctx context.Context, s NewSubscription) (int64, error) {
	kind := s.Kind
	if kind == "" {
		kind = "webhook"
	}
	settings := s.Settings
	if settings == nil {
		settings = map[string]string{}
	}
	secrets := s.Secrets
	if secrets == nil {
		secrets = []string{}
	}
	var id int64
	err := t.q.QueryRow(ctx, `INSERT INTO `+t.own(SubscriptionTable)+` (organization_id, url, secrets, events, filter, contract, kind, settings)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING id`, s.OrganizationID, s.URL, secrets, s.Events, s.Filter, s.Contract, kind, settings).Scan(&id)
	return id, err
}

// SetSettings merges set into the settings of subscription id (an empty
// value removes the key), which the caller has checked, and reports whether
// the subscription exists.
func (t Tables) SetSettings(ctx context.Context, id int64, set map[string]string) (bool, error) {
	tag, err := t.q.Exec(ctx, `UPDATE `+t.own(SubscriptionTable)+`
SET settings = jsonb_strip_nulls(settings || (SELECT coalesce(jsonb_object_agg(k, CASE WHEN v = '' THEN NULL ELSE v END), '{}') FROM jsonb_each_text($2::jsonb) AS e(k, v))),
    updated_at = now() WHERE id = $1`, id, set)
	return tag.RowsAffected() > 0, err
}

// SubscriptionKind returns the kind, organization and settings of
// subscription id; ErrNoSubscription when it has no row.
func (t Tables) SubscriptionKind(ctx context.Context, id int64) (string, *int64, map[string]string, error) {
	var kind string
	var org *int64
	var settings map[string]string
	err := t.q.QueryRow(ctx, `SELECT kind, organization_id, settings FROM `+t.own(SubscriptionTable)+` WHERE id = $1`, id).Scan(&kind, &org, &settings)
	if errors.Is(err, pgx.ErrNoRows) {
		return "", nil, nil, ErrNoSubscription
	}
	return kind, org, settings, err
}

// SetContract sets the contract policy of subscription id (nil: the
// default's), which the caller has checked, and reports whether the
// subscription exists.
func (t Tables) SetContract(ctx context.Context, id int64, contract *string) (bool, error) {
	tag, err := t.q.Exec(ctx, `UPDATE `+t.own(SubscriptionTable)+` SET contract = $2, updated_at = now() WHERE id = $1`, id, contract)
	return tag.RowsAffected() > 0, err
}

// SetFilter sets the property filter of subscription id (nil: none), which
// the caller has compiled, and reports whether the subscription exists.
func (t Tables) SetFilter(ctx context.Context, id int64, filter *string) (bool, error) {
	tag, err := t.q.Exec(ctx, `UPDATE `+t.own(SubscriptionTable)+` SET filter = $2, updated_at = now() WHERE id = $1`, id, filter)
	return tag.RowsAffected() > 0, err
}

// KeepNewestSecret drops every secret of subscription id but its newest, and
// reports whether it had one.
func (t Tables) KeepNewestSecret(ctx context.Context, id int64) (bool, error) {
	tag, err := t.q.Exec(ctx, `UPDATE `+t.own(SubscriptionTable)+` SET secrets = secrets[1:1], updated_at = now() WHERE id = $1 AND cardinality(secrets) > 0`, id)
	return tag.RowsAffected() > 0, err
}

// AddSecret puts secret first (newest) in subscription id's secrets, and
// reports whether the subscription exists.
func (t Tables) AddSecret(ctx context.Context, id int64, secret string) (bool, error) {
	tag, err := t.q.Exec(ctx, `UPDATE `+t.own(SubscriptionTable)+` SET secrets = $2 || secrets, updated_at = now() WHERE id = $1`, id, []string{secret})
	return tag.RowsAffected() > 0, err
}

// SetEnabled enables or disables subscription id, with reason (nil when
// enabling), and reports whether it exists.
func (t Tables) SetEnabled(ctx context.Context, id int64, enabled bool, reason *string) (bool, error) {
	tag, err := t.q.Exec(ctx, `UPDATE `+t.own(SubscriptionTable)+` SET enabled = $2, disabled_reason = $3, updated_at = now() WHERE id = $1`, id, enabled, reason)
	return tag.RowsAffected() > 0, err
}

// DisableGone disables subscription id, if enabled, because its endpoint
// answered 410 Gone, and reports whether it did.
func (t Tables) DisableGone(ctx context.Context, id int64) (bool, error) {
	tag, err := t.q.Exec(ctx, `UPDATE `+t.own(SubscriptionTable)+` SET enabled = false,
  disabled_reason = '410 Gone at ' || now()::text, updated_at = now() WHERE id = $1 AND enabled`, id)
	return tag.RowsAffected() > 0, err
}
