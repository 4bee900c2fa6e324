package ops

import (
	"net/url"
	"regexp"
	"strings"
)

// Redacted replaces a secret in output.
const Redacted = "***"

// RedactDSN hides the password of a libpq URL or key/value string (and any
// sslpassword). A string it cannot parse is hidden whole: it may hold a
// password in a form not recognised.
func RedactDSN(dsn string) string {
	if dsn == "" {
		return ""
	}
	if strings.HasPrefix(dsn, "postgres://") || strings.HasPrefix(dsn, "postgresql://") {
		u, err := url.Parse(dsn)
		if err != nil {
			return Redacted
		}
		if u.User != nil {
			if _, has := u.User.Password(); has {
				u.User = url.UserPassword(u.User.Username(), Redacted)
			}
		}
		q := u.Query()
		changed := false
		for k := range q {
			if isSecretParam(k) {
				q.Set(k, Redacted)
				changed = true
			}
		}
		if changed {
			u.RawQuery = q.Encode()
		}
		// url.String would escape the asterisks of the userinfo.
		return strings.Replace(u.String(), url.QueryEscape(Redacted)+"@", Redacted+"@", 1)
	}
	return kvSecretRE.ReplaceAllString(dsn, "${1}"+Redacted)
}

// kvSecretRE matches password=value in a key/value string, the value bare or
// single-quoted with backslash escapes.
var kvSecretRE = regexp.MustCompile(`(?i)(\b(?:ssl)?password\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s]*)`)

func isSecretParam(k string) bool {
	k = strings.ToLower(k)
	return k == "password" || k == "sslpassword"
}

// RedactURL hides the password of a URL's userinfo, a userinfo without a
// password (a token, as NATS takes it: nats://token@host), and every query
// value (tokens often travel there). A comma-separated list of URLs (a NATS
// server list) is redacted URL by URL. It returns Redacted for what it
// cannot parse.
func RedactURL(raw string) string {
	if raw == "" {
		return ""
	}
	if strings.Contains(raw, ",") && strings.Count(raw, "://") > 1 {
		parts := strings.Split(raw, ",")
		for i, p := range parts {
			parts[i] = RedactURL(strings.TrimSpace(p))
		}
		return strings.Join(parts, ",")
	}
	u, err := url.Parse(raw)
	if err != nil {
		return Redacted
	}
	if u.User != nil {
		if _, has := u.User.Password(); has {
			u.User = url.UserPassword(u.User.Username(), Redacted)
		} else {
			u.User = url.User(Redacted)
		}
	}
	if u.RawQuery != "" {
		q := u.Query()
		for k := range q {
			q.Set(k, Redacted)
		}
		u.RawQuery = q.Encode()
	}
	u.Fragment = ""
	s := u.String()
	s = strings.Replace(s, ":"+url.QueryEscape(Redacted)+"@", ":"+Redacted+"@", 1)
	s = strings.Replace(s, "//"+url.QueryEscape(Redacted)+"@", "//"+Redacted+"@", 1)
	return strings.ReplaceAll(s, "="+url.QueryEscape(Redacted), "="+Redacted)
}
