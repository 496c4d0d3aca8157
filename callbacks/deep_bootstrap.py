"""DeepBootstrap: the real world and its fresh-data twin in one training job (Nakkiran et al., ICLR 2021).

Draws on Nakkiran, Neyshabur & Sedghi, "The Deep Bootstrap Framework: Good Online Learners are Good Offline
Generalizers" (ICLR 2021), where the two worlds are two separate training runs; here they run in one job, the ideal
world being a :class:`lightning_sgd.twin.Twin` the callback drives. The decomposition: docs/theory.md §6. Pure
helpers (fresh-sample streams, pools, metrics, plot) live in :mod:`lightning_sgd.bootstrap`.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Iterator
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from pytorch_lightning.utilities.rank_zero import rank_zero_only
from torch.utils.data import DataLoader, IterableDataset

from lightning_sgd.batches import batch_size
from lightning_sgd.bootstrap import (
    FRESH_BATCH_METHOD,
    FRESH_POOL_METHOD,
    PoolSampler,
    PrivateRNG,
    evaluate,
    plot_bootstrap,
)
from lightning_sgd.checks import check_bool, check_choice, check_int
from lightning_sgd.compat import PACKAGES, Callback, import_from
from lightning_sgd.core import log_metrics
from lightning_sgd.module_loss import ModuleLoss, muted_logging
from lightning_sgd.schedules import LogSpaced, Schedule, as_schedule
from lightning_sgd.twin import Twin

try:  # Lightning >= 2.1 marks hooks with typing_extensions.override; keep working without it
    from typing_extensions import override
except ImportError:  # pragma: no cover
    def override(fn):  # type: ignore[no-redef]
        return fn


class DeepBootstrap(Callback):
    r"""Train an "ideal world" twin on fresh samples next to the real run and log the bootstrap gap.

    Works with any LightningModule with automatic optimization and one optimizer. At fit start the module is
    cloned (bit-identical initial weights) and the clone gets its own optimizer and LR schedulers from its
    ``configure_optimizers``. After every optimizer step of the real world, the twin takes one step with its own
    ``training_step`` (logging muted) on the next examples of a fresh-sample stream, with the same batch size
    (micro-batch for micro-batch under gradient accumulation), the same gradient clipping and a scheduler clock kept
    in step with the real one, so after ``t`` real steps the twin has taken exactly ``t`` steps. On ``schedule``
    (log-spaced by default, dense early) both worlds are evaluated on the ``split`` set and logged:

    .. math:: \text{TestError}(f_t) = \text{TestError}(f^{iid}_t) +
              \underbrace{[\text{TestError}(f_t) - \text{TestError}(f^{iid}_t)]}_{\texttt{bootstrap/gap}}

    Logged keys (``{split}`` is ``test`` by default):

    - ``bootstrap/real_{split}_error``, ``bootstrap/ideal_{split}_error``, ``bootstrap/gap`` (real − ideal error), and
      the same for the soft error 1 − p_correct (``..._soft_error``, ``bootstrap/soft_gap``) and the loss
      (``..._loss``, ``bootstrap/loss_gap``). The loss is the module's own training loss (its ``training_step``, in
      eval mode; :func:`lightning_sgd.bootstrap.evaluate`). Error and soft error need the network's outputs apart
      from the loss: they are logged when the module implements the optional ``split_batch``/``forward``/``loss``
      protocol with ``(B, C)`` logits and integer labels; otherwise only losses are logged and ``bootstrap/gap`` is
      the loss gap.
    - ``bootstrap/real_train_error`` (+ ``_soft_error``, ``_loss``): the real world on (up to
      ``max_train_eval_examples`` of) its own training set.
    - ``bootstrap/online_loss`` (+ ``_error``, ``_soft_error``): progressive validation of the real world, i.e. its
      loss (eval mode) on each incoming batch *before* the update on it, averaged over the batches since the previous
      measurement, first epoch only (no example has been reused yet, so it is an unbiased test-loss estimate).
    - ``bootstrap/ideal_online_loss``: the twin's training loss on its fresh batches (always an online estimate).
    - ``bootstrap/twin_diverged`` = 1 at the step where the twin's loss became non-finite.

    At the end of fit a PNG of the two error curves and the real train error (the losses when no error is measured)
    is written next to the logs (``deep_bootstrap.png`` in the CSV logger's folder, else ``trainer.log_dir``) and
    logged to W&B when a W&B logger is attached. The measurements are also kept in :attr:`history`.

    **Fresh samples.** The DataModule must implement one of the two methods of the fresh-sample protocol of
    :mod:`lightning_sgd.bootstrap`: ``fresh_batch(start, size)`` (an unlimited stream, e.g.
    :class:`~lightning_sgd.recipes.MNIST1DDataModule`) or ``fresh_pool()`` (a held-out dataset of at least
    ``steps × batch_size`` examples; when it runs out a warning says how many steps it covered and the ideal world
    stops there).

    **Cost.** One extra training step (forward + backward + optimizer step) per real step, plus one forward over the
    evaluation sets per measurement and one forward per real batch in the first epoch (``online``). Running the twin
    only every k-th step is not offered: the two worlds would then no longer be aligned step for step, which is the
    whole comparison. Memory: a second copy of the model and optimizer state.

    **Isolation.** The twin never changes the real world's trajectory: everything the callback runs uses a private
    torch RNG stream (:class:`~lightning_sgd.bootstrap.PrivateRNG`, seeded by ``seed`` and checkpointed), so the
    twin's dropout or the evaluation never consume the global RNG, and the real model is evaluated in eval mode
    under ``no_grad`` (BatchNorm statistics untouched) with its logging muted, so what the user's ``training_step``
    logs is unchanged. A twin that diverges is logged, warned about once and stopped; the real run goes on.
    Checkpoints carry the twin, its optimizer and schedulers, its RNG, the stream position and the history, so a
    resumed run continues both worlds.

    Limits: automatic optimization with one optimizer (checked at setup); ``ReduceLROnPlateau`` is refused (it would
    follow the real world's metric); no AMP grad scaler for the twin (bf16 and fp32 are fine). Under DDP each rank's
    twin reads its own slice of the fresh stream and the twin's gradients are averaged across ranks; measurements
    run on rank 0. Every stop of the twin (a non-finite training loss, a non-finite evaluation loss found by rank 0,
    a fresh pool that runs out for any rank's share) is agreed by all ranks (one all-reduce of a flag) before it
    takes effect, so all ranks stop at the same step and none waits for another in the twin's gradient all-reduce.

    Args:
        schedule: when to measure (global step ``t`` after ``t`` optimizer steps; step 0 is the common initial
            point); an int means every n steps. Default: ``LogSpaced(0, 10**7, per_decade=10)``.
        split: ``"test"`` or ``"val"``: which of the DataModule's loaders is the held-out evaluation set.
        max_eval_examples: evaluate on at most this many examples of ``split`` (``None``: all).
        max_train_eval_examples: the real train error uses at most this many training examples (``None``: all).
        online: log progressive validation of the real world during its first epoch.
        seed: seeds the twin's private RNG (dropout etc.) and the order in which a ``fresh_pool`` is consumed.
        plot: write the PNG at the end of fit.

    Example::

        trainer = pl.Trainer(max_steps=3000, callbacks=[DeepBootstrap()])
        trainer.fit(ClassificationModule(MNIST1DCNN()), datamodule=MNIST1DDataModule(num_train=1000))
    """

    def __init__(
        self,
        schedule: int | Schedule | None = None,
        split: str = "test",
        max_eval_examples: int | None = None,
        max_train_eval_examples: int | None = 10_000,
        online: bool = True,
        seed: int = 0,
        plot: bool = True,
    ) -> None:
        who = "DeepBootstrap"
        check_choice(who, "split", split, ("test", "val"))
        check_int(who, "max_eval_examples", max_eval_examples, minimum=1, optional=True)
        check_int(who, "max_train_eval_examples", max_train_eval_examples, minimum=1, optional=True)
        self.schedule = as_schedule(schedule if schedule is not None else LogSpaced(0, 10**7, per_decade=10), who,
                                    "schedule")
        self.split, self.seed = split, check_int(who, "seed", seed)
        self.online, self.plot = check_bool(who, "online", online), check_bool(who, "plot", plot)
        self.max_eval_examples, self.max_train_eval_examples = max_eval_examples, max_train_eval_examples
        self.history: list[dict[str, float]] = []
        self.world: Twin | None = None  # the ideal world (lightning_sgd.twin.Twin), from on_fit_start
        self._loss: ModuleLoss | None = None  # the real world's loss
        self.plot_path: str | None = None
        self._reset_run_state()

    # --------------------------------------------------------------------------------------------- public values
    @property
    def twin(self) -> pl.LightningModule | None:
        """The ideal world's model (``None`` before the fit starts)."""
        return None if self.world is None else self.world.module  # type: ignore[return-value]

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        """The ideal world's optimizer."""
        return None if self.world is None else self.world.optimizer

    @property
    def twin_steps(self) -> int:
        """Optimizer steps the ideal world has taken."""
        return 0 if self.world is None else self.world.steps

    @property
    def fresh_position(self) -> int:
        """Examples of the fresh-sample stream consumed so far (all ranks together)."""
        return self._fresh_pos

    @property
    def stopped(self) -> str | None:
        """Why the ideal world stopped (``"diverged at step t"``, ``"fresh pool exhausted ..."``), ``None`` while it
        runs; the same on every rank."""
        return self._stopped

    def _reset_run_state(self) -> None:
        self._source: Any = None  # (start, size) -> CPU batch
        self._pool_size: int | None = None
        self._pool_dataset: Any = None
        self._eval_loader: Any = None
        self._train_eval: Any = None
        self._rng: PrivateRNG | None = None
        self._pending: dict[str, Any] | None = None
        self._fresh_pos = 0  # examples of the fresh stream consumed (all ranks together)
        self._last_step = 0  # the real world's global_step the twin has caught up with
        self._micro_sizes: list[int] = []  # real micro-batch sizes since the last optimizer step
        self._sched_clock: list[int] = []  # the real schedulers' clocks when the current real step began
        self._online: dict[str, float] = {}
        self._twin_online: dict[str, float] = {}
        self._stopped: str | None = None  # why the twin stopped; the same on every rank (decisions are agreed)
        self._measured_at: int | None = None  # global step of the last measurement, on every rank (not only rank 0)

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(split=self.split, seed=self.seed)

    # ------------------------------------------------------------------------------------------------- hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._loss = ModuleLoss(pl_module, "DeepBootstrap")
        if not pl_module.automatic_optimization:
            raise ValueError(  # a ValueError, as every other callback's refusal of manual optimization
                "DeepBootstrap trains the twin like Lightning's automatic optimization (one optimizer stepped on "
                f"training_step's loss); {type(pl_module).__name__} uses manual optimization (its training_step steps "
                "the optimizers itself), which the twin cannot mirror. Remove DeepBootstrap from this Trainer.")
        pending = self._pending
        self._reset_run_state()
        self._pending = pending
        self._rng = PrivateRNG(self.seed)  # CPU until on_fit_start knows the device
        dm = trainer.datamodule
        has_stream = callable(getattr(dm, FRESH_BATCH_METHOD, None))
        has_pool = callable(getattr(dm, FRESH_POOL_METHOD, None))
        if dm is None or not (has_stream or has_pool):
            name = "no DataModule" if dm is None else type(dm).__name__
            raise MisconfigurationException(
                f"DeepBootstrap needs fresh training samples for the ideal-world twin, but got {name}. Pass a "
                "LightningDataModule (trainer.fit(model, datamodule=...)) that implements either "
                f"`{FRESH_BATCH_METHOD}(start, size) -> batch` (an unlimited stream of new i.i.d. examples, a pure "
                f"function of its arguments) or `{FRESH_POOL_METHOD}() -> Dataset` (a held-out pool of at least "
                "steps x batch_size examples, e.g. from lightning_sgd.bootstrap.split_pool). "
                "See lightning_sgd.bootstrap for the protocol; MNIST1DDataModule implements fresh_batch."
            )
        with self._rng:
            self._eval_loader = self._held_out_loader(dm)
            if has_stream:
                self._source = getattr(dm, FRESH_BATCH_METHOD)
            else:
                self._pool_dataset = getattr(dm, FRESH_POOL_METHOD)()

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if pl_module.device.type == "cuda":  # the strategy has moved the model: keep CUDA draws private too
            self._rng = PrivateRNG(self.seed, pl_module.device)
        def configure(twin: pl.LightningModule) -> Any:
            with _attached(twin, trainer):  # configure_optimizers may read trainer.estimated_stepping_batches
                return twin.configure_optimizers()

        with self._rng:
            try:  # the copy drops the LightningModule's trainer reference
                self.world = Twin.clone(pl_module, configure)
            except ValueError as err:
                raise MisconfigurationException(f"DeepBootstrap: {err}") from err
        self.world.loss = ModuleLoss(self.world.module, "DeepBootstrap")
        self._last_step = trainer.global_step
        if self._pending is not None:
            self._apply_state(self._pending)
            self._pending = None

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        real_configs = trainer.lr_scheduler_configs
        assert self.world is not None
        if len(real_configs) != len(self.world.schedulers):
            raise MisconfigurationException(
                f"DeepBootstrap: the twin got {len(self.world.schedulers)} LR schedulers from configure_optimizers but "
                f"the real run has {len(real_configs)}; configure_optimizers must build the same schedule every call."
            )
        loader = trainer.train_dataloader
        dataset = getattr(loader, "dataset", None)
        collate = getattr(loader, "collate_fn", None) or torch.utils.data.default_collate
        if self._source is None:
            pool = PoolSampler(self._pool_dataset, seed=self.seed, collate_fn=collate)
            self._source, self._pool_size = pool.take, len(pool)
        if dataset is not None and not isinstance(dataset, IterableDataset):
            self._train_eval = DataLoader(dataset, batch_size=self._eval_batch_size(), shuffle=False,
                                          collate_fn=collate)
        if trainer.global_step == 0 and self.schedule(0) and self._measured_at is None:
            self._measure(trainer, pl_module)

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if not self._micro_sizes:  # a new real optimizer step begins: remember the schedulers' clocks
            self._sched_clock = _clocks(trainer)
        size = batch_size(batch, "DeepBootstrap")
        self._micro_sizes.append(size)
        if self.online and trainer.current_epoch == 0:
            assert self._loss is not None
            with self._rng:
                values = evaluate(self._loss, [batch])
            _accumulate(self._online, values, size)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step == self._last_step:
            return  # accumulating gradients, or the real step was skipped: the twin waits too
        self._last_step = trainer.global_step
        with self._rng:
            self._twin_step(trainer, pl_module)
        self._micro_sizes = []
        if self.schedule(trainer.global_step):
            self._measure(trainer, pl_module)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._stopped is None and self.world is not None:  # an epoch-interval scheduler may have stepped after
            self.world.sync_schedulers(_clocks(trainer))  # the last step
        if self._measured_at != trainer.global_step:  # decided alike on every rank: _measure synchronizes
            self._measure(trainer, pl_module)  # the curves always end at the last step
        if self.plot:
            self._write_plot(trainer)

    # ------------------------------------------------------------------------------------------------ checkpoint
    @override
    def state_dict(self) -> dict[str, Any]:
        if self.world is None or self._rng is None:
            return {}
        world = self.world.state_dict()
        return {  # the layout of earlier versions (twin, optimizer, schedulers, twin_steps at the top level)
            "twin": world["module"],
            "optimizer": world["optimizer"],
            "schedulers": world["schedulers"],
            "rng": self._rng.state_dict(),
            "fresh_pos": self._fresh_pos,
            "twin_steps": world["steps"],
            "stopped": self._stopped,
            "history": [dict(h) for h in self.history],
            "online": dict(self._online),
            "twin_online": dict(self._twin_online),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self.world is None:
            self._pending = state_dict  # restored before on_fit_start: applied once the twin exists
        else:
            self._apply_state(state_dict)

    def _apply_state(self, state: dict[str, Any]) -> None:
        assert self.world is not None and self._rng is not None
        self.world.load_state_dict({"module": state["twin"], "optimizer": state["optimizer"],
                                    "schedulers": state["schedulers"], "steps": state["twin_steps"]})
        self._rng.load_state_dict(state["rng"])
        self._fresh_pos, self._stopped = state["fresh_pos"], state["stopped"]
        self.history = [dict(h) for h in state["history"]]
        self._measured_at = int(self.history[-1]["step"]) if self.history else None  # rank 0's history, on all ranks
        self._online, self._twin_online = dict(state["online"]), dict(state["twin_online"])

    # ------------------------------------------------------------------------------------------------- internals
    def _held_out_loader(self, dm: pl.LightningDataModule) -> Any:
        getter = getattr(dm, f"{self.split}_dataloader")
        try:
            loader = getter()
        except Exception:  # many DataModules build the test set only in setup("test")
            dm.setup("test" if self.split == "test" else "validate")
            try:
                loader = getter()
            except Exception as err:
                raise MisconfigurationException(
                    f"DeepBootstrap evaluates both worlds on {type(dm).__name__}.{self.split}_dataloader(), which "
                    f"failed ({type(err).__name__}: {err}). Implement it, or pass split="
                    f"{'val' if self.split == 'test' else 'test'!r}."
                ) from err
        return loader[0] if isinstance(loader, (list, tuple)) else loader

    def _eval_batch_size(self) -> int:
        return getattr(self._eval_loader, "batch_size", None) or 256

    def _twin_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """One optimizer step of the twin on fresh examples, mirroring the real step that just happened."""
        if self._stopped is not None or self.world is None:
            return
        world, twin, size_of_world, rank = self.world, self.world.module, trainer.world_size, trainer.global_rank
        for real_m, twin_m in zip(pl_module.modules(), twin.modules()):  # same train/eval mode, submodule by submodule
            twin_m.training = real_m.training
        world.sync_schedulers(self._sched_clock)  # epoch-interval schedulers stepped between the real steps
        # This step's fresh micro-batches first: a rank whose share is past the end of a finite pool must not stop
        # alone (the others would wait for it in the gradient all-reduce), so the ranks agree before any work.
        batches, position = [], self._fresh_pos
        for size in self._micro_sizes:
            try:
                batches.append(self._source(position + rank * size, size))
            except IndexError:
                break
            position += size_of_world * size
        if self._agree(trainer, len(batches) < len(self._micro_sizes)):
            self._stop_pool_exhausted(trainer, sum(self._micro_sizes))
            return
        distributed = size_of_world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()

        @contextlib.contextmanager
        def context() -> Iterator[None]:
            with _attached(twin, trainer), torch.enable_grad(), trainer.precision_plugin.train_step_context():
                yield

        mean_loss, count = world.step(
            batches, accumulate=trainer.accumulate_grad_batches, clip_val=trainer.gradient_clip_val,
            clip_algorithm=trainer.gradient_clip_algorithm or "norm", to_device=trainer.strategy.batch_to_device,
            context=context, all_reduce=torch.distributed.all_reduce if distributed else None,
            world_size=size_of_world)
        self._fresh_pos = position
        if not math.isfinite(mean_loss):  # the same on every rank: the loss sum is part of the all-reduce
            self._stop_diverged(trainer)
            return
        _accumulate(self._twin_online, {"loss": mean_loss}, count)
        world.sync_schedulers(_clocks(trainer))

    @staticmethod
    def _agree(trainer: pl.Trainer, stop: bool) -> bool:
        """``stop`` on any rank means stop on all: one all-reduce of a flag under DDP, nothing on one process.

        Every stop of the twin goes through here, so no rank skips the twin's collectives while another waits in
        them."""
        return bool(trainer.strategy.reduce_boolean_decision(bool(stop), all=False))

    def _stop_diverged(self, trainer: pl.Trainer) -> None:
        self._stopped = f"diverged at step {trainer.global_step}"
        warnings.warn(
            f"DeepBootstrap: the ideal-world twin's loss became non-finite at step {trainer.global_step}; the twin is "
            "stopped (no more ideal-world metrics) and the real run goes on unaffected.", RuntimeWarning, stacklevel=2
        )
        self._log(trainer, {"bootstrap/twin_diverged": 1.0})

    def _stop_pool_exhausted(self, trainer: pl.Trainer, batch_size: int) -> None:
        self._stopped = f"fresh pool exhausted after {self.twin_steps} steps"
        max_steps = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        need = f" this run's {max_steps} steps need >= {max_steps * batch_size * trainer.world_size}." if max_steps \
            else ""
        warnings.warn(
            f"DeepBootstrap: the fresh-sample pool ({self._pool_size} examples) ran out after {self.twin_steps} twin "
            f"steps of batch size {batch_size} (x {trainer.world_size} ranks); the ideal world stops at step "
            f"{self.twin_steps} instead of reusing examples. Give fresh_pool() more examples:{need}",
            RuntimeWarning, stacklevel=2,
        )

    def _measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Evaluate both worlds (rank 0) and log; drains the online accumulators on every rank.

        Called at the same steps on every rank; a non-finite ideal-world loss found by rank 0 stops the twin on all
        ranks (an agreed flag), so no rank goes on stepping the twin alone."""
        online, twin_online = self._online, self._twin_online
        self._online, self._twin_online = {}, {}
        self._measured_at = trainer.global_step
        twin_active = self.world is not None and self._stopped is None
        metrics: dict[str, float] = {}
        diverged = False
        if trainer.global_rank == 0:
            metrics, diverged = self._evaluate_worlds(trainer, twin_active)
        if twin_active and self._agree(trainer, diverged):
            self._stop_diverged(trainer)
        if trainer.global_rank != 0:
            return
        metrics.update({f"bootstrap/online_{k}": v for k, v in _means(online).items()})
        metrics.update({f"bootstrap/ideal_online_{k}": v for k, v in _means(twin_online).items()})
        self.history.append({"step": float(trainer.global_step), **metrics})
        self._log(trainer, metrics)

    def _evaluate_worlds(self, trainer: pl.Trainer, twin_active: bool) -> tuple[dict[str, float], bool]:
        """The real world's metrics and, while the twin runs, the ideal world's and the gaps; ``True`` as second
        value when the ideal world's loss is not finite (its metrics are then left out)."""
        split = self.split
        to_device = trainer.strategy.batch_to_device
        metrics: dict[str, float] = {}
        assert self._loss is not None
        with self._rng:
            real = evaluate(self._loss, self._eval_loader, to_device, self.max_eval_examples)
            metrics.update({f"bootstrap/real_{split}_{k}": v for k, v in real.items()})
            if self._train_eval is not None:
                train = evaluate(self._loss, self._train_eval, to_device, self.max_train_eval_examples)
                metrics.update({f"bootstrap/real_train_{k}": v for k, v in train.items()})
            if not twin_active:
                return metrics, False
            assert self.world is not None
            with _attached(self.world.module, trainer):
                ideal = evaluate(self.world.loss, self._eval_loader, to_device, self.max_eval_examples)
        if not math.isfinite(ideal["loss"]):
            return metrics, True
        metrics.update({f"bootstrap/ideal_{split}_{k}": v for k, v in ideal.items()})
        metrics["bootstrap/loss_gap"] = real["loss"] - ideal["loss"]
        if "error" in real:
            metrics["bootstrap/gap"] = real["error"] - ideal["error"]
            metrics["bootstrap/soft_gap"] = real["soft_error"] - ideal["soft_error"]
        else:
            metrics["bootstrap/gap"] = metrics["bootstrap/loss_gap"]
        return metrics, False

    @staticmethod
    def _log(trainer: pl.Trainer, metrics: dict[str, float]) -> None:
        log_metrics(trainer, metrics, trainer.global_step)

    @rank_zero_only
    def _write_plot(self, trainer: pl.Trainer) -> None:
        csv_loggers = tuple(import_from(package, "loggers.CSVLogger") for package in PACKAGES)
        folder = next((lg.log_dir for lg in trainer.loggers if isinstance(lg, csv_loggers)), None)
        folder = folder or trainer.log_dir or trainer.default_root_dir
        try:
            os.makedirs(folder, exist_ok=True)
            path = plot_bootstrap({"": self.history}, os.path.join(folder, "deep_bootstrap.png"), split=self.split,
                                  title=f"Deep bootstrap: real vs ideal world ({self.split} set)")
            for logger in trainer.loggers:
                if type(logger).__name__ == "WandbLogger" and hasattr(logger, "log_image"):
                    logger.log_image(key="bootstrap/plot", images=[path], step=trainer.global_step)
        except Exception as err:  # a plotting problem must never fail a finished training run
            warnings.warn(f"DeepBootstrap could not write its plot ({type(err).__name__}: {err}).", stacklevel=2)
            return
        self.plot_path = path


@contextlib.contextmanager
def _attached(twin: pl.LightningModule, trainer: pl.Trainer) -> Iterator[None]:
    """Run the twin's own code attached to the trainer (so ``self.trainer``, ``self.global_step`` work in its
    ``training_step`` and ``configure_optimizers``) with ``self.log``/``self.log_dict`` muted (the twin's metrics
    must not reach the real run's logs).

    Deliberately not :meth:`ModuleLoss.isolated` for the twin's training: that restores buffers and forks the RNG
    on exit, but the twin's BatchNorm statistics must advance with its training, and its RNG draws (dropout) must
    advance its private stream (:class:`~lightning_sgd.bootstrap.PrivateRNG`, entered by the caller).
    """
    twin._trainer = trainer
    try:
        with muted_logging(twin):
            yield
    finally:
        twin._trainer = None


def _clocks(trainer: pl.Trainer) -> list[int]:
    """The real world's LR schedulers' clocks (``last_epoch``)."""
    return [config.scheduler.last_epoch for config in trainer.lr_scheduler_configs]


def _accumulate(sums: dict[str, float], values: dict[str, float], n: int) -> None:
    """Add ``n`` examples with per-example means ``values`` to running sums (``sums['n']`` counts examples)."""
    for key, value in values.items():
        sums[key] = sums.get(key, 0.0) + value * n
    sums["n"] = sums.get("n", 0.0) + n


def _means(sums: dict[str, float]) -> dict[str, float]:
    n = sums.get("n", 0.0)
    return {key: value / n for key, value in sums.items() if key != "n"} if n else {}


__all__ = ["DeepBootstrap"]
