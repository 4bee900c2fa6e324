package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/outboxd/outboxd/decode"
)

// poller is the polling dispatcher the benchmark compares outboxd with, tuned
// as well as a poller gets: a partial index on pending rows, batches taken
// with FOR UPDATE SKIP LOCKED by several workers, one POST of a JSON array
// per batch (the same envelope bytes outboxd sends, built by package decode),
// and one UPDATE per batch. It marks rows exactly as outboxd does.
type poller struct {
	dbURL    string
	url      string
	workers  int
	batch    int
	interval time.Duration // sleep after a short batch
	client   *http.Client

	marked atomic.Int64
	posts  atomic.Int64
	doneAt atomic.Int64 // unix ns when stopAt rows were marked
}

// pollerNamespace is the message namespace of the baseline's events.
const pollerNamespace = "0000000000000000"

const pollSQL = `SELECT id, event_name, occurred_at, organization_id, user_id, entity_type, entity_id,
  correlation_id, source, schema_version, properties
FROM domain_event WHERE NOT is_processed ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED`

const markSQL = `UPDATE domain_event SET is_processed = true, processed_at = now(),
  delivery_attempts = delivery_attempts + 1 WHERE id = ANY($1)`

func newPoller(dbURL, url string, workers, batch int, interval time.Duration) *poller {
	tr := &http.Transport{MaxIdleConns: workers, MaxIdleConnsPerHost: workers, IdleConnTimeout: time.Minute}
	return &poller{dbURL: dbURL, url: url, workers: workers, batch: batch, interval: interval,
		client: &http.Client{Transport: tr, Timeout: 30 * time.Second}}
}

// run polls until ctx ends, or until stopAt rows are marked (0: never).
func (p *poller) run(ctx context.Context, stopAt int64) error {
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	var wg sync.WaitGroup
	for range p.workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := p.worker(ctx, stopAt); err != nil && ctx.Err() == nil {
				cancel(err)
			}
		}()
	}
	wg.Wait()
	if err := context.Cause(ctx); err != nil && !errors.Is(err, context.Canceled) {
		return err
	}
	return nil
}

func (p *poller) worker(ctx context.Context, stopAt int64) error {
	cfg, err := pgx.ParseConfig(p.dbURL)
	if err != nil {
		return err
	}
	// Text values in the formats the envelope code expects.
	cfg.RuntimeParams["TimeZone"] = "UTC"
	cfg.RuntimeParams["DateStyle"] = "ISO, YMD"
	cfg.RuntimeParams["extra_float_digits"] = "1"
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		return fmt.Errorf("poller connect: %w", err)
	}
	defer conn.Close(context.WithoutCancel(ctx))
	var (
		rel    *decode.Relation
		events []*decode.Event
		ids    []int64
		body   []byte
		limit  = []byte(fmt.Sprint(p.batch))
	)
	for {
		if stopAt > 0 && p.marked.Load() >= stopAt {
			return nil
		}
		if ctx.Err() != nil {
			return nil
		}
		tx, err := conn.Begin(ctx)
		if err != nil {
			return ignoreCancel(ctx, err)
		}
		rr := tx.Conn().PgConn().ExecParams(ctx, pollSQL, [][]byte{limit}, nil, nil, nil)
		if rel == nil {
			fds := rr.FieldDescriptions()
			rel = &decode.Relation{Namespace: "public", Name: "domain_event"}
			for _, fd := range fds {
				rel.Columns = append(rel.Columns, decode.Column{Name: fd.Name, TypeOID: fd.DataTypeOID})
			}
		}
		events, ids = events[:0], ids[:0]
		var evErr error
		for rr.NextRow() {
			// The baseline sends no message id; it builds one, as outboxd does.
			ev, err := decode.EventFromText(pollerNamespace, rel, rr.Values())
			if err != nil {
				evErr = err
				continue
			}
			events = append(events, ev)
			ids = append(ids, ev.ID)
		}
		if _, err := rr.Close(); err != nil {
			_ = tx.Rollback(ctx)
			return ignoreCancel(ctx, fmt.Errorf("poll: %w", err))
		}
		if evErr != nil {
			_ = tx.Rollback(ctx)
			return evErr
		}
		if len(events) > 0 {
			body = decode.AppendBatch(body[:0], events)
			if err := p.post(ctx, body); err != nil {
				_ = tx.Rollback(ctx)
				return ignoreCancel(ctx, err)
			}
			if _, err := tx.Exec(ctx, markSQL, ids); err != nil {
				_ = tx.Rollback(ctx)
				return ignoreCancel(ctx, fmt.Errorf("mark: %w", err))
			}
		}
		if err := tx.Commit(ctx); err != nil {
			return ignoreCancel(ctx, fmt.Errorf("commit: %w", err))
		}
		if n := p.marked.Add(int64(len(events))); stopAt > 0 && n >= stopAt {
			p.doneAt.CompareAndSwap(0, time.Now().UnixNano())
		}
		if len(events) < p.batch {
			select {
			case <-ctx.Done():
				return nil
			case <-time.After(p.interval):
			}
		}
	}
}

func (p *poller) post(ctx context.Context, body []byte) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, p.url, bytes.NewReader(body))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := p.client.Do(req)
	if err != nil {
		return fmt.Errorf("post: %w", err)
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	p.posts.Add(1)
	if resp.StatusCode/100 != 2 {
		return fmt.Errorf("post: status %d", resp.StatusCode)
	}
	return nil
}

func ignoreCancel(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return nil
	}
	return err
}
