package fault

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/outboxd/outboxd/internal/e2e"
)

// Delivery is one request the receiver answered.
type Delivery struct {
	WebhookID string
	IDs       []int64 // envelope ids in the body, in body order
	Orgs      []int64 // their organization_id (-1 for null)
	SigOK     bool
	Attempt   int       // 1 for the first request with this webhook-id
	Status    int       // what the receiver answered
	Start     time.Time // when the handler began (after reading the body)
	// ConnAt is when the request's TCP connection was accepted. A request
	// on a connection accepted before a kill was sent by the killed process
	// (or one alive then), however late the handler ran.
	ConnAt time.Time
	At     time.Time // when the answer was written
	// ClientGone is true when the client had given up (timeout) before the
	// answer was written: the receiver processed a request the sender
	// considers failed.
	ClientGone bool
	Body       []byte // only when Receiver.KeepBodies
}

// Accepted reports whether the receiver answered 2xx.
func (d Delivery) Accepted() bool { return d.Status/100 == 2 }

// Answer is what a Behaviour tells the receiver to do with a request.
type Answer struct {
	Status int // 0 means 200
	Header http.Header
	Body   string
	// Delay is waited before answering, whether or not the client is still
	// there.
	Delay time.Duration
}

// Behaviour scripts the receiver: it sees each request (attempt filled in)
// and decides the answer. It may block.
type Behaviour func(d *Delivery) Answer

// Receiver is a webhook endpoint with scripted behaviours that records every
// request. Unlike e2e.Receiver it can set headers (Retry-After), answer late
// and be taken down (listener closed, connections reset) and brought back
// on the same address.
type Receiver struct {
	addr string
	// KeepBodies keeps each request body in the Delivery (bad-row checks).
	KeepBodies bool

	mu         sync.Mutex
	srv        *http.Server
	deliveries []Delivery
	attempts   map[string]int
	behaviour  Behaviour
	pending    atomic.Int64
	// handlerDelay (nanoseconds) is waited before a request is read.
	handlerDelay atomic.Int64
	conns        map[net.Conn]time.Time // open connections and when each was accepted
	// acceptedIDs holds every event id answered 2xx at least once.
	acceptedIDs map[int64]struct{}
	// secrets, when set, are the secrets a signature may verify with (a
	// subscription's, over its rotations); default e2e.Secret.
	secrets []string
}

// AddSecret adds a secret a request's signature may verify with; the first
// call replaces the default (e2e.Secret).
func (r *Receiver) AddSecret(s string) {
	r.mu.Lock()
	r.secrets = append(r.secrets, s)
	r.mu.Unlock()
}

// verify checks a request's signature against the receiver's secrets.
func (r *Receiver) verify(wid, ts string, body []byte, sig string) bool {
	r.mu.Lock()
	secrets := r.secrets
	r.mu.Unlock()
	if secrets == nil {
		secrets = []string{e2e.Secret}
	}
	for _, s := range secrets {
		if e2e.Verify(s, wid, ts, body, sig) {
			return true
		}
	}
	return false
}

// NewReceiver starts a receiver on a free loopback port; it is shut down at
// cleanup.
func NewReceiver(t testing.TB) *Receiver {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	r := &Receiver{addr: ln.Addr().String(), attempts: map[string]int{}, conns: map[net.Conn]time.Time{}, acceptedIDs: map[int64]struct{}{}}
	r.serve(ln)
	t.Cleanup(r.Down)
	return r
}

// URL is the receiver's URL.
func (r *Receiver) URL() string { return "http://" + r.addr + "/hook" }

// SetBehaviour replaces the behaviour; nil answers 200 at once.
func (r *Receiver) SetBehaviour(b Behaviour) {
	r.mu.Lock()
	r.behaviour = b
	r.mu.Unlock()
}

func (r *Receiver) serve(ln net.Listener) {
	srv := &http.Server{
		Handler:           http.HandlerFunc(r.handle),
		ReadHeaderTimeout: 10 * time.Second,
		ConnContext: func(ctx context.Context, c net.Conn) context.Context {
			at := time.Now()
			r.mu.Lock()
			r.conns[c] = at
			r.mu.Unlock()
			return context.WithValue(ctx, connAtKey{}, at)
		},
		ConnState: func(c net.Conn, st http.ConnState) {
			if st == http.StateClosed || st == http.StateHijacked {
				r.mu.Lock()
				delete(r.conns, c)
				r.mu.Unlock()
			}
		},
	}
	r.mu.Lock()
	r.srv = srv
	r.mu.Unlock()
	go srv.Serve(ln) //nolint:errcheck // ends with Down
}

// Down takes the receiver off the network: the listener is closed (new
// connections are refused) and open connections are closed.
func (r *Receiver) Down() {
	r.mu.Lock()
	srv := r.srv
	r.srv = nil
	r.mu.Unlock()
	if srv != nil {
		_ = srv.Close()
	}
	r.mu.Lock()
	clear(r.conns) // closed with the server
	r.mu.Unlock()
}

// Up brings a downed receiver back on the same address.
func (r *Receiver) Up(t testing.TB) {
	t.Helper()
	var ln net.Listener
	var err error
	// The port was ours a moment ago; retry briefly in case the kernel has
	// not released it yet.
	for range 100 {
		if ln, err = net.Listen("tcp", r.addr); err == nil {
			break
		}
		time.Sleep(20 * time.Millisecond) //nolint:forbidigo // waiting for the kernel, not for the system under test
	}
	require.NoError(t, err, "listen on %s again", r.addr)
	r.serve(ln)
}

type connAtKey struct{}

// OpenConnsAcceptedBefore counts the open connections accepted before t.
func (r *Receiver) OpenConnsAcceptedBefore(t time.Time) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := 0
	for _, at := range r.conns {
		if at.Before(t) {
			n++
		}
	}
	return n
}

// Pending is the number of requests being handled (not yet answered).
func (r *Receiver) Pending() int64 { return r.pending.Load() }

// SetHandlerDelay makes every request wait d before the receiver reads it:
// a receiver slow to get to its requests (a loaded machine), so that requests
// written before a kill are handled after it.
func (r *Receiver) SetHandlerDelay(d time.Duration) { r.handlerDelay.Store(int64(d)) }

func (r *Receiver) handle(w http.ResponseWriter, req *http.Request) {
	r.pending.Add(1)
	defer r.pending.Add(-1)
	if d := time.Duration(r.handlerDelay.Load()); d > 0 {
		time.Sleep(d) //nolint:forbidigo // a slow receiver is the behaviour under test
	}
	body, _ := io.ReadAll(req.Body)
	d := Delivery{WebhookID: req.Header.Get("webhook-id"), Start: time.Now()}
	d.ConnAt, _ = req.Context().Value(connAtKey{}).(time.Time)
	d.SigOK = r.verify(d.WebhookID, req.Header.Get("webhook-timestamp"), body, req.Header.Get("webhook-signature"))
	d.IDs, d.Orgs = parseEnvelopes(body)
	r.mu.Lock()
	r.attempts[d.WebhookID]++
	d.Attempt = r.attempts[d.WebhookID]
	b := r.behaviour
	if r.KeepBodies {
		d.Body = body
	}
	r.mu.Unlock()
	a := Answer{Status: http.StatusOK}
	if b != nil {
		a = b(&d)
		if a.Status == 0 {
			a.Status = http.StatusOK
		}
	}
	if a.Delay > 0 {
		time.Sleep(a.Delay) //nolint:forbidigo // a slow receiver is the behaviour under test
	}
	d.Status = a.Status
	d.ClientGone = req.Context().Err() != nil
	for k, vs := range a.Header {
		for _, v := range vs {
			w.Header().Add(k, v)
		}
	}
	w.WriteHeader(a.Status)
	_, _ = io.WriteString(w, a.Body)
	d.At = time.Now()
	r.mu.Lock()
	r.deliveries = append(r.deliveries, d)
	if d.Accepted() {
		for _, id := range d.IDs {
			r.acceptedIDs[id] = struct{}{}
		}
	}
	r.mu.Unlock()
}

// parseEnvelopes extracts ids and organizations from one envelope or an
// array of envelopes.
func parseEnvelopes(body []byte) (ids, orgs []int64) {
	type env struct {
		ID  int64  `json:"id"`
		Org *int64 `json:"organization_id"`
	}
	var many []env
	if bytes.HasPrefix(bytes.TrimSpace(body), []byte("[")) {
		_ = json.Unmarshal(body, &many)
	} else {
		var one env
		if json.Unmarshal(body, &one) == nil {
			many = []env{one}
		}
	}
	for _, e := range many {
		ids = append(ids, e.ID)
		org := int64(-1)
		if e.Org != nil {
			org = *e.Org
		}
		orgs = append(orgs, org)
	}
	return ids, orgs
}

// Deliveries returns a copy of every request answered so far, in answer order.
func (r *Receiver) Deliveries() []Delivery {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]Delivery(nil), r.deliveries...)
}

// AcceptedCount is the number of distinct event ids answered 2xx. It is
// kept as requests arrive: a poll never walks the deliveries under the lock
// the handler needs.
func (r *Receiver) AcceptedCount() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.acceptedIDs)
}

// Requests is the number of requests answered so far.
func (r *Receiver) Requests() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.deliveries)
}

// retryAfter returns an answer 429 with Retry-After in seconds.
func retryAfter(seconds int) Answer {
	return Answer{Status: http.StatusTooManyRequests, Header: http.Header{"Retry-After": {strconv.Itoa(seconds)}}}
}
