"""The demo's PNG report draws every named panel, the data given and the alerts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from raresignal.demo.report import PANEL_TITLES, AlertMark, write_report

SERIES = {
    "probe_accuracy{probe=rare}": [(0, 0.1), (100, 1.0), (200, 0.4)],
    "probe_accuracy{probe=common}": [(0, 0.1), (100, 1.0), (200, 1.0)],
    "probe_fisher_mass_ratio{probe=rare}": [(0, 2.0), (100, 3.0), (200, 0.1)],
    "probe_absorption{probe=rare}": [(0, 0.2), (100, 0.3), (200, 0.9)],
    "probe_bulk_residual{probe=rare}": [(0, 0.8), (100, 0.7), (200, 0.05)],
    "sharpness_ratio": [(0, 0.2), (100, 0.5), (200, 0.6)],
    "subspace_overlap": [(0, 0.9), (100, 0.8), (200, 0.3)],
}


def test_report_png_opens_and_each_panel_holds_its_series(tmp_path: Path) -> None:
    path = tmp_path / "report.png"
    figure = write_report(SERIES, [AlertMark(150, "RareSignalAbsorbed")], "demo", path,
                          collapse_step=120)

    with Image.open(path) as image:
        width, height = image.size
        pixels = np.asarray(image.convert("L"))
    assert 600 <= width <= 2000 and 800 <= height <= 2500
    assert pixels.std() > 10, "the image is blank"

    axes = {ax.get_title(loc="left"): ax for ax in figure.axes}
    assert list(axes) == list(PANEL_TITLES)
    labels = {title: [line.get_label() for line in ax.get_lines()] for title, ax in axes.items()}
    assert "probe_accuracy rare" in labels["Probe accuracy"]
    assert "probe_accuracy common" in labels["Probe accuracy"]
    assert "bulk residual rare" in labels["Absorption / bulk residual"]
    assert "absorption rare" in labels["Absorption / bulk residual"]
    assert "stability threshold" in labels["Sharpness vs stability threshold"]
    assert axes["Probe Fisher mass ratio"].get_yscale() == "log"
    # The alert is a vertical line at step 150 on every panel.
    for ax in figure.axes:
        alert_lines = [line for line in ax.get_lines() if line.get_label() == "alert fired"]
        assert len(alert_lines) == 1 and list(alert_lines[0].get_xdata()) == [150, 150]
    rare = next(line for line in axes["Probe accuracy"].get_lines()
                if line.get_label() == "probe_accuracy rare")
    assert list(rare.get_ydata()) == [0.1, 1.0, 0.4]


def test_report_without_alerts_draws_no_alert_line(tmp_path: Path) -> None:
    figure = write_report(SERIES, [], "control", tmp_path / "healthy.png")
    for ax in figure.axes:
        assert all(line.get_label() != "alert fired" for line in ax.get_lines())


def test_alert_printer_prints_firing_and_resolution_but_not_silent_pending(capsys) -> None:
    from raresignal.demo.app import AlertPrinter
    from raresignal.protos.v1 import alerts_pb2, common_pb2

    def event(alert_id: str, state: int) -> alerts_pb2.AlertEvent:
        return alerts_pb2.AlertEvent(alert=common_pb2.Alert(
            alert_id=alert_id, rule="RareSignalInterference", labels={"probe": "rare"},
            state=state, step=343, value=0.19, threshold=0.27, summary="interference fell"))

    printer = AlertPrinter()
    printer(event("a", common_pb2.ALERT_STATE_PENDING))
    printer(event("b", common_pb2.ALERT_STATE_RESOLVED))  # pending that never fired
    assert capsys.readouterr().out == ""
    printer(event("a", common_pb2.ALERT_STATE_FIRING))
    printer(event("a", common_pb2.ALERT_STATE_RESOLVED))
    lines = [line for line in capsys.readouterr().out.splitlines() if line]
    assert lines == [
        ">>> ALERT FIRING: RareSignalInterference{probe=rare} at step 343: interference fell "
        "(value 0.19, threshold 0.27)",
        ">>> ALERT RESOLVED: RareSignalInterference{probe=rare} at step 343 (value 0.19)",
    ]
