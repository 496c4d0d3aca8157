"""Run a batch-size sweep: per batch size, quasi-random search over the hyper-parameters, stored in Optuna.

Protocol (Shallue et al. 2019, "Measuring the Effects of Data Parallelism on Neural Network Training"; Zhang et al.
2019 section 4): for each batch size B, run trials whose hyper-parameters are consecutive points of a scrambled Sobol
sequence over the search space; each trial trains the recipe at batch size B, evaluates the target metric every
``eval_every`` steps, and stops at the first evaluation that reaches the target (its steps-to-target) or when the
step budget runs out (target not reached). Trials whose training loss becomes non-finite are divergent: marked
(Optuna state PRUNED, user attribute ``diverged``) and excluded. The result at B is the fewest steps of any trial.

Storage and resumption. Each batch size is one Optuna study ``<study_name>-bs<B>`` in an RDB storage (SQLite file by
default, any SQLAlchemy URL such as ``postgresql://`` to share the sweep between workers). A trial's identity is its
index in the Sobol sequence, kept in the storage, so re-running the same command continues the sequence: finished
trials are never redone. A trial whose worker died (kill -9, lost machine) is marked failed and re-queued with the
same hyper-parameters: immediately when the dead worker ran on this host (its PID is gone), otherwise through
Optuna's heartbeat once the worker has been silent for ``grace_period`` seconds.

What a trial records. Its value is the steps to target; a trial that did not reach it stores the finite
``max_steps + eval_every`` (the first evaluation past the budget: it ranks after every trial that reached the target,
and Optuna's plots and dashboard stay finite), with the user attribute ``reached`` False. The metric at every
evaluation goes to ``trial.report``, so optuna-dashboard draws learning curves. With ``gns`` on, a
:class:`lightning_sgd.callbacks.GradientNoiseScale` measures B_simple (and sparse B_noise) along the trial; its values
at the evaluations, at the step the target is reached and their median over the trial are the user attribute
``gns``. The recipe's own measurement callbacks are dropped unless ``keep_callbacks``. Sampled parameters are what
Optuna samples: a ``one_minus_log`` parameter such as the momentum is the Optuna parameter ``one_minus_momentum``
(1 − β); the user attribute ``values`` holds the recipe's values (β itself).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import socket
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import optuna
import pytorch_lightning as pl
import torch
from optuna.distributions import BaseDistribution, FloatDistribution
from optuna.samplers import QMCSampler
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from lightning_sgd.cli import LightningSGDCLI, LightningSGDLightningCLI, model_package, resolve_config
from lightning_sgd.compat import Callback, package_of
from lightning_sgd.sweep.config import SweepConfig, SweepConfigError

HEARTBEAT_INTERVAL_S = 20  # how often a running trial tells the storage it is alive
GRACE_PERIOD_S = 120  # a trial silent this long on another host is taken as dead and re-queued
MAX_RETRY = 3  # re-queue a killed trial at most this many times
CONNECT_TIMEOUT_S = 10  # a database server that does not answer within this is reported, not waited for
#: Bumped when what a study stores changes (2: `one_minus_<name>` parameters, finite unreached values, GNS records),
#: so that a new version never silently mixes its trials into a study written by an older one.
STORAGE_SCHEMA = 2
#: Classes from this package are the recipes' measurement callbacks, dropped from trials unless keep_callbacks.
MEASUREMENT_PACKAGE = "lightning_sgd.callbacks"


# --------------------------------------------------------------------------------------------------- one trial
@dataclass
class TrialOutcome:
    """What one training run did. ``steps`` is the steps-to-target, None when the target was not reached."""

    steps: int | None
    reached: bool
    diverged: bool
    best_metric: float | None  # best value of the metric seen at any evaluation
    steps_run: int  # optimizer steps actually taken
    gave_up: bool = False  # stopped early by `patience`
    gns: dict[str, Any] | None = None  # the noise-scale record (NoiseScaleRecorder.summary), None without gns


class TargetStopper(Callback):
    """Stop training at the first evaluation whose ``metric`` reaches ``target``, or at a non-finite training loss,
    or (with ``patience``) after that many evaluations in a row without a new best value of ``metric``.
    ``report(step, value)`` is called with every finite evaluation (the sweep passes Optuna's ``trial.report``)."""

    def __init__(self, metric: str, target: float, mode: str, patience: int | None = None,
                 report: Callable[[float, int], None] | None = None) -> None:
        self.metric, self.target, self.mode, self.patience = metric, target, mode, patience
        self.report = report
        self.reached_at: int | None = None
        self.diverged = False
        self.gave_up = False  # stopped by `patience`
        self.best: float | None = None
        self._stale = 0  # evaluations since the best metric last improved

    def _better(self, value: float, than: float) -> bool:
        return value >= than if self.mode == "max" else value <= than

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor) and not bool(torch.isfinite(loss.detach()).all()):
            self.diverged = True
            trainer.should_stop = True

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.metric)
        if value is None:
            raise KeyError(f"sweep: the recipe logged no {self.metric!r} during validation; it logged "
                           f"{sorted(trainer.callback_metrics)}.")
        value = float(value)
        if not math.isfinite(value):
            self.diverged = True
            trainer.should_stop = True
            return
        if self.report is not None:
            self.report(value, trainer.global_step)
        if self.best is None or (value != self.best and self._better(value, self.best)):
            self.best, self._stale = value, 0
        else:
            self._stale += 1
        if self.reached_at is None and self._better(value, self.target):
            self.reached_at = trainer.global_step
            trainer.should_stop = True
        elif self.patience is not None and self._stale >= self.patience:
            self.gave_up = True
            trainer.should_stop = True


def _finite_or_none(value: float) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


def _median(values: list[float]) -> float | None:
    finite = sorted(v for v in values if math.isfinite(v))
    if not finite:
        return None
    mid = len(finite) // 2
    return finite[mid] if len(finite) % 2 else 0.5 * (finite[mid - 1] + finite[mid])


class NoiseScaleRecorder(Callback):
    """Record a :class:`lightning_sgd.callbacks.GradientNoiseScale` along a trial from its public values only:
    every new measurement (``last_metrics``) and the smoothed ``b_simple``/``b_noise`` at every evaluation.

    Add it after the GNS callback; it only reads, so the trial trains exactly as without it."""

    def __init__(self, gns: Any) -> None:
        self.gns = gns
        self.b_simple: list[float] = []  # the smoothed B_simple after each of its measurements
        self.b_noise: list[float] = []  # the smoothed B_noise after each of its measurements
        self.at_eval: list[tuple[int, float, float]] = []  # (step, B_simple, B_noise) at every evaluation
        self._last: dict[str, float] = {}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        metrics = self.gns.last_metrics
        if metrics == self._last:  # no measurement since the last batch (several batches per step, or off-schedule)
            return
        self._last = dict(metrics)
        if "gns/b_simple" in metrics:
            self.b_simple.append(float(metrics["gns/b_simple"]))
        if "gns/b_noise" in metrics:
            self.b_noise.append(float(metrics["gns/b_noise"]))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.at_eval.append((int(trainer.global_step), float(self.gns.b_simple), float(self.gns.b_noise)))

    def summary(self, reached_at: int | None) -> dict[str, Any]:
        """B_simple and B_noise at the evaluation that reached the target (None when not reached), at the last
        evaluation and their medians over the trial's measurements; the values at every evaluation (``series``)."""
        at = next((e for e in self.at_eval if e[0] == reached_at), None) if reached_at is not None else None
        end = self.at_eval[-1] if self.at_eval else None
        return {
            "b_simple_at_target": _finite_or_none(at[1]) if at else None,
            "b_noise_at_target": _finite_or_none(at[2]) if at else None,
            "b_simple_median": _median(self.b_simple),
            "b_noise_median": _median(self.b_noise),
            "b_simple_end": _finite_or_none(end[1]) if end else None,
            "b_noise_end": _finite_or_none(end[2]) if end else None,
            "measurements": len(self.b_simple),
            "b_noise_measurements": len(self.b_noise),
            "source": getattr(self.gns, "source_in_use", None),
            "series": [[s, _finite_or_none(a), _finite_or_none(b)] for s, a, b in self.at_eval],
        }


def is_measurement_callback(callback: Any) -> bool:
    """A recipe's measurement callback (GradientNoiseScale, GradientDiversity, CurvatureSpectrum, DeepBootstrap):
    it measures and does not change training, so a sweep trial can drop it."""
    return type(callback).__module__.startswith(MEASUREMENT_PACKAGE + ".")


def trial_noise_scale(cfg: SweepConfig, callbacks: list[Any]) -> Any:
    """The GradientNoiseScale a trial reads: the recipe's own when kept, else a new one with the sweep's settings
    (source "auto": per-example norms from layer hooks on one process, the cheapest exact source)."""
    from lightning_sgd.callbacks import GradientNoiseScale

    own = [cb for cb in callbacks if isinstance(cb, GradientNoiseScale)]
    if own:
        return own[0]
    return GradientNoiseScale(schedule=cfg.gns_every, beta=cfg.gns_beta, b_noise_schedule=cfg.b_noise_every,
                              source=cfg.gns_source)


class _TrialCLIMixin:
    """A ``lightning-sgd`` CLI (the next base class) that builds (model, data, trainer) without running, with the
    sweep's trainer settings."""

    def __init__(self, *args: Any, sweep_trainer_kwargs: dict[str, Any], **kwargs: Any) -> None:
        self._sweep_trainer_kwargs = sweep_trainer_kwargs
        super().__init__(*args, **kwargs)

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        return super().instantiate_trainer(**{**kwargs, **self._sweep_trainer_kwargs})


class _TrialCLI(_TrialCLIMixin, LightningSGDCLI):
    """The trial CLI for ``pytorch_lightning`` recipes."""


class _LightningTrialCLI(_TrialCLIMixin, LightningSGDLightningCLI):
    """The trial CLI for ``lightning.pytorch`` recipes."""


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return repr(value)
    return value if isinstance(value, str) else json.dumps(value)


def trial_args(cfg: SweepConfig, batch_size: int, values: dict[str, float]) -> list[str]:
    """The recipe command-line arguments of one trial: recipe, user overrides, batch size, sampled values."""
    # a packaged recipe's name (or recipes/<name>.yaml from outside a checkout) resolves as in `lightning-sgd fit`
    args = ["--config", resolve_config(str(cfg.recipe)), *cfg.overrides, f"--{cfg.batch_size_key}={batch_size}"]
    for name, value in values.items():
        args.append(f"--{cfg.search_space[name].config_key(name)}={_format_value(value)}")
    return args


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence Lightning's per-fit banners (GPU available, seed set, ...) during a sweep's many short fits."""
    names = ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning.fabric")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*LeafSpec.*")
            warnings.filterwarnings("ignore", message=".*val_check_interval.*")
            warnings.filterwarnings("ignore", message=".*args parameter is intended.*")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def build_trial(cfg: SweepConfig, batch_size: int, values: dict[str, float], max_steps: int | None = None,
                ) -> tuple[pl.LightningModule, pl.LightningDataModule, pl.Trainer]:
    """Instantiate the recipe for one trial: model, data module and a Trainer set up for steps-to-target."""
    trainer_kwargs: dict[str, Any] = dict(
        max_steps=cfg.max_steps if max_steps is None else max_steps,
        max_epochs=-1,
        val_check_interval=cfg.eval_every,
        check_val_every_n_epoch=None,  # val_check_interval counts optimizer steps across epochs
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    args = trial_args(cfg, batch_size, values)
    package = model_package(args)  # the recipe's Lightning package: pytorch_lightning or lightning.pytorch
    cli_class = _TrialCLI if package is pl else _LightningTrialCLI
    cli = cli_class(
        model_class=package.LightningModule,
        datamodule_class=package.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        run=False,
        save_config_callback=None,  # trial configs live in the Optuna storage (user attribute `values`)
        sweep_trainer_kwargs=trainer_kwargs,
    )
    trainer = cli.trainer
    if not cfg.keep_callbacks:
        trainer.callbacks = [cb for cb in trainer.callbacks if not is_measurement_callback(cb)]
    return cli.model, cli.datamodule, trainer


def _trial_logger(cfg: SweepConfig, model: pl.LightningModule, name: str, batch_size: int,
                  values: dict[str, float]) -> Any:
    """The W&B logger of one trial (``wandb_trials``): offline without credentials, never fatal, grouped by sweep."""
    from lightning_sgd.loggers import wandb_logger_class

    logger = wandb_logger_class(package_of(model))(name=name, group=cfg.study_name, job_type="sweep-trial",
                                                   save_dir=cfg.output_dir)
    logger.log_hyperparams({"sweep": cfg.study_name, "batch_size": batch_size, **values})
    return logger


def run_trial(cfg: SweepConfig, batch_size: int, values: dict[str, float], max_steps: int | None = None,
              report: Callable[[float, int], None] | None = None, name: str | None = None) -> TrialOutcome:
    """Train the recipe at ``batch_size`` with ``values`` until the target is reached, it diverges or the budget
    (``max_steps``, default ``cfg.max_steps``) ends; ``report(value, step)`` gets every evaluation. With
    ``cfg.wandb_trials`` the trial logs to its own W&B run called ``name``."""
    with _quiet(), _threads(cfg.threads):
        model, data, trainer = build_trial(cfg, batch_size, values, max_steps)
        logger = None
        if cfg.wandb_trials:
            logger = _trial_logger(cfg, model, name or f"{cfg.study_name}-bs{batch_size}", batch_size, values)
            trainer.loggers = [logger]
        recorder = None
        if cfg.gns:
            gns = trial_noise_scale(cfg, trainer.callbacks)
            if gns not in trainer.callbacks:
                trainer.callbacks.append(gns)
            recorder = NoiseScaleRecorder(gns)
            trainer.callbacks.append(recorder)
        stopper = TargetStopper(cfg.metric, float(cfg.target), cfg.resolved_mode(), cfg.patience,  # type: ignore[arg-type]
                                report=report)
        trainer.callbacks.append(stopper)
        try:
            trainer.fit(model, datamodule=data)
        finally:
            if logger is not None and logger.started:
                logger.experiment.finish()
    reached = stopper.reached_at is not None and not stopper.diverged
    return TrialOutcome(
        steps=stopper.reached_at if reached else None,
        reached=reached,
        diverged=stopper.diverged,
        best_metric=stopper.best,
        steps_run=int(trainer.global_step),
        gave_up=stopper.gave_up,
        gns=recorder.summary(stopper.reached_at if reached else None) if recorder is not None else None,
    )


def preflight(cfg: SweepConfig) -> dict[str, Any]:
    """Check what needs the recipe before any trial runs: it builds, every batch size fits the training set, and
    the metric is logged by validation. Returns ``{"train_size": n, "metrics": [...]}``."""
    values = {name: p.to_value(_midpoint(p)) for name, p in cfg.search_space.items()}
    batch_size = min(cfg.batch_sizes)
    with _quiet():
        model, data, _ = build_trial(cfg, batch_size, values)
        data.setup("fit")
        loader = data.train_dataloader()
        try:
            train_size = len(loader.dataset)  # type: ignore[arg-type]
        except TypeError:
            train_size = None
        too_big = [b for b in cfg.batch_sizes if train_size is not None and b > train_size]
        if too_big:
            raise SweepConfigError(
                f"sweep.batch_sizes {too_big} are larger than the training set ({train_size} examples)."
            )
        trainer = package_of(model).Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                                            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1)
        trainer.validate(model, datamodule=data, verbose=False)
    metrics = sorted(trainer.callback_metrics)
    if cfg.metric not in metrics:
        raise SweepConfigError(
            f"sweep.metric {cfg.metric!r} is not logged by the recipe's validation; it logs {metrics}."
        )
    return {"train_size": train_size, "metrics": metrics}


def _midpoint(param: Any) -> float:
    low, high, log = param.optuna_bounds()
    return math.sqrt(low * high) if log else 0.5 * (low + high)


# --------------------------------------------------------------------------------------------------- storage
class FixedSpaceQMCSampler(QMCSampler):
    """Optuna's QMCSampler over a search space known up front, so the very first trial is a Sobol point too.

    (QMCSampler otherwise draws trial 0 at random to discover the space.) Point ``k`` of the scrambled sequence is
    the study's ``k``-th sampled trial; re-queued trials reuse their parameters and consume no point.
    """

    def __init__(self, search_space: dict[str, BaseDistribution], seed: int) -> None:
        super().__init__(qmc_type="sobol", scramble=True, seed=seed, warn_independent_sampling=True)
        self._space = dict(search_space)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return dict(self._space)


def optuna_space(cfg: SweepConfig) -> dict[str, BaseDistribution]:
    space = {}
    for name, param in cfg.search_space.items():
        low, high, log = param.optuna_bounds()
        space[param.optuna_name(name)] = FloatDistribution(low, high, log=log)
    return space


def config_fingerprint(cfg: SweepConfig) -> str:
    """What makes two runs the same sweep: the recipe, its overrides, the target, the budget and the space."""
    keys = ("recipe", "overrides", "metric", "target", "max_steps", "eval_every", "batch_size_key", "seed")
    payload = {k: getattr(cfg, k) for k in keys}
    payload["mode"] = cfg.resolved_mode()
    payload["schema"] = STORAGE_SCHEMA
    payload["search_space"] = {name: asdict(p) for name, p in sorted(cfg.search_space.items())}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _connect_args(url: str) -> dict[str, Any]:
    """DB-API connect arguments: a lock timeout for SQLite (several local workers wait for each other), a connect
    timeout for the server databases (an unreachable host fails in seconds, not after the OS's TCP timeout)."""
    if url.startswith("sqlite"):
        return {"timeout": 60}
    if url.startswith(("postgresql", "mysql", "mariadb")):
        return {"connect_timeout": CONNECT_TIMEOUT_S}
    return {}


def _one_line(err: BaseException) -> str:
    """The driver's own message of a database error (SQLAlchemy wraps it in several lines), on one line."""
    inner = getattr(err, "orig", None) or err
    return f"{type(inner).__name__}: {' '.join(str(inner).split())}"


def _shown(url: str) -> str:
    """The URL with its password masked."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a URL: show it as given
        return url


def check_storage(url: str) -> None:
    """Refuse, in one line naming the URL, a storage that cannot be opened: not a database URL, a missing driver, a
    SQLite file in a folder that does not exist, a server that refuses or does not answer within
    ``CONNECT_TIMEOUT_S``. Creates nothing (SQLite is not connected to: that would create the file)."""
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url
    from sqlalchemy.pool import NullPool

    try:
        parsed = make_url(url)
    except Exception as err:  # noqa: BLE001 - any parse failure is the same configuration error
        raise SweepConfigError(f"sweep.storage {url!r} is not a database URL ({_one_line(err)}); use e.g. "
                               "sqlite:///runs/sweep/sweep.db or postgresql://user@host/db.") from None
    shown = _shown(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        if database and database != ":memory:" and not database.startswith("file:"):
            folder = Path(database).expanduser().resolve().parent
            if not folder.is_dir():
                raise SweepConfigError(f"cannot open sweep.storage {shown}: the folder {folder} does not exist; "
                                       "create it or give another path.")
        return
    try:
        engine = create_engine(url, connect_args=_connect_args(url), poolclass=NullPool)
        try:
            with engine.connect():
                pass
        finally:
            engine.dispose()
    except ModuleNotFoundError as err:
        raise SweepConfigError(f"cannot open sweep.storage {shown}: its database driver is not installed "
                               f"({_one_line(err)}); install it, or name an installed one in the URL, e.g. "
                               f"{parsed.get_backend_name()}+psycopg2://... with psycopg2-binary.") from None
    except Exception as err:  # noqa: BLE001 - unreachable, refused, bad credentials: all one line
        raise SweepConfigError(f"cannot open sweep.storage {shown}: {_one_line(err)}") from None


def open_storage(url: str) -> RDBStorage:
    """Optuna RDB storage with heartbeats, so trials of a worker that died anywhere are re-queued."""
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeat, QMC, retry
    engine_kwargs: dict[str, Any] = {"connect_args": _connect_args(url)}
    for attempt in range(5):
        try:
            return RDBStorage(
                url,
                engine_kwargs=engine_kwargs,
                heartbeat_interval=HEARTBEAT_INTERVAL_S,
                grace_period=GRACE_PERIOD_S,
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY),
            )
        except Exception as err:  # workers starting together race to create the schema: the loser retries
            if attempt == 4:
                raise SweepConfigError(f"cannot open sweep.storage {_shown(url)}: {_one_line(err)}") from err
            time.sleep(1.0 + attempt)
    raise AssertionError("unreachable")


def study_name(cfg: SweepConfig, batch_size: int) -> str:
    return f"{cfg.study_name}-bs{batch_size}"


def open_study(cfg: SweepConfig, storage: RDBStorage, batch_size: int, create: bool = True) -> optuna.Study:
    """Create or load the study of one batch size; refuse one made by a different sweep configuration. With
    ``create=False`` (report_only) a study that does not exist is an error, and nothing is written."""
    sampler = FixedSpaceQMCSampler(optuna_space(cfg), seed=cfg.seed)
    if create:
        study = optuna.create_study(study_name=study_name(cfg, batch_size), storage=storage, sampler=sampler,
                                    direction="minimize", load_if_exists=True)
    else:
        try:
            study = optuna.load_study(study_name=study_name(cfg, batch_size), storage=storage, sampler=sampler)
        except KeyError:
            names = sorted(s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False))
            raise SweepConfigError(
                f"report_only: the storage {_shown(cfg.resolved_storage())} holds no study "
                f"{study_name(cfg, batch_size)!r} (it holds {names or 'none'}); run the sweep first, or give the "
                "--sweep.study_name / --sweep.batch_sizes it was run with."
            ) from None
    fingerprint = config_fingerprint(cfg)
    existing = study.user_attrs.get("fingerprint")
    if existing is None and not create:
        raise SweepConfigError(f"report_only: study {study.study_name!r} was never started by a sweep (no "
                               "configuration stored); run the sweep first.")
    if existing is None:
        study.set_user_attr("fingerprint", fingerprint)
        study.set_user_attr("batch_size", batch_size)
        study.set_user_attr("config", json.loads(json.dumps(asdict(cfg), default=str)))
    elif existing != fingerprint:
        raise SweepConfigError(
            f"the storage already holds study {study.study_name!r} from a different sweep configuration (recipe, "
            "target, budget or search space changed, or it was written by an older version of lightning-sgd). Use "
            "another --sweep.study_name or --sweep.output_dir."
        )
    return study


def _worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reclaim_dead_local_trials(study: optuna.Study, storage: RDBStorage) -> list[int]:
    """Fail and re-queue RUNNING trials whose worker ran on this host and is gone; return their numbers."""
    host = socket.gethostname()
    reclaimed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.user_attrs.get("worker", "")
        worker_host, _, pid = worker.rpartition(":")
        if worker_host != host or not pid.isdigit() or int(pid) == os.getpid() or _pid_alive(int(pid)):
            continue
        if storage.set_trial_state_values(trial._trial_id, TrialState.FAIL):
            RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)(study, storage.get_trial(trial._trial_id))
            reclaimed.append(trial.number)
    return reclaimed


@dataclass
class StudyCounts:
    complete: int  # non-divergent finished trials (reached or not)
    diverged: int
    running: int
    waiting: int

    @property
    def total(self) -> int:
        return self.complete + self.diverged


def study_counts(study: optuna.Study) -> StudyCounts:
    counts = {s: 0 for s in TrialState}
    for trial in study.get_trials(deepcopy=False):
        counts[trial.state] += 1
    return StudyCounts(counts[TrialState.COMPLETE], counts[TrialState.PRUNED], counts[TrialState.RUNNING],
                       counts[TrialState.WAITING])


# ------------------------------------------------------------------------------------------------------ sweep
def make_objective(cfg: SweepConfig, batch_size: int) -> Any:
    def objective(trial: optuna.Trial) -> float:
        trial.set_user_attr("worker", _worker_id())
        trial.set_user_attr("batch_size", batch_size)
        values = {}
        for name, param in cfg.search_space.items():
            low, high, log = param.optuna_bounds()
            values[name] = param.to_value(trial.suggest_float(param.optuna_name(name), low, high, log=log))
        trial.set_user_attr("values", values)
        budget = cfg.max_steps
        if cfg.stop_at_best:
            # A trial that has not reached the target by the best trial's step count cannot lower the minimum.
            best = best_steps(trial.study)
            if best is not None:
                budget = min(budget, int(best))
        trial.set_user_attr("budget", budget)
        outcome = run_trial(cfg, batch_size, values, max_steps=budget, report=trial.report,
                            name=f"{cfg.study_name}-bs{batch_size}-t{trial.number}")
        for key, value in asdict(outcome).items():
            trial.set_user_attr(key, value)
        if outcome.diverged:
            raise optuna.TrialPruned(f"diverged (non-finite loss) at batch size {batch_size}")
        return float(outcome.steps) if outcome.steps is not None else unreached_value(cfg)

    return objective


def _pick_batch_size(cfg: SweepConfig, counts: dict[int, StudyCounts]) -> int | None:
    """The batch size that most needs a trial (fewest finished + running), or None when every budget is spent."""
    candidates = []
    for b in cfg.batch_sizes:
        c = counts[b]
        in_flight = c.complete + c.running
        if c.waiting > 0 or (in_flight < cfg.trials and c.total + c.running < cfg.resolved_max_trials()):
            candidates.append((0 if c.waiting else 1, in_flight, b))
    return min(candidates)[2] if candidates else None


def unreached_value(cfg: SweepConfig) -> float:
    """The objective value of a trial that did not reach the target: the first evaluation past the budget, finite
    (Optuna's plots and dashboard), and larger than the steps of any trial that reached it."""
    return float(cfg.max_steps + cfg.eval_every)


def trial_reached(trial: FrozenTrial) -> bool:
    """Whether a finished trial reached the target (studies of older versions stored inf when it did not)."""
    if trial.state != TrialState.COMPLETE or trial.value is None:
        return False
    return bool(trial.user_attrs.get("reached", math.isfinite(trial.value)))


def best_steps(study: optuna.Study) -> float | None:
    values = [t.value for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if trial_reached(t)]
    return min(values) if values else None  # type: ignore[type-var]


def _postfix(cfg: SweepConfig, studies: dict[int, optuna.Study]) -> str:
    parts = []
    for b in cfg.batch_sizes:
        best = best_steps(studies[b])
        parts.append(f"{b}:{'-' if best is None else int(best)}")
    return "best steps " + " ".join(parts)


def run_sweep(cfg: SweepConfig, progress: bool = True) -> dict[str, Any]:
    """Run (or resume, or join) the sweep, then write the results table and plots; return the summary dict."""
    from lightning_sgd.sweep.results import summarize, write_outputs

    cfg.validate()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    if cfg.storage:  # a given storage that cannot be opened fails now, in one line, before the recipe is built
        check_storage(cfg.storage)
    if not cfg.report_only:
        preflight(cfg)  # before the storage is touched: a bad sweep leaves nothing behind
    if cfg.report_only:
        _check_report_storage(cfg)
    os.makedirs(cfg.output_dir, exist_ok=True)
    storage = open_storage(cfg.resolved_storage())
    studies = {b: open_study(cfg, storage, b, create=not cfg.report_only) for b in cfg.batch_sizes}
    if not cfg.report_only:
        for study in studies.values():
            reclaimed = reclaim_dead_local_trials(study, storage)
            if reclaimed:
                print(f"sweep: {study.study_name}: re-queued trials {reclaimed} of a worker that died on this host",
                      file=sys.stderr)
        _optimize(cfg, storage, studies, progress)
    summary = summarize(cfg, studies)
    write_outputs(cfg, summary)
    return summary


def _check_report_storage(cfg: SweepConfig) -> None:
    """report_only on a SQLite file that does not exist: an error, before opening it would create it."""
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(cfg.resolved_storage())
    except Exception:  # noqa: BLE001 - not a URL: open_storage reports it
        return
    if parsed.get_backend_name() == "sqlite" and parsed.database and parsed.database != ":memory:" and \
            not Path(parsed.database).expanduser().exists():
        raise SweepConfigError(f"report_only: there is no sweep storage at {parsed.database}; run the sweep "
                               "first, or give the --sweep.output_dir / --sweep.storage it used.")


def _optimize(cfg: SweepConfig, storage: RDBStorage, studies: dict[int, optuna.Study], progress: bool) -> None:
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.trials * len(cfg.batch_sizes), desc="sweep trials", unit="trial", file=sys.stderr,
                   dynamic_ncols=True)
    try:
        while True:
            counts = {b: study_counts(s) for b, s in studies.items()}
            if bar is not None:
                bar.n = sum(min(c.complete, cfg.trials) for c in counts.values())
                bar.set_postfix_str(_postfix(cfg, studies), refresh=True)
            b = _pick_batch_size(cfg, counts)
            if b is None:
                if any(c.running for c in counts.values()):
                    # Other workers still run trials: wait so the final report includes them, and take over the
                    # trials of workers that died (here: PID gone; elsewhere: heartbeat older than the grace period).
                    for study in studies.values():
                        reclaim_dead_local_trials(study, storage)
                        optuna.storages.fail_stale_trials(study)
                    time.sleep(2.0)
                    continue
                break
            studies[b].optimize(make_objective(cfg, b), n_trials=1, catch=(), gc_after_trial=False)
    finally:
        if bar is not None:
            bar.close()

