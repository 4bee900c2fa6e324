package main

import (
	"bytes"
	"errors"
	"maps"
	"os"
	"slices"
	"strings"

	"github.com/outboxd/outboxd/deliver"
	"github.com/outboxd/outboxd/sink"
)

// Property filters and masking of the process's own destinations (README.md,
// "Filters and masking"): OUTBOXD_<KIND>_FILTER, an expr-lang expression on
// the envelope, and OUTBOXD_<KIND>_MASK, rules ACTION:properties.PATH, for
// every kind, the webhook included. With OUTBOXD_SINKS each destination reads
// its kind's; with OUTBOXD_SINK the one destination reads the variables of
// the kind it names. The hash rules' HMAC key is OUTBOXD_MASK_HASH_KEY or
// the file OUTBOXD_MASK_HASH_KEY_FILE names; it never appears in a log, an
// error or the effective configuration.

const (
	maskKeyVar     = "MASK_HASH_KEY"
	maskKeyFileVar = "MASK_HASH_KEY_FILE"
	// minMaskKey is the shortest hash key accepted: a short key can be
	// found by trying, and then the hashes reversed by trying values.
	minMaskKey = 16
)

// filterSuffixes are the per-destination filter and mask variables.
var filterSuffixes = []string{"FILTER", "MASK"}

// filterMaskVars lists the filter and mask variables of every kind and the
// hash key's.
func filterMaskVars() []string {
	names := []string{envPrefix + maskKeyVar, envPrefix + maskKeyFileVar}
	for _, kind := range append(slices.Collect(maps.Keys(sinkEnvs)), "webhook") {
		for _, s := range filterSuffixes {
			names = append(names, envPrefix+strings.ToUpper(kind)+"_"+s)
		}
	}
	slices.Sort(names)
	return names
}

// filterMask reads the filter and the mask of kind's destination; errors
// name the variable.
func filterMask(envMap map[string]string, kind string) (*deliver.Filter, *sink.Mask, error) {
	p := strings.ToUpper(kind) + "_"
	f, err := deliver.CompileFilter(envMap[envPrefix+p+"FILTER"])
	if err != nil {
		return nil, nil, badVar(p+"FILTER", "%v", err)
	}
	spec := envMap[envPrefix+p+"MASK"]
	var key []byte
	if strings.TrimSpace(spec) != "" {
		if key, err = maskKey(envMap); err != nil {
			return nil, nil, err
		}
	}
	m, err := sink.ParseMask(spec, key)
	if errors.Is(err, sink.ErrMaskNoKey) {
		return nil, nil, badVar(p+"MASK", "%v: set %s%s or %s%s (at least %d bytes)", err, envPrefix, maskKeyVar, envPrefix, maskKeyFileVar, minMaskKey)
	}
	if err != nil {
		return nil, nil, badVar(p+"MASK", "%v", err)
	}
	return f, m, nil
}

// maskKey reads the hash key (nil when neither variable is set). Errors name
// the variable, never the key.
func maskKey(envMap map[string]string) ([]byte, error) {
	val, file := envMap[envPrefix+maskKeyVar], strings.TrimSpace(envMap[envPrefix+maskKeyFileVar])
	var key []byte
	switch {
	case val != "" && file != "":
		return nil, badVar(maskKeyVar, "both it and %s%s are set: set one", envPrefix, maskKeyFileVar)
	case val != "":
		key = []byte(val)
	case file != "":
		b, err := os.ReadFile(file)
		if err != nil {
			return nil, badVar(maskKeyFileVar, "read the key file: %v", err)
		}
		key = bytes.TrimRight(b, "\r\n")
		if len(key) < minMaskKey {
			return nil, badVar(maskKeyFileVar, "the key in %s is %d bytes, fewer than %d", file, len(key), minMaskKey)
		}
		return key, nil
	default:
		return nil, nil
	}
	if len(key) < minMaskKey {
		return nil, badVar(maskKeyVar, "the key is %d bytes, fewer than %d", len(key), minMaskKey)
	}
	return key, nil
}

// defaultFilterMask reads the filter and mask of OUTBOXD_SINK's one
// destination (its kind's variables), and refuses those of another kind:
// they would be silently unused.
func (c config) defaultFilterMask(envMap map[string]string) (*deliver.Filter, *sink.Mask, error) {
	own := strings.ToUpper(c.Sink) + "_"
	for _, name := range filterMaskVars() {
		short := strings.TrimPrefix(name, envPrefix)
		if short == maskKeyVar || short == maskKeyFileVar || strings.HasPrefix(short, own) {
			continue
		}
		if strings.TrimSpace(envMap[name]) != "" {
			return nil, nil, configError{name + ": " + envPrefix + "SINK=" + c.Sink + " delivers to a " + c.Sink +
				" destination only; its filter and mask are " + envPrefix + own + "FILTER and " + envPrefix + own + "MASK"}
		}
	}
	return filterMask(envMap, c.Sink)
}
