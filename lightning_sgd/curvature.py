"""Curvature of a module's loss over a fixed probe set: operators, top-k eigenvalues, trace, density, alignment.

Pure functions (no Trainer) that :class:`lightning_sgd.callbacks.CurvatureSpectrum` calls; each is usable and
tested on its own. The linear algebra is hessian-eigenthings' (``lanczos``, ``hutch_plus_plus``,
``spectral_density``); the operators here compute the module's own loss through
:class:`lightning_sgd.module_loss.ModuleLoss` (its ``training_step``, or the optional ``split_batch``/``forward``/
``loss`` protocol when the module has it), on batches of any structure. This file also makes the measurement safe
mid-training (:func:`preserved_training_state`), puts it on a budget (matvecs, or seconds on request), and derives
the large-batch quantities:

- sharpness ``λ_max·η`` against the stability threshold ``2`` of gradient descent on a quadratic (``2(1+β)`` with
  heavy-ball momentum β, ``(2+2β)/(1+2β)`` with Nesterov); full-batch training hovers at it ("edge of stability",
  Cohen et al. 2021);
- ``‖H‖_F·η/√B`` for the linear-stability bound ``‖H‖_F ≤ O(√B/η)`` of SGD minima (Wu et al. 2018), with
  ``‖H‖_F² = tr(H²)`` estimated by Hutch++ on the operator ``H²``;
- the noisy quadratic model's ``C ≈ H`` check (Zhang et al. 2019, App. E.2): curvature ``vᵀHv`` against the
  per-example gradient variance ``Var_i(vᵀg_i)`` along the top eigenvectors and as many random directions,
  summarized by a log-log fit.

Operators, and what each needs of the module:

- ``"hessian"`` (:class:`LossHessian`): Hessian-vector products of the loss by double backward. Any module whose
  ``training_step`` returns a twice-differentiable loss.
- ``"empirical_fisher"`` (:class:`LossEmpiricalFisher`): ``(1/N) Σ g_i g_iᵀ`` with the true labels, from
  per-example gradients of the loss (``torch.func.vmap`` over batches of one example). Any module whose loss is a
  mean of per-example losses (checked once by the callback).
- ``"ggn"`` (:class:`OutputGGN`): ``Jᵀ H_ℓ J``, for softmax cross-entropy the true Fisher. The only one that
  **needs the protocol**: it differentiates the network's outputs and the loss of those outputs separately, and
  ``training_step`` returns only their composition. Without the protocol, :func:`make_operator` raises
  :class:`~lightning_sgd.module_loss.ProtocolRequired`; with a loss linear in the outputs (``forward`` returning
  log-probabilities and ``loss`` being ``nll_loss``) ``H_ℓ = 0`` and the GGN would be 0, which
  :func:`check_ggn_loss` refuses.

Every product runs inside ``ModuleLoss.isolated()`` (the module's ``self.log`` muted, buffers, modes and RNG
restored) and with ``F.scaled_dot_product_attention`` restricted to its math kernel
(:func:`twice_differentiable_attention`): the fused kernels (flash, memory-efficient, and the CPU flash kernel)
have a backward that cannot itself be differentiated.
"""

from __future__ import annotations

import math
import time
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as dist
from hessian_eigenthings import (
    CurvatureOperator,
    LambdaOperator,
    hutch_plus_plus,
    lanczos,
    spectral_density,
)
from torch import Tensor, nn
from torch.func import grad, jvp, vjp, vmap

from lightning_sgd.batches import flatten_batch
from lightning_sgd.module_loss import ModuleLoss, twice_differentiable_attention
from lightning_sgd.per_example import batchnorm_eval

OperatorName = Literal["hessian", "ggn", "empirical_fisher"]
OPERATORS: tuple[str, ...] = ("hessian", "ggn", "empirical_fisher")


class CurvatureError(RuntimeError):
    """A curvature measurement cannot be made (the callback logs a skip instead of crashing)."""


class NonFiniteCurvatureError(CurvatureError):
    """An operator-vector product came back with NaN or Inf entries."""


class NotTwiceDifferentiableError(CurvatureError):
    """The loss has no usable second derivative (double backward or forward-mode AD failed)."""


class LinearLossError(CurvatureError):
    """The loss is linear in the network's outputs, so the GGN ``Jᵀ H_ℓ J`` is identically 0."""


# ------------------------------------------------------------------------------------------------- operators
def is_distributed() -> bool:
    """True inside an initialized ``torch.distributed`` job with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce_mean(tensor: Tensor) -> Tensor:
    out = tensor.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / dist.get_world_size()


class _WrappedOperator(CurvatureOperator):
    """An operator that forwards ``size``/``device``/``dtype`` to the operator it wraps; subclasses define matvec."""

    inner: CurvatureOperator

    @property
    def size(self) -> int:
        return self.inner.size

    @property
    def device(self) -> torch.device:
        return self.inner.device

    @property
    def dtype(self) -> torch.dtype:
        return self.inner.dtype


class AllReduceMeanOperator(_WrappedOperator):
    """``matvec`` of ``inner`` averaged over the ranks: the operator of the union of every rank's probe batches.

    Equal per-rank batch counts and sizes make the mean of the rank means the mean over the union.
    """

    def __init__(self, inner: CurvatureOperator) -> None:
        self.inner = inner

    def matvec(self, v: Tensor) -> Tensor:
        return _all_reduce_mean(self.inner.matvec(v))


class ModuleOperator(CurvatureOperator):
    """A curvature operator of ``loss.module``'s mean loss over ``batches``: the mean of per-batch products.

    Over the trainable parameters in ``module.parameters()`` order (the flat vector every operator acts on).
    Each :meth:`matvec` runs inside ``loss.isolated()`` and :func:`twice_differentiable_attention`; subclasses
    define the product on one batch, :meth:`batch_matvec`.
    """

    def __init__(self, loss: ModuleLoss, batches: Sequence[Any]) -> None:
        self.loss = loss
        self.batches = list(batches)
        if not self.batches:
            raise ValueError("the probe set is empty: curvature needs at least one probe batch.")
        self.params = {name: p for name, p in loss.module.named_parameters() if p.requires_grad}
        if not self.params:
            raise ValueError(f"{type(loss.module).__name__} has no trainable parameters.")
        first = next(iter(self.params.values()))
        self._size = sum(p.numel() for p in self.params.values())
        self._device, self._dtype = first.device, first.dtype

    @property
    def size(self) -> int:
        return self._size

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    def split(self, v: Tensor) -> dict[str, Tensor]:
        """The flat vector ``v`` as one tensor per trainable parameter."""
        if v.shape != (self._size,):
            raise ValueError(f"expected a vector of shape ({self._size},), got {tuple(v.shape)}.")
        chunks = torch.split(v, [p.numel() for p in self.params.values()])
        return {name: c.view_as(p) for (name, p), c in zip(self.params.items(), chunks)}

    def matvec(self, v: Tensor) -> Tensor:
        parts = self.split(v)
        with self.loss.isolated(), twice_differentiable_attention():
            total = sum(self.batch_matvec(parts, batch) for batch in self.batches)
        return total / len(self.batches)

    def batch_matvec(self, v: dict[str, Tensor], batch: Any) -> Tensor:
        """The product with ``v`` (split per parameter) on one batch, flat."""
        raise NotImplementedError


class LossHessian(ModuleOperator):
    """The Hessian of the module's loss: ``∇(∇L·v)`` by double backward on the parameters."""

    def batch_matvec(self, v: dict[str, Tensor], batch: Any) -> Tensor:
        params = list(self.params.values())
        value = self.loss.loss(batch)
        grads = torch.autograd.grad(value, params, create_graph=True)
        hvp = torch.autograd.grad(grads, params, grad_outputs=list(v.values()))
        return torch.cat([h.reshape(-1) for h in hvp])


#: Losses whose ``training_step`` ``torch.func.vmap`` cannot run: their per-example gradients use the loop.
_LOOPED: weakref.WeakSet[ModuleLoss] = weakref.WeakSet()


def per_example_gradients(loss: ModuleLoss, params: dict[str, Tensor], batch: Any,
                          chunk_size: int | None = 64) -> Iterator[Tensor]:
    """The per-example gradients of the module's loss on ``batch``, as ``(c, P)`` chunks of at most ``chunk_size``
    examples (flattened in ``params`` order).

    Example ``i``'s gradient is the gradient of the loss of a batch holding example ``i`` alone (for a mean of
    per-example losses, that example's loss), by ``vmap(grad(loss.functional_loss))`` over the tensors that carry
    the example dimension (broadcast ones stay whole). When ``vmap`` cannot run the loss (``.item()`` in
    ``training_step``, ``nn.GRU``'s internal state, an op without a batching rule) it falls back, with one warning,
    to one backward per example: the same gradients, slower. Dropout draws independent masks per example;
    BatchNorm runs on its running statistics (an example's gradient through batch statistics of one example is
    meaningless). Call inside ``loss.isolated()``.
    """
    detached = {name: p.detach() for name, p in params.items()}
    batched, rebuild, n = flatten_batch(batch, loss.who)

    def example_loss(p: dict[str, Tensor], *examples: Tensor) -> Tensor:
        return loss.functional_loss(p, rebuild([e.unsqueeze(0) for e in examples]))  # a batch of one

    def looped(start: int, stop: int) -> Tensor:  # one backward per example
        rows = []
        for i in range(start, stop):
            value = loss.loss(rebuild([t[i:i + 1] for t in batched]))
            grads = torch.autograd.grad(value, list(params.values()), allow_unused=True)
            rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                                   for p, g in zip(params.values(), grads)]))
        return torch.stack(rows)

    per_example = vmap(grad(example_loss), in_dims=(None, *[0] * len(batched)), randomness="different")
    step = n if chunk_size is None else chunk_size
    with batchnorm_eval(loss.module):
        for start in range(0, n, step):
            stop = min(n, start + step)
            chunk = None
            if loss not in _LOOPED:
                try:
                    grads = per_example(detached, *[t[start:stop] for t in batched])
                    chunk = torch.cat([grads[name].reshape(stop - start, -1) for name in detached], dim=1)
                except Exception as err:  # noqa: BLE001 - any vmap failure (a real error in the loss re-raises in the loop)
                    _LOOPED.add(loss)
                    text = str(err).splitlines()[0] if str(err) else type(err).__name__
                    warnings.warn(f"{loss.who}: torch.func.vmap cannot run the loss ({text}); per-example gradients "
                                  "fall back to one backward per example (the same values, slower).", stacklevel=2)
            yield looped(start, stop) if chunk is None else chunk


class LossEmpiricalFisher(ModuleOperator):
    """The empirical Fisher ``(1/n) Σ_i g_i g_iᵀ`` per batch, with ``g_i`` the per-example gradients of the loss
    (:func:`per_example_gradients`); ``Fv = Gᵀ(Gv)/n``, chunk by chunk."""

    def __init__(self, loss: ModuleLoss, batches: Sequence[Any], chunk_size: int | None = 64) -> None:
        super().__init__(loss, batches)
        self.chunk_size = chunk_size

    def batch_matvec(self, v: dict[str, Tensor], batch: Any) -> Tensor:
        flat = torch.cat([t.reshape(-1) for t in v.values()])
        total, n = torch.zeros_like(flat), 0
        for g in per_example_gradients(self.loss, self.params, batch, self.chunk_size):  # (c, P)
            total += g.T @ (g @ flat)
            n += g.shape[0]
        return total / n


def _rng_state(device: torch.device) -> tuple[Tensor, Tensor | None]:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(state: tuple[Tensor, Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


class OutputGGN(ModuleOperator):
    """The generalized Gauss-Newton ``Jᵀ H_ℓ J`` of the protocol's ``loss(forward(inputs), targets)``.

    ``J`` is the Jacobian of ``forward``'s outputs in the parameters (a JVP, then a VJP), ``H_ℓ`` the Hessian of
    ``loss`` in the outputs (double backward on the outputs alone). Needs the protocol (``loss.uses_protocol``).
    Both passes see the same dropout masks, so the operator is one symmetric matrix.
    """

    def __init__(self, loss: ModuleLoss, batches: Sequence[Any]) -> None:
        if not loss.uses_protocol:
            raise loss.protocol_error("needs the network's outputs separately from the loss")
        super().__init__(loss, batches)

    def batch_matvec(self, v: dict[str, Tensor], batch: Any) -> Tensor:
        module = self.loss.module
        inputs, targets = module.split_batch(batch)  # type: ignore[operator]
        detached = {name: p.detach() for name, p in self.params.items()}

        def outputs_of(p: dict[str, Tensor]) -> Tensor:
            return self.loss.functional_outputs(p, inputs)

        rng = _rng_state(self._device)
        output, jv = jvp(outputs_of, (detached,), (v,))
        leaf = output.detach().requires_grad_(True)
        g = torch.autograd.grad(module.loss(leaf, targets), leaf, create_graph=True)[0]  # type: ignore[operator]
        h_jv = torch.autograd.grad(g, leaf, grad_outputs=jv, allow_unused=True)[0]
        if h_jv is None:  # g does not depend on the outputs: H_ℓ = 0 (check_ggn_loss refuses this up front)
            h_jv = torch.zeros_like(leaf)
        _set_rng_state(rng, self._device)  # the VJP's forward draws the JVP's dropout masks
        _, pullback = vjp(outputs_of, detached)
        gv = pullback(h_jv)[0]
        return torch.cat([gv[name].reshape(-1) for name in self.params])


def check_ggn_loss(loss: ModuleLoss, batch: Any, *, seed: int = 0) -> None:
    """Raise :class:`LinearLossError` when the protocol's ``loss`` is linear in ``forward``'s outputs on ``batch``.

    The GGN is ``Jᵀ H_ℓ J`` with ``H_ℓ`` the Hessian of the loss in the outputs; when ``forward`` returns
    log-probabilities and ``loss`` is ``nll_loss`` (or any loss linear in the outputs) ``H_ℓ = 0`` and the GGN is
    silently 0 while the loss trains fine. Test: the gradient in the outputs is non-zero but ``H_ℓ u`` is exactly
    zero for a random ``u`` (autograd returns exact zeros for a linear map; any curved loss gives non-zeros).
    """
    module = loss.module
    with loss.isolated(), twice_differentiable_attention(), torch.no_grad():
        outputs, targets = loss.outputs(batch)
    if not isinstance(outputs, Tensor):
        return
    with loss.isolated():
        leaf = outputs.detach().requires_grad_(True)
        g = torch.autograd.grad(module.loss(leaf, targets), leaf, create_graph=True)[0]  # type: ignore[operator]
        if not bool(torch.isfinite(g).all()) or not bool((g != 0).any()):
            return  # no gradient to compare with (non-finite weights are reported by the measurement)
        u = torch.randn(leaf.shape, generator=torch.Generator().manual_seed(seed), dtype=leaf.dtype).to(leaf.device)
        hu = torch.autograd.grad(g, leaf, grad_outputs=u, allow_unused=True)[0] if g.requires_grad else None
    if hu is None or not bool((hu != 0).any()):
        raise LinearLossError(
            f"{loss.who}: the loss is linear in the network's outputs (its Hessian with respect to what `forward` "
            "returns is 0, e.g. `forward` returns log-probabilities and `loss` is `nll_loss`), so the GGN Jᵀ H_ℓ J "
            "is 0. Return logits from `forward` and use `cross_entropy` in `loss` (the same training loss), or "
            "use operator='hessian'.")


def make_operator(
    module: nn.Module,
    batches: Sequence[Any],
    kind: OperatorName = "hessian",
    *,
    distributed: bool | None = None,
    loss: ModuleLoss | None = None,
) -> CurvatureOperator:
    """The curvature operator of ``module``'s mean loss over ``batches`` (averaged per batch, then over ranks).

    Args:
        module: a LightningModule (its ``training_step`` is the loss), or one implementing the protocol.
        batches: the probe batches, of any structure, already on the module's device. Equal sizes make the
            operator that of the union of the examples.
        kind: ``"hessian"``, ``"ggn"`` (needs the protocol; see the module docstring) or ``"empirical_fisher"``.
        distributed: average matvecs over ``torch.distributed`` ranks; ``None`` does so inside a multi-process job.
        loss: how to compute the loss (``ModuleLoss(module, "CurvatureSpectrum")`` when not given).

    Raises:
        ProtocolRequired: ``kind="ggn"`` on a module without the protocol.
        LinearLossError: ``kind="ggn"`` with a loss linear in the outputs (checked on the first batch).
    """
    if kind not in OPERATORS:
        raise ValueError(f"operator must be one of {OPERATORS}, got {kind!r}.")
    if len(batches) == 0:
        raise ValueError("the probe set is empty: curvature needs at least one probe batch.")
    if distributed is None:
        distributed = is_distributed()
    if loss is None:
        loss = ModuleLoss(module, "CurvatureSpectrum(operator='ggn')" if kind == "ggn" else "CurvatureSpectrum",
                          use_protocol=True if kind == "ggn" else None)
    if kind == "hessian":
        op: CurvatureOperator = LossHessian(loss, batches)
    elif kind == "ggn":
        op = OutputGGN(loss, batches)
        check_ggn_loss(loss, batches[0])
    else:
        op = LossEmpiricalFisher(loss, batches)
    return AllReduceMeanOperator(op) if distributed else op


def num_parameters(module: nn.Module) -> int:
    """Trainable parameter count: the size of every operator (and of the directions per-example stats take)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


class CheckedOperator(_WrappedOperator):
    """Wraps an operator: counts and times matvecs, refuses non-finite results, optionally fixes the RNG.

    Args:
        inner: the operator.
        fixed_seed: if set, every matvec starts from ``torch.manual_seed(fixed_seed)`` so dropout (``mode="train"``)
            draws the same masks each time and the operator stays one fixed symmetric matrix. Only use it inside
            :func:`preserved_training_state` (which restores the RNG).
    """

    def __init__(self, inner: CurvatureOperator, fixed_seed: int | None = None) -> None:
        self.inner = inner
        self.fixed_seed = fixed_seed
        self.matvecs = 0
        self.seconds = 0.0

    def matvec(self, v: Tensor) -> Tensor:
        start = time.perf_counter()
        if self.fixed_seed is not None:
            torch.manual_seed(self.fixed_seed)
        try:
            out = self.inner.matvec(v)
        except RuntimeError as err:
            text = str(err).splitlines()[0].rstrip(". ") if str(err) else type(err).__name__
            if any(s in text for s in ("does not require grad", "once_differentiable", "second time",
                                       "not implemented", "forward AD", "inplace", "in-place")):
                raise NotTwiceDifferentiableError(
                    f"the curvature operator could not differentiate the loss twice ({text}). "
                    "Make the loss twice differentiable (no .detach()/.item() on the path, no "
                    "once_differentiable custom functions), or choose another operator/mode "
                    "(operator='hessian' or mode='eval' when BatchNorm trains under torch.func)."
                ) from err
            raise
        out = out.detach()  # EmpiricalFisherOperator's products keep an autograd graph to the parameters
        if not bool(torch.isfinite(out).all()):
            raise NonFiniteCurvatureError(
                "a curvature-vector product has NaN/Inf entries (diverged weights or a non-finite loss on the "
                "probe set); this measurement is skipped."
            )
        self.matvecs += 1
        self.seconds += time.perf_counter() - start
        return out


# ------------------------------------------------------------------------------------------- safe mid-training
@contextmanager
def preserved_training_state(module: nn.Module, mode: Literal["eval", "train"] = "eval") -> Iterator[None]:
    """Run a measurement inside: puts ``module`` in ``mode``, then restores everything it could change.

    Restored bit-for-bit: every buffer (BatchNorm running statistics and counters), each submodule's
    ``training`` flag, the torch CPU RNG (and the CUDA RNG of initialized devices), and every parameter's
    ``.grad`` (the same tensor object, with its values).
    """
    if mode not in ("eval", "train"):
        raise ValueError(f"mode must be 'eval' or 'train', got {mode!r}.")
    modes = [(m, m.training) for m in module.modules()]
    buffers = [(b, b.detach().clone()) for b in module.buffers()]
    grads = [(p, p.grad, None if p.grad is None else p.grad.detach().clone()) for p in module.parameters()]
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    devices = list(range(torch.cuda.device_count())) if cuda else []
    with torch.random.fork_rng(devices=devices):
        module.train(mode == "train")
        try:
            yield
        finally:
            with torch.no_grad():
                for m, training in modes:
                    m.training = training
                for b, saved in buffers:
                    b.copy_(saved)
                for p, grad, saved in grads:
                    p.grad = grad
                    if grad is not None and saved is not None:
                        grad.copy_(saved)


# ------------------------------------------------------------------------------------------------ probe set
def probe_indices(
    dataset_size: int, num_batches: int, batch_size: int, *, seed: int = 0, rank: int = 0, world_size: int = 1
) -> list[list[int]]:
    """This rank's probe batches as dataset indices: drawn once from ``seed``, disjoint across ranks.

    The same arguments always give the same indices, so the probe set (and every value measured on it) is
    comparable across steps and across a resume.
    """
    if num_batches < 1 or batch_size < 1:
        raise ValueError(f"the probe set is empty: need num_batches >= 1 and batch_size >= 1, got "
                         f"{num_batches} and {batch_size}.")
    need = num_batches * batch_size * world_size
    if dataset_size < need:
        raise ValueError(
            f"the probe set needs {num_batches} batch(es) of {batch_size} examples on each of {world_size} "
            f"rank(s) = {need} examples, but the dataset has {dataset_size}; lower probe_batches or "
            "probe_batch_size."
        )
    perm = torch.randperm(dataset_size, generator=torch.Generator().manual_seed(seed)).tolist()
    mine = perm[rank * num_batches * batch_size : (rank + 1) * num_batches * batch_size]
    return [mine[i * batch_size : (i + 1) * batch_size] for i in range(num_batches)]


# ------------------------------------------------------------------------------------------------- results
@dataclass
class AlignmentResult:
    """The NQM's ``C ≈ H`` check: curvature and per-example gradient variance along the same directions."""

    curvature: list[float]  # vᵀHv per direction (top-k eigenvectors first, then random directions)
    grad_variance: list[float]  # Var_i(vᵀg_i) over the probe examples, same order
    kind: list[str]  # "eigenvector" or "random" per direction
    loglog_corr: float  # Pearson correlation of log curvature vs log variance (positive pairs only)
    loglog_slope: float  # least-squares slope of log variance on log curvature (1 if C ∝ H)
    num_pairs: int  # pairs with both values > 0 that entered the fit
    num_examples: int


@dataclass
class CurvatureResult:
    """One measurement; plain Python values (lists and floats) so it logs, broadcasts and pickles as is."""

    operator: str
    eigenvalues: list[float] = field(default_factory=list)  # descending (which="LA") Ritz values
    residuals: list[float] = field(default_factory=list)  # ‖Hv − λv‖ per Ritz pair (Lanczos' a-posteriori bound)
    converged: list[bool] = field(default_factory=list)
    lanczos_iterations: int = 0
    truncated: bool = False  # the budget (matvecs or seconds) cut Lanczos short
    trace: float | None = None
    trace_stderr: float | None = None
    frobenius: float | None = None  # ‖H‖_F = sqrt(tr(H²))
    frobenius_stderr: float | None = None
    density_grid: list[float] | None = None
    density: list[float] | None = None
    alignment: AlignmentResult | None = None
    matvecs: int = 0
    seconds: float = 0.0
    skipped: dict[str, str] = field(default_factory=dict)  # stage -> why it did not run

    @property
    def lambda_max(self) -> float | None:
        return max(self.eigenvalues) if self.eigenvalues else None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class MeasureConfig:
    """What one measurement computes; 0 switches a stage off."""

    k: int = 5  # top-k eigenvalues by Lanczos
    lanczos_iterations: int | None = None  # Krylov dimension; None: max(2k, k + 20), capped at the parameter count
    which: Literal["LA", "LM"] = "LA"  # largest algebraic (the top of the spectrum) or largest magnitude
    trace_matvecs: int = 30  # Hutch++ matvecs for tr(H); 0 off
    frobenius_matvecs: int = 0  # Hutch++ samples for tr(H²) (each costs 2 matvecs); 0 off
    density_runs: int = 0  # SLQ runs; 0 off
    density_steps: int = 30  # Lanczos steps per SLQ run
    density_grid_points: int = 200
    alignment: bool = False  # the C ≈ H check (per-example gradients of the loss)
    matvec_budget: int | None = None  # matvecs per measurement (probe included); truncates Lanczos, skips stages
    time_budget: float | None = None  # seconds per measurement (opt-in: depends on machine load); same effect
    seed: int = 0  # Lanczos start vector, Hutch++ probes, SLQ and random directions

    def validate(self) -> None:
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}.")
        if self.lanczos_iterations is not None and self.lanczos_iterations < self.k:
            raise ValueError(f"lanczos_iterations={self.lanczos_iterations} must be >= k={self.k}.")
        if self.which not in ("LA", "LM"):
            raise ValueError(f"which must be 'LA' or 'LM', got {self.which!r}.")
        for name in ("trace_matvecs", "frobenius_matvecs", "density_runs"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}.")
        if 0 < self.trace_matvecs < 3 or 0 < self.frobenius_matvecs < 3:
            raise ValueError("Hutch++ splits its matvecs in three: use trace_matvecs/frobenius_matvecs >= 3 or 0.")
        if self.density_steps < 2:
            raise ValueError(f"density_steps must be >= 2, got {self.density_steps}.")
        if self.time_budget is not None and self.time_budget <= 0:
            raise ValueError(f"time_budget must be > 0 seconds or None, got {self.time_budget}.")
        if self.matvec_budget is not None and self.matvec_budget < 2:
            raise ValueError(f"matvec_budget must be >= 2 (one probe product and one Lanczos step) or None, got "
                             f"{self.matvec_budget}.")


def check_k(k: int, size: int) -> None:
    """Clear error when more eigenvalues are asked for than the operator has."""
    if k > size:
        raise ValueError(f"k={k} eigenvalues asked for, but the model has only {size} trainable parameters; "
                         f"use k <= {size}.")


# ------------------------------------------------------------------------------------------- measurements
def top_eigenvalues(
    operator: CurvatureOperator, k: int, *, max_iter: int | None = None, which: str = "LA", seed: int = 0
) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
    """Top-k Ritz pairs by the library's Lanczos (full reorthogonalization), sorted descending.

    Returns ``(eigenvalues (k,), eigenvectors (k, P), residuals (k,), converged (k,), iterations)``; fewer than
    k pairs come back when Lanczos finds an invariant subspace early (an operator of rank < k).
    """
    n = operator.size
    check_k(k, n)
    iters = min(max(max_iter if max_iter is not None else max(2 * k, k + 20), k), n)
    res = lanczos(operator, k=k, max_iter=iters, which=which, seed=seed, reorthogonalize=True)  # type: ignore[arg-type]
    order = torch.argsort(res.eigenvalues, descending=True)
    return (res.eigenvalues[order], res.eigenvectors[order], res.residuals[order], res.converged[order],
            res.iterations)


def squared_operator(operator: CurvatureOperator) -> CurvatureOperator:
    """``H²`` as an operator (two matvecs each): ``tr(H²) = ‖H‖_F²``."""
    return LambdaOperator(lambda v: operator.matvec(operator.matvec(v)), operator.size, operator.device,
                          operator.dtype)


def frobenius_norm(operator: CurvatureOperator, num_matvecs: int = 30, *, seed: int = 0) -> tuple[float, float]:
    """``‖H‖_F`` and its standard error: Hutch++ on ``H²`` (``num_matvecs`` H² products), delta method for the root.

    Hutch++ rather than plain Hutchinson because ``H²`` is dominated by a few eigenvalues, which the sketch phase
    captures exactly (plain Hutchinson on a near rank-one ``H²`` has a relative error of ~√2 per sample).
    """
    res = hutch_plus_plus(squared_operator(operator), num_matvecs=num_matvecs, seed=seed)
    value = math.sqrt(max(res.estimate, 0.0))
    stderr = res.stderr / (2 * value) if value > 0 and math.isfinite(res.stderr) else float("nan")
    return value, stderr


def loglog_fit(curvature: Sequence[float], variance: Sequence[float]) -> tuple[float, float, int]:
    """Pearson correlation and least-squares slope of ``log variance`` on ``log curvature`` over positive pairs."""
    pairs = [(math.log(c), math.log(v)) for c, v in zip(curvature, variance) if c > 0 and v > 0]
    if len(pairs) < 2:
        return float("nan"), float("nan"), len(pairs)
    x = torch.tensor([p[0] for p in pairs], dtype=torch.float64)
    y = torch.tensor([p[1] for p in pairs], dtype=torch.float64)
    dx, dy = x - x.mean(), y - y.mean()
    sxx, syy = float((dx * dx).sum()), float((dy * dy).sum())
    if sxx == 0 or syy == 0:
        return float("nan"), float("nan"), len(pairs)
    sxy = float((dx * dy).sum())
    return sxy / math.sqrt(sxx * syy), sxy / sxx, len(pairs)


def projection_variance(
    module: nn.Module,
    batches: Sequence[Any],
    directions: Tensor,
    *,
    distributed: bool | None = None,
    loss: ModuleLoss | None = None,
) -> tuple[Tensor, int]:
    """``Var_i(vⱼᵀg_i)`` (unbiased) over every probe example (all ranks), for each row ``vⱼ`` of ``directions``.

    ``directions`` is ``(d, P)`` over the flattened trainable parameters in ``module.parameters()`` order; the
    per-example gradients ``g_i`` are those of the module's loss (:func:`per_example_gradients`, through ``loss``,
    by default ``ModuleLoss(module, "CurvatureSpectrum")``).
    """
    if distributed is None:
        distributed = is_distributed()
    if loss is None:
        loss = ModuleLoss(module, "CurvatureSpectrum")
    params = {name: p for name, p in module.named_parameters() if p.requires_grad}
    s1 = torch.zeros(directions.shape[0], dtype=torch.float64, device=directions.device)
    s2 = torch.zeros_like(s1)
    count = torch.zeros((), dtype=torch.float64, device=directions.device)
    with loss.isolated(), twice_differentiable_attention():
        for batch in batches:
            for g in per_example_gradients(loss, params, batch):  # (c, P)
                proj = (g @ directions.to(g.dtype).T).to(torch.float64)  # (c, d)
                s1 += proj.sum(0)
                s2 += (proj * proj).sum(0)
                count += proj.shape[0]
    if distributed:
        packed = torch.cat([s1, s2, count.reshape(1)])
        dist.all_reduce(packed, op=dist.ReduceOp.SUM)
        s1, s2, count = packed[: len(s1)], packed[len(s1) : 2 * len(s1)], packed[-1]
    n = int(count.item())
    if n < 2:
        raise CurvatureError("the gradient-variance check needs at least 2 probe examples.")
    var = (s2 - s1 * s1 / n) / (n - 1)
    return var.clamp(min=0.0), n


class _Budget:
    """Per-measurement budget in matvecs (deterministic) and/or seconds (load-dependent); time decisions agree across
    ranks (every rank runs the same matvecs)."""

    def __init__(self, seconds: float | None, distributed: bool, matvecs: int | None = None,
                 used: Callable[[], int] = lambda: 0) -> None:
        self.seconds, self.distributed = seconds, distributed
        self.matvecs, self.used = matvecs, used
        self.start = time.perf_counter()
        self.seconds_per_matvec = 0.0

    def _agree(self, value: float, op: dist.ReduceOp) -> float:
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t, op=op)
        return float(t.item())

    def calibrate(self, seconds_per_matvec: float) -> None:
        self.seconds_per_matvec = self._agree(seconds_per_matvec, dist.ReduceOp.MAX)

    def matvecs_left(self) -> int | None:
        """How many more matvecs fit (None: no budget); the time part agreed as the minimum over ranks."""
        left = None if self.matvecs is None else max(0, self.matvecs - self.used())
        if self.seconds is None:
            return left
        seconds = self._agree(self.seconds - (time.perf_counter() - self.start), dist.ReduceOp.MIN)
        by_time = max(0, int(seconds / max(self.seconds_per_matvec, 1e-9)))
        return by_time if left is None else min(left, by_time)

    def fits(self, matvecs: int) -> bool:
        left = self.matvecs_left()
        return left is None or matvecs <= left


def measure(
    operator: CurvatureOperator,
    config: MeasureConfig,
    *,
    name: str = "hessian",
    variance_fn: Callable[[Tensor], tuple[Tensor, int]] | None = None,
    distributed: bool | None = None,
) -> CurvatureResult:
    """Top-k eigenvalues, trace, Frobenius norm, density and alignment of one operator, within a budget.

    Stages run in that order. A probe matvec checks the operator is finite and times one product (two with a time
    budget). With ``config.matvec_budget`` (products, the probe included: the same result on any machine) or
    ``config.time_budget`` (seconds: depends on the machine's load), Lanczos gets as many iterations as fit what is
    left (``truncated`` says it was cut), and each later stage runs only if its matvecs fit what remains, else it is
    listed in ``skipped``.
    Under DDP every decision is agreed across ranks, so all ranks run the same collectives.

    Args:
        operator: e.g. from :func:`make_operator` (wrap in nothing: this function adds :class:`CheckedOperator`
            unless it is one already).
        config: what to compute.
        name: the operator's name (recorded in the result).
        variance_fn: maps ``(d, P)`` directions to ``(Var_i(vᵀg_i) (d,), n)`` for the alignment stage, e.g.
            ``functools.partial(projection_variance, module, batches)``.
        distributed: whether ``operator`` reduces across ranks (for budget agreement); ``None``: auto.

    Raises:
        NonFiniteCurvatureError, NotTwiceDifferentiableError: the operator cannot be used at these weights.
    """
    config.validate()
    if distributed is None:
        distributed = is_distributed()
    op = operator if isinstance(operator, CheckedOperator) else CheckedOperator(operator)
    n = op.size
    check_k(config.k, n)
    result = CurvatureResult(operator=name)
    budget = _Budget(config.time_budget, distributed, config.matvec_budget, lambda: op.matvecs)
    gen = torch.Generator().manual_seed(config.seed + 7919)

    # probe matvecs: finiteness (and twice-differentiability) check + the cost of one product. The first call
    # pays one-time costs (allocator, lazy init), so a budget times a second one and keeps the faster.
    costs = []
    for _ in range(2 if config.time_budget is not None else 1):
        before = op.seconds
        op.matvec(torch.randn(n, generator=gen, dtype=op.dtype).to(op.device))
        costs.append(op.seconds - before)
    budget.calibrate(min(costs))

    # 1. top-k eigenpairs (truncated by the budget)
    vectors: Tensor | None = None
    iters = min(max(config.lanczos_iterations or max(2 * config.k, config.k + 20), config.k), n)
    left = budget.matvecs_left()
    if left is not None and left < iters:
        result.truncated = True
        iters = left
    if iters >= 1:
        k = min(config.k, iters)
        eig, vectors, res, conv, its = top_eigenvalues(op, k, max_iter=iters, which=config.which, seed=config.seed)
        result.eigenvalues, result.residuals = eig.tolist(), res.tolist()
        result.converged, result.lanczos_iterations = [bool(c) for c in conv], its
    else:
        result.skipped["eigenvalues"] = "budget spent before Lanczos could run"

    # 2. trace by Hutch++
    if config.trace_matvecs:
        cost = 3 * (config.trace_matvecs // 3)
        if budget.fits(cost):
            tr = hutch_plus_plus(op, num_matvecs=config.trace_matvecs, seed=config.seed + 1)
            result.trace, result.trace_stderr = tr.estimate, tr.stderr
        else:
            result.skipped["trace"] = f"budget: {cost} matvecs do not fit"

    # 3. Frobenius norm: Hutch++ on H²
    if config.frobenius_matvecs:
        cost = 6 * (config.frobenius_matvecs // 3)
        if budget.fits(cost):
            result.frobenius, result.frobenius_stderr = frobenius_norm(
                op, config.frobenius_matvecs, seed=config.seed + 2)
        else:
            result.skipped["frobenius"] = f"budget: {cost} matvecs do not fit"

    # 4. spectral density by stochastic Lanczos quadrature
    if config.density_runs:
        steps = min(config.density_steps, n)
        cost = config.density_runs * steps
        if budget.fits(cost):
            sd = spectral_density(op, num_runs=config.density_runs, lanczos_steps=steps,
                                  num_grid_points=config.density_grid_points, seed=config.seed + 3)
            result.density_grid, result.density = sd.grid.tolist(), sd.density.tolist()
        else:
            result.skipped["density"] = f"budget: {cost} matvecs do not fit"

    # 5. alignment: curvature vs per-example gradient variance along eigenvectors and random directions
    if config.alignment:
        if variance_fn is None:
            result.skipped["alignment"] = "no per-example gradient engine given"
        elif vectors is None or len(vectors) == 0:
            result.skipped["alignment"] = "no eigenvectors (Lanczos did not run)"
        elif not budget.fits(len(vectors)):
            result.skipped["alignment"] = f"budget: {len(vectors)} matvecs do not fit"
        else:
            rand = torch.randn(len(vectors), n, generator=gen, dtype=op.dtype).to(op.device)
            rand = rand / rand.norm(dim=1, keepdim=True)
            # Ritz values are the Rayleigh quotients vᵀHv of their (unit) Ritz vectors: no matvec needed
            curv = list(result.eigenvalues) + [float(r @ op.matvec(r)) for r in rand]
            var, count = variance_fn(torch.cat([vectors, rand]))
            variance = var.tolist()
            corr, slope, used = loglog_fit(curv, variance)
            result.alignment = AlignmentResult(
                curvature=curv, grad_variance=variance,
                kind=["eigenvector"] * len(vectors) + ["random"] * len(rand),
                loglog_corr=corr, loglog_slope=slope, num_pairs=used, num_examples=count)

    result.matvecs = op.matvecs
    result.seconds = time.perf_counter() - budget.start
    return result


# --------------------------------------------------------------------------------------------- derived values
@dataclass(frozen=True)
class OptimizerState:
    """What the stability threshold needs from an optimizer's first param group."""

    lr: float
    momentum: float = 0.0
    nesterov: bool = False
    dampening: float = 0.0
    weight_decay: float = 0.0
    adaptive: bool = False  # Adam-like (has ``betas``): the SGD threshold does not apply to it


def optimizer_state(optimizer: torch.optim.Optimizer) -> OptimizerState:
    """Read the current LR and heavy-ball momentum (``param_groups[0]``) of a torch optimizer."""
    group = optimizer.param_groups[0]
    lr = group["lr"]
    return OptimizerState(
        lr=float(lr.item() if isinstance(lr, Tensor) else lr),
        momentum=float(group.get("momentum", 0.0) or 0.0),
        nesterov=bool(group.get("nesterov", False)),
        dampening=float(group.get("dampening", 0.0) or 0.0),
        weight_decay=float(group.get("weight_decay", 0.0) or 0.0),
        adaptive="betas" in group,
    )


def stability_threshold(momentum: float = 0.0, nesterov: bool = False) -> float:
    """Largest stable ``η·λ`` on a quadratic: 2 for GD, ``2(1+β)`` for heavy-ball, ``(2+2β)/(1+2β)`` for Nesterov.

    Heavy-ball: the update ``θ' = θ − ηλθ + β(θ − θ₋)`` has a root at −1 when ``ηλ = 2(1+β)``. Nesterov in
    PyTorch's form (``b = βb + g``, ``θ' = θ − η(g + βb)``) has the iteration matrix ``[[1−a(1+β), −β²], [a, β]]``
    in ``(θ, ηb)`` with ``a = ηλ``, whose root at −1 gives ``a = (2+2β)/(1+2β)``.
    """
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}.")
    return (2 + 2 * momentum) / (1 + 2 * momentum) if nesterov else 2 * (1 + momentum)


def sharpness(lambda_max: float, state: OptimizerState) -> tuple[float, float]:
    """``(λ_max·η_eff, threshold)``: SGD is unstable along the top eigendirection when the first exceeds the second.

    ``η_eff = η(1 − dampening)``, the step PyTorch's SGD takes per unit of gradient entering the momentum buffer.
    The raw Hessian of the loss is used; coupled weight decay would add ``weight_decay`` to every eigenvalue.
    """
    return lambda_max * state.lr * (1.0 - state.dampening), stability_threshold(state.momentum, state.nesterov)


def frobenius_bound(frobenius: float, lr: float, batch_size: int) -> float:
    """``‖H‖_F·η/√B``: stays O(1) at minima SGD can stay in (Wu et al. 2018, linear stability of SGD)."""
    return frobenius * lr / math.sqrt(batch_size)
