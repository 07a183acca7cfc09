"""Stored records to wire messages."""

from __future__ import annotations

from raresignal.protos.v1 import common_pb2
from raresignal.server.storage.records import AlertRecord, RunRecord


def run_info(run: RunRecord) -> common_pb2.RunInfo:
    return common_pb2.RunInfo(
        run_id=run.run_id, run_name=run.run_name, state=run.state, world_size=run.world_size,
        created_at=run.created_at, updated_at=run.updated_at, last_step=run.last_step,
        report_interval_seconds=run.report_interval_seconds, config=run.config,
        tags=run.tags)


def alert_message(alert: AlertRecord) -> common_pb2.Alert:
    return common_pb2.Alert(
        alert_id=alert.alert_id, run_id=alert.run_id, run_name=alert.run_name,
        rule=alert.rule, labels=alert.labels, state=alert.state, severity=alert.severity,
        summary=alert.summary, value=alert.value, threshold=alert.threshold, step=alert.step,
        started_at=alert.started_at, fired_at=alert.fired_at, resolved_at=alert.resolved_at)
