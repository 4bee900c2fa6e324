-- Version 12: a property filter per subscription (README.md "Filters and
-- masking"). filter is an expr-lang expression evaluated against each event's
-- envelope, such as event_name == 'x' && properties.delta < 0; NULL (the
-- default, and what every existing subscription gets) delivers every event its
-- organization and event globs let through. `outboxd subscription add/update
-- --filter` compiles it before storing it; one stored by other means that
-- does not compile makes the daemon log an error and send the subscription
-- nothing. Changes reach the daemon through the replication stream in commit
-- order, like the other columns, and the filter is kept in the routing state
-- with the checkpoint. A tern template.

SET LOCAL lock_timeout = '15s';

ALTER TABLE {{.schema}}.outboxd_subscription ADD COLUMN IF NOT EXISTS filter text;
