package deliver

import (
	"cmp"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"net/url"
	"path"
	"slices"
	"strconv"
	"strings"

	"github.com/outboxd/outboxd/decode"
	"github.com/outboxd/outboxd/store"
)

// Subscription is one row of outboxd_subscription.
type Subscription struct {
	ID             int64    `json:"id"`
	OrganizationID *int64   `json:"organization_id"`
	URL            string   `json:"url"`
	Secrets        []string `json:"secrets,omitempty"`
	// SecretFingerprints stand for Secrets in the routing state kept with
	// the checkpoint (Registry.Snapshot): no signing key is stored there.
	SecretFingerprints []string `json:"secret_fingerprints,omitempty"`
	// URLFingerprint stands for a URL that carries credentials (userinfo or
	// a query string) in the routing state, whose url is then empty.
	URLFingerprint string   `json:"url_fingerprint,omitempty"`
	Events         []string `json:"events"`
	Enabled        bool     `json:"enabled"`
	// Contract is the subscription's own contract policy (column contract,
	// migration 11); "" takes ContractConfig.Subscriptions.
	Contract string `json:"contract,omitempty"`
	// Filter is the subscription's property filter (the filter column,
	// migration 12; "": none), kept in the routing state so that it survives
	// the checkpoint and a restart. filter is it compiled; filterErr, when
	// it does not compile, makes the subscription get nothing.
	Filter    string `json:"filter,omitempty"`
	filter    *Filter
	filterErr error
	// Kind is the subscription's sink kind (column kind, migration 13): ""
	// for a webhook (the column's 'webhook'), or posthog, ga4, kafka, nats.
	Kind string `json:"kind,omitempty"`
	// Settings are the settings of a kind other than webhook (column
	// settings): the kind's variable suffixes (HOST, TOPIC, ...) to values.
	// Secrets are only referenced there (the column's CHECK refuses a key
	// that names one), so they may be kept in the routing state.
	Settings map[string]string `json:"settings,omitempty"`
	// settingsErr, when the settings are not an object of strings (a row
	// written where the column's CHECK was dropped), makes the subscription
	// refuse its deliveries with the reason rather than drop the change.
	settingsErr error
	// snap is the subscription's element of the registry's snapshot, made
	// at the first snapshot after it was put (Registry.put clears it).
	snap []byte
}

// IsWebhook reports whether s is a webhook subscription.
func (s *Subscription) IsWebhook() bool { return s.Kind == "" }

// SecretSettingKey reports whether a settings key names a secret (which a
// subscription row must not hold: it references it with KEY_ENV or
// KEY_FILE); the same rule as migration 13's CHECK.
func SecretSettingKey(k string) bool {
	for _, suffix := range []string{"KEY", "SECRET", "PASSWORD", "TOKEN", "CREDS", "SEED"} {
		if strings.HasSuffix(k, suffix) {
			return true
		}
	}
	return false
}

// compileFilter compiles s.Filter into s.filter, or records why it cannot.
func (s *Subscription) compileFilter() {
	s.filter, s.filterErr = nil, nil
	f, err := CompileFilter(s.Filter)
	if err != nil {
		s.filterErr = fmt.Errorf("subscription %d: %w", s.ID, err)
		return
	}
	s.filter = f
}

// SecretFingerprint identifies a secret without revealing it: "sha256:" and
// the first 16 hex digits of its SHA-256 (migration 6 computes the same in
// SQL).
func SecretFingerprint(secret string) string {
	sum := sha256.Sum256([]byte(secret))
	return "sha256:" + hex.EncodeToString(sum[:8])
}

// Stored is what the subscription table holds now of a subscription's
// secret material.
type Stored = store.SubscriptionSecret

// SecretLookup returns the current URL and secrets of the subscriptions with
// the given ids (from outboxd_subscription); ids without a row are absent.
type SecretLookup func(ids []int64) (map[int64]Stored, error)

// urlHasCredentials reports whether a URL carries userinfo or a query
// string (where tokens travel): such a URL is secret material.
func urlHasCredentials(raw string) bool {
	u, err := url.Parse(raw)
	return err != nil || u.User != nil || u.RawQuery != "" || u.Fragment != ""
}

// TargetName is the name of a subscription's target in logs, metrics, dead
// letters and parked deliveries.
func (s Subscription) TargetName() string { return SubscriptionTarget(s.ID) }

// SubscriptionTarget is the target name of subscription id.
func SubscriptionTarget(id int64) string { return "subscription:" + strconv.FormatInt(id, 10) }

// Matches reports whether e goes to s: s is enabled, belongs to e's
// organization or to the platform (NULL organization), and one of its event
// globs matches (no globs: every event). An event without an organization
// only goes to platform-wide subscriptions: tenants are never mixed.
//
// A row read by a catch-up whose commit time is known (e.Windows set) is
// matched against s as it was at the row's commit, per the subscriptions'
// history: it goes where the stream would have sent it, never to a
// subscription that was disabled, filtered it out or did not exist yet when
// it committed (and, like any event, only to one enabled now).
func (s *Subscription) Matches(e *decode.Event) bool {
	if !s.Enabled {
		return false
	}
	if e.Windows != nil && !e.CommitTime.IsZero() {
		if at, known := e.Windows.At(s.ID, e.CommitTime); known {
			then := Subscription{Enabled: at.Enabled, OrganizationID: at.OrganizationID, Events: at.Events}
			return then.matchesNow(e)
		}
	}
	return s.matchesNow(e)
}

func (s *Subscription) matchesNow(e *decode.Event) bool {
	if !s.Enabled {
		return false
	}
	if s.OrganizationID != nil && (!e.HasOrganization || e.OrganizationID != *s.OrganizationID) {
		return false
	}
	return MatchGlobs(s.Events, e.Name)
}

// MatchGlobs reports whether name matches one of globs (path.Match syntax);
// no globs match everything.
func MatchGlobs(globs []string, name string) bool {
	if len(globs) == 0 {
		return true
	}
	for _, g := range globs {
		if ok, _ := path.Match(g, name); ok {
			return true
		}
	}
	return false
}

// ParseGlobs splits a comma list of globs and checks their syntax.
func ParseGlobs(list string) ([]string, error) {
	var out []string
	for _, g := range strings.Split(list, ",") {
		g = strings.TrimSpace(g)
		if g == "" {
			continue
		}
		if _, err := path.Match(g, ""); err != nil {
			return nil, fmt.Errorf("event glob %q: %w", g, err)
		}
		out = append(out, g)
	}
	return out, nil
}

// Registry is the set of subscriptions as of the position of the stream the
// router has reached, indexed by organization: routing an event looks only at
// its organization's subscriptions and the platform-wide ones, however many
// tenants there are.
type Registry struct {
	subs     map[int64]*Subscription
	byOrg    map[int64][]*Subscription
	platform map[int64]*Subscription // subscriptions with no organization
	// order holds the subscriptions sorted by id, the snapshot's order.
	order []*Subscription
}

func newRegistry() *Registry {
	return &Registry{subs: map[int64]*Subscription{}, byOrg: map[int64][]*Subscription{}, platform: map[int64]*Subscription{}}
}

// put adds or replaces s.
func (r *Registry) put(s *Subscription) {
	s.snap = nil // s may be a changed copy of one snapshotted
	r.unindex(s.ID)
	if i, found := r.position(s.ID); found {
		r.order[i] = s
	} else {
		r.order = slices.Insert(r.order, i, s) // new ids come last: an append
	}
	r.subs[s.ID] = s
	if s.OrganizationID == nil {
		r.platform[s.ID] = s
	} else {
		r.byOrg[*s.OrganizationID] = append(r.byOrg[*s.OrganizationID], s)
	}
}

// position returns where subscription id is, or would be, in r.order.
func (r *Registry) position(id int64) (int, bool) {
	return slices.BinarySearchFunc(r.order, id, func(s *Subscription, id int64) int { return cmp.Compare(s.ID, id) })
}

// remove drops subscription id, if known.
func (r *Registry) remove(id int64) {
	if i, found := r.position(id); found {
		r.order = slices.Delete(r.order, i, i+1)
	}
	r.unindex(id)
}

// unindex drops subscription id, if known, from all but r.order.
func (r *Registry) unindex(id int64) {
	old := r.subs[id]
	if old == nil {
		return
	}
	delete(r.subs, id)
	if old.OrganizationID == nil {
		delete(r.platform, id)
		return
	}
	org := *old.OrganizationID
	rest := slices.DeleteFunc(r.byOrg[org], func(s *Subscription) bool { return s.ID == id })
	if len(rest) == 0 {
		delete(r.byOrg, org)
	} else {
		r.byOrg[org] = rest
	}
}

// NewRegistry returns a registry from a snapshot (nil: empty). The snapshot
// names secrets by fingerprint only (and a URL with credentials too): lookup
// supplies their values from the subscription table, keeping those whose
// fingerprint the snapshot lists. A URL that changed since the checkpoint is
// taken as it is now; one whose row is gone stays empty, which makes the
// subscription unusable (dead letters) rather than sent elsewhere.
// When none of them is there any more (rotated with --drop-old since the
// checkpoint) the subscription signs with its current secrets, which its
// receiver was given at the rotation; when its row is gone (deleted since
// the checkpoint) it has no secret and its deliveries are dead-lettered,
// never sent unsigned. A snapshot written before migration 6 may still hold
// the secrets themselves; they are used as they are.
func NewRegistry(snapshot []byte, lookup SecretLookup) (*Registry, error) {
	r := newRegistry()
	if len(snapshot) == 0 {
		return r, nil
	}
	var subs []Subscription
	if err := json.Unmarshal(snapshot, &subs); err != nil {
		return nil, fmt.Errorf("read routing state: %w", err)
	}
	var ids []int64
	for i := range subs {
		if len(subs[i].Secrets) == 0 && len(subs[i].SecretFingerprints) > 0 || subs[i].URLFingerprint != "" {
			ids = append(ids, subs[i].ID)
		}
	}
	var current map[int64]Stored
	if len(ids) > 0 {
		if lookup == nil {
			return nil, errors.New("read routing state: secrets are stored by fingerprint and there is no way to look them up")
		}
		var err error
		if current, err = lookup(ids); err != nil {
			return nil, fmt.Errorf("read routing state: look up subscription secrets: %w", err)
		}
	}
	for i := range subs {
		s := &subs[i]
		if len(s.Secrets) == 0 && len(s.SecretFingerprints) > 0 {
			s.Secrets = pickSecrets(s.SecretFingerprints, current[s.ID].Secrets)
		}
		if s.URLFingerprint != "" {
			s.URL = current[s.ID].URL // "" when the row is gone: unusable
		}
		s.SecretFingerprints, s.URLFingerprint = nil, ""
		s.compileFilter()
		r.put(s)
	}
	return r, nil
}

// pickSecrets returns the secrets of have whose fingerprint is in want, in
// want's order; all of have when none matches.
func pickSecrets(want, have []string) []string {
	var out []string
	for _, fp := range want {
		for _, s := range have {
			if SecretFingerprint(s) == fp {
				out = append(out, s)
				break
			}
		}
	}
	if len(out) == 0 {
		return slices.Clone(have)
	}
	return out
}

// Snapshot returns the registry as JSON, subscriptions sorted by id, with
// each secret, and each URL that carries credentials, replaced by its
// fingerprint (the routing state is stored in outboxd_checkpoint, which must
// not hold tenants' signing keys or tokens).
func (r *Registry) Snapshot() []byte {
	return r.AppendSnapshot(nil)
}

// AppendSnapshot appends the registry's snapshot (Snapshot) to b.
func (r *Registry) AppendSnapshot(b []byte) []byte {
	// A subscription's element is made once, not at every snapshot: a
	// transaction that changes one subscription of 100,000 (or a router
	// that catches up with the stream in the middle of a large one, and
	// settles the routing state at each change) copies the others' bytes.
	// The array is what json.Marshal makes of the elements in id order.
	n := 2 + len(r.order)
	for _, s := range r.order {
		if s.snap == nil {
			s.snap = s.snapshot()
		}
		n += len(s.snap)
	}
	b = slices.Grow(b, n+64) // and room for a suffix of the caller's
	b = append(b, '[')
	for i, s := range r.order {
		if i > 0 {
			b = append(b, ',')
		}
		b = append(b, s.snap...)
	}
	return append(b, ']')
}

// snapshot returns s's element of the registry's snapshot: s as JSON, with
// each secret, and a URL that carries credentials, replaced by its
// fingerprint.
func (s *Subscription) snapshot() []byte {
	c := *s
	c.snap = nil
	c.SecretFingerprints = make([]string, len(s.Secrets))
	for i, secret := range s.Secrets {
		c.SecretFingerprints[i] = SecretFingerprint(secret)
	}
	c.Secrets = nil
	if slices.ContainsFunc(slices.Collect(maps.Keys(s.Settings)), SecretSettingKey) {
		// Only if the column's CHECK was dropped: never kept. The keys
		// stay, so the subscription stays refused.
		c.Settings = maps.Clone(s.Settings)
		for k := range c.Settings {
			if SecretSettingKey(k) {
				c.Settings[k] = ""
			}
		}
	}
	if urlHasCredentials(s.URL) {
		c.URLFingerprint, c.URL = SecretFingerprint(s.URL), ""
	}
	b, _ := json.Marshal(c) // plain data: cannot fail
	return b
}

// Get returns subscription id, or nil.
func (r *Registry) Get(id int64) *Subscription { return r.subs[id] }

// Each calls f for every subscription.
func (r *Registry) Each(f func(*Subscription)) {
	for _, s := range r.subs {
		f(s)
	}
}

// EachCandidate calls f for every subscription e may go to (a superset of
// those Matches accepts): the platform-wide ones and those of e's
// organization. An event routed by the subscriptions' history (a catch-up
// row, e.Windows set) may go to a subscription whose organization changed
// since: it is offered every subscription.
func (r *Registry) EachCandidate(e *decode.Event, f func(*Subscription)) {
	if e.Windows != nil && !e.CommitTime.IsZero() {
		r.Each(f)
		return
	}
	for _, s := range r.platform {
		f(s)
	}
	if e.HasOrganization {
		for _, s := range r.byOrg[e.OrganizationID] {
			f(s)
		}
	}
}

// ErrUnknownUnchanged is returned (wrapped) by Registry.Apply for an update
// that left columns the router reads unchanged (TOASTed values pgoutput does
// not resend, decode.Row.Unchanged) for a subscription the registry does not
// know, so there is nothing to take their values from. The registry then does
// not route that subscription at all: it is never guessed, nor routed with
// empty secrets or globs, until a change carries those columns again (an
// update that rewrites them, or a table catch-up).
var ErrUnknownUnchanged = errors.New("unchanged columns of an unknown subscription")

// Apply applies one change of the subscription table and returns the
// subscription it concerns (nil for a reset or a delete).
//
// An update's unchanged columns (decode.Row.Unchanged) keep the values the
// registry knows for that subscription: the registry is the subscription
// table as of the router's position in the stream (seeded from the
// checkpoint's routing state or the catch-up's snapshot), so the row it holds
// is the row the update started from. When it does not know the subscription,
// Apply drops it and returns an error wrapping ErrUnknownUnchanged.
func (r *Registry) Apply(c *decode.Change) (*Subscription, error) {
	switch {
	case c.Row == nil:
		*r = *newRegistry()
		return nil, nil
	case c.Kind == decode.KindDelete:
		id, err := rowID(c.Row)
		if err != nil {
			return nil, err
		}
		r.remove(id)
		return nil, nil
	default:
		var base *Subscription
		if c.Row.Unchanged != nil {
			if id, err := rowID(c.Row); err == nil {
				base = r.subs[id]
			}
		}
		s, err := subscriptionFromRow(c.Row, base)
		if err != nil {
			if errors.Is(err, ErrUnknownUnchanged) {
				r.remove(s.ID)
			}
			return nil, err
		}
		r.put(&s)
		return &s, nil
	}
}

func rowID(row *decode.Row) (int64, error) {
	for i, c := range row.Relation.Columns {
		if c.Name == "id" && row.Values[i] != nil {
			return strconv.ParseInt(string(row.Values[i]), 10, 64)
		}
	}
	return 0, fmt.Errorf("subscription row without id")
}

// SubscriptionFromRow reads a subscription from a row in text format. A row
// with unchanged columns (decode.Row.Unchanged) that the subscription needs
// is refused with ErrUnknownUnchanged: their values are not in the row, and
// reading them as NULL would drop the secrets (unsigned requests) or the
// event globs (every event); Registry.Apply merges them instead.
func SubscriptionFromRow(row *decode.Row) (Subscription, error) {
	return subscriptionFromRow(row, nil)
}

// subscriptionFromRow reads a subscription from row, taking the columns the
// row left unchanged from base; with base nil such a column is an error
// wrapping ErrUnknownUnchanged (s.ID is set when the row has one).
func subscriptionFromRow(row *decode.Row, base *Subscription) (Subscription, error) {
	var s Subscription
	var haveID bool
	var missing []string
	for i, c := range row.Relation.Columns {
		v := row.Values[i]
		if row.IsUnchanged(i) {
			switch c.Name {
			case "id", "organization_id", "url", "secrets", "events", "enabled", "filter", "kind", "settings":
				if base == nil {
					missing = append(missing, c.Name)
					continue
				}
			}
			switch c.Name {
			case "id":
				s.ID, haveID = base.ID, true
			case "organization_id":
				if base.OrganizationID != nil {
					org := *base.OrganizationID
					s.OrganizationID = &org
				}
			case "url":
				s.URL = base.URL
			case "secrets":
				s.Secrets = slices.Clone(base.Secrets)
			case "events":
				s.Events = slices.Clone(base.Events)
			case "enabled":
				s.Enabled = base.Enabled
			case "contract":
				if base != nil {
					s.Contract = base.Contract
				}
			case "filter":
				s.Filter = base.Filter
			case "kind":
				s.Kind = base.Kind
			case "settings":
				s.Settings, s.settingsErr = maps.Clone(base.Settings), base.settingsErr
			}
			continue // a column outboxd does not read: nothing to merge
		}
		var err error
		switch c.Name {
		case "id":
			if v != nil {
				s.ID, err = strconv.ParseInt(string(v), 10, 64)
				haveID = err == nil
			}
		case "organization_id":
			if v != nil {
				var org int64
				org, err = strconv.ParseInt(string(v), 10, 64)
				s.OrganizationID = &org
			}
		case "url":
			s.URL = string(v)
		case "secrets":
			s.Secrets, err = ParseTextArray(string(v))
		case "events":
			s.Events, err = ParseTextArray(string(v))
		case "enabled":
			s.Enabled = string(v) == "t"
		case "contract":
			s.Contract = string(v)
		case "filter":
			s.Filter = string(v) // NULL: no filter
		case "kind":
			if s.Kind = string(v); s.Kind == "webhook" {
				s.Kind = ""
			}
		case "settings":
			s.Settings, s.settingsErr = nil, nil
			if v != nil {
				if jerr := json.Unmarshal(v, &s.Settings); jerr != nil {
					s.Settings, s.settingsErr = nil, fmt.Errorf("its settings are not an object of strings: %w", jerr)
				}
				if len(s.Settings) == 0 {
					s.Settings = nil
				}
			}
		}
		if err != nil {
			return s, fmt.Errorf("subscription column %s: %w", c.Name, err)
		}
	}
	if !haveID {
		return s, fmt.Errorf("subscription row without id")
	}
	if missing != nil {
		id := s.ID
		return Subscription{ID: id}, fmt.Errorf("update of subscription %d sent column(s) %s as unchanged (TOASTed, value not sent), and the routing state does not know that subscription: it is not routed until a change carries those columns: %w",
			id, strings.Join(missing, ", "), ErrUnknownUnchanged)
	}
	s.compileFilter()
	return s, nil
}

// errNoSecret is the reason a subscription without a signing secret does
// not deliver.
var errNoSecret = errors.New("has no signing secret")

// signingError returns why s cannot sign its requests, or nil. A subscription
// never sends unsigned (docs/DESIGN.md G8): with an empty secret list its
// deliveries fail permanently (see Router.subscriptionSink).
func (s *Subscription) signingError() error {
	if s.IsWebhook() && len(s.Secrets) == 0 {
		return fmt.Errorf("subscription %d %w", s.ID, errNoSecret)
	}
	return nil
}

// ParseTextArray parses a one-dimensional Postgres text[] in its text form,
// such as {a,"b c",NULL}; NULL elements are dropped.
func ParseTextArray(s string) ([]string, error) {
	if s == "" {
		return nil, nil
	}
	if len(s) < 2 || s[0] != '{' || s[len(s)-1] != '}' {
		return nil, fmt.Errorf("not an array: %q", s)
	}
	body := s[1 : len(s)-1]
	var out []string
	for i := 0; i < len(body); {
		var elem strings.Builder
		quoted := false
		if body[i] == '"' {
			quoted = true
			i++
			for ; i < len(body) && body[i] != '"'; i++ {
				if body[i] == '\\' && i+1 < len(body) {
					i++
				}
				elem.WriteByte(body[i])
			}
			if i >= len(body) {
				return nil, fmt.Errorf("unterminated quote in %q", s)
			}
			i++
		} else {
			for ; i < len(body) && body[i] != ','; i++ {
				elem.WriteByte(body[i])
			}
		}
		if e := elem.String(); quoted || e != "NULL" {
			out = append(out, e)
		}
		if i < len(body) {
			if body[i] != ',' {
				return nil, fmt.Errorf("unexpected %q in %q", body[i], s)
			}
			i++
		}
	}
	return out, nil
}
