package ops

import (
	"context"
	"fmt"

	"github.com/jackc/pgx/v5"

	"github.com/outboxd/outboxd/decode"
	"github.com/outboxd/outboxd/migrations"
)

// Recent reads the last limit rows of the table (highest ids) that f's id
// and occurred_at bounds and organizations select, processed or not, and
// returns them oldest first as the events the daemon makes of them: the same
// envelopes and message ids as replay's (decode.EventFromText). Rows that
// cannot become an event (a NULL id) are counted in skipped. It marks
// nothing. f's event globs are not applied.
func (c *Client) Recent(ctx context.Context, f Filter, limit int) (events []*decode.Event, skipped int, err error) {
	if err := f.Validate(); err != nil {
		return nil, 0, err
	}
	if limit <= 0 {
		return nil, 0, fmt.Errorf("limit must be positive, got %d", limit)
	}
	cols, err := c.columns(ctx)
	if err != nil {
		return nil, 0, err
	}
	if !cols["id"] {
		return nil, 0, fmt.Errorf("table %s does not exist or has no id column", c.t.Table)
	}
	if (!f.Since.IsZero() || !f.Until.IsZero()) && !cols["occurred_at"] {
		return nil, 0, fmt.Errorf("table %s has no occurred_at column to filter on", c.t.Table)
	}
	if len(f.Organizations) > 0 && !cols["organization_id"] {
		return nil, 0, fmt.Errorf("table %s has no organization_id column to filter on", c.t.Table)
	}
	var q query
	if f.FromID != nil {
		q.add("e.id >= ?", *f.FromID)
	}
	if f.ToID != nil {
		q.add("e.id <= ?", *f.ToID)
	}
	if !f.Since.IsZero() {
		q.add("e.occurred_at >= ?", f.Since)
	}
	if !f.Until.IsZero() {
		q.add("e.occurred_at < ?", f.Until)
	}
	if len(f.Organizations) > 0 {
		q.add("e.organization_id = ANY(?)", f.Organizations)
	}
	ns, err := migrations.Namespace(ctx, c.pool, c.t.schema())
	if err != nil {
		return nil, 0, err
	}
	// The newest rows, then put back in id order.
	sql := `SELECT * FROM (SELECT * FROM ` + c.t.tableSQL() + ` AS e WHERE e.id IS NOT NULL AND ` + q.where() +
		` ORDER BY e.id DESC LIMIT ` + fmt.Sprint(limit) + `) AS e ORDER BY e.id`
	args := append([]any{pgx.QueryResultFormats{pgx.TextFormatCode}}, q.args...)
	var rel *decode.Relation
	page, err := c.page(ctx, sql, args, ns, &rel)
	if err != nil {
		return nil, 0, err
	}
	for _, p := range page {
		if p.err != nil {
			skipped++
			c.log.Error().Err(p.err).Int64("event_id", p.id).Msg("row skipped: it cannot become an event")
			continue
		}
		events = append(events, p.event)
	}
	return events, skipped, nil
}
