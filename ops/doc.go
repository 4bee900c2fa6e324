// Package ops holds the logic of outboxd's operator commands: status, slot
// status|create|drop|reset|advance, replay and prune. cmd/outboxd parses flags
// and prints; everything that touches the database lives here, so it is tested
// against a real Postgres without the CLI.
//
// The outbox table, not the slot, is the source of truth (docs/DESIGN.md §1): every
// repair of the slot leaves the database in a state from which the next
// `outboxd run` delivers every row still unprocessed.
//
// Invariants:
//   - No command ever deletes or edits an unprocessed outbox row, and replay
//     never marks rows or touches the slot.
//   - A slot is recreated only behind a checkpoint with catchup_pending = true
//     (written before the old slot is dropped), so that a crash at any step of
//     create or reset leaves a state the daemon resolves by recreating the slot
//     with an exported snapshot and catching up from the table.
//   - A slot held by another process (active_pid) is never dropped, reset or
//     advanced unless the caller forces it, which terminates that backend first.
//   - The slot only moves forward: advance refuses an LSN behind
//     confirmed_flush_lsn.
//   - Nothing printed or returned contains a DSN password, a webhook secret or
//     a signature: configuration is shown through Redact.
package ops
