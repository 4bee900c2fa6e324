package cdc

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"syscall"
	"testing"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/stretchr/testify/require"
)

func TestConnectionLost(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		err  error
		lost bool
	}{
		{"nil", nil, false},
		{"reset mid-query", fmt.Errorf("check schema: %w", &net.OpError{Op: "read", Net: "tcp", Err: syscall.ECONNRESET}), true},
		{"EOF mid-answer", fmt.Errorf("count parked deliveries: %w", io.ErrUnexpectedEOF), true},
		{"admin shutdown", &pgconn.PgError{Code: "57P01"}, true},
		{"starting up", &pgconn.PgError{Code: "57P03"}, true},
		{"connection exception", &pgconn.PgError{Code: "08006"}, true},
		{"no privilege", &pgconn.PgError{Code: "42501"}, false},
		{"bad data", &pgconn.PgError{Code: "22P02"}, false},
		{"plain error", errors.New("routing state: invalid JSON"), false},
		{"context canceled", context.Canceled, false},
	} {
		require.Equal(t, tc.lost, ConnectionLost(tc.err), tc.name)
	}

	// Nothing listening: a connection never made is not "lost".
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	addr := ln.Addr().String()
	require.NoError(t, ln.Close())
	_, err = pgconn.Connect(t.Context(), "postgres://u@"+addr+"/db?sslmode=disable&connect_timeout=5")
	var connErr *pgconn.ConnectError
	require.ErrorAs(t, err, &connErr)
	require.False(t, ConnectionLost(err), "refused: %v", err)

	// Something accepts and drops the connection: lost.
	ln, err = net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			_ = c.Close()
		}
	}()
	_, err = pgconn.Connect(t.Context(), "postgres://u@"+ln.Addr().String()+"/db?sslmode=disable&connect_timeout=5")
	require.ErrorAs(t, err, &connErr)
	require.True(t, ConnectionLost(err), "accepted then dropped: %v", err)
}
