package sink_test

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
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

const (
	ga4Secret        = "s3cr3t-GA4-ApiSecret_0123456789"
	ga4MeasurementID = "G-TEST123ABC"
)

// ga4Now is the fixed clock of the GA4 tests: nothing depends on the date.
var ga4Now = time.Date(2026, 11, 26, 12, 0, 0, 0, time.UTC)

// ga4Captured is one request as the test server saw it.
type ga4Captured struct {
	path  string
	query map[string][]string
	raw   string
	body  struct {
		ClientID        string            `json:"client_id"`
		UserID          string            `json:"user_id"`
		TimestampMicros int64             `json:"timestamp_micros"`
		Events          []json.RawMessage `json:"events"`
	}
}

// ids returns the outboxd_event_id of each event of the request.
func (c ga4Captured) ids(t testing.TB) []int64 {
	t.Helper()
	ids := make([]int64, len(c.body.Events))
	for i, e := range c.body.Events {
		var ev struct {
			Params struct {
				ID int64 `json:"outboxd_event_id"`
			} `json:"params"`
		}
		require.NoError(t, json.Unmarshal(e, &ev))
		ids[i] = ev.Params.ID
	}
	return ids
}

type ga4Server struct {
	srv  *httptest.Server
	mu   sync.Mutex
	reqs []ga4Captured
}

// newGA4Server records every request and answers with handle (204 when nil).
func newGA4Server(t *testing.T, handle func(n int, w http.ResponseWriter, r *http.Request, c ga4Captured)) *ga4Server {
	t.Helper()
	gs := &ga4Server{}
	gs.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c := ga4Captured{path: r.URL.Path, query: r.URL.Query()}
		raw, err := io.ReadAll(r.Body)
		if err == nil {
			err = json.Unmarshal(raw, &c.body)
		}
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		c.raw = string(raw)
		gs.mu.Lock()
		gs.reqs = append(gs.reqs, c)
		n := len(gs.reqs)
		gs.mu.Unlock()
		if handle == nil {
			w.WriteHeader(http.StatusNoContent)
			return
		}
		handle(n, w, r, c)
	}))
	t.Cleanup(gs.srv.Close)
	return gs
}

func (gs *ga4Server) requests() []ga4Captured {
	gs.mu.Lock()
	defer gs.mu.Unlock()
	return append([]ga4Captured(nil), gs.reqs...)
}

func fastGA4(endpoint string) sink.GA4Config {
	return sink.GA4Config{
		Name: "ga4-test", Endpoint: endpoint, MeasurementID: ga4MeasurementID, APISecret: ga4Secret,
		ClientIDProperty: "ga_client_id", ClientIDKey: "test-client-id-key",
		Now: func() time.Time { return ga4Now },
		HTTPConfig: sink.HTTPConfig{AllowPrivate: true, Timeout: 5 * time.Second,
			RetryConfig: sink.RetryConfig{MaxAttempts: 4, BackoffMin: time.Millisecond, BackoffMax: 5 * time.Millisecond}},
	}
}

func newGA4(t *testing.T, cfg sink.GA4Config, log zerolog.Logger) *sink.GA4 {
	t.Helper()
	g, err := sink.NewGA4(cfg, log)
	require.NoError(t, err)
	t.Cleanup(g.Close)
	return g
}

// ga4Event builds an event the way the decoder does: typed fields plus the
// envelope.
func ga4Event(id int64, body string) *decode.Event {
	ev := phEvent(id, body)
	var env struct {
		OccurredAt *time.Time `json:"occurred_at"`
	}
	if json.Unmarshal(ev.Body, &env) == nil && env.OccurredAt != nil {
		ev.OccurredAt = *env.OccurredAt
	}
	return ev
}

// clientIDOf is the pseudonymous client id, computed here independently of
// the sink: HMAC-SHA256 over "outboxd-ga4-client-id", NUL, organization,
// NUL, user; its first 16 bytes in hex.
func clientIDOf(key, org, user string) string {
	m := hmac.New(sha256.New, []byte(key))
	m.Write([]byte("outboxd-ga4-client-id\x00" + org + "\x00" + user))
	return hex.EncodeToString(m.Sum(nil)[:16])
}

// TestGA4Conformance runs the shared suite with an httptest server as GA4:
// the ids are read back from params.outboxd_event_id. The suite's events
// have neither user nor organization: each gets its own client id, so each
// goes in its own request, one after the other (InOrder).
func TestGA4Conformance(t *testing.T) {
	t.Parallel()
	sinktest.Run(t, func(t *testing.T, rcv *sinktest.Receiver) sink.Sink {
		gs := newGA4Server(t, func(_ int, w http.ResponseWriter, r *http.Request, c ga4Captured) {
			switch rcv.Receive(r.Context(), c.ids(t)) {
			case sinktest.Ack:
				w.WriteHeader(http.StatusNoContent)
			case sinktest.FailPermanent:
				http.Error(w, "bad request", http.StatusBadRequest)
			default:
				http.Error(w, "unavailable", http.StatusServiceUnavailable)
			}
		})
		return newGA4(t, fastGA4(gs.srv.URL), zerolog.Nop())
	}, sinktest.InOrder())
}

// The exact request: URL, client and user ids, timestamps, the mapping of
// properties and envelope fields to parameters.
func TestGA4RequestBody(t *testing.T) {
	t.Parallel()
	gs := newGA4Server(t, nil)
	g := newGA4(t, fastGA4(gs.srv.URL+"/"), zerolog.Nop())
	evs := []*decode.Event{
		// A user with a GA client id in its properties.
		ga4Event(42, `{"id":42,"event_name":"batch_started","occurred_at":"2026-11-26T10:00:00.123456Z",
			"organization_id":7,"user_id":3,"entity_type":"batch","entity_id":"B-19",
			"correlation_id":"c-1","source":"batch_service","schema_version":2,
			"properties":{"ga_client_id":"123.456","qty":1.50,"ok":true,"no":false,"gone":null,
				"nested":{"a":1},"list":[1,2],"source":"overridden","note":"ünï \"q\""}}`),
		// The same user and client a second later: the same request.
		ga4Event(43, `{"id":43,"event_name":"batch_finished","occurred_at":"2026-11-26T10:00:01Z",
			"organization_id":7,"user_id":3,"entity_type":"batch","entity_id":"B-19",
			"correlation_id":null,"source":"batch_service","schema_version":2,
			"properties":{"ga_client_id":"123.456"}}`),
		// No client id property: a pseudonymous one from organization and user.
		ga4Event(44, `{"id":44,"event_name":"inventory_adjusted","occurred_at":"2026-11-26T10:00:02Z",
			"organization_id":7,"user_id":"u-9","entity_type":null,"entity_id":null,
			"correlation_id":null,"source":null,"schema_version":1,"properties":{}}`),
		// No user: organization only, no user_id sent.
		ga4Event(45, `{"id":45,"event_name":"system_tick","organization_id":8,"user_id":null,
			"schema_version":1,"properties":{"organization_id":99}}`),
	}
	out := g.Deliver(t.Context(), evs)
	for _, o := range out {
		require.NoError(t, o.Err)
		require.Equal(t, 1, o.Attempts)
		require.Equal(t, http.StatusNoContent, o.Status)
	}
	reqs := gs.requests()
	require.Len(t, reqs, 3)
	for _, r := range reqs {
		require.Equal(t, "/mp/collect", r.path)
		require.Equal(t, map[string][]string{"measurement_id": {ga4MeasurementID}, "api_secret": {ga4Secret}}, r.query)
	}
	require.JSONEq(t, `{"client_id":"123.456","user_id":"3","timestamp_micros":1795687200123456,"events":[
		{"name":"batch_started","timestamp_micros":1795687200123456,"params":{
			"qty":1.50,"ok":"true","no":"false","note":"ünï \"q\"",
			"organization_id":7,"entity_type":"batch","entity_id":"B-19","correlation_id":"c-1",
			"source":"batch_service","schema_version":2,"outboxd_event_id":42}},
		{"name":"batch_finished","timestamp_micros":1795687201000000,"params":{
			"organization_id":7,"entity_type":"batch","entity_id":"B-19",
			"source":"batch_service","schema_version":2,"outboxd_event_id":43}}]}`, reqs[0].raw)
	require.Contains(t, reqs[0].raw, `"qty":1.50`, "numbers pass through as written")
	require.JSONEq(t, `{"client_id":"`+clientIDOf("test-client-id-key", "7", "u-9")+`","user_id":"u-9","timestamp_micros":1795687202000000,"events":[
		{"name":"inventory_adjusted","timestamp_micros":1795687202000000,"params":{
			"organization_id":7,"schema_version":1,"outboxd_event_id":44}}]}`, reqs[1].raw)
	require.JSONEq(t, `{"client_id":"`+clientIDOf("test-client-id-key", "8", "")+`","events":[
		{"name":"system_tick","params":{"organization_id":8,"schema_version":1,"outboxd_event_id":45}}]}`, reqs[2].raw)

	// What Plan says it drops, for `outboxd ga4 validate`.
	plan := g.Plan(evs)
	require.Equal(t, [][]string{{"gone", "list", "nested"}, nil, nil, nil}, plan.Dropped)
	require.Len(t, plan.Requests, 3)
	require.Equal(t, []int{0, 1}, plan.Requests[0].Events)
}

// The pseudonymous client id is stable, keyed, and never the user id.
func TestGA4PseudonymousClientID(t *testing.T) {
	t.Parallel()
	gs := newGA4Server(t, nil)
	ev := func() *decode.Event {
		return ga4Event(1, `{"id":1,"event_name":"e","organization_id":7,"user_id":3,"properties":{}}`)
	}
	clientOf := func(cfg sink.GA4Config) string {
		g := newGA4(t, cfg, zerolog.Nop())
		require.NoError(t, g.Deliver(t.Context(), []*decode.Event{ev()})[0].Err)
		reqs := gs.requests()
		return reqs[len(reqs)-1].body.ClientID
	}
	cfg := fastGA4(gs.srv.URL)
	a, b := clientOf(cfg), clientOf(cfg)
	require.Equal(t, a, b, "stable")
	require.Equal(t, clientIDOf("test-client-id-key", "7", "3"), a)
	require.Regexp(t, `^[0-9a-f]{32}$`, a)
	cfg.ClientIDKey = "another-key"
	require.NotEqual(t, a, clientOf(cfg), "keyed")
	cfg.ClientIDKey = ""
	require.Equal(t, clientIDOf(ga4Secret, "7", "3"), clientOf(cfg), "keyed by the API secret by default")

	// Neither user nor organization: one per event, from its message id.
	g := newGA4(t, fastGA4(gs.srv.URL), zerolog.Nop())
	anon := sinktest.Events(5, 6)
	for _, o := range g.Deliver(t.Context(), anon) {
		require.NoError(t, o.Err)
	}
	reqs := gs.requests()
	require.Len(t, reqs[len(reqs)-1].body.Events, 1)
	require.NotEqual(t, reqs[len(reqs)-1].body.ClientID, reqs[len(reqs)-2].body.ClientID)
}

// Requests carry runs of at most 25 consecutive events of one client and
// user; an event refused in a run does not break it.
func TestGA4Batching(t *testing.T) {
	t.Parallel()
	gs := newGA4Server(t, nil)
	g := newGA4(t, fastGA4(gs.srv.URL), zerolog.Nop())
	var evs []*decode.Event
	user := func(id int64, u int) *decode.Event {
		return ga4Event(id, fmt.Sprintf(`{"id":%d,"event_name":"e","organization_id":1,"user_id":%d}`, id, u))
	}
	for id := int64(1); id <= 30; id++ { // 30 of user 1: 25 + 5
		evs = append(evs, user(id, 1))
	}
	evs = append(evs, user(31, 2), user(32, 1), user(33, 1))
	evs = append(evs, ga4Event(34, `{"id":34,"event_name":"first_visit","organization_id":1,"user_id":1}`)) // refused
	evs = append(evs, user(35, 1))
	out := g.Deliver(t.Context(), evs)
	for i, o := range out {
		if evs[i].ID == 34 {
			require.ErrorIs(t, o.Err, sink.ErrPermanent)
			continue
		}
		require.NoError(t, o.Err, "event %d", evs[i].ID)
	}
	var got [][]int64
	var users []string
	for _, r := range gs.requests() {
		got = append(got, r.ids(t))
		users = append(users, r.body.UserID)
	}
	seq := func(from, to int64) []int64 {
		var s []int64
		for i := from; i <= to; i++ {
			s = append(s, i)
		}
		return s
	}
	require.Equal(t, [][]int64{seq(1, 25), seq(26, 30), {31}, {32, 33, 35}}, got)
	require.Equal(t, []string{"1", "1", "2", "1"}, users)
}

// Every GA4 limit fails the event permanently before anything is sent, with
// the rule and the value in the error; the other events go out.
func TestGA4Limits(t *testing.T) {
	t.Parallel()
	manyProps := map[string]int{}
	for i := range 19 {
		manyProps[fmt.Sprintf("p%02d", i)] = i
	}
	many, err := json.Marshal(manyProps)
	require.NoError(t, err)
	for _, tt := range []struct {
		name string
		body string
		want string
	}{
		{"NameTooLong", `{"event_name":"` + strings.Repeat("a", 41) + `"}`, `event name "` + strings.Repeat("a", 41) + `" is 41 characters, over the 40`},
		{"NameBadCharacter", `{"event_name":"order.placed"}`, `event name "order.placed" must start with a letter and have only letters, digits and underscores`},
		{"NameNotASCII", `{"event_name":"` + strings.Repeat("é", 21) + `"}`, `event name "` + strings.Repeat("é", 21) + `" must start with a letter and have only letters, digits and underscores`},
		{"NameStartsWithDigit", `{"event_name":"1st_order"}`, `event name "1st_order" must start with a letter`},
		{"NameEmpty", `{"event_name":null}`, `event name is empty`},
		{"NameReserved", `{"event_name":"session_start"}`, `event name "session_start" is reserved by GA4`},
		{"NameReservedError", `{"event_name":"error"}`, `event name "error" is reserved`},
		{"NamePrefixUnderscore", `{"event_name":"_internal"}`, `event name "_internal" starts with the reserved prefix "_"`},
		{"NamePrefixFirebase", `{"event_name":"firebase_x"}`, `event name "firebase_x" starts with the reserved prefix "firebase_"`},
		{"NamePrefixGA", `{"event_name":"ga_x"}`, `event name "ga_x" starts with the reserved prefix "ga_"`},
		{"NamePrefixGoogle", `{"event_name":"google_x"}`, `event name "google_x" starts with the reserved prefix "google_"`},
		{"NamePrefixGtag", `{"event_name":"gtag.x"}`, `event name "gtag.x" starts with the reserved prefix "gtag."`},
		{"ParamPrefix", `{"event_name":"e","properties":{"google_thing":1}}`, `parameter name "google_thing" starts with the reserved prefix "google_"`},
		{"ParamPrefixUnderscore", `{"event_name":"e","properties":{"_x":1}}`, `parameter name "_x" starts with the reserved prefix "_"`},
		{"ParamNameTooLong", `{"event_name":"e","properties":{"` + strings.Repeat("p", 41) + `":1}}`, `parameter name "` + strings.Repeat("p", 41) + `" is 41 characters, over the 40`},
		{"ParamNameBadCharacter", `{"event_name":"e","properties":{"a-b":1}}`, `parameter name "a-b" must start with a letter`},
		{"ParamValueTooLong", `{"event_name":"e","properties":{"note":"` + strings.Repeat("é", 101) + `"}}`, `parameter "note" is a string of 101 characters, over the 100`},
		{"EnvelopeValueTooLong", `{"event_name":"e","entity_id":"` + strings.Repeat("x", 101) + `"}`, `parameter "entity_id" is a string of 101 characters`},
		// 19 properties, organization_id, schema_version... and outboxd_event_id: 26.
		{"TooManyParams", `{"event_name":"e","organization_id":1,"entity_type":"t","entity_id":"i","correlation_id":"c","source":"s","schema_version":1,"properties":` + string(many) + `}`, `26 parameters, over the 25`},
		{"TooOld", `{"event_name":"e","occurred_at":"2026-11-23T11:59:59Z"}`, `occurred_at 2026-11-23T11:59:59Z is 72h0m1s before now, over the 72h`},
		{"UserIDTooLong", `{"event_name":"e","user_id":"` + strings.Repeat("u", 257) + `"}`, `user_id is 257 characters, over the 256`},
	} {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			gs := newGA4Server(t, nil)
			g := newGA4(t, fastGA4(gs.srv.URL), zerolog.Nop())
			bad := ga4Event(2, `{"id":2,`+tt.body[1:])
			out := g.Deliver(t.Context(), []*decode.Event{
				ga4Event(1, `{"id":1,"event_name":"ok"}`), bad, ga4Event(3, `{"id":3,"event_name":"ok"}`),
			})
			require.NoError(t, out[0].Err)
			require.NoError(t, out[2].Err)
			require.ErrorIs(t, out[1].Err, sink.ErrPermanent)
			require.ErrorContains(t, out[1].Err, "GA4 limit: "+tt.want)
			require.ErrorContains(t, out[1].Err, "event 2")
			require.Zero(t, out[1].Attempts, "never sent")
			var sent []int64
			for _, r := range gs.requests() {
				sent = append(sent, r.ids(t)...)
			}
			require.Equal(t, []int64{1, 3}, sent)
		})
	}
	// At the limits exactly, everything goes.
	gs := newGA4Server(t, nil)
	g := newGA4(t, fastGA4(gs.srv.URL), zerolog.Nop())
	edge := ga4Event(1, `{"id":1,"event_name":"`+strings.Repeat("a", 40)+`","occurred_at":"2026-11-23T12:00:00Z","user_id":"`+
		strings.Repeat("u", 256)+`","properties":{"`+strings.Repeat("p", 40)+`":"`+strings.Repeat("é", 100)+`","notification_open":1}}`)
	require.NoError(t, g.Deliver(t.Context(), []*decode.Event{edge})[0].Err, "72h exactly, 40, 100 and 256 characters; reserved event names are fine as parameter names")
}

func TestGA4AnswersClassified(t *testing.T) {
	t.Parallel()
	for _, tt := range []struct {
		status    int
		permanent bool
	}{
		{http.StatusInternalServerError, false},
		{http.StatusServiceUnavailable, false},
		{http.StatusTooManyRequests, false},
		{http.StatusRequestTimeout, false},
		{http.StatusBadRequest, true},
		{http.StatusForbidden, true},
		{http.StatusGone, true},
		{http.StatusFound, true},
	} {
		t.Run(fmt.Sprint(tt.status), func(t *testing.T) {
			t.Parallel()
			gs := newGA4Server(t, func(_ int, w http.ResponseWriter, _ *http.Request, _ ga4Captured) {
				if tt.status == http.StatusFound {
					w.Header().Set("Location", "/elsewhere")
				}
				w.WriteHeader(tt.status)
			})
			cfg := fastGA4(gs.srv.URL)
			cfg.MaxAttempts = 3
			out := newGA4(t, cfg, zerolog.Nop()).Deliver(t.Context(), []*decode.Event{
				ga4Event(1, `{"id":1,"event_name":"e","user_id":1}`), ga4Event(2, `{"id":2,"event_name":"e","user_id":1}`),
			})
			for _, o := range out {
				require.Error(t, o.Err)
				require.Equal(t, tt.status, o.Status)
				require.NotErrorIs(t, o.Err, sink.ErrGone)
				if tt.permanent {
					require.ErrorIs(t, o.Err, sink.ErrPermanent)
					require.Equal(t, 1, o.Attempts)
				} else {
					require.NotErrorIs(t, o.Err, sink.ErrPermanent)
					require.Equal(t, 3, o.Attempts, "retried in memory")
				}
			}
			require.Len(t, gs.requests(), map[bool]int{true: 1, false: 3}[tt.permanent], "both events in one request")
		})
	}
}

// A 429 is retried after the Retry-After GA4 asks for (clamped to the
// backoff's maximum), and the outcome reports what was asked.
func TestGA4TooManyRequestsHonoursRetryAfter(t *testing.T) {
	t.Parallel()
	gs := newGA4Server(t, func(n int, w http.ResponseWriter, _ *http.Request, _ ga4Captured) {
		if n == 1 {
			w.Header().Set("Retry-After", "7")
			w.WriteHeader(http.StatusTooManyRequests)
			return
		}
		w.WriteHeader(http.StatusNoContent)
	})
	out := newGA4(t, fastGA4(gs.srv.URL), zerolog.Nop()).Deliver(t.Context(), []*decode.Event{ga4Event(1, `{"id":1,"event_name":"e"}`)})
	require.NoError(t, out[0].Err)
	require.Equal(t, 2, out[0].Attempts)
	require.Equal(t, 7*time.Second, out[0].RetryAfter)
	require.Len(t, gs.requests(), 2)
}

// A request that cannot be settled holds back the requests behind it, so
// that no event overtakes an earlier one.
func TestGA4HoldsBackAfterAFailure(t *testing.T) {
	t.Parallel()
	gs := newGA4Server(t, func(_ int, w http.ResponseWriter, _ *http.Request, c ga4Captured) {
		if c.body.UserID == "1" {
			w.WriteHeader(http.StatusServiceUnavailable)
			return
		}
		w.WriteHeader(http.StatusNoContent)
	})
	cfg := fastGA4(gs.srv.URL)
	cfg.MaxAttempts = 2
	out := newGA4(t, cfg, zerolog.Nop()).Deliver(t.Context(), []*decode.Event{
		ga4Event(1, `{"id":1,"event_name":"e","user_id":2}`),
		ga4Event(2, `{"id":2,"event_name":"e","user_id":1}`),
		ga4Event(3, `{"id":3,"event_name":"e","user_id":2}`),
	})
	require.NoError(t, out[0].Err)
	require.Error(t, out[1].Err)
	require.NotErrorIs(t, out[1].Err, sink.ErrPermanent)
	require.Equal(t, 2, out[1].Attempts)
	require.Error(t, out[2].Err)
	require.NotErrorIs(t, out[2].Err, sink.ErrPermanent)
	require.Zero(t, out[2].Attempts, "held back, never sent")
	require.Len(t, gs.requests(), 3)
}

// The API secret travels in the URL's query: no error (transport failure,
// an answer echoing it) and no log line carries it.
func TestGA4SecretNeverLeaked(t *testing.T) {
	t.Parallel()
	t.Run("TransportError", func(t *testing.T) {
		t.Parallel()
		gs := newGA4Server(t, nil)
		gs.srv.Close() // connection refused
		var logs syncBuffer
		cfg := fastGA4(gs.srv.URL)
		cfg.MaxAttempts = 2
		out := newGA4(t, cfg, zerolog.New(&logs).Level(zerolog.TraceLevel)).Deliver(t.Context(), []*decode.Event{ga4Event(1, `{"id":1,"event_name":"e"}`)})
		require.Error(t, out[0].Err)
		require.NotErrorIs(t, out[0].Err, sink.ErrPermanent)
		require.Equal(t, 2, out[0].Attempts)
		msg := out[0].Err.Error()
		require.Contains(t, msg, "post ga4 "+gs.srv.URL+"/mp/collect")
		require.Contains(t, msg, "refused")
		require.NotContains(t, msg, ga4Secret)
		require.NotContains(t, msg, "api_secret")
		require.NotEmpty(t, logs.String())
		require.NotContains(t, logs.String(), ga4Secret)
		require.NotContains(t, logs.String(), "api_secret")
	})
	t.Run("CallerDeadline", func(t *testing.T) {
		t.Parallel()
		release := make(chan struct{})
		gs := newGA4Server(t, func(_ int, _ http.ResponseWriter, r *http.Request, _ ga4Captured) {
			select {
			case <-release:
			case <-r.Context().Done():
			}
		})
		defer close(release)
		ctx, cancel := context.WithTimeout(t.Context(), 50*time.Millisecond)
		defer cancel()
		out := newGA4(t, fastGA4(gs.srv.URL), zerolog.Nop()).Deliver(ctx, []*decode.Event{ga4Event(1, `{"id":1,"event_name":"e"}`)})
		require.ErrorIs(t, out[0].Err, context.DeadlineExceeded)
		require.NotContains(t, out[0].Err.Error(), ga4Secret)
	})
	t.Run("EchoedByTheServer", func(t *testing.T) {
		t.Parallel()
		gs := newGA4Server(t, func(_ int, w http.ResponseWriter, r *http.Request, _ ga4Captured) {
			http.Error(w, "bad request to "+r.URL.String(), http.StatusBadRequest)
		})
		var logs syncBuffer
		out := newGA4(t, fastGA4(gs.srv.URL), zerolog.New(&logs).Level(zerolog.TraceLevel)).Deliver(t.Context(), []*decode.Event{ga4Event(1, `{"id":1,"event_name":"e"}`)})
		require.ErrorIs(t, out[0].Err, sink.ErrPermanent)
		require.Contains(t, out[0].Err.Error(), "api_secret=[REDACTED]")
		require.NotContains(t, out[0].Err.Error(), ga4Secret)
		require.NotContains(t, logs.String(), ga4Secret)
	})
	t.Run("PrivateAddressRefused", func(t *testing.T) {
		t.Parallel()
		gs := newGA4Server(t, nil)
		cfg := fastGA4(gs.srv.URL)
		cfg.AllowPrivate = false
		out := newGA4(t, cfg, zerolog.Nop()).Deliver(t.Context(), []*decode.Event{ga4Event(1, `{"id":1,"event_name":"e"}`)})
		require.ErrorIs(t, out[0].Err, sink.ErrPermanent)
		require.ErrorIs(t, out[0].Err, sink.ErrForbiddenAddress)
		require.NotContains(t, out[0].Err.Error(), ga4Secret)
		require.Empty(t, gs.requests())
	})
}

func TestGA4Config(t *testing.T) {
	t.Parallel()
	cfg := sink.GA4Config{MeasurementID: "G-ABC123", APISecret: "x"}
	require.NoError(t, cfg.Validate())
	require.Empty(t, cfg.Endpoint, "Validate changes nothing")
	require.Equal(t, "https://www.google-analytics.com", cfg.WithDefaults().Endpoint)
	for field, c := range map[string]sink.GA4Config{
		"MeasurementID": {APISecret: "x"},
		"APISecret":     {MeasurementID: "G-ABC123"},
		"Endpoint":      {MeasurementID: "G-ABC123", APISecret: "x", Endpoint: "https://u:pw@region1.google-analytics.com"},
		"MaxAttempts":   {MeasurementID: "G-ABC123", APISecret: "x", HTTPConfig: sink.HTTPConfig{RetryConfig: sink.RetryConfig{MaxAttempts: -1}}},
	} {
		require.ErrorContains(t, c.Validate(), field+":", field)
	}
	for _, id := range []string{"UA-1234-1", "g-abc123", "G-", "G-abc", "G-AB C", "1:123:web:abc"} {
		err := sink.GA4Config{MeasurementID: id, APISecret: ga4Secret}.Validate()
		require.ErrorContains(t, err, "MeasurementID:", id)
		require.NotContains(t, err.Error(), ga4Secret)
	}
	err := sink.GA4Config{MeasurementID: "G-ABC123", APISecret: ga4Secret, Endpoint: "ftp://x"}.Validate()
	require.ErrorContains(t, err, "Endpoint:")
	require.NotContains(t, err.Error(), ga4Secret)

	// An endpoint given with the collection path posts to /mp/collect.
	gs := newGA4Server(t, nil)
	for _, ep := range []string{gs.srv.URL + "/mp/collect", gs.srv.URL + "/debug/mp/collect", gs.srv.URL + "/"} {
		g := newGA4(t, fastGA4(ep), zerolog.Nop())
		require.NoError(t, g.Deliver(t.Context(), []*decode.Event{ga4Event(1, `{"id":1,"event_name":"e"}`)})[0].Err, ep)
	}
	for _, r := range gs.requests() {
		require.Equal(t, "/mp/collect", r.path)
	}
}

// Debug sends a planned request to the validation server and maps its
// messages to the request's events.
func TestGA4Debug(t *testing.T) {
	t.Parallel()
	gs := newGA4Server(t, func(_ int, w http.ResponseWriter, r *http.Request, _ ga4Captured) {
		if r.URL.Path != "/debug/mp/collect" {
			http.Error(w, "not the validation server", http.StatusNotFound)
			return
		}
		_, _ = io.WriteString(w, `{"validationMessages":[
			{"fieldPath":"events","description":"Event at index: [1] has invalid name [x].","validationCode":"NAME_INVALID"},
			{"fieldPath":"events[0].params.note","description":"Value too long.","validationCode":"VALUE_OUT_OF_BOUNDS"},
			{"fieldPath":"client_id","description":"Missing.","validationCode":"VALUE_REQUIRED"}]}`)
	})
	g := newGA4(t, fastGA4(gs.srv.URL), zerolog.Nop())
	plan := g.Plan([]*decode.Event{ga4Event(1, `{"id":1,"event_name":"e","user_id":1}`), ga4Event(2, `{"id":2,"event_name":"e","user_id":1}`)})
	require.Len(t, plan.Requests, 1)
	msgs, err := g.Debug(t.Context(), plan.Requests[0])
	require.NoError(t, err)
	require.Equal(t, []sink.GA4Message{
		{Event: 1, FieldPath: "events", Description: "Event at index: [1] has invalid name [x].", ValidationCode: "NAME_INVALID"},
		{Event: 0, FieldPath: "events[0].params.note", Description: "Value too long.", ValidationCode: "VALUE_OUT_OF_BOUNDS"},
		{Event: -1, FieldPath: "client_id", Description: "Missing.", ValidationCode: "VALUE_REQUIRED"},
	}, msgs)
	reqs := gs.requests()
	require.Len(t, reqs, 1)
	require.Equal(t, string(plan.Requests[0].Body), reqs[0].raw, "exactly the request the sink sends")
	require.Equal(t, ga4Secret, reqs[0].query["api_secret"][0])
}
