"""Per-example squared gradient norms read off the ordinary backward pass (no second pass over the model).

For a layer whose weight gradient is a sum over examples of products of its input and its output gradient, the
per-example gradient norm follows from those two tensors alone (Goodfellow 2015, "Efficient per-example gradient
computations"; the "ghost norm" of Li et al. 2022, "Large language models can be strong differentially private
learners"; the mixed ghost norm of Bu et al. 2023; BackPACK's ``BatchL2Grad``, Dangel et al. 2020). With the input
``A_i`` (T × d_in) and the output gradient ``D_i`` (T × d_out) of example i over T positions (tokens, conv
output locations; T = 1 for a plain ``Linear`` on a batch of vectors):

.. math::

    |\\nabla_W \\ell_i|^2 = |D_i^\\top A_i|_F^2 = \\sum_{t,s} (A_i A_i^\\top)_{ts} (D_i D_i^\\top)_{ts},
    \\qquad |\\nabla_b \\ell_i|^2 = |\\textstyle\\sum_t D_{i,t}|^2 .

For a ``Linear`` the cheaper of the two forms is used: materialize the per-example gradient (T·d_in·d_out per
example) or the two T × T Gram matrices (T²·(d_in + d_out)). Closed forms exist for exactly these types:

- ``nn.Linear`` (any leading shape);
- ``nn.Conv1d``/``2d``/``3d`` (any ``groups``, padding, ``padding='same'``/``'valid'`` and ``padding_mode``: the input
  is padded as the layer's own forward pads it) and ``nn.ConvTranspose1d``/``2d``/``3d``. Three kinds of exact form;
  per layer a fixed rule of its shapes picks one (the same in every process, so resumed runs are exact): one
  weight-gradient convolution with the batch folded into the groups (example i's input channels meet only example
  i's output gradient; no patches are materialized — the fastest on large feature maps on CPU), the per-example
  products of the input patches (``F.unfold``, or strided views) with the output gradients, and a Gram form over
  output positions whose patch Gram matrix is summed from shifted copies of the input's pixel Gram matrix (small
  maps with many channels);
- ``nn.Embedding`` (positions holding the same token share a row; ``padding_idx`` rows get no gradient);
- the affine normalization layers, whose per-example weight gradient is Σ over positions of ``D ⊙ x̂`` with the
  normalized input x̂ recomputed from the input: ``nn.LayerNorm``, ``nn.RMSNorm``, ``nn.GroupNorm``,
  ``nn.InstanceNorm1d``/``2d``/``3d`` and ``nn.BatchNorm1d``/``2d``/``3d`` in eval mode (running statistics).

**Per-module fallback.** Any other module that owns a trainable parameter (GRU/LSTM/RNN, ``MultiheadAttention``, a
custom module with its own ``nn.Parameter``, a subclass of a supported type)
keeps its inputs and gets its output gradients (``register_multi_grad_hook`` when it returns several tensors, e.g.
GRU's ``(output, h_n)``); once they arrive, its per-example gradients are the vector-Jacobian products of
``functional_call(module, its parameters, one example's inputs)`` with that example's output gradient, for all
examples at once with ``torch.func.vmap`` (or, where ``vmap`` cannot run the module, one example at a time). Only that
module is recomputed; its submodules' own parameters are handled at the submodules. ``MultiheadAttention`` is one
unit covering its ``out_proj`` too (attention calls ``out_proj`` functionally, never as a module). RNNs and
``MultiheadAttention`` with ``batch_first=False`` carry the batch in dim 1 (RNN hidden states always do). A module
that draws random numbers in its forward (dropout inside an RNN or attention in train mode) cannot be recomputed
exactly and is reported as a problem.

**Normalization layers only.** ``PerExampleNormHooks(module, layers="norm")`` hooks the normalization layers and
nothing else (Gray et al. 2024, "Normalization Layer Per-Example Gradients are Sufficient to Predict Gradient Noise
Scale in Transformers"): their per-example norms cost next to nothing, and the noise scale of their parameters
tracks the whole model's in Transformers. The caller takes |G|² over the same parameters,
:meth:`PerExampleNormHooks.selected_parameter_names`.

**Which engine.** :func:`choose_engine` times the hooks (what they add to a forward and backward that training runs
anyway) against the ``vmap`` engine's extra pass on a real batch and names the cheaper one.

**Inputs broadcast over the batch.** :meth:`PerExampleNormHooks.arm` takes the batch size n. A closed-form layer
called on a tensor whose leading dimension is not n (BERT's position ids of shape ``(1, T)``, nanoGPT's
``wpe(arange(T))``) has an output shared by all examples: autograd sums the examples' gradients before its output's
hook. They are read one node earlier instead: where that output is added to (or subtracted from) a tensor holding
the batch's examples (``tok_emb + pos_emb``), the gradient of the sum is still one slice per example, and a node
pre-hook reads it there (the addition is found from the inputs of the layers called after it). The closed form then
runs on the input expanded over the batch. The slices must add up to the gradient that reaches the output; an
output that is also used any other way (multiplied in, a loss term of its own) is reported as a problem (the caller
falls back to the ``vmap`` engine, :mod:`lightning_sgd.per_example`) and the backward runs as usual. Not detectable
on the whole batch: a broadcast tensor whose leading dimension happens to equal n; the one-time :func:`validate` on
a few examples sees it broadcast and reports it.

**Never in the way of training.** The tensor hooks never change a gradient (``.grad`` is bit-identical to an
unhooked backward), and an exception inside a hook is recorded as the step's ``problem``, never raised into the
backward. The recomputation of a fallback module runs its forward again (its forward hooks run again, ours ignore it)
without touching buffers, ``.grad`` or the RNG.

What the hooks see are the per-example *contributions* to the gradient of the loss that was backpropagated: for a
mean loss over B examples, scaled by AMP's loss scale S, contribution i is S·∇ℓ_i / B. :meth:`PerExampleNormHooks.
collect` returns the raw squared norms of the contributions; the caller multiplies by (B/S)².

What the hooks cannot see, and how it is caught: a parameter also used outside its module's forward (a tied output
layer ``x @ embed.weight.T``), a module called twice per forward (weight sharing), a loss term outside the layers
(an L2 penalty in ``training_step``), BatchNorm in train mode (its batch statistics couple the examples). Calls are
counted at every step, :meth:`PerExampleNormHooks.check_bias_sums` checks that the per-example gradients of biases
and of fallback modules add up to ``.grad``, and :func:`validate` compares the hooks against the ``vmap`` engine on a
few examples once per run. :func:`unsupported_layers` names what the hooks refuse up front: a parameter owned by two
modules (tied weights), ``Embedding(scale_grad_by_freq=True)``, parametrized parameters, BatchNorm without running
statistics. Not caught: a training loss that is not a mean over examples (callers check it once,
:meth:`lightning_sgd.module_loss.ModuleLoss.check_mean`).
"""

from __future__ import annotations

import functools
import inspect
import itertools
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils._pytree import tree_flatten, tree_flatten_with_path, tree_unflatten

from lightning_sgd.batches import batch_size, slice_batch
from lightning_sgd.module_loss import ModuleLoss, module_eval
from lightning_sgd.per_example import _NO_VMAP, PerExampleStats, _per_example_stats, layer_of, trainable_parameters

__all__ = ["PerExampleNormHooks", "unsupported_layers", "validate", "module_eval", "hook_gradient_stats",
           "is_norm_layer", "choose_engine"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_TRANSPOSES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_INSTANCE_NORMS = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
#: Layer types with a closed form (exact types: a subclass may use its parameters differently).
_CLOSED_FORMS = (nn.Linear, *_CONVS, *_CONV_TRANSPOSES, nn.Embedding, nn.LayerNorm, nn.RMSNorm, nn.GroupNorm,
                 *_BATCH_NORMS, *_INSTANCE_NORMS)
#: Upper bound on the elements of one materialized per-example-gradient block (float32: 64 MB).
_MAX_BLOCK = 1 << 24


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _own_trainable(module: nn.Module) -> dict[str, Tensor]:
    return {name: p for name, p in module.named_parameters(recurse=False) if p.requires_grad}


def _closed_form_miss(module: nn.Module) -> str | None:
    """Why no closed form reads this module (it then goes through the per-module fallback), or ``None``."""
    if type(module) not in _CLOSED_FORMS:
        return f"{type(module).__name__} has no closed form"
    if not set(_own_trainable(module)) <= {"weight", "bias"}:  # e.g. weight norm's weight_g / weight_v
        return "parameters other than weight and bias"
    return None


@dataclass
class _Unit:
    """A module whose per-example norms the hooks compute from its own inputs and output gradients."""

    name: str
    closed: bool  # a closed form; else the per-module fallback
    params: dict[str, Tensor]  # name relative to the module (what functional_call takes) -> parameter
    full: dict[str, str] = field(default_factory=dict)  # relative -> full parameter name (layer_of names the layer)


def _inside(name: str, prefix: str) -> bool:
    return name != prefix and (prefix == "" or name.startswith(prefix + "."))


#: Normalization layers (Gray et al. 2024's "normalization layer per-example gradients"); they own parameters only
#: when affine.
_NORM_LAYERS = (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, _BatchNorm, nn.modules.instancenorm._InstanceNorm)


def is_norm_layer(module: nn.Module) -> bool:
    """Whether ``layers="norm"`` measures this module: a LayerNorm, RMSNorm, GroupNorm, BatchNorm or InstanceNorm
    (subclasses included; BatchNorm only in eval mode, and only affine ones own parameters to measure)."""
    return isinstance(module, _NORM_LAYERS)


def _check_layers(layers: str, who: str) -> None:
    if layers not in ("all", "norm"):
        raise ValueError(f"{who}: layers must be 'all' or 'norm' (normalization layers only), got {layers!r}.")


def _units(module: nn.Module, layers: str = "all") -> dict[nn.Module, _Unit]:
    """Every module owning trainable parameters -> its unit; a MultiheadAttention covers its submodules. With
    ``layers="norm"`` only the normalization layers (:func:`is_norm_layer`)."""
    attention = [name for name, sub in module.named_modules() if isinstance(sub, nn.MultiheadAttention)]
    units = {}
    for name, sub in module.named_modules():
        if any(_inside(name, prefix) for prefix in attention) or (layers == "norm" and not is_norm_layer(sub)):
            continue
        if isinstance(sub, nn.MultiheadAttention):
            params = {k: p for k, p in sub.named_parameters() if p.requires_grad}
        else:
            params = _own_trainable(sub)
        if params:
            # the root module's layer names are its parameters' own names: only the fallback splits them that way
            closed = name != "" and not isinstance(sub, nn.MultiheadAttention) and _closed_form_miss(sub) is None
            units[sub] = _Unit(name, closed, params, {k: _join(name, k) for k in params})
    return units


def unsupported_layers(module: nn.Module, layers: str = "all") -> list[str]:
    """``"name: reason"`` for every submodule whose trainable parameters the hooks cannot handle, even through the
    per-module fallback (empty: all can). ``layers="norm"``: only the normalization layers count (a tied output
    layer, say, does not stop the norm-layer mode)."""
    _check_layers(layers, "unsupported_layers")
    out = {}
    owners: dict[int, list[str]] = {}
    units = _units(module, layers)
    if layers == "norm":  # a norm layer's parameter that another module also owns is tied all the same
        every = _units(module)
        selected = {id(p) for unit in units.values() for p in unit.params.values()}
        units = {**units, **{sub: unit for sub, unit in every.items()
                             if any(id(p) in selected for p in unit.params.values())}}
    for sub, unit in units.items():
        for p in unit.params.values():
            owners.setdefault(id(p), []).append(unit.name or "<root>")
        if isinstance(sub, nn.Embedding) and sub.scale_grad_by_freq:
            out[unit.name] = "Embedding with scale_grad_by_freq=True (its gradient depends on the whole batch)"
        if isinstance(sub, torch.nn.utils.parametrize.ParametrizationList):
            out[unit.name] = "a parametrized parameter (torch.nn.utils.parametrize)"
    for name, sub in module.named_modules():
        if isinstance(sub, _BatchNorm) and not sub.track_running_stats:
            out[name] = ("BatchNorm without running statistics (it normalizes with batch statistics even in eval "
                         "mode, which couples the examples)")
    for names in owners.values():
        if len(names) > 1:
            for name in names[1:]:
                out[name if name != "<root>" else ""] = (f"shares a parameter with {names[0]!r} (tied weights: its "
                                                         "per-example gradient sums two layers' contributions)")
    return [f"{name or '<root>'}: {reason}" for name, reason in out.items()]


def _up(x: Tensor) -> Tensor:
    """At least float32 (half-precision activations and gradients under autocast), float64 kept."""
    return x if x.dtype == torch.float64 else x.float()


def _rows(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1)


def _sq_norm_of_products(a: Tensor, d: Tensor, form: str = "auto", bias: bool = False) -> Tensor:
    """(B,) |D_iᵀ A_i|_F² for a (B, T, d_in) and d (B, T, d_out); ``form``: "auto" (the cheaper of the two),
    "materialize" or "gram". ``bias``: plus |Σ_t D_i,t|², the bias of a layer whose input is A (as a column of ones
    in A: +1 on the Gram matrix A Aᵀ)."""
    b, t, d_in = a.shape
    d_out = d.shape[-1]
    if t == 1 and form == "auto":
        x_sq = _rows(a).square().sum(1)
        return (x_sq.add_(1.0) if bias else x_sq).mul_(_rows(d).square().sum(1))
    materialize = form == "materialize" or (form == "auto" and t * d_in * d_out <= t * t * (d_in + d_out))
    per_example = d_in * d_out if materialize else t * t
    chunk = max(1, _MAX_BLOCK // max(per_example, 1))
    out = []
    for start in range(0, b, chunk):
        ac, dc = a[start:start + chunk], d[start:start + chunk]
        if materialize:
            # the per-example gradient with its shorter side as rows: CPU batched GEMMs with few output columns
            # are several times slower (timed: (25 x 5) 67-110 us vs (5 x 25) 30 us for 128 examples)
            grads = torch.bmm(ac.transpose(1, 2), dc) if d_in <= d_out else torch.bmm(dc.transpose(1, 2), ac)
            sq = grads.square().sum((1, 2))  # (c,)
            out.append(sq.add_(dc.sum(1).square().sum(1)) if bias else sq)
        else:
            gram = torch.bmm(ac, ac.transpose(1, 2))
            out.append(((gram.add_(1.0) if bias else gram) * torch.bmm(dc, dc.transpose(1, 2))).sum((1, 2)))
    return out[0] if len(out) == 1 else torch.cat(out)


def _conv_input(conv: nn.Module, x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    """The input as the conv's own forward sees it and the symmetric zero padding left to the convolution: a
    ``padding_mode`` other than zeros, ``padding='same'`` with an odd total, or any asymmetric padding is applied to
    ``x`` here exactly as ``nn.ConvNd.forward`` applies it (its ``_reversed_padding_repeated_twice``)."""
    dims = x.dim() - 2
    pads = list(conv._reversed_padding_repeated_twice)  # last dim first: (left_d, right_d, left_d-1, ...)
    if conv.padding_mode != "zeros":
        return F.pad(x, pads, mode=conv.padding_mode), (0,) * dims
    if pads[0::2] == pads[1::2]:
        return x, tuple(reversed(pads[0::2]))
    return F.pad(x, pads), (0,) * dims


def _patches(conv: nn.Module, x: Tensor, padding: tuple[int, ...], native: bool, ones: bool = False) -> Tensor:
    """(B, C_in·Πk, L_out) input patches (im2col) of a ``groups=1`` conv, such that its output is
    ``weight.flatten(1) @ patches``: by ``F.unfold`` (native im2col; ``native``, 1-D and 2-D only) or by strided
    views of the padded input and one copy (any number of dimensions; faster on short 1-D signals). ``ones``
    (strided only): one more row of ones, the bias's input, so that one product gives weight and bias gradients."""
    dims = x.dim() - 2
    if native:
        one = dims == 1  # a 1-d conv is a 2-d one over (L, 1)
        kernel, dilation, stride = (tuple(conv.kernel_size) + (1,) * one, tuple(conv.dilation) + (1,) * one,
                                    tuple(conv.stride) + (1,) * one)
        return F.unfold(x.unsqueeze(-1) if one else x, kernel, dilation, tuple(padding) + (0,) * one, stride)
    if any(padding):
        x = F.pad(x, [p for p in reversed(padding) for _ in range(2)])  # F.pad lists the last dim first
    for i in range(dims):  # (B, C, S1, ..) -> (B, C, L1, .., Ld, span1, .., spand)
        x = x.unfold(2 + i, conv.dilation[i] * (conv.kernel_size[i] - 1) + 1, conv.stride[i])
    if any(d > 1 for d in conv.dilation):
        x = x[(..., *(slice(None, None, d) for d in conv.dilation))]
    x = x.permute(0, 1, *range(2 + dims, 2 + 2 * dims), *range(2, 2 + dims))  # (B, C, k1.., L1..)
    b, rows, positions = x.shape[0], math.prod(x.shape[1:2 + dims]), math.prod(x.shape[2 + dims:])
    if not ones:
        # always a contiguous copy: where reshape could return a view (one channel) its overlapping strides send
        # the batched GEMM that reads it down a path several times slower than the copy
        return x.contiguous().view(b, rows, positions)
    out = x.new_empty(b, rows + 1, positions)
    out[:, :rows].view(x.shape).copy_(x)
    out[:, rows].fill_(1.0)
    return out


def _output_padding(conv: nn.Module, x: Tensor, d: Tensor) -> list[int]:
    """A transposed conv's output padding, read off its input and output sizes (``forward(x, output_size)`` sets it
    per call): out = (in - 1)·stride - 2·padding + dilation·(k - 1) + 1 + output_padding."""
    return [d.shape[2 + i] - ((x.shape[2 + i] - 1) * conv.stride[i] - 2 * conv.padding[i]
                              + conv.dilation[i] * (conv.kernel_size[i] - 1) + 1) for i in range(x.dim() - 2)]


def _grouped_conv_sq_norms(conv: nn.Module, x: Tensor, d: Tensor, padding: Sequence[int]) -> Tensor:
    """(B,) squared norms of the per-example weight gradients from one weight-gradient convolution with the batch
    folded into the groups (example i's input channels only meet example i's output channels): no patches are
    materialized, any ``groups`` and transposed convolutions alike."""
    b, transposed = x.shape[0], isinstance(conv, _CONV_TRANSPOSES)
    shape = conv.weight.shape  # (out, in/groups, k..); transposed: (in, out/groups, k..)
    output_padding = _output_padding(conv, x, d) if transposed else [0] * (x.dim() - 2)
    chunk = max(1, _MAX_BLOCK // shape.numel())
    out = []
    for start in range(0, b, chunk):
        xc, dc = x[start:start + chunk], d[start:start + chunk]
        c = xc.shape[0]
        weight = xc.new_zeros(c * shape[0], *shape[1:])  # only its shape is read
        grad = torch.ops.aten.convolution_backward(
            dc.reshape(1, -1, *dc.shape[2:]), xc.reshape(1, -1, *xc.shape[2:]), weight, None, list(conv.stride),
            list(padding), list(conv.dilation), transposed, output_padding, c * conv.groups, [False, True, False])[1]
        out.append(grad.reshape(c, -1).square().sum(1))  # (c,)
    return torch.cat(out)


def _pixel_gram_sq_norms(conv: nn.Module, x: Tensor, d: Tensor, padding: Sequence[int], bias: bool = False) -> Tensor:
    """(B,) per-example weight-gradient squared norms of a ``groups=1`` conv through the Gram form without patches.

    The patches' Gram matrix is a sum of shifted copies of the padded input's pixel Gram matrix
    P[u, v] = Σ_c x[c, u]·x[c, v]: (A Aᵀ)[t, t'] = Σ_{offsets o} P[s·t + dil·o, s·t' + dil·o] (stride s, dilation
    dil), which costs Π(padded size)²·C_in instead of L²·C_in·Πk; then Σ_{t,t'} (A Aᵀ)[t,t']·(D Dᵀ)[t,t'].
    ``bias``: the bias's too, as an input that is 1 at every position: A Aᵀ + 1 (|Σ_t D_t|² = Σ_{t,t'} (D Dᵀ)[t,t'])."""
    if any(padding):
        x = F.pad(x, [p for p in reversed(padding) for _ in range(2)])
    b, channels, spatial, out = x.shape[0], x.shape[1], tuple(x.shape[2:]), tuple(d.shape[2:])
    pixels, positions = math.prod(spatial), math.prod(out)
    chunk = max(1, _MAX_BLOCK // (pixels * pixels))
    result = []
    for start in range(0, b, chunk):
        xc, dc = x[start:start + chunk].reshape(-1, channels, pixels), d[start:start + chunk]
        c = xc.shape[0]
        grams = torch.bmm(xc.transpose(1, 2), xc).view(c, *spatial, *spatial)  # (c, *S, *S) pixel Gram
        gram_a = None
        for offset in itertools.product(*(range(k) for k in conv.kernel_size)):
            window = tuple(slice(o * dil, o * dil + s * (n - 1) + 1, s)
                           for o, dil, s, n in zip(offset, conv.dilation, conv.stride, out))
            shifted = grams[(slice(None), *window, *window)]  # (c, *out, *out)
            gram_a = shifted.clone() if gram_a is None else gram_a.add_(shifted)
        assert gram_a is not None
        if bias:
            gram_a.add_(1.0)
        d3 = dc.reshape(c, dc.shape[1], positions)  # (c, C_out, L)
        gram_d = torch.bmm(d3.transpose(1, 2), d3)  # (c, L, L)
        result.append((gram_a.reshape(c, positions, positions) * gram_d).sum((1, 2)))
    return result[0] if len(result) == 1 else torch.cat(result)


def _conv_forms(conv: nn.Module, x: Tensor, d: Tensor) -> dict[str, Callable[[], Tensor]]:
    """The exact forms of a conv's (B,) per-example weight-gradient squared norms available for this layer:

    - ``"conv"``: one weight-gradient convolution with the batch folded into the groups (any conv);
    - ``"unfold"`` / ``"strided"`` (``groups=1``): the per-example gradients as batched products of the output
      gradients and the input patches, unfolded by ``F.unfold`` (1-D, 2-D) or by strided views (any dimension);
    - ``"pixel_gram"`` (``groups=1``): Σ_{t,t'} (A Aᵀ)[t,t']·(D Dᵀ)[t,t'] with the patches' Gram matrix A Aᵀ summed
      from shifted copies of the input's pixel Gram matrix (:func:`_pixel_gram_sq_norms`): Πk times fewer
      multiply-adds than a Gram matrix of the patches, and no patches.
    """
    names = ["conv"]
    if not isinstance(conv, _CONV_TRANSPOSES) and conv.groups == 1:
        names += (["unfold"] if x.dim() <= 4 else []) + ["strided", "pixel_gram"]
    return {name: functools.partial(_conv_form_sq_norms, name, conv, x, d) for name in names}


def _conv_form_sq_norms(form: str, conv: nn.Module, x: Tensor, d: Tensor, bias: bool = False) -> Tensor:
    """(B,) per-example squared norms of one conv call's weight gradient by ``form`` (:func:`_conv_forms`); with
    ``bias``, of its weight and bias gradients together (the strided and pixel-Gram forms take the bias as an input
    channel that is 1 everywhere, for free; the others add |Σ_positions D|²)."""
    if isinstance(conv, _CONV_TRANSPOSES):
        padding = tuple(conv.padding)
    else:
        x, padding = _conv_input(conv, x)
    absorbed = bias and form in ("strided", "pixel_gram")
    if form == "conv":
        sq = _grouped_conv_sq_norms(conv, x, d, padding)
    elif form == "pixel_gram":
        sq = _pixel_gram_sq_norms(conv, x, d, padding, bias)
    else:
        b, c_out = d.shape[:2]
        d3 = d.reshape(b, c_out, -1).transpose(1, 2)  # (B, L, C_out)
        patches = _patches(conv, x, padding, form == "unfold", absorbed)
        sq = _sq_norm_of_products(patches.transpose(1, 2), d3, "materialize")
    if bias and not absorbed:
        sq = sq + d.reshape(d.shape[0], d.shape[1], -1).sum(2).square().sum(1)
    return sq


def _conv_form(conv: nn.Module, x: Tensor, d: Tensor) -> str:
    """The form :func:`_convolution_form` uses: a fixed rule of the layer's shapes and the device type, so every
    process computes the same numbers (a resumed run equals the uninterrupted one bit for bit). The rule follows
    side-by-side timings of every form on CPU (one thread; ResNet-8 and the MNIST-1D CNN):

    - grouped and transposed convolutions: ``"conv"`` (the only form);
    - ``"pixel_gram"`` where its multiply-adds, P²·C_in for the P padded input pixels plus L²·C_out for the L output
      positions, are at most twice those of the per-example products, L·C_in·Πk·C_out, and P² <= 2²⁰: small maps
      with many channels (ResNet-8's 8×8×64 layers, 2× faster than any other form; the MNIST-1D CNN's later layers);
    - else, with few input channels (<= 4: image stems, one-channel signals) and for every 1-D signal, the patches
      by strided views and one copy, and the per-example products (``"strided"``: the patch matrix is small; 2.1×
      faster than ``F.unfold``, whose im2col loops over the examples, on a 3-channel 32×32 stem, 1.9× on the
      MNIST-1D CNN's first layer, and the folded-batch convolution pays a fixed cost per group);
    - else ``"conv"`` for 2-D and 3-D (no patches: 2-10× faster than the patch forms on 16×16 and 32×32 maps on
      CPU). On GPU, where cuDNN's grouped convolutions with thousands of groups were not timed here, 2-D layers
      that are not small maps use ``"unfold"``, Opacus' GPU path.
    """
    if isinstance(conv, _CONV_TRANSPOSES) or conv.groups != 1:
        return "conv"
    dims = x.dim() - 2
    pads = conv._reversed_padding_repeated_twice  # last dim first, (left, right) each: what forward pads
    pixels = math.prod(n + pads[2 * (dims - 1 - i)] + pads[2 * (dims - 1 - i) + 1] for i, n in enumerate(x.shape[2:]))
    positions, width, c_in, c_out = math.prod(d.shape[2:]), math.prod(conv.weight.shape[1:]), x.shape[1], d.shape[1]
    if (pixels * pixels * c_in + positions * positions * c_out <= 2 * positions * width * c_out
            and pixels * pixels <= _MAX_BLOCK // 16):  # and a pixel Gram matrix of at most 4 MB (float32) per example
        return "pixel_gram"
    if dims == 2 and x.device.type != "cpu":
        return "unfold"
    return "strided" if c_in <= 4 or dims == 1 else "conv"


# Closed forms per layer type, Opacus-style: each takes (module, input x, output gradient d (upcast), batch size b,
# whether the weight / the bias is trainable) and returns the (B,) squared norms of the per-example contributions to
# the layer's trainable parameters together, and the batch sum of the bias contributions (None without a trainable
# bias). Where the bias is cheaper taken along with the weight (as an input of ones) the form does so; the others
# add its norms with _with_bias.
_Form = Callable[[nn.Module, Tensor, Tensor, int, bool, bool], tuple[Tensor, Tensor | None]]


def _with_bias(sq: Tensor | None, bias_grad: Tensor | None, d: Tensor) -> tuple[Tensor, Tensor | None]:
    """A form's result from the (B,) weight squared norms (or None) and the (B, ...) per-example bias
    contributions (or None)."""
    if bias_grad is None:
        return (sq if sq is not None else d.new_zeros(d.shape[0])), None
    bias_sq = _rows(bias_grad).square().sum(1)
    return (bias_sq if sq is None else sq + bias_sq), bias_grad.sum(0)


def _linear_form(module: nn.Module, x: Tensor, d: Tensor, b: int, weight: bool,
                 bias: bool) -> tuple[Tensor, Tensor | None]:
    d3 = d.reshape(b, -1, d.shape[-1])  # (B, T, out)
    if weight and bias:  # the bias as an input that is 1 everywhere
        return _sq_norm_of_products(_up(x).reshape(b, -1, x.shape[-1]), d3, bias=True), d3.sum((0, 1))
    sq = _sq_norm_of_products(_up(x).reshape(b, -1, x.shape[-1]), d3) if weight else None
    return _with_bias(sq, d3.sum(1) if bias else None, d)


def _convolution_form(module: nn.Module, x: Tensor, d: Tensor, b: int, weight: bool,
                      bias: bool) -> tuple[Tensor, Tensor | None]:
    if not weight:
        return _with_bias(None, d.reshape(b, d.shape[1], -1).sum(2) if bias else None, d)  # bias: (B, out)
    x = _up(x)
    sq = _conv_form_sq_norms(_conv_form(module, x, d), module, x, d, bias)
    return sq, d.sum([0, *range(2, d.dim())]) if bias else None


def _embedding_form(module: nn.Module, x: Tensor, d: Tensor, b: int, weight: bool,
                    bias: bool) -> tuple[Tensor, Tensor | None]:
    idx = x.reshape(b, -1)  # (B, T)
    d3 = d.reshape(b, idx.shape[1], -1)  # (B, T, dim)
    if module.padding_idx is not None:
        d3 = d3 * (idx != module.padding_idx).unsqueeze(-1)
    if idx.shape[1] == 1:
        return _rows(d3).square().sum(1), None
    same = idx.unsqueeze(2) == idx.unsqueeze(1)  # (B, T, T): positions holding the same token add up in one row
    return (torch.bmm(d3, d3.transpose(1, 2)) * same).sum((1, 2)), None  # Σ_ts [x_t = x_s] d_t·d_s


@functools.lru_cache(maxsize=64)
def _unit_affine(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    return torch.ones(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device)


def _layer_norm_form(module: nn.Module, x: Tensor, d: Tensor, b: int, weight: bool,
                     bias: bool) -> tuple[Tensor, Tensor | None]:
    x = _up(x)
    if isinstance(module, nn.RMSNorm):
        x_hat = F.rms_norm(x, module.normalized_shape, eps=module.eps)
    else:  # with a unit affine map: the same x̂ bit for bit, from a CPU kernel 1.7× faster than the one without
        x_hat = F.layer_norm(x, module.normalized_shape, *_unit_affine(tuple(module.normalized_shape), x.dtype,
                                                                         x.device), eps=module.eps)
    width = math.prod(module.normalized_shape)
    # x̂ is this form's own tensor: multiplied in place (one activation-sized allocation fewer: fresh pages of that
    # size cost as much as the product inside a backward)
    sq = x_hat.mul_(d).reshape(b, -1, width).sum(1).square().sum(1) if weight else None
    return _with_bias(sq, d.reshape(b, -1, *module.normalized_shape).sum(1) if bias else None, d)


def _channel_norm_form(module: nn.Module, x: Tensor, d: Tensor, b: int, weight: bool,
                       bias: bool) -> tuple[Tensor, Tensor | None]:
    if isinstance(module, nn.GroupNorm):
        x_hat = F.group_norm(_up(x), module.num_groups, eps=module.eps)
    elif isinstance(module, _BATCH_NORMS):  # eval mode (train mode is refused before): running statistics
        x_hat = F.batch_norm(_up(x), module.running_mean, module.running_var, training=False, eps=module.eps)
    else:  # each example's own statistics, or the running ones in eval mode with track_running_stats
        instance_stats = module.training or not module.track_running_stats
        x_hat = F.instance_norm(_up(x), None if instance_stats else module.running_mean,
                                None if instance_stats else module.running_var,
                                use_input_stats=instance_stats, eps=module.eps)
    channels = x_hat.shape[1]
    sq = x_hat.mul_(d).reshape(b, channels, -1).sum(2).square().sum(1) if weight else None  # Σ over positions
    return _with_bias(sq, d.reshape(b, channels, -1).sum(2) if bias else None, d)


_FORMS: tuple[tuple[tuple[type, ...], _Form], ...] = (
    ((nn.Linear,), _linear_form),
    ((*_CONVS, *_CONV_TRANSPOSES), _convolution_form),
    ((nn.Embedding,), _embedding_form),
    ((nn.LayerNorm, nn.RMSNorm), _layer_norm_form),
    ((nn.GroupNorm, *_BATCH_NORMS, *_INSTANCE_NORMS), _channel_norm_form),
)


def _layer_sq_norms(module: nn.Module, x: Tensor, d: Tensor) -> tuple[Tensor, Tensor | None]:
    """(B,) squared norms of the per-example contributions to this call's trainable parameters, and the batch sum
    of the bias contributions (for the consistency check; ``None`` without a trainable bias)."""
    weight = getattr(module, "weight", None) is not None and module.weight.requires_grad
    bias = getattr(module, "bias", None) is not None and module.bias.requires_grad
    d = _up(d)
    b = d.shape[0]
    form = next((f for types, f in _FORMS if isinstance(module, types)), None)
    if form is None:  # pragma: no cover - only closed-form units reach here (_closed_form_miss)
        raise TypeError(f"unsupported layer {type(module).__name__}")
    return form(module, x, d, b, weight, bias)


class _NotPerExample(Exception):
    """A layer call whose inputs or outputs do not carry the batch's examples where the hooks expect them."""


def _in_dim(module: nn.Module, arg: str, leaf: Tensor, n: int | None) -> tuple[int | None, bool]:
    """``(batch dim or None for broadcast, declared)``: declared dims must hold the batch; others are found."""
    seq = 0 if getattr(module, "batch_first", True) else 1
    if isinstance(module, nn.RNNBase):
        if arg == "input":
            return seq, True
        if arg == "hx":
            return 1, True  # (layers × directions, B, H) whatever batch_first says
    if isinstance(module, nn.MultiheadAttention):
        if arg in ("query", "key", "value"):
            return seq, True
        if arg == "key_padding_mask":
            return 0, True
        if arg == "attn_mask" and leaf.dim() == 3:
            raise _NotPerExample("a 3-d attn_mask (one mask per example and head)")
    return (0 if leaf.dim() >= 1 and n is not None and leaf.shape[0] == n else None), False


def _out_dim(module: nn.Module, path: tuple) -> int:
    first = getattr(path[0], "idx", None) if path else None
    if isinstance(module, nn.RNNBase):
        return (0 if module.batch_first else 1) if first == 0 else 1
    if isinstance(module, nn.MultiheadAttention):
        return (0 if module.batch_first else 1) if first == 0 else 0
    return 0


@dataclass
class _Call:
    """One captured call of a fallback module: its inputs split into batched and broadcast, its outputs."""

    signature: inspect.Signature
    spec: Any  # pytree spec of the bound arguments
    leaves: list[Any]  # the arguments' leaves (tensors detached)
    batched: list[tuple[int, int]]  # (leaf index, batch dim) of the inputs that carry the examples
    outputs: list[Tensor]  # the output tensors that need a gradient
    out_index: list[tuple[int, int]]  # (index among the output's leaves, batch dim) of each of ``outputs``
    n: int
    autocast: tuple[str, bool, torch.dtype]


def _capture_call(module: nn.Module, args: tuple, kwargs: dict, output: Any, n: int | None) -> _Call:
    if isinstance(module, nn.RNNBase) and isinstance(args[0] if args else kwargs.get("input"),
                                                     nn.utils.rnn.PackedSequence):
        raise _NotPerExample("a PackedSequence input (examples are interleaved)")
    signature = inspect.signature(module.forward)
    bound = signature.bind(*args, **kwargs)
    with_path, spec = tree_flatten_with_path(bound.arguments)
    dims = []
    for path, leaf in with_path:
        dims.append(_in_dim(module, getattr(path[0], "key", ""), leaf, n) if isinstance(leaf, Tensor)
                    else (None, False))
    if n is None:  # the first declared batch dim, else the leading dim of the first tensor
        n = next((leaf.shape[d] for (_, leaf), (d, declared) in zip(with_path, dims) if declared
                  and leaf.dim() > d), None)
        n = n if n is not None else next((leaf.shape[0] for _, leaf in with_path if isinstance(leaf, Tensor)
                                          and leaf.dim() >= 1), None)
        if n is None:
            raise _NotPerExample("no input tensor with a batch dimension")
        dims = [_in_dim(module, getattr(path[0], "key", ""), leaf, n) if isinstance(leaf, Tensor)
                else (None, False) for path, leaf in with_path]
    batched = []
    for i, ((path, leaf), (d, declared)) in enumerate(zip(with_path, dims)):
        if declared and (leaf.dim() <= d or leaf.shape[d] != n):
            raise _NotPerExample(f"its argument {getattr(path[0], 'key', '?')!r} of shape {tuple(leaf.shape)} has no "
                                 f"batch dimension {d} of size {n}")
        if d is not None:
            batched.append((i, d))
    if not batched:
        raise _NotPerExample(f"no input has a leading dimension of the batch's {n} examples (broadcast over the "
                             "batch)")
    out_with_path, _ = tree_flatten_with_path(output)
    outputs, out_index = [], []
    for i, (path, leaf) in enumerate(out_with_path):
        if isinstance(leaf, Tensor) and leaf.requires_grad:
            d = _out_dim(module, path)
            if leaf.dim() <= d or leaf.shape[d] != n:
                raise _NotPerExample(f"an output of shape {tuple(leaf.shape)} has no batch dimension {d} of size {n}")
            outputs.append(leaf)
            out_index.append((i, d))
    device = outputs[0].device.type if outputs else "cpu"
    autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
    leaves = [leaf.detach() if isinstance(leaf, Tensor) else leaf for _, leaf in with_path]
    return _Call(signature, spec, leaves, batched, outputs, out_index, n, autocast)


def _rng_state(device: torch.device) -> list[Tensor]:
    states = [torch.get_rng_state()]
    if device.type == "cuda":
        states.append(torch.cuda.get_rng_state(device))
    return states


def _fallback_grads(module: nn.Module, unit: _Unit, call: _Call, cotangents: Sequence[Tensor | None],
                    use_vmap: bool) -> tuple[dict[str, Tensor], bool]:
    """Per-example contributions to ``unit``'s parameters, name -> (n, *shape), and whether ``vmap`` served.

    Example i's contribution is the vector-Jacobian product of the module's output on example i (a batch of one)
    with that example's slice of the captured output gradient."""
    params = {k: p.detach() for k, p in unit.params.items()}
    buffers = {k: b.detach().clone() for k, b in module.named_buffers()}  # recomputing never moves a buffer
    cots = [(index, c.detach()) for index, c in zip(call.out_index, cotangents) if c is not None]
    in_dims = [d for _, d in call.batched]
    out_dims = [d for (_, d), _ in cots]
    inputs = [call.leaves[i] for i, _ in call.batched]
    grads_out = [c for _, c in cots]

    def inner(p: dict[str, Tensor], xs: list[Tensor], cs: list[Tensor]) -> Tensor:
        """<module(one example), its output gradient>, with the example's batch dim of size 1 in place."""
        leaves = list(call.leaves)
        for (i, _), x in zip(call.batched, xs):
            leaves[i] = x
        bound = inspect.BoundArguments(call.signature, tree_unflatten(leaves, call.spec))
        out = tree_flatten(functional_call(module, {**p, **buffers}, tuple(bound.args), dict(bound.kwargs)))[0]
        total = torch.zeros((), dtype=torch.float64, device=cs[0].device) if cs else torch.zeros(())
        for ((k, _), _), c in zip(cots, cs):
            total = total + (out[k] * c.to(out[k].dtype)).sum()
        return total

    def one(p: dict[str, Tensor], xs: list[Tensor], cs: list[Tensor]) -> Tensor:
        return inner(p, [x.unsqueeze(d) for x, d in zip(xs, in_dims)], [c.unsqueeze(d) for c, d in zip(cs, out_dims)])

    n = call.n
    if not cots:
        return {k: torch.zeros(n, *p.shape, dtype=p.dtype, device=p.device) for k, p in params.items()}, use_vmap
    chunk = max(1, _MAX_BLOCK // max(1, sum(p.numel() for p in params.values())))
    parts: dict[str, list[Tensor]] = {k: [] for k in params}
    for start in range(0, n, chunk):
        size = min(chunk, n - start)
        xs = [x.narrow(d, start, size) for x, d in zip(inputs, in_dims)]
        cs = [c.narrow(d, start, size) for c, d in zip(grads_out, out_dims)]
        got = None
        if use_vmap:
            try:
                got = vmap(grad(one), in_dims=(None, in_dims, out_dims), randomness="error")(params, xs, cs)
            except Exception:  # noqa: BLE001 - an op without a batching rule (e.g. some RNN kernels): loop instead
                use_vmap = False
        if got is None:
            rows = []
            for i in range(size):
                req = {k: p.detach().requires_grad_(True) for k, p in params.items()}
                with torch.enable_grad():
                    value = inner(req, [x.narrow(d, i, 1) for x, d in zip(xs, in_dims)],
                                  [c.narrow(d, i, 1) for c, d in zip(cs, out_dims)])
                    rows.append(torch.autograd.grad(value, list(req.values()), allow_unused=True))
            got = {k: torch.stack([torch.zeros_like(p) if row[j] is None else row[j] for row in rows])
                   for j, (k, p) in enumerate(params.items())}
        for k in params:
            parts[k].append(got[k])
    return {k: torch.cat(v) for k, v in parts.items()}, use_vmap


#: How far back from a later layer's inputs the consumers of a broadcast output are looked for (autograd nodes).
_CONSUMER_DEPTH = 8
_CONSUMER_NODES = 256
#: Autograd nodes that add a broadcast output to a tensor with the batch's examples (``a ± alpha * b``).
_ADDS = ("AddBackward0", "SubBackward0")


class _Shared:
    """The per-example output gradients of one broadcast layer call, gathered at the nodes that add its output to
    per-example tensors (node pre-hooks; see :meth:`PerExampleNormHooks._capture_shared`)."""

    def __init__(self, node: Any, shape: tuple[int, ...], n: int) -> None:
        self.node, self.shape, self.n = node, shape, n
        self.found = False  # an adding node is watched
        self.unsupported: str | None = None  # why the output cannot be read per example
        self.grads: Tensor | None = None  # (n, *per-example output shape), summed over the consumers
        self.lead = False  # output (1, ...) broadcast along its own first dim, else a new leading batch dim
        self._handles: list[Any] = []

    def watch(self, node: Any, slots: list[int]) -> None:
        """``node`` takes the output as its operands ``slots``: read the per-example gradients from its output's."""
        name = type(node).__name__
        if name not in _ADDS:
            self.unsupported = self.unsupported or f"its output goes into {name}, not an addition to the examples"
            return
        alpha = float(getattr(node, "_saved_alpha", 1.0))
        signs = [1.0 if slot == 0 else (alpha if name == "AddBackward0" else -alpha) for slot in slots]
        self.found = True
        self._handles.append(node.register_prehook(lambda grad_outputs: self._read(grad_outputs, sum(signs))))

    def _read(self, grad_outputs: tuple[Tensor | None, ...], sign: float) -> None:
        g = grad_outputs[0] if grad_outputs else None
        if g is None or self.unsupported is not None:
            return
        if g.dim() >= 1 and g.shape[0] == self.n and tuple(g.shape[1:]) == self.shape[1:] and self.shape[0] == 1:
            self.lead = True
        elif not (g.dim() >= 1 and g.shape[0] == self.n and tuple(g.shape[1:]) == self.shape):
            self.unsupported = (f"the sum it is added into has shape {tuple(g.shape)}, not {self.n} examples of its "
                                f"output's {self.shape}")
            return
        g = _up(g.detach()) * sign
        self.grads = g if self.grads is None else self.grads + g

    def problem(self, total: Tensor) -> str | None:
        """Why the gathered per-example gradients are not this step's (``None``: they are), given the gradient that
        reached the output (their sum, when every consumer was an addition the hooks saw)."""
        if self.unsupported is not None:
            return self.unsupported
        if self.grads is None:
            return ("no addition of it to a tensor with the batch's examples was found before the next layers (the "
                    "hooks read a broadcast output's per-example gradients only there)")
        total = _up(total)
        gap = torch.linalg.vector_norm(self.grads.sum(0, keepdim=self.lead).reshape(total.shape) - total)
        if float(gap) > 1e-5 * float(torch.linalg.vector_norm(total)) + 1e-30:
            return "its output is also used somewhere else than the additions the hooks saw"
        return None

    def release(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _find_consumers(shared: list[_Shared], tensors: list[Any], n: int | None) -> None:
    """Look back from ``tensors`` (a later layer's inputs) through at most ``_CONSUMER_DEPTH`` autograd nodes for
    the nodes that take a pending broadcast output as an operand."""
    pending = {id(s.node): s for s in shared if not s.found and s.unsupported is None}
    if not pending:
        return
    frontier = [t.grad_fn for t in tensors if isinstance(t, Tensor) and t.grad_fn is not None
                and t.dim() >= 1 and t.shape[0] == n]
    seen: set[int] = set()
    for _ in range(_CONSUMER_DEPTH):
        following = []
        for node in frontier:
            if id(node) in seen or len(seen) >= _CONSUMER_NODES:
                continue
            seen.add(id(node))
            slots: dict[int, list[int]] = {}
            for slot, (child, _) in enumerate(node.next_functions):
                if child is None:
                    continue
                if id(child) in pending:
                    slots.setdefault(id(child), []).append(slot)
                else:
                    following.append(child)
            for key, where in slots.items():
                pending[key].watch(node, where)
        frontier = following
        if not frontier:
            break


class PerExampleNormHooks:
    """Forward hooks on a model's layers that turn its next backward pass into per-example norms.

    Usage per measured step: :meth:`arm` (with the batch size) before the forward, let training run forward and
    backward, then :meth:`collect` (which also removes the hooks). Between ``arm`` and ``collect`` every forward of a
    layer that owns trainable parameters, with gradients enabled, saves a reference to its inputs (autograd keeps
    them anyway) and hooks its outputs; the hook computes the layer's per-example squared norms as soon as the output
    gradient arrives (closed form, or the per-module fallback), and drops the inputs.

    Args:
        module: the model; :func:`unsupported_layers` must be empty, else ``ValueError``.
        layer_names: also keep squared norms per layer (owning module name), as :func:`layer_of` names them.
        capture_if: called at each armed forward of a layer; the forward is ignored when it returns False (e.g.
            GradientNoiseScale captures only forwards inside Lightning's ``training_step``, not the extra passes
            other callbacks run between ``arm`` and ``collect``).
        layers: ``"all"`` (every trainable parameter) or ``"norm"``: only the parameters of the normalization layers
            (:func:`is_norm_layer`; the other layers get no hook at all, so measuring costs next to nothing). Gray et
            al. 2024, "Normalization Layer Per-Example Gradients are Sufficient to Predict Gradient Noise Scale in
            Transformers", find the noise scale of these parameters alone tracks the whole model's. :meth:`collect`
            then covers :meth:`selected_parameter_names` only: take |G|² over the same parameters.
    """

    def __init__(self, module: nn.Module, layer_names: bool = False,
                 capture_if: Callable[[], bool] | None = None, layers: str = "all") -> None:
        _check_layers(layers, "PerExampleNormHooks")
        problems = unsupported_layers(module, layers)
        if problems:
            raise ValueError("PerExampleNormHooks cannot compute per-example norms through: " + "; ".join(problems)
                             + ". Use the vmap engine (lightning_sgd.per_example) for this model.")
        self.module = module
        self.layer_names = layer_names
        self.capture_if = capture_if
        self.layers = layers
        self._units = _units(module, layers)
        if layers == "norm" and not self._units:
            raise ValueError(f"PerExampleNormHooks(layers='norm'): {type(module).__name__} has no normalization "
                             "layer (LayerNorm, RMSNorm, GroupNorm, BatchNorm, InstanceNorm) with trainable "
                             "parameters; use layers='all'.")
        self._batchnorms = [sub for sub in module.modules() if isinstance(sub, _BatchNorm)]
        self._names = {sub: name for name, sub in module.named_modules()}
        self._params = dict(module.named_parameters())
        self._no_vmap: set[nn.Module] = set()  # fallback modules vmap cannot run: a loop over examples
        #: layer name -> output shape, for every layer call read as broadcast over the batch so far
        self.broadcast: dict[str, tuple[int, ...]] = {}
        self._handles: list[Any] = []
        self._recomputing = False
        self._reset()

    def _reset(self) -> None:
        self._sq: dict[str, list[Tensor]] = {}  # layer -> its (B,) squared norms of contributions, one per call part
        self._grad_sums: dict[str, Tensor] = {}  # parameter name -> batch sum of its per-example contributions
        self.problem: str | None = None  # why this step's norms cannot be trusted
        self._calls: dict[str, int] = {}
        self._pending = 0  # output hooks registered but not yet fired
        self._n: int | None = None
        self._shared: list[_Shared] = []  # this step's layer calls whose output is broadcast over the batch
        self._rng: dict[nn.Module, list[Tensor]] = {}

    @property
    def armed(self) -> bool:
        return bool(self._handles)

    def selected_parameter_names(self) -> list[str]:
        """The full names of the parameters whose per-example norms :meth:`collect` returns, in
        ``module.named_parameters()`` order (every trainable one for ``layers="all"``)."""
        selected = {id(p) for unit in self._units.values() for p in unit.params.values()}
        return [name for name, p in trainable_parameters(self.module).items() if id(p) in selected]

    def arm(self, n: int | None = None) -> None:
        """Start capturing the next forward/backward's per-example norms.

        ``n``: the number of examples in the batch that forward processes (without it, the leading dimension of the
        first captured layer's input). A layer call without that batch dimension is reported, not misread.
        """
        self.disarm()
        self._reset()
        self._n = n
        for sub in dict.fromkeys([*self._units, *self._batchnorms]):
            self._handles.append(sub.register_forward_hook(self._forward_hook, with_kwargs=True))
            if sub in self._units and not self._units[sub].closed:
                self._handles.append(sub.register_forward_pre_hook(self._pre_hook))

    def disarm(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for shared in self._shared:
            shared.release()

    def _flag(self, problem: str) -> None:
        if self.problem is None:
            self.problem = problem

    def _capturing(self) -> bool:
        return (not self._recomputing and torch.is_grad_enabled()
                and (self.capture_if is None or bool(self.capture_if())))

    def _pre_hook(self, module: nn.Module, args: tuple) -> None:
        try:
            if self._capturing():
                self._rng[module] = _rng_state(next(iter(self._units[module].params.values())).device)
        except Exception as err:  # noqa: BLE001 - never raise into the user's forward
            self._flag(f"layer {self._names.get(module)!r}: {type(err).__name__}: {err}")

    def _forward_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        name = self._names.get(module, "?")
        try:
            if self._capturing():
                if any(not shared.found for shared in self._shared):
                    _find_consumers(self._shared, tree_flatten((args, kwargs))[0], self._n)
                self._capture(module, name, args, kwargs, output)
        except Exception as err:  # noqa: BLE001 - never raise into the user's forward
            self._flag(f"layer {name!r}: {type(err).__name__}: {err}")

    def _capture(self, module: nn.Module, name: str, args: tuple, kwargs: dict, output: Any) -> None:
        rng_before = self._rng.pop(module, None)
        if isinstance(module, _BatchNorm) and (module.training or not module.track_running_stats):
            self._flag(f"BatchNorm layer {name!r} normalizes with the batch's statistics (train mode), which couples "
                       "the examples; per-example gradients are defined with its running statistics (eval mode)")
            return
        unit = self._units.get(module)
        if unit is None or not (output.requires_grad if isinstance(output, Tensor) else  # the common case, fast
                                any(isinstance(t, Tensor) and t.requires_grad for t in tree_flatten(output)[0])):
            return
        self._calls[name] = self._calls.get(name, 0) + 1
        if self._calls[name] > 1:
            self._flag(f"layer {name!r} was called more than once in one forward (shared weights)")
            return
        if unit.closed:
            self._capture_closed(module, unit, args, kwargs, output)
            return
        if rng_before is not None and any(not torch.equal(a, b) for a, b in zip(
                rng_before, _rng_state(next(iter(unit.params.values())).device))):
            self._flag(f"layer {name!r} ({type(module).__name__}) draws random numbers in its forward (dropout in "
                       "train mode), so its per-example gradients cannot be recomputed exactly")
            return
        try:
            call = _capture_call(module, args, kwargs, output, self._n)
        except _NotPerExample as err:
            self._flag(f"layer {name!r} ({type(module).__name__}): {err}, so its per-example gradients cannot be "
                       "read from its own call")
            return
        self._n = call.n
        self._pending += 1

        def on_grads(grads: Sequence[Tensor | None]) -> None:
            self._pending -= 1
            try:
                self._fallback(module, unit, call, grads)
            except Exception as err:  # noqa: BLE001 - never raise into the user's backward
                self._flag(f"layer {name!r} ({type(module).__name__}): recomputing its per-example gradients "
                           f"failed ({type(err).__name__}: {err})")

        if len(call.outputs) == 1:
            call.outputs[0].register_hook(lambda g: on_grads([g]))
        else:
            torch.autograd.graph.register_multi_grad_hook(call.outputs, on_grads, mode="all")

    def _capture_closed(self, module: nn.Module, unit: _Unit, args: tuple, kwargs: dict, output: Any) -> None:
        x = args[0] if args else next(iter(kwargs.values()), None)
        if not isinstance(x, Tensor) or not isinstance(output, Tensor):
            self._flag(f"layer {unit.name!r} got a non-tensor input or output")
            return
        if self._n is None and x.dim() >= 1:
            self._n = int(x.shape[0])
        if self._n is not None and output.grad_fn is not None and x.dim() >= 1 and output.dim() >= 1 and \
                (output.shape[0] == 1 or (x.shape[0] != self._n and output.shape[0] != self._n)):
            self._capture_shared(module, unit, x.detach(), output)
            return
        if x.dim() < (1 if isinstance(module, nn.Embedding) else 2) or x.shape[0] != self._n or \
                output.shape[0] != self._n:
            self._flag(f"layer {unit.name!r} ({type(module).__name__}) got an input of shape {tuple(x.shape)} whose "
                       f"leading dimension is not the batch's {self._n} examples: it is broadcast over the batch "
                       "(e.g. position ids of shape (1, T), or arange(T)), so autograd sums the examples' gradients "
                       "before the hooks see them")
            return
        # An input modified in place after the layer read it would make x stale here, but autograd refuses to
        # backpropagate through such a graph itself (it saved the same input for the weight gradient).
        x = x.detach()
        self._pending += 1

        def on_grad(d: Tensor) -> None:
            self._pending -= 1
            try:
                self._record(module, unit, x, d.detach())
            except Exception as err:  # noqa: BLE001 - never raise into the user's backward
                self._flag(f"layer {unit.name!r}: {type(err).__name__}: {err}")

        output.register_hook(on_grad)

    def _record(self, module: nn.Module, unit: _Unit, x: Tensor, d: Tensor) -> None:
        """A closed-form call's per-example squared norms from its input ``x`` and output gradients ``d``, both with
        the batch's examples in dim 0."""
        sq, bias_sum = _layer_sq_norms(module, x, d)
        self._add(unit.name, sq)
        if bias_sum is not None:
            self._grad_sums[unit.full["bias"]] = bias_sum

    def _capture_shared(self, module: nn.Module, unit: _Unit, x: Tensor, output: Tensor) -> None:
        """A closed-form layer whose output is shared by every example (its input is broadcast over the batch:
        position ids of shape (1, T), ``wpe(arange(T))``). Autograd sums the examples' gradients before the output's
        hook, so they are read one step earlier: where the output is added to a tensor that has the batch's examples
        (``tok_emb + pos_emb``), the gradient of that sum holds each example's own (:func:`_find_consumers`, found
        from the inputs of the layers called after it). The per-example gradients read there must add up to what
        reaches the output; anything else consuming it leaves a step that is reported, not misread."""
        shared = _Shared(output.grad_fn, tuple(output.shape), self._n)
        self._shared.append(shared)
        self.broadcast[unit.name] = shared.shape
        self._pending += 1

        def on_grad(total: Tensor) -> None:
            self._pending -= 1
            try:
                problem = shared.problem(total.detach())
                if problem is not None:
                    self._flag(f"layer {unit.name!r} ({type(module).__name__}) got an input of shape "
                               f"{tuple(x.shape)} whose leading dimension is not the batch's {self._n} examples: it is "
                               f"broadcast over the batch, and {problem}")
                    return
                assert shared.grads is not None
                xs = x.expand(shared.n, *x.shape[1:]) if shared.lead else x.unsqueeze(0).expand(shared.n, *x.shape)
                self._record(module, unit, xs, shared.grads)
            except Exception as err:  # noqa: BLE001 - never raise into the user's backward
                self._flag(f"layer {unit.name!r}: {type(err).__name__}: {err}")
            finally:
                shared.release()

        output.register_hook(on_grad)

    def _fallback(self, module: nn.Module, unit: _Unit, call: _Call, grads: Sequence[Tensor | None]) -> None:
        device, enabled, dtype = call.autocast
        self._recomputing = True
        try:
            with warnings.catch_warnings(), torch.autocast(device, dtype=dtype, enabled=enabled):
                warnings.simplefilter("ignore")  # e.g. vmap's "no batching rule, slow fallback" notes
                per_example, used_vmap = _fallback_grads(module, unit, call, grads, module not in self._no_vmap)
        finally:
            self._recomputing = False
        if not used_vmap:
            self._no_vmap.add(module)
        for k, g in per_example.items():
            sq = torch.linalg.vector_norm(_up(g).reshape(call.n, -1), dim=1).square()
            self._add(layer_of(unit.full[k]), sq)
            self._grad_sums[unit.full[k]] = g.sum(0)

    def _add(self, layer: str, sq: Tensor) -> None:
        self._sq.setdefault(layer, []).append(sq)  # summed in float64 once, at collect (fewer small kernels)

    def collect(self) -> tuple[Tensor | None, dict[str, Tensor], str | None]:
        """Stop capturing; return (sq_norms (B,) float64, per-layer sq_norms (with ``layer_names``), problem or
        ``None``)."""
        self.disarm()
        problem = self.problem
        if problem is None and self._pending:
            problem = f"{self._pending} layer output(s) got no gradient in this backward"
        if problem is None and not self._sq:
            problem = "no layer with trainable parameters ran forward and backward while armed"
        sq_norms, layers = None, {}
        if self._sq:
            names = list(self._sq)
            rows = torch.stack([t for name in names for t in self._sq[name]]).double()  # (parts, B)
            sq_norms = rows.sum(0)
            if self.layer_names:
                sizes = [len(self._sq[name]) for name in names]
                layers = {name: part.sum(0) for name, part in zip(names, rows.split(sizes))}
        self._reset()
        return sq_norms, layers, problem

    def check_bias_sums(self, scale: float, rtol: float = 1e-2) -> str | None:
        """Compare the summed per-example contributions of the last :meth:`collect`-ed step with ``.grad``, for every
        bias of a closed-form layer and every parameter of a fallback module.

        A mismatch means ``.grad`` is not the sum of what the hooks saw (the loss is not a plain mean of per-example
        losses, or a parameter is also used outside its layer). Call before :meth:`collect`; ``scale`` is the AMP
        loss scale the hooks' gradients carry (``.grad`` is unscaled).
        """
        if not self._grad_sums:
            return None
        names = list(self._grad_sums)
        expected = [self._params[name].grad for name in names]
        missing = [name for name, g in zip(names, expected) if g is None]
        if missing:
            return f"parameter {missing[0]!r} has no .grad"
        expected = [_up(g.detach()) for g in expected]
        got = torch._foreach_div([_up(self._grad_sums[name]) for name in names], scale)
        diff = torch.stack(torch._foreach_norm(torch._foreach_sub(got, expected)))  # (L,), one kernel per layer
        bad = diff > rtol * torch.stack(torch._foreach_norm(expected)) + 1e-12
        if bool(bad.any()):  # the only host sync of the check
            i = int(bad.nonzero()[0])
            return (f"the per-example gradients of {names[i]!r} do not add up to its .grad (difference "
                    f"{float(diff[i]):.4g}, |.grad| {float(expected[i].norm()):.4g})")
        return None


def validate(module: nn.Module, batch: Any, *, loss: ModuleLoss | None = None, examples: int = 4,
             rtol: float = 1e-3, layers: str = "all") -> str | None:
    """Check the hooks against the per-example engine on the first ``examples`` examples of ``batch``.

    Both run with every submodule in eval mode (dropout draws no masks, so the two compute the same gradients) and
    without touching ``.grad``, the RNG or any buffer. Returns ``None`` when every per-example squared norm agrees
    within ``rtol`` of the largest (float32 gradients: ~1e-6 typical; a structural miss such as a tied output layer
    is off by tens of percent), else a sentence saying what differed or what the hooks reported (then use the
    ``vmap`` engine, :func:`lightning_sgd.per_example.per_example_gradient_stats`, for this model). The reference is
    exact even where ``vmap`` cannot run the model (it then loops over the examples, silently: only ``examples``).
    ``layers="norm"`` compares the norms over the normalization layers' parameters only.
    """
    _check_layers(layers, "validate")
    loss = ModuleLoss(module, "validate") if loss is None else loss
    n = batch_size(batch, "validate")
    k = min(examples, n)
    head = slice_batch(batch, slice(0, k), "validate")
    with module_eval(module):
        try:
            stats, hooks = _hooked_stats(module, head, loss, False, layers)
            got = stats.sq_norms
        except ValueError as err:  # what the hooks reported (a layer called twice, ...)
            return str(err)
        ambiguous = [name for name, shape in hooks.broadcast.items() if shape[0] == n]
        if ambiguous and k < n:
            return (f"layer {ambiguous[0]!r}'s output (shape {hooks.broadcast[ambiguous[0]]}) is broadcast over the "
                    f"batch, and its length equals the batch's {n} examples: on the whole batch the hooks cannot tell "
                    "it from a per-example output")
        try:
            reference = _per_example_stats(module, head, loss=loss, chunk_size=None, per_layer=layers == "norm",
                                           directions=None, quiet=True)
        except Exception as err:  # noqa: BLE001 - the loss of a one-example batch cannot be computed at all
            return (f"the per-example losses cannot be computed on batches of one example ({type(err).__name__}: "
                    f"{err})")
    if layers == "norm":
        selected = set(map(layer_of, PerExampleNormHooks(module, layers="norm").selected_parameter_names()))
        assert reference.layer_sq_norms is not None
        expected = sum(sq for layer, sq in reference.layer_sq_norms.items() if layer in selected)
    else:
        expected = reference.sq_norms
    worst = float((got - expected).abs().max())
    if worst > rtol * float(expected.abs().max()) + 1e-12:
        return (f"per-example squared norms from the layer hooks differ from the vmap engine by up to {worst:.3g} "
                f"(largest {float(expected.abs().max()):.3g}): some parameter is used outside its layer's forward "
                "(e.g. a tied output layer), or a layer computes something the hooks do not model")
    return None


def hook_gradient_stats(module: nn.Module, batch: Any, *, loss: ModuleLoss | None = None,
                        per_layer: bool = False, layers: str = "all") -> PerExampleStats:
    """:func:`lightning_sgd.per_example.per_example_gradient_stats` through the layer hooks: one forward and one
    backward of the whole batch instead of ``vmap`` over examples (no ``directions``).

    The loss is ``loss`` (default ``ModuleLoss(module, "hook_gradient_stats")``: the module's ``training_step`` or
    its protocol), run inside :meth:`ModuleLoss.isolated`: the module keeps its mode (dropout draws one mask per
    example, as in training), the RNG, buffers and ``.grad`` are untouched, ``self.log`` is muted. Raises
    ``ValueError`` for unsupported layers, BatchNorm in train mode (its batch statistics couple the examples, and
    its running statistics would move), or anything the hooks report (a broadcast input, a layer called twice);
    run :func:`validate` once per model to rule out parameters used outside their layers.

    ``layers="norm"``: only the normalization layers' parameters (:class:`PerExampleNormHooks`); ``sq_norms``,
    ``layer_sq_norms`` and ``mean_grad`` then all cover :meth:`PerExampleNormHooks.selected_parameter_names` only
    (``mean_grad`` in that order), so |ḡ|² and the per-example norms are over the same parameters.
    """
    _check_layers(layers, "hook_gradient_stats")
    loss = ModuleLoss(module, "hook_gradient_stats") if loss is None else loss
    if any(isinstance(m, _BatchNorm) and m.training for m in module.modules()):
        raise ValueError("hook_gradient_stats: BatchNorm in train mode couples the examples of a batch; use the "
                         "vmap engine (lightning_sgd.per_example), which runs BatchNorm on its running statistics.")
    return _hooked_stats(module, batch, loss, per_layer, layers)[0]


def _hooked_stats(module: nn.Module, batch: Any, loss: ModuleLoss, per_layer: bool, layers: str
                  ) -> tuple[PerExampleStats, PerExampleNormHooks]:
    """:func:`hook_gradient_stats` and the hooks that measured it."""
    n = batch_size(batch, "hook_gradient_stats")
    hooks = PerExampleNormHooks(module, layer_names=per_layer, layers=layers)
    all_params = trainable_parameters(module)
    params = {name: all_params[name] for name in hooks.selected_parameter_names()}
    with loss.isolated():
        hooks.arm(n)
        try:
            value = loss.loss(batch)
            grads = torch.autograd.grad(value, list(params.values()), allow_unused=True)
        finally:
            sq, layer_sq, problem = hooks.collect()
    if problem is not None:
        raise ValueError(f"hook_gradient_stats: {problem}.")
    assert sq is not None
    factor = float(n) ** 2  # contributions to a mean over n examples -> per-example gradients
    layer_norms = None
    if per_layer:
        zeros = torch.zeros_like(sq)
        layer_norms = {layer: layer_sq.get(layer, zeros) * factor for layer in dict.fromkeys(map(layer_of, params))}
    mean_grad = [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params.values(), grads)]
    return PerExampleStats(sq_norms=sq * factor, layer_sq_norms=layer_norms, mean_grad=mean_grad, projections=None,
                           n=n), hooks


def _timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """(wall seconds, result) of one call, CUDA work included."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - start, out


def choose_engine(module: nn.Module, batch: Any, *, loss: ModuleLoss | None = None, layers: str = "all",
                  chunk_size: int | None = 64, repeats: int = 2) -> str:
    """``"hooks"`` or ``"vmap"``: the per-example engine that adds less time to a training step on this model and
    batch, timed on the real batch (device, dtype, threads as they are).

    In training the forward and backward run anyway: the hooks cost what they add to them (hooked forward+backward
    minus a plain one), the ``vmap`` engine a whole extra pass (:func:`lightning_sgd.per_example.
    per_example_gradient_stats` with ``chunk_size``). Each of the three runs once to warm up, then ``repeats``
    interleaved rounds; the least time of each is compared. The answer is a timing: on a busy machine two calls may
    differ where the engines cost about the same (callers keep the first answer, and should checkpoint it). Returns
    ``"vmap"`` without timing when the hooks cannot measure the model (:func:`unsupported_layers`, BatchNorm in train
    mode, anything the hooks report on this batch), and ``"hooks"`` for ``layers="norm"`` (the vmap engine has no
    such mode), and ``"hooks"`` when ``vmap`` cannot run the model (tried on two examples; its engine would loop
    over the examples). Runs inside :meth:`ModuleLoss.isolated`: ``.grad``, buffers, the RNG and the module's mode
    are kept; costs about ``repeats + 1`` times (two forward-backwards and a vmap pass).
    """
    _check_layers(layers, "choose_engine")
    if repeats < 1:
        raise ValueError(f"choose_engine: repeats must be >= 1, got {repeats}.")
    if unsupported_layers(module, layers) or any(isinstance(m, _BatchNorm) and m.training for m in module.modules()):
        return "vmap"
    loss = ModuleLoss(module, "choose_engine") if loss is None else loss
    n = batch_size(batch, "choose_engine")
    params = list(trainable_parameters(module).values())
    hooks = PerExampleNormHooks(module, layers=layers)
    device = params[0].device
    failed: list[str] = []

    def plain() -> Tensor:
        return torch.autograd.grad(loss.loss(batch), params, allow_unused=True)[0]

    def hooked() -> Tensor:
        hooks.arm(n)
        try:
            out = torch.autograd.grad(loss.loss(batch), params, allow_unused=True)[0]
        finally:
            sq, _, problem = hooks.collect()
        if problem is not None:
            failed.append(problem)
        return sq if sq is not None else out

    def vmapped() -> Tensor:
        return _per_example_stats(module, batch, loss=loss, chunk_size=chunk_size, per_layer=False, directions=None,
                                  quiet=True).sq_norms

    runs = {"plain": plain, "hooks": hooked, "vmap": vmapped}
    best = dict.fromkeys(runs, math.inf)
    with loss.isolated():
        plain()  # warm-up
        hooked()
        if failed:
            return "vmap"
        if layers == "norm":
            return "hooks"
        # where vmap cannot run the model its engine loops over the examples (a forward and backward each): found on
        # two examples, not timed on the whole batch
        _per_example_stats(module, slice_batch(batch, slice(0, min(n, 2)), "choose_engine"), loss=loss,
                           chunk_size=None, per_layer=False, directions=None, quiet=True)
        if module in _NO_VMAP:
            return "hooks"
        vmapped()
        for _ in range(repeats):
            for name, fn in runs.items():
                best[name] = min(best[name], _timed(fn, device)[0])
    if failed:
        return "vmap"
    return "hooks" if best["hooks"] - best["plain"] <= best["vmap"] else "vmap"
