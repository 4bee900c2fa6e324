package cdc

import (
	"testing"

	"github.com/stretchr/testify/require"
)

func TestPublicationNamesQuotesAsSQL(t *testing.T) {
	require.Equal(t, `'"outboxd","outboxd_subscriptions"'`, publicationNames("outboxd", "outboxd_subscriptions"))
	require.Equal(t, `'"outboxd"'`, publicationNames("outboxd", ""))
	// Go's %q would have written "it's" and broken the literal, and a double
	// quote would have been escaped with a backslash, which SQL does not know.
	require.Equal(t, `'"it''s","a""b"'`, publicationNames("it's", `a"b`))
}
