// Package checkpoint decides how far outboxd may confirm to Postgres, and makes
// that decision durable.
//
// The Tracker follows every transaction the reader has opened, in commit order,
// and counts its settled events (delivered or dead-lettered). Its low-water mark
// advances only over the contiguous prefix of transactions that are closed and
// fully settled, so out-of-order settles never move it past an unsettled
// transaction (G2).
//
// The Flusher drains the tracker on a size or time trigger and writes
// (store.SlotStore.Write, which owns the statements), in ONE database
// transaction, the processed marks of the settled rows, their dead
// letters and the checkpoint LSN (the end LSN of the last transaction of the
// settled prefix). Only after that transaction commits is the LSN published as
// Flushed, which is what the reader reports to Postgres as flush/apply.
package checkpoint
