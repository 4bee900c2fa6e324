package main

import (
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"

	"github.com/rs/zerolog"

	"github.com/outboxd/outboxd/deliver"
	"github.com/outboxd/outboxd/sink"
)

// subscriptionSecretPrefix starts the variables a subscription row may
// reference a secret by (PROJECT_API_KEY_ENV=OUTBOXD_SECRET_TENANT_7): a
// row can never make the daemon send another of its variables (its
// database password, the default webhook's secret) anywhere.
const subscriptionSecretPrefix = envPrefix + "SECRET_"

// subscriptionKindSettings are, per kind, the settings a subscription row
// may give (the kind's variable suffixes, OUTBOXD_<KIND>_<KEY>) and the
// secrets it gives by reference (<KEY>_ENV or <KEY>_FILE). What a row does
// not give takes the daemon's OUTBOXD_<KIND>_* value, secrets excepted:
// a subscription never uses the daemon's own credentials with an address
// it names. Kafka and NATS subscriptions use the daemon's connection
// (brokers, URL, TLS, credentials) and choose only where the events go.
var subscriptionKindSettings = map[string]struct{ plain, secret []string }{
	"posthog": {plain: []string{"HOST", "PERSON_PROPERTIES", "GROUP_PROPERTIES", "GROUP_IDENTIFY"}, secret: []string{"PROJECT_API_KEY"}},
	"ga4":     {plain: []string{"MEASUREMENT_ID", "ENDPOINT", "CLIENT_ID_PROPERTY"}, secret: []string{"API_SECRET", "CLIENT_ID_KEY"}},
	"kafka":   {plain: []string{"TOPIC"}},
	"nats":    {plain: []string{"SUBJECT", "STREAM"}},
}

// inheritsConnection are the kinds whose subscriptions use the daemon's
// connection settings.
var inheritsConnection = map[string]bool{"kafka": true, "nats": true}

var secretFileName = regexp.MustCompile(`^[A-Za-z0-9_][A-Za-z0-9._-]*$`)

// checkSubscriptionSettings checks a subscription's kind and settings as
// `subscription add` takes them; the daemon checks them again (a row
// written by SQL).
func checkSubscriptionSettings(kind string, settings map[string]string) error {
	spec, ok := subscriptionKindSettings[kind]
	if !ok {
		return fmt.Errorf("kind %q: want webhook, posthog, ga4, kafka or nats", kind)
	}
	for _, k := range slices.Sorted(maps.Keys(settings)) {
		base, ref := k, ""
		for _, suffix := range []string{"_ENV", "_FILE"} {
			if b, found := strings.CutSuffix(k, suffix); found && slices.Contains(spec.secret, b) {
				base, ref = b, suffix
			}
		}
		switch {
		case ref == "_ENV":
			if !strings.HasPrefix(settings[k], subscriptionSecretPrefix) || len(settings[k]) == len(subscriptionSecretPrefix) {
				return fmt.Errorf("setting %s: name a variable %s<NAME> (a subscription references only those)", k, subscriptionSecretPrefix)
			}
		case ref == "_FILE":
			if !secretFileName.MatchString(settings[k]) {
				return fmt.Errorf("setting %s: name a file of %sSECRETS_DIR (a name, not a path)", k, envPrefix)
			}
		case slices.Contains(spec.secret, base):
			return fmt.Errorf("setting %s is a secret: give %s_ENV (a variable %s<NAME>) or %s_FILE (a file of %sSECRETS_DIR), never its value", k, k, subscriptionSecretPrefix, k, envPrefix)
		case !slices.Contains(spec.plain, k):
			var all []string
			all = append(all, spec.plain...)
			for _, s := range spec.secret {
				all = append(all, s+"_ENV", s+"_FILE")
			}
			return fmt.Errorf("setting %s is not one of a %s subscription's (%s)", k, kind, strings.Join(all, ", "))
		}
	}
	return nil
}

// subscriptionSinkOf returns the builder of the sinks of subscriptions of
// other kinds than webhook: the kind's sink, from the daemon's variables of
// that kind (no secret among them; the connection only for Kafka and NATS)
// overlaid with the row's settings, its secrets read from the references.
// The address guard of posthog and ga4 subscriptions is the subscriptions'
// (OUTBOXD_ALLOW_PRIVATE_SUBSCRIPTIONS), never the default sinks'.
func (c config) subscriptionSinkOf(envMap map[string]string, log zerolog.Logger) func(deliver.Subscription) (sink.Sink, error) {
	return func(sub deliver.Subscription) (sink.Sink, error) {
		kind := sub.Kind
		if err := checkSubscriptionSettings(kind, sub.Settings); err != nil {
			return nil, err
		}
		spec := subscriptionKindSettings[kind]
		kindPrefix := envPrefix + strings.ToUpper(kind) + "_"
		m := map[string]string{}
		for k, v := range envMap {
			key, ok := strings.CutPrefix(k, kindPrefix)
			if !ok {
				continue
			}
			if inheritsConnection[kind] || slices.Contains([]string{"TIMEOUT", "MAX_ATTEMPTS", "BACKOFF_MAX"}, key) {
				// Kafka and NATS: the daemon's connection, its
				// credentials included, to the daemon's brokers or server;
				// PostHog and GA4: the daemon's timeouts only.
				m[k] = v
			}
		}
		if v, ok := envMap[envPrefix+"ORDERING_KEY"]; ok && inheritsConnection[kind] {
			m[envPrefix+"ORDERING_KEY"] = v
		}
		m[envPrefix+"ALLOW_PRIVATE_SINKS"] = strconv.FormatBool(c.AllowPrivateSubscriptions)
		for k, v := range sub.Settings {
			name, ref := k, ""
			for _, suffix := range []string{"_ENV", "_FILE"} {
				if b, found := strings.CutSuffix(k, suffix); found && slices.Contains(spec.secret, b) {
					name, ref = b, suffix
				}
			}
			switch ref {
			case "_ENV":
				val, ok := envMap[v]
				if !ok || strings.TrimSpace(val) == "" {
					return nil, fmt.Errorf("setting %s: %s is not set in outboxd's environment", k, v)
				}
				v = strings.TrimSpace(val)
			case "_FILE":
				if c.SecretsDir == "" {
					return nil, fmt.Errorf("setting %s: %sSECRETS_DIR is not set", k, envPrefix)
				}
				b, err := os.ReadFile(filepath.Join(c.SecretsDir, v))
				if err != nil {
					return nil, fmt.Errorf("setting %s: read %s of %sSECRETS_DIR: %w", k, v, envPrefix, pathErr(err))
				}
				v = strings.TrimSpace(string(b))
			}
			m[kindPrefix+name] = v
		}
		s, err := buildSink(kind, m, log.With().Str("target", sub.TargetName()).Logger())
		if err != nil {
			return nil, fmt.Errorf("%s subscription: %w", kind, err)
		}
		return s, nil
	}
}
