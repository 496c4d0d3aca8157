"""Per-example squared gradient norms read off the ordinary backward pass (no second pass, no ``vmap``).

For a layer whose weight gradient is a sum over examples of products of its input and its output gradient, the
per-example gradient norm follows from those two tensors alone (Goodfellow 2015, "Efficient per-example gradient
computations"; the "ghost norm" of Li et al. 2022, "Large language models can be strong differentially private
learners"; the mixed ghost norm of Bu et al. 2023; BackPACK's ``BatchL2Grad``, Dangel et al. 2020). With the input
``A_i`` (T × d_in) and the output gradient ``D_i`` (T × d_out) of example i over T positions (tokens, conv
output locations; T = 1 for a plain ``Linear`` on a batch of vectors):

.. math::

    |\\nabla_W \\ell_i|^2 = |D_i^\\top A_i|_F^2 = \\sum_{t,s} (A_i A_i^\\top)_{ts} (D_i D_i^\\top)_{ts},
    \\qquad |\\nabla_b \\ell_i|^2 = |\\textstyle\\sum_t D_{i,t}|^2 .

Per layer the cheaper of the two forms is used: materialize the per-example gradient (T·d_in·d_out per example)
or the two T × T Gram matrices (T²·(d_in + d_out)). Supported layers: ``nn.Linear`` (any leading shape),
``nn.Conv1d``/``2d``/``3d`` (``groups=1``, zero padding, numeric padding; the input is unfolded into patches),
``nn.Embedding`` (positions holding the same token share a row; ``padding_idx`` rows get no gradient),
``nn.LayerNorm`` and ``nn.GroupNorm`` (affine: per-example sums of ``D ⊙ x̂``). Anything else that owns a trainable
parameter (``nn.MultiheadAttention``, RNNs, a bare ``nn.Parameter``, parametrizations) is *unsupported*:
:func:`unsupported_layers` names it and the caller falls back to the ``vmap`` engine
(:mod:`lightning_sgd.per_example`).

What the hooks see are the per-example *contributions* to the gradient of the loss that was backpropagated: for a
mean loss over B examples, scaled by AMP's loss scale S, contribution i is S·∇ℓ_i / B. :meth:`PerExampleNormHooks.
collect` returns the raw squared norms of the contributions; the caller multiplies by (B/S)².

What the hooks cannot see, and how it is caught: a parameter also used outside its module's forward (a tied output
layer ``x @ embed.weight.T``), a module called twice per forward (weight sharing), a loss term outside the layers
(an L2 penalty in ``training_step``). Calls are counted at every step, :meth:`PerExampleNormHooks.check_bias_sums`
checks that the per-example bias gradients add up to ``.grad``, and :func:`validate` compares the hooks against the
``vmap`` engine on a few examples once per run. Not caught: a training loss whose reduction differs from the
module's ``loss`` (the hooks assume the mean over examples of :mod:`lightning_sgd.protocols`).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils._pytree import tree_map

from lightning_sgd.per_example import PerExampleStats, layer_of, per_example_gradient_stats, trainable_parameters
from lightning_sgd.protocols import num_examples, require_supervised

__all__ = ["PerExampleNormHooks", "unsupported_layers", "validate", "module_eval", "hook_gradient_stats"]

_SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding, nn.LayerNorm, nn.GroupNorm)
#: Upper bound on the elements of one materialized per-example-gradient block (float32: 64 MB).
_MAX_BLOCK = 1 << 24


def _layer_problem(module: nn.Module) -> str | None:
    """Why the hooks cannot handle this module's own trainable parameters, or ``None`` when they can."""
    own = [name for name, p in module.named_parameters(recurse=False) if p.requires_grad]
    if not own:
        return None
    if type(module) not in _SUPPORTED:  # exact types: subclasses may use their parameters differently
        return f"{type(module).__name__} (parameters {', '.join(own)}) is not a supported layer type"
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        if module.groups != 1:
            return f"{type(module).__name__} with groups={module.groups} (only groups=1 is supported)"
        if module.padding_mode != "zeros" or isinstance(module.padding, str):
            return f"{type(module).__name__} with padding={module.padding!r}, padding_mode={module.padding_mode!r}"
    if isinstance(module, nn.Embedding) and module.scale_grad_by_freq:
        return "Embedding with scale_grad_by_freq=True (the gradient depends on the whole batch)"
    return None


def unsupported_layers(module: nn.Module) -> list[str]:
    """``"name: reason"`` for every submodule whose trainable parameters the hooks cannot handle (empty: all can)."""
    out = []
    for name, sub in module.named_modules():
        problem = _layer_problem(sub)
        if problem is not None:
            out.append(f"{name or '<root>'}: {problem}")
    return out


def _up(x: Tensor) -> Tensor:
    """At least float32 (half-precision activations and gradients under autocast), float64 kept."""
    return x if x.dtype == torch.float64 else x.float()


def _rows(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1)


def _sq_norm_of_products(a: Tensor, d: Tensor, form: str = "auto") -> Tensor:
    """(B,) |D_iᵀ A_i|_F² for a (B, T, d_in) and d (B, T, d_out); ``form``: "auto" (the cheaper of the two),
    "materialize" or "gram"."""
    b, t, d_in = a.shape
    d_out = d.shape[-1]
    if t == 1 and form == "auto":
        return _rows(a).square().sum(1) * _rows(d).square().sum(1)
    materialize = form == "materialize" or (form == "auto" and t * d_in * d_out <= t * t * (d_in + d_out))
    per_example = d_in * d_out if materialize else t * t
    chunk = max(1, _MAX_BLOCK // max(per_example, 1))
    out = []
    for start in range(0, b, chunk):
        ac, dc = a[start:start + chunk], d[start:start + chunk]
        if materialize:
            out.append(torch.bmm(dc.transpose(1, 2), ac).square().sum((1, 2)))  # (c, d_out, d_in) -> (c,)
        else:
            out.append((torch.bmm(ac, ac.transpose(1, 2)) * torch.bmm(dc, dc.transpose(1, 2))).sum((1, 2)))
    return torch.cat(out)


def _unfold(conv: nn.Conv1d | nn.Conv2d | nn.Conv3d, x: Tensor) -> Tensor:
    """The conv's input patches (B, L_out, C_in·Πk) such that the output is patches @ weight.flatten(1).T (up to
    the order of the C_in·Πk columns, which norms do not see). Strided views of the padded input and one copy:
    about half the time of ``F.unfold`` on CPU, and any number of spatial dimensions."""
    dims = x.dim() - 2
    if any(conv.padding):
        x = F.pad(x, [p for p in reversed(conv.padding) for _ in range(2)])  # F.pad lists the last dim first
    for i in range(dims):  # (B, C, S1, ..) -> (B, C, L1, .., Ld, span1, .., spand)
        x = x.unfold(2 + i, conv.dilation[i] * (conv.kernel_size[i] - 1) + 1, conv.stride[i])
    if any(d > 1 for d in conv.dilation):
        x = x[(..., *(slice(None, None, d) for d in conv.dilation))]
    x = x.permute(0, *range(2, 2 + dims), 1, *range(2 + dims, 2 + 2 * dims))  # (B, L1.., C, k1..)
    return x.reshape(x.shape[0], math.prod(x.shape[1:1 + dims]), -1)


def _layer_sq_norms(module: nn.Module, x: Tensor, d: Tensor) -> tuple[Tensor, Tensor | None]:
    """(B,) squared norms of the per-example contributions to this call's trainable parameters, and the batch sum
    of the bias contributions (for the consistency check; ``None`` without a trainable bias)."""
    weight = module.weight if getattr(module, "weight", None) is not None and module.weight.requires_grad else None
    bias = module.bias if getattr(module, "bias", None) is not None and module.bias.requires_grad else None
    d = _up(d)
    b = d.shape[0]
    total = torch.zeros(b, dtype=d.dtype, device=d.device)
    bias_grad = None  # (B, ...) per-example bias contributions
    if isinstance(module, nn.Linear):
        d3 = d.reshape(b, -1, d.shape[-1])  # (B, T, out)
        if weight is not None:
            total += _sq_norm_of_products(_up(x).reshape(b, -1, x.shape[-1]), d3)
        if bias is not None:
            bias_grad = d3.sum(1)
    elif isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        d3 = d.reshape(b, d.shape[1], -1).transpose(1, 2)  # (B, L_out, out)
        if weight is not None:
            total += _sq_norm_of_products(_unfold(module, _up(x)), d3)
        if bias is not None:
            bias_grad = d3.sum(1)
    elif isinstance(module, nn.Embedding):
        idx = x.reshape(b, -1)  # (B, T)
        d3 = d.reshape(b, idx.shape[1], -1)  # (B, T, dim)
        if module.padding_idx is not None:
            d3 = d3 * (idx != module.padding_idx).unsqueeze(-1)
        if idx.shape[1] == 1:
            total += _rows(d3).square().sum(1)
        else:  # positions holding the same token add up in one row: Σ_ts [x_t = x_s] d_t·d_s
            same = idx.unsqueeze(2) == idx.unsqueeze(1)  # (B, T, T)
            total += (torch.bmm(d3, d3.transpose(1, 2)) * same).sum((1, 2))
    elif isinstance(module, nn.LayerNorm):
        x_hat = F.layer_norm(_up(x), module.normalized_shape, eps=module.eps)
        width = math.prod(module.normalized_shape)
        if weight is not None:
            total += (d * x_hat).reshape(b, -1, width).sum(1).square().sum(1)
        if bias is not None:
            bias_grad = d.reshape(b, -1, width).sum(1)
    elif isinstance(module, nn.GroupNorm):
        x_hat = F.group_norm(_up(x), module.num_groups, eps=module.eps)
        channels = module.num_channels
        if weight is not None:
            total += (d * x_hat).reshape(b, channels, -1).sum(2).square().sum(1)
        if bias is not None:
            bias_grad = d.reshape(b, channels, -1).sum(2)
    else:  # pragma: no cover - guarded by _layer_problem
        raise TypeError(f"unsupported layer {type(module).__name__}")
    if bias_grad is None:
        return total, None
    return total + bias_grad.square().sum(1), bias_grad.sum(0)


class PerExampleNormHooks:
    """Forward hooks on a model's supported layers that turn its next backward pass into per-example norms.

    Usage per measured step: :meth:`arm` before the forward, let training run forward and backward, then
    :meth:`collect` (which also removes the hooks). Between ``arm`` and ``collect`` every forward of a supported
    layer with gradients enabled saves a reference to its input (autograd keeps it anyway) and registers a tensor
    hook on its output; the tensor hook computes the layer's per-example squared norms as soon as the output
    gradient arrives, and drops the input.

    Args:
        module: the model; every submodule that owns trainable parameters must be supported
            (:func:`unsupported_layers` is empty), else ``ValueError``.
        layer_names: also keep squared norms per layer (owning module name), as :func:`layer_of` names them.
        capture_if: called at each armed forward of a layer; the forward is ignored when it returns False (e.g.
            GradientNoiseScale captures only forwards inside Lightning's ``training_step``, not the extra passes
            other callbacks run between ``arm`` and ``collect``).
    """

    def __init__(self, module: nn.Module, layer_names: bool = False,
                 capture_if: Callable[[], bool] | None = None) -> None:
        problems = unsupported_layers(module)
        if problems:
            raise ValueError("PerExampleNormHooks cannot compute per-example norms through: " + "; ".join(problems)
                             + ". Use the vmap engine (lightning_sgd.per_example) for this model.")
        self.module = module
        self.layer_names = layer_names
        self.capture_if = capture_if
        self._layers = {sub: name for name, sub in module.named_modules() if any(
            p.requires_grad for p in sub.parameters(recurse=False))}
        self._handles: list[Any] = []
        self._reset()

    def _reset(self) -> None:
        self.sq_norms: Tensor | None = None  # (B,) float64 contributions' squared norms, summed over layers
        self.layer_sq_norms: dict[str, Tensor] = {}
        self.bias_sums: dict[str, Tensor] = {}  # layer -> batch sum of its bias contributions
        self.problem: str | None = None  # why this step's norms cannot be trusted
        self._calls: dict[str, int] = {}
        self._pending = 0  # output hooks registered but not yet fired

    @property
    def armed(self) -> bool:
        return bool(self._handles)

    def arm(self) -> None:
        """Start capturing: the next forward/backward's per-example norms."""
        self.disarm()
        self._reset()
        for sub in self._layers:
            self._handles.append(sub.register_forward_hook(self._forward_hook, with_kwargs=True))

    def disarm(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _forward_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if not torch.is_grad_enabled() or not isinstance(output, Tensor) or not output.requires_grad:
            return
        if self.capture_if is not None and not self.capture_if():
            return
        name = self._layers[module]
        self._calls[name] = self._calls.get(name, 0) + 1
        if self._calls[name] > 1:
            self.problem = f"layer {name!r} was called more than once in one forward (shared weights)"
            return
        x = args[0] if args else next(iter(kwargs.values()), None)
        if not isinstance(x, Tensor) or x.dim() < (1 if isinstance(module, nn.Embedding) else 2):
            self.problem = f"layer {name!r} got an input without a batch dimension"
            return
        # An input modified in place after the layer read it would make x stale here, but autograd refuses to
        # backpropagate through such a graph itself (it saved the same input for the weight gradient).
        x = x.detach()
        self._pending += 1

        def on_grad(d: Tensor) -> None:
            self._pending -= 1
            sq, bias_sum = _layer_sq_norms(module, x, d.detach())
            sq = sq.double()
            self.sq_norms = sq if self.sq_norms is None else self.sq_norms + sq
            if self.layer_names:
                self.layer_sq_norms[name] = sq
            if bias_sum is not None:
                self.bias_sums[name] = bias_sum

        output.register_hook(on_grad)

    def collect(self) -> tuple[Tensor | None, dict[str, Tensor], str | None]:
        """Stop capturing; return (sq_norms (B,), per-layer sq_norms, problem or ``None``)."""
        self.disarm()
        problem = self.problem
        if problem is None and self._pending:
            problem = f"{self._pending} layer output(s) got no gradient in this backward"
        if problem is None and self.sq_norms is None:
            problem = "no supported layer ran forward and backward while armed"
        out = (self.sq_norms, dict(self.layer_sq_norms), problem)
        self._reset()
        return out

    def check_bias_sums(self, scale: float, rtol: float = 1e-2) -> str | None:
        """Compare the summed per-example bias contributions of the last :meth:`collect`-ed step with ``.grad``.

        A mismatch means ``.grad`` is not the sum of what the hooks saw (the loss is not a plain mean of per-example
        losses, or a parameter is also used outside its layer). Call before :meth:`collect`; ``scale`` is the AMP
        loss scale the hooks' gradients carry (``.grad`` is unscaled).
        """
        if not self.bias_sums:
            return None
        names = list(self.bias_sums)
        expected = [self.module.get_submodule(name).bias.grad for name in names]
        missing = [name for name, g in zip(names, expected) if g is None]
        if missing:
            return f"bias of layer {missing[0]!r} has no .grad"
        expected = [_up(g.detach()) for g in expected]
        got = torch._foreach_div([self.bias_sums[name] for name in names], scale)
        diff = torch.stack(torch._foreach_norm(torch._foreach_sub(got, expected)))  # (L,), one kernel per layer
        bad = diff > rtol * torch.stack(torch._foreach_norm(expected)) + 1e-12
        if bool(bad.any()):  # the only host sync of the check
            i = int(bad.nonzero()[0])
            return (f"the per-example bias gradients of layer {names[i]!r} do not add up to its .grad (difference "
                    f"{float(diff[i]):.4g}, |.grad| {float(expected[i].norm()):.4g})")
        return None


@contextlib.contextmanager
def module_eval(module: nn.Module) -> Iterator[None]:
    """Every submodule in eval mode inside the block (dropout off, deterministic); each one's mode restored after."""
    modes = [(sub, sub.training) for sub in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for sub, mode in modes:
            sub.training = mode


def validate(module: nn.Module, batch: Any, examples: int = 4, rtol: float = 1e-3) -> str | None:
    """Check the hooks against the ``vmap`` engine on the first ``examples`` examples of ``batch``.

    Both run with every submodule in eval mode (dropout draws no masks, so the two compute the same gradients) and
    without touching ``.grad``, the RNG or any buffer. Returns ``None`` when every per-example squared norm agrees
    within ``rtol`` of the largest (float32 gradients: ~1e-6 typical; a structural miss such as a tied output layer
    is off by tens of percent), else a sentence saying what differed. If the vmap engine cannot run the model (an op
    or ``autograd.Function`` without a vmap rule), warns and returns ``None``.
    """
    require_supervised(module, "validate")
    inputs, targets = module.split_batch(batch)
    k = min(examples, num_examples(module, batch, "validate"))

    def head(tree: Any) -> Any:
        return tree_map(lambda t: t[:k] if isinstance(t, Tensor) else t, tree)

    sub_batch = _SubBatchModule(module, head(inputs), head(targets))  # the engines take it with batch=None
    with module_eval(module):
        try:
            got = hook_gradient_stats(sub_batch, None).sq_norms
        except ValueError as err:  # what the hooks reported (a layer called twice, an output without gradient)
            return str(err)
        try:
            reference = per_example_gradient_stats(sub_batch, None, chunk_size=None).sq_norms
        except Exception as err:  # noqa: BLE001 - e.g. an op or autograd.Function without a vmap rule
            warnings.warn(f"validate: the vmap engine cannot run this model ({type(err).__name__}: {err}), so the "
                          "layer hooks are used without this cross-check (the per-step checks still apply).",
                          stacklevel=2)
            return None
    worst = float((got - reference).abs().max())
    if worst > rtol * float(reference.abs().max()) + 1e-12:
        return (f"per-example squared norms from the layer hooks differ from the vmap engine by up to {worst:.3g} "
                f"(largest {float(reference.abs().max()):.3g}): some parameter is used outside its layer's forward "
                "(e.g. a tied output layer), or a layer computes something the hooks do not model")
    return None


class _SubBatchModule(nn.Module):
    """The module seen through a fixed (inputs, targets) pair, so the engine can take ``batch=None``."""

    def __init__(self, module: nn.Module, inputs: Any, targets: Any) -> None:
        super().__init__()
        self.inner = module
        self._data = (inputs, targets)

    def split_batch(self, batch: Any) -> tuple[Any, Any]:
        return self._data

    def forward(self, inputs: Any) -> Tensor:
        return self.inner(inputs)

    def loss(self, outputs: Tensor, targets: Any) -> Tensor:
        return self.inner.loss(outputs, targets)


def hook_gradient_stats(module: nn.Module, batch: Any, *, per_layer: bool = False) -> PerExampleStats:
    """:func:`lightning_sgd.per_example.per_example_gradient_stats` through the layer hooks: one forward and one
    backward of the whole batch instead of ``vmap`` over examples (no ``directions``).

    The module keeps its mode (dropout draws one mask per example, as in training); the global RNG is restored, so
    measuring does not change the training trajectory. Raises ``ValueError`` for unsupported layers, BatchNorm in
    train mode (its batch statistics couple the examples, and its running statistics would move), or anything the
    hooks report; run :func:`validate` once per model to rule out parameters used outside their layers.
    """
    require_supervised(module, "hook_gradient_stats")
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in module.modules()):
        raise ValueError("hook_gradient_stats: BatchNorm in train mode couples the examples of a batch; use the "
                         "vmap engine (lightning_sgd.per_example), which runs BatchNorm on its running statistics.")
    inputs, targets = module.split_batch(batch)
    n = num_examples(module, batch, "hook_gradient_stats")
    params = trainable_parameters(module)
    hooks = PerExampleNormHooks(module, layer_names=per_layer)
    device = next(iter(params.values())).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.enable_grad():
        hooks.arm()
        try:
            loss = module.loss(module(inputs), targets)
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        finally:
            sq, layer_sq, problem = hooks.collect()
    if problem is not None:
        raise ValueError(f"hook_gradient_stats: {problem}.")
    assert sq is not None
    factor = float(n) ** 2  # contributions to a mean over n examples -> per-example gradients
    layers = None
    if per_layer:
        zeros = torch.zeros_like(sq)
        layers = {layer: layer_sq.get(layer, zeros) * factor for layer in dict.fromkeys(map(layer_of, params))}
    mean_grad = [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params.values(), grads)]
    return PerExampleStats(sq_norms=sq * factor, layer_sq_norms=layers, mean_grad=mean_grad, projections=None, n=n)
