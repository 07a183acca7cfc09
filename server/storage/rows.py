"""Runs and alerts as table rows and back: the column order and JSON text every SQL
backend stores them in."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from raresignal.server.storage.records import AlertRecord, RunRecord


def run_from_row(row: Mapping[str, Any]) -> RunRecord:
    return RunRecord(
        run_id=row["run_id"], run_name=row["run_name"], state=row["state"],
        world_size=row["world_size"], created_at=row["created_at"],
        updated_at=row["updated_at"], last_step=row["last_step"],
        report_interval_seconds=row["report_interval_seconds"],
        config=json.loads(row["config"]), tags=json.loads(row["tags"]),
        agent_version=row["agent_version"], finished_at=row["finished_at"],
    )


def alert_from_row(row: Mapping[str, Any]) -> AlertRecord:
    return AlertRecord(
        alert_id=row["alert_id"], run_id=row["run_id"], run_name=row["run_name"],
        rule=row["rule"], labels=json.loads(row["labels"]), state=row["state"],
        severity=row["severity"], summary=row["summary"], value=row["value"],
        threshold=row["threshold"], step=row["step"], started_at=row["started_at"],
        fired_at=row["fired_at"], resolved_at=row["resolved_at"],
    )


def alert_row(alert: AlertRecord) -> tuple[Any, ...]:
    """The alerts table's columns, in order."""
    return (alert.alert_id, alert.run_id, alert.run_name, alert.rule,
            json.dumps(alert.labels, sort_keys=True), alert.state, alert.severity,
            alert.summary, alert.value, alert.threshold, alert.step, alert.started_at,
            alert.fired_at, alert.resolved_at)


def run_row(run: RunRecord) -> tuple[Any, ...]:
    """The runs table's columns, in order."""
    return (run.run_id, run.run_name, run.state, run.world_size, run.created_at,
            run.updated_at, run.last_step, run.report_interval_seconds,
            json.dumps(run.config, sort_keys=True), json.dumps(run.tags, sort_keys=True),
            run.agent_version, run.finished_at)
