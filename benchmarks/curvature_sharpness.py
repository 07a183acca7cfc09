"""lambda_max three ways on the same model and batch: exact, raresignal, PyHessian.

Exact: the full Hessian (``torch.autograd.functional.hessian``) and ``eigvalsh`` where it
fits in memory, else ARPACK's implicitly restarted Lanczos (``scipy.sparse.linalg.eigsh``)
run to convergence on plain double-backward products. raresignal: the shipped
``SharpnessEstimator`` (Lanczos, warm-started from its previous eigenvector). PyHessian:
``hessian(...).eigenvalues`` (power iteration), its products counted by wrapping the
``hessian_vector_product`` it calls.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np
import torch
from curvature_models import Workload
from curvature_timing import interleaved, relative_error, repeat
from scipy.sparse.linalg import LinearOperator, eigsh
from torch import nn

from raresignal.agent.api import Probe, StepContext, default_forward
from raresignal.agent.estimators import EstimatorConfig, build_shared_state
from raresignal.agent.estimators.default import SharpnessEstimator

TARGET = 0.02  # "within 2% of exact"
PYHESSIAN_DEFAULTS = {"maxIter": 100, "tol": 1e-3}
# Loosest first: the first tolerance at which every start lands within TARGET is reported.
PYHESSIAN_TOLERANCES = (1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5, 3e-6, 1e-6)
PYHESSIAN_SWEEP_MAX_ITER = 1000
RARESIGNAL_TOLERANCES = (0.02, 0.01, 0.005, 0.002, 0.001)
RARESIGNAL_SWEEP_MAX_ITER = 200


@dataclass(frozen=True)
class Spectrum:
    """The exact top of the spectrum and what it cost to get."""

    top: float
    second: float
    bottom: float | None  # only where the full spectrum is known
    method: str
    hvps: int  # 0 when the full Hessian was formed
    seconds: float

    @property
    def gap_ratio(self) -> float:
        """lambda_2 / lambda_1: power iteration's error shrinks by its square each step."""
        return self.second / self.top


def _trainable(model: nn.Module) -> tuple[list[str], list[nn.Parameter]]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [n for n, _ in named], [p for _, p in named]


def dense_spectrum(workload: Workload) -> Spectrum:
    """Every eigenvalue from the full Hessian: D^2 memory, D products' worth of work."""
    names, params = _trainable(workload.model)
    flat0 = torch.cat([p.detach().reshape(-1) for p in params])

    def loss(flat: torch.Tensor) -> torch.Tensor:
        views = dict(zip(names, _split(flat, params), strict=True))
        return workload.loss(workload.inputs, workload.targets, views)

    timed = repeat(lambda _: torch.linalg.eigvalsh(
        torch.autograd.functional.hessian(loss, flat0, vectorize=True).double()),
        1, flat0.device)
    values = timed.results[0]
    return Spectrum(float(values[-1]), float(values[-2]), float(values[0]),
                    "full Hessian + eigvalsh", 0, timed.seconds[0])


def _split(flat: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    out, offset = [], 0
    for p in like:
        out.append(flat[offset : offset + p.numel()].view_as(p))
        offset += p.numel()
    return out


class CountingHVP:
    """Plain double-backward H v on the model's own parameters, for ARPACK (float64 I/O)."""

    def __init__(self, workload: Workload) -> None:
        _, self.params = _trainable(workload.model)
        loss = workload.loss(workload.inputs, workload.targets)
        self.grads = torch.autograd.grad(loss, self.params, create_graph=True)
        self.device = self.params[0].device
        self.count = 0

    def __call__(self, vector: np.ndarray) -> np.ndarray:
        self.count += 1
        v = torch.from_numpy(np.ascontiguousarray(vector, dtype=np.float32).reshape(-1))
        hv = torch.autograd.grad(self.grads, self.params,
                                 grad_outputs=_split(v.to(self.device), self.params),
                                 retain_graph=True)
        return torch.cat([h.reshape(-1) for h in hv]).double().cpu().numpy()


def lanczos_spectrum(workload: Workload, seed: int, tol: float = 1e-10) -> Spectrum:
    """Top two eigenvalues by ARPACK to ``tol`` (relative), for models too large to form H."""

    def solve(_: int) -> tuple[np.ndarray, int]:
        operator = CountingHVP(workload)
        dim = sum(p.numel() for p in operator.params)
        start = np.random.default_rng(seed).standard_normal(dim)
        values = eigsh(LinearOperator((dim, dim), matvec=operator, dtype=np.float64), k=2,
                       which="LA", tol=tol, v0=start, return_eigenvectors=False)
        return np.sort(values), operator.count

    timed = repeat(solve, 1, workload.inputs.device)
    values, hvps = timed.results[0]
    return Spectrum(float(values[-1]), float(values[-2]), None,
                    f"Lanczos (ARPACK eigsh, tol {tol:g})", hvps, timed.seconds[0])


@dataclass(frozen=True)
class TopEstimate:
    value: float
    hvps: int


class RaresignalSharpness:
    """The shipped sharpness estimator on the workload's fixed batch, lambda_max only.

    The Hessian trace is switched off (it is a separate measurement), so is the start-up
    delay (each call here is a measurement, not a training step), and the product is
    fixed to double backward, the same product PyHessian uses, so the comparison is
    between the eigensolvers. Everything else is the estimator's default configuration.
    """

    def __init__(self, workload: Workload) -> None:
        self.workload = workload
        config = EstimatorConfig(curvature_batch_size=len(workload.targets),
                                 hvp_backend="double_backward", hutchinson_samples=0,
                                 sharpness_warmup_steps=0)
        shared = build_shared_state(workload.model, None,
                                    Probe(workload.inputs, workload.targets), config,
                                    task=workload.likelihood)
        self.estimator = SharpnessEstimator(shared)
        self.tracker = self.estimator.plain
        self.default_tol = self.tracker.tol
        self.default_cold_iterations = self.tracker.cold_iterations

    @contextmanager
    def settings(self, tol: float, cold_iterations: int) -> Iterator[None]:
        """Temporarily a tighter stopping rule (for the tolerance sweep)."""
        saved = self.tracker.tol, self.tracker.cold_iterations, self.tracker.warm_iterations
        self.tracker.tol = tol
        self.tracker.cold_iterations = self.tracker.warm_iterations = cold_iterations
        try:
            yield
        finally:
            self.tracker.tol, self.tracker.cold_iterations, self.tracker.warm_iterations = saved

    def estimate(self, seed: int, warm: Mapping[str, Any] | None) -> TopEstimate:
        """One estimator run: cold from ``seed``, or warm from ``warm`` (a previous run's
        :attr:`warm_state`: its eigenvector and the eigen-gap it measured)."""
        self.tracker.seed = seed
        self.estimator.load_state_dict({"backend": "double_backward", "previous": None,
                                        **(warm or {})})
        ctx = StepContext(step=0, model=self.workload.model, optimizer=None,
                          forward=default_forward)
        values = {m.metric: m.value for m in self.estimator.run(ctx)}
        return TopEstimate(values["sharpness"], int(values["hessian_vector_products"]))

    @property
    def warm_state(self) -> dict[str, Any]:
        """What the last run leaves for the next: its eigenvector and measured gap, as the
        estimator keeps them between runs in training."""
        return {"previous": self.tracker.previous, "relative_gap": self.tracker.relative_gap}


def load_pyhessian() -> ModuleType | None:
    """PyHessian's module, or None (with the reason printed) when it cannot be imported."""
    try:
        return importlib.import_module("pyhessian.hessian")
    except Exception as error:  # any import failure means: skip this peer
        print(f"PyHessian skipped: cannot import pyhessian ({type(error).__name__}: {error}); "
              "install it with `pip install pyhessian` to compare against it")
        return None


def pyhessian_top(module: ModuleType, workload: Workload, seed: int, max_iter: int,
                  tol: float) -> TopEstimate:
    """PyHessian's power iteration from a ``seed``-ed random start, products counted."""
    original = module.hessian_vector_product
    count = 0

    def counted(*args: object, **kwargs: object) -> object:
        nonlocal count
        count += 1
        return original(*args, **kwargs)

    module.hessian_vector_product = counted
    try:
        with warnings.catch_warnings():
            # PyHessian builds its graph with backward(create_graph=True); the cycle torch
            # warns about is broken below by clearing the gradients.
            warnings.filterwarnings("ignore", message=".*create_graph=True.*")
            torch.manual_seed(seed)
            solver = module.hessian(workload.model, nn.CrossEntropyLoss(),
                                    data=(workload.inputs, workload.targets),
                                    cuda=workload.inputs.device.type == "cuda")
            values, _ = solver.eigenvalues(maxIter=max_iter, tol=tol, top_n=1)
    finally:
        module.hessian_vector_product = original
        for p in workload.model.parameters():
            p.grad = None  # PyHessian leaves the create_graph gradients attached
    return TopEstimate(float(values[0]), count)


@dataclass
class MethodRecord:
    """Every run of one method: products, wall time and error against exact."""

    hvps: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    errors: list[float] = field(default_factory=list)

    def add(self, estimates: Sequence[TopEstimate], seconds: Sequence[float],
            exact: float) -> None:
        self.hvps += [e.hvps for e in estimates]
        self.seconds += list(seconds)
        self.errors += [relative_error(e.value, exact) for e in estimates]

    @property
    def within_target(self) -> float:
        """Fraction of runs within TARGET of exact."""
        return sum(e <= TARGET for e in self.errors) / len(self.errors)


def first_within_target(tolerances: Sequence[float],
                        run: Callable[[float], list[float]]) -> float | None:
    """The loosest tolerance whose runs (``run(tol)`` returns their errors) all land
    within TARGET, or None when even the tightest does not."""
    for tol in tolerances:
        if max(run(tol)) <= TARGET:
            return tol
    return None


@dataclass
class SharpnessReport:
    workload: str
    parameters: int
    batch: int
    sgd_steps_between_points: int
    exact: list[Spectrum] = field(default_factory=list)
    methods: dict[str, MethodRecord] = field(default_factory=dict)
    pyhessian_tols: list[float | None] = field(default_factory=list)  # tuned, per point
    raresignal_tol_for_target: float | None = None
    notes: list[str] = field(default_factory=list)

    def record(self, method: str) -> MethodRecord:
        return self.methods.setdefault(method, MethodRecord())


RARESIGNAL_COLD = "raresignal cold"
RARESIGNAL_WARM = "raresignal warm"
PYHESSIAN_DEFAULT = "PyHessian defaults"
PYHESSIAN_TUNED = "PyHessian tol tuned for 2%"


def raresignal_at_tol_label(tol: float) -> str:
    return f"raresignal cold tol={tol:g}"


def compare_sharpness(workload: Workload, exact: Callable[[Workload], Spectrum],
                      rounds: int, sgd_steps: int, lr: float, repeats: int,
                      pyhessian: ModuleType | None) -> SharpnessReport:
    """Point 0: cold starts. Then ``rounds`` times: ``sgd_steps`` SGD steps, and a warm
    start from the previous run's eigenvector, the way the estimator runs in training.

    Cold and PyHessian runs repeat from ``repeats`` random starts (seeds); a warm run
    repeats from the same start, so its repeats differ only in time. At each point the
    repeats of raresignal and of PyHessian's defaults are interleaved.
    """
    device = workload.inputs.device
    report = SharpnessReport(workload.name, workload.parameter_count, len(workload.targets),
                             sgd_steps)
    ours = RaresignalSharpness(workload)
    previous: dict[str, Any] | None = None
    for point in range(rounds + 1):
        if point > 0:
            workload.sgd_steps(sgd_steps, lr)
        spectrum = exact(workload)
        report.exact.append(spectrum)
        measures: dict[str, Callable[[int], TopEstimate]] = {}
        if point == 0:
            measures[RARESIGNAL_COLD] = lambda seed: ours.estimate(seed, None)
        else:
            measures[RARESIGNAL_WARM] = lambda _, start=previous: ours.estimate(0, start)
        if pyhessian is not None:
            measures[PYHESSIAN_DEFAULT] = lambda i, point=point: pyhessian_top(
                pyhessian, workload, _pyhessian_seed(point, i),
                PYHESSIAN_DEFAULTS["maxIter"], PYHESSIAN_DEFAULTS["tol"])
        for name, runs in interleaved(measures, repeats, device).items():
            report.record(name).add(runs.results, runs.seconds, spectrum.top)
        if point == 0:
            if max(report.record(RARESIGNAL_COLD).errors) > TARGET:
                report.raresignal_tol_for_target = _raresignal_sweep(
                    report, ours, spectrum.top, repeats, device)
            ours.estimate(0, None)  # seed 0's eigenvector starts the warm chain
        previous = ours.warm_state
        if pyhessian is not None:
            _pyhessian_tuned(report, pyhessian, workload, spectrum.top, repeats, point)
    if pyhessian is None:
        report.notes.append("PyHessian not installed: its rows are missing")
    return report


def _pyhessian_seed(point: int, repeat_index: int) -> int:
    return 1000 * point + repeat_index


def _raresignal_sweep(report: SharpnessReport, ours: RaresignalSharpness, exact: float,
                      repeats: int, device: torch.device) -> float | None:
    def errors(tol: float) -> list[float]:
        with ours.settings(tol, RARESIGNAL_SWEEP_MAX_ITER):
            runs = repeat(lambda seed: ours.estimate(seed, None), repeats, device)
        report.record(raresignal_at_tol_label(tol)).add(runs.results, runs.seconds, exact)
        return report.record(raresignal_at_tol_label(tol)).errors

    return first_within_target(RARESIGNAL_TOLERANCES[1:], errors)


def _pyhessian_tuned(report: SharpnessReport, module: ModuleType, workload: Workload,
                     exact: float, repeats: int, point: int) -> None:
    """PyHessian at the loosest tolerance that lands every start within TARGET at this
    point: an oracle choice, the most favourable to PyHessian."""
    device = workload.inputs.device

    def run(max_iter: int, tol: float) -> tuple[list[TopEstimate], list[float]]:
        runs = repeat(lambda i: pyhessian_top(module, workload, _pyhessian_seed(point, i),
                                              max_iter, tol), repeats, device)
        return runs.results, runs.seconds

    found: dict[float, tuple[list[TopEstimate], list[float]]] = {}

    def errors(tol: float) -> list[float]:
        found[tol] = run(PYHESSIAN_SWEEP_MAX_ITER, tol)
        return [relative_error(e.value, exact) for e in found[tol][0]]

    tol = first_within_target(PYHESSIAN_TOLERANCES, errors)
    report.pyhessian_tols.append(tol)
    if tol is None:
        report.notes.append(f"point {point}: PyHessian reached {TARGET:.0%} at no tolerance "
                            f"tried (down to {PYHESSIAN_TOLERANCES[-1]:g}, "
                            f"maxIter={PYHESSIAN_SWEEP_MAX_ITER})")
        return
    report.record(PYHESSIAN_TUNED).add(*found[tol], exact)
