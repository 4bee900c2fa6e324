package sink_test

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/rs/zerolog"
	"github.com/stretchr/testify/require"

	"github.com/outboxd/outboxd/decode"
	"github.com/outboxd/outboxd/sink"
	"github.com/outboxd/outboxd/sink/sinktest"
)

const posthogKey = "phc_TestProjectKey0123456789abcdef"

// capturedBatch is one /batch/ request as the test server saw it.
type capturedBatch struct {
	path        string
	contentType string
	raw         []byte
	body        struct {
		APIKey string            `json:"api_key"`
		Batch  []json.RawMessage `json:"batch"`
	}
}

// posthogServer records every request and answers with handle (200 when nil).
type posthogServer struct {
	srv  *httptest.Server
	mu   sync.Mutex
	reqs []capturedBatch
}

func newPostHogServer(t *testing.T, handle func(n int, w http.ResponseWriter, r *http.Request, b capturedBatch)) *posthogServer {
	t.Helper()
	ps := &posthogServer{}
	ps.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b := capturedBatch{path: r.URL.Path, contentType: r.Header.Get("Content-Type")}
		var err error
		b.raw, err = io.ReadAll(r.Body)
		if err == nil {
			err = json.Unmarshal(b.raw, &b.body)
		}
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		ps.mu.Lock()
		ps.reqs = append(ps.reqs, b)
		n := len(ps.reqs)
		ps.mu.Unlock()
		if handle == nil {
			_, _ = w.Write([]byte(`{"status":1}`))
			return
		}
		handle(n, w, r, b)
	}))
	t.Cleanup(ps.srv.Close)
	return ps
}

func (ps *posthogServer) requests() []capturedBatch {
	ps.mu.Lock()
	defer ps.mu.Unlock()
	return append([]capturedBatch(nil), ps.reqs...)
}

func fastPostHog(host string) sink.PostHogConfig {
	return sink.PostHogConfig{
		Name: "posthog-test", Host: host, APIKey: posthogKey, HTTPConfig: sink.HTTPConfig{AllowPrivate: true,
			Timeout: 5 * time.Second, RetryConfig: sink.RetryConfig{MaxAttempts: 4, BackoffMin: time.Millisecond, BackoffMax: 5 * time.Millisecond}},
	}
}

func newPostHog(t *testing.T, cfg sink.PostHogConfig, log zerolog.Logger) *sink.PostHog {
	t.Helper()
	p, err := sink.NewPostHog(cfg, log)
	require.NoError(t, err)
	t.Cleanup(p.Close)
	return p
}

// TestPostHogConformance runs the shared suite with an httptest server as
// PostHog: the ids are read back from properties.outboxd_event_id.
func TestPostHogConformance(t *testing.T) {
	t.Parallel()
	sinktest.Run(t, func(t *testing.T, rcv *sinktest.Receiver) sink.Sink {
		ps := newPostHogServer(t, func(_ int, w http.ResponseWriter, r *http.Request, b capturedBatch) {
			var ids []int64
			for _, item := range b.body.Batch {
				var ev struct {
					Properties struct {
						ID int64 `json:"outboxd_event_id"`
					} `json:"properties"`
				}
				if err := json.Unmarshal(item, &ev); err != nil {
					http.Error(w, err.Error(), http.StatusBadRequest)
					return
				}
				ids = append(ids, ev.Properties.ID)
			}
			switch rcv.Receive(r.Context(), ids) {
			case sinktest.Ack:
				_, _ = w.Write([]byte(`{"status":1}`))
			case sinktest.FailPermanent:
				http.Error(w, `{"type":"validation_error"}`, http.StatusBadRequest)
			default:
				http.Error(w, `{"type":"server_error"}`, http.StatusServiceUnavailable)
			}
		})
		return newPostHog(t, fastPostHog(ps.srv.URL), zerolog.Nop())
	})
}

// phEvent builds an event the way the decoder does: typed fields plus the
// envelope.
func phEvent(id int64, body string) *decode.Event {
	ev := &decode.Event{ID: id, Body: []byte(body), MessageID: decode.MessageID("0a1b2c3d4e5f6789", id, time.Time{})}
	var env struct {
		EventName string `json:"event_name"`
		Org       *int64 `json:"organization_id"`
	}
	if err := json.Unmarshal(ev.Body, &env); err == nil {
		ev.Name = env.EventName
		if env.Org != nil {
			ev.OrganizationID, ev.HasOrganization = *env.Org, true
		}
	}
	return ev
}

func TestPostHogBatchBody(t *testing.T) {
	t.Parallel()
	ps := newPostHogServer(t, nil)
	p := newPostHog(t, fastPostHog(ps.srv.URL+"/"), zerolog.Nop())
	evs := []*decode.Event{
		// A user: distinct_id is the user id, as a string.
		phEvent(42, `{"id":42,"event_name":"batch_started","occurred_at":"2026-11-26T10:00:00.123456Z",
			"organization_id":7,"user_id":3,"entity_type":"batch","entity_id":"B-19",
			"correlation_id":"c-1","source":"batch_service","schema_version":2,
			"properties":{"qty":1.50,"big":12345678901234567890,"nested":{"a":[1,null]},"source":"overridden","note":"ünï \"q\""}}`),
		// No user: the organization, without a person profile.
		phEvent(43, `{"id":43,"event_name":"inventory_adjusted","occurred_at":"2026-11-26T10:00:01Z",
			"organization_id":7,"user_id":null,"entity_type":"item","entity_id":"I-1",
			"correlation_id":null,"source":"inventory","schema_version":1,"properties":{}}`),
		// Neither: an anonymous id per event, no groups.
		phEvent(44, `{"id":44,"event_name":"system_tick","occurred_at":"2026-11-26T10:00:02Z",
			"organization_id":null,"user_id":null,"entity_type":null,"entity_id":null,
			"correlation_id":null,"source":null,"schema_version":1,"properties":{"k":"v"}}`),
	}
	out := p.Deliver(t.Context(), evs)
	require.Len(t, out, 3)
	for _, o := range out {
		require.NoError(t, o.Err)
		require.Equal(t, 1, o.Attempts)
		require.Equal(t, http.StatusOK, o.Status)
	}

	reqs := ps.requests()
	require.Len(t, reqs, 1, "all events of a call in one request")
	r := reqs[0]
	require.Equal(t, "/batch/", r.path)
	require.Equal(t, "application/json", r.contentType)
	require.Equal(t, posthogKey, r.body.APIKey)
	require.Len(t, r.body.Batch, 3)

	type item struct {
		Event      string                     `json:"event"`
		DistinctID string                     `json:"distinct_id"`
		UUID       string                     `json:"uuid"`
		Timestamp  string                     `json:"timestamp"`
		Properties map[string]json.RawMessage `json:"properties"`
	}
	var got [3]item
	var keys [3]map[string]json.RawMessage
	for i := range got {
		require.NoError(t, json.Unmarshal(r.body.Batch[i], &got[i]))
		require.NoError(t, json.Unmarshal(r.body.Batch[i], &keys[i]))
		require.Len(t, keys[i], 5, "event, distinct_id, uuid, timestamp, properties; nothing else")
	}
	prop := func(i int, k string) string { return string(got[i].Properties[k]) }

	require.Equal(t, "batch_started", got[0].Event)
	require.Equal(t, "3", got[0].DistinctID)
	require.Equal(t, sink.EventUUID("evt_0a1b2c3d4e5f6789_42"), got[0].UUID, "from the message id")
	require.Equal(t, "2026-11-26T10:00:00.123456Z", got[0].Timestamp)
	require.Equal(t, `1.50`, prop(0, "qty"), "numbers pass through as written")
	require.Equal(t, `12345678901234567890`, prop(0, "big"))
	require.JSONEq(t, `{"a":[1,null]}`, prop(0, "nested"))
	require.Equal(t, `"ünï \"q\""`, prop(0, "note"))
	require.JSONEq(t, `{"organization":"7"}`, prop(0, "$groups"))
	require.Equal(t, `"batch"`, prop(0, "entity_type"))
	require.Equal(t, `"B-19"`, prop(0, "entity_id"))
	require.Equal(t, `"c-1"`, prop(0, "correlation_id"))
	require.Equal(t, `"batch_service"`, prop(0, "source"), "outboxd's keys win over event properties")
	require.Equal(t, `2`, prop(0, "schema_version"))
	require.Equal(t, `42`, prop(0, "outboxd_event_id"))
	require.NotContains(t, got[0].Properties, "$process_person_profile", "a user gets a person profile")
	require.Len(t, got[0].Properties, 11, "5 event properties, one overridden, and 6 of outboxd")

	require.Equal(t, "inventory_adjusted", got[1].Event)
	require.Equal(t, "org_7", got[1].DistinctID)
	require.Equal(t, sink.EventUUID(evs[1].MessageID), got[1].UUID)
	require.Equal(t, "2026-11-26T10:00:01Z", got[1].Timestamp)
	require.Equal(t, `false`, prop(1, "$process_person_profile"))
	require.JSONEq(t, `{"organization":"7"}`, prop(1, "$groups"))
	require.Equal(t, `null`, prop(1, "correlation_id"))
	require.Equal(t, `43`, prop(1, "outboxd_event_id"))
	require.Len(t, got[1].Properties, 8)

	require.Equal(t, "system_tick", got[2].Event)
	require.Equal(t, "event_44", got[2].DistinctID)
	require.Equal(t, `false`, prop(2, "$process_person_profile"))
	require.NotContains(t, got[2].Properties, "$groups")
	require.Equal(t, `"v"`, prop(2, "k"))
	require.Equal(t, `null`, prop(2, "entity_type"))
	require.Len(t, got[2].Properties, 8)

	// Redelivering an event gives it the same uuid: PostHog deduplicates.
	require.NoError(t, p.Deliver(t.Context(), evs[:1])[0].Err)
	reqs = ps.requests()
	var again struct {
		UUID string `json:"uuid"`
	}
	require.NoError(t, json.Unmarshal(reqs[1].body.Batch[0], &again))
	require.Equal(t, got[0].UUID, again.UUID)
}

// EventUUID is a version-5 UUID, checked against an independent
// implementation.
func TestEventUUIDIsUUIDv5(t *testing.T) {
	t.Parallel()
	ns := uuid.MustParse("6f7a2c1e-8b43-4d0a-9c5e-31f264a80d57")
	at := time.Date(2026, 11, 26, 10, 0, 0, 0, time.UTC)
	for _, id := range []int64{0, 1, 42, -7, 9223372036854775807} {
		mid := decode.MessageID("0a1b2c3d4e5f6789", id, at)
		want := uuid.NewSHA1(ns, []byte(mid))
		got := sink.EventUUID(mid)
		require.Equal(t, want.String(), got)
		u := uuid.MustParse(got)
		require.Equal(t, uuid.Version(5), u.Version())
		require.Equal(t, uuid.RFC4122, u.Variant())
	}
	// The same row id in another outbox is another event: another uuid.
	require.NotEqual(t, sink.EventUUID(decode.MessageID("0a1b2c3d4e5f6789", 1, at)), sink.EventUUID(decode.MessageID("0a1b2c3d4e5f6789", 2, at)))
	require.NotEqual(t, sink.EventUUID(decode.MessageID("0a1b2c3d4e5f6789", 1, at)), sink.EventUUID(decode.MessageID("fedcba9876543210", 1, at)))
}

func TestPostHogAnswersClassified(t *testing.T) {
	t.Parallel()
	for _, tt := range []struct {
		status     int
		retryAfter string
		permanent  bool
	}{
		{http.StatusInternalServerError, "", false},
		{http.StatusBadGateway, "", false},
		{http.StatusTooManyRequests, "0", false},
		{http.StatusRequestTimeout, "", false},
		{http.StatusBadRequest, "", true},
		{http.StatusUnauthorized, "", false}, // the key: every event alike, park
		{http.StatusForbidden, "", false},
		{http.StatusRequestEntityTooLarge, "", true},
		{http.StatusGone, "", true},
		{http.StatusFound, "", true},
	} {
		t.Run(fmt.Sprint(tt.status), func(t *testing.T) {
			t.Parallel()
			ps := newPostHogServer(t, func(_ int, w http.ResponseWriter, _ *http.Request, _ capturedBatch) {
				if tt.retryAfter != "" {
					w.Header().Set("Retry-After", tt.retryAfter)
				}
				if tt.status == http.StatusFound {
					w.Header().Set("Location", "/elsewhere/")
				}
				w.WriteHeader(tt.status)
			})
			cfg := fastPostHog(ps.srv.URL)
			cfg.MaxAttempts = 3
			p := newPostHog(t, cfg, zerolog.Nop())
			out := p.Deliver(t.Context(), []*decode.Event{phEvent(1, `{"id":1,"event_name":"e"}`), phEvent(2, `{"id":2,"event_name":"e"}`)})
			require.Len(t, out, 2)
			for _, o := range out {
				require.Error(t, o.Err)
				require.Equal(t, tt.status, o.Status)
				if tt.permanent {
					require.ErrorIs(t, o.Err, sink.ErrPermanent)
					require.Equal(t, 1, o.Attempts)
				} else {
					require.NotErrorIs(t, o.Err, sink.ErrPermanent)
					require.Equal(t, 3, o.Attempts)
				}
			}
			for _, r := range ps.requests() {
				require.Equal(t, "/batch/", r.path, "redirects are not followed")
			}
		})
	}
}

func TestPostHogTransportFailures(t *testing.T) {
	t.Parallel()
	t.Run("ServerGoneIsRetryable", func(t *testing.T) {
		t.Parallel()
		ps := newPostHogServer(t, nil)
		ps.srv.Close()
		cfg := fastPostHog(ps.srv.URL)
		cfg.MaxAttempts = 2
		out := newPostHog(t, cfg, zerolog.Nop()).Deliver(t.Context(), []*decode.Event{phEvent(1, `{"id":1}`)})
		require.Error(t, out[0].Err)
		require.NotErrorIs(t, out[0].Err, sink.ErrPermanent)
		require.Equal(t, 2, out[0].Attempts)
	})
	t.Run("PrivateAddressRefusedUnlessAllowed", func(t *testing.T) {
		t.Parallel()
		ps := newPostHogServer(t, nil)
		cfg := fastPostHog(ps.srv.URL)
		cfg.AllowPrivate = false
		out := newPostHog(t, cfg, zerolog.Nop()).Deliver(t.Context(), []*decode.Event{phEvent(1, `{"id":1}`)})
		require.ErrorIs(t, out[0].Err, sink.ErrPermanent)
		require.ErrorIs(t, out[0].Err, sink.ErrForbiddenAddress)
		require.Empty(t, ps.requests())
	})
	t.Run("BadBodyFailsAlone", func(t *testing.T) {
		t.Parallel()
		ps := newPostHogServer(t, nil)
		out := newPostHog(t, fastPostHog(ps.srv.URL), zerolog.Nop()).Deliver(t.Context(),
			[]*decode.Event{phEvent(1, `{"id":1}`), {ID: 2, Body: []byte(`not json`)}})
		require.NoError(t, out[0].Err)
		require.ErrorIs(t, out[1].Err, sink.ErrPermanent)
		require.Equal(t, 0, out[1].Attempts)
		require.Len(t, ps.requests()[0].body.Batch, 1)
	})
	t.Run("CallerDeadline", func(t *testing.T) {
		t.Parallel()
		release := make(chan struct{})
		ps := newPostHogServer(t, func(_ int, w http.ResponseWriter, r *http.Request, _ capturedBatch) {
			select {
			case <-release:
			case <-r.Context().Done():
			}
		})
		defer close(release)
		ctx, cancel := context.WithTimeout(t.Context(), 50*time.Millisecond)
		defer cancel()
		out := newPostHog(t, fastPostHog(ps.srv.URL), zerolog.Nop()).Deliver(ctx, []*decode.Event{phEvent(1, `{"id":1}`)})
		require.ErrorIs(t, out[0].Err, context.DeadlineExceeded)
		require.NotErrorIs(t, out[0].Err, sink.ErrPermanent)
	})
}

// The API key is sent in the body only: an answer echoing it is scrubbed,
// and no log line carries it.
func TestPostHogAPIKeyNeverInErrorsOrLogs(t *testing.T) {
	t.Parallel()
	ps := newPostHogServer(t, func(_ int, w http.ResponseWriter, _ *http.Request, b capturedBatch) {
		http.Error(w, `{"error":"invalid api_key `+b.body.APIKey+`"}`, http.StatusUnauthorized)
	})
	var logs syncBuffer
	p := newPostHog(t, fastPostHog(ps.srv.URL), zerolog.New(&logs).Level(zerolog.TraceLevel))
	out := p.Deliver(t.Context(), []*decode.Event{phEvent(1, `{"id":1}`)})
	require.Error(t, out[0].Err)
	require.NotErrorIs(t, out[0].Err, sink.ErrPermanent, "a refused key parks the event: it is no fault of the event")
	require.Contains(t, out[0].Err.Error(), "invalid api_key [REDACTED]")
	require.Equal(t, 1, strings.Count(logs.String(), "refused the project API key"), "said once per outage")
	require.NotContains(t, out[0].Err.Error(), posthogKey)
	require.NotEmpty(t, logs.String())
	require.NotContains(t, logs.String(), posthogKey)

	cfg := fastPostHog("ftp://x")
	err := cfg.Validate()
	require.ErrorContains(t, err, "Host:")
	require.NotContains(t, err.Error(), posthogKey)
}

func TestPostHogConfig(t *testing.T) {
	t.Parallel()
	cfg := sink.PostHogConfig{APIKey: "k"}
	require.NoError(t, cfg.Validate())
	require.Empty(t, cfg.Host, "Validate changes nothing")
	cfg = cfg.WithDefaults()
	require.NoError(t, cfg.Validate())
	require.Equal(t, "https://us.i.posthog.com", cfg.Host)
	for field, c := range map[string]sink.PostHogConfig{
		"APIKey":      {},
		"Host":        {APIKey: "k", Host: "https://user:pw@eu.i.posthog.com"},
		"MaxAttempts": {APIKey: "k", HTTPConfig: sink.HTTPConfig{RetryConfig: sink.RetryConfig{MaxAttempts: -1}}},
		"BackoffMin":  {APIKey: "k", HTTPConfig: sink.HTTPConfig{RetryConfig: sink.RetryConfig{BackoffMin: time.Minute, BackoffMax: time.Second}}},
	} {
		require.ErrorContains(t, c.Validate(), field+":", field)
	}
	require.False(t, strings.Contains(fmt.Sprint((&sink.PostHogConfig{Host: "https://user:pw@x"}).Validate()), "pw"))
}

// PostHog's limits: an event over 1 MB is refused before sending (PostHog
// would answer 2xx and drop it, and the row would be marked); a batch PostHog
// finds too large (413) is split and sent again, in order, and nothing is
// dead-lettered for it.
func TestPostHogLimits(t *testing.T) {
	t.Parallel()
	ps := newPostHogServer(t, func(_ int, w http.ResponseWriter, _ *http.Request, b capturedBatch) {
		if len(b.body.Batch) > 2 {
			http.Error(w, "payload too large", http.StatusRequestEntityTooLarge)
			return
		}
		_, _ = w.Write([]byte(`{"status":1}`))
	})
	p := newPostHog(t, fastPostHog(ps.srv.URL), zerolog.Nop())
	huge := phEvent(3, fmt.Sprintf(`{"id":3,"event_name":"e","properties":{"pad":%q}}`, strings.Repeat("x", 1_100_000)))
	var events []*decode.Event
	for id := int64(1); id <= 7; id++ {
		if id == 3 {
			events = append(events, huge)
			continue
		}
		events = append(events, phEvent(id, fmt.Sprintf(`{"id":%d,"event_name":"e"}`, id)))
	}
	out := p.Deliver(t.Context(), events)
	for i, o := range out {
		if i == 2 {
			require.ErrorIs(t, o.Err, sink.ErrPermanent)
			require.ErrorContains(t, o.Err, "over PostHog's limit")
			require.Zero(t, o.Attempts, "never sent")
			continue
		}
		require.NoError(t, o.Err, "event %d", i+1)
	}
	var sent []int64
	for _, r := range ps.requests() {
		if r.path != "/batch/" {
			t.Fatalf("posted to %s", r.path)
		}
		for _, item := range r.body.Batch {
			var it struct {
				Properties struct {
					ID int64 `json:"outboxd_event_id"`
				} `json:"properties"`
			}
			require.NoError(t, json.Unmarshal(item, &it))
			if len(r.body.Batch) <= 2 {
				sent = append(sent, it.Properties.ID)
			}
		}
	}
	require.Equal(t, []int64{1, 2, 4, 5, 6, 7}, sent, "accepted once each, in order, the oversized one never")
}

// A host given with the endpoint's path posts to /batch/, not /batch/batch/.
func TestPostHogHostWithBatchPath(t *testing.T) {
	t.Parallel()
	ps := newPostHogServer(t, nil)
	for _, host := range []string{ps.srv.URL + "/batch/", ps.srv.URL + "/batch", ps.srv.URL + "/"} {
		cfg := fastPostHog(host)
		p := newPostHog(t, cfg, zerolog.Nop())
		require.NoError(t, p.Deliver(t.Context(), []*decode.Event{phEvent(1, `{"id":1,"event_name":"e"}`)})[0].Err, host)
	}
	for _, r := range ps.requests() {
		require.Equal(t, "/batch/", r.path)
	}
}

// Events read from the table (catch-up, replay) go through PostHog's
// historical pipeline: a batch of only such events says historical_migration.
func TestPostHogHistoricalMigration(t *testing.T) {
	t.Parallel()
	ps := newPostHogServer(t, nil)
	p := newPostHog(t, fastPostHog(ps.srv.URL), zerolog.Nop())
	old1, old2 := phEvent(1, `{"id":1,"event_name":"e"}`), phEvent(2, `{"id":2,"event_name":"e"}`)
	old1.Historical, old2.Historical = true, true
	fresh := phEvent(3, `{"id":3,"event_name":"e"}`)
	for _, batch := range [][]*decode.Event{{old1, old2}, {old1, fresh}} {
		for _, o := range p.Deliver(t.Context(), batch) {
			require.NoError(t, o.Err)
		}
	}
	reqs := ps.requests()
	require.Len(t, reqs, 2)
	var flag struct {
		Historical *bool `json:"historical_migration"`
	}
	require.NoError(t, json.Unmarshal(reqs[0].raw, &flag))
	require.NotNil(t, flag.Historical)
	require.True(t, *flag.Historical, "only events read from the table")
	flag.Historical = nil
	require.NoError(t, json.Unmarshal(reqs[1].raw, &flag))
	require.Nil(t, flag.Historical, "a batch with a streamed event is not historical")
}

// A batch split after a 413 is sent again within the same attempt: an event's
// Attempts counts the attempts at it, not the requests that carried it, and
// the call's budget is spent by attempts.
func TestPostHogSplitAttemptsAndBudget(t *testing.T) {
	t.Parallel()
	ps := newPostHogServer(t, func(n int, w http.ResponseWriter, _ *http.Request, b capturedBatch) {
		switch {
		case n == 1:
			w.WriteHeader(http.StatusServiceUnavailable)
		case len(b.body.Batch) > 1:
			http.Error(w, "payload too large", http.StatusRequestEntityTooLarge)
		case n == 3:
			_, _ = w.Write([]byte(`{"status":1}`))
		default:
			w.WriteHeader(http.StatusServiceUnavailable) // the second half, for ever
		}
	})
	cfg := fastPostHog(ps.srv.URL)
	cfg.MaxAttempts = 4
	out := newPostHog(t, cfg, zerolog.Nop()).Deliver(t.Context(), []*decode.Event{phEvent(1, `{"id":1}`), phEvent(2, `{"id":2}`)})
	// 1: [1,2] 503; 2: [1,2] 413, split; 3: [1] acked; 4, 5, 6: [2] 503 until the
	// budget of 4 attempts is spent.
	require.NoError(t, out[0].Err)
	require.Equal(t, 2, out[0].Attempts)
	require.Error(t, out[1].Err)
	require.NotErrorIs(t, out[1].Err, sink.ErrPermanent)
	require.Equal(t, 4, out[1].Attempts)
	require.Equal(t, http.StatusServiceUnavailable, out[1].Status)
	require.Len(t, ps.requests(), 6)
}

// PersonProperties copy property values into "$set" for events with a user;
// GroupProperties send a "$groupidentify" of the organization before its
// event, with those values in "$group_set"; GroupIdentify alone identifies
// each organization once, once PostHog acknowledged it. An identify that
// failed is sent again with the event's retry.
func TestPostHogPersonAndGroupProperties(t *testing.T) {
	t.Parallel()
	var fail sync.Mutex
	failing := false
	ps := newPostHogServer(t, func(_ int, w http.ResponseWriter, _ *http.Request, _ capturedBatch) {
		fail.Lock()
		defer fail.Unlock()
		if failing {
			w.WriteHeader(http.StatusServiceUnavailable)
			return
		}
		_, _ = w.Write([]byte(`{"status":1}`))
	})
	cfg := fastPostHog(ps.srv.URL)
	cfg.PersonProperties = []string{"email", "plan"}
	cfg.GroupIdentify = true
	cfg.GroupProperties = []string{"org_name"}
	cfg.MaxAttempts = 1
	p := newPostHog(t, cfg, zerolog.Nop())

	type item struct {
		Event      string                     `json:"event"`
		DistinctID string                     `json:"distinct_id"`
		UUID       string                     `json:"uuid"`
		Timestamp  string                     `json:"timestamp"`
		Properties map[string]json.RawMessage `json:"properties"`
	}
	batch := func(n int) []item {
		reqs := ps.requests()
		require.Len(t, reqs, n)
		var out []item
		for _, raw := range reqs[n-1].body.Batch {
			var it item
			require.NoError(t, json.Unmarshal(raw, &it))
			out = append(out, it)
		}
		return out
	}
	ev := func(id, org int64, props string) *decode.Event {
		return phEvent(id, fmt.Sprintf(`{"id":%d,"event_name":"recipe_created","occurred_at":"2026-11-26T10:00:00Z",
			"organization_id":%d,"user_id":3,"entity_type":"recipe","entity_id":"R-1","correlation_id":null,
			"source":"recipes","schema_version":1,"properties":%s}`, id, org, props))
	}

	// The first event of organization 7: its identify, then the event with
	// the person's keys in $set (absent ones left out).
	e1 := ev(1, 7, `{"email":"a@example.com","org_name":"Bakery","x":1}`)
	require.NoError(t, p.Deliver(t.Context(), []*decode.Event{e1})[0].Err)
	got := batch(1)
	require.Len(t, got, 2)
	require.Equal(t, "$groupidentify", got[0].Event)
	require.Equal(t, "org_7", got[0].DistinctID)
	require.Equal(t, sink.EventUUID(e1.MessageID+"/$groupidentify"), got[0].UUID, "stable: PostHog deduplicates a redelivery")
	require.Equal(t, "2026-11-26T10:00:00Z", got[0].Timestamp)
	require.Equal(t, `"organization"`, string(got[0].Properties["$group_type"]))
	require.Equal(t, `"7"`, string(got[0].Properties["$group_key"]))
	require.JSONEq(t, `{"org_name":"Bakery"}`, string(got[0].Properties["$group_set"]))
	require.Equal(t, "recipe_created", got[1].Event)
	require.JSONEq(t, `{"email":"a@example.com"}`, string(got[1].Properties["$set"]))
	require.Equal(t, `"Bakery"`, string(got[1].Properties["org_name"]), "the event keeps its properties")

	// Organization 7 again, without group keys: identified already.
	require.NoError(t, p.Deliver(t.Context(), []*decode.Event{ev(2, 7, `{"plan":"pro"}`)})[0].Err)
	got = batch(2)
	require.Len(t, got, 1)
	require.JSONEq(t, `{"plan":"pro"}`, string(got[0].Properties["$set"]))

	// Organization 8's first identify fails with its event; the retry
	// sends both again.
	fail.Lock()
	failing = true
	fail.Unlock()
	e3 := ev(3, 8, `{}`)
	require.Error(t, p.Deliver(t.Context(), []*decode.Event{e3})[0].Err)
	require.Len(t, batch(3), 2)
	fail.Lock()
	failing = false
	fail.Unlock()
	require.NoError(t, p.Deliver(t.Context(), []*decode.Event{e3})[0].Err)
	got = batch(4)
	require.Len(t, got, 2)
	require.Equal(t, "$groupidentify", got[0].Event)
	require.JSONEq(t, `{}`, string(got[0].Properties["$group_set"]))
	require.NotContains(t, got[1].Properties, "$set", "no person key in its properties")
	require.NoError(t, p.Deliver(t.Context(), []*decode.Event{ev(4, 8, `{}`)})[0].Err)
	require.Len(t, batch(5), 1, "organization 8 is identified now")
}
