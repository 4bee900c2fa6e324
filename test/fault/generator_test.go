package fault

import (
	"context"
	"math/rand/v2"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// Row is one committed outbox row as the generator saw it.
type Row struct {
	ID   int64
	Org  int64
	Name string // event_name
	// At is when the commit returned to the generator.
	At time.Time
}

// Generator inserts outbox rows in transactions and records every commit it
// saw succeed, in commit order (one goroutine commits at a time, so the order
// in which commits return is the commit order). A commit whose outcome is
// unknown (the connection broke during COMMIT) is not recorded: the table,
// read at the end, is the truth for what committed; the recorded order is the
// truth for what must arrive in order.
type Generator struct {
	pool *pgxpool.Pool
	orgs int

	mu      sync.Mutex // serialises commits and guards rows
	rows    []Row
	rng     *rand.Rand
	failed  int // transactions that failed (server down); retried by Run
	unknown int
	// names, when set, are the event names rows get at random (default
	// fault_event).
	names []string
}

// NewGenerator returns a generator spreading rows over orgs organizations
// (1..orgs).
func NewGenerator(pool *pgxpool.Pool, orgs int, seed uint64) *Generator {
	return &Generator{pool: pool, orgs: orgs, rng: rand.New(rand.NewPCG(seed, 11))}
}

const insertSQL = `INSERT INTO domain_event (event_name, organization_id, user_id, entity_type, entity_id, source, properties)
SELECT 'fault_event', o, 3, 'batch', 'B-' || o, 'fault', jsonb_build_object('seq', ord, 'note', 'ünïcødé "quoted"')
FROM unnest($1::bigint[]) WITH ORDINALITY AS u(o, ord) ORDER BY ord RETURNING id`

// insertNamedSQL is insertSQL with an event name per row.
const insertNamedSQL = `INSERT INTO domain_event (event_name, organization_id, user_id, entity_type, entity_id, source, properties)
SELECT n, o, 3, 'batch', 'B-' || o, 'fault', jsonb_build_object('seq', ord, 'note', 'ünïcødé "quoted"')
FROM unnest($1::bigint[], $2::text[]) WITH ORDINALITY AS u(o, n, ord) ORDER BY ord RETURNING id`

// SetNames makes rows take their event_name at random from names.
func (g *Generator) SetNames(names []string) {
	g.mu.Lock()
	g.names = names
	g.mu.Unlock()
}

// Txn commits one transaction of n rows with random organizations and
// records it.
func (g *Generator) Txn(ctx context.Context, n int) ([]int64, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	orgs := make([]int64, n)
	for i := range orgs {
		orgs[i] = 1 + g.rng.Int64N(int64(g.orgs))
	}
	return g.txnLocked(ctx, orgs)
}

// TxnOrgs commits one transaction with the given organizations.
func (g *Generator) TxnOrgs(ctx context.Context, orgs []int64) ([]int64, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.txnLocked(ctx, orgs)
}

func (g *Generator) txnLocked(ctx context.Context, orgs []int64) ([]int64, error) {
	tx, err := g.pool.Begin(ctx)
	if err != nil {
		g.failed++
		return nil, err
	}
	defer tx.Rollback(context.WithoutCancel(ctx)) //nolint:errcheck // no-op after commit
	names := make([]string, len(orgs))
	for i := range names {
		names[i] = "fault_event"
		if len(g.names) > 0 {
			names[i] = g.names[g.rng.IntN(len(g.names))]
		}
	}
	rs, err := tx.Query(ctx, insertNamedSQL, orgs, names)
	if err != nil {
		g.failed++
		return nil, err
	}
	ids, err := pgx.CollectRows(rs, pgx.RowTo[int64])
	if err != nil {
		g.failed++
		return nil, err
	}
	if err := tx.Commit(ctx); err != nil {
		g.unknown++
		return nil, err
	}
	now := time.Now()
	for i, id := range ids {
		g.rows = append(g.rows, Row{ID: id, Org: orgs[i], Name: names[i], At: now})
	}
	return ids, nil
}

// Commit runs commit, which commits rows the test inserted by itself (a long
// transaction, a COMMIT PREPARED, odd rows) and returns their ids and
// organizations, with the generator held off, and records them at their
// place in commit order.
func (g *Generator) Commit(commit func() (ids, orgs []int64, err error)) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	ids, orgs, err := commit()
	if err != nil {
		return err
	}
	now := time.Now()
	for i, id := range ids {
		g.rows = append(g.rows, Row{ID: id, Org: orgs[i], Name: "fault_event", At: now})
	}
	return nil
}

// Run commits transactions of 1..maxRows rows every interval until ctx ends
// or limit rows were committed (0: no limit). Failures (server down, cut
// connections) are retried at the next tick.
func (g *Generator) Run(ctx context.Context, interval time.Duration, maxRows, limit int) {
	tick := time.NewTicker(interval)
	defer tick.Stop()
	for ctx.Err() == nil {
		if limit > 0 && g.Len() >= limit {
			return
		}
		g.mu.Lock()
		n := 1 + g.rng.IntN(maxRows)
		g.mu.Unlock()
		tctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		_, _ = g.Txn(tctx, n)
		cancel()
		select {
		case <-ctx.Done():
		case <-tick.C:
		}
	}
}

// Start runs Run on a goroutine; the returned func stops it and waits.
func (g *Generator) Start(interval time.Duration, maxRows, limit int) (stop func()) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		g.Run(ctx, interval, maxRows, limit)
	}()
	return func() {
		cancel()
		<-done
	}
}

// Rows returns the recorded commits in commit order.
func (g *Generator) Rows() []Row {
	g.mu.Lock()
	defer g.mu.Unlock()
	return append([]Row(nil), g.rows...)
}

// Len is the number of recorded rows.
func (g *Generator) Len() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return len(g.rows)
}

// Failures returns the number of failed and of unknown-outcome transactions.
func (g *Generator) Failures() (failed, unknown int) {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.failed, g.unknown
}

// CommitChange runs commit (a change the test commits by itself, such as a
// subscription update) with the generator held off and returns its position
// in commit order: the number of recorded rows committed before it.
func (g *Generator) CommitChange(commit func() error) (int, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if err := commit(); err != nil {
		return 0, err
	}
	return len(g.rows), nil
}
