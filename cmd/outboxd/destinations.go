package main

import (
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/rs/zerolog"

	"github.com/outboxd/outboxd/deliver"
)

// Several destinations in one process (OUTBOXD_SINKS, README.md
// "Destinations"): each is a target of its own, named after its kind, with
// its kind's settings, its own event filter and its own dispatcher
// settings. OUTBOXD_SINK stays one destination named deliver.DefaultTarget
// ("webhook") whatever its kind, so that an upgrade finds its parked rows
// and dead letters.

// destSuffixes are the per-destination settings of a kind other than the
// webhook (OUTBOXD_<KIND>_<SUFFIX>); the webhook's are the OUTBOXD_WEBHOOK_*
// variables of config, which are also the defaults of the others'.
var destSuffixes = []string{"EVENTS", "CONCURRENCY", "BATCH_SIZE", "BATCH_WAIT", "CONTRACT"}

// destVars lists the per-destination variables of every kind but the
// webhook.
func destVars() []string {
	var names []string
	for kind := range sinkEnvs {
		for _, s := range destSuffixes {
			names = append(names, envPrefix+strings.ToUpper(kind)+"_"+s)
		}
	}
	slices.Sort(names)
	return names
}

// sinkKinds returns the sink kinds this configuration delivers to, and
// whether OUTBOXD_SINKS named them (several destinations, each its own
// target named after its kind) rather than OUTBOXD_SINK (one, named
// deliver.DefaultTarget).
func (c config) sinkKinds() ([]string, bool, error) {
	if strings.TrimSpace(c.Sinks) == "" {
		if c.Sink != "webhook" && !knownSink(c.Sink) {
			return nil, false, badVar("SINK", "unknown sink %q", c.Sink)
		}
		return []string{c.Sink}, false, nil
	}
	var kinds []string
	for raw := range strings.SplitSeq(c.Sinks, ",") {
		kind := strings.ToLower(strings.TrimSpace(raw))
		switch {
		case kind == "":
			return nil, false, badVar("SINKS", "%q has an empty entry: a comma-separated list of webhook, stdout, kafka, nats, posthog, ga4", c.Sinks)
		case kind != "webhook" && !knownSink(kind):
			return nil, false, badVar("SINKS", "unknown sink %q (want webhook, stdout, kafka, nats, posthog or ga4)", kind)
		case slices.Contains(kinds, kind):
			return nil, false, badVar("SINKS", "%q is listed twice: each kind is one destination", kind)
		}
		kinds = append(kinds, kind)
	}
	return kinds, true, nil
}

// usesWebhook reports whether the default webhook (OUTBOXD_WEBHOOK_URL) is
// a destination; false for a configuration sinkKinds refuses.
func (c config) usesWebhook() bool {
	kinds, _, err := c.sinkKinds()
	return err == nil && slices.Contains(kinds, "webhook")
}

// targetNames returns the names of this configuration's own targets (the
// subscriptions' come on top).
func (c config) targetNames() []string {
	kinds, multi, err := c.sinkKinds()
	if err != nil || !multi {
		return []string{deliver.DefaultTarget}
	}
	return kinds
}

// checkBothSinks refuses OUTBOXD_SINK and OUTBOXD_SINKS set together: which
// one wins would be a guess.
func checkBothSinks(environ map[string]string) error {
	if strings.TrimSpace(environ[envPrefix+"SINK"]) != "" && strings.TrimSpace(environ[envPrefix+"SINKS"]) != "" {
		return configError{envPrefix + "SINK and " + envPrefix + "SINKS: both are set; set " + envPrefix +
			"SINKS alone for several destinations (it may list a single kind too), or " + envPrefix + "SINK alone for one"}
	}
	return nil
}

// destinationSpec is one destination of OUTBOXD_SINKS before its sink is
// built.
type destinationSpec struct {
	kind string
	deliver.Destination
}

// destinations reads the per-destination settings of OUTBOXD_SINKS from
// envMap; they default to the OUTBOXD_WEBHOOK_* values, so that a
// destination tuned like the webhook needs no variable of its own. With
// OUTBOXD_SINK it returns nil, and refuses a per-destination variable of
// another kind: it would be silently unused (OUTBOXD_WEBHOOK_EVENTS and
// the OUTBOXD_WEBHOOK_* dispatcher settings apply to that one sink, as
// before).
func (c config) destinations(envMap map[string]string) ([]destinationSpec, error) {
	kinds, multi, err := c.sinkKinds()
	if err != nil {
		return nil, err
	}
	if !multi {
		for _, name := range destVars() {
			if strings.TrimSpace(envMap[name]) != "" {
				return nil, configError{name + ": applies only to a destination of " + envPrefix + "SINKS; with " + envPrefix +
					"SINK the " + envPrefix + "WEBHOOK_* settings (" + envPrefix + "WEBHOOK_EVENTS, _CONCURRENCY, _BATCH_SIZE, _BATCH_WAIT) apply to its one sink"}
			}
		}
		return nil, nil
	}
	var out []destinationSpec
	for _, kind := range kinds {
		d := destinationSpec{kind: kind, Destination: deliver.Destination{Name: kind,
			Concurrency: c.WebhookConcurrency, BatchSize: c.WebhookBatchSize, BatchWait: c.WebhookBatchWait}}
		eventsVar := "WEBHOOK_EVENTS"
		if kind != "webhook" {
			p := strings.ToUpper(kind) + "_"
			eventsVar = p + "EVENTS"
			if err := intVar(envMap, p+"CONCURRENCY", &d.Concurrency); err != nil {
				return nil, err
			}
			if err := intVar(envMap, p+"BATCH_SIZE", &d.BatchSize); err != nil {
				return nil, err
			}
			if v := strings.TrimSpace(envMap[envPrefix+p+"BATCH_WAIT"]); v != "" {
				if d.BatchWait, err = time.ParseDuration(v); err != nil {
					return nil, badVar(p+"BATCH_WAIT", "invalid duration %q", v)
				}
			}
			if err := positive(d.Concurrency); err != nil {
				return nil, badVar(p+"CONCURRENCY", "%v", err)
			}
			if err := positive(d.BatchSize); err != nil {
				return nil, badVar(p+"BATCH_SIZE", "%v", err)
			}
			if err := nonNegativeDur(d.BatchWait); err != nil {
				return nil, badVar(p+"BATCH_WAIT", "%v", err)
			}
		}
		if d.Events, err = deliver.ParseGlobs(envMap[envPrefix+eventsVar]); err != nil {
			return nil, badVar(eventsVar, "%v", err)
		}
		if d.Filter, d.Mask, err = filterMask(envMap, kind); err != nil {
			return nil, err
		}
		dc := deliver.Config{Concurrency: d.Concurrency, BatchSize: d.BatchSize, BatchWait: d.BatchWait, MaxInFlight: c.MaxInFlight}
		if err := dc.WithDefaults().Validate(); err != nil {
			return nil, badVar(strings.ToUpper(kind)+"_CONCURRENCY", "%v", err)
		}
		out = append(out, d)
	}
	return out, nil
}

func intVar(envMap map[string]string, name string, dst *int) error {
	v := strings.TrimSpace(envMap[envPrefix+name])
	if v == "" {
		return nil
	}
	n, err := strconv.Atoi(v)
	if err != nil {
		return badVar(name, "invalid integer %q", v)
	}
	*dst = n
	return nil
}

// buildDestinations builds the sink of each destination but the webhook
// (the pipeline builds that one from its settings); close closes them.
func buildDestinations(specs []destinationSpec, envMap map[string]string, log zerolog.Logger) (dests []deliver.Destination, closeAll func(), err error) {
	var built []closableSink
	closeAll = func() {
		for _, s := range slices.Backward(built) {
			s.Close()
		}
	}
	for _, d := range specs {
		if d.kind != "webhook" {
			s, err := buildSink(d.kind, envMap, log.With().Str("target", d.Name).Logger())
			if err != nil {
				closeAll()
				return nil, func() {}, err
			}
			built = append(built, s)
			d.Sink = s
		}
		dests = append(dests, d.Destination)
	}
	return dests, closeAll, nil
}
