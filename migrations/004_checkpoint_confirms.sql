-- Version 4: the checkpoint records every position confirmed to the slot.
-- From this version on, outboxd writes an idle advance (a keepalive's WAL end
-- confirmed while nothing is in flight) to outboxd_checkpoint before it
-- confirms it, so the slot's confirmed_flush_lsn is never ahead of the
-- checkpoint by outboxd's own doing: a slot found ahead of it at start was
-- advanced by someone else, past rows outboxd may never have delivered.
-- confirms_recorded marks checkpoints written that way; older ones (false)
-- are compared the old way until their next write. A tern template.

SET LOCAL lock_timeout = '15s';

ALTER TABLE {{.schema}}.outboxd_checkpoint
  ADD COLUMN IF NOT EXISTS confirms_recorded boolean NOT NULL DEFAULT false;
