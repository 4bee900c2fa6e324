package main

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"io"
	"maps"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/outboxd/outboxd/internal/e2e"
	"github.com/outboxd/outboxd/internal/pgtest"
)

// propsPostHog stands in for PostHog and keeps each event's properties by
// outboxd_event_id.
type propsPostHog struct {
	mu    sync.Mutex
	props map[int64]map[string]any
	order []int64
}

func newPropsPostHog(t *testing.T) (*propsPostHog, string) {
	p := &propsPostHog{props: map[int64]map[string]any{}}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		var body struct {
			Batch []struct {
				Properties map[string]any `json:"properties"`
			} `json:"batch"`
		}
		if err := json.NewDecoder(req.Body).Decode(&body); err != nil {
			http.Error(w, "bad request", http.StatusBadRequest)
			return
		}
		p.mu.Lock()
		for _, ev := range body.Batch {
			id := int64(ev.Properties["outboxd_event_id"].(float64))
			p.props[id] = ev.Properties
			p.order = append(p.order, id)
		}
		p.mu.Unlock()
		_, _ = io.WriteString(w, `{"status":1}`)
	}))
	t.Cleanup(srv.Close)
	return p, srv.URL
}

func (p *propsPostHog) ids() []int64 {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := slices.Clone(p.order)
	slices.Sort(out)
	return out
}

// envelopes returns every envelope r accepted, by id, checking that every
// request was signed over the body it carried.
func envelopes(t *testing.T, r *e2e.Receiver) map[int64]map[string]any {
	t.Helper()
	out := map[int64]map[string]any{}
	for _, d := range r.Deliveries() {
		require.True(t, d.SigOK, "the signature covers the body sent: %s", d.Body)
		var many []map[string]any
		if bytes.HasPrefix(bytes.TrimSpace(d.Body), []byte("[")) {
			require.NoError(t, json.Unmarshal(d.Body, &many))
		} else {
			var one map[string]any
			require.NoError(t, json.Unmarshal(d.Body, &one))
			many = append(many, one)
		}
		for _, e := range many {
			out[int64(e["id"].(float64))] = e
		}
	}
	return out
}

func eventIDs[V any](m map[int64]V) []int64 { return slices.Sorted(maps.Keys(m)) }

// Two destinations of one outboxd: the webhook with a property filter and a
// mask, PostHog with neither. Each gets exactly what it should; the masked
// fields are dropped, hashed or redacted at the webhook only, whose
// signatures verify over the masked bodies; every row is processed (the
// events the webhook's filter rejected settle there unsent). Then a
// subscription with a filter, added while the daemon runs, takes effect
// from its commit and keeps filtering after a restart; `subscription
// update` changes it and a filter that does not compile is refused.
func TestFilterAndMaskEndToEnd(t *testing.T) {
	t.Parallel()
	ph, phURL := newPropsPostHog(t)
	key := "e2e-mask-key-0123456789"
	keyFile := filepath.Join(t.TempDir(), "mask.key")
	require.NoError(t, os.WriteFile(keyFile, []byte(key+"\n"), 0o600))
	b := newBundle(t, pgtest.Shared(t), map[string]string{
		"OUTBOXD_SINKS":                   "webhook,posthog",
		"OUTBOXD_WEBHOOK_FILTER":          `organization_id == 5 && event_name == "inventory_adjusted" && properties.delta < 0`,
		"OUTBOXD_WEBHOOK_MASK":            "drop:properties.email,hash:properties.customer.email,redact:properties.note",
		"OUTBOXD_MASK_HASH_KEY_FILE":      keyFile,
		"OUTBOXD_POSTHOG_HOST":            phURL,
		"OUTBOXD_POSTHOG_PROJECT_API_KEY": "phc_e2e",
		"OUTBOXD_POSTHOG_BACKOFF_MAX":     "100ms",
	})
	ctx := context.Background()
	insert := func(name, props string) int64 {
		t.Helper()
		var id int64
		require.NoError(t, b.pool.QueryRow(ctx, `INSERT INTO domain_event (event_name, organization_id, user_id, entity_type, entity_id, source, properties)
VALUES ($1, 5, 3, 'sku', 'S-1', 'e2e', $2::jsonb) RETURNING id`, name, props).Scan(&id))
		return id
	}
	d := startWatched(t, b.env)

	secretProps := `{"delta":-2,"email":"ann@example.com","customer":{"email":"Ann@Example.com","tier":"gold"},"note":"call after 6"}`
	a := insert("inventory_adjusted", secretProps)
	up := insert("inventory_adjusted", `{"delta":5,"email":"bob@example.com"}`)
	other := insert("recipe_saved", `{"delta":-1}`)
	missing := insert("inventory_adjusted", `{"reason":"count"}`) // no delta: an evaluation error
	wrongType := insert("inventory_adjusted", `{"delta":"-3"}`)
	plain := insert("inventory_adjusted", `{"delta":-7}`)
	all := []int64{a, up, other, missing, wrongType, plain}
	b.waitProcessed(t, int64(len(all)), time.Minute)

	require.Equal(t, all, ph.ids(), "PostHog, unfiltered, gets every event")
	got := envelopes(t, b.recv)
	require.Equal(t, []int64{a, plain}, eventIDs(got), "the webhook gets only what its filter lets through")

	masked := got[a]["properties"].(map[string]any)
	require.NotContains(t, masked, "email", "dropped at the webhook")
	mac := hmac.New(sha256.New, []byte(key))
	mac.Write([]byte("Ann@Example.com"))
	require.Equal(t, map[string]any{"email": hex.EncodeToString(mac.Sum(nil)), "tier": "gold"}, masked["customer"], "hashed with the key")
	require.Equal(t, "[REDACTED]", masked["note"])
	require.Equal(t, -2.0, masked["delta"])
	require.Equal(t, "inventory_adjusted", got[a]["event_name"], "the envelope is kept")
	require.Equal(t, map[string]any{"delta": -7.0}, got[plain]["properties"])

	orig := ph.props[a]
	require.Equal(t, "ann@example.com", orig["email"], "PostHog gets the original")
	require.Equal(t, "call after 6", orig["note"])
	require.Equal(t, map[string]any{"email": "Ann@Example.com", "tier": "gold"}, orig["customer"])

	errs := d.mustMetric(t, `outboxd_filter_errors_total{sink="webhook"}`)
	require.Equal(t, 2.0, errs, "the missing delta and the string delta are counted")
	require.Contains(t, d.Log(), "property filter could not be evaluated")
	require.NotContains(t, d.Log(), key, "the hash key is never logged")

	// A subscription with a filter, added while the daemon runs.
	secretFile := filepath.Join(t.TempDir(), "sub.secret")
	require.NoError(t, os.WriteFile(secretFile, []byte(e2e.Secret), 0o600))
	code, out := e2e.RunCommand(t, b.env, "subscription", "add", "--url", b.recv.URL+"/x", "--secret-file", secretFile,
		"--filter", "properties.delta <")
	require.Equal(t, 2, code, out)
	require.Contains(t, out, "--filter")
	require.Contains(t, out, "does not compile")
	subRecv := e2e.NewReceiver(t)
	code, out = e2e.RunCommand(t, b.env, "subscription", "add", "--url", subRecv.URL, "--secret-file", secretFile,
		"--filter", "properties.delta < -5")
	require.Equal(t, 0, code, out)
	m := regexp.MustCompile(`subscription (\d+) added`).FindStringSubmatch(out)
	require.NotNil(t, m, out)
	subID := m[1]

	big := insert("inventory_adjusted", `{"delta":-10}`)
	insert("inventory_adjusted", `{"delta":-1}`)
	b.waitProcessed(t, int64(len(all))+2, time.Minute)
	require.Equal(t, []int64{big}, eventIDs(envelopes(t, subRecv)), "only what the subscription's filter lets through, from its commit on")

	// A restart: the filter comes back from the routing state.
	require.Equal(t, 0, d.Stop(30*time.Second), d.Log())
	d2 := e2e.StartDaemon(t, b.env)
	bigger := insert("inventory_adjusted", `{"delta":-20}`)
	insert("inventory_adjusted", `{"delta":-3}`)
	b.waitProcessed(t, int64(len(all))+4, time.Minute)
	require.Equal(t, []int64{big, bigger}, eventIDs(envelopes(t, subRecv)), "the filter survived the restart")

	// update: a bad filter is refused and nothing changes; '' removes it.
	code, out = e2e.RunCommand(t, b.env, "subscription", "update", subID, "--filter", "properties.delta ==")
	require.Equal(t, 2, code, out)
	code, out = e2e.RunCommand(t, b.env, "subscription", "list", "--json")
	require.Equal(t, 0, code, out)
	require.Contains(t, out, `"filter":"properties.delta \u003c -5"`)
	code, out = e2e.RunCommand(t, b.env, "subscription", "update", subID, "--filter", "")
	require.Equal(t, 0, code, out)
	last := insert("inventory_adjusted", `{"delta":1}`)
	b.waitProcessed(t, int64(len(all))+5, time.Minute)
	require.Equal(t, []int64{big, bigger, last}, eventIDs(envelopes(t, subRecv)), "no filter: every event from the update's commit on")
	require.NotContains(t, d2.Log(), key)

	// A replay to the webhook sends what run sent it, no more: its filter
	// withholds the other four (a dry run counts them first), and it masks
	// as run does (and signs the masked body).
	before := len(b.recv.Deliveries())
	span := []string{"--destination", "webhook", "--from-id", strconv.FormatInt(a, 10), "--to-id", strconv.FormatInt(plain, 10)}
	code, out = e2e.RunCommand(t, b.env, append([]string{"replay", "--dry-run"}, span...)...)
	require.Equal(t, 0, code, out)
	require.Contains(t, out, "would send 2, withheld 4 (property filter) and 0 (contract policy), skip 0")
	require.Len(t, b.recv.Deliveries(), before, "a dry run sends nothing")
	code, out = e2e.RunCommand(t, b.env, append([]string{"replay"}, span...)...)
	require.Equal(t, 0, code, out)
	require.Contains(t, out, "replayed 2, failed 0, skipped 0, withheld 4 (property filter) and 0 (contract policy)")
	replayed := b.recv.Deliveries()[before:]
	require.Len(t, replayed, 2)
	require.Equal(t, []int64{a}, replayed[0].IDs, "in id order")
	require.Equal(t, []int64{plain}, replayed[1].IDs)
	require.True(t, replayed[0].Replay)
	require.True(t, replayed[0].SigOK)
	require.NotContains(t, string(replayed[0].Body), "ann@example.com")
	require.NotContains(t, string(replayed[0].Body), "Ann@Example.com")
	var again map[string]any
	require.NoError(t, json.Unmarshal(replayed[0].Body, &again))
	require.Equal(t, masked, again["properties"], "masked as run masked it")
	require.NotContains(t, out, key)

	// --as-is sends what the filter withholds, masked all the same.
	before = len(b.recv.Deliveries())
	code, out = e2e.RunCommand(t, b.env, "replay", "--as-is", "--destination", "webhook", "--from-id", strconv.FormatInt(up, 10), "--to-id", strconv.FormatInt(up, 10))
	require.Equal(t, 0, code, out)
	require.Contains(t, out, "replayed 1, failed 0, skipped 0 in")
	replayed = b.recv.Deliveries()[before:]
	require.Len(t, replayed, 1)
	require.Equal(t, []int64{up}, replayed[0].IDs)
	require.NotContains(t, string(replayed[0].Body), "bob@example.com", "the mask still applies")
}

// A bad filter, mask or hash key stops `outboxd run` at start (exit 2)
// naming the variable, before it connects anywhere; the key is never in the
// message.
func TestFilterMaskConfigErrors(t *testing.T) {
	t.Parallel()
	base := e2e.Env("postgres://outboxd@127.0.0.1:1/db", "slot", "http://127.0.0.1:1/", map[string]string{"OUTBOXD_HTTP_ADDR": ""})
	shortKey := "short-key"
	missingFile := filepath.Join(t.TempDir(), "absent.key")
	for _, tt := range []struct {
		env  map[string]string
		want string
	}{
		{map[string]string{"OUTBOXD_WEBHOOK_FILTER": "properties.delta <"}, "OUTBOXD_WEBHOOK_FILTER: filter \"properties.delta <\" does not compile"},
		{map[string]string{"OUTBOXD_WEBHOOK_FILTER": "propertes.delta < 0"}, "OUTBOXD_WEBHOOK_FILTER: filter \"propertes.delta < 0\" does not compile: unknown name propertes"},
		{map[string]string{"OUTBOXD_SINKS": "webhook,posthog", "OUTBOXD_POSTHOG_PROJECT_API_KEY": "phc_x",
			"OUTBOXD_POSTHOG_FILTER": "event_name =="}, "OUTBOXD_POSTHOG_FILTER: "},
		{map[string]string{"OUTBOXD_WEBHOOK_MASK": "erase:properties.email"}, "OUTBOXD_WEBHOOK_MASK: mask rule \"erase:properties.email\": unknown action"},
		{map[string]string{"OUTBOXD_WEBHOOK_MASK": "drop:email"}, "OUTBOXD_WEBHOOK_MASK: mask rule \"drop:email\": the path must start with properties."},
		{map[string]string{"OUTBOXD_WEBHOOK_MASK": "hash:properties.email"}, "OUTBOXD_WEBHOOK_MASK: a hash rule needs a key: set OUTBOXD_MASK_HASH_KEY or OUTBOXD_MASK_HASH_KEY_FILE"},
		{map[string]string{"OUTBOXD_WEBHOOK_MASK": "hash:properties.email", "OUTBOXD_MASK_HASH_KEY": shortKey}, "OUTBOXD_MASK_HASH_KEY: the key is 9 bytes, fewer than 16"},
		{map[string]string{"OUTBOXD_WEBHOOK_MASK": "hash:properties.email", "OUTBOXD_MASK_HASH_KEY_FILE": missingFile}, "OUTBOXD_MASK_HASH_KEY_FILE: read the key file"},
		{map[string]string{"OUTBOXD_WEBHOOK_MASK": "hash:properties.email", "OUTBOXD_MASK_HASH_KEY": "0123456789abcdefXYZ",
			"OUTBOXD_MASK_HASH_KEY_FILE": missingFile}, "OUTBOXD_MASK_HASH_KEY: both it and OUTBOXD_MASK_HASH_KEY_FILE are set"},
		// With OUTBOXD_SINK the one destination reads its own kind's only.
		{map[string]string{"OUTBOXD_POSTHOG_MASK": "drop:properties.email"}, "OUTBOXD_POSTHOG_MASK: OUTBOXD_SINK=webhook delivers to a webhook destination only"},
	} {
		env := maps.Clone(base)
		maps.Copy(env, tt.env)
		code, out := e2e.RunCommand(t, env, "run")
		require.Equal(t, 2, code, "%v: %s", tt.env, out)
		require.Contains(t, out, tt.want, "%v", tt.env)
		require.NotContains(t, out, shortKey)
	}
	// The filter and mask variables are known: no warning, no near-miss
	// refusal; the key is redacted in the effective configuration.
	env := map[string]string{"OUTBOXD_SINKS": "webhook,posthog", "OUTBOXD_POSTHOG_FILTER": "true",
		"OUTBOXD_POSTHOG_MASK": "drop:properties.x", "OUTBOXD_WEBHOOK_FILTER": "true", "OUTBOXD_WEBHOOK_MASK": "drop:properties.x",
		"OUTBOXD_MASK_HASH_KEY": "0123456789abcdef-secret", "OUTBOXD_GA4_FILTER": "true"}
	c, warnings, err := loadConfig(env)
	require.NoError(t, err)
	require.Empty(t, warnings)
	require.NoError(t, checkNearMisses(env))
	require.Equal(t, "***", effectiveConfig(c, env)["OUTBOXD_MASK_HASH_KEY"])
	specs, err := c.destinations(env)
	require.NoError(t, err)
	require.Equal(t, "true", specs[1].Filter.String())
	require.Len(t, specs[1].Mask.Rules(), 1)
}
