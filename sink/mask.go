package sink

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"strings"

	"github.com/tidwall/gjson"
	"github.com/tidwall/sjson"

	"github.com/outboxd/outboxd/decode"
)

// Masking removes or disguises event properties before one destination gets
// them (README.md, "Filters and masking"): an analytics tool need not receive
// an e-mail address that a billing webhook needs. It works on a copy of the
// event: the other destinations, and the row, keep the original. Only the
// envelope's properties are masked, by path (tidwall/gjson finds the value,
// tidwall/sjson rewrites it in a copy, without decoding and re-encoding the
// body); the rest of the body is sent byte for byte as the decoder built it, so a webhook keeps its envelope contract, and
// its signature covers the masked body it actually sends.

// MaskAction is what a mask rule does to the value at its path.
type MaskAction string

// The mask actions.
const (
	// MaskDrop removes the key.
	MaskDrop MaskAction = "drop"
	// MaskHash replaces the value by the lowercase hex HMAC-SHA256 of its
	// text (a string's characters; any other value's compact JSON as the
	// row holds it) under the mask key: the same value gives the same hash
	// for the same key, so a destination can still count and join on it.
	MaskHash MaskAction = "hash"
	// MaskRedact replaces the value by the string RedactedValue.
	MaskRedact MaskAction = "redact"
)

// RedactedValue replaces a redacted property.
const RedactedValue = "[REDACTED]"

// MaskRule is one rule: an action on the property at Path (the keys under
// properties, outermost first).
type MaskRule struct {
	Action MaskAction
	Path   []string
}

// ErrMaskNoKey is ParseMask's error for a hash rule without a key.
var ErrMaskNoKey = errors.New("a hash rule needs a key")

// Mask is a parsed list of rules; the nil *Mask changes nothing.
type Mask struct {
	rules []MaskRule
	// paths are the rules' paths in gjson/sjson syntax, keys escaped.
	paths []string
	key   []byte
}

// ParseMask parses a comma-separated list of ACTION:PATH rules, ACTION one of
// drop, hash or redact and PATH properties.KEY[.KEY...] (a key cannot
// contain a dot or a comma), such as
// "drop:properties.email,hash:properties.user.email". key is the HMAC key of
// the hash rules, required when there is one. An empty spec is the nil mask.
// Errors never contain the key.
func ParseMask(spec string, key []byte) (*Mask, error) {
	m := &Mask{}
	var hashes bool
	for raw := range strings.SplitSeq(spec, ",") {
		raw = strings.TrimSpace(raw)
		if raw == "" {
			continue
		}
		action, p, ok := strings.Cut(raw, ":")
		if !ok {
			return nil, fmt.Errorf("mask rule %q: want ACTION:PATH, such as drop:properties.email", raw)
		}
		r := MaskRule{Action: MaskAction(strings.ToLower(strings.TrimSpace(action)))}
		switch r.Action {
		case MaskDrop, MaskRedact:
		case MaskHash:
			hashes = true
		default:
			return nil, fmt.Errorf("mask rule %q: unknown action %q (want drop, hash or redact)", raw, action)
		}
		parts := strings.Split(strings.TrimSpace(p), ".")
		if len(parts) < 2 || parts[0] != "properties" {
			return nil, fmt.Errorf("mask rule %q: the path must start with properties. and name a key (only properties are masked)", raw)
		}
		for _, k := range parts[1:] {
			if k == "" {
				return nil, fmt.Errorf("mask rule %q: empty key in path", raw)
			}
		}
		r.Path = parts[1:]
		m.rules = append(m.rules, r)
		esc := []string{"properties"}
		for _, k := range r.Path {
			esc = append(esc, gjson.Escape(k))
		}
		m.paths = append(m.paths, strings.Join(esc, "."))
	}
	if len(m.rules) == 0 {
		return nil, nil
	}
	if hashes {
		if len(key) == 0 {
			return nil, ErrMaskNoKey
		}
		m.key = bytes.Clone(key)
	}
	return m, nil
}

// Rules returns the mask's rules.
func (m *Mask) Rules() []MaskRule {
	if m == nil {
		return nil
	}
	return m.rules
}

// Apply returns body (an envelope: a JSON object) with its properties
// masked, in a new slice (body is never modified). Only the masked values
// change: the rest of the body, key order, spacing and numbers included, is
// kept byte for byte. A rule whose path does not exist (a missing key, a path
// through a value that is not an object, properties null) changes nothing;
// with no change the body itself is returned.
func (m *Mask) Apply(body []byte) ([]byte, error) {
	if m == nil {
		return body, nil
	}
	if t := bytes.TrimLeft(body, " \t\r\n"); len(t) == 0 || t[0] != '{' {
		return nil, errors.New("mask: envelope is not a JSON object")
	}
	if !gjson.ValidBytes(body) {
		return nil, errors.New("mask: envelope is not valid JSON")
	}
	out := body
	for i, r := range m.rules {
		path := m.paths[i]
		v := gjson.GetBytes(out, path)
		if !v.Exists() {
			continue
		}
		var err error
		switch r.Action {
		case MaskDrop:
			out, err = sjson.DeleteBytes(out, path)
		case MaskRedact:
			out, err = sjson.SetBytes(out, path, RedactedValue)
		case MaskHash:
			var text []byte
			if v.Type == gjson.String {
				text = []byte(v.String())
			} else {
				var buf bytes.Buffer
				if err := json.Compact(&buf, []byte(v.Raw)); err != nil {
					return nil, fmt.Errorf("mask: hash properties.%s: %w", strings.Join(r.Path, "."), err)
				}
				text = buf.Bytes()
			}
			out, err = sjson.SetBytes(out, path, HashValue(m.key, text))
		}
		if err != nil {
			return nil, fmt.Errorf("mask: %s properties.%s: %w", r.Action, strings.Join(r.Path, "."), err)
		}
	}
	return out, nil
}

// HashValue is the hash rule's output for text under key: the lowercase hex
// HMAC-SHA256, 64 characters.
func HashValue(key, text []byte) string {
	h := hmac.New(sha256.New, key)
	h.Write(text)
	return hex.EncodeToString(h.Sum(nil))
}

// Masked returns s with m applied to every event it is given (s itself when m
// is nil). An event whose body cannot be masked is not sent: it fails
// permanently with the reason (dead-lettered), never unmasked.
func Masked(s Sink, m *Mask) Sink {
	if m == nil {
		return s
	}
	ms := &maskedSink{s: s, m: m}
	if sc, ok := s.(Scoped); ok {
		// Ordering keys scoped as the sink scopes them, as without a mask.
		return maskedScoped{ms, sc}
	}
	return ms
}

type maskedSink struct {
	s Sink
	m *Mask
}

type maskedScoped struct {
	*maskedSink
	sc Scoped
}

func (s maskedScoped) Scope(e *decode.Event) string { return s.sc.Scope(e) }

// Name is the wrapped sink's.
func (s *maskedSink) Name() string { return s.s.Name() }

// Unwrap returns the sink the mask is applied in front of.
func (s *maskedSink) Unwrap() Sink { return s.s }

// Deliver masks copies of the events and delivers those.
func (s *maskedSink) Deliver(ctx context.Context, events []*decode.Event) []Outcome {
	copies := make([]*decode.Event, 0, len(events))
	index := make([]int, 0, len(events))
	out := make([]Outcome, len(events))
	for i, e := range events {
		if e == nil {
			copies, index = append(copies, e), append(index, i)
			continue
		}
		body, err := s.m.Apply(e.Body)
		if err != nil {
			out[i].Err = fmt.Errorf("event %d not sent: %w: %w", e.ID, err, ErrPermanent)
			continue
		}
		c := *e
		c.Body = body
		copies, index = append(copies, &c), append(index, i)
	}
	if len(copies) == 0 {
		return out
	}
	for j, o := range s.s.Deliver(ctx, copies) {
		out[index[j]] = o
	}
	return out
}
