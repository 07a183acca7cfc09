-- The schema of the SQLite backend, in PostgreSQL's types: 64-bit steps and sequences,
-- double precision values, labels and settings as canonical JSON text. Identifiers that
-- reads order by use the "C" collation, so the order is the bytes' order on every cluster.
CREATE TABLE runs (
    run_id TEXT COLLATE "C" PRIMARY KEY,
    run_name TEXT NOT NULL,
    state INTEGER NOT NULL,
    world_size INTEGER NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL,
    last_step BIGINT NOT NULL,
    report_interval_seconds DOUBLE PRECISION NOT NULL,
    config TEXT NOT NULL,
    tags TEXT NOT NULL,
    agent_version TEXT NOT NULL,
    finished_at DOUBLE PRECISION NOT NULL
);

CREATE TABLE series (
    series_id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id TEXT COLLATE "C" NOT NULL REFERENCES runs (run_id),
    metric TEXT COLLATE "C" NOT NULL,
    labels TEXT COLLATE "C" NOT NULL,
    last_step BIGINT NOT NULL DEFAULT -1,
    last_value DOUBLE PRECISION,
    last_wall_time DOUBLE PRECISION,
    UNIQUE (run_id, metric, labels)
);

CREATE TABLE samples (
    series_id BIGINT NOT NULL,
    step BIGINT NOT NULL,
    value DOUBLE PRECISION NOT NULL,
    wall_time DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (series_id, step)
);

CREATE TABLE sender_sequences (
    run_id TEXT COLLATE "C" NOT NULL,
    sender_id TEXT COLLATE "C" NOT NULL,
    last_sequence BIGINT NOT NULL,
    PRIMARY KEY (run_id, sender_id)
);

CREATE TABLE rule_states (
    run_id TEXT COLLATE "C" NOT NULL,
    state_key TEXT COLLATE "C" NOT NULL,
    state TEXT NOT NULL,
    PRIMARY KEY (run_id, state_key)
);

CREATE TABLE alerts (
    alert_id TEXT COLLATE "C" PRIMARY KEY,
    run_id TEXT COLLATE "C" NOT NULL,
    run_name TEXT NOT NULL,
    rule TEXT COLLATE "C" NOT NULL,
    labels TEXT NOT NULL,
    state INTEGER NOT NULL,
    severity TEXT NOT NULL,
    summary TEXT NOT NULL,
    value DOUBLE PRECISION NOT NULL,
    threshold DOUBLE PRECISION NOT NULL,
    step BIGINT NOT NULL,
    started_at DOUBLE PRECISION NOT NULL,
    fired_at DOUBLE PRECISION NOT NULL,
    resolved_at DOUBLE PRECISION NOT NULL
);
CREATE INDEX alerts_by_run ON alerts (run_id, started_at);

CREATE TABLE alert_history (
    alert_id TEXT COLLATE "C" NOT NULL,
    previous_state INTEGER NOT NULL,
    state INTEGER NOT NULL,
    at DOUBLE PRECISION NOT NULL,
    value DOUBLE PRECISION NOT NULL,
    step BIGINT NOT NULL
);
CREATE INDEX alert_history_by_alert ON alert_history (alert_id);
