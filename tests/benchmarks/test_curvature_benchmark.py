"""The curvature benchmark's core at tiny size: its exact references, its counts of
Hessian-vector products, the estimates it reports and the ratios it prints."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import curvature
from curvature_fisher import BackpackDiagonal, RaresignalFisher, exact_fisher_traces
from curvature_models import Workload, fisher_mlp, small_mlp, tiny_transformer
from curvature_report import hvp_ratio
from curvature_sharpness import (
    PYHESSIAN_DEFAULT,
    PYHESSIAN_TUNED,
    RARESIGNAL_COLD,
    RARESIGNAL_WARM,
    MethodRecord,
    RaresignalSharpness,
    SharpnessReport,
    compare_sharpness,
    dense_spectrum,
    first_within_target,
    lanczos_spectrum,
    load_pyhessian,
    pyhessian_top,
)
from curvature_timing import relative_error

from raresignal.agent.estimators import ClassificationLikelihood

torch.set_num_threads(1)


def _softmax_regression(seed: int = 0, features: int = 5, classes: int = 3,
                        batch: int = 24) -> Workload:
    """Linear softmax classifier: its Hessian and Fisher have a closed form."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(features, classes))
    inputs = torch.randn(batch, features, generator=generator)
    targets = torch.randint(0, classes, (batch,), generator=generator)

    def draw() -> tuple[torch.Tensor, torch.Tensor]:
        return inputs, targets

    return Workload("softmax regression", model.eval(), inputs, targets,
                    ClassificationLikelihood(), draw)


def _analytic_hessian(workload: Workload) -> torch.Tensor:
    """H = mean_n (diag p_n - p_n p_n^T) kron (x~_n x~_n^T), x~ = [x, 1], in the order of
    the parameters (weight rows, then bias)."""
    linear = workload.model[0]
    classes, features = linear.weight.shape
    with torch.no_grad():
        p = torch.softmax(workload.model(workload.inputs).double(), dim=-1)
    x = torch.cat([workload.inputs.double(), torch.ones(len(p), 1, dtype=torch.float64)], 1)
    blocks = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    full = torch.einsum("nab,ni,nj->aibj", blocks, x, x) / len(p)
    full = full.reshape(classes * (features + 1), classes * (features + 1))
    weight = [c * (features + 1) + j for c in range(classes) for j in range(features)]
    bias = [c * (features + 1) + features for c in range(classes)]
    order = torch.tensor(weight + bias)
    return full[order][:, order]


def test_exact_spectra_agree_with_the_closed_form_hessian() -> None:
    workload = _softmax_regression()
    reference = torch.linalg.eigvalsh(_analytic_hessian(workload))
    dense = dense_spectrum(workload)
    arpack = lanczos_spectrum(workload, seed=0)
    # fp32 autograd Hessian against an fp64 closed form: entries agree to ~1e-7 absolute,
    # so eigenvalues of order 0.1-1 agree to 1e-5 relative with room to spare.
    assert relative_error(dense.top, float(reference[-1])) < 1e-5
    assert relative_error(dense.second, float(reference[-2])) < 1e-5
    assert dense.bottom == pytest.approx(float(reference[0]), abs=1e-6)
    # ARPACK converged to 1e-10 on fp32 products: limited by the products' ~1e-7 rounding.
    assert relative_error(arpack.top, float(reference[-1])) < 1e-5
    assert relative_error(arpack.second, float(reference[-2])) < 1e-5
    assert arpack.hvps > 0 and dense.hvps == 0


def test_arpack_reference_matches_eigvalsh_on_an_mlp() -> None:
    workload = small_mlp(seed=1, quick=True)
    dense, arpack = dense_spectrum(workload), lanczos_spectrum(workload, seed=3)
    # Both are exact up to fp32 rounding of the Hessian (~1e-6 relative).
    assert relative_error(arpack.top, dense.top) < 1e-4
    assert relative_error(arpack.second, dense.second) < 1e-4


def test_raresignal_cold_and_warm_estimates_and_their_product_counts() -> None:
    workload = small_mlp(seed=0, quick=True)
    exact = dense_spectrum(workload)
    ours = RaresignalSharpness(workload)
    cold = ours.estimate(seed=0, warm=None)
    # The estimator stops at a Ritz residual of 2% of lambda; Kato-Temple makes the
    # eigenvalue error (residual^2 / gap) far smaller than 2%.
    assert relative_error(cold.value, exact.top) < 0.02
    assert 2 <= cold.hvps <= ours.default_cold_iterations
    # Started on the exact top eigenvector, one product gives lambda_max: the Rayleigh
    # quotient of an eigenvector is its eigenvalue (to fp32 rounding, ~1e-6).
    hessian = torch.autograd.functional.hessian(
        lambda flat: _loss_at(workload, flat),
        torch.cat([p.detach().reshape(-1) for p in workload.model.parameters()]))
    values, vectors = torch.linalg.eigh(hessian.double())
    on_eigenvector = ours.estimate(seed=0, warm={"previous": vectors[:, -1].float()})
    assert on_eigenvector.hvps == 1
    assert relative_error(on_eigenvector.value, float(values[-1])) < 1e-5
    # The cold run left its eigenvector and the eigen-gap it measured; after a few SGD
    # steps a warm start from them is within 2% of the new exact lambda_max, in fewer
    # products than the cold run took.
    ours.estimate(seed=0, warm=None)
    warm = ours.warm_state
    assert warm["relative_gap"] is not None and 0.0 < warm["relative_gap"] < 1.0
    workload.sgd_steps(5, 0.05)
    moved = dense_spectrum(workload)
    again = ours.estimate(seed=0, warm=warm)
    assert relative_error(again.value, moved.top) < 0.02
    assert again.hvps < cold.hvps


def _loss_at(workload: Workload, flat: torch.Tensor) -> torch.Tensor:
    params, offset = {}, 0
    for name, p in workload.model.named_parameters():
        params[name] = flat[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
    return workload.loss(workload.inputs, workload.targets, params)


def test_pyhessian_products_are_counted_and_it_converges_to_exact() -> None:
    module = load_pyhessian()
    if module is None:
        pytest.skip("pyhessian is not installed")
    workload = small_mlp(seed=0, quick=True)
    exact = dense_spectrum(workload)
    # tol=0 never triggers PyHessian's early stop, so it runs exactly maxIter products.
    assert pyhessian_top(module, workload, seed=0, max_iter=7, tol=0.0).hvps == 7
    converged = pyhessian_top(module, workload, seed=0, max_iter=1000, tol=1e-7)
    # Power iteration to a 1e-7 relative change: within 1e-4 of exact given the gap.
    assert relative_error(converged.value, exact.top) < 1e-4
    assert all(p.grad is None for p in workload.model.parameters())


def test_comparison_reports_errors_against_exact_and_warm_starts_cheaply() -> None:
    workload = small_mlp(seed=0, quick=True)
    report = compare_sharpness(workload, dense_spectrum, rounds=2, sgd_steps=3, lr=0.05,
                               repeats=2, pyhessian=load_pyhessian())
    assert len(report.exact) == 3
    assert report.exact[0].top != report.exact[1].top  # the SGD steps moved the model
    cold, warm = report.methods[RARESIGNAL_COLD], report.methods[RARESIGNAL_WARM]
    assert len(cold.errors) == 2 and len(warm.errors) == 4
    assert max(cold.errors + warm.errors) < 0.02
    assert max(warm.hvps) < min(cold.hvps)
    if PYHESSIAN_DEFAULT in report.methods:
        # The tuned tolerance is chosen per point so that every start lands within 2%.
        assert len(report.pyhessian_tols) == 3 and None not in report.pyhessian_tols
        assert max(report.methods[PYHESSIAN_TUNED].errors) <= 0.02
        assert len(report.methods[PYHESSIAN_TUNED].errors) == 6


def test_hvp_ratio_is_median_over_median() -> None:
    report = SharpnessReport("m", 1, 1, 1)
    report.methods[PYHESSIAN_DEFAULT] = MethodRecord(hvps=[12, 10, 14, 40])
    report.methods[RARESIGNAL_WARM] = MethodRecord(hvps=[2, 2, 3])
    assert hvp_ratio(report, PYHESSIAN_DEFAULT, RARESIGNAL_WARM) == pytest.approx(13 / 2)
    assert hvp_ratio(report, PYHESSIAN_DEFAULT, "absent") is None


def test_tolerance_sweep_returns_the_loosest_tolerance_within_two_percent() -> None:
    tried: list[float] = []

    def errors(tol: float) -> list[float]:
        tried.append(tol)
        return [3 * tol, tol]  # the worst start is 3x the tolerance off

    assert first_within_target((1e-2, 1e-3, 1e-4), errors) == 1e-3
    assert tried == [1e-2, 1e-3]  # stops at the first that is good enough
    assert first_within_target((1.0, 0.5), errors) is None


def test_exact_fisher_matches_the_closed_form_for_softmax_regression() -> None:
    workload = _softmax_regression()
    # For a linear model the Fisher equals the Hessian, so the trace is its trace.
    expected = float(torch.trace(_analytic_hessian(workload)))
    traces = exact_fisher_traces(workload)
    assert list(traces) == ["0"]
    # fp32 Jacobians summed in fp64: agreement to ~1e-6 relative.
    assert relative_error(traces["0"], expected) < 1e-5


def test_exact_fisher_of_a_causal_transformer_matches_a_per_label_loop() -> None:
    workload = tiny_transformer(seed=0, quick=True, batch=2)
    traces = exact_fisher_traces(workload)
    params = dict(workload.model.named_parameters())
    totals: dict[str, float] = {}
    logits = workload.model(workload.inputs)
    log_probs = torch.log_softmax(logits, dim=-1)
    for index in torch.cartesian_prod(*(torch.arange(s) for s in log_probs.shape)):
        n, t, c = (int(i) for i in index)
        grads = torch.autograd.grad(log_probs[n, t, c], list(params.values()),
                                    retain_graph=True, allow_unused=True)
        weight = float(log_probs[n, t, c].detach().exp())
        for name, g in zip(params, grads, strict=True):
            group = name.split(".")[0]
            value = 0.0 if g is None else weight * float(g.double().pow(2).sum())
            totals[group] = totals.get(group, 0.0) + value
    tokens = workload.targets.numel()
    # The same sums in another order, fp32 gradients: agreement to ~1e-5 relative.
    for group, value in totals.items():
        assert relative_error(traces[group], value / tokens) < 1e-4, group


def test_raresignal_fisher_is_unbiased_and_backpack_exact_matches_enumeration() -> None:
    workload = fisher_mlp(seed=0, quick=True, batch=32)
    exact = exact_fisher_traces(workload)
    ours = RaresignalFisher(workload, draws=1)
    runs = [ours.traces(i) for i in range(40)]
    for group, value in exact.items():
        samples = torch.tensor([r[group] for r in runs], dtype=torch.float64)
        standard_error = float(samples.std()) / len(runs) ** 0.5
        # Sampled-label traces are unbiased: their mean lies within 4 standard errors of
        # exact (a 1-in-15,000 event for a Gaussian mean; the draws are seeded).
        assert abs(float(samples.mean()) - value) < 4 * standard_error, group
    backpack = pytest.importorskip("backpack")
    peer = BackpackDiagonal(backpack, workload, mc_samples=None)
    # DiagGGNExact is the exact Fisher diagonal here; fp32 against fp64 sums: ~1e-6.
    for group, value in peer.traces(0).items():
        assert relative_error(value, exact[group]) < 1e-4, group


def test_missing_peer_is_skipped_with_a_message(monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "pyhessian", None)
    monkeypatch.setitem(sys.modules, "pyhessian.hessian", None)
    assert load_pyhessian() is None
    assert "PyHessian skipped" in capsys.readouterr().out
    report = compare_sharpness(small_mlp(seed=0, quick=True), dense_spectrum, rounds=1,
                               sgd_steps=1, lr=0.05, repeats=1, pyhessian=None)
    assert not any(name.startswith("PyHessian") for name in report.methods)
    assert any("PyHessian" in note for note in report.notes)


def test_command_line_writes_the_figures_it_prints(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "curvature.json"
    assert curvature.main(["--quick", "--rounds", "1", "--repeats", "1",
                           "--fisher-repeats", "2", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    figures = json.loads(out.read_text())
    assert [r["workload"] for r in figures["sharpness"]] == ["small MLP", "small MLP, 400 steps",
                                                        "larger MLP", "CNN"]
    for report in figures["sharpness"]:
        cold = report["methods"][RARESIGNAL_COLD]
        assert max(cold["errors"]) < 0.02
        assert f"lambda_max: {report['workload']}" in printed
    mlp, transformer = figures["fisher"]
    if "BackPACK DiagGGNExact" in mlp["methods"]:
        exact_errors = mlp["methods"]["BackPACK DiagGGNExact"]["total_errors"]
        assert statistics.median(exact_errors) < 1e-4
    assert not any(name.startswith("BackPACK") for name in transformer["methods"])
    assert "compared with exact enumeration only" in printed


def test_bad_device_is_a_clear_error() -> None:
    with pytest.raises(SystemExit, match="--device 'nonsense'"):
        curvature.main(["--device", "nonsense"])
