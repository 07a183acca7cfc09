"""Per-layer traces of the true Fisher's diagonal: exact, raresignal, BackPACK.

Exact: enumeration over every label. For softmax cross-entropy the true Fisher is
F = 1/T sum_tokens sum_c p_c g_c g_c^T with g_c = grad log p(c | x), so the trace of a
layer's diagonal block is 1/T sum_tokens sum_c p_c |g_c restricted to the layer|^2, one
Jacobian of the log-probabilities per example (``torch.func.jacrev``). raresignal: the
shipped ``FisherEstimator`` (labels sampled from the model, exact per-example gradients).
BackPACK: ``DiagGGNExact`` (the exact GGN diagonal, which for softmax cross-entropy is the
exact Fisher diagonal) and ``DiagGGNMC`` (the same from sampled labels).
"""

from __future__ import annotations

import copy
import importlib
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import ModuleType

import torch
from curvature_models import Workload
from curvature_timing import interleaved, relative_error, repeat
from torch import nn
from torch.func import functional_call, jacrev

from raresignal.agent.api import Probe, StepContext, default_forward
from raresignal.agent.estimators import EstimatorConfig, build_shared_state
from raresignal.agent.estimators.default import FisherEstimator
from raresignal.agent.estimators.likelihood import IGNORE_INDEX
from raresignal.agent.estimators.parameters import top_level_group

Traces = dict[str, float]


def _group_sum(values: Mapping[str, torch.Tensor | float]) -> Traces:
    """Per-parameter totals summed into raresignal's default layer groups."""
    out: Traces = {}
    for name, value in values.items():
        group = top_level_group(name)
        out[group] = out.get(group, 0.0) + float(value)
    return out


def exact_fisher_traces(workload: Workload) -> Traces:
    """Per-group trace of the true Fisher by enumerating every label of every token."""
    model = workload.model
    point = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    totals = dict.fromkeys(point, 0.0)
    tokens = 0
    for i in range(len(workload.targets)):
        x, y = workload.inputs[i : i + 1], workload.targets[i : i + 1]
        scored = (y.reshape(-1) != IGNORE_INDEX)

        def log_probs(params: Mapping[str, torch.Tensor], x: torch.Tensor = x) -> torch.Tensor:
            logits = functional_call(model, dict(params), (x,))
            return torch.log_softmax(logits.reshape(-1, logits.shape[-1]).double(), dim=-1)

        with torch.no_grad():
            probs = log_probs(point).exp()[scored]
        jacobians = jacrev(log_probs)(point)  # name -> [tokens, classes, *shape]
        for name, jac in jacobians.items():
            squares = jac[scored].reshape(*probs.shape, -1).pow(2).sum(-1)
            totals[name] += float((probs * squares).sum())
        tokens += int(scored.sum())
    return _group_sum({n: v / tokens for n, v in totals.items()})


class RaresignalFisher:
    """The shipped Fisher estimator on the workload's fixed batch; each run draws new
    labels (the estimator seeds its draw from the step, so run ``i`` is step ``i``)."""

    def __init__(self, workload: Workload, draws: int) -> None:
        self.workload = workload
        config = EstimatorConfig(curvature_batch_size=len(workload.targets),
                                 fisher_label_draws=draws, empirical_fisher=False)
        shared = build_shared_state(workload.model, None,
                                    Probe(workload.inputs, workload.targets), config,
                                    task=workload.likelihood)
        self.estimator = FisherEstimator(shared)

    def traces(self, run: int) -> Traces:
        ctx = StepContext(step=run, model=self.workload.model, optimizer=None,
                          forward=default_forward)
        return {dict(m.labels)["group"]: m.value for m in self.estimator.run(ctx)
                if m.metric == "fisher_trace"}


def load_backpack() -> ModuleType | None:
    """BackPACK's package, or None (with the reason printed) when it cannot be imported."""
    try:
        module = importlib.import_module("backpack")
        importlib.import_module("backpack.extensions")
        return module
    except Exception as error:  # any import failure means: skip this peer
        print(f"BackPACK skipped: cannot import backpack ({type(error).__name__}: {error}); "
              "install it with `pip install backpack-for-pytorch` to compare against it")
        return None


class BackpackDiagonal:
    """BackPACK's GGN diagonal (exact, or Monte Carlo with ``mc_samples`` labels) on a
    copy of the model, so its hooks never touch the model the others measure."""

    def __init__(self, backpack: ModuleType, workload: Workload,
                 mc_samples: int | None) -> None:
        extensions = importlib.import_module("backpack.extensions")
        self.backpack = backpack
        self.workload = workload
        self.model = backpack.extend(copy.deepcopy(workload.model))
        self.loss = backpack.extend(nn.CrossEntropyLoss())
        if mc_samples is None:
            self.extension, self.attribute = extensions.DiagGGNExact, "diag_ggn_exact"
            self.arguments: dict[str, int] = {}
        else:
            self.extension, self.attribute = extensions.DiagGGNMC, "diag_ggn_mc"
            self.arguments = {"mc_samples": mc_samples}

    def traces(self, run: int) -> Traces:
        torch.manual_seed(run)  # DiagGGNMC draws its labels from the global generator
        logits = self.model(self.workload.inputs)
        loss = self.loss(logits.reshape(-1, logits.shape[-1]), self.workload.targets.reshape(-1))
        with self.backpack.backpack(self.extension(**self.arguments)), \
                warnings.catch_warnings():
            # The inputs need no gradient, which torch's full backward hooks warn about.
            warnings.filterwarnings("ignore", message=".*Full backward hook.*")
            loss.backward()
        out = _group_sum({n: getattr(p, self.attribute).sum()
                          for n, p in self.model.named_parameters() if p.requires_grad})
        self.model.zero_grad(set_to_none=True)
        return out


@dataclass
class FisherMethod:
    """Runs of one method: wall times and per-group relative errors against exact."""

    seconds: list[float] = field(default_factory=list)
    errors: dict[str, list[float]] = field(default_factory=dict)
    total_errors: list[float] = field(default_factory=list)


@dataclass
class FisherReport:
    workload: str
    parameters: int
    batch: int
    exact: Traces
    exact_seconds: float
    methods: dict[str, FisherMethod] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _score(traces: list[Traces], seconds: list[float], exact: Traces) -> FisherMethod:
    method = FisherMethod(seconds=list(seconds))
    total = sum(exact.values())
    for run in traces:
        for group, value in exact.items():
            method.errors.setdefault(group, []).append(relative_error(run[group], value))
        method.total_errors.append(relative_error(sum(run.values()), total))
    return method


def compare_fisher(workload: Workload, repeats: int, draws: tuple[int, ...],
                   backpack: ModuleType | None) -> FisherReport:
    """Every method ``repeats`` times on the same model and batch, repeats interleaved
    across methods after one untimed warm-up call each; Monte Carlo methods draw new
    labels each time, so their errors spread as they would in training."""
    device = workload.inputs.device
    workload.model.eval()
    timed_exact = repeat(lambda _: exact_fisher_traces(workload), 1, device)
    report = FisherReport(workload.name, workload.parameter_count, len(workload.targets),
                          timed_exact.results[0], timed_exact.seconds[0])
    measures: dict[str, Callable[[int], Traces]] = {
        f"raresignal ({n} label draw{'s' if n > 1 else ''})": RaresignalFisher(workload,
                                                                              n).traces
        for n in draws}
    if backpack is None:
        report.notes.append("BackPACK not installed: its rows are missing")
    else:
        measures.update(_backpack_measures(report, backpack, workload, draws))
    for measure in measures.values():
        measure(repeats)  # warm-up, with a seed the timed runs do not use
    for name, runs in interleaved(measures, repeats, device).items():
        report.methods[name] = _score(runs.results, runs.seconds, report.exact)
    return report


def _backpack_measures(report: FisherReport, backpack: ModuleType, workload: Workload,
                       draws: tuple[int, ...]) -> dict[str, Callable[[int], Traces]]:
    """BackPACK's exact and Monte Carlo diagonals, or none (with a note) where BackPACK
    has no extension for a module of the model."""
    variants: list[tuple[str, int | None]] = [("BackPACK DiagGGNExact", None)]
    variants += [(f"BackPACK DiagGGNMC (mc_samples={n})", n) for n in draws]
    measures = {label: BackpackDiagonal(backpack, workload, samples).traces
                for label, samples in variants}
    try:
        next(iter(measures.values()))(0)
    except Exception as error:  # BackPACK raises its own types for unsupported layers
        first_line = str(error).splitlines()[0] if str(error) else ""
        report.notes.append(f"BackPACK does not apply to the {workload.name} "
                            f"({type(error).__name__}: {first_line[:160]}); "
                            "compared with exact enumeration only")
        return {}
    return measures
