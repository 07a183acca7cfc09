-- Samples are partitioned by wall time, one partition per UTC day, so retention drops a
-- whole day's table instead of deleting rows (no dead tuples, no vacuum debt). A unique
-- key of a partitioned table must hold the partition key, hence wall_time in the primary
-- key; (series_id, step) stays unique because the backend replaces a re-reported step
-- by updating its row, never by inserting a second one.
ALTER TABLE samples RENAME TO samples_unpartitioned;
ALTER TABLE samples_unpartitioned RENAME CONSTRAINT samples_pkey TO samples_unpartitioned_pkey;

CREATE TABLE samples (
    series_id BIGINT NOT NULL,
    step BIGINT NOT NULL,
    value DOUBLE PRECISION NOT NULL,
    wall_time DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (series_id, step, wall_time)
) PARTITION BY RANGE (wall_time);

-- Catches a sample whose day has no partition (a client clock far off, a spool older than
-- the server): an insert never fails for want of a partition. The server moves a day's
-- rows out of it when it creates that day's partition.
CREATE TABLE samples_default PARTITION OF samples DEFAULT;

-- A partition for every day the stored samples span, named samples_YYYYMMDD.
DO $$
DECLARE
    day BIGINT;
BEGIN
    FOR day IN SELECT DISTINCT floor(wall_time / 86400)::BIGINT FROM samples_unpartitioned
    LOOP
        EXECUTE format('CREATE TABLE %I PARTITION OF samples FOR VALUES FROM (%s) TO (%s)',
                       'samples_' || to_char(to_timestamp(day * 86400) AT TIME ZONE 'UTC',
                                             'YYYYMMDD'),
                       day * 86400, (day + 1) * 86400);
    END LOOP;
END
$$;

INSERT INTO samples SELECT series_id, step, value, wall_time FROM samples_unpartitioned;
DROP TABLE samples_unpartitioned;
