"""GradientDiversity: Yin et al.'s gradient diversity and the batch-size bound it implies, during training.

Yin et al. 2018, "Gradient Diversity: a Key Ingredient for Scalable Distributed Learning" (seed 004; formulas in
shared/REFERENCE.md). The maths is in :mod:`lightning_sgd.diversity`; the per-example gradients come from the engine
shared with GradientNoiseScale (:mod:`lightning_sgd.per_example`).
"""

from __future__ import annotations

import math
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.utils._pytree import tree_map
from typing_extensions import override

from lightning_sgd.diversity import batch_size_bound, diversity_from_stats
from lightning_sgd.per_example import per_example_gradient_stats, trainable_parameters
from lightning_sgd.per_example_hooks import hook_gradient_stats, unsupported_layers, validate
from lightning_sgd.protocols import first_tensor, require_supervised
from lightning_sgd.schedules import Schedule, as_schedule

__all__ = ["GradientDiversity"]


def _num_examples(pl_module: Any, batch: Any) -> int:
    tensor = first_tensor(pl_module.split_batch(batch)[0])
    return int(tensor.shape[0]) if tensor is not None else 0  # no tensor: n = 0, a counted skip


def _hook_problems(module: nn.Module) -> list[str]:
    """Why the layer-hook engine cannot serve this model (unsupported layers, BatchNorm); empty when it can."""
    return unsupported_layers(module) + [f"{name}: BatchNorm" for name, m in module.named_modules()
                                         if isinstance(m, nn.modules.batchnorm._BatchNorm)]


class GradientDiversity(Callback):
    r"""Measure the gradient diversity Δ(w) = Σᵢ|gᵢ|² / |Σᵢgᵢ|² over n examples, on a schedule.

    .. math::  \Delta(w) = \frac{\sum_{i=1}^n |\nabla f_i(w)|^2}{|\sum_{i=1}^n \nabla f_i(w)|^2},
               \qquad B_\text{bound} = \delta\, n\, \Delta(w) + 1

    The n examples are either the current training batch (``probe_size=None``; measured at the parameters the
    step's gradient is taken at, in ``on_train_batch_start``) or a fixed probe set of ``probe_size`` training
    examples drawn once at the start of training (same examples every time, so the curve over training is not
    confounded by batch-to-batch sampling). Drawing the probe set does not change the training data order or RNG.

    Per-example gradient norms come from one forward and backward of the n examples with layer hooks
    (:func:`lightning_sgd.per_example_hooks.hook_gradient_stats`: Linear, Conv, Embedding, LayerNorm, GroupNorm;
    checked once against vmap on a few examples) or, for other layers, BatchNorm, or ``engine="vmap"``, from
    :func:`lightning_sgd.per_example.per_example_gradient_stats` (``vmap(grad)``, ``chunk_size`` examples at a
    time). **BatchNorm** layers run in eval mode (running statistics) for the measurement, because per-example
    gradients in train mode are ill-defined; their mode is restored afterwards. Dropout stays active with
    independent masks per example.

    Under DDP each rank measures its own examples; rank 0 logs its value.

    Args:
        schedule: when to measure (``int`` n = every n steps, or a :class:`lightning_sgd.schedules.Schedule`).
        probe_size: ``None`` to use the current batch, or the size (>= 2) of a fixed probe set.
        delta: δ ∈ (0, 1] in the bound B ≤ δ·n·Δ + 1.
        per_layer: also Δ per layer (the module owning the parameters), logged as ``diversity/layer/<name>``.
        chunk_size: examples per ``vmap`` chunk (peak memory ≈ chunk_size × #params).
        engine: ``"auto"`` (layer hooks when every layer is supported, there is no BatchNorm and the one-time
            check against vmap passes; else vmap), ``"hooks"`` or ``"vmap"``.

    Logs ``diversity/value`` (Δ), ``diversity/n_delta`` (n·Δ, ≈ 1 + B_simple when Δ ≪ 1),
    ``diversity/batch_bound`` (δ·n·Δ + 1) and ``diversity/skipped``. The last value is the attribute ``diversity``.
    A measurement whose Δ is undefined (n < 2, all-zero gradients, non-finite gradients) is skipped and counted in
    ``skipped`` (by reason), never logged as a number.
    """

    def __init__(
        self,
        schedule: int | Schedule = 50,
        probe_size: int | None = None,
        delta: float = 1.0,
        per_layer: bool = False,
        chunk_size: int | None = 64,
        engine: str = "auto",
    ) -> None:
        if probe_size is not None and probe_size < 2:
            raise ValueError(f"GradientDiversity: probe_size must be >= 2 (Δ compares examples) or None, got "
                             f"{probe_size}.")
        if not 0.0 < delta <= 1.0:
            raise ValueError(f"GradientDiversity: delta must be in (0, 1], got {delta}.")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"GradientDiversity: chunk_size must be >= 1 or None, got {chunk_size}.")
        if engine not in ("auto", "hooks", "vmap"):
            raise ValueError(f"GradientDiversity: engine must be 'auto', 'hooks' or 'vmap', got {engine!r}.")
        self.engine = engine
        self._use_hooks: tuple[int, bool] | None = None  # (id of the module, engine = hooks), decided once per module
        self.schedule = as_schedule(schedule)
        self.probe_size = probe_size
        self.delta = delta
        self.per_layer = per_layer
        self.chunk_size = chunk_size
        self.diversity = math.nan
        self.layer_diversity: dict[str, float] = {}
        self.measured = 0
        self.skipped = {"too_few": 0, "zero_gradient": 0, "nonfinite": 0}
        self.last_metrics: dict[str, float] = {}
        self.probe: Any = None
        self._last_step: int | None = None

    # ------------------------------------------------------------------------------------------------- probe set
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            require_supervised(pl_module, "GradientDiversity")
            self._use_hooks = None
            problems = _hook_problems(pl_module)
            if problems and self.engine == "hooks":
                raise ValueError(f"GradientDiversity(engine='hooks') cannot use layer hooks for: {'; '.join(problems)}"
                                 ". Use engine='vmap' (or 'auto', which picks it).")

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.probe_size is not None and self.probe is None:
            self.probe = self._draw_probe(trainer, pl_module)
        elif self.probe is not None:  # restored from a checkpoint (on CPU)
            self.probe = trainer.strategy.batch_to_device(self.probe)

    def _draw_probe(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        """The first ``probe_size`` examples the training loader yields, without moving its RNG or the global one."""
        loader = trainer.train_dataloader
        if loader is None:
            raise RuntimeError("GradientDiversity(probe_size=...) needs a training dataloader to draw the probe set.")
        generators = [g for g in (getattr(loader, "generator", None),
                                  getattr(getattr(loader, "sampler", None), "generator", None)) if g is not None]
        states = [g.get_state() for g in generators]
        batches, count = [], 0
        with torch.random.fork_rng(devices=[]):
            for batch in loader:
                batches.append(batch)
                count += _num_examples(pl_module, batch)
                if count >= self.probe_size:
                    break
        for g, state in zip(generators, states):
            g.set_state(state)
        if count < 2:
            raise ValueError(f"GradientDiversity: the training loader yields only {count} example(s); Δ needs >= 2.")
        probe = tree_map(lambda *ts: torch.cat(ts)[: self.probe_size] if isinstance(ts[0], Tensor) else ts[0],
                         *batches)
        return trainer.strategy.batch_to_device(probe)

    # ----------------------------------------------------------------------------------------------- measuring
    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        step = trainer.global_step
        if step == self._last_step or not self.schedule(step):
            return  # with gradient accumulation, measure once per optimizer step
        self._last_step = step
        metrics = self.measure(pl_module, self.probe if self.probe is not None else batch)
        if trainer.is_global_zero and metrics:
            self.last_metrics = metrics
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)

    def measure(self, pl_module: pl.LightningModule, batch: Any) -> dict[str, float]:
        """Compute Δ on ``batch`` now; update ``diversity`` and return the metrics (only ``skipped`` if undefined)."""
        n = _num_examples(pl_module, batch)
        if n < 2:
            return self._skip("too_few")
        if self._use_hooks is None or self._use_hooks[0] != id(pl_module):
            self._use_hooks = (id(pl_module), self._hooks_apply(pl_module, batch))
        if self._use_hooks[1]:
            stats = hook_gradient_stats(pl_module, batch, per_layer=self.per_layer)
        else:
            stats = per_example_gradient_stats(pl_module, batch, chunk_size=self.chunk_size,
                                               per_layer=self.per_layer)
        if not bool(torch.isfinite(stats.sq_norms).all()) or not all(bool(torch.isfinite(g).all())
                                                                     for g in stats.mean_grad):
            return self._skip("nonfinite")
        value, layers = diversity_from_stats(stats, list(trainable_parameters(pl_module)))
        if not math.isfinite(value):
            return self._skip("zero_gradient")
        self.diversity, self.layer_diversity = value, layers
        self.measured += 1
        metrics = {
            "diversity/value": value,
            "diversity/n_delta": n * value,
            "diversity/batch_bound": batch_size_bound(value, n, self.delta),
            "diversity/n": float(n),
        }
        metrics.update({f"diversity/layer/{k}": v for k, v in layers.items() if math.isfinite(v)})
        return metrics

    def _hooks_apply(self, pl_module: pl.LightningModule, batch: Any) -> bool:
        """Whether the layer-hook engine serves this module: supported layers, no BatchNorm, and per-example norms
        equal to vmap's on a few examples of ``batch`` (a one-time check)."""
        if self.engine == "vmap" or _hook_problems(pl_module):
            return False
        problem = validate(pl_module, batch)
        if problem is not None:
            rank_zero_warn(f"GradientDiversity: layer hooks cannot be trusted for this model ({problem}); "
                           "measuring through vmap. Pass engine='vmap' to skip the check.")
        return problem is None

    def _skip(self, reason: str) -> dict[str, float]:
        self.skipped[reason] += 1
        return {"diversity/skipped": float(sum(self.skipped.values()))}

    # --------------------------------------------------------------------------------------------------- state
    @override
    def state_dict(self) -> dict[str, Any]:
        probe = None if self.probe is None else tree_map(
            lambda t: t.detach().cpu() if isinstance(t, Tensor) else t, self.probe)
        return {"diversity": self.diversity, "layer_diversity": dict(self.layer_diversity), "measured": self.measured,
                "skipped": dict(self.skipped), "probe": probe}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.diversity = float(state_dict["diversity"])
        self.layer_diversity = dict(state_dict.get("layer_diversity", {}))
        self.measured = int(state_dict["measured"])
        self.skipped = {**self.skipped, **state_dict["skipped"]}
        self.probe = state_dict.get("probe")  # a resumed run keeps measuring on the same probe examples
