package main

import (
	"maps"
	"testing"

	"github.com/stretchr/testify/require"
)

// OUTBOXD_MAX_IN_FLIGHT unset or 0 holds 5,000 events per dispatcher, or the
// largest batch size configured when that is larger, so that the default
// never refuses a batch size the daemon accepts; a value set is kept, and a
// negative one is refused naming the variable.
func TestMaxInFlightDefault(t *testing.T) {
	t.Parallel()
	base := map[string]string{
		"OUTBOXD_DATABASE_URL": "postgres://u@127.0.0.1:1/db",
		"OUTBOXD_WEBHOOK_URL":  "https://example.com/hook",
	}
	for _, tc := range []struct {
		env  map[string]string
		want int
	}{
		{nil, 5000},
		{map[string]string{"OUTBOXD_MAX_IN_FLIGHT": "0"}, 5000},
		{map[string]string{"OUTBOXD_WEBHOOK_BATCH_SIZE": "500"}, 5000},
		{map[string]string{"OUTBOXD_WEBHOOK_BATCH_SIZE": "8000"}, 8000},
		{map[string]string{"OUTBOXD_SINKS": "webhook,posthog", "OUTBOXD_POSTHOG_BATCH_SIZE": "7000"}, 7000},
		{map[string]string{"OUTBOXD_SINKS": "webhook,posthog", "OUTBOXD_POSTHOG_BATCH_SIZE": "lots"}, 5000},
		{map[string]string{"OUTBOXD_MAX_IN_FLIGHT": "300"}, 300},
		{map[string]string{"OUTBOXD_MAX_IN_FLIGHT": "20000", "OUTBOXD_WEBHOOK_BATCH_SIZE": "8000"}, 20000},
	} {
		env := maps.Clone(base)
		maps.Copy(env, tc.env)
		c, _, err := loadConfig(env)
		require.NoError(t, err, "%v", tc.env)
		require.Equal(t, tc.want, c.MaxInFlight, "%v", tc.env)
		if tc.env["OUTBOXD_SINKS"] != "" {
			continue // the destinations' own settings are checked at run
		}
		pc, err := c.pipelineConfig()
		require.NoError(t, err, "%v", tc.env)
		require.Equal(t, tc.want, pc.Deliver.MaxInFlight, "%v", tc.env)
		require.NoError(t, pc.Validate(), "%v: the batch size fits within the default", tc.env)
	}

	env := maps.Clone(base)
	env["OUTBOXD_MAX_IN_FLIGHT"] = "-1"
	c, _, err := loadConfig(env)
	require.NoError(t, err)
	_, err = c.pipelineConfig()
	require.ErrorContains(t, err, "OUTBOXD_MAX_IN_FLIGHT")
	// Effective configuration shows the value in force.
	env = maps.Clone(base)
	c, _, err = loadConfig(env)
	require.NoError(t, err)
	require.Equal(t, "5000", effectiveConfig(c, env)["OUTBOXD_MAX_IN_FLIGHT"])
}
