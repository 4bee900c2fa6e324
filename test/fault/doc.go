// Package fault is outboxd's fault-injection suite (issue 5, docs/DESIGN.md §1): it
// runs the real outboxd binary as a child process against a real Postgres,
// through a TCP proxy that can cut or black-hole connections, delivering to a
// receiver with scripted behaviours, while a generator records every commit.
// For each scenario a checker computes events lost, duplicates (total and max
// per id), unexpected events, out-of-order deliveries within an ordering key,
// recovery time, peak retained WAL and the daemon's peak memory, and the suite
// prints one table row per scenario.
//
// Run it with
//
//	go test ./test/fault/ -v -run TestFault          # short matrix (CI)
//	OUTBOXD_FAULT_FULL=1 go test ./test/fault/ -v -run TestFault -timeout 60m
//
// and set OUTBOXD_FAULT_REPORT=path to also write the table as Markdown.
//
// Invariants every scenario asserts (G1, G4, G5): no committed row is lost
// (delivered with a 2xx, or dead-lettered where the scenario makes it so); no
// row the receiver was not meant to get is delivered; within an ordering key
// the first receipts follow commit order; a row marked processed before a
// crash is not delivered again, and every copy of an event carries the same
// webhook-id. The code is test-only: it lives in _test.go files.
package fault
