package metrics_test

import (
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/require"

	"github.com/outboxd/outboxd/deliver"
	"github.com/outboxd/outboxd/metrics"
	"github.com/outboxd/outboxd/plan"
)

// The contract metrics: events by name, version and result (the plan's
// labels: unknown names are "other"), the validation time, and the targets
// that settled invalid events unsent, subscriptions under one label.
func TestContractMetrics(t *testing.T) {
	t.Parallel()
	m := metrics.New(metrics.Options{Version: "test"})
	m.ContractChecked(plan.Verdict{Valid: true, EventLabel: "batch_started", VersionLabel: "1"}, 3*time.Microsecond)
	m.ContractChecked(plan.Verdict{EventLabel: "batch_started", VersionLabel: "1"}, 5*time.Microsecond)
	m.ContractChecked(plan.Verdict{EventLabel: plan.OtherLabel, VersionLabel: plan.OtherLabel}, 2*time.Microsecond)
	m.ContractSettled("subscription:4", deliver.ContractDeadLetter)
	m.ContractSettled("subscription:5", deliver.ContractDeadLetter)
	m.ContractSettled("posthog", deliver.ContractSkip)
	reg := m.Registry()
	want := `# HELP outboxd_contract_events_total Events validated against the tracking plan, by event_name and schema_version ("other" for a name or version the plan lacks) and result (valid, invalid).
# TYPE outboxd_contract_events_total counter
outboxd_contract_events_total{event_name="batch_started",result="invalid",schema_version="1"} 1
outboxd_contract_events_total{event_name="batch_started",result="valid",schema_version="1"} 1
outboxd_contract_events_total{event_name="other",result="invalid",schema_version="other"} 1
# HELP outboxd_contract_settled_total Invalid events a target settled without sending them, by its contract policy (skip, dead-letter); sink is the destination's name, or subscription for every webhook subscription.
# TYPE outboxd_contract_settled_total counter
outboxd_contract_settled_total{policy="dead-letter",sink="subscription"} 2
outboxd_contract_settled_total{policy="skip",sink="posthog"} 1
`
	require.NoError(t, testutil.GatherAndCompare(reg, strings.NewReader(want), "outboxd_contract_events_total", "outboxd_contract_settled_total"))
	n, err := testutil.GatherAndCount(reg, "outboxd_contract_validation_seconds")
	require.NoError(t, err)
	require.Equal(t, 1, n)
	problems, err := testutil.GatherAndLint(reg, "outboxd_contract_events_total", "outboxd_contract_settled_total", "outboxd_contract_validation_seconds")
	require.NoError(t, err)
	require.Empty(t, problems)
}
