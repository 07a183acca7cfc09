"""`raresignal alerts` lists what fired; pending episodes that cleared stay out unless
asked for with --all."""

from __future__ import annotations

from raresignal.client.cli import build_parser, worth_listing
from raresignal.protos.v1 import common_pb2


def _alert(alert_id: str, state: int, fired_at: float) -> common_pb2.Alert:
    return common_pb2.Alert(alert_id=alert_id, state=state, fired_at=fired_at)


def test_unfired_episodes_are_left_out_unless_asked_for() -> None:
    alerts = [
        _alert("firing", common_pb2.ALERT_STATE_FIRING, 10.0),
        _alert("pending", common_pb2.ALERT_STATE_PENDING, 0.0),
        _alert("fired-then-resolved", common_pb2.ALERT_STATE_RESOLVED, 10.0),
        _alert("cleared-while-pending", common_pb2.ALERT_STATE_RESOLVED, 0.0),
    ]
    shown = [a.alert_id for a in worth_listing(alerts, include_unfired=False)]
    assert shown == ["firing", "pending", "fired-then-resolved"]
    assert len(worth_listing(alerts, include_unfired=True)) == 4
    assert build_parser().parse_args(["alerts", "--all"]).all is True
