// Package cdc owns the replication connection: it prepares the slot (creating
// it with an exported snapshot when missing, reconciling it with the stored
// checkpoint otherwise), reads unprocessed rows committed before the slot
// existed (catch-up), streams pgoutput changes and keeps the walsender
// satisfied with standby status updates. It knows nothing of sinks.
//
// Invariants:
//   - Events leave the reader in commit order; catch-up rows come before any
//     streamed row.
//   - The reader never blocks on a full output without still sending standby
//     status updates, so wal_sender_timeout cannot fire while sinks are slow.
//   - flush and apply positions are never beyond the ledger's durable position
//     (G2); a keepalive's WAL end is adopted only when nothing is in flight.
//   - After a reconnect, streaming resumes after the last fully received
//     transaction; a transaction cut in the middle is resumed, its already
//     dispatched events skipped, so nothing is handed downstream twice.
package cdc
