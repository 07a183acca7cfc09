"""Hessian-vector products of the probe loss, with three backends chosen automatically.

1. double backward: differentiate the gradient graph (cheapest, reuses one graph);
2. forward-over-reverse: ``torch.func.jvp`` of ``torch.func.grad`` (works where a
   backward kernel has no derivative of its own but has a forward-mode rule);
3. central finite difference of two gradients (needs only first derivatives, so it works
   everywhere, e.g. CPU fused attention, which has neither of the above).

``auto_hvp`` tries them in that order once on the probe batch and keeps the first that
works and agrees with finite differences; the chosen backend's name is reported.
"""

from __future__ import annotations

import abc
import math
import warnings
from collections.abc import Callable, Sequence

import torch
from torch.func import grad, jvp

from raresignal.agent.api import Units, run_units
from raresignal.agent.estimators.objective import Params
from raresignal.agent.estimators.parameters import ParameterSet

Objective = Callable[[Params], torch.Tensor]

DOUBLE_BACKWARD = "double_backward"
FORWARD_OVER_REVERSE = "forward_over_reverse"
FINITE_DIFFERENCE = "finite_difference"
BACKENDS = (DOUBLE_BACKWARD, FORWARD_OVER_REVERSE, FINITE_DIFFERENCE)

# Central differences balance truncation (~h^2) against rounding (~eps/h): h ~ eps^(1/3).
_FD_RELATIVE_STEP = float(torch.finfo(torch.float32).eps) ** (1.0 / 3.0)


# The kind of a finite-difference product's units: one gradient each.
GRADIENT_KIND = f"{FINITE_DIFFERENCE} gradient"


def operator_kind(backend: str) -> str:
    """The kind of a unit that builds a ``backend`` operator (see api.Units)."""
    return f"{backend} operator"


def product_kind(backend: str) -> str:
    """The kind of a unit that computes one ``backend`` product."""
    return f"{backend} product"


def prepare_function_transforms() -> None:
    """Pays torch.func's one-time costs now: its first ``grad`` imports torch._dynamo
    (unless the model already did) and its first forward-mode product compiles torch's
    forward-AD decompositions, each about as long as a training step or longer on CPU.
    Called when the estimators are built, so that neither lands in a training step (in
    the forward-over-reverse backend's trial, or the first per-example gradients)."""
    x = torch.zeros(1)
    with warnings.catch_warnings():  # torch's own use of its deprecated torch.jit.script
        warnings.simplefilter("ignore", DeprecationWarning)
        jvp(grad(lambda y: (y * y).sum()), (x,), (x,))


class HessianVectorProduct(abc.ABC):
    """v -> H v for flat fp32 vectors, at a fixed point; counts the products it computes."""

    backend: str = ""

    def __init__(self, objective: Objective, parameters: ParameterSet,
                 point: Params | None = None) -> None:
        self.objective = objective
        self.parameters = parameters
        self.names = parameters.names
        self.point = point if point is not None else parameters.fp32_detached()
        self.count = 0

    def _as_params(self, flat: torch.Tensor) -> Params:
        return dict(zip(self.names, self.parameters.unflatten(flat), strict=True))

    def _flat(self, tensors: Params | Sequence[torch.Tensor]) -> torch.Tensor:
        values = [tensors[n] for n in self.names] if isinstance(tensors, dict) else tensors
        return torch.cat([t.reshape(-1).float() for t in values])

    def __call__(self, vector: torch.Tensor) -> torch.Tensor:
        self.count += 1
        return self._product(vector)

    def units(self, vector: torch.Tensor) -> Units[torch.Tensor]:
        """H v as one unit, named after the backend; counted like a call."""
        self.count += 1
        return (yield from self._product_units(vector))

    def _product_units(self, vector: torch.Tensor) -> Units[torch.Tensor]:
        """H v as one unit without counting it."""
        yield product_kind(self.backend)
        return self._product(vector)

    def accumulate_units(self, vector: torch.Tensor, total: torch.Tensor,
                         weight: float) -> Units[None]:
        """total += weight * H v, in units; counted like a call."""
        total.add_((yield from self.units(vector)), alpha=weight)

    def for_objective(self, objective: Objective) -> HessianVectorProduct:
        """The same backend at the same point for another objective (another chunk of
        one batch), sharing what does not depend on the objective."""
        return type(self)(objective, self.parameters, self.point)

    @abc.abstractmethod
    def _product(self, vector: torch.Tensor) -> torch.Tensor:
        """H v without counting it."""

    def gradient(self, point: Params | None = None) -> torch.Tensor:
        """Flat gradient of the objective at ``point`` (default: the operator's point)."""
        return self._flat(self._gradients(self.point if point is None else point))

    def _gradients(self, point: Params) -> list[torch.Tensor]:
        """The objective's gradient at ``point``, one tensor per parameter."""
        leaves = {n: t.detach().requires_grad_(True) for n, t in point.items()}
        grads = torch.autograd.grad(self.objective(leaves), [leaves[n] for n in self.names],
                                    allow_unused=True)
        return [g if g is not None else torch.zeros_like(leaves[n])
                for g, n in zip(grads, self.names, strict=True)]


class DoubleBackwardHVP(HessianVectorProduct):
    """Builds the gradient graph once; each product is one extra backward through it."""

    backend = DOUBLE_BACKWARD

    def __init__(self, objective: Objective, parameters: ParameterSet,
                 point: Params | None = None) -> None:
        super().__init__(objective, parameters, point)
        self._leaves = [self.point[n].detach().requires_grad_(True) for n in self.names]
        loss = objective(dict(zip(self.names, self._leaves, strict=True)))
        grads = torch.autograd.grad(loss, self._leaves, create_graph=True, allow_unused=True)
        self._grads = [g if g is not None else torch.zeros_like(leaf)
                       for g, leaf in zip(grads, self._leaves, strict=True)]

    def _product(self, vector: torch.Tensor) -> torch.Tensor:
        pairs = [(g, v) for g, v in zip(self._grads, self.parameters.unflatten(vector),
                                         strict=True) if g.requires_grad]
        if not pairs:
            return torch.zeros_like(vector)
        hv = torch.autograd.grad([g for g, _ in pairs], self._leaves,
                                 grad_outputs=[v for _, v in pairs], retain_graph=True,
                                 allow_unused=True)
        return self._flat([h if h is not None else torch.zeros_like(leaf)
                           for h, leaf in zip(hv, self._leaves, strict=True)])


class ForwardOverReverseHVP(HessianVectorProduct):
    """jvp of the gradient function: one forward-mode pass through a backward pass."""

    backend = FORWARD_OVER_REVERSE

    def _product(self, vector: torch.Tensor) -> torch.Tensor:
        _, tangent_out = jvp(grad(self.objective), (self.point,), (self._as_params(vector),))
        return self._flat(tangent_out)


class FiniteDifferenceHVP(HessianVectorProduct):
    """(g(x + e v) - g(x - e v)) / 2e, with the step scaled to |x| and |v|.

    The displacement e|v| is eps^(1/3) * max(|x|, 1): per coordinate that moves each
    weight by about eps^(1/3) of its typical size, the usual central-difference step.
    """

    backend = FINITE_DIFFERENCE

    def __init__(self, objective: Objective, parameters: ParameterSet,
                 point: Params | None = None, flat_point: torch.Tensor | None = None,
                 ) -> None:
        super().__init__(objective, parameters, point)
        self._x = self._flat(self.point) if flat_point is None else flat_point
        self._step_length = _FD_RELATIVE_STEP * max(float(self._x.norm()), 1.0)
        # The displaced point and the gradient difference, allocated at the first product
        # and reused by every product of the operators of one point: on a model of
        # millions of parameters fresh vectors of its size at every unit cost more than
        # the arithmetic (each page touched anew), and add up to a copy per chunk.
        self._scratch: list[torch.Tensor] = []

    def for_objective(self, objective: Objective) -> FiniteDifferenceHVP:
        other = FiniteDifferenceHVP(objective, self.parameters, self.point, self._x)
        other._scratch = self._scratch
        return other

    def _product(self, vector: torch.Tensor) -> torch.Tensor:
        return run_units(self._product_units(vector))

    def _product_units(self, vector: torch.Tensor) -> Units[torch.Tensor]:
        """H v in two units, a gradient each: with the passes over the parameters' size
        around them, a product even on a one-example chunk can outlast a step's slice."""
        return (yield from self._difference_units(vector, None, 1.0))  # a fresh vector

    def accumulate_units(self, vector: torch.Tensor, total: torch.Tensor,
                         weight: float) -> Units[None]:
        self.count += 1
        yield from self._difference_units(vector, total, weight)

    def _difference_units(self, vector: torch.Tensor, total: torch.Tensor | None,
                          weight: float) -> Units[torch.Tensor]:
        """weight * H v added to ``total``; H v itself when ``total`` is None."""
        norm = float(vector.norm())
        if norm == 0.0 or not math.isfinite(norm):
            return torch.zeros_like(vector) if total is None else total
        eps = self._step_length / norm
        if not self._scratch:
            self._scratch += [torch.empty_like(self._x), torch.empty_like(self._x)]
        displaced, difference = self._scratch
        yield GRADIENT_KIND
        torch.add(self._x, vector, alpha=eps, out=displaced)
        plus = self._gradients(self._as_params(displaced))
        for view, gradient in zip(self.parameters.unflatten(difference), plus, strict=True):
            view.copy_(gradient)
        del plus
        yield GRADIENT_KIND
        torch.add(self._x, vector, alpha=-eps, out=displaced)
        minus = self._gradients(self._as_params(displaced))
        for view, gradient in zip(self.parameters.unflatten(difference), minus, strict=True):
            view.sub_(gradient)  # close values: the difference is exact before scaling
        if total is None:
            return difference / (2.0 * eps)
        return total.add_(difference, alpha=weight / (2.0 * eps))


_CLASSES: dict[str, type[HessianVectorProduct]] = {
    DOUBLE_BACKWARD: DoubleBackwardHVP,
    FORWARD_OVER_REVERSE: ForwardOverReverseHVP,
    FINITE_DIFFERENCE: FiniteDifferenceHVP,
}


class ChunkedHVP:
    """H v of a batch's mean loss split over chunks of the batch, one chunk per unit.

    The loss is the weighted mean of its chunks' losses, sum_k s_k loss_k with s_k the
    chunk's share of what the loss averages over (scored tokens), so H v = sum_k s_k H_k v
    exactly, and one unit costs about a chunk's share of a whole product.
    """

    def __init__(self, operators: Sequence[HessianVectorProduct],
                 shares: Sequence[float]) -> None:
        if len(operators) != len(shares) or not operators:
            raise ValueError("need one share per operator, and at least one operator")
        self.operators = list(operators)
        self.shares = list(shares)

    @property
    def backend(self) -> str:
        return self.operators[0].backend

    def units(self, vector: torch.Tensor) -> Units[torch.Tensor]:
        """H v, one chunk's product per unit."""
        total = torch.zeros_like(vector)
        for operator, share in zip(self.operators, self.shares, strict=True):
            yield from operator.accumulate_units(vector, total, share)
        return total

    def __call__(self, vector: torch.Tensor) -> torch.Tensor:
        return run_units(self.units(vector))


def make_hvp(backend: str, objective: Objective, parameters: ParameterSet,
             point: Params | None = None) -> HessianVectorProduct:
    """The named backend at ``point``."""
    if backend not in _CLASSES:
        raise ValueError(f"unknown HVP backend {backend!r}; expected one of {BACKENDS}")
    return _CLASSES[backend](objective, parameters, point)


def auto_hvp(objective: Objective, parameters: ParameterSet, point: Params | None = None,
             order: tuple[str, ...] = BACKENDS, seed: int = 0, cross_check: float = 0.1,
             ) -> tuple[HessianVectorProduct, dict[str, str]]:
    """The first backend in ``order`` that computes a finite, plausible H v here.

    A backend can also fail silently: a custom autograd Function marked
    ``once_differentiable`` makes double backward treat its inputs as unused and drop
    their second-order terms. So each exact backend's trial product is compared once with
    the finite-difference one and rejected if they differ by more than ``cross_check``
    (relative): missing terms show up as O(1) errors, while central differences of a
    smooth loss agree to ~1e-4. Returns the operator (trial products not counted) and why
    each earlier backend was rejected.
    """
    return run_units(auto_hvp_units(objective, parameters, point, order, seed, cross_check))


def auto_hvp_units(objective: Objective, parameters: ParameterSet, point: Params | None = None,
                   order: tuple[str, ...] = BACKENDS, seed: int = 0, cross_check: float = 0.1,
                   ) -> Units[tuple[HessianVectorProduct, dict[str, str]]]:
    """:func:`auto_hvp` in units: each backend's construction, its trial product and the
    finite-difference reference are one unit each, named after the backend, so a costly
    one is not predicted from a cheaper backend's."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    trial = torch.randn(parameters.numel, generator=generator).to(parameters.device)
    reference: torch.Tensor | None = None
    rejected: dict[str, str] = {}
    for backend in order:
        try:
            yield operator_kind(backend)
            operator = make_hvp(backend, objective, parameters, point)
            product = yield from operator._product_units(trial)
            if not bool(torch.isfinite(product).all()):
                rejected[backend] = "non-finite Hessian-vector product"
                continue
            if backend != FINITE_DIFFERENCE and cross_check > 0:
                if reference is None:
                    reference = yield from FiniteDifferenceHVP(
                        objective, parameters, point)._product_units(trial)
                scale = max(float(reference.norm()), float(product.norm()), 1e-30)
                disagreement = float((product - reference).norm()) / scale
                if disagreement > cross_check:
                    rejected[backend] = (f"differs from finite differences by "
                                         f"{disagreement:.1%} (missing second-order terms)")
                    continue
            return operator, rejected
        except RuntimeError as error:  # torch's missing-derivative errors derive from it
            rejected[backend] = f"{type(error).__name__}: {str(error).splitlines()[0]}"
    raise RuntimeError(f"no HVP backend works on this model: {rejected}")
