"""CurvatureSpectrum: Hessian / GGN / empirical-Fisher eigenvalues, trace and density during training.

A thin Lightning adapter over :mod:`lightning_sgd.curvature` (the maths, on hessian-eigenthings): it draws a fixed
probe set once, measures on a schedule and at fit end without disturbing training (BN buffers, modes, RNG, ``.grad``
and what the module logs are left as they were), reads the optimizer's current LR and momentum for the sharpness
ratio, and logs under ``curvature/<operator>/...``. The loss is the module's own ``training_step``
(:class:`lightning_sgd.module_loss.ModuleLoss`). Background: the edge of stability at ``λ_max = 2/η`` (Cohen et al.
2021), ``‖H‖_F ≤ O(√B/η)`` at SGD minima (Wu et al. 2018), ``C ≈ H`` in the noisy quadratic model (Zhang et al.
2019, App. E.2).
"""

from __future__ import annotations

import ast
import functools
import math
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.rank_zero import rank_zero_info, rank_zero_only, rank_zero_warn
from torch.utils.data import DataLoader, IterableDataset
from typing_extensions import override

from lightning_sgd.checks import check_bool, check_choice, check_float, check_int, missing_state_keys
from lightning_sgd.compat import PACKAGES, Callback, import_from
from lightning_sgd.core import log_metrics
from lightning_sgd.curvature import (
    OPERATORS,
    CheckedOperator,
    CurvatureError,
    CurvatureResult,
    MeasureConfig,
    check_k,
    frobenius_bound,
    make_operator,
    measure,
    num_parameters,
    optimizer_state,
    per_example_gradients,
    preserved_training_state,
    probe_indices,
    projection_variance,
    sharpness,
    twice_differentiable_attention,
)
from lightning_sgd.module_loss import ModuleLoss, ProtocolRequired
from lightning_sgd.schedules import Schedule, as_schedule

#: W&B logger classes of both Lightning packages (each Trainer builds its own package's).
WANDB_LOGGERS: tuple[type, ...] = tuple(import_from(package, "loggers.WandbLogger") for package in PACKAGES)


def _state_key_config(key: Any) -> dict[str, Any] | None:
    """The arguments in a CurvatureSpectrum ``state_key`` (``CurvatureSpectrum{'operator': ..., 'k': ..., ...}``),
    ``None`` for any other key."""
    prefix = "CurvatureSpectrum{"
    if not isinstance(key, str) or not key.startswith(prefix):
        return None
    try:
        config = ast.literal_eval(key[len(prefix) - 1:])
    except (ValueError, SyntaxError):
        return None
    return config if isinstance(config, dict) else None


class CurvatureSpectrum(Callback):
    """Curvature eigenspectrum of the training loss on a fixed probe set, measured on a schedule.

    Each measurement logs, under ``curvature/<operator>/``: ``eig_<i>`` (top-k Lanczos Ritz values, descending),
    ``truncated`` (1 when the budget cut Lanczos short), ``trace`` and ``trace_stderr`` (Hutch++), ``frobenius``
    (``sqrt(tr H²)``), ``sharpness`` (``λ_max·η``), ``sharpness_threshold`` (``2(1+β)``) and ``sharpness_ratio``,
    ``frobenius_bound`` (``‖H‖_F·η/√B``), ``alignment_corr``/``alignment_slope`` (log-log fit of ``Var(vᵀg_i)``
    on ``vᵀHv``) and the pairs themselves, ``alignment/curvature_<j>`` and ``alignment/variance_<j>``, ``skipped``
    (1 when a measurement could not be made: non-finite curvature, failure) and ``skipped_<stage>`` (1 when the
    budget left a stage out). Diagnostics go under ``diag/curvature/<operator>/``, out of the main view:
    ``residual_<i>`` (``‖Hv − λv‖``), ``lanczos_iterations``, ``matvecs`` and ``seconds``. With a W&B logger (of
    either Lightning package) it also logs the spectrum as a histogram, the SLQ density as a line plot and the
    alignment pairs as a table and a scatter plot of their log10 values.

    It works on any LightningModule with automatic optimization: the loss is the module's ``training_step`` (run
    with ``self.log`` muted, the RNG forked and buffers restored), on batches of any structure, and every
    operator-vector product runs ``F.scaled_dot_product_attention`` on its math kernel (the fused kernels are not
    twice differentiable). ``operator="ggn"`` alone needs the module to implement ``split_batch``/``forward``/
    ``loss``: the GGN ``Jᵀ H_ℓ J`` differentiates the network's outputs and the loss of those outputs separately,
    which ``training_step`` does not expose; without them :class:`~lightning_sgd.module_loss.ProtocolRequired` is
    raised at setup, and a loss linear in the outputs (log-probabilities with ``nll_loss``, whose GGN is 0) is
    refused before the first measurement. ``"empirical_fisher"`` and ``alignment`` use per-example gradients of the
    loss and check once that it is a mean over examples.

    Args:
        schedule: when to measure: every n optimizer steps (int) or a :class:`lightning_sgd.schedules.Schedule`;
            step 0 (before training) is measured when the schedule includes it.
        operator: ``"hessian"``, ``"ggn"`` (the true Fisher for softmax cross-entropy; needs the protocol) or
            ``"empirical_fisher"``.
        k: number of top eigenvalues.
        lanczos_iterations: Krylov dimension (>= k); ``None``: ``max(2k, k + 20)``.
        trace_matvecs: Hutch++ matvecs for the trace (0: off).
        frobenius_matvecs: Hutch++ samples of ``H²`` for ``‖H‖_F`` (2 matvecs each; 0: off).
        density_runs: stochastic Lanczos quadrature runs for the spectral density (0: off).
        density_steps: Lanczos steps per SLQ run.
        alignment: the NQM ``C ≈ H`` check on the top-k eigenvectors and k random directions (per-example
            gradients over the probe set).
        probe_batches: number of probe batches per rank (drawn once from the training set with ``seed``).
        probe_batch_size: examples per probe batch; ``None``: the training DataLoader's batch size.
        mode: ``"eval"`` (default: BN running statistics, no dropout) or ``"train"`` (batch statistics and
            dropout with masks fixed across matvecs).
        matvec_budget: matrix-vector products per measurement (the probe product included); Lanczos is truncated
            to fit and later stages that do not fit are skipped. Counted in products, so a measurement is the same
            on a busy and an idle machine. ``None``: no cap (each stage runs its configured products).
        time_budget: seconds per measurement, opt-in, with the same effect; what fits depends on the machine's load,
            so two runs can measure different things (``truncated``/``skipped_<stage>`` say so).
        at_fit_end: also measure when training ends.
        seed: probe-set draw, Lanczos start vector and random probes (the same every measurement).
    """

    def __init__(
        self,
        schedule: int | Schedule = 100,
        operator: Literal["hessian", "ggn", "empirical_fisher"] = "hessian",
        k: int = 5,
        lanczos_iterations: int | None = None,
        trace_matvecs: int = 30,
        frobenius_matvecs: int = 0,
        density_runs: int = 0,
        density_steps: int = 30,
        alignment: bool = False,
        probe_batches: int = 1,
        probe_batch_size: int | None = None,
        mode: Literal["eval", "train"] = "eval",
        matvec_budget: int | None = None,
        time_budget: float | None = None,
        at_fit_end: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        who = "CurvatureSpectrum"
        self.schedule = as_schedule(schedule, who, "schedule")
        self.operator = check_choice(who, "operator", operator, OPERATORS)
        mode = check_choice(who, "mode", mode, ("eval", "train"))
        k = check_int(who, "k", k, minimum=1)
        lanczos_iterations = check_int(who, "lanczos_iterations", lanczos_iterations, minimum=k, optional=True,
                                       hint="(the Krylov dimension must be >= k.)")
        for name, value in (("trace_matvecs", trace_matvecs), ("frobenius_matvecs", frobenius_matvecs),
                            ("density_runs", density_runs)):
            check_int(who, name, value, minimum=0, hint="(0 switches it off.)")
        check_int(who, "density_steps", density_steps, minimum=2)
        check_bool(who, "alignment", alignment)
        check_bool(who, "at_fit_end", at_fit_end)
        check_int(who, "probe_batches", probe_batches, minimum=1, hint="(with 0 the probe set is empty.)")
        check_int(who, "probe_batch_size", probe_batch_size, minimum=1, optional=True)
        check_int(who, "matvec_budget", matvec_budget, minimum=2, optional=True,
                  hint="(products per measurement, the probe included; None: no cap.)")
        time_budget = check_float(who, "time_budget", time_budget, low=0.0, low_open=True, optional=True,
                                  hint="(seconds per measurement; None: no budget.)")
        check_int(who, "seed", seed)
        self.config = MeasureConfig(
            k=k, lanczos_iterations=lanczos_iterations, trace_matvecs=trace_matvecs,
            frobenius_matvecs=frobenius_matvecs, density_runs=density_runs, density_steps=density_steps,
            alignment=alignment, matvec_budget=matvec_budget, time_budget=time_budget, seed=seed)
        try:
            self.config.validate()
        except ValueError as err:
            raise ValueError(f"CurvatureSpectrum: {err}") from None
        self.probe_batches, self.probe_batch_size = probe_batches, probe_batch_size
        self.mode, self.at_fit_end, self.seed = mode, at_fit_end, seed
        self.probe: list[Any] = []  # this rank's probe batches, on the module's device
        self.history: list[dict[str, Any]] = []  # one summary dict per measurement (step, eigenvalues, trace, ...)
        self.last_result: CurvatureResult | None = None
        self._last_step: int | None = None
        self._global_batch_size: int | None = None
        self._warned_adaptive = False
        self._loss: ModuleLoss | None = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(operator=self.operator, k=self.config.k, mode=self.mode)

    # ------------------------------------------------------------------------------------------------- hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._loss = self._module_loss(pl_module)
        check_k(self.config.k, num_parameters(pl_module))

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.probe = self._draw_probe(trainer, pl_module)
        self._validate_operator(pl_module)  # a clear error now rather than a skip at every measurement
        if self.schedule(trainer.global_step) and self._last_step != trainer.global_step:
            self._measure(trainer, pl_module)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step != self._last_step and self.schedule(step):
            self._measure(trainer, pl_module)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.at_fit_end and self.probe and self._last_step != trainer.global_step:
            self._measure(trainer, pl_module)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self._last_step, "history": self.history, "seed": self.seed,
                "probe_batches": self.probe_batches, "probe_batch_size": self.probe_batch_size}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the measurement history. ``"history"`` and ``"last_step"`` are required; a state from a version
        without ``seed``/``probe_batches``/``probe_batch_size`` is taken to match this callback's."""
        missing_state_keys("CurvatureSpectrum", state_dict, ["history", "last_step"], self.state_key)
        self._last_step = state_dict["last_step"]
        self.history = list(state_dict["history"])
        changed = [f"{name}={state_dict[name]!r} -> {getattr(self, name)!r}"
                   for name in ("seed", "probe_batches", "probe_batch_size")
                   if name in state_dict and state_dict[name] != getattr(self, name)]
        if changed:
            rank_zero_warn(f"CurvatureSpectrum: resuming with another probe set ({', '.join(changed)}); values before "
                           "and after the resume are not comparable.")

    @override
    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        """Adopt the state this callback saved with another ``k``: Lightning looks states up by ``state_key``, which
        includes ``k`` (so several CurvatureSpectrum callbacks can run side by side), and would otherwise drop the
        history without a word. The history is kept: each entry is one measurement's own summary (its
        ``eig_0..eig_{k-1}``), so entries of the old k stay valid and the new k applies from now on, with a warning.
        Runs before Lightning's ``load_state_dict`` pass, which finds no state under this key."""
        states = checkpoint.get("callbacks") or {}
        if self.state_key in states:
            return
        taken = {cb.state_key for cb in trainer.callbacks}
        candidates = []
        for key in states:
            config = _state_key_config(key)
            if (key not in taken and config is not None and config.get("operator") == self.operator
                    and config.get("mode") == self.mode and config.get("k") != self.config.k):
                candidates.append((key, config.get("k")))
        if not candidates:
            return
        if len(candidates) > 1:
            raise ValueError(f"CurvatureSpectrum(k={self.config.k}): the checkpoint holds states of several "
                             f"CurvatureSpectrum callbacks with operator={self.operator!r}, mode={self.mode!r} and "
                             f"another k ({sorted(k for _, k in candidates)}); it cannot tell which one to continue. "
                             "Resume with the k it was saved with.")
        key, saved_k = candidates[0]
        self.load_state_dict(states[key])
        rank_zero_warn(f"CurvatureSpectrum: the checkpoint's state was saved with k={saved_k}; this callback has "
                       f"k={self.config.k}. Its history ({len(self.history)} measurements) is kept and the top "
                       f"{self.config.k} eigenvalues are measured from now on.")

    # ----------------------------------------------------------------------------------------------- probe set
    def _draw_probe(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[Any]:
        loader = trainer.train_dataloader
        if isinstance(loader, (list, tuple)) and len(loader) == 1:
            loader = loader[0]
        if not isinstance(loader, DataLoader):
            raise TypeError("CurvatureSpectrum draws its probe set from a single training DataLoader; got "
                            f"{type(loader).__name__}.")
        batch_size = self.probe_batch_size or loader.batch_size
        if batch_size is None:
            raise ValueError("CurvatureSpectrum: the training DataLoader has no batch_size (custom batch_sampler); "
                             "set probe_batch_size.")
        world, rank = trainer.world_size, trainer.global_rank
        if loader.batch_size is not None:
            self._global_batch_size = loader.batch_size * world * trainer.accumulate_grad_batches
        with torch.random.fork_rng(devices=[]):  # dataset transforms may draw random numbers: keep training's
            dataset = loader.dataset
            if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
                raise TypeError("CurvatureSpectrum needs a map-style training dataset (with __len__) to draw a "
                                "fixed probe set.")
            chunks = probe_indices(len(dataset), self.probe_batches, batch_size, seed=self.seed, rank=rank,
                                   world_size=world)
            batches = [loader.collate_fn([dataset[i] for i in chunk]) for chunk in chunks]
        return [trainer.precision_plugin.convert_input(trainer.strategy.batch_to_device(b)) for b in batches]

    def _module_loss(self, pl_module: pl.LightningModule) -> ModuleLoss:
        """The module's loss as the measurements compute it; refuses, at setup, what cannot work."""
        ggn = self.operator == "ggn"
        try:
            loss = ModuleLoss(pl_module, f"CurvatureSpectrum(operator={self.operator!r})",
                              use_protocol=True if ggn else None)
        except ProtocolRequired as err:
            raise ProtocolRequired(f"{err} Or use operator='hessian' or 'empirical_fisher', which need only "
                                   "`training_step`.") from None
        loss.check_usable()
        return loss

    def _validate_operator(self, pl_module: pl.LightningModule) -> None:
        """One matvec before training: a loss that is not twice differentiable, linear in the outputs (GGN) or not a
        mean over examples (per-example quantities) fails here, with a clear error."""
        if self._loss is None:  # setup() builds it; a direct call may not have run it
            self._loss = self._module_loss(pl_module)
        if self.operator == "empirical_fisher" or self.config.alignment:
            self._loss.check_mean(self.probe[0])
            params = {name: p for name, p in pl_module.named_parameters() if p.requires_grad}
            with preserved_training_state(pl_module, self.mode), self._loss.isolated(), \
                    twice_differentiable_attention():
                try:  # per-example gradients of training_step (vmap, else a loop), on a few probe examples
                    next(per_example_gradients(self._loss, params, self.probe[0], chunk_size=2))
                except RuntimeError as err:
                    raise RuntimeError(
                        f"CurvatureSpectrum(operator={self.operator!r}, alignment={self.config.alignment}) needs "
                        f"per-example gradients of the loss, which failed on a probe batch of one example: {err}. "
                        "Use operator='hessian' with alignment=False.") from err
        with preserved_training_state(pl_module, self.mode):
            op = CheckedOperator(make_operator(pl_module, self.probe, self.operator, loss=self._loss),
                                 fixed_seed=self.seed if self.mode == "train" else None)
            try:
                op.matvec(torch.zeros(op.size, dtype=op.dtype, device=op.device))
            except CurvatureError as err:
                if "NaN/Inf" in str(err):
                    return  # non-finite at these weights: measurements will log skips
                raise type(err)(f"CurvatureSpectrum(operator={self.operator!r}, mode={self.mode!r}): {err}") from err
            except RuntimeError as err:
                raise RuntimeError(
                    f"CurvatureSpectrum(operator={self.operator!r}, mode={self.mode!r}) cannot build its operator "
                    f"on this model: {err}"
                ) from err

    # --------------------------------------------------------------------------------------------- measuring
    def _measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """One measurement; overridable. Never raises: a failure is logged as a skip and training goes on."""
        step = trainer.global_step
        self._last_step = step
        prefix = f"curvature/{self.operator}"
        try:
            with preserved_training_state(pl_module, self.mode):
                op = CheckedOperator(make_operator(pl_module, self.probe, self.operator, loss=self._loss),
                                     fixed_seed=self.seed if self.mode == "train" else None)
                variance_fn = functools.partial(projection_variance, pl_module, self.probe, loss=self._loss)
                result = measure(op, self.config, name=self.operator, variance_fn=variance_fn)
        except Exception as err:  # noqa: BLE001 - a measurement must never end the run
            rank_zero_warn(f"CurvatureSpectrum: skipped the measurement at step {step}: {err}")
            self._log(trainer, {f"{prefix}/skipped": 1.0}, step)
            return
        if trainer.world_size > 1:  # every rank computed the same numbers; make them identical bit for bit
            result = trainer.strategy.broadcast(result, src=0)
        self.last_result = result
        metrics = self._metrics(trainer, result)
        self.history.append({"step": step, **{k.rsplit("/", 1)[-1]: v for k, v in metrics.items()}})
        if result.truncated:
            rank_zero_info(f"CurvatureSpectrum: the budget ({self._budget_text()}) truncated Lanczos to "
                           f"{result.lanczos_iterations} iterations at step {step}.")
        for stage, why in result.skipped.items():
            rank_zero_info(f"CurvatureSpectrum: skipped {stage} at step {step}: {why}")
        self._log(trainer, metrics, step)
        self._log_wandb(trainer, result, step)

    def _budget_text(self) -> str:
        parts = []
        if self.config.matvec_budget is not None:
            parts.append(f"{self.config.matvec_budget} matvecs")
        if self.config.time_budget is not None:
            parts.append(f"{self.config.time_budget}s")
        return " / ".join(parts)

    def _metrics(self, trainer: pl.Trainer, result: CurvatureResult) -> dict[str, float]:
        prefix = f"curvature/{self.operator}"
        diag = f"diag/curvature/{self.operator}"  # diagnostics: out of the main view in W&B
        out: dict[str, float] = {f"{prefix}/skipped": 0.0, f"{diag}/seconds": result.seconds,
                                 f"{diag}/matvecs": float(result.matvecs),
                                 f"{prefix}/truncated": float(result.truncated)}
        for stage in result.skipped:  # stages the budget (or a missing input) left out this time
            out[f"{prefix}/skipped_{stage}"] = 1.0
        for i, (value, residual) in enumerate(zip(result.eigenvalues, result.residuals)):
            out[f"{prefix}/eig_{i}"] = value
            out[f"{diag}/residual_{i}"] = residual
        if result.eigenvalues:
            out[f"{diag}/lanczos_iterations"] = float(result.lanczos_iterations)
        if result.trace is not None:
            out[f"{prefix}/trace"] = result.trace
            out[f"{prefix}/trace_stderr"] = result.trace_stderr
        if result.frobenius is not None:
            out[f"{prefix}/frobenius"] = result.frobenius
            out[f"{prefix}/frobenius_stderr"] = result.frobenius_stderr
        if result.alignment is not None:
            out[f"{prefix}/alignment_corr"] = result.alignment.loglog_corr
            out[f"{prefix}/alignment_slope"] = result.alignment.loglog_slope
            for j, (curv, var) in enumerate(zip(result.alignment.curvature, result.alignment.grad_variance)):
                out[f"{prefix}/alignment/curvature_{j}"] = curv  # the pairs, for the report's log-log scatter
                out[f"{prefix}/alignment/variance_{j}"] = var
        if trainer.optimizers:
            state = optimizer_state(trainer.optimizers[0])
            if state.adaptive and not self._warned_adaptive:
                self._warned_adaptive = True  # a note, not a problem: the demo recipe trains with Adam
                rank_zero_info("CurvatureSpectrum: the optimizer is adaptive (Adam-like); sharpness λ_max·η is "
                               "logged, but its threshold 2(1+β) holds for (heavy-ball) SGD only.")
            if result.lambda_max is not None:
                value, threshold = sharpness(result.lambda_max, state)
                out[f"{prefix}/sharpness"] = value
                out[f"{prefix}/sharpness_threshold"] = threshold
                out[f"{prefix}/sharpness_ratio"] = value / threshold
            if result.frobenius is not None and self._global_batch_size:
                out[f"{prefix}/frobenius_bound"] = frobenius_bound(result.frobenius, state.lr,
                                                                    self._global_batch_size)
        return {k: float(v) for k, v in out.items() if v is not None and not math.isnan(float(v))}

    # ---------------------------------------------------------------------------------------------- logging
    @staticmethod
    def _log(trainer: pl.Trainer, metrics: dict[str, float], step: int) -> None:
        log_metrics(trainer, metrics, step)  # not self.log: it is not allowed in on_train_end

    @rank_zero_only
    def _log_wandb(self, trainer: pl.Trainer, result: CurvatureResult, step: int) -> None:
        loggers = [lg for lg in trainer.loggers if isinstance(lg, WANDB_LOGGERS)]
        if not loggers:
            return
        try:
            import wandb

            prefix = f"curvature/{self.operator}"
            payload: dict[str, Any] = {"trainer/global_step": step}
            if result.eigenvalues:
                payload[f"{prefix}/spectrum"] = wandb.Histogram(result.eigenvalues)
            if result.density is not None:
                table = wandb.Table(data=list(zip(result.density_grid, result.density)),
                                    columns=["eigenvalue", "density"])
                payload[f"{prefix}/density"] = wandb.plot.line(table, "eigenvalue", "density",
                                                               title=f"{self.operator} spectral density")
            if result.alignment is not None:
                a = result.alignment
                log10 = lambda x: math.log10(x) if x > 0 else None  # noqa: E731 - W&B scatters have no log axes
                table = wandb.Table(columns=["step", "direction", "kind", "curvature", "grad_variance",
                                             "log10_curvature", "log10_grad_variance"],
                                    data=[[step, i, kind, c, v, log10(c), log10(v)] for i, (kind, c, v)
                                          in enumerate(zip(a.kind, a.curvature, a.grad_variance))])
                payload[f"{prefix}/alignment_table"] = table
                payload[f"{prefix}/alignment"] = wandb.plot.scatter(
                    table, "log10_curvature", "log10_grad_variance", title="log10 vᵀHv vs log10 Var(vᵀg_i)")
            for logger in loggers:
                experiment = logger.experiment
                if experiment:
                    experiment.log(payload)
        except Exception as err:  # noqa: BLE001 - plots are extras; never end the run over them
            rank_zero_warn(f"CurvatureSpectrum: W&B plots failed at step {step}: {err}")
