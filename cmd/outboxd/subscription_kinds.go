package main

import (
	"errors"
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
// reference a secret by (PROJECT_API_KEY_ENV=OUTBOXD_SECRET_ORG_7_POSTHOG):
// a row can never make the daemon send another of its variables (its
// database password, the default webhook's secret) anywhere.
const subscriptionSecretPrefix = envPrefix + "SECRET_"

// subscriptionKindSettings are, per kind, the settings a subscription row
// may give (the kind's variable suffixes, OUTBOXD_<KIND>_<KEY>), the
// secrets it gives by reference (<KEY>_ENV or <KEY>_FILE) and the settings
// it must give. What a row does not give takes the daemon's
// OUTBOXD_<KIND>_* timeouts and attempts; PostHog and GA4 rows never take
// the daemon's key, secret or address. Kafka and NATS subscriptions use the
// daemon's connection (brokers, URL, TLS, credentials) and choose only a
// topic or subject under OUTBOXD_SUBSCRIPTION_TOPIC_PREFIX.
var subscriptionKindSettings = map[string]kindSettings{
	"posthog": {plain: []string{"HOST", "PERSON_PROPERTIES", "GROUP_PROPERTIES", "GROUP_IDENTIFY"}, secret: []string{"PROJECT_API_KEY"},
		required: []string{"PROJECT_API_KEY"}},
	"ga4": {plain: []string{"MEASUREMENT_ID", "ENDPOINT", "CLIENT_ID_PROPERTY"}, secret: []string{"API_SECRET", "CLIENT_ID_KEY"},
		required: []string{"MEASUREMENT_ID", "API_SECRET"}},
	"kafka": {plain: []string{"TOPIC"}, required: []string{"TOPIC"}},
	"nats":  {plain: []string{"SUBJECT"}, required: []string{"SUBJECT"}},
}

// kindSettings are the settings of one kind's subscriptions.
type kindSettings struct{ plain, secret, required []string }

// settingRef splits a settings key: a reference to one of the kind's
// secrets (PROJECT_API_KEY_ENV) is that secret's name and "_ENV" or
// "_FILE"; any other key is itself and "".
func (k kindSettings) settingRef(key string) (name, ref string) {
	for _, suffix := range []string{"_ENV", "_FILE"} {
		if b, found := strings.CutSuffix(key, suffix); found && slices.Contains(k.secret, b) {
			return b, suffix
		}
	}
	return key, ""
}

// inheritsConnection are the kinds whose subscriptions use the daemon's
// connection settings.
var inheritsConnection = map[string]bool{"kafka": true, "nats": true}

var (
	secretFileName = regexp.MustCompile(`^[A-Za-z0-9_][A-Za-z0-9._-]*$`)
	// placeholder is a {...} of a topic or subject template: only
	// {event_name} is one.
	placeholder = regexp.MustCompile(`\{[^}]*\}?`)
)

// subscriptionEnv is what checks a subscription row's settings need of the
// daemon's configuration.
type subscriptionEnv struct {
	// topicPrefix is OUTBOXD_SUBSCRIPTION_TOPIC_PREFIX ("": Kafka and NATS
	// subscriptions refused).
	topicPrefix string
}

// secretOwner is the prefix a secret reference of a row must have: its
// organization's (ORG_7_) or, platform-wide, PLATFORM_. A tenant's row can
// use only that tenant's secrets.
func secretOwner(org *int64) string {
	if org == nil {
		return "PLATFORM_"
	}
	return "ORG_" + strconv.FormatInt(*org, 10) + "_"
}

// checkTopicPrefix checks OUTBOXD_SUBSCRIPTION_TOPIC_PREFIX: a literal start
// of a topic or subject, not one of NATS's system or reply namespaces.
func checkTopicPrefix(p string) error {
	if p == "" {
		return nil
	}
	if strings.HasPrefix(p, "$") || strings.HasPrefix(p, "_INBOX") || strings.ContainsAny(p, "*>{} \t\r\n") {
		return badVar("SUBSCRIPTION_TOPIC_PREFIX", "%q: a literal start of topics and subjects, not beginning with $ or _INBOX, without *, >, braces or spaces", p)
	}
	return nil
}

// checkSubscriptionSettings checks a subscription's kind and settings as
// `subscription add` takes them; the daemon checks them again (a row
// written by SQL). org is the row's organization (nil: platform-wide).
func checkSubscriptionSettings(kind string, org *int64, settings map[string]string, env subscriptionEnv) error {
	spec, ok := subscriptionKindSettings[kind]
	if !ok {
		return fmt.Errorf("kind %q: want webhook, posthog, ga4, kafka or nats", kind)
	}
	owner := secretOwner(org)
	given := map[string]bool{}
	for _, k := range slices.Sorted(maps.Keys(settings)) {
		base, ref := spec.settingRef(k)
		v := settings[k]
		switch {
		case ref == "_ENV":
			if !strings.HasPrefix(v, subscriptionSecretPrefix+owner) || len(v) == len(subscriptionSecretPrefix+owner) {
				return fmt.Errorf("setting %s: name a variable %s%s<NAME> (a row references only its own organization's secrets)", k, subscriptionSecretPrefix, owner)
			}
		case ref == "_FILE":
			if !secretFileName.MatchString(v) {
				return fmt.Errorf("setting %s: name a file of %sSECRETS_DIR (a name, not a path)", k, envPrefix)
			}
			if !strings.HasPrefix(v, owner) || len(v) == len(owner) {
				return fmt.Errorf("setting %s: name a file %s<name> of %sSECRETS_DIR (a row references only its own organization's secrets)", k, owner, envPrefix)
			}
		case slices.Contains(spec.secret, base):
			return fmt.Errorf("setting %s is a secret: give %s_ENV (a variable %s%s<NAME>) or %s_FILE (a file of %sSECRETS_DIR), never its value", k, k, subscriptionSecretPrefix, owner, k, envPrefix)
		case !slices.Contains(spec.plain, k):
			var all []string
			all = append(all, spec.plain...)
			for _, s := range spec.secret {
				all = append(all, s+"_ENV", s+"_FILE")
			}
			return fmt.Errorf("setting %s is not one of a %s subscription's (%s)", k, kind, strings.Join(all, ", "))
		case k == "TOPIC" || k == "SUBJECT":
			if env.topicPrefix == "" {
				return fmt.Errorf("%s subscriptions are off: %sSUBSCRIPTION_TOPIC_PREFIX is not set (the start every subscription's topic or subject must have)", kind, envPrefix)
			}
			if !strings.HasPrefix(v, env.topicPrefix) {
				return fmt.Errorf("setting %s %q does not start with %sSUBSCRIPTION_TOPIC_PREFIX %q", k, v, envPrefix, env.topicPrefix)
			}
			for _, p := range placeholder.FindAllString(v, -1) {
				if p != "{event_name}" {
					return fmt.Errorf("setting %s %q: %s is not a placeholder (only {event_name} is)", k, v, p)
				}
			}
		}
		given[base] = true
	}
	for _, r := range spec.required {
		if !given[r] {
			if slices.Contains(spec.secret, r) {
				return fmt.Errorf("a %s subscription needs %s_ENV or %s_FILE", kind, r, r)
			}
			return fmt.Errorf("a %s subscription needs %s", kind, r)
		}
	}
	return nil
}

// errSubscriptionConfig marks a subscription sink that cannot be built
// from its row whatever the time (its settings, its kind's own checks):
// its deliveries are dead-lettered with the reason. Other failures (a
// broker not answering, a secret file not there yet) are retried.
var errSubscriptionConfig = errors.New("subscription settings")

// subscriptionSinkOf returns the builder of the sinks of subscriptions of
// other kinds than webhook: the kind's sink, from the daemon's variables of
// that kind (no secret among them; the connection only for Kafka and NATS)
// overlaid with the row's settings, its secrets read from the references.
// The address guard of posthog and ga4 subscriptions is the subscriptions'
// (OUTBOXD_ALLOW_PRIVATE_SUBSCRIPTIONS), never the default sinks'. An error
// wrapping sink.ErrPermanent is the row's; any other may pass.
func (c config) subscriptionSinkOf(envMap map[string]string, log zerolog.Logger) func(deliver.Subscription) (sink.Sink, error) {
	env := subscriptionEnv{topicPrefix: c.SubscriptionTopicPrefix}
	return func(sub deliver.Subscription) (sink.Sink, error) {
		kind := sub.Kind
		if err := checkSubscriptionSettings(kind, sub.OrganizationID, sub.Settings, env); err != nil {
			return nil, fmt.Errorf("%w: %w", err, sink.ErrPermanent)
		}
		spec := subscriptionKindSettings[kind]
		kindPrefix := envPrefix + strings.ToUpper(kind) + "_"
		m := map[string]string{}
		for k, v := range envMap {
			key, ok := strings.CutPrefix(k, kindPrefix)
			if !ok {
				continue
			}
			// Kafka and NATS: the daemon's connection, its credentials
			// included, to the daemon's brokers or server (not its topic,
			// subject or stream); PostHog and GA4: its timeouts only.
			conn := inheritsConnection[kind] && !slices.Contains([]string{"TOPIC", "SUBJECT", "STREAM"}, key)
			if conn || slices.Contains([]string{"TIMEOUT", "MAX_ATTEMPTS", "BACKOFF_MAX"}, key) {
				m[k] = v
			}
		}
		if v, ok := envMap[envPrefix+"ORDERING_KEY"]; ok && inheritsConnection[kind] {
			m[envPrefix+"ORDERING_KEY"] = v
		}
		m[envPrefix+"ALLOW_PRIVATE_SINKS"] = strconv.FormatBool(c.AllowPrivateSubscriptions)
		for k, v := range sub.Settings {
			name, ref := spec.settingRef(k)
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
		var ce configError
		if errors.As(err, &ce) {
			return nil, fmt.Errorf("%s subscription: %w: %w", kind, err, sink.ErrPermanent)
		}
		if err != nil {
			return nil, fmt.Errorf("%s subscription: %w", kind, err)
		}
		return s, nil
	}
}
