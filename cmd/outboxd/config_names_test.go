package main

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/outboxd/outboxd/decode"
	"github.com/outboxd/outboxd/deliver"
	"github.com/outboxd/outboxd/migrations"
	"github.com/outboxd/outboxd/ops"
	"github.com/outboxd/outboxd/pipeline"
)

// A database object name that cannot be used safely is bad configuration:
// every command that works on the database exits 2 at start, naming the
// variable, before it connects (issue 11 item 10: a publication name with a
// quote passed migrate and made run retry a syntax error forever).
func TestBadObjectNamesExit2NamingTheVariable(t *testing.T) {
	t.Parallel()
	base := map[string]string{
		// Nothing listens there: a command that got as far as connecting
		// would fail with exit code 1 instead.
		"OUTBOXD_DATABASE_URL": "postgres://u@127.0.0.1:1/db",
		"OUTBOXD_WEBHOOK_URL":  "https://example.com/hook",
		"OUTBOXD_HTTP_ADDR":    "",
	}
	names := []struct {
		name, key, value string
	}{
		{"quote in publication", "OUTBOXD_PUBLICATION", "bad'name"},
		{"double quote in publication", "OUTBOXD_PUBLICATION", `bad"name`},
		{"comma in publication", "OUTBOXD_PUBLICATION", "a,b"},
		{"publication too long for its _subscriptions twin", "OUTBOXD_PUBLICATION", strings.Repeat("p", 50)},
		{"quote in slot", "OUTBOXD_SLOT", "bad'slot"},
		{"outboxd's own table", "OUTBOXD_TABLE", "public.outboxd_checkpoint"},
		{"control character in table", "OUTBOXD_TABLE", "public.domain\x01event"},
		{"schema too long", "OUTBOXD_TABLE", strings.Repeat("s", 64) + ".domain_event"},
	}
	commands := [][]string{{"run"}, {"migrate"}, {"status"}, {"subscription", "list"}, {"dlq", "list"}}
	for _, n := range names {
		for _, args := range commands {
			t.Run(strings.Join(args, "_")+"/"+n.name, func(t *testing.T) {
				t.Parallel()
				var environ []string
				for k, v := range base {
					environ = append(environ, k+"="+v)
				}
				environ = append(environ, n.key+"="+n.value)
				ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
				defer cancel()
				var stdout, stderr strings.Builder
				err := run(ctx, args, nil, environ, &stdout, &stderr)
				require.Error(t, err)
				code := exitCode(err, &stderr)
				require.Equal(t, 2, code, stderr.String())
				require.Contains(t, stderr.String(), n.key+":", stderr.String())
			})
		}
	}
}

// outboxd's start-up check, migrate's (migrations.Options.Validate) and the
// operator commands' (ops.Target.Validate) accept and refuse the same names.
func TestObjectNameRulesAgree(t *testing.T) {
	t.Parallel()
	const url = "postgres://u@127.0.0.1:1/db"
	publications := []struct {
		name string
		ok   bool
	}{
		{"outboxd", true},
		{"pub-1", true},
		{"Outboxd_2", true},
		{"_x", true},
		{"a$b", true},
		{strings.Repeat("p", 49), true},
		{"bad'name", false},
		{`a"b`, false},
		{`a\b`, false},
		{"a b", false},
		{"a,b", false},
		{"1pub", false},
		{"$x", false},
		{"-x", false},
		{"pübli", false},
		{"x$outboxd$y", false},
		{strings.Repeat("p", 50), false},
	}
	for _, p := range publications {
		c := config{DatabaseURL: url, Table: "public.domain_event", Slot: "outboxd", Publication: p.name}
		cfgErr := c.requireDatabase()
		migErr := (&migrations.Options{Publication: p.name}).Validate()
		opsErr := ops.Target{DatabaseURL: url, Table: decode.Table{Schema: "public", Name: "domain_event"}, Slot: "outboxd", Publication: p.name}.Validate()
		if p.ok {
			require.NoError(t, cfgErr, "%q", p.name)
			require.NoError(t, migErr, "%q", p.name)
			require.NoError(t, opsErr, "%q", p.name)
			continue
		}
		require.Error(t, cfgErr, "%q", p.name)
		require.Contains(t, cfgErr.Error(), "OUTBOXD_PUBLICATION")
		require.Error(t, migErr, "%q", p.name)
		require.Error(t, opsErr, "%q", p.name)
	}

	tables := []struct {
		schema, name string
		ok           bool
	}{
		{"public", "domain_event", true},
		{"My Schema", "Events-v2 ü", true},
		{"public", "outboxd_checkpoint", false},
		{"public", "domain\nevent", false},
		{"public", strings.Repeat("t", 64), false},
		{strings.Repeat("s", 64), "domain_event", false},
		{"public", "x$outboxd$y", false},
	}
	for _, tb := range tables {
		c := config{DatabaseURL: url, Table: tb.schema + "." + tb.name, Slot: "outboxd", Publication: "outboxd"}
		cfgErr := c.requireDatabase()
		migErr := (&migrations.Options{Schema: tb.schema, Table: tb.name}).Validate()
		opsErr := ops.Target{DatabaseURL: url, Table: decode.Table{Schema: tb.schema, Name: tb.name}, Slot: "outboxd", Publication: "outboxd"}.Validate()
		if tb.ok {
			require.NoError(t, cfgErr, "%q.%q", tb.schema, tb.name)
			require.NoError(t, migErr, "%q.%q", tb.schema, tb.name)
			require.NoError(t, opsErr, "%q.%q", tb.schema, tb.name)
			continue
		}
		require.Error(t, cfgErr, "%q.%q", tb.schema, tb.name)
		require.Contains(t, cfgErr.Error(), "OUTBOXD_TABLE")
		require.Error(t, migErr, "%q.%q", tb.schema, tb.name)
		require.Error(t, opsErr, "%q.%q", tb.schema, tb.name)
	}

	for _, s := range []struct {
		name string
		ok   bool
	}{{"outboxd", true}, {"slot_1", true}, {"Bad-Slot", false}, {"bad'slot", false}, {strings.Repeat("s", 64), false}} {
		c := config{DatabaseURL: url, Table: "public.domain_event", Slot: s.name, Publication: "outboxd"}
		cfgErr := c.requireDatabase()
		opsErr := ops.Target{DatabaseURL: url, Table: decode.Table{Schema: "public", Name: "domain_event"}, Slot: s.name, Publication: "outboxd"}.Validate()
		if s.ok {
			require.NoError(t, cfgErr, "%q", s.name)
			require.NoError(t, opsErr, "%q", s.name)
			continue
		}
		require.Error(t, cfgErr, "%q", s.name)
		require.Contains(t, cfgErr.Error(), "OUTBOXD_SLOT")
		require.Error(t, opsErr, "%q", s.name)
	}
}

// The first step of OUTBOXD_RETRY_SCHEDULE is when a parked delivery is
// first retried (issue 11 item 10: a 5s default used to be filled in before
// the schedule was copied).
func TestRetryScheduleFirstStepIsTheFirstRetry(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		schedule string
		want     []time.Duration
	}{
		{"1s,2s", []time.Duration{time.Second, 2 * time.Second}},
		{"30s", []time.Duration{30 * time.Second}},
		{"", deliver.DefaultSchedule},
	} {
		env := map[string]string{
			"OUTBOXD_DATABASE_URL": "postgres://u@127.0.0.1:1/db",
			"OUTBOXD_WEBHOOK_URL":  "https://example.com/hook",
		}
		if tc.schedule != "" {
			env["OUTBOXD_RETRY_SCHEDULE"] = tc.schedule
		}
		c, _, err := loadConfig(env)
		require.NoError(t, err)
		pc, err := c.pipelineConfig()
		require.NoError(t, err)
		require.Equal(t, tc.want, pc.Schedule, tc.schedule)
		require.Equal(t, tc.want[0], pc.Deliver.FirstRetry, "schedule %q: the first retry is its first step", tc.schedule)
		// pipeline.Run validates the configuration again.
		require.NoError(t, pc.Validate())
		require.Equal(t, tc.want[0], pc.Deliver.FirstRetry, "schedule %q, validated twice", tc.schedule)
	}
}

// pipeline.Config takes the first retry from its schedule even when the
// delivery settings were validated (defaults filled in) beforehand.
func TestPipelineFirstRetryFollowsTheSchedule(t *testing.T) {
	t.Parallel()
	pc := pipeline.Config{DatabaseURL: "postgres://u@127.0.0.1:1/db", Slot: "outboxd", Publication: "outboxd",
		Sink:     placeholderSink{},
		Schedule: []time.Duration{time.Second, 2 * time.Second}}
	pc.Deliver = pc.Deliver.WithDefaults()
	require.NoError(t, pc.Deliver.Validate())
	pc = pc.WithDefaults()
	require.NoError(t, pc.Validate())
	require.Equal(t, time.Second, pc.Deliver.FirstRetry)
}
