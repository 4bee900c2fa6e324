package main

import (
	"io"

	"github.com/spf13/cobra"
)

// opsCommands are the operator commands (status, slot, replay, prune).
func opsCommands(envMap map[string]string, stdout, stderr io.Writer) []*cobra.Command {
	return nil
}
