-- Replicas on one database. Each run's alert evaluation is owned by one replica at a time,
-- through a lease row renewed on the database's clock (so replicas' clocks need not
-- agree); an expired lease may be taken by any replica.
CREATE TABLE run_leases (
    run_id TEXT COLLATE "C" PRIMARY KEY,
    owner TEXT NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL
);
CREATE INDEX run_leases_by_owner ON run_leases (owner);

-- What a run's owner has still to feed its alert engine: reports, heartbeats and closes,
-- written by whichever replica received them in the transaction that applied them. The
-- owner deletes the rows it evaluates in the transaction that stores the engine's writes,
-- so each is evaluated once, whoever received it and whoever owns the run.
CREATE TABLE evaluation_queue (
    position BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id TEXT COLLATE "C" NOT NULL,
    kind SMALLINT NOT NULL,
    received_at DOUBLE PRECISION NOT NULL,
    step BIGINT NOT NULL,
    samples TEXT NOT NULL
);
CREATE INDEX evaluation_queue_by_run ON evaluation_queue (run_id, position);

-- A transition is written once: a writer that replays one (a lost lease's last commit
-- racing its successor's) finds it there. One alert takes each (from, to) transition at
-- most once per step, so rows that share all four are copies, and one of each is kept.
DELETE FROM alert_history a USING alert_history b
    WHERE a.ctid > b.ctid AND a.alert_id = b.alert_id
    AND a.previous_state = b.previous_state AND a.state = b.state AND a.step = b.step;
CREATE UNIQUE INDEX alert_history_once
    ON alert_history (alert_id, previous_state, state, step);
