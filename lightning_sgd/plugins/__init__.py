"""Training plugins: large-batch techniques as Lightning callbacks, layers and strategies.

- Ghost batch norm (Hoffer et al. 2017): :class:`GhostBatchNorm`, :func:`convert_to_ghost_batchnorm`,
  :class:`GhostBatchNormCallback`.
- :class:`EMAWeights`: exponential moving average of the weights.
- :class:`LRWarmupScaling`: linear / square-root LR scaling with gradual warmup (Goyal et al. 2017).
- :class:`LARS`, :class:`LAMB`: layer-wise trust-ratio optimizers (biases and norm parameters excluded).
- :class:`GradStatsDDPStrategy` (``pytorch_lightning``), :class:`LightningGradStatsDDPStrategy` (``lightning.pytorch``):
  DDP that records local and global gradient norms around its all-reduce; ``strategy="ddp_grad_stats"`` under either
  package (importing this package registers the name).
- :class:`BatchSizeSchedule`, :class:`AdaptiveBatchSize`: change the batch size inside one fit.
"""

from lightning_sgd import compat  # noqa: F401 - registers "ddp_grad_stats" in both packages' StrategyRegistry
from lightning_sgd._lazy import lazy_exports

_EXPORTS = {
    "GhostBatchNorm": "ghost_batchnorm",
    "convert_to_ghost_batchnorm": "ghost_batchnorm",
    "GhostBatchNormCallback": "ghost_batchnorm",
    "EMAWeights": "ema_weights",
    "LRWarmupScaling": "lr_warmup_scaling",
    "LARS": "optimizers",
    "LAMB": "optimizers",
    "GradStatsDDPStrategy": "grad_stats_ddp",
    "LightningGradStatsDDPStrategy": "grad_stats_ddp",
    "BatchSizeSchedule": "batch_size_schedule",
    "AdaptiveBatchSize": "batch_size_schedule",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
