"""The PNG report of a run: what the monitor saw, with the alerts marked.

Drawn by ``raresignal report`` and by the demo. It needs matplotlib (the ``demo`` extra),
so the client imports this module only inside the command that draws.

Five panels share the step axis — probe accuracy, probe Fisher mass ratio, absorption and
bulk residual, sharpness against its stability threshold, subspace overlap — and each
alert is a vertical line at the step it fired, so one look tells whether the alert came
before the rare probe's accuracy fell.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: the demo may run without a display

import matplotlib.pyplot as plt
from matplotlib.figure import Figure

# series key (as in Monitor.latest()) -> [(step, value), ...]
Series = Mapping[str, Sequence[tuple[int, float]]]

# Every metric a panel draws: the series a caller needs to fetch.
DRAWN_METRICS = ("probe_accuracy", "probe_retention", "probe_interference",
                 "probe_fisher_mass_ratio", "probe_absorption", "probe_bulk_residual",
                 "sharpness_ratio", "subspace_overlap")

PANEL_TITLES = (
    "Probe accuracy",
    "Retention / interference",
    "Probe Fisher mass ratio",
    "Absorption / bulk residual",
    "Sharpness vs stability threshold",
    "Subspace overlap",
)


@dataclass(frozen=True)
class AlertMark:
    """One alert to draw: the step it fired at and its rule name."""

    step: int
    rule: str


def _plot_metric(axes: plt.Axes, series: Series, metric: str, style: str = "-",
                 name: str | None = None) -> bool:
    """Draws every series of ``metric`` (one line per probe); False when there was none."""
    drew = False
    for key in sorted(series):
        base = key.split("{", 1)[0]
        if base != metric or not series[key]:
            continue
        steps, values = zip(*series[key], strict=True)
        probe = key[len(base):].strip("{}").replace("probe=", "")
        label = " ".join(part for part in (name or metric, probe) if part)
        axes.plot(steps, values, style, label=label, linewidth=1.4)
        drew = True
    return drew


def plot_report(series: Series, alerts: Sequence[AlertMark], title: str,
                collapse_step: int | None = None) -> Figure:
    """The report figure; one panel per entry of :data:`PANEL_TITLES`, in that order."""
    figure, axes = plt.subplots(len(PANEL_TITLES), 1, figsize=(10, 15), sharex=True,
                                layout="constrained")
    panels = dict(zip(PANEL_TITLES, axes, strict=True))

    _plot_metric(panels["Probe accuracy"], series, "probe_accuracy")
    panels["Probe accuracy"].set_ylim(-0.05, 1.05)

    # What the default rare-signal rules watch: retention (share of the probe's gradient
    # energy in its reference directions) and interference (cosine with the net update).
    kept = panels["Retention / interference"]
    _plot_metric(kept, series, "probe_retention", name="retention")
    _plot_metric(kept, series, "probe_interference", "--", name="interference")
    kept.axhline(0.0, color="black", linestyle=":", linewidth=1.0)

    ratio_axes = panels["Probe Fisher mass ratio"]
    if _plot_metric(ratio_axes, series, "probe_fisher_mass_ratio"):
        ratio_axes.set_yscale("log")

    _plot_metric(panels["Absorption / bulk residual"], series, "probe_absorption",
                 name="absorption")
    _plot_metric(panels["Absorption / bulk residual"], series, "probe_bulk_residual", "--",
                 name="bulk residual")
    panels["Absorption / bulk residual"].set_ylim(-0.05, 1.05)

    sharp_axes = panels["Sharpness vs stability threshold"]
    _plot_metric(sharp_axes, series, "sharpness_ratio", name="sharpness / threshold")
    sharp_axes.axhline(1.0, color="black", linestyle=":", linewidth=1.0,
                       label="stability threshold")

    _plot_metric(panels["Subspace overlap"], series, "subspace_overlap",
                 name="overlap (chance-corrected)")
    panels["Subspace overlap"].set_xlabel("optimizer step")

    last_step = max((step for points in series.values() for step, _ in points), default=0)
    for panel_title, ax in panels.items():
        ax.set_title(panel_title, loc="left", fontsize=10)
        ax.grid(alpha=0.3)
        if collapse_step is not None:
            ax.axvspan(collapse_step, max(last_step, collapse_step), color="grey", alpha=0.1,
                       label="collapse induced")
        for index, alert in enumerate(alerts):
            ax.axvline(alert.step, color="crimson", linewidth=1.2,
                       label="alert fired" if index == 0 else None)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best", fontsize=8)
    if alerts:
        first = panels["Probe accuracy"]
        for alert in alerts:
            first.annotate(alert.rule, (alert.step, 1.0), rotation=90, fontsize=7,
                           color="crimson", va="top", ha="right")
    figure.suptitle(title)
    return figure


def write_report(series: Series, alerts: Sequence[AlertMark], title: str, path: Path,
                 collapse_step: int | None = None) -> Figure:
    """Draws the report and saves it as a PNG at ``path``; returns the figure."""
    figure = plot_report(series, alerts, title, collapse_step)
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return figure
