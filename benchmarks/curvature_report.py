"""Plain-text tables of the curvature benchmark's results."""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from curvature_fisher import FisherReport
from curvature_sharpness import (
    PYHESSIAN_DEFAULT,
    PYHESSIAN_TUNED,
    RARESIGNAL_COLD,
    RARESIGNAL_WARM,
    TARGET,
    SharpnessReport,
)

HVP_RATIO_TARGET = 10.0  # PyHessian defaults / raresignal warm


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell; the first column left-aligned, others right."""
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True)))

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


def _ms(seconds: float) -> str:
    return f"{1000 * seconds:.1f}"


def _spread(values: Sequence[int]) -> str:
    median = statistics.median(values)
    low, high = min(values), max(values)
    middle = f"{median:.0f}" if median == int(median) else f"{median:.1f}"
    return middle if low == high else f"{middle} [{low}-{high}]"


def hvp_ratio(report: SharpnessReport, numerator: str, denominator: str) -> float | None:
    """Median products of one method over the median of another, when both ran."""
    if numerator not in report.methods or denominator not in report.methods:
        return None
    return (statistics.median(report.methods[numerator].hvps)
            / statistics.median(report.methods[denominator].hvps))


def time_ratio(report: SharpnessReport, numerator: str, denominator: str) -> float | None:
    if numerator not in report.methods or denominator not in report.methods:
        return None
    return (statistics.median(report.methods[numerator].seconds)
            / statistics.median(report.methods[denominator].seconds))


def sharpness_text(report: SharpnessReport) -> str:
    exact = report.exact
    lines = [f"lambda_max: {report.workload} ({report.parameters:,} parameters, batch "
             f"{report.batch}); exact by {exact[0].method}; point 0 is the cold start, each "
             f"later point follows {report.sgd_steps_between_points} SGD steps", ""]
    point_rows = [[str(i), f"{s.top:.5f}", f"{s.gap_ratio:.3f}",
                   "-" if s.bottom is None else f"{s.bottom:.4f}",
                   str(s.hvps) if s.hvps else "-", _ms(s.seconds)]
                  for i, s in enumerate(exact)]
    lines.append(table(["point", "exact lambda_max", "lambda_2/lambda_1", "lambda_min",
                        "exact HVPs", "exact ms"], point_rows))
    lines.append("")
    rows = []
    for name, record in report.methods.items():
        errors = record.errors
        rows.append([name, str(len(errors)), _spread(record.hvps),
                     _ms(statistics.median(record.seconds)),
                     f"{statistics.median(errors):.2%}", f"{max(errors):.2%}",
                     f"{record.within_target:.0%}"])
    lines.append(table(["method", "runs", "HVPs median [range]", "wall ms median",
                        "rel. error median", "rel. error max",
                        f"within {TARGET:.0%}"], rows))
    lines.append("")
    lines += _ratios(report)
    lines += [f"note: {n}" for n in report.notes]
    return "\n".join(lines)


def _ratios(report: SharpnessReport) -> list[str]:
    out = []
    warm = hvp_ratio(report, PYHESSIAN_DEFAULT, RARESIGNAL_WARM)
    if warm is not None:
        met = "met" if warm >= HVP_RATIO_TARGET else "missed"
        seconds = time_ratio(report, PYHESSIAN_DEFAULT, RARESIGNAL_WARM)
        out.append(f"PyHessian defaults / raresignal warm: {warm:.1f}x the HVPs, "
                   f"{seconds:.1f}x the wall time (target >= {HVP_RATIO_TARGET:.0f}x HVPs: "
                   f"{met})")
    cold = hvp_ratio(report, PYHESSIAN_DEFAULT, RARESIGNAL_COLD)
    if cold is not None:
        seconds = time_ratio(report, PYHESSIAN_DEFAULT, RARESIGNAL_COLD)
        out.append(f"PyHessian defaults / raresignal cold: {cold:.1f}x the HVPs, "
                   f"{seconds:.1f}x the wall time")
    if RARESIGNAL_COLD in report.methods and report.methods[RARESIGNAL_COLD].within_target < 1:
        found = report.raresignal_tol_for_target
        out.append(f"raresignal's default stopping rule missed {TARGET:.0%} from a cold start; "
                   + (f"tol={found:g} reached it" if found is not None
                      else "no tolerance tried reached it"))
    tuned = hvp_ratio(report, PYHESSIAN_TUNED, RARESIGNAL_WARM)
    if tuned is not None:
        tols = sorted({t for t in report.pyhessian_tols if t is not None})
        chosen = ", ".join(f"{t:g}" for t in tols)
        out.append(f"{PYHESSIAN_TUNED} (at each point the loosest tolerance that lands "
                   f"every start within {TARGET:.0%}; here {chosen}) / raresignal warm: "
                   f"{tuned:.1f}x the HVPs")
    return out


def fisher_text(report: FisherReport) -> str:
    groups = list(report.exact)
    lines = [f"Fisher diagonal trace per layer group: {report.workload} "
             f"({report.parameters:,} parameters, batch {report.batch})", ""]
    lines.append(table(["group", *groups],
                       [["exact (all labels enumerated)",
                         *(f"{report.exact[g]:.4g}" for g in groups)]]))
    lines.append(f"exact enumeration took {_ms(report.exact_seconds)} ms")
    lines.append("")
    rows = []
    for name, method in report.methods.items():
        rows.append([name, str(len(method.seconds)), _ms(statistics.median(method.seconds)),
                     *(f"{statistics.median(method.errors[g]):.2%}" for g in groups),
                     f"{statistics.median(method.total_errors):.2%}"])
    lines.append(table(["method (median rel. error per group)", "runs", "wall ms median",
                        *groups, "all groups"], rows))
    lines += [f"note: {n}" for n in report.notes]
    return "\n".join(lines)
