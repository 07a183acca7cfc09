"""The run report as one self-contained HTML page: the PNG inline and a table of alerts,
so the page can be mailed or attached to a ticket on its own."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence

from raresignal.client.options import wall_time
from raresignal.protos.v1 import common_pb2

ALERT_COLUMNS = ("Since", "State", "Severity", "Alert", "Labels", "Value", "Threshold",
                 "Step", "Summary")


def _alert_cells(alert: common_pb2.Alert) -> tuple[str, ...]:
    labels = ",".join(f"{k}={v}" for k, v in sorted(alert.labels.items()))
    state = common_pb2.AlertState.Name(alert.state).removeprefix("ALERT_STATE_").lower()
    return (wall_time(alert.started_at), state, alert.severity, alert.rule, labels or "-",
            f"{alert.value:.4g}", f"{alert.threshold:.4g}", str(alert.step), alert.summary)


def report_html(run: common_pb2.RunInfo, png: bytes, alerts: Sequence[common_pb2.Alert]
                ) -> str:
    """The page: the run's name, id and state, the figure, then every alert."""
    state = common_pb2.RunState.Name(run.state).removeprefix("RUN_STATE_").lower()
    title = html.escape(f"raresignal report: {run.run_name}")
    header = "".join(f"<th>{html.escape(c)}</th>" for c in ALERT_COLUMNS)
    rows = "\n".join(
        "<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in _alert_cells(a))
        + "</tr>" for a in alerts)
    alert_section = (f"<table>\n<tr>{header}</tr>\n{rows}\n</table>" if alerts
                     else "<p>No alerts.</p>")
    image = base64.b64encode(png).decode()
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; }}
table {{ border-collapse: collapse; font-size: 0.9em; }}
th, td {{ border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; }}
img {{ max-width: 100%; }}
</style>
</head>
<body>
<h1>{title}</h1>
<p>run id <code>{html.escape(run.run_id)}</code>, {html.escape(state)}, last step
{run.last_step}, last report {html.escape(wall_time(run.updated_at))}</p>
<img alt="signals of the run, alerts marked" src="data:image/png;base64,{image}">
<h2>Alerts</h2>
{alert_section}
</body>
</html>
"""
