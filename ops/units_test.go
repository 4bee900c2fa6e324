package ops

import (
	"bytes"
	"context"
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"github.com/stretchr/testify/require"
)

func TestRedactDSN(t *testing.T) {
	for in, want := range map[string]string{
		"postgres://app:s3cr%40t@db:5432/app?sslmode=verify-full": "postgres://app:***@db:5432/app?sslmode=verify-full",
		"postgresql://app@db/app":                                 "postgresql://app@db/app",
		"postgres://db/app?password=hunter2&sslmode=require":      "postgres://db/app?password=%2A%2A%2A&sslmode=require",
		"host=db user=app password=hunter2 dbname=app":            "host=db user=app password=*** dbname=app",
		"host=db password='a b\\' c' dbname=app":                  "host=db password=*** dbname=app",
		"host=db PASSWORD = x sslpassword=y":                      "host=db PASSWORD = *** sslpassword=***",
		"postgres://app:pw@db:99999999999/x%zz":                   Redacted,
		"":                                                        "",
	} {
		got := RedactDSN(in)
		require.Equal(t, want, got, in)
		require.NotContains(t, got, "hunter2")
	}
}

func TestRedactURL(t *testing.T) {
	for in, want := range map[string]string{
		"https://hooks.example.com/in":                     "https://hooks.example.com/in",
		"https://user:pw@hooks.example.com/in?token=abc#x": "https://user:***@hooks.example.com/in?token=***",
		"https://hooks.example.com/in?a=1&b=2":             "https://hooks.example.com/in?a=***&b=***",
		"http://[::1":                                      Redacted,
		// NATS: a token as the userinfo; a server list, every password.
		"nats://s3cr3tT0ken@nats.example:4222":                           "nats://***@nats.example:4222",
		"nats://a:pw1@n1:4222,nats://b:pw2@n2:4222,nats://c:pw3@n3:4222": "nats://a:***@n1:4222,nats://b:***@n2:4222,nats://c:***@n3:4222",
	} {
		got := RedactURL(in)
		require.Equal(t, want, got, in)
		for _, secret := range []string{"s3cr3tT0ken", "pw1", "pw2", "pw3", "token=abc"} {
			require.NotContains(t, got, secret, in)
		}
	}
}

func TestParseDurationAndTime(t *testing.T) {
	for in, want := range map[string]time.Duration{
		"90m": 90 * time.Minute, "36h": 36 * time.Hour, "7d": 7 * 24 * time.Hour, "1d12h": 36 * time.Hour,
	} {
		got, err := ParseDuration(in)
		require.NoError(t, err, in)
		require.Equal(t, want, got, in)
	}
	for _, bad := range []string{"", "d", "7x", "-1d", "1d2"} {
		_, err := ParseDuration(bad)
		require.Error(t, err, bad)
	}
	now := time.Date(2026, 11, 26, 10, 0, 0, 0, time.UTC)
	for in, want := range map[string]time.Time{
		"2026-11-25T09:30:00Z":      time.Date(2026, 11, 25, 9, 30, 0, 0, time.UTC),
		"2026-11-25T11:30:00+02:00": time.Date(2026, 11, 25, 9, 30, 0, 0, time.UTC),
		"2026-11-20":                time.Date(2026, 11, 20, 0, 0, 0, 0, time.UTC),
		"24h":                       now.Add(-24 * time.Hour),
		"7d ago":                    now.Add(-7 * 24 * time.Hour),
	} {
		got, err := ParseTime(in, now)
		require.NoError(t, err, in)
		require.True(t, want.Equal(got), "%s: %s", in, got)
	}
	_, err := ParseTime("yesterday", now)
	require.Error(t, err)
}

func TestFormatBytes(t *testing.T) {
	require.Equal(t, "512 B", FormatBytes(512))
	require.Equal(t, "1.5 KiB", FormatBytes(1536))
	require.Equal(t, "1.0 GiB", FormatBytes(1<<30))
}

func TestProgressBar(t *testing.T) {
	p := NewProgress()
	p.SetTotal(200)
	for i := range 50 {
		p.add(i != 0)
	}
	s := p.snapshotAt(p.start.Add(10 * time.Second))
	require.Equal(t, 5.0, s.Rate)
	require.Equal(t, 30*time.Second, s.ETA)
	bar := s.Bar(60)
	require.Equal(t, "[=====>              ] 50/200  25%  5.0/s  ETA 30s  failed 1", bar)
	require.Len(t, bar, 60)
	require.Equal(t, "?", etaString(NewProgress().Snapshot().ETA))
}

// Off a terminal, progress goes to the log: at each 10%, at least every
// LogEvery, and at the end.
func TestProgressReporterLogs(t *testing.T) {
	var log bytes.Buffer
	r := &ProgressReporter{Log: zerolog.New(&log), LogEvery: 5 * time.Second}
	t0 := time.Now()
	r.lastLog = t0
	lines := func() int { return strings.Count(log.String(), "\n") }
	at := func(done int64, d time.Duration) {
		r.show(ProgressSnapshot{Done: done, Total: 100, ETA: -1}, t0.Add(d), false)
	}
	at(5, time.Second)
	require.Zero(t, lines(), "neither 10% nor 5s yet")
	at(10, 2*time.Second)
	require.Equal(t, 1, lines(), "10%")
	at(15, 3*time.Second)
	require.Equal(t, 1, lines())
	at(16, 8*time.Second)
	require.Equal(t, 2, lines(), "5s since the last line")
	require.Contains(t, log.String(), `"done":16`)
	require.Contains(t, log.String(), `"message":"replay progress"`)

	// Start and stop: the final state is always shown.
	log.Reset()
	p := NewProgress()
	p.SetTotal(3)
	stop := (&ProgressReporter{Log: zerolog.New(&log)}).Start(context.Background(), p)
	p.add(true)
	p.add(true)
	p.add(false)
	stop()
	require.Contains(t, log.String(), `"done":3`)
	require.Contains(t, log.String(), `"failed":1`)

	var bar bytes.Buffer
	p2 := NewProgress()
	p2.SetTotal(1)
	p2.add(true)
	(&ProgressReporter{Terminal: true, Out: &bar}).Start(context.Background(), p2)()
	require.True(t, strings.HasPrefix(bar.String(), "\r["))
	require.True(t, strings.HasSuffix(bar.String(), "\x1b[K\n"))
}

func TestParseBytes(t *testing.T) {
	for in, want := range map[string]int64{"0": 0, "512": 512, "512B": 512, "1KiB": 1024, "64 MiB": 64 << 20, "1GiB": 1 << 30, "2G": 2 << 30, "1TiB": 1 << 40} {
		got, err := ParseBytes(in)
		require.NoError(t, err, in)
		require.Equal(t, want, got, in)
	}
	for _, bad := range []string{"", "GiB", "1.5GiB", "-1", "1PB", "99999999999T"} {
		_, err := ParseBytes(bad)
		require.Error(t, err, bad)
	}
}
