package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"time"

	"github.com/spf13/cobra"
)

// healthcheckCommand is the HEALTHCHECK of the container image, which has no
// shell and no curl: it asks the running daemon's HTTP server (at
// OUTBOXD_HTTP_ADDR, an unspecified host meaning this host) and exits 0 for
// a 2xx, 1 otherwise.
func healthcheckCommand(envMap map[string]string, stdout, _ io.Writer) *cobra.Command {
	var addr, path string
	var timeout time.Duration
	cmd := &cobra.Command{
		Use:   "healthcheck",
		Short: "Ask a running outboxd for its health (exit 0 healthy, 1 not): for container HEALTHCHECKs",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if !cmd.Flags().Changed("addr") {
				addr = envMap[envPrefix+"HTTP_ADDR"]
				if addr == "" {
					addr = "127.0.0.1:9187" // the default of OUTBOXD_HTTP_ADDR
				}
			}
			target, err := healthcheckURL(addr, path)
			if err != nil {
				return usageError{err}
			}
			ctx, cancel := context.WithTimeout(cmd.Context(), timeout)
			defer cancel()
			req, err := http.NewRequestWithContext(ctx, http.MethodGet, target, nil)
			if err != nil {
				return usageError{fmt.Errorf("health URL %s: %w", target, err)}
			}
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				return fmt.Errorf("ask %s: %w", target, err)
			}
			resp.Body.Close()
			if resp.StatusCode/100 != 2 {
				return fmt.Errorf("%s answered %s", target, resp.Status)
			}
			fmt.Fprintf(stdout, "%s: %s\n", target, resp.Status)
			return nil
		},
	}
	cmd.Flags().StringVar(&addr, "addr", "", "address of outboxd's HTTP server (default: OUTBOXD_HTTP_ADDR)")
	cmd.Flags().StringVar(&path, "path", "/healthz", "endpoint to ask: /healthz (alive) or /readyz (ready)")
	cmd.Flags().DurationVar(&timeout, "timeout", 3*time.Second, "how long to wait for the answer")
	return cmd
}

// healthcheckURL builds the URL to ask for addr (host:port) and path; a listener
// on an unspecified address (0.0.0.0, ::, empty host) is asked on loopback.
func healthcheckURL(addr, path string) (string, error) {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return "", fmt.Errorf("address %q: %w", addr, err)
	}
	if port == "" || port == "0" {
		return "", errors.New("address " + addr + " has no fixed port to ask")
	}
	if ip := net.ParseIP(host); host == "" || (ip != nil && ip.IsUnspecified()) {
		// A Go listener on an unspecified address also accepts IPv4
		// loopback, and containers may have IPv6 disabled.
		host = "127.0.0.1"
	}
	if len(path) == 0 || path[0] != '/' {
		path = "/" + path
	}
	return "http://" + net.JoinHostPort(host, port) + path, nil
}
