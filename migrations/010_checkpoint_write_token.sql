-- Each checkpoint write stores a random token with the checkpoint: when the
-- answer to its COMMIT is lost and the server restarts before outboxd can
-- ask (a transaction id that never became durable is given again after a
-- restart), the token tells whether the write is in the database, so that it
-- is neither written twice (attempts counted twice) nor taken as written.
ALTER TABLE {{.schema}}.outboxd_checkpoint ADD COLUMN IF NOT EXISTS write_token text;
