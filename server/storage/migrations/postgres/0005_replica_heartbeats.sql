-- Each replica's last lease renewal, on the database's clock. A replica counts as live
-- while its row has not expired, even before it holds any lease, so the replicas size
-- their share of the runs to take (ceil(runs / live replicas)) from every live replica,
-- and a replica that starts after the others still gets runs as they open or expire.
CREATE TABLE replicas (
    replica_id TEXT COLLATE "C" PRIMARY KEY,
    expires_at TIMESTAMPTZ NOT NULL
);
