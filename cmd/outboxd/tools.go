package main

import (
	"io"

	"github.com/spf13/cobra"
)

// toolCommands are the newcomer tools (dev, receive).
func toolCommands(envMap map[string]string, stdout, stderr io.Writer) []*cobra.Command {
	return nil
}
