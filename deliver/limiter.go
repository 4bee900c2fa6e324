package deliver

import (
	"strings"
	"sync"
)

// CallLimiter runs the sink calls of many dispatchers, at most Limit at once
// per key (the host a subscription's webhook posts to). A call beyond the
// limit waits as a queued function, in the order the calls were handed out,
// not as a goroutine blocked in net/http: thousands of subscriptions
// pointing at one receiver, each with its own concurrency, would otherwise
// hold thousands of goroutines waiting for one of the host's connections.
// The goroutine that finishes a call runs the next one queued under its key,
// so a key holds at most Limit goroutines and none when it has no call.
type CallLimiter struct {
	limit int
	mu    sync.Mutex
	keys  map[string]*callQueue
}

type callQueue struct {
	running int
	waiting []func()
}

// NewCallLimiter returns a limiter of limit calls at once per key (limit
// must be positive).
func NewCallLimiter(limit int) *CallLimiter {
	return &CallLimiter{limit: limit, keys: map[string]*callQueue{}}
}

// Go runs call on a goroutine of its own when fewer than Limit calls of key
// run, or queues it behind them.
func (l *CallLimiter) Go(key string, call func()) {
	l.mu.Lock()
	q := l.keys[key]
	if q == nil {
		q = &callQueue{}
		l.keys[key] = q
	}
	if q.running >= l.limit {
		q.waiting = append(q.waiting, call)
		l.mu.Unlock()
		return
	}
	q.running++
	l.mu.Unlock()
	go l.work(key, q, call)
}

// work runs call, then the calls queued under key, until none is left.
func (l *CallLimiter) work(key string, q *callQueue, call func()) {
	for {
		call()
		l.mu.Lock()
		if len(q.waiting) == 0 {
			q.running--
			if q.running == 0 {
				delete(l.keys, key)
			}
			l.mu.Unlock()
			return
		}
		call = q.waiting[0]
		q.waiting[0] = nil
		q.waiting = q.waiting[1:]
		if len(q.waiting) == 0 {
			q.waiting = nil // the backing array goes with the last one
		}
		l.mu.Unlock()
	}
}

// webhookHost is the key a webhook subscription's calls are limited under:
// the scheme and host (with its port) its URL posts to, as the HTTP
// transport keys its connections; "" (no limit) when it has none (such a
// URL's sink refuses every delivery without a request). Read without
// url.Parse: a target's sink is built for each run of deliveries.
func webhookHost(raw string) string {
	scheme, rest, ok := strings.Cut(raw, "://")
	if !ok || scheme == "" {
		return ""
	}
	if i := strings.IndexAny(rest, "/?#"); i >= 0 {
		rest = rest[:i]
	}
	if i := strings.LastIndexByte(rest, '@'); i >= 0 {
		rest = rest[i+1:] // userinfo
	}
	if rest == "" {
		return ""
	}
	scheme, rest = strings.ToLower(scheme), strings.ToLower(rest)
	if i := strings.LastIndexByte(rest, ':'); i < 0 || strings.HasSuffix(rest, "]") {
		// No port (an IPv6 literal ends with its bracket).
		if scheme == "https" {
			rest += ":443"
		} else {
			rest += ":80"
		}
	}
	return scheme + "://" + rest
}
