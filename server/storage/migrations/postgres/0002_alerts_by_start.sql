-- Alerts are listed newest first in pages that resume after (started_at, alert_id): this
-- index serves that order directly, so a page reads its own rows, not every alert.
CREATE INDEX alerts_by_start ON alerts (started_at DESC, alert_id);
