// Command outboxd delivers the rows applications insert into a Postgres outbox
// table to webhooks, through logical replication. See README.md.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"runtime/debug"
	"strings"
	"syscall"

	"github.com/spf13/cobra"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

func main() {
	// A reader that closes the pipe outboxd writes to (the stdout sink piped
	// into another program) must not end the process without a word: with
	// SIGPIPE ignored the write fails with EPIPE, which the sink logs, and
	// nothing is marked delivered.
	signal.Ignore(syscall.SIGPIPE)
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Getenv, os.Environ(), os.Stdout, os.Stderr)
	stop()
	os.Exit(exitCode(err, os.Stderr))
}

// exitCode maps an error to the process exit code (docs/DESIGN.md §4): 0 ok,
// 1 runtime failure, 2 bad usage or configuration.
func exitCode(err error, stderr io.Writer) int {
	if err == nil {
		return 0
	}
	fmt.Fprintln(stderr, "outboxd:", err)
	var ce configError
	var ue usageError
	if errors.As(err, &ce) || errors.As(err, &ue) {
		return 2
	}
	return 1
}

// usageError is a command-line mistake: exit code 2.
type usageError struct{ error }

// run is main without the process: arguments, environment and output are
// parameters, so tests can call it.
func run(ctx context.Context, args []string, getenv func(string) string, environ []string, stdout, stderr io.Writer) error {
	envMap := map[string]string{}
	for _, kv := range environ {
		if k, v, ok := strings.Cut(kv, "="); ok && (strings.HasPrefix(k, envPrefix) || passthroughVar(k) || strings.HasPrefix(k, "OTEL_")) {
			envMap[k] = v
		}
	}
	_ = getenv
	root := &cobra.Command{
		Use:           "outboxd",
		Short:         "Deliver Postgres outbox rows to webhooks through logical replication",
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.SetArgs(args)
	root.SetOut(stdout)
	root.SetErr(stderr)
	root.SetFlagErrorFunc(func(_ *cobra.Command, err error) error { return usageError{err} })
	root.AddCommand(
		runCommand(envMap, stderr),
		migrateCommand(envMap, stdout, stderr),
		versionCommand(stdout),
	)
	root.AddCommand(deliveryCommands(envMap, stdout, stderr)...)
	root.AddCommand(opsCommands(envMap, stdout, stderr)...)
	root.AddCommand(toolCommands(envMap, stdout, stderr)...)
	err := root.ExecuteContext(ctx)
	if err != nil && strings.HasPrefix(err.Error(), "unknown command") {
		return usageError{err}
	}
	return err
}

func versionCommand(stdout io.Writer) *cobra.Command {
	return &cobra.Command{
		Use:   "version",
		Short: "Print the version",
		Args:  cobra.NoArgs,
		RunE: func(*cobra.Command, []string) error {
			goVersion := "unknown"
			if bi, ok := debug.ReadBuildInfo(); ok {
				goVersion = bi.GoVersion
			}
			fmt.Fprintf(stdout, "outboxd %s (%s)\n", version, goVersion)
			return nil
		},
	}
}
