package cdc

import (
	"testing"

	"github.com/jackc/pglogrepl"
	"github.com/stretchr/testify/require"
)

// forkPoint reads where a timeline ended from a timeline history file, as
// TIMELINE_HISTORY returns it.
func TestForkPoint(t *testing.T) {
	t.Parallel()
	history := []byte("1\t0/3019A28\tno recovery target specified\n\n2\t0/5000000\tno recovery target specified\n")
	lsn, ok := forkPoint(history, 1)
	require.True(t, ok)
	require.Equal(t, pglogrepl.LSN(0x3019A28), lsn)
	lsn, ok = forkPoint(history, 2)
	require.True(t, ok)
	require.Equal(t, pglogrepl.LSN(0x5000000), lsn)
	_, ok = forkPoint(history, 3)
	require.False(t, ok, "a timeline the history does not list")
	_, ok = forkPoint([]byte("1\tnot-an-lsn\tx\n"), 1)
	require.False(t, ok)
}
