package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"

	"github.com/stretchr/testify/require"
)

const (
	ga4TestSecret = "ga4-s3cret-ApiSecret"
	ga4TestID     = "G-E2ETEST01"
)

// ga4ValidationServer stands in for GA4's validation server: it answers a
// VALUE_REQUIRED message for every order_placed event of a request, and
// records the requests.
type ga4ValidationServer struct {
	srv    *httptest.Server
	mu     sync.Mutex
	bodies []string
}

func newGA4ValidationServer(t *testing.T) *ga4ValidationServer {
	t.Helper()
	vs := &ga4ValidationServer{}
	vs.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		q := r.URL.Query()
		if r.URL.Path != "/debug/mp/collect" || q.Get("api_secret") != ga4TestSecret || q.Get("measurement_id") != ga4TestID {
			http.Error(w, "not the validation request", http.StatusNotFound)
			return
		}
		var body struct {
			Events []struct {
				Name string `json:"name"`
			} `json:"events"`
		}
		raw, err := io.ReadAll(r.Body)
		if err == nil {
			err = json.Unmarshal(raw, &body)
		}
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		vs.mu.Lock()
		vs.bodies = append(vs.bodies, string(raw))
		vs.mu.Unlock()
		type message struct {
			FieldPath      string `json:"fieldPath"`
			Description    string `json:"description"`
			ValidationCode string `json:"validationCode"`
		}
		msgs := []message{}
		for i, e := range body.Events {
			if e.Name == "order_placed" {
				msgs = append(msgs, message{fmt.Sprintf("events[%d].params.currency", i), "Currency is required with value.", "VALUE_REQUIRED"})
			}
		}
		_ = json.NewEncoder(w).Encode(map[string]any{"validationMessages": msgs})
	}))
	t.Cleanup(vs.srv.Close)
	return vs
}

func (vs *ga4ValidationServer) requests() []string {
	vs.mu.Lock()
	defer vs.mu.Unlock()
	return append([]string(nil), vs.bodies...)
}

// `outboxd ga4 validate` against a real database and a stand-in validation
// server: the requests the sink would send, GA4's messages and outboxd's own
// limits per event, exit 1 when there is any, 0 when there is none.
func TestGA4ValidateCommand(t *testing.T) {
	t.Parallel()
	db := newOpsDB(t)
	vs := newGA4ValidationServer(t)
	insert := func(name, age, props string) int64 {
		var id int64
		err := db.pool.QueryRow(context.Background(), `INSERT INTO domain_event (event_name, organization_id, user_id, entity_type, entity_id, source, properties, occurred_at)
VALUES ($1, 1, 3, 'order', 'O-1', 'shop', $2::jsonb, now() - $3::interval) RETURNING id`, name, props, age).Scan(&id)
		require.NoError(t, err)
		return id
	}
	a := insert("batch_started", "0s", `{"seq":1,"nested":{"a":1}}`)
	b := insert("session_start", "0s", `{}`)
	c := insert("order_placed", "0s", `{"value":12.5}`)
	d := insert("batch_started", "96h", `{}`)
	e := insert("batch_finished", "0s", `{}`)

	env := map[string]string{
		"OUTBOXD_GA4_ENDPOINT": vs.srv.URL, "GOOGLE_ANALYTICS_MEASUREMENT_ID": ga4TestID,
		"OUTBOXD_GA4_API_SECRET": ga4TestSecret, "OUTBOXD_ALLOW_PRIVATE_SINKS": "true",
		"OUTBOXD_GA4_MAX_ATTEMPTS": "2", "OUTBOXD_GA4_BACKOFF_MAX": "10ms",
	}
	for k, v := range db.env {
		env[k] = v
	}
	code, out, errOut := opsRun(t, env, "ga4", "validate")
	require.Equal(t, 1, code, out+errOut)
	require.NotContains(t, out+errOut, ga4TestSecret)
	require.Contains(t, out, fmt.Sprintf("event %d \"batch_started\": ok\n  note: not sent (null, object or array values): nested\n", a))
	require.Contains(t, out, fmt.Sprintf("event %d \"session_start\": 1 message(s)\n  outboxd: GA4 limit: event name \"session_start\" is reserved by GA4 (dead-lettered by the sink, never sent)\n", b))
	require.Contains(t, out, fmt.Sprintf("event %d \"order_placed\": 1 message(s)\n  GA4 VALUE_REQUIRED: events[1].params.currency: Currency is required with value.\n", c))
	require.Contains(t, out, fmt.Sprintf("event %d \"batch_started\": 1 message(s)\n  outboxd: GA4 limit: occurred_at ", d))
	require.Contains(t, out, "before now, over the 72h GA4 accepts")
	require.Contains(t, out, fmt.Sprintf("event %d \"batch_finished\": ok\n", e))
	require.Contains(t, out, "validated 5 events in 1 requests: 3 with messages\n")
	require.Contains(t, errOut, "ga4 validate: 3 message(s) about 3 event(s)")
	// One request: a, c and e share client and user; the refused b and d
	// are never sent.
	reqs := vs.requests()
	require.Len(t, reqs, 1)
	var body struct {
		ClientID string `json:"client_id"`
		UserID   string `json:"user_id"`
		Events   []struct {
			Name   string         `json:"name"`
			Params map[string]any `json:"params"`
		} `json:"events"`
	}
	require.NoError(t, json.Unmarshal([]byte(reqs[0]), &body))
	require.Equal(t, "3", body.UserID)
	require.Regexp(t, `^[0-9a-f]{32}$`, body.ClientID)
	require.Len(t, body.Events, 3)
	for i, want := range []int64{a, c, e} {
		require.EqualValues(t, want, body.Events[i].Params["outboxd_event_id"])
	}

	// --since leaves the old row out.
	code, out, errOut = opsRun(t, env, "ga4", "validate", "--since", "1h")
	require.Equal(t, 1, code, out+errOut)
	require.NotContains(t, out, fmt.Sprintf("event %d ", d))
	require.Contains(t, out, "validated 4 events in 1 requests: 2 with messages\n")

	// --limit 1: the newest row only, which is fine.
	code, out, errOut = opsRun(t, env, "ga4", "validate", "--limit", "1")
	require.Equal(t, 0, code, out+errOut)
	require.Equal(t, fmt.Sprintf("event %d \"batch_finished\": ok\nvalidated 1 events in 1 requests: 0 with messages\n", e), out)

	// Bad configuration names the variable, exit 2, before connecting.
	bad := map[string]string{}
	for k, v := range env {
		bad[k] = v
	}
	bad["GOOGLE_ANALYTICS_MEASUREMENT_ID"] = "UA-1234-1"
	code, _, errOut = opsRun(t, bad, "ga4", "validate")
	require.Equal(t, 2, code, errOut)
	require.Contains(t, errOut, "OUTBOXD_GA4_MEASUREMENT_ID:")
	require.NotContains(t, errOut, ga4TestSecret)
	code, _, errOut = opsRun(t, env, "ga4", "validate", "--limit", "0")
	require.Equal(t, 2, code, errOut)
}

// `status` lists the GA4 variables with the API secret and the client id
// key redacted.
func TestGA4SecretsRedactedInStatus(t *testing.T) {
	t.Parallel()
	env := map[string]string{
		"OUTBOXD_SINK": "ga4", "OUTBOXD_GA4_MEASUREMENT_ID": "G-ABC123", "OUTBOXD_GA4_API_SECRET": ga4TestSecret,
		"OUTBOXD_GA4_CLIENT_ID_KEY": "client-id-key-s3cret", "OUTBOXD_GA4_CLIENT_ID_PROPERTY": "ga_client_id",
	}
	c, warnings, err := loadConfig(env)
	require.NoError(t, err)
	require.Empty(t, warnings, "the GA4 variables are known")
	got := effectiveConfig(c, env)
	require.Equal(t, "***", got["OUTBOXD_GA4_API_SECRET"])
	require.Equal(t, "***", got["OUTBOXD_GA4_CLIENT_ID_KEY"])
	require.Equal(t, "G-ABC123", got["OUTBOXD_GA4_MEASUREMENT_ID"])
	require.Equal(t, "ga_client_id", got["OUTBOXD_GA4_CLIENT_ID_PROPERTY"])
}
