package ops

import (
	"fmt"
	"strconv"
	"strings"
	"time"
)

// ParseDuration is time.ParseDuration that also takes whole days ("7d",
// "30d", "1d12h").
func ParseDuration(s string) (time.Duration, error) {
	s = strings.TrimSpace(s)
	if i := strings.IndexByte(s, 'd'); i > 0 {
		days, err := strconv.Atoi(s[:i])
		if err != nil || days < 0 {
			return 0, fmt.Errorf("invalid duration %q: use 90m, 36h, 7d or 1d12h", s)
		}
		d := time.Duration(days) * 24 * time.Hour
		if rest := s[i+1:]; rest != "" {
			r, err := time.ParseDuration(rest)
			if err != nil {
				return 0, fmt.Errorf("invalid duration %q: use 90m, 36h, 7d or 1d12h", s)
			}
			d += r
		}
		return d, nil
	}
	d, err := time.ParseDuration(s)
	if err != nil {
		return 0, fmt.Errorf("invalid duration %q: use 90m, 36h, 7d or 1d12h", s)
	}
	return d, nil
}

// ParseTime reads a point in time: RFC 3339 ("2026-11-26T10:00:00Z"), a date
// ("2026-11-26", midnight UTC), or a duration back from now ("24h", "7d",
// "90m", optionally followed by " ago").
func ParseTime(s string, now time.Time) (time.Time, error) {
	s = strings.TrimSpace(s)
	if t, err := time.Parse(time.RFC3339Nano, s); err == nil {
		return t, nil
	}
	if t, err := time.Parse("2006-01-02", s); err == nil {
		return t, nil
	}
	if d, err := ParseDuration(strings.TrimSuffix(s, " ago")); err == nil && d >= 0 {
		return now.Add(-d), nil
	}
	return time.Time{}, fmt.Errorf("invalid time %q: use RFC 3339 (2026-11-26T10:00:00Z), a date (2026-11-26) or a duration back from now (24h, 7d)", s)
}

// FormatBytes writes n in binary units: 512 B, 1.5 KiB, 3.2 GiB.
func FormatBytes(n int64) string {
	const unit = 1024
	if n < unit && n > -unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit || m <= -unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}

// ParseBytes reads a size: a number of bytes with an optional binary unit
// (B, KiB, MiB, GiB, TiB; K, M, G and T mean the same).
func ParseBytes(s string) (int64, error) {
	s = strings.TrimSpace(s)
	num := strings.TrimRightFunc(s, func(r rune) bool { return r < '0' || r > '9' })
	unit := strings.TrimSpace(strings.TrimPrefix(s, num))
	n, err := strconv.ParseInt(num, 10, 64)
	if err != nil || n < 0 {
		return 0, fmt.Errorf("invalid size %q: use bytes or a unit such as 512MiB or 1GiB", s)
	}
	shift := map[string]uint{"": 0, "b": 0, "k": 10, "kib": 10, "m": 20, "mib": 20, "g": 30, "gib": 30, "t": 40, "tib": 40}
	sh, ok := shift[strings.ToLower(unit)]
	if !ok || n > (1<<62)>>sh {
		return 0, fmt.Errorf("invalid size %q: use bytes or a unit such as 512MiB or 1GiB", s)
	}
	return n << sh, nil
}
