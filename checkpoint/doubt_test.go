package checkpoint

import (
	"context"
	"errors"
	"slices"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/rs/zerolog"

	"github.com/outboxd/outboxd/internal/pgtest"
	"github.com/outboxd/outboxd/migrations"
	"github.com/outboxd/outboxd/store"
)

func TestMain(m *testing.M) { pgtest.Main(m) }

// A checkpoint write whose COMMIT answer is lost (a connection cut at that
// moment, a write cut by its timeout) may have committed. Written again, it
// counted its rows' attempts and its parked deliveries' attempts twice: a
// soak found rows processed with delivery_attempts 3 after 2 requests. The
// flusher now asks the server what became of the transaction before it
// writes anything again, in each of the three ways a commit is cut.
func TestFlushWhoseCommitAnswerWasLostIsWrittenOnce(t *testing.T) {
	for _, tc := range []struct {
		name      string
		cut       pgtest.CommitCut
		committed bool
	}{
		{"committed, answer lost", pgtest.AnswerLost, true},
		{"commit lost", pgtest.CommitLost, false},
		{"backend left in the transaction", pgtest.BackendStuck, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			db := pgtest.NewMigrated(t)
			flushAcrossCut(t, db.URL, db.Conn, tc.cut, nil)
		})
	}
}

// A write whose COMMIT got no answer, then a server restart before the
// flusher asks: the transaction's id means nothing any more (one that never
// became durable is "in the future", then given to another transaction),
// so the write's token answers. Before, the flusher exited on "transaction
// ID is in the future" (the soak of seed 5), or would have taken another
// transaction's commit for its own and dropped its batch.
func TestFlushInDoubtAcrossARestart(t *testing.T) {
	for _, tc := range []struct {
		name string
		cut  pgtest.CommitCut
	}{
		{"committed, answer lost", pgtest.AnswerLost},
		{"commit lost, its id given again", pgtest.CommitLost},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			srv := pgtest.New(t, nil)
			url := srv.NewDatabase(t)
			ctx := context.Background()
			conn, err := pgx.Connect(ctx, url)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := migrations.Migrate(ctx, conn, migrations.Options{Schema: "public", Table: "domain_event", Publication: "outboxd"}); err != nil {
				t.Fatal(err)
			}
			_ = conn.Close(ctx)
			flushAcrossCut(t, url, nil, tc.cut, func(doubt *store.InDoubtError) {
				srv.Restart(t, "immediate")
				// Burn transaction ids until the lost one has been given
				// again, to a transaction that commits.
				c, err := pgx.Connect(ctx, url)
				if err != nil {
					t.Fatal(err)
				}
				defer c.Close(ctx)
				for {
					var xid uint64
					if err := c.QueryRow(ctx, `SELECT pg_current_xact_id()::text::bigint`).Scan(&xid); err != nil {
						t.Fatal(err)
					}
					if xid >= doubt.XID {
						return
					}
				}
			})
		})
	}
}

// flushAcrossCut settles two transactions, cuts the flush of the first as
// cut says, runs between (when set), then flushes again and checks that
// each was written once. conn, when nil, is opened on url.
func flushAcrossCut(t *testing.T, url string, conn *pgx.Conn, cut pgtest.CommitCut, between func(*store.InDoubtError)) {
	ctx := context.Background()
	if conn == nil {
		var err error
		if conn, err = pgx.Connect(ctx, url); err != nil {
			t.Fatal(err)
		}
		defer conn.Close(ctx)
	}
	rows, err := conn.Query(ctx, `INSERT INTO domain_event (event_name) SELECT 'batch_started' FROM generate_series(1, 3) RETURNING id`)
	if err != nil {
		t.Fatal(err)
	}
	ids, err := pgx.CollectRows(rows, pgx.RowTo[int64])
	if err != nil {
		t.Fatal(err)
	}
	cutter := pgtest.NewCommitCutter(t, url)
	ss := store.NewSlotStore(cutter.Pool(t, url), store.SlotConfig{Schema: "public", Table: "domain_event", Slot: "doubt"})
	if err := ss.Save(ctx, store.Checkpoint{LSN: 100}); err != nil {
		t.Fatal(err)
	}
	tr := NewTracker(100, 1)
	f := &Flusher{Tracker: tr, Writer: ss, Log: zerolog.Nop()}

	// First transaction: ids[0] delivered (1 attempt), ids[1] parked after
	// 2 attempts.
	seq := tr.Open(200, false)
	settle(t, tr, seq, Settlement{EventID: ids[0], Mark: &store.Mark{ID: ids[0], Attempts: 1}})
	settle(t, tr, seq, Settlement{EventID: ids[1], Attempts: 2,
		Parked: []store.Park{{EventID: ids[1], Target: "webhook", Key: 1, Attempts: 2, Reason: "503"}}})
	if err := tr.Close(seq, 300, 2); err != nil {
		t.Fatal(err)
	}
	fired := cutter.Arm(cut)
	err = f.flush(ctx, 0)
	<-fired
	var doubt *store.InDoubtError
	if !errors.As(err, &doubt) {
		t.Fatalf("flush over a cut commit: %v; want an error saying its outcome is unknown", err)
	}
	if between != nil {
		between(doubt)
	}

	// Second transaction settles meanwhile; the next flush records both,
	// the first one once.
	seq = tr.Open(400, false)
	settle(t, tr, seq, Settlement{EventID: ids[2], Mark: &store.Mark{ID: ids[2], Attempts: 1}})
	if err := tr.Close(seq, 500, 1); err != nil {
		t.Fatal(err)
	}
	if err := f.flush(ctx, 0); err != nil {
		t.Fatalf("flush after the cut: %v", err)
	}
	if between != nil {
		// The server restarted: a connection of now.
		if conn, err = pgx.Connect(ctx, url); err != nil {
			t.Fatal(err)
		}
		defer conn.Close(ctx)
	}

	var attempts []int32
	var processed []bool
	rows, err = conn.Query(ctx, `SELECT delivery_attempts, coalesce(is_processed, false) FROM domain_event ORDER BY id`)
	if err != nil {
		t.Fatal(err)
	}
	for rows.Next() {
		var a int32
		var p bool
		if err := rows.Scan(&a, &p); err != nil {
			t.Fatal(err)
		}
		attempts, processed = append(attempts, a), append(processed, p)
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	if want := []int32{1, 2, 1}; !slices.Equal(attempts, want) {
		t.Errorf("delivery_attempts %v; want %v (each write counted once)", attempts, want)
	}
	if want := []bool{true, false, true}; !slices.Equal(processed, want) {
		t.Errorf("is_processed %v; want %v", processed, want)
	}
	var parkedAttempts int32
	var lsn string
	if err := conn.QueryRow(ctx, `SELECT attempts FROM outboxd_parked WHERE event_id = $1`, ids[1]).Scan(&parkedAttempts); err != nil {
		t.Fatal(err)
	}
	if parkedAttempts != 2 {
		t.Errorf("parked delivery has %d attempts; want 2", parkedAttempts)
	}
	if err := conn.QueryRow(ctx, `SELECT lsn::text FROM outboxd_checkpoint WHERE slot_name = 'doubt'`).Scan(&lsn); err != nil {
		t.Fatal(err)
	}
	if lsn != "0/1F4" {
		t.Errorf("checkpoint at %s; want 0/1F4 (the second transaction's end)", lsn)
	}
	if tr.Flushed() != 500 {
		t.Errorf("tracker written up to %d; want 500", tr.Flushed())
	}
}

func settle(t *testing.T, tr *Tracker, seq uint64, s Settlement) {
	t.Helper()
	if err := tr.Settle(seq, s); err != nil {
		t.Fatal(err)
	}
}
