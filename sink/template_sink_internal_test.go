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

// Two event names that sanitizing makes equal share a subject (or topic):
// the second is reported once, with the first, never mixed in silently.
func TestTemplateReportsCollidingNames(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		tmpl        string
		valid       func(byte) bool
		first, then string
		expanded    string
	}{
		{"events.{event_name}", validSubjectByte, "order.paid", "order_paid", "events.order_paid"},
		{"events.{event_name}", validKafkaTopicByte, "order:paid", "order_paid", "events.order_paid"},
	} {
		tp, err := parseTemplate(tc.tmpl, tc.valid)
		require.NoError(t, err)
		var got [][3]string
		tp.onCollision(func(name, earlier, expanded string) { got = append(got, [3]string{name, earlier, expanded}) })
		for range 3 {
			require.Equal(t, tc.expanded, tp.expand(tc.first))
			require.Equal(t, tc.expanded, tp.expand(tc.then))
			tp.expand("batch_started")
		}
		require.Equal(t, [][3]string{{tc.then, tc.first, tc.expanded}}, got, tc.tmpl)
	}
	// A fixed subject is no collision: every event goes there by design.
	fixed, err := parseTemplate("events", validSubjectByte)
	require.NoError(t, err)
	fixed.onCollision(func(string, string, string) { t.Error("a fixed subject reported a collision") })
	fixed.expand("a")
	fixed.expand("b")
}
