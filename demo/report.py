"""The demo's PNG report: the run report the client draws (``client.report_figure``)."""

from raresignal.client.report_figure import PANEL_TITLES, AlertMark, plot_report, write_report

__all__ = ["PANEL_TITLES", "AlertMark", "plot_report", "write_report"]
