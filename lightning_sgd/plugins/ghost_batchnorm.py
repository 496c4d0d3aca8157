"""Ghost batch normalization (Hoffer, Hubara & Soudry 2017, "Train longer, generalize better").

In training mode every chunk of ``ghost_batch_size`` consecutive examples is normalized with its own mean and
variance, as if the batch had been fed to :class:`torch.nn.BatchNorm` chunk by chunk; evaluation uses the running
statistics exactly like plain batch norm. Hoffer et al. argue that large-batch training keeps the small-batch
regularization of BN this way (ghost batch sizes used in the literature: 32 for ResNet-32 and VGG-11 in Zhang et al.
2019, 64 for Wide-ResNet and 256 for ResNet-50 in Smith, Elsen & De 2020). Formulas: docs/theory.md §7.

- :class:`GhostBatchNorm`: one layer for 1d/2d/3d inputs (``(N, C)``, ``(N, C, L)``, ``(N, C, H, W)``, ...). Its
  parameters and buffers are those of ``nn.BatchNorm*`` (same names), so ``state_dict`` loads both ways.
- :func:`convert_to_ghost_batchnorm`: swap every BatchNorm of a model (a layer + converter pair like timm's
  ``layers/split_batchnorm.py``).
- :class:`GhostBatchNormCallback`: does the conversion in ``setup()``, before the optimizers are built, so a
  LightningCLI YAML can switch ghost BN on: ``trainer.callbacks: [{class_path:
  lightning_sgd.plugins.GhostBatchNormCallback, init_args: {ghost_batch_size: 32}}]``.

Vectorized on accelerators: the ``K = N // G`` full chunks are reshaped into the channel axis,
``(N, C, *S) -> (G, K*C, *S)``, and normalized by ONE native ``F.batch_norm`` call (no Python loop over chunks). On
CPU, where that reshaping costs two transposing copies, each chunk gets its own native call (faster on every shape
timed). A remainder of ``N % G >= 2`` examples
is normalized with its OWN statistics (one more call, like the last chunk of ``torch.split``). A remainder of exactly
one example has no batch statistics of its own (one value per channel for ``(N, C)`` inputs, where torch refuses
it; a single example's instance statistics otherwise), so it joins the last full chunk, which then holds ``G + 1``
examples: the chunks are ``[G] * (K - 1) + [G + 1]``. The running statistics receive exactly the updates that
sequential ``nn.BatchNorm`` calls on these chunks would make (with ``momentum=None`` the cumulative average counts
each chunk as one batch); ``num_batches_tracked`` grows by the number of chunks.

Under DDP each process normalizes its own per-device batch, so the ghost size stays a fixed number of examples as
devices are added (the global batch holds ``world_size * N / G`` ghost batches). ``SyncBatchNorm`` layers are left
alone unless ``include_sync_batchnorm=True`` (then they become local ghost BN: synchronizing statistics across
devices is the opposite of what ghost BN wants).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from typing_extensions import override

from lightning_sgd.checks import check_bool, check_float, check_int
from lightning_sgd.compat import Callback

__all__ = ["GhostBatchNorm", "GhostBatchNormCallback", "convert_to_ghost_batchnorm"]


def _check_ghost_batch_size(ghost_batch_size: int, who: str) -> int:
    # A ValueError also for a float or bool (the layer's documented contract since 0.1.0; other arguments follow
    # lightning_sgd.checks: TypeError for a wrong type).
    if isinstance(ghost_batch_size, bool) or not isinstance(ghost_batch_size, int) or ghost_batch_size <= 0:
        raise ValueError(f"{who}: ghost_batch_size must be a positive integer (examples per ghost batch), got "
                         f"{ghost_batch_size!r}.")
    return ghost_batch_size


def _running_stat_coefficients(factors: list[float]) -> tuple[float, list[float]]:
    """Coefficients of ``K`` sequential EMA updates ``r <- (1 - f_j) r + f_j s_j`` folded into one.

    Returns ``(c, [c_0, ..., c_{K-1}])`` with ``r_K = c * r_0 + sum_j c_j s_j``, i.e. ``c = prod_j (1 - f_j)`` and
    ``c_j = f_j prod_{i > j} (1 - f_i)``.
    """
    coefficients = [0.0] * len(factors)
    tail = 1.0  # prod_{i > j} (1 - f_i)
    for j in range(len(factors) - 1, -1, -1):
        coefficients[j] = factors[j] * tail
        tail *= 1.0 - factors[j]
    return tail, coefficients


def _vectorize(input: Tensor) -> bool:
    """Whether the full chunks go through one call with the chunks in the channel axis (accelerators: one kernel
    launch) or one call each (CPU: faster than the vectorized form's two transposing copies on every shape timed,
    0.46-0.96x its forward+backward, from (512, 16, 32, 32) to (4096, 256) in chunks of 32)."""
    return input.device.type != "cpu"


class GhostBatchNorm(_BatchNorm):
    """Batch norm whose training statistics come from chunks of ``ghost_batch_size`` examples.

    Same arguments, parameters and buffers as :class:`torch.nn.BatchNorm2d` (and 1d/3d: any input ``(N, C, *)``)
    plus ``ghost_batch_size``. Training mode: the batch is split into ``N // G`` ghost batches of ``G`` examples
    (vectorized on accelerators, one call per chunk on CPU) and a remainder of ``N % G`` examples with its own
    statistics; a batch of at most ``G`` examples is plain batch norm. A remainder of exactly ONE example is not
    normalized on its own (a single example has no batch statistics): it joins the last ghost batch, which then holds
    ``G + 1`` examples (``N = 65, G = 32``: chunks of 32 and 33; ``N = G + 1``: plain batch norm over all of it).
    Eval mode: plain batch norm with the running statistics.

    The first training batch must hold at least ``ghost_batch_size`` examples (a ``ValueError`` otherwise: the
    ghost size is probably mistyped); later smaller batches (the last batch of an epoch) are allowed. A training
    batch that leaves one value per channel to normalize (a batch of one example of shape ``(1, C)``, or
    ``ghost_batch_size=1`` on ``(N, C)`` inputs) is refused with a ``ValueError`` naming the batch, as
    ``nn.BatchNorm`` refuses it (use ``drop_last=True`` on the DataLoader to drop a last batch of one example).

    Example:
        >>> bn = GhostBatchNorm(8, ghost_batch_size=32)
        >>> bn(torch.randn(128, 8, 4, 4)).shape
        torch.Size([128, 8, 4, 4])
        >>> int(bn.num_batches_tracked)  # four ghost batches, as four nn.BatchNorm2d calls
        4
    """

    def __init__(
        self,
        num_features: int,
        ghost_batch_size: int = 32,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        who = type(self).__name__
        check_int(who, "num_features", num_features, minimum=1)
        check_float(who, "eps", eps, low=0.0, low_open=True)
        check_float(who, "momentum", momentum, low=0.0, high=1.0, optional=True,
                    hint="(None: a cumulative average of the running statistics)")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.ghost_batch_size = _check_ghost_batch_size(ghost_batch_size, who)
        self._seen_training_batch = False

    @classmethod
    def from_batchnorm(cls, bn: _BatchNorm, ghost_batch_size: int) -> GhostBatchNorm:
        """A ghost BN that SHARES ``bn``'s parameters and buffers (no copy; optimizer references stay valid)."""
        ghost = cls(bn.num_features, ghost_batch_size, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                    device="meta")
        for name, param in bn.named_parameters(recurse=False):
            setattr(ghost, name, param)
        for name, buffer in bn.named_buffers(recurse=False):
            setattr(ghost, name, buffer)
        ghost.train(bn.training)
        return ghost

    @override
    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"GhostBatchNorm expects input of shape (N, C, *), got {tuple(input.shape)}.")

    @override
    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ghost_batch_size={self.ghost_batch_size}"

    @override
    def forward(self, input: Tensor) -> Tensor:
        if not self.training:
            return super().forward(input)  # running statistics (or batch statistics if not tracked): plain BN
        self._check_input_dim(input)
        n, g = input.shape[0], self.ghost_batch_size
        values = math.prod(input.shape[2:])  # values per channel and example: prod(S)
        if n * values == 1:
            raise ValueError(
                f"GhostBatchNorm: a training batch of 1 example of shape {tuple(input.shape)} leaves one value per "
                f"channel; batch statistics need at least 2 (nn.BatchNorm refuses it too). Drop a last batch of one "
                f"example (DataLoader(..., drop_last=True)) or use a batch of at least 2 examples.")
        if g * values == 1 and n > 1:
            raise ValueError(
                f"GhostBatchNorm: ghost_batch_size=1 on inputs of shape (N, C) = {tuple(input.shape)} leaves one "
                f"value per channel in each ghost batch, which has no batch statistics; choose ghost_batch_size >= 2.")
        if not self._seen_training_batch:
            if n < g:
                raise ValueError(
                    f"GhostBatchNorm: ghost_batch_size={g} is larger than the (per-device) training batch of {n} "
                    f"examples; choose a ghost size <= the batch size."
                )
            self._seen_training_batch = True
        if n <= g:
            return super().forward(input)  # one ghost batch: exactly nn.BatchNorm
        return self._ghost_forward(input)

    def _ghost_forward(self, input: Tensor) -> Tensor:
        n, c, g = input.shape[0], input.shape[1], self.ghost_batch_size
        k, r = divmod(n, g)  # k full ghost batches, a remainder of r examples
        if r == 1:  # one example has no batch statistics: it joins the last full chunk (G + 1 examples)
            k, r = k - 1, g + 1
        spatial = input.shape[2:]
        track = self.track_running_stats and self.running_mean is not None and self.running_var is not None
        stats_dtype = self.running_mean.dtype if track else input.dtype
        outs: list[Tensor] = []
        chunk_means: list[Tensor] = []
        chunk_vars: list[Tensor] = []
        # split, not sliced: the backward of a split assembles the input's gradient once, where each slice's backward
        # would write a full-size zero tensor (on CPU that made the layer 4x slower than the chunks' own work)
        vectorize = k > 0 and _vectorize(input)
        pieces = list(input.split(([k * g] if vectorize else [g] * k) + ([r] if r else [])))

        if vectorize:  # full chunks into the channel axis: (k*g, C, *S) -> (k, g, C, *S) -> (g, k*C, *S)
            head = pieces.pop(0).reshape(k, g, c, *spatial).transpose(0, 1).reshape(g, k * c, *spatial)
            weight = self.weight.repeat(k) if self.weight is not None else None
            bias = self.bias.repeat(k) if self.bias is not None else None
            # momentum 1 on zero buffers: the kernel writes each chunk's mean and UNBIASED variance into them.
            means = torch.zeros(k * c, device=input.device, dtype=stats_dtype) if track else None
            variances = torch.zeros(k * c, device=input.device, dtype=stats_dtype) if track else None
            out = F.batch_norm(head, means, variances, weight, bias, True, 1.0, self.eps)  # (g, k*C, *S)
            outs.append(out.reshape(g, k, c, *spatial).transpose(0, 1).reshape(k * g, c, *spatial))
            if track:
                chunk_means.append(means.view(k, c))
                chunk_vars.append(variances.view(k, c))

        # One native call per remaining piece: every ghost batch on CPU; on accelerators the last chunk only (a
        # remainder of >= 2 examples, or the last full chunk plus a remainder of one).
        for piece in pieces:
            mean = torch.zeros(c, device=input.device, dtype=stats_dtype) if track else None
            var = torch.zeros(c, device=input.device, dtype=stats_dtype) if track else None
            outs.append(F.batch_norm(piece, mean, var, self.weight, self.bias, True, 1.0, self.eps))
            if track:
                chunk_means.append(mean.view(1, c))
                chunk_vars.append(var.view(1, c))

        if track:
            self._update_running_stats(torch.cat(chunk_means), torch.cat(chunk_vars))
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    @torch.no_grad()
    def _update_running_stats(self, means: Tensor, variances: Tensor) -> None:
        """Apply the updates of ``len(means)`` sequential nn.BatchNorm calls in one weighted sum."""
        chunks = means.shape[0]
        start = int(self.num_batches_tracked) if self.num_batches_tracked is not None else 0
        if self.momentum is None:  # cumulative moving average: the j-th chunk is batch number start + j + 1
            factors = [1.0 / (start + j + 1) for j in range(chunks)]
        else:
            factors = [float(self.momentum)] * chunks
        keep, coefficients = _running_stat_coefficients(factors)
        weights = torch.tensor(coefficients, device=means.device, dtype=means.dtype)  # (K,)
        self.running_mean.mul_(keep).add_(weights @ means)  # (C,)
        self.running_var.mul_(keep).add_(weights @ variances)
        if self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(chunks)


def convert_to_ghost_batchnorm(
    module: nn.Module, ghost_batch_size: int, *, include_sync_batchnorm: bool = False
) -> nn.Module:
    """Replace every BatchNorm layer of ``module`` by a :class:`GhostBatchNorm` sharing its parameters and buffers.

    Works in place on children and returns the model (a new object only if ``module`` itself is a BatchNorm).
    ``SyncBatchNorm`` is skipped unless ``include_sync_batchnorm``; existing ghost layers get the new ghost size.
    The ``state_dict`` keys do not change, so checkpoints of the original model load into the converted one and
    back. A model without any BatchNorm triggers a warning (not an error) and is returned unchanged.
    """
    _check_ghost_batch_size(ghost_batch_size, "convert_to_ghost_batchnorm")
    counts = {"converted": 0}

    def convert(child: nn.Module) -> nn.Module:
        if isinstance(child, GhostBatchNorm):
            child.ghost_batch_size = ghost_batch_size
            counts["converted"] += 1
            return child
        if isinstance(child, nn.SyncBatchNorm) and not include_sync_batchnorm:
            return child
        if isinstance(child, _BatchNorm) and not isinstance(child, nn.modules.lazy.LazyModuleMixin):
            counts["converted"] += 1
            return GhostBatchNorm.from_batchnorm(child, ghost_batch_size)
        for name, grandchild in child.named_children():
            new = convert(grandchild)
            if new is not grandchild:
                setattr(child, name, new)
        return child

    converted = convert(module)
    if counts["converted"] == 0:
        warnings.warn(
            f"convert_to_ghost_batchnorm: {type(module).__name__} has no BatchNorm layer to convert "
            f"(SyncBatchNorm is skipped unless include_sync_batchnorm=True); ghost batch norm has no effect.",
            UserWarning,
            stacklevel=2,
        )
    return converted


class GhostBatchNormCallback(Callback):
    """Convert the LightningModule's BatchNorm layers to :class:`GhostBatchNorm` in ``setup()``.

    ``setup()`` runs before ``configure_optimizers`` and before DDP wraps the model, so optimizers see the ghost
    layers' (shared, unchanged) parameters. The ghost size is a number of examples per device.

    Args:
        ghost_batch_size: examples per ghost batch, per device (Zhang et al. 2019 use 32; Smith, Elsen & De
            2020 use 64 and 256).
        include_sync_batchnorm: also convert ``SyncBatchNorm`` layers (into local ghost BN).
    """

    def __init__(self, ghost_batch_size: int, include_sync_batchnorm: bool = False) -> None:
        self.ghost_batch_size = _check_ghost_batch_size(ghost_batch_size, "GhostBatchNormCallback")
        self.include_sync_batchnorm = check_bool("GhostBatchNormCallback", "include_sync_batchnorm",
                                                 include_sync_batchnorm)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        convert_to_ghost_batchnorm(pl_module, self.ghost_batch_size,
                                   include_sync_batchnorm=self.include_sync_batchnorm)
