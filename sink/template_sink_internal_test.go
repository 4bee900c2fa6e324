package sink

import (
	"testing"

	"github.com/stretchr/testify/require"
)

func TestTemplateExpansion(t *testing.T) {
	t.Parallel()
	tests := []struct {
		tmpl, name      string
		valid           func(byte) bool
		want, wantMatch string
	}{
		{"events", "x y", validKafkaTopicByte, "events", "events"},
		{"events.{event_name}", "batch_started", validKafkaTopicByte, "events.batch_started", "events.*"},
		{"events.{event_name}", "a.b/c d", validKafkaTopicByte, "events.a.b_c_d", "events.*"},
		{"events.{event_name}", "a.b/c d", validSubjectByte, "events.a_b_c_d", "events.*"},
		{"{event_name}", "", validSubjectByte, "_", "*"},
		{"app.x{event_name}.v1", "é", validSubjectByte, "app.x__.v1", "app.*.v1"},
		{"{event_name}-{event_name}", "a*", validKafkaTopicByte, "a_-a_", "*"},
	}
	for _, tt := range tests {
		tmpl, err := parseTemplate(tt.tmpl, tt.valid)
		require.NoError(t, err, tt.tmpl)
		require.Equal(t, tt.want, tmpl.expand(tt.name), "%s with %q", tt.tmpl, tt.name)
		require.Equal(t, tt.wantMatch, subjectPattern(tmpl), tt.tmpl)
	}
	for _, bad := range []string{"", "events.{event}", "{", "a}b", "{{event_name}}"} {
		_, err := parseTemplate(bad, validKafkaTopicByte)
		require.Error(t, err, bad)
	}
}
