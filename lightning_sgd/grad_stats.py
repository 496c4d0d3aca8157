"""The per-step gradient-norm record that a gradient-statistics DDP strategy publishes.

:class:`lightning_sgd.plugins.GradStatsDDPStrategy` fills one :class:`AllReduceGradStats` per optimizer step from
its comm hook; :class:`lightning_sgd.callbacks.GradientNoiseScale` reads it (``strategy.latest_grad_stats``) to get
the small-batch (one rank) and big-batch (all ranks) squared norms without any extra collective.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True)
class AllReduceGradStats:
    """Squared gradient norms around one all-reduce, all of mean-loss gradients (not sums).

    Norms are of the gradients as they reach the optimizer: after AMP unscaling, before clipping.
    """

    step: int  # trainer.global_step of the optimizer step these gradients belong to
    local_sq_norms: Tensor  # (world_size,) |g_r|² of each rank's local gradient (batch local_batch_size)
    global_sq_norm: float  # |ḡ|² of the all-reduced (averaged) gradient (batch global_batch_size)
    local_batch_size: int  # examples behind one rank's gradient (micro-batches × per-device batch)
    global_batch_size: int  # examples behind the averaged gradient (world_size × local_batch_size)
