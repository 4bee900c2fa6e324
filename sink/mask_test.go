package sink_test

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/outboxd/outboxd/decode"
	"github.com/outboxd/outboxd/sink"
)

var maskKey = []byte("0123456789abcdef-mask-key")

func hmacHex(key []byte, s string) string {
	h := hmac.New(sha256.New, key)
	h.Write([]byte(s))
	return hex.EncodeToString(h.Sum(nil))
}

func TestParseMask(t *testing.T) {
	t.Parallel()
	m, err := sink.ParseMask(" drop:properties.email , HASH:properties.user.email,redact:properties.note ", maskKey)
	require.NoError(t, err)
	require.Equal(t, []sink.MaskRule{
		{Action: sink.MaskDrop, Path: []string{"email"}},
		{Action: sink.MaskHash, Path: []string{"user", "email"}},
		{Action: sink.MaskRedact, Path: []string{"note"}},
	}, m.Rules())

	m, err = sink.ParseMask(" , ", nil)
	require.NoError(t, err)
	require.Nil(t, m, "no rule: no mask")

	for spec, want := range map[string]string{
		"drop":                     "want ACTION:PATH",
		"erase:properties.x":       "unknown action",
		"drop:email":               "must start with properties.",
		"drop:properties":          "must start with properties.",
		"drop:event_name":          "must start with properties.",
		"drop:properties..x":       "empty key",
		"redact:properties.x.":     "empty key",
		"hash:properties.user_key": "needs a key",
	} {
		_, err := sink.ParseMask(spec, nil)
		require.ErrorContains(t, err, want, spec)
	}
	_, err = sink.ParseMask("hash:properties.x", nil)
	require.ErrorIs(t, err, sink.ErrMaskNoKey)
}

const envelope = `{"id":9,"event_name":"signup","occurred_at":"2026-11-26T10:00:00Z","organization_id":"7","user_id":"u1","entity_type":null,"entity_id":null,"correlation_id":null,"source":"web","schema_version":1,"properties":`

func TestMaskApply(t *testing.T) {
	t.Parallel()
	m, err := sink.ParseMask("drop:properties.email,hash:properties.user.email,hash:properties.age,hash:properties.tags,redact:properties.note,drop:properties.missing.deep,redact:properties.scalar.x", maskKey)
	require.NoError(t, err)

	body := []byte(envelope + `{"email":"a@b.c","user":{"email":"A@b.c","name":"Ann"},"age":42,"tags":["x","y"],"note":"<secret>","scalar":5,"big":12345678901234567890,"keep":"<b>"}}`)
	out, err := m.Apply(body)
	require.NoError(t, err)
	// The envelope outside properties is byte for byte the same.
	require.Equal(t, envelope, string(out[:len(envelope)]))
	var got struct {
		Properties map[string]json.RawMessage `json:"properties"`
	}
	require.NoError(t, json.Unmarshal(out, &got))
	p := got.Properties
	require.NotContains(t, p, "email", "dropped")
	require.JSONEq(t, `{"email":"`+hmacHex(maskKey, "A@b.c")+`","name":"Ann"}`, string(p["user"]), "nested hash; siblings kept")
	require.Equal(t, `"`+hmacHex(maskKey, "42")+`"`, string(p["age"]), "a number is hashed as its JSON text")
	require.Equal(t, `"`+hmacHex(maskKey, `["x","y"]`)+`"`, string(p["tags"]))
	require.Equal(t, `"[REDACTED]"`, string(p["note"]))
	require.Equal(t, `5`, string(p["scalar"]), "a path through a non-object is left alone")
	require.Equal(t, `12345678901234567890`, string(p["big"]), "numbers are kept as written")
	require.Equal(t, `"<b>"`, string(p["keep"]), "no HTML escaping")
	require.Len(t, hmacHex(maskKey, "x"), 64)

	// Stable: the same value and key give the same hash; another key another.
	again, err := m.Apply(body)
	require.NoError(t, err)
	require.Equal(t, out, again)
	other, err := sink.ParseMask("hash:properties.user.email", []byte("another key of sixteen bytes"))
	require.NoError(t, err)
	out2, err := other.Apply(body)
	require.NoError(t, err)
	require.NotContains(t, string(out2), hmacHex(maskKey, "A@b.c"))
	require.Contains(t, string(out2), hmacHex([]byte("another key of sixteen bytes"), "A@b.c"))

	// Nothing to mask: the body itself.
	for _, props := range []string{`null`, `{"other":1}`, `[1,2]`, `"s"`} {
		b := []byte(envelope + props + `}`)
		out, err := m.Apply(b)
		require.NoError(t, err)
		require.Equal(t, string(b), string(out), props)
	}
	// No properties member at all.
	out, err = m.Apply([]byte(`{"id":1}`))
	require.NoError(t, err)
	require.Equal(t, `{"id":1}`, string(out))
	// Not an envelope.
	for _, bad := range []string{`[]`, `nope`, `{"properties":{"a":`} {
		_, err := m.Apply([]byte(bad))
		require.Error(t, err, bad)
	}
	// Keys that are path syntax elsewhere are plain keys here; spacing and
	// key order of the rest are kept.
	odd, err := sink.ParseMask("drop:properties.$email,redact:properties.a*b,hash:properties.q?", maskKey)
	require.NoError(t, err)
	out, err = odd.Apply([]byte(envelope + `{"z": 1, "$email": "x@y", "a*b": "s", "ab": "keep", "q?": {"k": [1, 2]}}}`))
	require.NoError(t, err)
	require.Equal(t, envelope+`{"z": 1, "a*b": "[REDACTED]", "ab": "keep", "q?": "`+hmacHex(maskKey, `{"k":[1,2]}`)+`"}}`, string(out))

	// The nil mask changes nothing.
	var none *sink.Mask
	out, err = none.Apply(body)
	require.NoError(t, err)
	require.Equal(t, body, out)
}

type recordingSink struct{ got []*decode.Event }

func (r *recordingSink) Name() string { return "rec" }
func (r *recordingSink) Deliver(_ context.Context, evs []*decode.Event) []sink.Outcome {
	r.got = append(r.got, evs...)
	return make([]sink.Outcome, len(evs))
}

type scopedSink struct{ recordingSink }

func (s *scopedSink) Scope(e *decode.Event) string { return e.Name }

// Masked delivers masked copies: the events given keep their bodies; an
// event that cannot be masked fails permanently instead of being sent as it
// is; the wrapped sink's ordering scope is kept.
func TestMaskedSink(t *testing.T) {
	t.Parallel()
	m, err := sink.ParseMask("drop:properties.email", nil)
	require.NoError(t, err)
	rec := &recordingSink{}
	s := sink.Masked(rec, m)
	require.Equal(t, "rec", s.Name())
	_, scoped := s.(sink.Scoped)
	require.False(t, scoped, "an unscoped sink stays unscoped")
	orig := []byte(envelope + `{"email":"a@b.c","n":1}}`)
	events := []*decode.Event{
		{ID: 1, Body: orig},
		{ID: 2, Body: []byte(`not json`)},
		{ID: 3, Body: []byte(envelope + `null}`)},
	}
	out := s.Deliver(context.Background(), events)
	require.Len(t, out, 3)
	require.NoError(t, out[0].Err)
	require.ErrorIs(t, out[1].Err, sink.ErrPermanent)
	require.NoError(t, out[2].Err)
	require.Len(t, rec.got, 2)
	require.Equal(t, int64(1), rec.got[0].ID)
	require.Equal(t, envelope+`{"n":1}}`, string(rec.got[0].Body))
	require.Equal(t, string(orig), string(events[0].Body), "the original event is not touched")
	require.Equal(t, int64(3), rec.got[1].ID)

	require.Same(t, rec, sink.Masked(rec, nil), "no mask: the sink itself")
	sc := sink.Masked(&scopedSink{}, m)
	scope, ok := sc.(sink.Scoped)
	require.True(t, ok)
	require.Equal(t, "signup", scope.Scope(&decode.Event{Name: "signup"}))
}
