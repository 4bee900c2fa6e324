package main

import (
	"errors"
	"io"
	"net"
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
)

// receiver is the webhook endpoint of the benchmark: a plain net/http server
// on loopback that takes single envelopes and JSON arrays of them, counts the
// ids it sees and answers 204. It checks nothing else on the hot path (no
// signature, no schema): it must cost as little as possible, since it shares
// the machine with what is measured.
//
// Each measurement resets it with the id range it expects; ids are counted in
// a dense array (ids are an identity column, fresh in every bench database),
// so receiving is lock-free.
type receiver struct {
	srv  *http.Server
	ln   net.Listener
	url  string
	cur  atomic.Pointer[tally]
	bufs sync.Pool
	// delay, when set, serves one request at a time, each taking delay:
	// a single-threaded receiver, whose queue of waiting requests outlasts
	// the sender's timeouts under enough concurrency.
	delay  time.Duration
	serial sync.Mutex
	// failing makes it answer 503 to everything (an outage).
	failing atomic.Bool
}

// tally is what the receiver saw during one measurement.
type tally struct {
	lo, hi   int64           // expected ids, inclusive
	counts   []atomic.Uint32 // deliveries per id - lo
	at       []atomic.Int64  // first receipt per id - lo (unix ns), when timed
	distinct atomic.Int64    // ids received at least once
	total    atomic.Int64    // ids received, duplicates included
	outside  atomic.Int64    // ids outside [lo, hi]
	bad      atomic.Int64    // bodies that could not be parsed
	requests atomic.Int64
	first    atomic.Int64 // unix ns of the first receipt
	last     atomic.Int64 // unix ns of the latest receipt
	done     chan struct{}
	doneOnce sync.Once
	// started is closed at the first expected id received.
	started     chan struct{}
	startedOnce sync.Once
}

func newTally(lo, hi int64, timed bool) *tally {
	n := hi - lo + 1
	if n < 0 {
		n = 0
	}
	t := &tally{lo: lo, hi: hi, counts: make([]atomic.Uint32, n), done: make(chan struct{}), started: make(chan struct{})}
	if timed {
		t.at = make([]atomic.Int64, n)
	}
	if n == 0 {
		close(t.done)
	}
	return t
}

// expected returns the number of distinct ids the tally waits for.
func (t *tally) expected() int64 { return t.hi - t.lo + 1 }

// duplicates returns how many deliveries repeated an id already received.
func (t *tally) duplicates() int64 { return t.total.Load() - t.outside.Load() - t.distinct.Load() }

// missing returns up to max ids never received.
func (t *tally) missing(max int) []int64 {
	var out []int64
	for i := range t.counts {
		if t.counts[i].Load() == 0 {
			out = append(out, t.lo+int64(i))
			if len(out) == max {
				break
			}
		}
	}
	return out
}

// repeated returns up to max ids received more than once.
func (t *tally) repeated(max int) []int64 {
	var out []int64
	for i := range t.counts {
		if t.counts[i].Load() > 1 {
			out = append(out, t.lo+int64(i))
			if len(out) == max {
				break
			}
		}
	}
	return out
}

func (t *tally) record(id, now int64) {
	t.total.Add(1)
	if id < t.lo || id > t.hi {
		t.outside.Add(1)
		return
	}
	i := id - t.lo
	if t.counts[i].Add(1) != 1 {
		return
	}
	if t.at != nil {
		t.at[i].Store(now)
	}
	d := t.distinct.Add(1)
	if d == 1 {
		t.startedOnce.Do(func() { close(t.started) })
	}
	if d == t.expected() {
		t.doneOnce.Do(func() { close(t.done) })
	}
}

func startReceiver(delay time.Duration) (*receiver, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	r := &receiver{ln: ln, url: "http://" + ln.Addr().String() + "/hook", delay: delay}
	r.cur.Store(newTally(1, 0, false))
	r.bufs.New = func() any { b := make([]byte, 0, 64<<10); return &b }
	r.srv = &http.Server{Handler: http.HandlerFunc(r.serve), ReadHeaderTimeout: 10 * time.Second}
	go func() {
		if err := r.srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			panic(err)
		}
	}()
	return r, nil
}

// reset starts a new measurement expecting ids lo..hi; timed records the
// first receipt time of each id.
func (r *receiver) reset(lo, hi int64, timed bool) *tally {
	t := newTally(lo, hi, timed)
	r.cur.Store(t)
	return t
}

func (r *receiver) close() { _ = r.srv.Close() }

func (r *receiver) serve(w http.ResponseWriter, req *http.Request) {
	if req.Method != http.MethodPost {
		w.WriteHeader(http.StatusMethodNotAllowed)
		return
	}
	if r.failing.Load() {
		w.WriteHeader(http.StatusServiceUnavailable)
		return
	}
	if r.delay > 0 {
		r.serial.Lock()
		defer r.serial.Unlock()
		time.Sleep(r.delay) // the slowness measured, not a synchronisation
	}
	bp := r.bufs.Get().(*[]byte)
	defer r.bufs.Put(bp)
	body, err := readAll(req.Body, (*bp)[:0])
	*bp = body[:0]
	if err != nil {
		w.WriteHeader(http.StatusBadRequest)
		return
	}
	now := time.Now().UnixNano()
	t := r.cur.Load()
	t.requests.Add(1)
	t.first.CompareAndSwap(0, now)
	if !eachID(body, func(id int64) { t.record(id, now) }) {
		t.bad.Add(1)
		w.WriteHeader(http.StatusBadRequest)
		return
	}
	for {
		last := t.last.Load()
		if now <= last || t.last.CompareAndSwap(last, now) {
			break
		}
	}
	w.WriteHeader(http.StatusNoContent)
}

// readAll reads r into buf, growing it.
func readAll(r io.Reader, buf []byte) ([]byte, error) {
	for {
		if len(buf) == cap(buf) {
			buf = append(buf, 0)[:len(buf)]
		}
		n, err := r.Read(buf[len(buf):cap(buf)])
		buf = buf[:len(buf)+n]
		if err == io.EOF {
			return buf, nil
		}
		if err != nil {
			return buf, err
		}
	}
}

// eachID calls fn with the "id" member of the envelope in b, or of every
// envelope when b is a JSON array of them. Members other than id are skipped
// structurally (strings and nesting respected), not validated.
func eachID(b []byte, fn func(int64)) bool {
	i := skipWS(b, 0)
	if i >= len(b) {
		return false
	}
	if b[i] == '{' {
		id, j, ok := objectID(b, i)
		if !ok || skipWS(b, j) != len(b) {
			return false
		}
		fn(id)
		return true
	}
	if b[i] != '[' {
		return false
	}
	i = skipWS(b, i+1)
	if i < len(b) && b[i] == ']' {
		return skipWS(b, i+1) == len(b)
	}
	for {
		id, j, ok := objectID(b, skipWS(b, i))
		if !ok {
			return false
		}
		fn(id)
		j = skipWS(b, j)
		if j >= len(b) {
			return false
		}
		switch b[j] {
		case ',':
			i = j + 1
		case ']':
			return skipWS(b, j+1) == len(b)
		default:
			return false
		}
	}
}

// objectID reads the object at b[i] and returns its top-level "id" number and
// the index after the object.
func objectID(b []byte, i int) (int64, int, bool) {
	if i >= len(b) || b[i] != '{' {
		return 0, i, false
	}
	var id int64
	found := false
	i = skipWS(b, i+1)
	if i < len(b) && b[i] == '}' {
		return 0, i + 1, false
	}
	for {
		if i >= len(b) || b[i] != '"' {
			return 0, i, false
		}
		end, ok := skipString(b, i)
		if !ok {
			return 0, i, false
		}
		key := b[i+1 : end-1]
		i = skipWS(b, end)
		if i >= len(b) || b[i] != ':' {
			return 0, i, false
		}
		i = skipWS(b, i+1)
		start := i
		if i, ok = skipValue(b, i); !ok {
			return 0, i, false
		}
		if string(key) == "id" {
			n, err := strconv.ParseInt(string(b[start:i]), 10, 64)
			if err != nil {
				return 0, i, false
			}
			id, found = n, true
		}
		i = skipWS(b, i)
		if i >= len(b) {
			return 0, i, false
		}
		switch b[i] {
		case ',':
			i = skipWS(b, i+1)
		case '}':
			return id, i + 1, found
		default:
			return 0, i, false
		}
	}
}

func skipWS(b []byte, i int) int {
	for i < len(b) && (b[i] == ' ' || b[i] == '\n' || b[i] == '\r' || b[i] == '\t') {
		i++
	}
	return i
}

// skipString returns the index after the string starting at b[i] ('"').
func skipString(b []byte, i int) (int, bool) {
	for i++; i < len(b); i++ {
		switch b[i] {
		case '\\':
			i++
		case '"':
			return i + 1, true
		}
	}
	return i, false
}

// skipValue returns the index after the value starting at b[i].
func skipValue(b []byte, i int) (int, bool) {
	if i >= len(b) {
		return i, false
	}
	switch b[i] {
	case '"':
		return skipString(b, i)
	case '{', '[':
		depth := 0
		for ; i < len(b); i++ {
			switch b[i] {
			case '"':
				end, ok := skipString(b, i)
				if !ok {
					return end, false
				}
				i = end - 1
			case '{', '[':
				depth++
			case '}', ']':
				depth--
				if depth == 0 {
					return i + 1, true
				}
			}
		}
		return i, false
	default:
		start := i
		for i < len(b) {
			switch b[i] {
			case ',', '}', ']', ' ', '\n', '\r', '\t':
				return i, i > start
			}
			i++
		}
		return i, i > start
	}
}
