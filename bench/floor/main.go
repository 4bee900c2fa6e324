// Command floor is the benchmark's floor: the least a Go consumer of the
// outbox's replication stream does to deliver what outboxd delivers, with
// the same parts (pglogrepl's connection, outboxd's pgoutput decoder and
// envelope, net/http, HMAC-SHA256 signatures, the same marking UPDATE) and
// none of outboxd's promises. It is not a product and keeps none of them:
//
//   - no order: events go to whichever worker is free;
//   - no checkpoint: the slot is confirmed up to what was received, before
//     delivery (a crash loses events);
//   - no retries: a failed POST or UPDATE ends the process with an error;
//   - no routing, subscriptions, metrics, logs or parking.
//
// The benchmark runs it where it runs outboxd (go run ./bench -modes floor):
// the gap between the two is what outboxd's guarantees and structure cost;
// the floor itself is what Go, pglogrepl, net/http and Postgres cost on the
// machine, the part no change to outboxd can remove.
//
// It reads the slot given from its start, delivers -n events (batches of up
// to -batch-size events taken as they are at hand, -concurrency POSTs at
// once), marks each delivered row processed (one UPDATE of the ids delivered
// meanwhile, by one marking goroutine) and exits 0 once -n rows are marked.
package main

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/signal"
	"runtime/pprof"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/outboxd/outboxd/decode"
	"github.com/outboxd/outboxd/sink"
)

// namespace is the message namespace of the floor's events (the poller's).
const namespace = "0000000000000000"

const markSQL = `UPDATE domain_event SET is_processed = true, processed_at = now(),
  delivery_attempts = delivery_attempts + 1 WHERE id = ANY($1)`

type config struct {
	dbURL, slot, url, secret string
	n, batch, conc           int
	cpuProfile               string
}

func main() {
	var c config
	flag.StringVar(&c.dbURL, "database-url", "", "postgres:// URL of the outbox's database")
	flag.StringVar(&c.slot, "slot", "", "pgoutput slot to read (publication outboxd)")
	flag.StringVar(&c.url, "url", "", "webhook URL")
	flag.StringVar(&c.secret, "secret", "", "whsec_ signing secret")
	flag.IntVar(&c.n, "n", 0, "events to deliver and mark before exiting (0: until SIGTERM)")
	flag.IntVar(&c.batch, "batch-size", 1, "events per POST at most (1: one envelope per POST, as outboxd's per-event mode)")
	flag.IntVar(&c.conc, "concurrency", 8, "POSTs at once")
	flag.StringVar(&c.cpuProfile, "cpuprofile", "", "write a CPU profile of the run to this file")
	flag.Parse()
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	err := run(ctx, c)
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "floor:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, c config) error {
	if c.dbURL == "" || c.slot == "" || c.url == "" || c.n < 0 || c.batch <= 0 || c.conc <= 0 {
		return errors.New("-database-url, -slot, -url, -batch-size and -concurrency are required")
	}
	if _, err := sink.Sign([]string{c.secret}, "", 0, nil); err != nil {
		return fmt.Errorf("-secret: %w", err)
	}
	if c.cpuProfile != "" {
		pf, err := os.Create(c.cpuProfile)
		if err != nil {
			return err
		}
		if err := pprof.StartCPUProfile(pf); err != nil {
			return err
		}
		defer func() {
			pprof.StopCPUProfile()
			pf.Close()
		}()
	}
	parent := ctx
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)

	f := &floor{cfg: c, ready: make(chan struct{}, 1), room: make(chan struct{}, 1), delivered: make(chan []int64, 1<<14)}
	f.client = &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: c.conc, MaxConnsPerHost: c.conc}}

	var wg sync.WaitGroup
	for range c.conc {
		wg.Go(func() {
			if err := f.worker(ctx); err != nil {
				cancel(err)
			}
		})
	}
	marked := make(chan error, 1)
	go func() { marked <- f.mark(ctx) }()
	wg.Go(func() {
		if err := f.receive(ctx); err != nil {
			cancel(err)
		}
	})
	var err error
	select {
	case err = <-marked:
		marked = nil
	case <-ctx.Done():
		err = context.Cause(ctx)
	}
	if parent.Err() != nil && c.n == 0 {
		err = nil // SIGTERM ends an open-ended run
	}
	cancel(nil)
	wg.Wait()
	if marked != nil {
		<-marked // the marker ends with ctx
	}
	return err
}

type floor struct {
	cfg    config
	client *http.Client

	mu      sync.Mutex
	pending []*decode.Event // received, not yet taken by a worker
	ready   chan struct{}   // a worker may find pending events
	room    chan struct{}   // pending may have fallen below maxPending

	delivered chan []int64 // ids delivered, to the marking goroutine
}

// receive reads the stream from the slot's start, decodes every message and
// appends outbox events to pending. It wakes a worker when a full batch is
// pending and at each commit: between the two, events accumulate (a free
// worker takes what is at hand then, as outboxd's dispatcher does with
// OUTBOXD_WEBHOOK_BATCH_WAIT=0), and a worker woken with more left wakes
// another.
func (f *floor) receive(ctx context.Context) error {
	u := f.cfg.dbURL + sep(f.cfg.dbURL) + "replication=database"
	conn, err := pgconn.Connect(ctx, u)
	if err != nil {
		return fmt.Errorf("replication connection: %w", err)
	}
	defer conn.Close(context.WithoutCancel(ctx))
	err = pglogrepl.StartReplication(ctx, conn, f.cfg.slot, 0, pglogrepl.StartReplicationOptions{
		PluginArgs: []string{"proto_version '1'", "publication_names 'outboxd'"},
	})
	if err != nil {
		return fmt.Errorf("start replication: %w", err)
	}
	dec := decode.NewDecoder(decode.Table{Schema: "public", Name: "domain_event", MessageNamespace: namespace})
	var received pglogrepl.LSN
	for {
		msg, err := conn.ReceiveMessage(ctx)
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("receive: %w", err)
		}
		cd, ok := msg.(*pgproto3.CopyData)
		if !ok {
			if e, ok := msg.(*pgproto3.ErrorResponse); ok {
				return pgconn.ErrorResponseToPgError(e)
			}
			continue
		}
		switch cd.Data[0] {
		case pglogrepl.PrimaryKeepaliveMessageByteID:
			ka, err := pglogrepl.ParsePrimaryKeepaliveMessage(cd.Data[1:])
			if err != nil {
				return err
			}
			received = max(received, ka.ServerWALEnd)
			if ka.ReplyRequested {
				err := pglogrepl.SendStandbyStatusUpdate(ctx, conn, pglogrepl.StandbyStatusUpdate{WALWritePosition: received})
				if err != nil {
					return err
				}
			}
		case pglogrepl.XLogDataByteID:
			xld, err := pglogrepl.ParseXLogData(cd.Data[1:])
			if err != nil {
				return err
			}
			received = max(received, xld.WALStart)
			m, err := dec.Decode(xld.WALData)
			if err != nil {
				return err
			}
			switch m.Kind {
			case decode.KindEvent:
				f.mu.Lock()
				f.pending = append(f.pending, m.Event)
				n := len(f.pending)
				f.mu.Unlock()
				if n%f.cfg.batch == 0 { // a full batch is at hand
					f.signal(f.ready)
				}
				if n >= maxPending && !f.waitRoom(ctx) {
					return nil
				}
			case decode.KindCommit:
				f.signal(f.ready)
			}
		}
	}
}

// maxPending bounds the events received and not yet taken, as
// OUTBOXD_MAX_IN_FLIGHT bounds outboxd's.
const maxPending = 10000

func (f *floor) signal(c chan struct{}) {
	select {
	case c <- struct{}{}:
	default:
	}
}

// waitRoom waits until fewer than maxPending events are pending; false when
// ctx ended.
func (f *floor) waitRoom(ctx context.Context) bool {
	f.signal(f.ready)
	for {
		f.mu.Lock()
		n := len(f.pending)
		f.mu.Unlock()
		if n < maxPending {
			return true
		}
		select {
		case <-f.room:
		case <-ctx.Done():
			return false
		}
	}
}

func sep(u string) string {
	if strings.Contains(u, "?") {
		return "&"
	}
	return "?"
}

// take returns up to batch-size pending events, waiting for some.
func (f *floor) take(ctx context.Context, buf []*decode.Event) ([]*decode.Event, error) {
	for {
		f.mu.Lock()
		n := min(len(f.pending), f.cfg.batch)
		if n > 0 {
			buf = append(buf[:0], f.pending[:n]...)
			f.pending = f.pending[n:]
			more := len(f.pending) > 0
			if len(f.pending) == 0 {
				f.pending = f.pending[:0:0] // let the array go
			}
			f.mu.Unlock()
			f.signal(f.room)
			if more { // wake another worker for the rest
				f.signal(f.ready)
			}
			return buf, nil
		}
		f.mu.Unlock()
		select {
		case <-f.ready:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
}

// worker POSTs what it takes, signed, and hands the ids to the marker.
func (f *floor) worker(ctx context.Context) error {
	var events []*decode.Event
	var body []byte
	for {
		var err error
		if events, err = f.take(ctx, events); err != nil {
			return nil
		}
		var id string
		if len(events) == 1 {
			body, id = append(body[:0], events[0].Body...), events[0].MessageID
		} else {
			body = decode.AppendBatch(body[:0], events)
			id = sink.WebhookID(events)
		}
		if err := f.post(ctx, id, body); err != nil {
			return err
		}
		ids := make([]int64, len(events))
		for i, e := range events {
			ids[i] = e.ID
		}
		select {
		case f.delivered <- ids:
		case <-ctx.Done():
			return nil
		}
	}
}

func (f *floor) post(ctx context.Context, id string, body []byte) error {
	ts := time.Now().Unix()
	sig, err := sink.Sign([]string{f.cfg.secret}, id, ts, body) // the secret was checked at start
	if err != nil {
		return err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, f.cfg.url, bytes.NewReader(body))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Webhook-Id", id)
	req.Header.Set("Webhook-Timestamp", strconv.FormatInt(ts, 10))
	req.Header.Set("Webhook-Signature", sig)
	resp, err := f.client.Do(req)
	if err != nil {
		return fmt.Errorf("post: %w", err)
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode/100 != 2 {
		return fmt.Errorf("post: status %d", resp.StatusCode)
	}
	return nil
}

// mark marks the delivered rows processed as outboxd's checkpoint flusher
// does with its defaults: one UPDATE of the ids delivered meanwhile, once
// flushSize ids are delivered or flushInterval after the first, until n rows
// are marked (without waiting for the interval for the last of them).
func (f *floor) mark(ctx context.Context) error {
	const (
		flushInterval = 200 * time.Millisecond // OUTBOXD_FLUSH_INTERVAL
		flushSize     = 1000                   // OUTBOXD_FLUSH_SIZE
	)
	conn, err := pgx.Connect(ctx, f.cfg.dbURL)
	if err != nil {
		return fmt.Errorf("connect: %w", err)
	}
	defer conn.Close(context.WithoutCancel(ctx))
	var ids []int64
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	for marked := 0; f.cfg.n == 0 || marked < f.cfg.n; {
		select {
		case more := <-f.delivered:
			ids = append(ids[:0], more...)
		case <-ctx.Done():
			return context.Cause(ctx)
		}
		timer.Reset(flushInterval)
	gather:
		for len(ids) < flushSize && (f.cfg.n == 0 || marked+len(ids) < f.cfg.n) {
			select {
			case more := <-f.delivered:
				ids = append(ids, more...)
			case <-timer.C:
				break gather
			case <-ctx.Done():
				return context.Cause(ctx)
			}
		}
		timer.Stop()
		tag, err := conn.Exec(ctx, markSQL, ids)
		if err != nil {
			return fmt.Errorf("mark: %w", err)
		}
		got := int(tag.RowsAffected())
		// The walsender may send a transaction a moment before its commit is
		// visible to new snapshots: mark what this statement missed again.
		for got < len(ids) {
			select {
			case <-time.After(time.Millisecond):
			case <-ctx.Done():
				return context.Cause(ctx)
			}
			tag, err := conn.Exec(ctx, markSQL+" AND NOT is_processed", ids)
			if err != nil {
				return fmt.Errorf("mark: %w", err)
			}
			got += int(tag.RowsAffected())
		}
		marked += got
	}
	return nil
}
