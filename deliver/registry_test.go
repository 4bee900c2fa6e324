package deliver

import (
	"testing"

	"github.com/jackc/pgx/v5/pgtype"
	"github.com/stretchr/testify/require"

	"github.com/outboxd/outboxd/decode"
)

func TestParseTextArray(t *testing.T) {
	t.Parallel()
	for in, want := range map[string][]string{
		"":                       nil,
		"{}":                     nil,
		"{a}":                    {"a"},
		"{whsec_a+b/c=,whsec_d}": {"whsec_a+b/c=", "whsec_d"},
		`{"a b","c,d","e\"f"}`:   {"a b", "c,d", `e"f`},
		"{NULL,x}":               {"x"},
		`{"NULL"}`:               {"NULL"},
	} {
		got, err := ParseTextArray(in)
		require.NoError(t, err, in)
		require.Equal(t, want, got, in)
	}
	for _, bad := range []string{"a", "{", `{"a}`, `{"a"b}`} {
		_, err := ParseTextArray(bad)
		require.Error(t, err, bad)
	}
}

func TestSubscriptionMatchesTenantsAndGlobs(t *testing.T) {
	t.Parallel()
	seven := int64(7)
	tenant := Subscription{ID: 1, OrganizationID: &seven, Enabled: true, Events: []string{"batch_*"}}
	platform := Subscription{ID: 2, Enabled: true}
	ev := func(org int64, has bool, name string) *decode.Event {
		return &decode.Event{Name: name, OrganizationID: org, HasOrganization: has}
	}
	require.True(t, tenant.Matches(ev(7, true, "batch_started")))
	require.False(t, tenant.Matches(ev(8, true, "batch_started")), "another tenant")
	require.False(t, tenant.Matches(ev(0, false, "batch_started")), "no organization: platform only")
	require.False(t, tenant.Matches(ev(7, true, "timer_started")), "glob")
	require.True(t, platform.Matches(ev(0, false, "anything")))
	require.True(t, platform.Matches(ev(8, true, "timer_started")))
	platform.Enabled = false
	require.False(t, platform.Matches(ev(8, true, "timer_started")))
}

func TestRegistryApplyAndSnapshot(t *testing.T) {
	t.Parallel()
	rel := &decode.Relation{Name: "outboxd_subscription", Columns: []decode.Column{
		{Name: "id", TypeOID: pgtype.Int8OID}, {Name: "organization_id", TypeOID: pgtype.Int8OID},
		{Name: "url", TypeOID: pgtype.TextOID}, {Name: "secrets", TypeOID: pgtype.TextArrayOID},
		{Name: "events", TypeOID: pgtype.TextArrayOID}, {Name: "enabled", TypeOID: pgtype.BoolOID},
	}}
	row := func(vals ...string) *decode.Row {
		r := &decode.Row{Relation: rel}
		for _, v := range vals {
			if v == "NULL" {
				r.Values = append(r.Values, nil)
			} else {
				r.Values = append(r.Values, []byte(v))
			}
		}
		return r
	}
	reg, err := NewRegistry(nil)
	require.NoError(t, err)
	s, err := reg.Apply(&decode.Change{Kind: decode.KindInsert, Row: row("3", "7", "https://a", "{whsec_x}", "{}", "t")})
	require.NoError(t, err)
	require.Equal(t, int64(7), *s.OrganizationID)
	_, err = reg.Apply(&decode.Change{Kind: decode.KindInsert, Row: row("4", "NULL", "https://b", "{}", "{batch_*}", "f")})
	require.NoError(t, err)
	require.Nil(t, reg.Get(4).OrganizationID)

	again, err := NewRegistry(reg.Snapshot())
	require.NoError(t, err)
	require.Equal(t, reg.Snapshot(), again.Snapshot(), "a snapshot round-trips")

	_, err = reg.Apply(&decode.Change{Kind: decode.KindDelete, Row: row("3", "NULL", "NULL", "NULL", "NULL", "NULL")})
	require.NoError(t, err)
	require.Nil(t, reg.Get(3))
	_, err = reg.Apply(&decode.Change{Kind: decode.KindIgnored})
	require.NoError(t, err)
	require.Nil(t, reg.Get(4), "a reset forgets everything")
}
