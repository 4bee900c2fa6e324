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

	"github.com/outboxd/outboxd/decode"
)

// Masking removes or disguises event properties before one destination gets
// them (README.md, "Filters and masking"): an analytics tool need not receive
// an e-mail address that a billing webhook needs. It works on a copy of the
// event: the other destinations, and the row, keep the original. Only the
// envelope's properties are masked; the rest of the body is sent byte for
// byte as the decoder built it, so a webhook keeps its envelope contract, and
// its signature covers the masked body it actually sends.

// MaskAction is what a mask rule does to the value at its path.
type MaskAction string

// The mask actions.
const (
	// MaskDrop removes the key.
	MaskDrop MaskAction = "drop"
	// MaskHash replaces the value by the lowercase hex HMAC-SHA256 of its
	// text (a string's characters; any other value's compact JSON, object
	// keys sorted) under the mask key: the same value gives the same hash
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
// masked. The envelope's other members are kept byte for byte; the masked
// properties object is written again (keys sorted, numbers as they were).
// A body whose properties is not an object (null, say) has nothing to mask
// and is returned as it is; so is a body where no rule's path exists.
func (m *Mask) Apply(body []byte) ([]byte, error) {
	if m == nil {
		return body, nil
	}
	start, end, err := propertiesSpan(body)
	if err != nil {
		return nil, err
	}
	if start < 0 {
		return body, nil
	}
	raw := body[start:end]
	if raw[0] != '{' {
		return body, nil
	}
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.UseNumber()
	var props map[string]any
	if err := dec.Decode(&props); err != nil {
		return nil, fmt.Errorf("mask: properties: %w", err)
	}
	changed := false
	for _, r := range m.rules {
		c, err := m.apply(props, r)
		if err != nil {
			return nil, err
		}
		changed = changed || c
	}
	if !changed {
		return body, nil
	}
	masked, err := marshalCompact(props)
	if err != nil {
		return nil, fmt.Errorf("mask: properties: %w", err)
	}
	out := make([]byte, 0, len(body)-len(raw)+len(masked))
	out = append(out, body[:start]...)
	out = append(out, masked...)
	return append(out, body[end:]...), nil
}

// apply applies r to props and reports whether it changed anything; a path
// that does not exist, or goes through a value that is not an object, is
// left alone.
func (m *Mask) apply(props map[string]any, r MaskRule) (bool, error) {
	obj := props
	for _, k := range r.Path[:len(r.Path)-1] {
		next, ok := obj[k].(map[string]any)
		if !ok {
			return false, nil
		}
		obj = next
	}
	last := r.Path[len(r.Path)-1]
	v, ok := obj[last]
	if !ok {
		return false, nil
	}
	switch r.Action {
	case MaskDrop:
		delete(obj, last)
	case MaskRedact:
		obj[last] = RedactedValue
	case MaskHash:
		var text []byte
		if s, ok := v.(string); ok {
			text = []byte(s)
		} else {
			var err error
			if text, err = marshalCompact(v); err != nil {
				return false, fmt.Errorf("mask: hash properties.%s: %w", strings.Join(r.Path, "."), err)
			}
		}
		obj[last] = HashValue(m.key, text)
	}
	return true, nil
}

// HashValue is the hash rule's output for text under key: the lowercase hex
// HMAC-SHA256, 64 characters.
func HashValue(key, text []byte) string {
	h := hmac.New(sha256.New, key)
	h.Write(text)
	return hex.EncodeToString(h.Sum(nil))
}

// marshalCompact is json.Marshal without HTML escaping (a property "<b>"
// stays "<b>", as the decoder wrote it).
func marshalCompact(v any) ([]byte, error) {
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil {
		return nil, err
	}
	return bytes.TrimSuffix(buf.Bytes(), []byte("\n")), nil
}

// propertiesSpan returns where the value of the top-level "properties"
// member of the JSON object body starts and ends; start is -1 when there is
// none.
func propertiesSpan(body []byte) (start, end int, err error) {
	dec := json.NewDecoder(bytes.NewReader(body))
	tok, err := dec.Token()
	if err != nil {
		return -1, -1, fmt.Errorf("mask: envelope: %w", err)
	}
	if d, ok := tok.(json.Delim); !ok || d != '{' {
		return -1, -1, errors.New("mask: envelope is not a JSON object")
	}
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return -1, -1, fmt.Errorf("mask: envelope: %w", err)
		}
		var raw json.RawMessage
		if err := dec.Decode(&raw); err != nil {
			return -1, -1, fmt.Errorf("mask: envelope: %w", err)
		}
		if k, _ := tok.(string); k == "properties" {
			end := int(dec.InputOffset())
			return end - len(raw), end, nil
		}
	}
	return -1, -1, nil
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
