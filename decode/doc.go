// Package decode turns pgoutput logical replication messages (protocol version 1)
// into outbox events.
//
// It is pure: no I/O, goroutines or logging. A Decoder keeps the relation cache
// (relation messages replace earlier ones, so ALTER TABLE is followed) and matches
// columns by name, so any table with at least an id column works. Malformed input
// returns an error; it never panics.
package decode
