"""Per-step learning-rate schedules of the sources, as ``LambdaLR`` subclasses that LightningCLI builds from YAML.

Use with ``lr_scheduler: {class_path: lightning_sgd.recipes.LinearDecayLR, init_args: {...}}`` in a recipe's
``model.init_args``; the recipe modules step them every optimizer step. A constant learning rate is
``lr_scheduler: null`` (or :class:`ConstantLR`, which makes the choice explicit in a sweep's search space).

- Constant (Zhang et al. 2019 App. F.3): α(t) = α₀.
- Linear decay (Shallue et al. 2018; Zhang et al. 2019 App. F.3): α(t) = α₀ − (1 − γ)·α₀·t/T for t ≤ T, then
  held at γ·α₀.
- Step decay: α(t) = α₀·γ^k after the k-th milestone step. :meth:`StepDecayLR.smith_et_al_milestones` gives
  Smith, Elsen & De's (2020) milestones: constant for the first half of the steps, then halved every further twentieth.
"""

from __future__ import annotations

import bisect

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def linear_decay_factor(step: int, decay_steps: int, final_fraction: float) -> float:
    """α(t)/α₀ of the linear decay: 1 − (1 − γ)·min(t, T)/T."""
    return 1.0 - (1.0 - final_fraction) * min(step, decay_steps) / decay_steps


class ConstantLR(LambdaLR):
    """α(t) = α₀ (the optimizer's ``lr``)."""

    def __init__(self, optimizer: Optimizer, last_epoch: int = -1) -> None:
        super().__init__(optimizer, lambda step: 1.0, last_epoch)


class LinearDecayLR(LambdaLR):
    """α(t) = α₀ − (1 − γ)·α₀·t/T for t ≤ T, held at γ·α₀ after T.

    Args:
        decay_steps: T, the step at which the final rate is reached (> 0).
        final_fraction: γ in [0, 1]; the final rate is γ·α₀.
    """

    def __init__(self, optimizer: Optimizer, decay_steps: int, final_fraction: float = 0.01,
                 last_epoch: int = -1) -> None:
        if decay_steps < 1:
            raise ValueError(f"LinearDecayLR: decay_steps must be >= 1, got {decay_steps}.")
        if not 0.0 <= final_fraction <= 1.0:
            raise ValueError(f"LinearDecayLR: final_fraction must be in [0, 1], got {final_fraction}.")
        self.decay_steps, self.final_fraction = decay_steps, final_fraction
        super().__init__(optimizer, lambda step: linear_decay_factor(step, decay_steps, final_fraction), last_epoch)


class StepDecayLR(LambdaLR):
    """α(t) = α₀·γ^k where k is the number of ``milestones`` (steps) ≤ t.

    Args:
        milestones: increasing optimizer steps at which the rate is multiplied by ``gamma``.
        gamma: decay factor per milestone (0 < γ).
    """

    def __init__(self, optimizer: Optimizer, milestones: list[int], gamma: float = 0.1, last_epoch: int = -1) -> None:
        if list(milestones) != sorted(milestones) or any(m < 0 for m in milestones):
            raise ValueError(f"StepDecayLR: milestones must be increasing and >= 0, got {milestones}.")
        if gamma <= 0:
            raise ValueError(f"StepDecayLR: gamma must be > 0, got {gamma}.")
        self.milestones, self.gamma = list(milestones), gamma
        super().__init__(optimizer, lambda step: gamma ** bisect.bisect_right(self.milestones, step), last_epoch)

    @staticmethod
    def smith_et_al_milestones(total_steps: int) -> list[int]:
        """Smith, Elsen & De (2020): constant for ``total_steps/2``, then halve every ``total_steps/20`` steps."""
        return [round(total_steps * (10 + k) / 20) for k in range(10)]
