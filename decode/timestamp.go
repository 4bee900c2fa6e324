package decode

import "time"

// parseTimestamp parses the ISO text form Postgres prints for timestamp and
// timestamptz values (DateStyle ISO, the setting logical replication uses):
//
//	2026-11-26 10:00:00
//	2026-11-26 10:00:00.123456+00
//	2026-11-26 15:30:00.5+05:30
//	1890-01-01 00:00:00+00:09:21
//
// A 'T' separator and a 'Z' suffix are accepted too. A value without offset
// is UTC. The result is in UTC. It reports false for anything else, including
// infinity, -infinity, BC dates, years past 9999 and more than 6 fraction
// digits: those are kept as text by the caller.
func parseTimestamp(b []byte) (time.Time, bool) {
	// YYYY-MM-DD HH:MM:SS is 19 bytes.
	if len(b) < 19 || b[4] != '-' || b[7] != '-' || (b[10] != ' ' && b[10] != 'T') || b[13] != ':' || b[16] != ':' {
		return time.Time{}, false
	}
	year, ok1 := digits(b[0:4])
	month, ok2 := digits(b[5:7])
	day, ok3 := digits(b[8:10])
	hour, ok4 := digits(b[11:13])
	minute, ok5 := digits(b[14:16])
	sec, ok6 := digits(b[17:19])
	if !(ok1 && ok2 && ok3 && ok4 && ok5 && ok6) {
		return time.Time{}, false
	}
	if month < 1 || month > 12 || day < 1 || day > daysIn(month, year) || hour > 23 || minute > 59 || sec > 59 {
		return time.Time{}, false
	}
	i := 19
	micro := 0
	if i < len(b) && b[i] == '.' {
		i++
		n := 0
		for i < len(b) && b[i] >= '0' && b[i] <= '9' {
			if n == 6 {
				return time.Time{}, false
			}
			micro = micro*10 + int(b[i]-'0')
			n++
			i++
		}
		if n == 0 {
			return time.Time{}, false
		}
		for ; n < 6; n++ {
			micro *= 10
		}
	}
	offset := 0 // seconds east of UTC
	if i < len(b) {
		switch b[i] {
		case 'Z':
			i++
		case '+', '-':
			sign := 1
			if b[i] == '-' {
				sign = -1
			}
			i++
			// ±HH, ±HH:MM or ±HH:MM:SS.
			for part, mult := 0, 3600; part < 3; part, mult = part+1, mult/60 {
				if part > 0 {
					if i == len(b) {
						break
					}
					if b[i] != ':' {
						return time.Time{}, false
					}
					i++
				}
				if len(b)-i < 2 {
					return time.Time{}, false
				}
				v, ok := digits(b[i : i+2])
				if !ok || (part > 0 && v > 59) {
					return time.Time{}, false
				}
				offset += v * mult
				i += 2
			}
			offset *= sign
		default:
			return time.Time{}, false
		}
	}
	if i != len(b) {
		return time.Time{}, false
	}
	t := time.Date(year, time.Month(month), day, hour, minute, sec, micro*1000, time.UTC).Add(-time.Duration(offset) * time.Second)
	if y := t.Year(); y < 0 || y > 9999 {
		return time.Time{}, false
	}
	return t, true
}

func digits(b []byte) (int, bool) {
	n := 0
	for _, c := range b {
		if c < '0' || c > '9' {
			return 0, false
		}
		n = n*10 + int(c-'0')
	}
	return n, true
}

func daysIn(month, year int) int {
	switch month {
	case 2:
		if year%4 == 0 && (year%100 != 0 || year%400 == 0) {
			return 29
		}
		return 28
	case 4, 6, 9, 11:
		return 30
	default:
		return 31
	}
}

// appendTimestamp appends t in UTC as "YYYY-MM-DDTHH:MM:SS.ffffffZ" (RFC 3339
// with exactly 6 fraction digits), quoted. t's year must be in 0..9999.
func appendTimestamp(dst []byte, t time.Time) []byte {
	t = t.UTC()
	year, month, day := t.Date()
	hour, minute, sec := t.Clock()
	micro := t.Nanosecond() / 1000
	var buf [29]byte
	buf[0] = '"'
	put(buf[1:5], year)
	buf[5] = '-'
	put(buf[6:8], int(month))
	buf[8] = '-'
	put(buf[9:11], day)
	buf[11] = 'T'
	put(buf[12:14], hour)
	buf[14] = ':'
	put(buf[15:17], minute)
	buf[17] = ':'
	put(buf[18:20], sec)
	buf[20] = '.'
	put(buf[21:27], micro)
	buf[27] = 'Z'
	buf[28] = '"'
	return append(dst, buf[:]...)
}

// put writes v as len(b) zero-padded decimal digits.
func put(b []byte, v int) {
	for i := len(b) - 1; i >= 0; i-- {
		b[i] = byte('0' + v%10)
		v /= 10
	}
}
