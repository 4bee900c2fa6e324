package decode

import (
	"bytes"
	"unicode/utf8"
)

// This file holds the JSON writing and checking used on the insert path. It
// avoids encoding/json there: the envelope is assembled from text values in
// one pass, with one allocation for the body.

// strSafe marks the ASCII bytes that a JSON string holds verbatim.
var strSafe = func() (t [utf8.RuneSelf]bool) {
	for c := 0x20; c < utf8.RuneSelf; c++ {
		t[c] = c != '"' && c != '\\'
	}
	return t
}()

const hexDigits = "0123456789abcdef"

// appendString appends s as a JSON string. Quotes, backslashes and control
// characters are escaped; each byte of invalid UTF-8 becomes U+FFFD, as
// encoding/json does.
func appendString(dst, s []byte) []byte {
	dst = append(dst, '"')
	start := 0
	for i := 0; i < len(s); {
		c := s[i]
		if c < utf8.RuneSelf {
			if strSafe[c] {
				i++
				continue
			}
			dst = append(dst, s[start:i]...)
			switch c {
			case '"', '\\':
				dst = append(dst, '\\', c)
			case '\n':
				dst = append(dst, '\\', 'n')
			case '\r':
				dst = append(dst, '\\', 'r')
			case '\t':
				dst = append(dst, '\\', 't')
			case '\b':
				dst = append(dst, '\\', 'b')
			case '\f':
				dst = append(dst, '\\', 'f')
			default:
				dst = append(dst, '\\', 'u', '0', '0', hexDigits[c>>4], hexDigits[c&0xf])
			}
			i++
			start = i
			continue
		}
		r, size := utf8.DecodeRune(s[i:])
		if r == utf8.RuneError && size == 1 {
			dst = append(dst, s[start:i]...)
			dst = append(dst, "\ufffd"...)
			i++
			start = i
			continue
		}
		i += size
	}
	dst = append(dst, s[start:]...)
	return append(dst, '"')
}

// appendRawJSON appends b, which must be valid JSON (see scanJSON), replacing
// invalid UTF-8 bytes with U+FFFD. scanJSON allows non-ASCII bytes only inside
// strings, so the replacement keeps the document valid.
func appendRawJSON(dst, b []byte) []byte {
	if utf8.Valid(b) {
		return append(dst, b...)
	}
	start := 0
	for i := 0; i < len(b); {
		if b[i] < utf8.RuneSelf {
			i++
			continue
		}
		r, size := utf8.DecodeRune(b[i:])
		if r == utf8.RuneError && size == 1 {
			dst = append(dst, b[start:i]...)
			dst = append(dst, "\ufffd"...)
			i++
			start = i
			continue
		}
		i += size
	}
	return append(dst, b[start:]...)
}

// maxJSONDepth is encoding/json's nesting limit: deeper documents are not
// valid for it. maxEmbedDepth keeps a body (one object level) and a batch
// (one more array level) within that limit, so a value nested deeper than it
// is embedded as a string.
const (
	maxJSONDepth  = 10000
	maxEmbedDepth = maxJSONDepth - 2
)

// jsonScanner checks that a document is one JSON value (RFC 8259 grammar, as
// encoding/json.Valid: UTF-8 is checked separately). While checking, it
// records the last top-level "traceparent" member whose value is a string
// without escapes, when asked to.
type jsonScanner struct {
	b         []byte
	i         int
	depth     int
	maxDepth  int
	wantTrace bool
	trace     []byte
}

// scanJSON reports whether b is a valid JSON document nested at most maxDepth
// deep. When wantTrace is set and b is an object, trace is its top-level
// "traceparent" string member.
func scanJSON(b []byte, maxDepth int, wantTrace bool) (ok bool, trace []byte) {
	s := jsonScanner{b: b, maxDepth: maxDepth, wantTrace: wantTrace}
	s.ws()
	if !s.value() {
		return false, nil
	}
	s.ws()
	if s.i != len(s.b) {
		return false, nil
	}
	return true, s.trace
}

func (s *jsonScanner) ws() {
	for s.i < len(s.b) {
		switch s.b[s.i] {
		case ' ', '\t', '\n', '\r':
			s.i++
		default:
			return
		}
	}
}

func (s *jsonScanner) value() bool {
	if s.i >= len(s.b) {
		return false
	}
	switch c := s.b[s.i]; c {
	case '{':
		return s.object()
	case '[':
		return s.array()
	case '"':
		_, ok := s.str()
		return ok
	case 't':
		return s.lit("true")
	case 'f':
		return s.lit("false")
	case 'n':
		return s.lit("null")
	default:
		if c == '-' || (c >= '0' && c <= '9') {
			end, ok := scanNumber(s.b, s.i)
			s.i = end
			return ok
		}
		return false
	}
}

func (s *jsonScanner) lit(want string) bool {
	if len(s.b)-s.i < len(want) || string(s.b[s.i:s.i+len(want)]) != want {
		return false
	}
	s.i += len(want)
	return true
}

// str scans a string at s.i (which holds '"'). escaped reports whether it
// held a backslash.
func (s *jsonScanner) str() (escaped, ok bool) {
	s.i++
	for s.i < len(s.b) {
		c := s.b[s.i]
		switch {
		case c == '"':
			s.i++
			return escaped, true
		case c == '\\':
			escaped = true
			s.i++
			if s.i >= len(s.b) {
				return false, false
			}
			switch s.b[s.i] {
			case '"', '\\', '/', 'b', 'f', 'n', 'r', 't':
				s.i++
			case 'u':
				if len(s.b)-s.i < 5 {
					return false, false
				}
				for _, h := range s.b[s.i+1 : s.i+5] {
					if !isHex(h) {
						return false, false
					}
				}
				s.i += 5
			default:
				return false, false
			}
		case c < 0x20:
			return false, false
		default:
			s.i++
		}
	}
	return false, false
}

func isHex(c byte) bool {
	return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F')
}

func (s *jsonScanner) push() bool {
	s.depth++
	return s.depth <= s.maxDepth
}

func (s *jsonScanner) object() bool {
	if !s.push() {
		return false
	}
	top := s.depth == 1
	s.i++ // {
	s.ws()
	if s.i < len(s.b) && s.b[s.i] == '}' {
		s.i++
		s.depth--
		return true
	}
	for {
		if s.i >= len(s.b) || s.b[s.i] != '"' {
			return false
		}
		keyStart := s.i
		if _, ok := s.str(); !ok {
			return false
		}
		isTrace := top && s.wantTrace && string(s.b[keyStart:s.i]) == `"traceparent"`
		s.ws()
		if s.i >= len(s.b) || s.b[s.i] != ':' {
			return false
		}
		s.i++
		s.ws()
		valStart := s.i
		if !s.value() {
			return false
		}
		if isTrace {
			// The last member wins, as with encoding/json; a value that is
			// not a plain string carries no traceparent.
			s.trace = nil
			if v := s.b[valStart:s.i]; len(v) >= 2 && v[0] == '"' && bytes.IndexByte(v, '\\') < 0 {
				s.trace = v[1 : len(v)-1]
			}
		}
		s.ws()
		if s.i >= len(s.b) {
			return false
		}
		switch s.b[s.i] {
		case ',':
			s.i++
			s.ws()
		case '}':
			s.i++
			s.depth--
			return true
		default:
			return false
		}
	}
}

func (s *jsonScanner) array() bool {
	if !s.push() {
		return false
	}
	s.i++ // [
	s.ws()
	if s.i < len(s.b) && s.b[s.i] == ']' {
		s.i++
		s.depth--
		return true
	}
	for {
		if !s.value() {
			return false
		}
		s.ws()
		if s.i >= len(s.b) {
			return false
		}
		switch s.b[s.i] {
		case ',':
			s.i++
			s.ws()
		case ']':
			s.i++
			s.depth--
			return true
		default:
			return false
		}
	}
}

// scanNumber scans a JSON number starting at b[i] and returns where it ends.
func scanNumber(b []byte, i int) (end int, ok bool) {
	if i < len(b) && b[i] == '-' {
		i++
	}
	if i >= len(b) {
		return i, false
	}
	switch c := b[i]; {
	case c == '0':
		i++
	case c >= '1' && c <= '9':
		i++
		for i < len(b) && b[i] >= '0' && b[i] <= '9' {
			i++
		}
	default:
		return i, false
	}
	if i < len(b) && b[i] == '.' {
		i++
		if i >= len(b) || b[i] < '0' || b[i] > '9' {
			return i, false
		}
		for i < len(b) && b[i] >= '0' && b[i] <= '9' {
			i++
		}
	}
	if i < len(b) && (b[i] == 'e' || b[i] == 'E') {
		i++
		if i < len(b) && (b[i] == '+' || b[i] == '-') {
			i++
		}
		if i >= len(b) || b[i] < '0' || b[i] > '9' {
			return i, false
		}
		for i < len(b) && b[i] >= '0' && b[i] <= '9' {
			i++
		}
	}
	return i, true
}

// isJSONNumber reports whether b is exactly one JSON number. Postgres prints
// NaN and infinities of numeric and float types as words, which are not.
func isJSONNumber(b []byte) bool {
	end, ok := scanNumber(b, 0)
	return ok && end == len(b)
}
