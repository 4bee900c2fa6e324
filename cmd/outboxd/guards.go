package main

import (
	"encoding/json"
	"net/http"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/outboxd/outboxd/deliver"
	"github.com/outboxd/outboxd/ops"
	"github.com/outboxd/outboxd/pipeline"
	"github.com/outboxd/outboxd/sink"
)

// Per-destination headers, rate limit and circuit breaker (README.md,
// "Headers, rate limits and circuit breakers"): OUTBOXD_<KIND>_HEADERS,
// _RATE_LIMIT, _RATE_BURST, _BREAKER_FAILURES and _BREAKER_COOLDOWN, for the
// destination of that kind; the breaker's two default to the global
// OUTBOXD_BREAKER_FAILURES and OUTBOXD_BREAKER_COOLDOWN. With OUTBOXD_SINK,
// the variables of its kind apply to its one destination.

// guardSuffixes are the per-destination guard settings of every kind.
var guardSuffixes = []string{"RATE_LIMIT", "RATE_BURST", "BREAKER_FAILURES", "BREAKER_COOLDOWN"}

// headerKinds are the kinds with OUTBOXD_<KIND>_HEADERS: the HTTP sinks.
var headerKinds = []string{"webhook", "posthog", "ga4"}

// Global defaults of the breaker settings.
const (
	breakerFailuresVar = "BREAKER_FAILURES"
	breakerCooldownVar = "BREAKER_COOLDOWN"
)

// reservedHeaders are the headers the sinks set themselves (or net/http
// does): a destination's headers cannot replace them.
var reservedHeaders = []string{
	"content-type", "content-length", "content-encoding", "transfer-encoding", "connection", "host", "user-agent",
	"webhook-id", "webhook-timestamp", "webhook-signature", "webhook-replay", "traceparent", "tracestate",
}

// guardKinds returns every kind, webhook included.
func guardKinds() []string {
	kinds := []string{"webhook"}
	for kind := range sinkEnvs {
		kinds = append(kinds, kind)
	}
	slices.Sort(kinds)
	return kinds
}

// guardVars lists the guard variables (prefixed), sorted.
func guardVars() []string {
	names := []string{envPrefix + breakerFailuresVar, envPrefix + breakerCooldownVar}
	for _, kind := range guardKinds() {
		for _, s := range guardSuffixes {
			names = append(names, envPrefix+strings.ToUpper(kind)+"_"+s)
		}
	}
	for _, kind := range headerKinds {
		names = append(names, envPrefix+strings.ToUpper(kind)+"_HEADERS")
	}
	slices.Sort(names)
	return names
}

// guards builds the guard of each of this configuration's own targets,
// keyed by target name. A guard variable of a kind that is not a destination
// is refused: it would be silently unused (a token meant for a sink that
// never sends it). Errors name the variable and never a header value.
func (c config) guards(envMap map[string]string) (map[string]*deliver.Guard, error) {
	kinds, multi, err := c.sinkKinds()
	if err != nil {
		return nil, err
	}
	for _, name := range guardVars() {
		if strings.TrimSpace(envMap[name]) == "" || name == envPrefix+breakerFailuresVar || name == envPrefix+breakerCooldownVar {
			continue
		}
		if !slices.ContainsFunc(kinds, func(k string) bool { return strings.HasPrefix(name, envPrefix+strings.ToUpper(k)+"_") }) {
			return nil, configError{name + ": no destination of that kind (" + envPrefix + "SINK/" + envPrefix + "SINKS: " +
				strings.Join(kinds, ",") + ")"}
		}
	}
	out := map[string]*deliver.Guard{}
	for _, kind := range kinds {
		gc, err := guardConfig(kind, envMap)
		if err != nil {
			return nil, err
		}
		target := deliver.DefaultTarget
		if multi {
			target = kind
		}
		out[target] = deliver.NewGuard(target, gc)
	}
	return out, nil
}

// guardConfig reads the guard settings of the destination of kind.
func guardConfig(kind string, envMap map[string]string) (deliver.GuardConfig, error) {
	p := strings.ToUpper(kind) + "_"
	var gc deliver.GuardConfig
	if v := strings.TrimSpace(envMap[envPrefix+p+"RATE_LIMIT"]); v != "" {
		f, err := strconv.ParseFloat(v, 64)
		if err != nil || f < 0 || f != f || f > 1e9 {
			return gc, badVar(p+"RATE_LIMIT", "%q is not a rate in events per second (0: no limit)", v)
		}
		gc.RateLimit = f
	}
	if err := intVar(envMap, p+"RATE_BURST", &gc.RateBurst); err != nil {
		return gc, err
	}
	if gc.RateBurst < 0 {
		return gc, badVar(p+"RATE_BURST", "must not be negative, got %d", gc.RateBurst)
	}
	if gc.RateBurst > 0 && gc.RateLimit == 0 {
		return gc, badVar(p+"RATE_BURST", "set without %s%sRATE_LIMIT", envPrefix, p)
	}
	for _, name := range []string{breakerFailuresVar, p + breakerFailuresVar} {
		if err := intVar(envMap, name, &gc.BreakerFailures); err != nil {
			return gc, err
		}
		if gc.BreakerFailures < 0 {
			return gc, badVar(name, "must not be negative, got %d (0: no breaker)", gc.BreakerFailures)
		}
	}
	for _, name := range []string{breakerCooldownVar, p + breakerCooldownVar} {
		if v := strings.TrimSpace(envMap[envPrefix+name]); v != "" {
			d, err := time.ParseDuration(v)
			if err != nil || d <= 0 {
				return gc, badVar(name, "%q is not a positive duration", v)
			}
			gc.BreakerCooldown = d
		}
	}
	if slices.Contains(headerKinds, kind) {
		var err error
		if gc.Headers, err = parseHeaders(p+"HEADERS", envMap[envPrefix+p+"HEADERS"]); err != nil {
			return gc, err
		}
	}
	return gc.WithDefaults(), nil
}

// parseHeaders parses OUTBOXD_<KIND>_HEADERS: "Name: value" entries
// separated by newlines or ";". A value "@/path" is the content of that file
// (trailing newline dropped), so that a token can stay in a secret file.
// Errors name the variable and the header, never a value.
func parseHeaders(varName, raw string) ([]sink.ExtraHeader, error) {
	var out []sink.ExtraHeader
	seen := map[string]bool{}
	for entry := range strings.FieldsFuncSeq(raw, func(r rune) bool { return r == '\n' || r == ';' }) {
		entry = strings.TrimSpace(entry)
		if entry == "" {
			continue
		}
		name, value, ok := strings.Cut(entry, ":")
		name, value = strings.TrimSpace(name), strings.TrimSpace(value)
		if !ok || !validHeaderName(name) {
			return nil, badVar(varName, "entry %d is not \"Name: value\" with a valid header name", len(out)+1)
		}
		lower := strings.ToLower(name)
		if slices.Contains(reservedHeaders, lower) {
			return nil, badVar(varName, "header %s is set by outboxd itself and cannot be replaced (reserved: %s)", name, strings.Join(reservedHeaders, ", "))
		}
		if seen[lower] {
			return nil, badVar(varName, "header %s is given twice", name)
		}
		seen[lower] = true
		if path, ok := strings.CutPrefix(value, "@"); ok {
			data, err := os.ReadFile(path)
			if err != nil {
				return nil, badVar(varName, "header %s: cannot read its value file %s: %v", name, path, pathErr(err))
			}
			value = strings.TrimRight(string(data), "\r\n")
		}
		if value == "" {
			return nil, badVar(varName, "header %s has an empty value", name)
		}
		if strings.ContainsAny(value, "\r\n\x00") {
			return nil, badVar(varName, "header %s: its value contains CR, LF or NUL", name)
		}
		out = append(out, sink.ExtraHeader{Key: name, Value: value})
	}
	return out, nil
}

// pathErr is the reason of a file error without its path (given already).
func pathErr(err error) error {
	if pe, ok := err.(*os.PathError); ok {
		return pe.Err
	}
	return err
}

// validHeaderName reports whether s is an RFC 9110 token.
func validHeaderName(s string) bool {
	if s == "" {
		return false
	}
	for _, c := range s {
		if c >= 0x80 || !strings.ContainsRune("!#$%&'*+-.^_`|~", c) &&
			!('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9') {
			return false
		}
	}
	return true
}

// status.

// pipelineGuards returns the guards of pc's targets, sorted by target.
func pipelineGuards(pc pipeline.Config) []*deliver.Guard {
	var out []*deliver.Guard
	if pc.DefaultGuard != nil && len(pc.Destinations) == 0 {
		out = append(out, pc.DefaultGuard)
	}
	for _, d := range pc.Destinations {
		if d.Guard != nil {
			out = append(out, d.Guard)
		}
	}
	slices.SortFunc(out, func(a, b *deliver.Guard) int { return strings.Compare(a.Target(), b.Target()) })
	return out
}

// guardsHandler serves GET /health/destinations, the live state of each
// destination's breaker and rate limit (never a header value), on top of h.
// `outboxd status` reads the database only; this is the daemon's own view.
func guardsHandler(h http.Handler, guards []*deliver.Guard) http.Handler {
	mux := http.NewServeMux()
	mux.Handle("/", h)
	mux.HandleFunc("GET /health/destinations", func(w http.ResponseWriter, _ *http.Request) {
		out := struct {
			Destinations []deliver.GuardStatus `json:"destinations"`
		}{Destinations: []deliver.GuardStatus{}}
		for _, g := range guards {
			out.Destinations = append(out.Destinations, g.Status())
		}
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Cache-Control", "no-store")
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		_ = enc.Encode(out) // the client may be gone
	})
	return mux
}

// redactHeaders shows an OUTBOXD_<KIND>_HEADERS value with each header's
// value redacted, a value file's path excepted (status's configuration).
func redactHeaders(raw string) string {
	var out []string
	for entry := range strings.FieldsFuncSeq(raw, func(r rune) bool { return r == '\n' || r == ';' }) {
		name, value, _ := strings.Cut(strings.TrimSpace(entry), ":")
		if name = strings.TrimSpace(name); name == "" {
			continue
		}
		if value = strings.TrimSpace(value); !strings.HasPrefix(value, "@") {
			value = ops.Redacted
		}
		out = append(out, name+": "+value)
	}
	return strings.Join(out, "; ")
}
