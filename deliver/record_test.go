package deliver

import (
	"context"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/rs/zerolog"

	"github.com/outboxd/outboxd/internal/pgtest"
	"github.com/outboxd/outboxd/sink"
	"github.com/outboxd/outboxd/store"
)

func TestMain(m *testing.M) { pgtest.Main(m) }

// A page of retried deliveries whose recording committed while its answer
// was lost is recorded: the dispatcher is told the key has nothing parked
// any more. Before, the retrier took the lost answer for a failure: the
// parked rows were gone from the table, and the dispatcher went on parking
// every later event of the key behind deliveries that no longer existed.
func TestRecordWhoseCommitAnswerWasLostUnparksTheKey(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	db := pgtest.NewMigrated(t)
	rows, err := db.Conn.Query(ctx, `INSERT INTO domain_event (event_name) SELECT 'timer_started' FROM generate_series(1, 2) RETURNING id`)
	if err != nil {
		t.Fatal(err)
	}
	ids, err := pgx.CollectRows(rows, pgx.RowTo[int64])
	if err != nil {
		t.Fatal(err)
	}
	cfg := store.SlotConfig{Schema: "public", Table: "domain_event", Slot: "record"}
	var parked store.Batch
	for _, id := range ids {
		parked.Parked = append(parked.Parked, store.Park{EventID: id, Target: DefaultTarget, Key: 7, Attempts: 1, Reason: "503"})
	}
	if err := store.NewSlotStore(db.Pool, cfg).Write(ctx, parked); err != nil {
		t.Fatal(err)
	}

	cutter := pgtest.NewCommitCutter(t, db.URL)
	ss := store.NewSlotStore(cutter.Pool(t, db.URL), cfg)
	disp := New(Params{Target: DefaultTarget, Log: zerolog.Nop(), Parked: map[uint64]int{7: len(ids)}})
	k := keyRun{r: &Retrier{Resolver: ss}, disp: disp, h: store.ParkedHead{Target: DefaultTarget, Key: 7}, log: zerolog.Nop()}
	for _, id := range ids {
		k.note(store.Delivered, id, 0, sink.Outcome{Attempts: 1}, "")
	}
	fired := cutter.Arm(pgtest.AnswerLost)
	if err := k.record(ctx); err != nil {
		t.Fatalf("record: %v", err)
	}
	<-fired
	if n := disp.ParkedKeys(); n != 0 {
		t.Errorf("the dispatcher holds %d keys parked; want 0 (the page was recorded)", n)
	}
	var processed, attempts int
	if err := db.Conn.QueryRow(ctx, `SELECT count(*) FILTER (WHERE is_processed), sum(delivery_attempts) FROM domain_event`).Scan(&processed, &attempts); err != nil {
		t.Fatal(err)
	}
	if processed != len(ids) || attempts != len(ids) {
		t.Errorf("%d rows processed with %d attempts; want %d with %d", processed, attempts, len(ids), len(ids))
	}
}
