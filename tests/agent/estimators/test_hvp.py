"""Every HVP backend against H @ v from the exact Hessian, and the automatic fallback."""

from __future__ import annotations

import pytest
import torch
from estimator_models import SdpaBlock, TinyTransformer, call, exact_hessian
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn.attention import SDPBackend, sdpa_kernel

from raresignal.agent.estimators.hvp import BACKENDS, ChunkedHVP, auto_hvp, make_hvp
from raresignal.agent.estimators.likelihood import CausalLMLikelihood, ClassificationLikelihood
from raresignal.agent.estimators.objective import BatchObjective, FunctionalModel
from raresignal.agent.estimators.parameters import ParameterSet

# fp32 Hessian-vector products vs an fp32 dense Hessian: exact backends agree to ~1e-6
# relative (summation order); central differences add truncation O(h^2) and rounding
# O(eps/h) with h ~ eps^(1/3), ~1e-4 relative on these smooth models.
TOLERANCE = {"double_backward": 1e-5, "forward_over_reverse": 1e-5, "finite_difference": 1e-3}


def _objective(model: nn.Module, likelihood, x, y):
    model.eval()
    params = ParameterSet.from_model(model)
    return BatchObjective(FunctionalModel(model, call, params), likelihood, x, y), params


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("backend", BACKENDS)
def test_mlp_backends_match_the_exact_hessian(backend, mlp, classification_batch) -> None:
    objective, params = _objective(mlp, ClassificationLikelihood(), *classification_batch)
    hessian = exact_hessian(objective, params)
    v = torch.randn(params.numel, generator=torch.Generator().manual_seed(0))
    hv = make_hvp(backend, objective, params)(v)
    assert _relative_error(hv, hessian.float() @ v) <= TOLERANCE[backend]


@pytest.mark.parametrize("backend", BACKENDS)
def test_transformer_backends_match_the_exact_hessian(backend, transformer, lm_batch) -> None:
    objective, params = _objective(transformer, CausalLMLikelihood(), *lm_batch)
    hessian = exact_hessian(objective, params)
    v = torch.randn(params.numel, generator=torch.Generator().manual_seed(1))
    with sdpa_kernel(SDPBackend.MATH):  # fused CPU attention has no second derivatives
        hv = make_hvp(backend, objective, params)(v)
    assert _relative_error(hv, hessian.float() @ v) <= TOLERANCE[backend]


def test_auto_keeps_double_backward_where_it_works(mlp, classification_batch) -> None:
    objective, params = _objective(mlp, ClassificationLikelihood(), *classification_batch)
    operator, rejected = auto_hvp(objective, params)
    assert operator.backend == "double_backward" and rejected == {}


class _OnceDifferentiableTanh(torch.autograd.Function):
    """tanh whose backward cannot itself be differentiated, and with no forward-mode rule."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * (1 - y * y)


class _OnceDifferentiableMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = nn.Linear(6, 12), nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(_OnceDifferentiableTanh.apply(self.first(x)))


class _ReferenceMLP(_OnceDifferentiableMLP):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.tanh(self.first(x)))


def test_auto_falls_back_to_finite_differences_without_double_backward() -> None:
    torch.manual_seed(0)
    model = _OnceDifferentiableMLP()
    reference = _ReferenceMLP()
    reference.load_state_dict(model.state_dict())
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    objective, params = _objective(model, ClassificationLikelihood(), x, y)
    operator, rejected = auto_hvp(objective, params)
    assert operator.backend == "finite_difference"
    assert set(rejected) == {"double_backward", "forward_over_reverse"}
    ref_objective, ref_params = _objective(reference, ClassificationLikelihood(), x, y)
    hessian = exact_hessian(ref_objective, ref_params)
    v = torch.randn(params.numel, generator=torch.Generator().manual_seed(2))
    assert _relative_error(operator(v), hessian.float() @ v) <= TOLERANCE["finite_difference"]
    assert operator.count == 1  # the trial product is not counted


@pytest.mark.parametrize("model_class", [TinyTransformer, SdpaBlock])
def test_auto_falls_back_on_fused_cpu_attention(model_class, lm_batch) -> None:
    torch.manual_seed(0)
    objective, params = _objective(model_class(), CausalLMLikelihood(), *lm_batch)
    operator, rejected = auto_hvp(objective, params)
    assert operator.backend == "finite_difference"
    assert "double_backward" in rejected
    hessian = exact_hessian(objective, params)
    v = torch.randn(params.numel, generator=torch.Generator().manual_seed(3))
    assert _relative_error(operator(v), hessian.float() @ v) <= TOLERANCE["finite_difference"]


def test_chunks_of_a_causal_lm_batch_sum_to_its_exact_hessian(transformer, lm_batch) -> None:
    """Chunks with different numbers of scored tokens (ignored positions) weigh by them:
    the chunked product is the whole batch's H v."""
    from raresignal.agent.estimators.objective import loss_chunks

    tokens, targets = lm_batch
    targets = targets.clone()
    targets[:3, 2:] = -100  # the first chunk scores far fewer tokens than the others
    objective, params = _objective(transformer, CausalLMLikelihood(), tokens, targets)
    hessian = exact_hessian(objective, params)
    chunks = loss_chunks(objective.functional, CausalLMLikelihood(), (tokens, targets), 3)
    assert len(chunks) == 3 and sum(share for _, share in chunks) == pytest.approx(1.0)
    assert chunks[0][1] < chunks[1][1]
    v = torch.randn(params.numel, generator=torch.Generator().manual_seed(0))
    with sdpa_kernel(SDPBackend.MATH):  # the fused CPU kernel has no double backward
        chunked = ChunkedHVP([make_hvp("double_backward", o, params) for o, _ in chunks],
                             [share for _, share in chunks])
        product = chunked(v)
    assert _relative_error(product, hessian.float() @ v) <= 1e-5


def test_a_finite_difference_product_is_two_units_one_gradient_each(mlp, classification_batch
                                                                   ) -> None:
    """Split into its two gradients (the costliest unit of a sharpness measurement on a
    model without double backward), the product is the one-shot product, bit for bit."""
    from raresignal.agent.estimators.hvp import GRADIENT_KIND

    objective, params = _objective(mlp, ClassificationLikelihood(), *classification_batch)
    operator = make_hvp("finite_difference", objective, params)
    v = torch.randn(params.numel, generator=torch.Generator().manual_seed(4))
    units, kinds = operator.units(v), []
    while True:
        try:
            kinds.append(next(units))
        except StopIteration as done:
            product = done.value
            break
    assert kinds == [GRADIENT_KIND, GRADIENT_KIND]
    assert torch.equal(product, operator(v)) and operator.count == 2
    eps = operator._step_length / float(v.norm())
    x = operator._x
    reference = (operator.gradient(operator._as_params(torch.add(x, v, alpha=eps)))
                 - operator.gradient(operator._as_params(torch.add(x, v, alpha=-eps)))
                 ) / (2 * eps)
    assert torch.equal(product, reference)


def test_finite_difference_chunks_of_one_point_share_its_copy_and_scratch(
        mlp, classification_batch) -> None:
    """The chunks of a curvature batch are operators at one point: one flat copy of the
    point and one pair of scratch vectors serve them all (not a copy per chunk, and no
    fresh model-sized vectors per gradient), and the accumulated product is the same."""
    likelihood = ClassificationLikelihood()
    inputs, targets = classification_batch
    halves = [_objective(mlp, likelihood, inputs[part], targets[part])
              for part in (slice(0, 4), slice(4, 8))]
    (first, params), (second, _) = halves
    operator = make_hvp("finite_difference", first, params)
    other = operator.for_objective(second)
    assert other._x is operator._x
    v = torch.randn(params.numel, generator=torch.Generator().manual_seed(5))
    chunked = ChunkedHVP([operator, other], [0.5, 0.5])
    product = chunked(v)
    scratch = [t.data_ptr() for t in operator._scratch]
    assert len(scratch) == 2 and [t.data_ptr() for t in other._scratch] == scratch
    chunked(v)
    assert [t.data_ptr() for t in operator._scratch] == scratch
    separate = 0.5 * make_hvp("finite_difference", first, params)(v) + 0.5 * make_hvp(
        "finite_difference", second, params)(v)
    assert _relative_error(product, separate) <= 1e-6
