package pgserver

import (
	"net"
	"testing"

	"github.com/stretchr/testify/require"
)

func TestStartFailureReportsLog(t *testing.T) {
	t.Parallel()
	bin, err := FindBinDir()
	require.NoError(t, err)
	_, err = Start(bin, map[string]string{"no_such_setting_xyz": "1"})
	require.ErrorContains(t, err, `unrecognized configuration parameter "no_such_setting_xyz"`, "the log tail is in the error")
	require.NotErrorIs(t, err, errPortInUse)
}

func TestStartPortTaken(t *testing.T) {
	t.Parallel()
	bin, err := FindBinDir()
	require.NoError(t, err)
	in, err := Start(bin, nil)
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, in.Teardown()) })
	require.NoError(t, in.Stop("fast"))

	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer l.Close()
	in.port = l.Addr().(*net.TCPAddr).Port
	err = in.Start()
	require.ErrorIs(t, err, errPortInUse, "a first start retries on another port")
	require.False(t, in.Running())
}
