package sink

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/outboxd/outboxd/decode"
)

// secretPrefix starts every Standard Webhooks secret.
const secretPrefix = "whsec_"

// Sign returns the webhook-signature header value for id, timestamp ts (unix
// seconds) and body: one "v1,<base64 HMAC-SHA256(key, id.ts.body)>" per secret,
// space-separated, so that a receiver holding either the old or the new secret
// verifies during a rotation. It returns "" when secrets is empty. Secrets are
// "whsec_" followed by the base64 key; errors name the secret by index only.
func Sign(secrets []string, id string, ts int64, body []byte) (string, error) {
	keys, err := decodeSecrets(secrets)
	if err != nil {
		return "", err
	}
	return signWith(keys, id, ts, body), nil
}

// WebhookID returns the webhook-id of a delivery of events
// (docs/DESIGN.md §4): the event's message id (decode.Event.MessageID,
// evt_<namespace>_<row id>_<occurred_at>) for one event; for a batch,
// "batch_<namespace>_<first row id>_<last row id>_<h>" where h is the first 16
// hex digits of SHA-256 over the message ids of all members, each followed by
// a newline, in order. The id is the same on every retry and redelivery of the
// same events, so receivers can deduplicate, and it never names two different
// events: the message ids are unique across outboxes and identity restarts.
// It returns "" for no events.
func WebhookID(events []*decode.Event) string {
	switch len(events) {
	case 0:
		return ""
	case 1:
		return messageID(events[0])
	}
	h := sha256.New()
	var buf [64]byte
	for _, ev := range events {
		b := append(buf[:0], messageID(ev)...)
		h.Write(append(b, '\n'))
	}
	var sum [sha256.Size]byte
	return "batch_" + decode.MessageNamespace(messageID(events[0])) + "_" +
		strconv.FormatInt(events[0].ID, 10) + "_" +
		strconv.FormatInt(events[len(events)-1].ID, 10) + "_" +
		hex.EncodeToString(h.Sum(sum[:0])[:8])
}

// messageID returns ev's message id: ev.MessageID, which the decoder always
// sets, or for an Event made by hand without one, the id of its row in no
// namespace.
func messageID(ev *decode.Event) string {
	if ev.MessageID != "" {
		return ev.MessageID
	}
	return decode.MessageID("", ev.ID, ev.OccurredAt)
}

// decodeSecrets decodes Standard Webhooks secrets into HMAC keys.
func decodeSecrets(secrets []string) ([][]byte, error) {
	keys := make([][]byte, 0, len(secrets))
	for i, s := range secrets {
		k, err := decodeSecret(s)
		if err != nil {
			return nil, fmt.Errorf("secret %d: %w", i, err)
		}
		keys = append(keys, k)
	}
	return keys, nil
}

// decodeSecret decodes one "whsec_<base64>" secret. Its errors never contain
// the secret, not even a fragment of it.
func decodeSecret(s string) ([]byte, error) {
	rest, ok := strings.CutPrefix(s, secretPrefix)
	if !ok {
		return nil, errors.New(`must start with "whsec_"`)
	}
	key, err := base64.StdEncoding.DecodeString(rest)
	if err != nil {
		// Some generators drop the padding; accept that too.
		key, err = base64.RawStdEncoding.DecodeString(rest)
	}
	if err != nil {
		return nil, errors.New(`invalid base64 after "whsec_"`)
	}
	if len(key) == 0 {
		return nil, errors.New(`empty key after "whsec_"`)
	}
	return key, nil
}

// signWith computes the webhook-signature value with decoded keys, once (the
// webhook sink signs with a signer instead).
func signWith(keys [][]byte, id string, ts int64, body []byte) string {
	if len(keys) == 0 {
		return ""
	}
	// "<id>.<ts>." in a stack buffer for the usual short ids.
	var pbuf [64]byte
	prefix := append(pbuf[:0], id...)
	prefix = append(prefix, '.')
	prefix = strconv.AppendInt(prefix, ts, 10)
	prefix = append(prefix, '.')

	const sigLen = len("v1,") + 44 // base64 of 32 bytes
	out := make([]byte, 0, len(keys)*(sigLen+1))
	var sum [sha256.Size]byte
	for i, k := range keys {
		m := hmac.New(sha256.New, k)
		m.Write(prefix)
		m.Write(body)
		if i > 0 {
			out = append(out, ' ')
		}
		out = append(out, "v1,"...)
		out = base64.StdEncoding.AppendEncode(out, m.Sum(sum[:0]))
	}
	return string(out)
}

// signer computes webhook-signature values with decoded keys. It keeps keyed
// HMAC states in a pool per key, so signing a delivery allocates only the
// header value: hmac.New would allocate a dozen times and hash both key pads
// again. It is safe for concurrent use.
type signer struct {
	keys  [][]byte
	pools []sync.Pool // of *macState, one pool per key
}

// macState is a keyed HMAC with scratch space for the signed prefix and the
// digest, which would escape to the heap through the hash.Hash interface.
type macState struct {
	h       hash.Hash
	scratch [64]byte
	sum     [sha256.Size]byte
}

// newSigner returns a signer for keys, nil when there are none.
func newSigner(keys [][]byte) *signer {
	if len(keys) == 0 {
		return nil
	}
	s := &signer{keys: keys, pools: make([]sync.Pool, len(keys))}
	for i, k := range keys {
		s.pools[i].New = func() any { return &macState{h: hmac.New(sha256.New, k)} }
	}
	return s
}

// setHeaders sets a fresh webhook-timestamp on h and, unless s is nil
// (unsigned), the webhook-signature of id, that timestamp and body, which it
// returns.
func (s *signer) setHeaders(h http.Header, id string, body []byte) string {
	ts, sig := s.stamp(id, body)
	h.Set("Webhook-Timestamp", ts)
	if s == nil {
		return ""
	}
	h.Set("Webhook-Signature", sig)
	return sig
}

// stamp returns the webhook-timestamp of now and, unless s is nil
// (unsigned: ""), the webhook-signature of id, that timestamp and body.
func (s *signer) stamp(id string, body []byte) (ts, sig string) {
	now := time.Now().Unix()
	ts = strconv.FormatInt(now, 10)
	if s == nil {
		return ts, ""
	}
	return ts, s.sign(id, now, body)
}

// sign returns the webhook-signature value for id, ts and body: one
// "v1,<base64 HMAC-SHA256(key, id.ts.body)>" per key, space-separated.
func (s *signer) sign(id string, ts int64, body []byte) string {
	const sigLen = len("v1,") + 44  // base64 of 32 bytes
	var obuf [2 * (sigLen + 1)]byte // one or two keys: no allocation but the result
	out := obuf[:0]
	for i := range s.keys {
		m := s.pools[i].Get().(*macState)
		m.h.Reset() // back to the keyed state, without hashing the key again
		// "<id>.<ts>." in the state's scratch space for the usual short ids.
		prefix := append(m.scratch[:0], id...)
		prefix = append(prefix, '.')
		prefix = strconv.AppendInt(prefix, ts, 10)
		prefix = append(prefix, '.')
		m.h.Write(prefix)
		m.h.Write(body)
		if i > 0 {
			out = append(out, ' ')
		}
		out = append(out, "v1,"...)
		out = base64.StdEncoding.AppendEncode(out, m.h.Sum(m.sum[:0]))
		s.pools[i].Put(m)
	}
	return string(out)
}
