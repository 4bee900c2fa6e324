package main

import (
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/outboxd/outboxd/deliver"
)

// The contract policies: OUTBOXD_CONTRACT_POLICY is every target's default,
// OUTBOXD_<KIND>_CONTRACT and OUTBOXD_SUBSCRIPTION_CONTRACT override it; a
// bad value names its variable.
func TestContractConfig(t *testing.T) {
	base := map[string]string{"OUTBOXD_DATABASE_URL": "postgres://localhost/x", "OUTBOXD_WEBHOOK_URL": "https://example.com/hook"}
	with := func(extra map[string]string) map[string]string {
		env := map[string]string{}
		for k, v := range base {
			env[k] = v
		}
		for k, v := range extra {
			env[k] = v
		}
		return env
	}
	read := func(env map[string]string) (deliver.ContractConfig, error) {
		c, _, err := loadConfig(env)
		require.NoError(t, err)
		return c.contract(env)
	}

	cc, err := read(with(nil))
	require.NoError(t, err)
	require.Equal(t, deliver.ContractConfig{Default: deliver.ContractDeliver, Subscriptions: deliver.ContractDeliver,
		Targets: map[string]deliver.ContractPolicy{"webhook": deliver.ContractDeliver}}, cc)

	cc, err = read(with(map[string]string{"OUTBOXD_SINKS": "webhook,posthog,stdout", "OUTBOXD_CONTRACT_POLICY": "skip",
		"OUTBOXD_POSTHOG_CONTRACT": "dead-letter", "OUTBOXD_WEBHOOK_CONTRACT": "deliver"}))
	require.NoError(t, err)
	require.Equal(t, deliver.ContractConfig{Default: deliver.ContractSkip, Subscriptions: deliver.ContractSkip,
		Targets: map[string]deliver.ContractPolicy{"webhook": deliver.ContractDeliver, "posthog": deliver.ContractDeadLetter, "stdout": deliver.ContractSkip}}, cc)

	// OUTBOXD_SINK=stdout is one target named webhook: OUTBOXD_WEBHOOK_CONTRACT sets it.
	cc, err = read(with(map[string]string{"OUTBOXD_SINK": "stdout", "OUTBOXD_WEBHOOK_CONTRACT": "dead-letter", "OUTBOXD_SUBSCRIPTION_CONTRACT": "skip"}))
	require.NoError(t, err)
	require.Equal(t, deliver.ContractConfig{Default: deliver.ContractDeliver, Subscriptions: deliver.ContractSkip,
		Targets: map[string]deliver.ContractPolicy{"webhook": deliver.ContractDeadLetter}}, cc)

	for v, want := range map[string]string{
		"OUTBOXD_CONTRACT_POLICY":       "OUTBOXD_CONTRACT_POLICY: unknown contract policy \"drop\"",
		"OUTBOXD_SUBSCRIPTION_CONTRACT": "OUTBOXD_SUBSCRIPTION_CONTRACT: unknown contract policy \"drop\"",
		"OUTBOXD_POSTHOG_CONTRACT":      "OUTBOXD_POSTHOG_CONTRACT: unknown contract policy \"drop\"",
	} {
		_, err := read(with(map[string]string{"OUTBOXD_SINKS": "webhook,posthog", v: "drop"}))
		require.ErrorContains(t, err, want)
	}
}
