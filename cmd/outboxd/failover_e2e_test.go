package main

import (
	"context"
	"fmt"
	"net/url"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/require"

	"github.com/outboxd/outboxd/internal/e2e"
	"github.com/outboxd/outboxd/internal/pgtest"
)

// standbySlot is the physical slot of the standby on the primary, and the
// standby's application_name (its name in synchronous_standby_names).
const standbySlot = "outboxd_standby"

// TestFailoverToPromotedStandby: a primary and a physical standby in
// synchronous replication, outboxd on a multi-host connection string
// (target_session_attrs=read-write), events flowing; the primary is killed
// (SIGKILL to its postmaster) and the standby promoted while inserts go on.
// On PostgreSQL 17 and later the slot has failover on and is synchronized to
// the standby, and outboxd continues from it without recreating it; before
// 17 it recreates the slot (OUTBOXD_SLOT_RECREATE=true) and catches up from
// the table. Either way every row of the promoted server is delivered (lost
// 0), every acknowledged commit is among them (synchronous replication), and
// an event already marked processed before the kill is never delivered
// again: duplicates only in the unconfirmed window. When the old primary
// comes back, outboxd refuses it.
func TestFailoverToPromotedStandby(t *testing.T) {
	t.Parallel()
	pgtest.ForEachMajor(t, func(t *testing.T) { failover(t, false) })
}

// TestFailoverRestartOnPromotedStandby is the failover with outboxd killed
// with the primary and started on the promoted standby: the start-up
// reconciliation tells the promotion (same system identifier, later
// timeline) and continues from the synchronized slot (17+) or recreates it
// (15/16).
func TestFailoverRestartOnPromotedStandby(t *testing.T) {
	t.Parallel()
	pgtest.ForEachMajor(t, func(t *testing.T) { failover(t, true) })
}

// failover runs the failover test; with restart, outboxd dies with the
// primary and is started again after the promotion.
func failover(t *testing.T, restart bool) {
	ctx := context.Background()
	primary := pgtest.New(t, nil)
	synced := primary.Major() >= 17
	dbURL := primary.NewDatabase(t)
	u, err := url.Parse(dbURL)
	require.NoError(t, err)
	db := strings.TrimPrefix(u.Path, "/")
	recv := e2e.NewReceiver(t)
	slot := e2e.SlotName(dbURL)
	code, out := e2e.RunCommand(t, e2e.Env(dbURL, slot, recv.URL, nil), "migrate")
	require.Equal(t, 0, code, out)

	primary.Exec(t, "postgres", "SELECT pg_create_physical_replication_slot($1, true)", standbySlot)
	settings := map[string]string{
		"primary_slot_name":    standbySlot,
		"hot_standby":          "on",
		"hot_standby_feedback": "on",
		"primary_conninfo":     fmt.Sprintf("host=127.0.0.1 port=%d user=postgres dbname=postgres application_name=%s", primary.Port, standbySlot),
	}
	if synced {
		settings["sync_replication_slots"] = "on"
	}
	standby := pgtest.NewStandby(t, primary, settings)
	// Set after the base backup, so that the promoted standby does not
	// inherit them (it has no standby of its own).
	primary.Exec(t, "postgres", "ALTER SYSTEM SET synchronous_standby_names = '"+standbySlot+"'")
	if synced {
		primary.Exec(t, "postgres", "ALTER SYSTEM SET synchronized_standby_slots = '"+standbySlot+"'")
	}
	primary.Exec(t, "postgres", "SELECT pg_reload_conf()")
	admin := primary.AdminConn(t)
	e2e.WaitFor(t, time.Minute, func() bool {
		var state string
		err := admin.QueryRow(ctx, "SELECT sync_state FROM pg_stat_replication WHERE application_name = $1", standbySlot).Scan(&state)
		return err == nil && state == "sync"
	}, func() string { return "the standby is not a synchronous standby" })

	dsn := fmt.Sprintf("host=127.0.0.1,127.0.0.1 port=%d,%d user=postgres dbname=%s sslmode=disable target_session_attrs=read-write connect_timeout=5",
		primary.Port, standby.Port, db)
	extra := map[string]string{}
	if !synced {
		extra["OUTBOXD_SLOT_RECREATE"] = "true"
	}
	d := e2e.StartDaemon(t, e2e.Env(dsn, slot, recv.URL, extra))
	pool := e2e.Pool(t, dsn)
	ins := startFailoverInserter(pool)
	defer ins.stop()

	// Events flow, and on 17+ the slot is synchronized to the standby
	// and has confirmed something there.
	e2e.WaitProgress(t, time.Minute, func() (bool, int64) {
		n := recv.Len()
		return n >= 300, int64(n)
	}, func() string { return "no deliveries before the failover" })
	standbyConn := standby.Conn(t, db)
	if synced {
		var failover bool
		require.NoError(t, admin.QueryRow(ctx, "SELECT failover FROM pg_replication_slots WHERE slot_name = $1", slot).Scan(&failover))
		require.True(t, failover, "the slot is created with failover on PostgreSQL 17+")
		e2e.WaitFor(t, 2*time.Minute, func() bool {
			var ok bool
			err := standbyConn.QueryRow(ctx, `SELECT synced AND NOT temporary AND confirmed_flush_lsn > '0/0'
FROM pg_replication_slots WHERE slot_name = $1`, slot).Scan(&ok)
			return err == nil && ok
		}, func() string { return "the slot is not synchronized to the standby" })
		code, out := e2e.RunCommand(t, e2e.Env(fmt.Sprintf("host=127.0.0.1 port=%d user=postgres dbname=%s sslmode=disable", standby.Port, db), slot, recv.URL, nil), "status", "--json")
		require.Contains(t, out, `"ready": true`, "status on the standby (exit %d)", code)
	}

	// What was marked processed before the kill was confirmed: it must
	// never be delivered again.
	processed := processedIDs(t, pool)
	var synchronizedAt string
	if synced {
		require.NoError(t, standbyConn.QueryRow(ctx, "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1", slot).Scan(&synchronizedAt))
	}
	if restart {
		d.Kill()
	}
	primary.Kill(t)
	killedAt := time.Now()
	var promoted bool
	require.NoError(t, standbyConn.QueryRow(ctx, "SELECT pg_promote()").Scan(&promoted))
	require.True(t, promoted)
	promotedAt := time.Now()
	ins.markPromoted()
	if restart {
		d = e2e.StartDaemon(t, e2e.Env(dsn, slot, recv.URL, extra))
	}

	// Inserts go on on the new primary.
	e2e.WaitProgress(t, 2*time.Minute, func() (bool, int64) {
		n := ins.afterPromotion()
		return n >= 500, int64(n)
	}, func() string { return "inserts on the promoted standby stalled" })
	acked, fresh := ins.stop()

	// Every row of the promoted server is delivered and marked.
	rows := tableIDs(t, pool)
	missing := 0
	inTable := map[int64]bool{}
	for _, id := range rows {
		inTable[id] = true
	}
	for _, id := range acked {
		if !inTable[id] {
			missing++
		}
	}
	require.Zero(t, missing, "acknowledged commits missing on the promoted standby: synchronous replication must have them")
	recv.WaitAccepted(t, rows, 2*time.Minute)
	e2e.WaitProgress(t, time.Minute, func() (bool, int64) {
		n, _ := e2e.Processed(t, pool)
		return n >= int64(len(rows)), n
	}, func() string { return "rows not marked processed on the promoted standby" })

	c := recv.Count(rows)
	require.Zero(t, c.Lost)
	require.Zero(t, c.BadSignatures)
	if synced {
		// Logical walsenders wait for the standby's slot
		// (synchronized_standby_slots): nothing was delivered that
		// the standby did not have.
		require.Zero(t, c.Unexpected, "delivered events that the promoted standby does not have")
	}
	var firstFresh time.Time
	redelivered := 0
	seen := map[int64]bool{}
	for _, dl := range recv.Deliveries() {
		if dl.Status/100 != 2 {
			continue
		}
		for _, id := range dl.IDs {
			if dl.At.After(killedAt) && processed[id] {
				t.Errorf("event %d was marked processed before the kill and delivered again after it", id)
			}
			if seen[id] {
				redelivered++
			}
			seen[id] = true
			if fresh[id] && (firstFresh.IsZero() || dl.At.Before(firstFresh)) {
				firstFresh = dl.At
			}
		}
	}
	require.False(t, firstFresh.IsZero())
	var timeline int32
	require.NoError(t, pool.QueryRow(ctx, "SELECT timeline FROM outboxd_checkpoint WHERE slot_name = $1", slot).Scan(&timeline))
	require.EqualValues(t, 2, timeline, "the checkpoint records the promoted server's timeline")
	log := d.Log()
	path := "synchronized slot"
	switch {
	case synced && restart:
		require.NotContains(t, log, "recreating slot", "PostgreSQL 17+ continues from the synchronized slot")
		require.Contains(t, log, "continuing from the slot synchronized before the promotion")
	case synced:
		require.NotContains(t, log, "recreating slot", "PostgreSQL 17+ continues from the synchronized slot")
		require.Contains(t, log, "reconnected to a promoted server")
	default:
		path = "recreate + catch-up"
		require.Contains(t, log, "recreating slot")
		require.Contains(t, log, "catch-up read the table")
	}
	require.False(t, d.Exited(), "outboxd follows the promotion")
	if restart {
		path += ", outboxd restarted"
	}
	t.Logf("failover PostgreSQL %d (%s): first delivery of an event committed on the promoted standby %s after the kill (promotion done %s after it); %s; redelivered copies %d, all outside the confirmed set; %d rows (%d acknowledged inserts, %d after the promotion); slot synchronized up to %s at the kill",
		primary.Major(), path, firstFresh.Sub(killedAt).Round(time.Millisecond), promotedAt.Sub(killedAt).Round(time.Millisecond),
		c, redelivered, len(rows), len(acked), len(fresh), orNone(synchronizedAt))
	if restart {
		require.Equal(t, 0, d.Stop(30*time.Second))
		return
	}

	// The killed primary comes back, read-write on the old timeline,
	// first in the connection string (split brain): a reconnect must
	// not stream from it. It used to, since only the system
	// identifier was compared.
	primary.Start(t)
	_, err = standbyConn.Exec(ctx, "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = $1", slot)
	require.NoError(t, err)
	require.Equal(t, 1, d.Wait(time.Minute), "outboxd must refuse the former primary")
	require.Contains(t, d.Log(), "a former primary after a failover")
	// Its commits would wait for the standby it lost.
	primary.Stop(t, "immediate")
}

// failoverInserter commits transactions of 1 to 5 rows, one after the other,
// through a pool on the multi-host connection string, and goes on after a
// failed one (the primary gone: the pool connects to the promoted standby
// once it accepts writes). It keeps the ids of acknowledged commits; a
// commit whose outcome is unknown (cut) is found, or not, in the table.
type failoverInserter struct {
	mu       sync.Mutex
	acked    []int64
	promoted bool
	fresh    map[int64]bool // acknowledged after the promotion
	done     chan struct{}
	finished chan struct{}
	once     sync.Once
}

func startFailoverInserter(pool *pgxpool.Pool) *failoverInserter {
	ins := &failoverInserter{fresh: map[int64]bool{}, done: make(chan struct{}), finished: make(chan struct{})}
	go func() {
		defer close(ins.finished)
		pace := time.NewTicker(2 * time.Millisecond) // about the rate of a busy application
		defer pace.Stop()
		for n := 0; ; n++ {
			select {
			case <-ins.done:
				return
			case <-pace.C:
			}
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			ids, err := e2e.InsertErr(ctx, pool, 1, 1+n%5, func(i int) int64 { return int64(i % 4) })
			cancel()
			if err != nil {
				continue // the failover: the next attempt reconnects
			}
			ins.mu.Lock()
			ins.acked = append(ins.acked, ids...)
			if ins.promoted {
				for _, id := range ids {
					ins.fresh[id] = true
				}
			}
			ins.mu.Unlock()
		}
	}()
	return ins
}

// markPromoted counts the commits acknowledged from now on as the promoted
// standby's own.
func (ins *failoverInserter) markPromoted() {
	ins.mu.Lock()
	defer ins.mu.Unlock()
	ins.promoted = true
}

func (ins *failoverInserter) afterPromotion() int {
	ins.mu.Lock()
	defer ins.mu.Unlock()
	return len(ins.fresh)
}

// stop ends the inserts and returns the acknowledged ids and those of them
// acknowledged after the promotion.
func (ins *failoverInserter) stop() ([]int64, map[int64]bool) {
	ins.once.Do(func() { close(ins.done) })
	<-ins.finished
	ins.mu.Lock()
	defer ins.mu.Unlock()
	return slices.Clone(ins.acked), ins.fresh
}

func processedIDs(t *testing.T, pool *pgxpool.Pool) map[int64]bool {
	t.Helper()
	out := map[int64]bool{}
	for _, id := range queryIDs(t, pool, "SELECT id FROM domain_event WHERE is_processed") {
		out[id] = true
	}
	return out
}

func tableIDs(t *testing.T, pool *pgxpool.Pool) []int64 {
	t.Helper()
	return queryIDs(t, pool, "SELECT id FROM domain_event ORDER BY id")
}

func queryIDs(t *testing.T, pool *pgxpool.Pool, sql string) []int64 {
	t.Helper()
	rs, err := pool.Query(context.Background(), sql)
	require.NoError(t, err)
	defer rs.Close()
	var ids []int64
	for rs.Next() {
		var id int64
		require.NoError(t, rs.Scan(&id))
		ids = append(ids, id)
	}
	require.NoError(t, rs.Err())
	return ids
}

// The slot's failover follows OUTBOXD_SLOT_FAILOVER on PostgreSQL 17+: set
// when the slot is created, cleared at a start with false, set again at a
// start with the default (ALTER_REPLICATION_SLOT, the slot being inactive);
// events are delivered once across these restarts. Before 17 the setting is
// ignored with an info line.
func TestSlotFailoverFollowsTheSetting(t *testing.T) {
	t.Parallel()
	pgtest.ForEachMajor(t, func(t *testing.T) {
		srv := pgtest.Shared(t)
		b := newBundle(t, srv, nil)
		failover := func() *string {
			var v *string
			require.NoError(t, b.pool.QueryRow(context.Background(),
				`SELECT to_jsonb(s) ->> 'failover' FROM pg_replication_slots s WHERE slot_name = $1`, b.env["OUTBOXD_SLOT"]).Scan(&v))
			return v
		}
		start := func(env map[string]string) *e2e.Daemon {
			d := e2e.StartDaemon(t, env)
			e2e.WaitFor(t, time.Minute, func() bool { return strings.Contains(d.Log(), `"streaming"`) }, func() string { return "not streaming" })
			return d
		}
		d := start(b.env)
		var ids []int64
		ids = append(ids, e2e.Insert(t, b.pool, 10, 2, one)...)
		if srv.Major() < 17 {
			require.Nil(t, failover())
			require.Contains(t, d.Log(), "OUTBOXD_SLOT_FAILOVER ignored")
		} else {
			require.Equal(t, "true", *failover(), "created with failover")
			b.recv.WaitAccepted(t, ids, time.Minute)
			require.Equal(t, 0, d.Stop(30*time.Second))
			off := map[string]string{}
			for k, v := range b.env {
				off[k] = v
			}
			off["OUTBOXD_SLOT_FAILOVER"] = "false"
			d = start(off)
			require.Equal(t, "false", *failover(), "cleared at a start with OUTBOXD_SLOT_FAILOVER=false")
			ids = append(ids, e2e.Insert(t, b.pool, 10, 2, one)...)
			b.recv.WaitAccepted(t, ids, time.Minute)
			require.Equal(t, 0, d.Stop(30*time.Second))
			d = start(b.env)
			require.Equal(t, "true", *failover(), "set again at a start with the default")
			require.Contains(t, d.Log(), "slot failover set")
		}
		ids = append(ids, e2e.Insert(t, b.pool, 10, 2, one)...)
		b.recv.WaitAccepted(t, ids, time.Minute)
		c := b.recv.Count(ids)
		require.Zero(t, c.Lost)
		require.Zero(t, c.Duplicates, "clean restarts deliver nothing twice")
		require.Equal(t, 0, d.Stop(30*time.Second))
	})
}

// A failover slot without synchronized_standby_slots, on an asynchronous
// standby that stopped receiving: outboxd delivered transactions from the
// old primary that the standby never got, so the promoted server's timeline
// forks before the position outboxd would resume from. Streaming on from
// there skipped the promoted server's first transactions (their LSNs lie
// below it, on the new timeline); outboxd now sees the fork in the timeline
// history and starts again from the checkpoint. Every row of the promoted
// server is delivered; the rows the standby never got are gone with the old
// primary (asynchronous replication), delivered once before the failure.
func TestFailoverToALaggingStandby(t *testing.T) {
	t.Parallel()
	pgtest.ForEachMajor(t, func(t *testing.T) {
		ctx := context.Background()
		primary := pgtest.New(t, nil)
		if primary.Major() < 17 {
			t.Skip("failover slots need PostgreSQL 17; before, the slot is recreated and caught up from the table")
		}
		dbURL := primary.NewDatabase(t)
		u, err := url.Parse(dbURL)
		require.NoError(t, err)
		db := strings.TrimPrefix(u.Path, "/")
		recv := e2e.NewReceiver(t)
		slot := e2e.SlotName(dbURL)
		code, out := e2e.RunCommand(t, e2e.Env(dbURL, slot, recv.URL, nil), "migrate")
		require.Equal(t, 0, code, out)
		primary.Exec(t, "postgres", "SELECT pg_create_physical_replication_slot($1, true)", standbySlot)
		standby := pgtest.NewStandby(t, primary, map[string]string{
			"primary_slot_name": standbySlot, "hot_standby": "on", "hot_standby_feedback": "on", "sync_replication_slots": "on",
			"primary_conninfo": fmt.Sprintf("host=127.0.0.1 port=%d user=postgres dbname=postgres application_name=%s", primary.Port, standbySlot),
		})
		dsn := fmt.Sprintf("host=127.0.0.1,127.0.0.1 port=%d,%d user=postgres dbname=%s sslmode=disable target_session_attrs=read-write connect_timeout=5",
			primary.Port, standby.Port, db)
		d := e2e.StartDaemon(t, e2e.Env(dsn, slot, recv.URL, nil))
		pool := e2e.Pool(t, dbURL)
		standbyConn := standby.Conn(t, db)

		// A: on both servers, delivered, the slot synchronized.
		a := e2e.Insert(t, pool, 200, 1, one)
		recv.WaitAccepted(t, a, time.Minute)
		var end string
		require.NoError(t, pool.QueryRow(ctx, "SELECT pg_current_wal_lsn()::text").Scan(&end))
		e2e.WaitFor(t, 2*time.Minute, func() bool {
			var ok bool
			err := standbyConn.QueryRow(ctx, `SELECT synced AND NOT temporary AND confirmed_flush_lsn > '0/0' AND pg_last_wal_receive_lsn() >= $2::pg_lsn
FROM pg_replication_slots WHERE slot_name = $1`, slot, end).Scan(&ok)
			return err == nil && ok
		}, func() string { return "the slot is not synchronized to the standby" })

		// B: the standby stops receiving; outboxd delivers B from the
		// primary alone.
		standby.Exec(t, "postgres", "ALTER SYSTEM SET primary_conninfo = ''")
		standby.Exec(t, "postgres", "SELECT pg_reload_conf()")
		admin := primary.AdminConn(t)
		e2e.WaitFor(t, time.Minute, func() bool {
			var n int
			return admin.QueryRow(ctx, "SELECT count(*) FROM pg_stat_replication WHERE application_name = $1", standbySlot).Scan(&n) == nil && n == 0
		}, func() string { return "the standby still receives" })
		b := e2e.Insert(t, pool, 100, 1, one)
		recv.WaitAccepted(t, b, time.Minute)

		primary.Kill(t)
		var promoted bool
		require.NoError(t, standbyConn.QueryRow(ctx, "SELECT pg_promote()").Scan(&promoted))
		require.True(t, promoted)

		// C: the promoted server's own transactions, at LSNs below what
		// outboxd received from the old primary.
		newPool := e2e.Pool(t, fmt.Sprintf("host=127.0.0.1 port=%d user=postgres dbname=%s sslmode=disable", standby.Port, db))
		// The promoted server's sequence may hand out B's ids again (they
		// were never replicated): move it past them, so that an id names
		// one row and the receiver's count cannot take a B delivery for a
		// C one.
		_, err = newPool.Exec(ctx, "SELECT setval(pg_get_serial_sequence('domain_event', 'id'), $1)", slices.Max(b)+1000)
		require.NoError(t, err)
		c := e2e.Insert(t, newPool, 300, 1, one)
		rows := tableIDs(t, newPool)
		recv.WaitAccepted(t, rows, time.Minute)
		e2e.WaitProgress(t, time.Minute, func() (bool, int64) {
			n, _ := e2e.Processed(t, newPool)
			return n >= int64(len(rows)), n
		}, func() string { return "rows not marked processed on the promoted standby" })
		counts := recv.Count(rows)
		require.Zero(t, counts.Lost)
		require.Len(t, rows, len(a)+len(c), "B is gone with the old primary")
		for _, id := range b {
			require.NotContains(t, rows, id, "B's rows are not on the promoted server")
		}
		require.Contains(t, d.Log(), "starting again from the checkpoint")
		require.False(t, d.Exited())
		t.Logf("lagging standby, PostgreSQL %d: %s; %d rows delivered from the old primary only (asynchronous replication)", primary.Major(), counts, len(b))
		require.Equal(t, 0, d.Stop(30*time.Second))
	})
}
