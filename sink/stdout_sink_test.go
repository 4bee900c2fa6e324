package sink_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"github.com/stretchr/testify/require"

	"github.com/outboxd/outboxd/decode"
	"github.com/outboxd/outboxd/sink"
	"github.com/outboxd/outboxd/sink/sinktest"
)

// fastLines is a JSONLines config with a small, fast retry budget.
func fastLines() sink.JSONLinesConfig {
	return sink.JSONLinesConfig{Name: "lines", RetryConfig: sink.RetryConfig{MaxAttempts: 4, BackoffMin: time.Millisecond, BackoffMax: 5 * time.Millisecond}}
}

// receiverWriter is the adapter between the JSONLines sink and
// sinktest.Receiver: each Write hands the ids of its lines to the receiver
// and succeeds, fails with a plain error, or fails with an error wrapping
// sink.ErrPermanent, per the answer.
type receiverWriter struct {
	rcv *sinktest.Receiver
	mu  sync.Mutex
	out bytes.Buffer
}

func (w *receiverWriter) Write(p []byte) (int, error) {
	var ids []int64
	for line := range strings.SplitSeq(strings.TrimSpace(string(p)), "\n") {
		got, err := sinktest.IDsFromJSON([]byte(line))
		if err != nil {
			return 0, fmt.Errorf("%w: %w", sink.ErrPermanent, err)
		}
		ids = append(ids, got...)
	}
	switch w.rcv.Receive(context.Background(), ids) {
	case sinktest.Ack:
		w.mu.Lock()
		defer w.mu.Unlock()
		return w.out.Write(p)
	case sinktest.FailPermanent:
		return 0, fmt.Errorf("%w: the writer refuses these lines", sink.ErrPermanent)
	default:
		return 0, errors.New("device busy")
	}
}

func TestJSONLinesConformance(t *testing.T) {
	t.Parallel()
	sinktest.Run(t, func(t *testing.T, rcv *sinktest.Receiver) sink.Sink {
		s, err := sink.NewJSONLinesWriter(fastLines(), &receiverWriter{rcv: rcv}, zerolog.Nop())
		require.NoError(t, err)
		t.Cleanup(s.Close)
		return s
	})
}

// lineEvent is an event with a realistic envelope.
func lineEvent(id int64, props string) *decode.Event {
	return &decode.Event{ID: id, Name: "batch_started", Body: fmt.Appendf(nil,
		`{"id":%d,"event_name":"batch_started","organization_id":7,"properties":%s}`, id, props)}
}

func readLines(t *testing.T, path string) []string {
	t.Helper()
	b, err := os.ReadFile(path)
	require.NoError(t, err)
	require.True(t, len(b) == 0 || b[len(b)-1] == '\n', "output ends with a newline")
	return strings.Split(strings.TrimSuffix(string(b), "\n"), "\n")
}

func TestJSONLinesFile(t *testing.T) {
	t.Parallel()
	path := filepath.Join(t.TempDir(), "events.jsonl")
	cfg := fastLines()
	cfg.Path = path
	s, err := sink.NewJSONLines(cfg, zerolog.Nop())
	require.NoError(t, err)

	// A json (not jsonb) properties column keeps the newlines it was
	// written with: the line must be compacted.
	multi := lineEvent(2, "{\n  \"note\": \"two\\nlines\",\n  \"n\": 1.50\n}")
	out := s.Deliver(t.Context(), []*decode.Event{lineEvent(1, `{"a":"ünï"}`), multi, lineEvent(3, `{}`)})
	require.Len(t, out, 3)
	for _, o := range out {
		require.NoError(t, o.Err)
		require.Equal(t, 1, o.Attempts)
	}
	out = s.Deliver(t.Context(), []*decode.Event{lineEvent(4, `{}`)})
	require.NoError(t, out[0].Err)
	s.Close()

	lines := readLines(t, path)
	require.Len(t, lines, 4)
	require.Equal(t, `{"id":1,"event_name":"batch_started","organization_id":7,"properties":{"a":"ünï"}}`, lines[0])
	require.Equal(t, `{"id":2,"event_name":"batch_started","organization_id":7,"properties":{"note":"two\nlines","n":1.50}}`, lines[1])
	for i, l := range lines {
		var env struct{ ID int64 }
		require.NoError(t, json.Unmarshal([]byte(l), &env))
		require.Equal(t, int64(i+1), env.ID)
	}
	fi, err := os.Stat(path)
	require.NoError(t, err)
	require.Equal(t, os.FileMode(0o600), fi.Mode().Perm(), "events may hold personal data: owner only")

	// Reopening appends.
	s, err = sink.NewJSONLines(cfg, zerolog.Nop())
	require.NoError(t, err)
	require.NoError(t, s.Deliver(t.Context(), []*decode.Event{lineEvent(5, `{}`)})[0].Err)
	s.Close()
	require.Len(t, readLines(t, path), 5)
}

// A file moved away (logrotate's default) or removed: the next lines go to
// a new file at the path, not to the rotated one. Both used to land in the
// rotated file, and the path was never recreated.
func TestJSONLinesFileReopenedAfterRotation(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	path := filepath.Join(dir, "events.jsonl")
	cfg := fastLines()
	cfg.Path = path
	s, err := sink.NewJSONLines(cfg, zerolog.Nop())
	require.NoError(t, err)
	defer s.Close()
	require.NoError(t, s.Deliver(t.Context(), []*decode.Event{lineEvent(1, `{}`)})[0].Err)

	require.NoError(t, os.Rename(path, path+".1"))
	require.NoError(t, s.Deliver(t.Context(), []*decode.Event{lineEvent(2, `{}`)})[0].Err)
	require.Len(t, readLines(t, path+".1"), 1, "nothing more in the rotated file")
	require.Len(t, readLines(t, path), 1, "a new file at the path")
	fi, err := os.Stat(path)
	require.NoError(t, err)
	require.Equal(t, os.FileMode(0o600), fi.Mode().Perm())

	require.NoError(t, os.Remove(path))
	require.NoError(t, s.Deliver(t.Context(), []*decode.Event{lineEvent(3, `{}`), lineEvent(4, `{}`)})[0].Err)
	lines := readLines(t, path)
	require.Len(t, lines, 2, "removed: recreated with the next lines")
	require.Contains(t, lines[0], `"id":3`)
}

func TestJSONLinesBadBodyIsPermanentAlone(t *testing.T) {
	t.Parallel()
	var buf bytes.Buffer
	s, err := sink.NewJSONLinesWriter(fastLines(), &buf, zerolog.Nop())
	require.NoError(t, err)
	bad := &decode.Event{ID: 2, Body: []byte(`{"id":2,`)}
	out := s.Deliver(t.Context(), []*decode.Event{lineEvent(1, `{}`), bad, lineEvent(3, `{}`), nil})
	require.Len(t, out, 4)
	require.NoError(t, out[0].Err)
	require.ErrorIs(t, out[1].Err, sink.ErrPermanent)
	require.Equal(t, 0, out[1].Attempts, "never written")
	require.NoError(t, out[2].Err)
	require.ErrorIs(t, out[3].Err, sink.ErrPermanent, "a nil event")
	require.Equal(t, 2, strings.Count(buf.String(), "\n"))
}

// flakyWriter writes half of what it is given and fails, the first time.
type flakyWriter struct {
	bytes.Buffer
	calls   int
	flushes int
}

func (w *flakyWriter) Write(p []byte) (int, error) {
	w.calls++
	if w.calls == 1 {
		n, _ := w.Buffer.Write(p[:len(p)/2])
		return n, errors.New("disk hiccup")
	}
	return w.Buffer.Write(p)
}

func (w *flakyWriter) Flush() error { w.flushes++; return nil }

// A write that fails half way leaves a partial line: the retry starts on a
// new line, so that every retried line is whole.
func TestJSONLinesPartialWriteRetriedOnFreshLine(t *testing.T) {
	t.Parallel()
	w := &flakyWriter{}
	s, err := sink.NewJSONLinesWriter(fastLines(), w, zerolog.Nop())
	require.NoError(t, err)
	// The second line is the longer: the first write stops inside it.
	out := s.Deliver(t.Context(), []*decode.Event{lineEvent(1, `{}`), lineEvent(2, `{"pad":"`+strings.Repeat("x", 100)+`"}`)})
	for _, o := range out {
		require.NoError(t, o.Err)
		require.Equal(t, 2, o.Attempts)
	}
	require.Equal(t, 1, w.flushes, "flushed after the successful write")
	lines := strings.Split(strings.TrimSuffix(w.String(), "\n"), "\n")
	require.Len(t, lines, 4, "line 1, part of line 2, then both lines whole")
	require.False(t, json.Valid([]byte(lines[1])), "the partial line stays on its own")
	for _, i := range []int{0, 2, 3} {
		require.True(t, json.Valid([]byte(lines[i])), lines[i])
	}
}

// Concurrent calls never interleave their lines.
func TestJSONLinesConcurrentCallsKeepLinesWhole(t *testing.T) {
	t.Parallel()
	path := filepath.Join(t.TempDir(), "events.jsonl")
	cfg := fastLines()
	cfg.Path = path
	s, err := sink.NewJSONLines(cfg, zerolog.Nop())
	require.NoError(t, err)
	big := `{"pad":"` + strings.Repeat("x", 64<<10) + `"}`
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Go(func() {
			for i := range 10 {
				id := int64(g*100 + i)
				if o := s.Deliver(context.Background(), []*decode.Event{lineEvent(id, big), lineEvent(id+50, `{}`)}); o[0].Err != nil {
					t.Error(o[0].Err)
				}
			}
		})
	}
	wg.Wait()
	s.Close()
	f, err := os.Open(path)
	require.NoError(t, err)
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(nil, 1<<20)
	n := 0
	for sc.Scan() {
		require.True(t, json.Valid(sc.Bytes()), "line %d is whole JSON", n)
		n++
	}
	require.NoError(t, sc.Err())
	require.Equal(t, 160, n)
}

func TestJSONLinesConfigErrorsNameTheField(t *testing.T) {
	t.Parallel()
	for field, cfg := range map[string]sink.JSONLinesConfig{
		"MaxAttempts": {RetryConfig: sink.RetryConfig{MaxAttempts: -1}},
		"BackoffMin":  {RetryConfig: sink.RetryConfig{BackoffMin: time.Second, BackoffMax: time.Millisecond}},
		"BackoffMax":  {RetryConfig: sink.RetryConfig{BackoffMax: -time.Second}},
	} {
		err := cfg.Validate()
		require.ErrorContains(t, err, field)
	}
	_, err := sink.NewJSONLines(sink.JSONLinesConfig{Path: filepath.Join(t.TempDir(), "missing", "dir", "x")}, zerolog.Nop())
	require.ErrorContains(t, err, "open output file")
}
