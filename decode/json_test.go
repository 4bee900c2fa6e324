package decode

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/stretchr/testify/require"
)

var jsonSamples = []string{
	``, ` `, `{}`, `[]`, `""`, `0`, `-0`, `1.5e+10`, `-1E-2`, `true`, `false`, `null`,
	` {"a" : [1, 2, {"b": null}], "c": "\u00e9\n\"\\\/\b\f\r\t"} `,
	`{"a":1,}`, `[1,]`, `[,1]`, `{"a"}`, `{"a":}`, `{1:2}`, `{"a":1 "b":2}`, `[1 2]`,
	`01`, `1.`, `.5`, `-`, `1e`, `1e+`, `+1`, `0x10`, `NaN`, `Infinity`, `tru`, `nul`, `True`,
	`"\x"`, `"\u12"`, `"\u12G4"`, `"a` + "\x01" + `"`, `"a` + "\x7f" + `"`, "\"\xff\"", `"`, `"\`,
	`{} {}`, `[] x`, "\t[\r\n]\n", "\u00a0[]", `[[[]]]`, `[[[]]`, `{"a":{"b":{"c":[]}}}`,
	strings.Repeat("[", maxJSONDepth) + strings.Repeat("]", maxJSONDepth),
	strings.Repeat("[", maxJSONDepth+1) + strings.Repeat("]", maxJSONDepth+1),
	strings.Repeat(`{"a":`, maxJSONDepth) + "1" + strings.Repeat("}", maxJSONDepth),
	strings.Repeat(`{"a":`, maxJSONDepth+1) + "1" + strings.Repeat("}", maxJSONDepth+1),
}

func TestScanJSONMatchesEncodingJSON(t *testing.T) {
	t.Parallel()
	for _, s := range jsonSamples {
		ok, _ := scanJSON([]byte(s), maxJSONDepth, false)
		require.Equal(t, json.Valid([]byte(s)), ok, "%.80q", s)
	}
}

func TestAppendString(t *testing.T) {
	t.Parallel()
	check := func(s string) {
		got := appendString([]byte("x"), []byte(s))
		require.Equal(t, byte('x'), got[0])
		got = got[1:]
		require.True(t, json.Valid(got), "%q -> %s", s, got)
		require.True(t, utf8.Valid(got), "%q -> %q", s, got)
		var back string
		require.NoError(t, json.Unmarshal(got, &back))
		require.Equal(t, string([]rune(s)), back, "%q", s)
	}
	for c := 0; c < 256; c++ {
		check(string([]byte{byte(c)}))
		check("a" + string([]byte{byte(c)}) + "b")
	}
	for _, s := range []string{"", "plain", "\u2028\u2029", "😀", "\xf0\x9f\x98", "\xed\xa0\x80", "é\xffé"} {
		check(s)
	}
	require.Equal(t, `"\"\\\n\r\t\b\f\u0000\u001f`+"\x7f"+`"`, string(appendString(nil, []byte("\"\\\n\r\t\b\f\x00\x1f\x7f"))))
}

func TestAppendRawJSON(t *testing.T) {
	t.Parallel()
	require.Equal(t, `{"a": "x"}`, string(appendRawJSON(nil, []byte(`{"a": "x"}`))))
	require.Equal(t, "{\"a\": \"x\ufffd\ufffdy\"}", string(appendRawJSON(nil, []byte("{\"a\": \"x\xff\xfey\"}"))))
}

func TestIsJSONNumber(t *testing.T) {
	t.Parallel()
	for s, want := range map[string]bool{
		"0": true, "-0": true, "12": true, "1.5": true, "1e+100": true, "1E5": true, "-1.5e-07": true,
		"": false, "-": false, "01": false, "1.": false, ".5": false, "+1": false, "1e": false,
		"NaN": false, "Infinity": false, "-Infinity": false, "1 ": false, " 1": false, "1_000": false,
	} {
		require.Equal(t, want, isJSONNumber([]byte(s)), "%q", s)
	}
}

// FuzzJSON checks the JSON helpers against encoding/json.
func FuzzJSON(f *testing.F) {
	for _, s := range jsonSamples {
		if len(s) < 200 {
			f.Add([]byte(s))
		}
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		ok, trace := scanJSON(b, maxJSONDepth, true)
		if trace != nil && !bytes.Contains(b, trace) {
			t.Fatalf("trace %q not in %q", trace, b)
		}
		if ok != json.Valid(b) {
			t.Fatalf("scanJSON(%q) = %v, json.Valid = %v", b, ok, !ok)
		}
		if ok {
			raw := appendRawJSON(nil, b)
			if !json.Valid(raw) || !utf8.Valid(raw) {
				t.Fatalf("appendRawJSON(%q) = %q", b, raw)
			}
		}
		s := appendString(nil, b)
		if !json.Valid(s) || !utf8.Valid(s) {
			t.Fatalf("appendString(%q) = %q", b, s)
		}
		var back string
		if err := json.Unmarshal(s, &back); err != nil || back != string([]rune(string(b))) {
			t.Fatalf("appendString(%q) round trip %q, %v", b, back, err)
		}
		if isJSONNumber(b) {
			var n json.Number
			if err := json.Unmarshal(b, &n); err != nil {
				t.Fatalf("isJSONNumber(%q) but %v", b, err)
			}
		}
		if tm, ok := parseTimestamp(b); ok {
			out := appendTimestamp(nil, tm)
			if len(out) != 29 || !json.Valid(out) {
				t.Fatalf("timestamp %q -> %q", b, out)
			}
		}
	})
}
