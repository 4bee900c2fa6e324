package main

import (
	"io"

	"github.com/spf13/cobra"
)

// toolCommands are the newcomer tools: `dev` (a throwaway Postgres, a
// printing receiver and the pipeline between them, in one process),
// `receive` (a standalone Standard Webhooks receiver for endpoints under
// test) and `healthcheck` (the container image's HEALTHCHECK: the image has
// no shell and no curl).
func toolCommands(envMap map[string]string, stdout, stderr io.Writer) []*cobra.Command {
	return []*cobra.Command{
		devCommand(envMap, stdout, stderr),
		receiveCommand(envMap, stdout, stderr),
		healthcheckCommand(envMap, stdout, stderr),
	}
}
