package sink

import (
	"bytes"
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"sync"
	"syscall"

	"github.com/rs/zerolog"

	"github.com/outboxd/outboxd/decode"
)

// DefaultJSONLinesName is the default name of a JSONLines sink.
const DefaultJSONLinesName = "stdout"

// JSONLinesConfig configures a JSONLines sink.
type JSONLinesConfig struct {
	// Name is the sink name used in logs, metrics and dead letters.
	// Default "stdout".
	Name string
	// Path is the file the lines are appended to, created with mode 0600 if
	// missing. Empty: standard output.
	Path string
	// RetryConfig is the retry budget of one Deliver call, in writes.
	RetryConfig
}

// WithDefaults returns a copy of c with the defaults filled in.
func (c JSONLinesConfig) WithDefaults() JSONLinesConfig {
	c.Name = cmp.Or(c.Name, DefaultJSONLinesName)
	c.RetryConfig = c.RetryConfig.withDefaults()
	return c
}

// Validate checks c with its defaults (WithDefaults) and changes nothing.
// Errors name the offending field.
func (c JSONLinesConfig) Validate() error {
	c = c.WithDefaults()
	var v fieldCheck
	c.RetryConfig.validate(v.bad)
	return v.err("stdout", c.Name)
}

// JSONLines is a Sink that writes each event's envelope as one line of JSON
// to standard output or a file, for piping into other tools. An event is
// acknowledged once its line is written, flushed and, for a regular file,
// fsynced. Write, flush and fsync errors are retryable; an error from the
// writer that wraps ErrPermanent is permanent.
//
// It is safe for concurrent use: the lines of one Deliver call are written
// with one Write and never interleave with another call's.
type JSONLines struct {
	name   string
	w      io.Writer
	sync   func() error // fsync for regular files, nil otherwise
	file   *os.File     // opened by NewJSONLines, closed by Close; guarded by lock
	path   string       // file's path, reopened when rotated away
	policy retryPolicy
	log    zerolog.Logger

	// lock serialises writes; a channel so that waiting for it honours ctx.
	lock chan struct{}
	// midLine is set when a failed write left a partial line behind: the
	// next write starts with a newline so that the partial line stays on its
	// own and the retried lines are whole. Guarded by lock.
	midLine bool
	// pipeClosed logs a broken pipe once.
	pipeClosed sync.Once
}

var _ Sink = (*JSONLines)(nil)

// NewJSONLines validates cfg and returns a JSONLines sink writing to
// cfg.Path, or standard output when Path is empty.
func NewJSONLines(cfg JSONLinesConfig, log zerolog.Logger) (*JSONLines, error) {
	cfg = cfg.WithDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if cfg.Path == "" {
		return NewJSONLinesWriter(cfg, os.Stdout, log)
	}
	f, err := os.OpenFile(cfg.Path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("stdout sink %q: open output file: %w", cfg.Name, err)
	}
	s, err := NewJSONLinesWriter(cfg, f, log)
	if err != nil {
		f.Close()
		return nil, err
	}
	s.file, s.path = f, cfg.Path
	return s, nil
}

// reopenIfRotated reopens the output file when its path no longer names the
// open file: logrotate (or a person) moved or removed it. Lines then go to
// the file at the path, created if missing, not to the rotated one. Called
// with the lock held.
func (s *JSONLines) reopenIfRotated() error {
	if s.path == "" || s.file == nil {
		return nil
	}
	at, err := os.Stat(s.path)
	switch {
	case err == nil:
		if open, err := s.file.Stat(); err != nil || os.SameFile(at, open) {
			return nil
		}
	case !errors.Is(err, fs.ErrNotExist):
		return nil // cannot tell: keep the open file
	}
	f, err := os.OpenFile(s.path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		return fmt.Errorf("reopen output file after rotation: %w", err)
	}
	if err := s.file.Close(); err != nil {
		s.log.Warn().Err(err).Msg("close rotated output file")
	}
	s.file, s.w, s.sync, s.midLine = f, f, f.Sync, false
	s.log.Info().Msg("output file was moved or removed (rotation): writing to a new one at its path")
	return nil
}

// NewJSONLinesWriter validates cfg and returns a JSONLines sink writing to w
// (cfg.Path is ignored). After each write it calls w's Flush() error method
// if it has one, and fsyncs w if it is an *os.File open on a regular file.
func NewJSONLinesWriter(cfg JSONLinesConfig, w io.Writer, log zerolog.Logger) (*JSONLines, error) {
	cfg = cfg.WithDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if w == nil {
		return nil, fmt.Errorf("stdout sink %q: no writer", cfg.Name)
	}
	s := &JSONLines{
		name:   cfg.Name,
		w:      w,
		policy: cfg.RetryConfig.policy(),
		log:    log.With().Str("component", "sink").Str("sink", cfg.Name).Logger(),
		lock:   make(chan struct{}, 1),
	}
	if f, ok := w.(*os.File); ok {
		// fsync only what can be fsynced: on a pipe or terminal it fails
		// with EINVAL, and there is nothing durable to wait for anyway.
		if fi, err := f.Stat(); err == nil && fi.Mode().IsRegular() {
			s.sync = f.Sync
		}
	}
	return s, nil
}

// Name returns the sink name.
func (s *JSONLines) Name() string { return s.name }

// Close closes the output file opened by NewJSONLines; standard output and
// writers given to NewJSONLinesWriter are left open.
func (s *JSONLines) Close() {
	if s.path == "" {
		// Nothing of ours to close, and a write stuck on a pipe nobody
		// reads may hold the lock for ever: never wait for it here.
		return
	}
	s.lock <- struct{}{}
	defer func() { <-s.lock }()
	if s.file != nil {
		if err := s.file.Close(); err != nil {
			s.log.Warn().Err(err).Msg("close output file")
		}
	}
}

// Deliver writes one line per event, in order, with one write per attempt.
func (s *JSONLines) Deliver(ctx context.Context, events []*decode.Event) []Outcome {
	if len(events) == 0 {
		return []Outcome{}
	}
	// Lines are built once: a body that is not JSON fails permanently by
	// itself, without an attempt.
	lines := make([][]byte, len(events))
	var rejected []error
	for i, ev := range events {
		if ev == nil {
			continue
		}
		line, err := jsonLine(ev.Body)
		if err != nil {
			if rejected == nil {
				rejected = make([]error, len(events))
			}
			rejected[i] = err
			continue
		}
		lines[i] = line
	}
	return deliverEach(ctx, s.policy, "write "+s.name, events, rejected, func(ctx context.Context, pending []int) attemptResult {
		var buf []byte
		for _, i := range pending {
			buf = append(buf, lines[i]...)
		}
		err := s.write(ctx, buf)
		res := attemptResult{errs: make([]error, len(pending))}
		for j := range pending {
			res.errs[j] = err
		}
		return res
	})
}

// jsonLine returns body as one line: compacted if it spans several (a json,
// not jsonb, properties column keeps the newlines it was written with).
func jsonLine(body []byte) ([]byte, error) {
	if bytes.IndexByte(body, '\n') < 0 && bytes.IndexByte(body, '\r') < 0 {
		if !json.Valid(body) {
			return nil, errors.New("body is not valid JSON")
		}
		line := make([]byte, 0, len(body)+1)
		return append(append(line, body...), '\n'), nil
	}
	var b bytes.Buffer
	if err := json.Compact(&b, body); err != nil {
		return nil, fmt.Errorf("compact body: %w", err)
	}
	b.WriteByte('\n')
	return b.Bytes(), nil
}

// write writes buf, flushes and fsyncs under the lock. A write stuck on a full
// pipe does not hold up the caller past ctx: the write goes on in the
// background and keeps the lock until it ends.
func (s *JSONLines) write(ctx context.Context, buf []byte) error {
	select {
	case s.lock <- struct{}{}:
	case <-ctx.Done():
		return ctx.Err()
	}
	done := make(chan error, 1)
	go func() {
		defer func() { <-s.lock }()
		done <- s.writeLocked(buf)
	}()
	select {
	case err := <-done:
		if err != nil {
			s.log.Debug().Err(err).Msg("write lines")
		}
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (s *JSONLines) writeLocked(buf []byte) error {
	if err := s.reopenIfRotated(); err != nil {
		return err
	}
	if s.midLine {
		buf = append([]byte{'\n'}, buf...)
	}
	n, err := s.w.Write(buf)
	if err == nil && n < len(buf) {
		err = io.ErrShortWrite
	}
	if err != nil {
		s.midLine = n > 0 && buf[n-1] != '\n' || s.midLine && n == 0
		if errors.Is(err, syscall.EPIPE) {
			// The reader of the pipe is gone (outboxd runs with SIGPIPE
			// ignored, so this is an error, not the end of the process):
			// events park until outboxd restarts with a reader.
			s.pipeClosed.Do(func() {
				s.log.Error().Err(err).Msg("output closed by its reader (broken pipe): deliveries park until outboxd is restarted with a reader")
			})
		}
		return fmt.Errorf("write: %w", err)
	}
	s.midLine = false
	if f, ok := s.w.(interface{ Flush() error }); ok {
		if err := f.Flush(); err != nil {
			return fmt.Errorf("flush: %w", err)
		}
	}
	if s.sync != nil {
		if err := s.sync(); err != nil {
			return fmt.Errorf("fsync: %w", err)
		}
	}
	return nil
}
