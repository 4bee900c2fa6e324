package sink

import (
	"crypto/tls"
	"net"
	"net/http"
	"time"
)

// newGuardedTransport returns the HTTP transport of the sinks that POST to a
// URL from configuration (webhook, PostHog): never an environment proxy (it
// would bypass the address guard), TLS 1.2 or later, and, unless
// allowPrivate, a dialer that refuses loopback, private, link-local and other
// reserved addresses at connect time, after name resolution, so that a name
// resolving to such an address is refused too (G8).
func newGuardedTransport(timeout time.Duration, maxIdleConns int, allowPrivate bool) *http.Transport {
	dialer := &net.Dialer{Timeout: min(timeout, dialTimeout), KeepAlive: 30 * time.Second}
	if !allowPrivate {
		dialer.Control = refuseReserved
	}
	return &http.Transport{
		Proxy:                 nil,
		DialContext:           dialer.DialContext,
		ForceAttemptHTTP2:     true,
		TLSClientConfig:       &tls.Config{MinVersion: tls.VersionTLS12},
		TLSHandshakeTimeout:   min(timeout, tlsTimeout),
		MaxIdleConns:          maxIdleConns,
		MaxIdleConnsPerHost:   maxIdleConns,
		IdleConnTimeout:       90 * time.Second,
		ExpectContinueTimeout: time.Second,
	}
}
