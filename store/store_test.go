package store

import (
	"testing"

	"github.com/stretchr/testify/require"
)

func TestPendingPredicate(t *testing.T) {
	require.Equal(t, `e.is_processed IS NOT TRUE AND NOT EXISTS (SELECT 1 FROM "app"."outboxd_dead_letter" AS d WHERE d.event_id = e.id)`+
		` AND NOT EXISTS (SELECT 1 FROM "app"."outboxd_parked" AS p WHERE p.event_id = e.id)`,
		PendingPredicate("app", "e", All))
	require.Equal(t, `x.is_processed IS NOT TRUE`, PendingPredicate("app", "x", Scope{}))
	require.Equal(t, `coalesce(e.delivery_attempts, 0) + r.n`, AddAttempts("e", "r.n"))
}
