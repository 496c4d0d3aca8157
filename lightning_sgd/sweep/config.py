"""The sweep's configuration: which recipe, which batch sizes, which target, which search space, where to store.

Everything here is checked by :meth:`SweepConfig.validate` before any trial runs (min > max, a log scale over a
non-positive range, a budget that is not a multiple of the evaluation interval, ...). The checks that need the
recipe itself (the metric exists, the batch size fits the dataset) live in :mod:`lightning_sgd.sweep.runner`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

#: Config keys the common parameter names map to when a search parameter gives no ``key``.
DEFAULT_KEYS: dict[str, str] = {
    "lr": "model.init_args.optimizer.init_args.lr",
    "momentum": "model.init_args.optimizer.init_args.momentum",
    "weight_decay": "model.init_args.optimizer.init_args.weight_decay",
}

class SweepConfigError(ValueError):
    """A sweep configuration error found before any trial ran."""


Scale = Literal["log", "linear", "one_minus_log"]


@dataclass
class SearchParam:
    """One dimension of the quasi-random search.

    ``scale``: ``log`` samples log-uniformly in [low, high] (learning rates); ``linear`` uniformly;
    ``one_minus_log`` samples ``1 - value`` log-uniformly, for momentum-like values (Shallue et al. 2019 tune
    ``1 - β``): ``low: 0.5, high: 0.999`` means 1−β in [0.001, 0.5].
    """

    low: float  # smallest value of the parameter itself (for one_minus_log: the smallest β)
    high: float  # largest value
    scale: Scale = "log"
    key: str | None = None  # dotted recipe config key the value goes to; None: DEFAULT_KEYS[name]

    def validate(self, name: str) -> None:
        if not (math.isfinite(self.low) and math.isfinite(self.high)):
            raise SweepConfigError(f"search_space.{name}: low and high must be finite, got [{self.low}, {self.high}].")
        if self.low >= self.high:
            raise SweepConfigError(
                f"search_space.{name}: min > max (low={self.low}, high={self.high}); low must be smaller than high."
            )
        if self.scale == "log" and self.low <= 0:
            raise SweepConfigError(f"search_space.{name}: a log scale needs low > 0, got low={self.low}.")
        if self.scale == "one_minus_log" and not (self.low >= 0 and self.high < 1):
            raise SweepConfigError(
                f"search_space.{name}: one_minus_log samples 1 - value log-uniformly, so values must lie in [0, 1); "
                f"got [{self.low}, {self.high}]."
            )
        if self.scale not in ("log", "linear", "one_minus_log"):
            raise SweepConfigError(f"search_space.{name}: unknown scale {self.scale!r} (log, linear or one_minus_log).")

    def config_key(self, name: str) -> str:
        if self.key is not None:
            return self.key
        if name in DEFAULT_KEYS:
            return DEFAULT_KEYS[name]
        raise SweepConfigError(f"search_space.{name}: give `key`, the dotted recipe config key this value sets.")

    # The Optuna parameter is what is sampled: the value itself, or 1 - value for one_minus_log, stored under
    # `one_minus_<name>` so that no parameter called `momentum` ever holds 1 - β.
    def optuna_name(self, name: str) -> str:
        return f"one_minus_{name}" if self.scale == "one_minus_log" else name

    def optuna_bounds(self) -> tuple[float, float, bool]:
        if self.scale == "one_minus_log":
            return 1.0 - self.high, 1.0 - self.low, True
        return self.low, self.high, self.scale == "log"

    def to_value(self, sampled: float) -> float:
        return 1.0 - sampled if self.scale == "one_minus_log" else sampled

    def unit_position(self, value: float) -> float:
        """Where ``value`` sits in the search range, 0 (low end of the sampled space) to 1 (high end)."""
        low, high, log = self.optuna_bounds()
        x = 1.0 - value if self.scale == "one_minus_log" else value
        if log:
            return (math.log(x) - math.log(low)) / (math.log(high) - math.log(low))
        return (x - low) / (high - low)


def _default_space() -> dict[str, SearchParam]:
    return {"lr": SearchParam(low=1e-3, high=10.0, scale="log")}


@dataclass
class SweepConfig:
    """A batch-size sweep (Shallue et al. 2019): per batch size, quasi-random search for the fewest steps to target.

    On the command line every field is ``--sweep.<field>``; a whole sweep YAML is ``--sweep path.yaml``.

    Args:
        batch_sizes: batch sizes to measure, written to ``batch_size_key`` (per device: with DDP the global batch
            is this times the world size).
        target: value of `metric` that counts as reached (e.g. 0.8 for val/acc).
        metric: a metric the recipe logs during validation.
        mode: reached when metric >= target (max) or <= target (min); None: infer.
        trials: non-divergent trials per batch size (the search budget).
        max_trials: hard cap on trials per batch size, divergent included; None: 3 * trials.
        max_steps: step budget per trial.
        eval_every: evaluate the target metric every this many optimizer steps.
        patience: give up a trial after this many evaluations without a new best metric; None: never.
        stop_at_best: end a trial once it has used as many steps as the best trial at its batch size.
        threads: torch.set_num_threads for the trials (1 is fastest for small models on shared CPUs).
        search_space: name -> :class:`SearchParam` (``lr``, ``momentum`` and ``weight_decay`` know their keys).
        recipe: recipe YAML (same as the top-level --config); --config wins when both are given.
        batch_size_key: recipe config key of the (per-device) batch size.
        overrides: extra recipe arguments for every trial, e.g. "--a.b=1".
        storage: Optuna RDB URL (sqlite:///..., postgresql://...); None: sqlite in output_dir.
        study_name: studies are named <study_name>-bs<B>; workers sharing a sweep use the same name.
        output_dir: results.csv/json, plot and the default SQLite file go here.
        seed: seed of the scrambled Sobol sequence.
        edge_fraction: warn when the best value lies this close (fraction of the range) to an edge.
        gns: measure the gradient noise scale in every trial (:class:`lightning_sgd.callbacks.GradientNoiseScale`,
            its cheapest exact source: per-example norms from layer hooks on one process) and record B_simple and
            B_noise at the step the target is reached and their median over the trial; the table, JSON and plot
            put this prediction next to the B_crit of the S(B) fit. With ``keep_callbacks`` and a recipe that has
            its own GradientNoiseScale, that one is read instead.
        gns_every: measure B_simple every this many steps.
        gns_source: the GradientNoiseScale ``source``: ``auto`` (per-example norms; from layer hooks when every layer
            is supported, else through vmap, which re-runs the batch) or ``split`` (4 parts of the batch: one extra
            forward/backward, noisier), e.g. for recurrent networks where vmap is slow.
        b_noise_every: also estimate B_noise (Hessian-vector products, ~10 training steps' cost each) every this
            many steps; None: B_simple only.
        gns_beta: EMA decay per measurement of the trial's noise-scale estimates (the callback's ``beta``).
        keep_callbacks: keep the recipe's measurement callbacks (``lightning_sgd.callbacks.*``) in the trials; by
            default they are removed (they measure, they do not change training, and they cost time).
        b_simple: a B_simple typed by hand, drawn on the plot and used as the prediction instead of the measured
            one (an override: the sweep measures it itself when ``gns`` is on).
        nqm: also fit the noisy quadratic model (lightning_sgd.nqm) to the curve and draw its prediction.
        wandb: also log the table and plot to W&B (offline without credentials).
        wandb_trials: also one W&B run per trial (offline without credentials), grouped by ``study_name`` and named
            ``<study_name>-bs<B>-t<trial number>``, with the trial's batch size and values in its config: the
            recipe's logged metrics and the noise scale over training.
        report_only: run no trial: rebuild the table, JSON and plot from the storage (an error when the storage
            holds no study of this sweep; nothing is created, no W&B run is opened).
    """

    batch_sizes: list[int] = field(default_factory=list)
    target: float | None = None
    metric: str = "val/acc"
    mode: Literal["max", "min"] | None = None
    trials: int = 8
    max_trials: int | None = None
    max_steps: int = 1000
    eval_every: int = 25
    patience: int | None = None
    stop_at_best: bool = True
    threads: int | None = None
    search_space: dict[str, SearchParam] = field(default_factory=_default_space)
    recipe: str | None = None
    batch_size_key: str = "data.init_args.batch_size"
    overrides: list[str] = field(default_factory=list)
    storage: str | None = None
    study_name: str = "sweep"
    output_dir: str = "runs/sweep"
    seed: int = 0
    edge_fraction: float = 0.1
    gns: bool = True
    gns_every: int = 1
    gns_source: Literal["auto", "per_example", "split"] = "auto"
    b_noise_every: int | None = 100
    gns_beta: float = 0.95
    keep_callbacks: bool = False
    b_simple: float | None = None
    nqm: bool = False
    wandb: bool = True
    wandb_trials: bool = False
    report_only: bool = False

    def resolved_mode(self) -> str:
        if self.mode is not None:
            return self.mode
        return "min" if re.search(r"loss|err|perplexity", self.metric) else "max"

    def resolved_max_trials(self) -> int:
        return 3 * self.trials if self.max_trials is None else self.max_trials

    def resolved_storage(self) -> str:
        if self.storage:
            return self.storage
        return f"sqlite:///{Path(self.output_dir).resolve() / 'sweep.db'}"

    def validate(self) -> None:
        """Raise ValueError on any configuration error that can be found without building the recipe."""
        if not self.batch_sizes:
            raise SweepConfigError("sweep.batch_sizes is empty: give e.g. --sweep.batch_sizes [16,32,64].")
        if any(b < 1 for b in self.batch_sizes):
            raise SweepConfigError(f"sweep.batch_sizes must all be >= 1, got {self.batch_sizes}.")
        if len(set(self.batch_sizes)) != len(self.batch_sizes):
            raise SweepConfigError(f"sweep.batch_sizes has duplicates: {self.batch_sizes}.")
        if not self.metric:
            raise SweepConfigError("sweep.metric is empty: name the validation metric to reach, e.g. val/acc.")
        if self.target is None or not math.isfinite(self.target):
            raise SweepConfigError(
                f"sweep.target must be a finite number (the {self.metric} to reach), got {self.target}."
            )
        if self.mode not in (None, "max", "min"):
            raise SweepConfigError(f"sweep.mode must be 'max' or 'min', got {self.mode!r}.")
        self._validate_budget()
        self._validate_search_space()
        self._validate_gns()
        if not 0 <= self.edge_fraction < 0.5:
            raise SweepConfigError(f"sweep.edge_fraction must be in [0, 0.5), got {self.edge_fraction}.")
        if self.recipe is None:
            raise SweepConfigError("no recipe: give --config recipes/<name>.yaml (or sweep.recipe in the sweep YAML).")

    def _validate_budget(self) -> None:
        if self.trials < 1:
            raise SweepConfigError(f"sweep.trials must be >= 1, got {self.trials}.")
        if self.resolved_max_trials() < self.trials:
            raise SweepConfigError(f"sweep.max_trials ({self.max_trials}) must be >= sweep.trials ({self.trials}).")
        if self.patience is not None and self.patience < 1:
            raise SweepConfigError(f"sweep.patience must be >= 1 or null, got {self.patience}.")
        if self.threads is not None and self.threads < 1:
            raise SweepConfigError(f"sweep.threads must be >= 1 or null, got {self.threads}.")
        if self.eval_every < 1 or self.max_steps < 1:
            raise SweepConfigError(f"sweep.eval_every and sweep.max_steps must be >= 1, got {self.eval_every}, "
                             f"{self.max_steps}.")
        if self.max_steps % self.eval_every:
            raise SweepConfigError(
                f"sweep.max_steps ({self.max_steps}) must be a multiple of sweep.eval_every ({self.eval_every}) so "
                "the last step of the budget is evaluated."
            )

    def _validate_search_space(self) -> None:
        if not self.search_space:
            raise SweepConfigError("sweep.search_space is empty: give at least the learning rate, e.g. lr: {low: 1e-3, "
                             "high: 10}.")
        keys = {}
        for name, param in self.search_space.items():
            param.validate(name)
            key = param.config_key(name)
            if key in keys:
                raise SweepConfigError(f"search_space.{name} and search_space.{keys[key]} both set {key}.")
            keys[key] = name
        if self.batch_size_key in keys:
            raise SweepConfigError(
                f"search_space.{keys[self.batch_size_key]} sets the batch size key {self.batch_size_key}."
            )

    def _validate_gns(self) -> None:
        if self.gns_every < 1:
            raise SweepConfigError(f"sweep.gns_every must be >= 1, got {self.gns_every}.")
        if self.b_noise_every is not None and self.b_noise_every < 1:
            raise SweepConfigError(f"sweep.b_noise_every must be >= 1 or null (no B_noise), got {self.b_noise_every}.")
        if not (0 <= self.gns_beta < 1):
            raise SweepConfigError(f"sweep.gns_beta must be in [0, 1), got {self.gns_beta}.")
        if self.b_simple is not None and not (math.isfinite(self.b_simple) and self.b_simple > 0):
            raise SweepConfigError(f"sweep.b_simple must be a finite number > 0 or null, got {self.b_simple}.")
