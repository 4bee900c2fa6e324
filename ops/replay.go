package ops

import (
	"context"
	"errors"
	"fmt"
	"math"
	"path"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"golang.org/x/time/rate"

	"github.com/outboxd/outboxd/decode"
	"github.com/outboxd/outboxd/deliver"
	"github.com/outboxd/outboxd/migrations"
	"github.com/outboxd/outboxd/plan"
	"github.com/outboxd/outboxd/sink"
	"github.com/outboxd/outboxd/store"
)

// ReplayHeader is the request header that marks a replayed delivery. Its
// value is "true". The webhook-id stays the event's message id, as on the
// first delivery, so receivers that deduplicate still can.
const ReplayHeader = "webhook-replay"

// Filter selects the rows to replay; zero fields do not filter. Every
// condition must hold.
type Filter struct {
	// FromID and ToID bound id, both inclusive.
	FromID, ToID *int64
	// Since and Until bound occurred_at: Since <= occurred_at < Until.
	Since, Until time.Time
	// Organizations keeps rows of these organization_id values.
	Organizations []int64
	// Events keeps rows whose event_name matches one of these globs
	// (path.Match syntax: *, ?, [a-z]).
	Events []string
	// TargetEvents are the globs of the target (a subscription's events);
	// when set, the name must match one of these too.
	TargetEvents []string
}

// ParseGlobs splits a comma-separated list of event-name globs and checks
// their syntax (the same rules as routing).
func ParseGlobs(list string) ([]string, error) { return deliver.ParseGlobs(list) }

func matchAny(globs []string, name string) bool { return deliver.MatchGlobs(globs, name) }

// Validate checks the filter's ranges and globs.
func (f Filter) Validate() error {
	if f.FromID != nil && f.ToID != nil && *f.FromID > *f.ToID {
		return fmt.Errorf("--from-id %d is after --to-id %d", *f.FromID, *f.ToID)
	}
	if !f.Since.IsZero() && !f.Until.IsZero() && !f.Since.Before(f.Until) {
		return fmt.Errorf("--since %s is not before --until %s", f.Since.Format(time.RFC3339), f.Until.Format(time.RFC3339))
	}
	for _, g := range append(slices.Clone(f.Events), f.TargetEvents...) {
		if _, err := path.Match(g, ""); err != nil {
			return fmt.Errorf("event glob %q: %w", g, err)
		}
	}
	return nil
}

// Subscription is the part of a subscription a replay needs.
type Subscription = store.Subscription

// ErrNoSubscriptions is returned by Subscription when the schema has no
// subscription table.
var ErrNoSubscriptions = errors.New("this database has no subscriptions (no outboxd_subscription table): replay to the default webhook, or run `outboxd migrate` with a version that has subscriptions")

// ErrUnknownSubscription is returned by Subscription for an id with no row.
var ErrUnknownSubscription = store.ErrNoSubscription

// Subscription reads subscription id.
func (c *Client) Subscription(ctx context.Context, id int64) (*Subscription, error) {
	ok, err := c.tables().Exists(ctx, store.SubscriptionTable)
	if err != nil {
		return nil, err
	}
	if !ok {
		return nil, ErrNoSubscriptions
	}
	s, err := c.tables().Subscription(ctx, id)
	if errors.Is(err, ErrUnknownSubscription) {
		return nil, fmt.Errorf("subscription %d: %w", id, ErrUnknownSubscription)
	}
	if err != nil {
		return nil, fmt.Errorf("read subscription %d: %w", id, err)
	}
	return s, nil
}

// StoredPlan returns the validator of the tracking plan stored now; nil
// when none is stored.
func (c *Client) StoredPlan(ctx context.Context) (*plan.Validator, error) {
	source, sha, ok, err := plan.Stored(ctx, c.pool, c.t.schema())
	if err != nil || !ok {
		return nil, err
	}
	p, err := plan.Parse(migrations.PlanTable, source)
	if err != nil {
		return nil, fmt.Errorf("the stored tracking plan does not parse: %w", err)
	}
	return plan.NewValidator(p, sha), nil
}

// Restrict narrows f to what subscription s receives: its organization (a
// tenant's endpoint never gets another tenant's events) and its event globs.
func (f Filter) Restrict(s *Subscription) (Filter, error) {
	if s.OrganizationID != nil {
		org := *s.OrganizationID
		if len(f.Organizations) > 0 && !slices.Contains(f.Organizations, org) {
			return f, fmt.Errorf("subscription %d receives organization %d only, not %v", s.ID, org, f.Organizations)
		}
		f.Organizations = []int64{org}
	}
	f.TargetEvents = s.Events
	return f, nil
}

// ReplayOptions configure Replay.
type ReplayOptions struct {
	Filter Filter
	// Sink receives the events; it may be nil with DryRun.
	Sink sink.Sink
	// DryRun counts the matching rows and delivers nothing.
	DryRun bool
	// Rate limits deliveries to this many events per second; 0: no limit.
	Rate float64
	// Concurrency is the number of deliveries in flight; default 1, which
	// delivers in id order. More may reorder events of one organization.
	Concurrency int
	// PageSize is the number of rows read per query; default 500.
	PageSize int
	// Progress, when set, gets the total and counts every delivery.
	Progress *Progress
	// Check, when set, says for each selected event whether the target gets
	// it: Send, or Filtered or Invalid for one its property filter or its
	// contract policy keeps from it, as run would. A withheld event is
	// counted, not sent. With DryRun and Check, the rows are read and
	// checked so that the counts say what a replay would send.
	Check func(e *decode.Event) Verdict
}

// Verdict is what a replay does with one event.
type Verdict int

// Verdicts.
const (
	// Send delivers the event.
	Send Verdict = iota
	// Filtered withholds it: the target's property filter does not let it
	// through.
	Filtered
	// Invalid withholds it: it breaks the tracking plan and the target's
	// contract policy is skip or dead-letter.
	Invalid
)

// ReplayResult counts what Replay did.
type ReplayResult struct {
	// Matched is the number of rows the filter selects (as of the start: rows
	// inserted later are left to the daemon).
	Matched int64 `json:"matched"`
	// ByEvent breaks Matched down by event_name.
	ByEvent map[string]int64 `json:"by_event"`
	// Replayed were acknowledged (2xx); Failed were not (after the sink's
	// retries); Skipped are rows that cannot become an event (a NULL id).
	Replayed int64 `json:"replayed"`
	Failed   int64 `json:"failed"`
	Skipped  int64 `json:"skipped"`
	// Filtered and Invalid were withheld (ReplayOptions.Check): the
	// target's property filter, or its contract policy, keeps them from it.
	Filtered int64 `json:"filtered"`
	Invalid  int64 `json:"invalid"`
	// FailedIDs are the first failed event ids (at most 100).
	FailedIDs []int64 `json:"failed_ids"`
}

const maxFailedIDs = 100

// query is a WHERE clause under construction.
type query struct {
	conds []string
	args  []any
}

func (q *query) add(cond string, arg any) {
	q.args = append(q.args, arg)
	q.conds = append(q.conds, strings.ReplaceAll(cond, "?", fmt.Sprintf("$%d", len(q.args))))
}

func (q *query) where() string {
	if len(q.conds) == 0 {
		return "true"
	}
	return strings.Join(q.conds, " AND ")
}

// Replay re-delivers the rows the filter selects, in id order, whatever
// their processed flag, to opts.Sink with the header webhook-replay: true. It
// marks nothing and does not touch the slot. An interrupted replay returns
// the counts so far and ctx's error.
func (c *Client) Replay(ctx context.Context, opts ReplayOptions) (*ReplayResult, error) {
	f := opts.Filter
	if err := f.Validate(); err != nil {
		return nil, err
	}
	if opts.Sink == nil && !opts.DryRun {
		return nil, errors.New("replay: no sink")
	}
	if opts.Concurrency <= 0 {
		opts.Concurrency = 1
	}
	if opts.PageSize <= 0 {
		opts.PageSize = 500
	}
	cols, err := c.columns(ctx)
	if err != nil {
		return nil, err
	}
	if !cols["id"] {
		return nil, fmt.Errorf("table %s does not exist or has no id column", c.t.Table)
	}
	for _, need := range []struct {
		col  string
		used bool
	}{
		{"occurred_at", !f.Since.IsZero() || !f.Until.IsZero()},
		{"organization_id", len(f.Organizations) > 0},
		{"event_name", len(f.Events) > 0 || len(f.TargetEvents) > 0},
	} {
		if need.used && !cols[need.col] {
			return nil, fmt.Errorf("table %s has no %s column to filter on", c.t.Table, need.col)
		}
	}
	if !f.Since.IsZero() || !f.Until.IsZero() {
		ok, err := c.isTimestamp(ctx, "occurred_at")
		if err != nil {
			return nil, err
		}
		if !ok {
			return nil, fmt.Errorf("table %s: occurred_at is not a timestamp, so --since/--until cannot filter on it; select by --from-id/--to-id", c.t.Table)
		}
	}

	// The upper bound is fixed at the start, so the replay ends and its
	// total is exact; later rows are the daemon's.
	var maxID *int64
	if err := c.pool.QueryRow(ctx, `SELECT max(id)::bigint FROM `+c.t.tableSQL()).Scan(&maxID); err != nil {
		return nil, fmt.Errorf("read highest id: %w", err)
	}
	res := &ReplayResult{ByEvent: map[string]int64{}, FailedIDs: []int64{}}
	if maxID == nil {
		return res, nil
	}
	var q query
	hi := *maxID
	if f.ToID != nil {
		hi = min(hi, *f.ToID)
	}
	q.add("e.id <= ?", hi)
	if f.FromID != nil {
		q.add("e.id >= ?", *f.FromID)
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

	// Count by event name; the globs pick names, which then filter in SQL.
	nameExpr := "''"
	if cols["event_name"] {
		nameExpr = "coalesce(e.event_name, '')"
	}
	rows, err := c.pool.Query(ctx, `SELECT `+nameExpr+`, count(*) FROM `+c.t.tableSQL()+` AS e WHERE `+q.where()+` GROUP BY 1`, q.args...)
	if err != nil {
		return nil, fmt.Errorf("count rows to replay: %w", err)
	}
	var names []string
	nullName := false
	for rows.Next() {
		var name string
		var n int64
		if err := rows.Scan(&name, &n); err != nil {
			rows.Close()
			return nil, fmt.Errorf("count rows to replay: %w", err)
		}
		if !matchAny(f.Events, name) || !matchAny(f.TargetEvents, name) {
			continue
		}
		res.ByEvent[name] += n
		res.Matched += n
		if name == "" {
			nullName = true
		}
		names = append(names, name)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("count rows to replay: %w", err)
	}
	if len(f.Events) > 0 || len(f.TargetEvents) > 0 {
		sort.Strings(names)
		cond := "e.event_name = ANY(?)"
		if nullName {
			cond = "(e.event_name = ANY(?) OR e.event_name IS NULL)"
		}
		q.add(cond, names)
	}
	if opts.Progress != nil {
		opts.Progress.SetTotal(res.Matched)
	}
	if (opts.DryRun && opts.Check == nil) || res.Matched == 0 {
		return res, nil
	}
	// The message ids are the daemon's (docs/DESIGN.md §4): the same
	// namespace, so a replayed event has the id it was first delivered with.
	ns, err := migrations.Namespace(ctx, c.pool, c.t.schema())
	if err != nil {
		return nil, err
	}
	return res, c.deliver(ctx, opts, q, ns, res)
}

// deliver pages through the selected rows by id (keyset, no OFFSET) and hands
// each event to the workers at the allowed rate.
func (c *Client) deliver(ctx context.Context, opts ReplayOptions, q query, ns string, res *ReplayResult) error {
	var (
		mu   sync.Mutex
		wg   sync.WaitGroup
		work = make(chan *decode.Event)
	)
	rctx := sink.WithHeader(ctx, ReplayHeader, "true")
	record := func(e *decode.Event, o sink.Outcome) {
		mu.Lock()
		defer mu.Unlock()
		if o.Err == nil {
			res.Replayed++
		} else {
			res.Failed++
			if len(res.FailedIDs) < maxFailedIDs {
				res.FailedIDs = append(res.FailedIDs, e.ID)
			}
			if ctx.Err() == nil {
				c.log.Warn().Int64("event_id", e.ID).Int("status", o.Status).Int("attempts", o.Attempts).Err(o.Err).Msg("replay delivery failed")
			}
		}
		if opts.Progress != nil {
			opts.Progress.add(o.Err == nil)
		}
	}
	workers := opts.Concurrency
	if opts.DryRun {
		workers = 0 // the producer checks and counts; nothing is sent
	}
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for e := range work {
				out := opts.Sink.Deliver(rctx, []*decode.Event{e})
				o := sink.Outcome{Err: errors.New("sink returned no outcome")}
				if len(out) == 1 {
					o = out[0]
				}
				record(e, o)
			}
		}()
	}
	err := c.produce(ctx, opts, q, ns, res, &mu, work)
	close(work)
	wg.Wait()
	return err
}

func (c *Client) produce(ctx context.Context, opts ReplayOptions, q query, ns string, res *ReplayResult, mu *sync.Mutex, work chan<- *decode.Event) error {
	lim := newLimiter(opts.Rate)
	last := int64(math.MinInt64)
	keyArg := len(q.args) + 1
	sql := `SELECT * FROM ` + c.t.tableSQL() + ` AS e WHERE e.id > $` + fmt.Sprint(keyArg) + ` AND ` + q.where() +
		` ORDER BY e.id LIMIT ` + fmt.Sprint(opts.PageSize)
	var rel *decode.Relation
	for {
		args := append(append([]any{pgx.QueryResultFormats{pgx.TextFormatCode}}, q.args...), last)
		page, err := c.page(ctx, sql, args, ns, &rel)
		if err != nil {
			return err
		}
		for _, p := range page {
			last = p.id
			if p.err != nil {
				mu.Lock()
				res.Skipped++
				mu.Unlock()
				c.log.Error().Err(p.err).Int64("event_id", p.id).Msg("row skipped: it cannot become an event")
				continue
			}
			if opts.Check != nil {
				if v := opts.Check(p.event); v != Send {
					mu.Lock()
					if v == Filtered {
						res.Filtered++
					} else {
						res.Invalid++
					}
					mu.Unlock()
					if opts.Progress != nil {
						opts.Progress.add(true)
					}
					continue
				}
			}
			if opts.DryRun {
				continue
			}
			if lim != nil {
				if err := lim.Wait(ctx); err != nil {
					return err
				}
			}
			select {
			case work <- p.event:
			case <-ctx.Done():
				return ctx.Err()
			}
		}
		if len(page) < opts.PageSize {
			return nil
		}
	}
}

// Events reads the rows of ids as the events the daemon would deliver
// (same envelopes, same message ids); an id without a row, or whose row
// cannot become an event, is absent from the map.
func (c *Client) Events(ctx context.Context, ids []int64) (map[int64]*decode.Event, error) {
	ns, err := migrations.Namespace(ctx, c.pool, c.t.schema())
	if err != nil {
		return nil, err
	}
	var rel *decode.Relation
	page, err := c.page(ctx, `SELECT * FROM `+c.t.tableSQL()+` AS e WHERE e.id = ANY($1)`,
		[]any{pgx.QueryResultFormats{pgx.TextFormatCode}, ids}, ns, &rel)
	if err != nil {
		return nil, err
	}
	out := make(map[int64]*decode.Event, len(page))
	for _, p := range page {
		if p.err == nil {
			out[p.id] = p.event
		}
	}
	return out, nil
}

type pageRow struct {
	id    int64
	event *decode.Event
	err   error
}

// page reads one page in text format, so rows become the same envelopes and
// message ids (in namespace ns) as the stream's (decode.EventFromText, as the
// catch-up does).
func (c *Client) page(ctx context.Context, sql string, args []any, ns string, rel **decode.Relation) ([]pageRow, error) {
	rows, err := c.pool.Query(ctx, sql, args...)
	if err != nil {
		return nil, fmt.Errorf("read rows to replay: %w", err)
	}
	defer rows.Close()
	var out []pageRow
	idCol := -1
	for rows.Next() {
		if *rel == nil {
			*rel = store.RelationOf(c.t.Table, rows.FieldDescriptions())
			if err := (*rel).Validate(); err != nil {
				return nil, fmt.Errorf("table %s: %w", c.t.Table, err)
			}
		}
		if idCol < 0 {
			for i, col := range (*rel).Columns {
				if col.Name == "id" {
					idCol = i
				}
			}
		}
		vals := rows.RawValues()
		var id int64
		fmt.Sscan(string(vals[idCol]), &id) //nolint:errcheck // an integer column; a NULL id fails below
		e, err := decode.EventFromText(ns, *rel, vals)
		if e != nil {
			e.Historical = true
		}
		out = append(out, pageRow{id: id, event: e, err: err})
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("read rows to replay: %w", err)
	}
	return out, nil
}

// newLimiter spaces events evenly at rate per second with no burst (nil:
// no limit); a late caller does not catch up with a burst.
func newLimiter(r float64) *rate.Limiter {
	if r <= 0 {
		return nil
	}
	return rate.NewLimiter(rate.Limit(r), 1)
}
