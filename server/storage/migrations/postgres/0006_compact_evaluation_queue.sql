-- The evaluation queue carries only what the runs' owners evaluate (the samples of the
-- metrics some replica's rules read, and each series' newest sample), packed: the distinct
-- series as JSON and one fixed-size record per sample (storage.queue_codec). Rows queued
-- before this migration keep their JSON `samples` and are read as they are; new rows leave
-- it NULL, so a server from before this migration fails on them (loudly, taking nothing
-- off the queue) instead of evaluating a report as if it held no samples: upgrade every
-- replica before they take new reports.
ALTER TABLE evaluation_queue ALTER COLUMN samples DROP NOT NULL;
ALTER TABLE evaluation_queue ADD COLUMN series TEXT, ADD COLUMN points BYTEA;

-- The metrics each live replica's rules read: every replica queues the samples of all of
-- them, so whichever replica owns a run has what its own rules need, even while a new
-- rules file is being rolled out replica by replica.
ALTER TABLE replicas ADD COLUMN rule_metrics TEXT[] NOT NULL DEFAULT '{}';
