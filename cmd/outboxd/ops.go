package main

import (
	"context"
	"fmt"
	"io"
	"maps"
	"os"
	"reflect"
	"regexp"
	"slices"
	"strings"

	"github.com/rs/zerolog"
	"github.com/spf13/cobra"

	"github.com/outboxd/outboxd/ops"
)

// opsCommands are the operator commands (status, slot, replay, prune, ga4
// validate, plan check|apply). Their
// logic lives in package ops; here are flags, output and exit codes: 0 ok,
// 1 runtime failure or something needs attention, 2 usage or configuration.
func opsCommands(envMap map[string]string, stdout, stderr io.Writer) []*cobra.Command {
	return []*cobra.Command{
		statusCommand(envMap, stdout, stderr),
		slotCommand(envMap, stdout, stderr),
		replayCommand(envMap, stdout, stderr),
		pruneCommand(envMap, stdout, stderr),
		ga4Command(envMap, stdout, stderr),
		planCommand(envMap, stdout, stderr),
	}
}

// opsEnv is what every operator command starts from.
type opsEnv struct {
	cfg    config
	log    zerolog.Logger
	client *ops.Client
}

// openOps reads the configuration (override applies flags), checks what the
// operator commands need and connects. The caller closes the client.
func openOps(ctx context.Context, envMap map[string]string, stderr io.Writer, override func(*config)) (*opsEnv, error) {
	c, log, err := setup(envMap, stderr, override)
	if err != nil {
		return nil, err
	}
	if err := c.requireDatabase(); err != nil {
		return nil, err
	}
	table, err := c.table()
	if err != nil {
		return nil, err
	}
	target := ops.Target{DatabaseURL: c.DatabaseURL, Table: table, Slot: c.Slot, Publication: c.Publication, SlotFailover: c.SlotFailover}
	if err := target.Validate(); err != nil {
		name := "SLOT"
		if strings.Contains(err.Error(), "publication") {
			name = "PUBLICATION"
		}
		return nil, badVar(name, "%v", err)
	}
	client, err := ops.Open(ctx, target, log)
	if err != nil {
		return nil, err
	}
	return &opsEnv{cfg: c, log: log, client: client}, nil
}

// slotOverride applies a --slot flag.
func slotOverride(cmd *cobra.Command, slot *string) func(*config) {
	return func(c *config) {
		if cmd.Flags().Changed("slot") {
			c.Slot = *slot
		}
	}
}

// attentionError is `status` finding problems: exit 1, reasons printed.
type attentionError struct{ n int }

func (e attentionError) Error() string {
	if e.n == 1 {
		return "1 problem needs attention"
	}
	return fmt.Sprintf("%d problems need attention", e.n)
}

// secretVars are the core variables shown as *** when set.
var secretVars = map[string]bool{"WEBHOOK_SECRET": true}

// secretName matches variable names whose values are secrets; sinkSecretName
// adds the *_KEY names of other sinks (not ORDERING_KEY, a column choice).
var (
	secretName     = regexp.MustCompile(`SECRET|PASSWORD|PASSWD|TOKEN|CREDENTIAL|PRIVATE_KEY|API_?KEY`)
	sinkSecretName = regexp.MustCompile(`SECRET|PASSWORD|PASSWD|TOKEN|CREDENTIAL|_KEY$|API_?KEY`)
)

// effectiveConfig lists every setting by variable name, secrets redacted:
// the DSN password and webhook secret as ***, a webhook URL's password and
// query values as ***. Variables of other sinks are included, redacted by
// name or, for URLs, by userinfo.
func effectiveConfig(c config, envMap map[string]string) map[string]string {
	out := map[string]string{}
	v := reflect.ValueOf(c)
	t := v.Type()
	for i := range t.NumField() {
		name := t.Field(i).Tag.Get("env")
		if name == "" {
			continue
		}
		val := fmt.Sprint(v.Field(i).Interface())
		switch {
		case name == "DATABASE_URL":
			val = ops.RedactDSN(val)
		case (secretVars[name] || secretName.MatchString(name)) && val != "":
			val = ops.Redacted
		case strings.HasSuffix(name, "_URL") || strings.Contains(val, "://"):
			val = ops.RedactURL(val)
		}
		out[envPrefix+name] = val
	}
	for k, val := range envMap {
		if _, done := out[k]; done || !sinkVar(k) {
			continue
		}
		switch {
		case strings.HasSuffix(k, "_HEADERS"):
			val = redactHeaders(val)
		case sinkSecretName.MatchString(strings.TrimPrefix(k, envPrefix)) && val != "":
			val = ops.Redacted
		case strings.Contains(val, "://"):
			val = ops.RedactURL(val)
		}
		out[k] = val
	}
	return out
}

func sortedKeys[V any](m map[string]V) []string { return slices.Sorted(maps.Keys(m)) }

// isTerminal reports whether w is a terminal (a character device), for the
// replay progress bar.
func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	fi, err := f.Stat()
	return err == nil && fi.Mode()&os.ModeCharDevice != 0
}
