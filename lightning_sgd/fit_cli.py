"""``lightning-sgd fit/validate/test``: LightningCLI with the project's loggers, config saving, summary and report.

Imported only when one of these commands runs (``lightning-sgd --help`` stays instant; :mod:`lightning_sgd.cli`).

Both Lightning packages: a Trainer fits only modules of its own package, and each package's LightningCLI checks
``class_path`` values against its own base classes. So :func:`model_package` looks at the model's ``class_path``
(from ``--config`` files, ``--model`` or ``--model.class_path``) before parsing: a subclass of
``lightning.pytorch.LightningModule`` runs under ``lightning.pytorch``'s LightningCLI and Trainer, anything else
under ``pytorch_lightning``'s. The datamodule, callbacks and loggers named in the config must then be of that same
package (our callbacks are of both; the default loggers and the progress bar follow the model's package).

What a run gets on top of LightningCLI:

- W&B (offline without credentials) and CSV logging under ``runs/``; the W&B run is named after the recipe and
  grouped by it, in the project ``lightning-sgd`` (``$WANDB_PROJECT`` overrides);
- the resolved config saved with every run: ``config.yaml`` in the CSV log folder and in the W&B run's files, and
  the same values in the W&B run config;
- ``--threads N`` (intra-op threads per process) and a warning when processes × threads exceed the cores;
- a progress bar with B_simple, λ_max and the validation metrics (:mod:`lightning_sgd.progress`);
- at the end of ``fit``: an optional test, the headline measurements, the report (:mod:`lightning_sgd.report`)
  and the paths of the report, checkpoint and config.
"""

from __future__ import annotations

import importlib
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import lightning.pytorch as lpt
import pytorch_lightning as pl
import torch
import yaml
from lightning.pytorch.cli import LightningCLI as _LLightningCLI
from lightning.pytorch.cli import SaveConfigCallback as _LSaveConfigCallback
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from pytorch_lightning.utilities.rank_zero import rank_zero_warn

from lightning_sgd.compat import PACKAGES

LIGHTNING_COMMANDS: dict[str, str] = {
    "fit": "train a recipe (add --test_after_fit=true to test the final model too)",
    "validate": "run one evaluation epoch on the validation set",
    "test": "run one evaluation epoch on the test set",
}


def default_loggers(package: ModuleType = pl, name: str | None = None, group: str | None = None
                    ) -> list[dict[str, Any]]:
    """Every recipe logs to W&B (offline unless credentials are present) and to CSV, under ``runs/``: the loggers
    of ``package`` (``pytorch_lightning`` or ``lightning.pytorch``) as LightningCLI ``class_path`` entries; ``name``
    and ``group`` name the W&B run (the CLI passes the recipe's name)."""
    wandb = "WandbLogger" if package is pl else "LightningWandbLogger"
    wandb_args: dict[str, Any] = {"save_dir": "runs"}  # project: $WANDB_PROJECT, else lightning-sgd
    if name:
        wandb_args["name"] = name
    if group:
        wandb_args["group"] = group
    return [
        {"class_path": f"lightning_sgd.loggers.{wandb}", "init_args": wandb_args},
        {"class_path": f"{package.__name__}.loggers.CSVLogger", "init_args": {"save_dir": "runs", "name": "csv"}},
    ]


#: The ``pytorch_lightning`` default loggers (:func:`default_loggers`).
DEFAULT_LOGGERS: list[dict[str, Any]] = default_loggers(pl)


def _csv_loggers(trainer: Any) -> list[Any]:
    csv_classes = tuple(package.loggers.CSVLogger for package in PACKAGES)
    return [lg for lg in trainer.loggers if isinstance(lg, csv_classes)]


class SaveRunConfigMixin:
    """LightningCLI's ``SaveConfigCallback`` (the next base class) that saves the resolved config *with each run*:
    ``config.yaml`` in every CSV logger's own folder (``runs/csv/version_N/``) and, for W&B loggers, in the run
    config and as the run file ``config.yaml``. Nothing goes to the shared ``trainer.log_dir`` (``runs/``), which
    every run would overwrite."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["save_to_log_dir"] = False
        super().__init__(*args, **kwargs)
        self.paths: list[str] = []

    def save_config(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Runs on rank 0 only (no collective calls: ``trainer.log_dir`` broadcasts, so it is not used)."""
        text = self.parser.dump(self.config, skip_none=False)  # type: ignore[attr-defined]
        resolved = yaml.safe_load(text)
        folders = [Path(logger.log_dir) for logger in _csv_loggers(trainer)]
        in_wandb = False
        for logger in trainer.loggers:
            set_config = getattr(logger, "set_run_config", None)
            if callable(set_config):
                set_config(resolved, text)
                in_wandb = True
        if not folders and not in_wandb:  # other loggers only: where LightningCLI would have saved it
            first = trainer.loggers[0] if trainer.loggers else None
            folders = [Path(getattr(first, "log_dir", None) or getattr(first, "save_dir", None)
                            or trainer.default_root_dir)]
        for folder in folders:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / self.config_filename  # type: ignore[attr-defined]
            path.write_text(text)
            self.paths.append(str(path))


class SaveRunConfig(SaveRunConfigMixin, SaveConfigCallback):
    """:class:`SaveRunConfigMixin` for ``pytorch_lightning``."""


class LightningSaveRunConfig(SaveRunConfigMixin, _LSaveConfigCallback):
    """:class:`SaveRunConfigMixin` for ``lightning.pytorch``."""


def available_cores() -> int:
    """Cores this process may run on (CPU affinity where the OS reports it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class ConfigError(ValueError):
    """A configuration the command refuses before any training: a constructor's own check (a callback, the model,
    the DataModule) or a ``lightning-sgd`` option. ``lightning-sgd`` prints its message in one line and exits 2."""


def _origin(err: BaseException) -> BaseException | None:
    """The exception a user's or our own constructor raised, under the layers jsonargparse and LightningCLI wrap
    around it (``Does not validate against any of the Union subtypes ...``); ``None`` if there is none."""
    chain, seen = [], set()
    node: BaseException | None = err
    while node is not None and id(node) not in seen:
        seen.add(id(node))
        chain.append(node)
        node = node.__cause__ or node.__context__
    for candidate in reversed(chain):  # the deepest first
        tb = candidate.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        where = tb.tb_frame.f_code.co_filename if tb is not None else ""
        if isinstance(candidate, (ValueError, TypeError)) and "jsonargparse" not in where \
                and not where.endswith(("pytorch_lightning/cli.py", "lightning/pytorch/cli.py")):
            return candidate
    return None


class LightningSGDCLIMixin:
    """What ``lightning-sgd`` adds to a LightningCLI (the next base class): fit/validate/test only, W&B + CSV
    logging, ``--threads``, an optional test after fit, the run summary and the report.

    Args:
        expected_callbacks: class paths of the callbacks the ``--config`` files ask for; a warning lists those the
            parsed configuration does not have (a later config cleared ``trainer.callbacks`` or an argument
            replaced it).
    """

    def __init__(self, *args: Any, expected_callbacks: Sequence[str] = (), **kwargs: Any) -> None:
        self._expected_callbacks = list(expected_callbacks)
        self.report_path: Path | None = None
        super().__init__(*args, **kwargs)

    @classmethod
    def subcommands(cls) -> dict[str, set[str]]:
        return {name: kwargs for name, kwargs in super().subcommands().items()  # type: ignore[misc]
                if name in LIGHTNING_COMMANDS}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--test_after_fit", type=bool, default=False,
            help="fit only: after training, test the final model on the datamodule's test set and print the metrics.",
        )
        parser.add_argument(
            "--threads", type=int | None, default=None,
            help="intra-op CPU threads per process (torch.set_num_threads, OMP_NUM_THREADS); default: PyTorch's "
                 "(all cores, divided among processes under DDP). On a shared or small machine 1 is often fastest.",
        )

    def before_instantiate_classes(self) -> None:
        config = self.config.get(str(self.subcommand), self.config)  # type: ignore[attr-defined]
        threads = config.get("threads")
        if threads is not None:
            if threads < 1:
                raise ConfigError(f"--threads must be >= 1 (an int: intra-op threads per process), got {threads}.")
            os.environ["OMP_NUM_THREADS"] = str(threads)  # DDP processes inherit it; Lightning then keeps it
            torch.set_num_threads(threads)
        self._warn_dropped_callbacks(config)

    def instantiate_classes(self) -> None:
        """Build the configured objects; a constructor that refuses its arguments becomes one :class:`ConfigError`
        naming the class and the argument (its own message), not jsonargparse's union-of-types traceback."""
        try:
            super().instantiate_classes()  # type: ignore[misc]
        except ConfigError:
            raise
        except Exception as err:
            origin = _origin(err)
            if origin is None:
                raise
            raise ConfigError(str(origin)) from err

    def _warn_dropped_callbacks(self, config: Any) -> None:
        callbacks = config.get("trainer", {}).get("callbacks") or []
        have = [str(c.get("class_path", "")) if hasattr(c, "get") else type(c).__module__ + "." + type(c).__name__
                for c in (callbacks if isinstance(callbacks, list) else [callbacks])]
        dropped = list(self._expected_callbacks)
        for path in have:
            if path in dropped:
                dropped.remove(path)
        if dropped:
            names = ", ".join(p.rsplit(".", 1)[-1] for p in dropped)
            rank_zero_warn(f"lightning-sgd: the final configuration has no {names}, which a --config file named: a "
                           "later config (`callbacks: []`) or a --trainer.callbacks argument removed them. To add "
                           "callbacks, list them in a later config under `trainer: callbacks:` (lightning-sgd merges "
                           "those into the earlier ones) or use `--trainer.callbacks+=...`.")

    def after_instantiate_classes(self) -> None:
        trainer = self.trainer  # type: ignore[attr-defined]
        if type(trainer.accelerator).__name__ != "CPUAccelerator":  # threads matter for CPU processes
            return
        processes = trainer.num_devices  # on this node
        explicit = os.environ.get("OMP_NUM_THREADS")
        threads = int(explicit) if explicit and explicit.isdigit() else (
            torch.get_num_threads() if processes == 1 else max(1, available_cores() // processes))
        cores = available_cores()
        if processes * threads > cores:
            rank_zero_warn(f"lightning-sgd: {processes} process(es) x {threads} thread(s) = {processes * threads} "
                           f"> {cores} cores: threads will wait on each other. Use --threads="
                           f"{max(1, cores // processes)} (or fewer devices).")

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Any]) -> Any:
        """Add the headline progress bar when the progress bar is on and none is configured."""
        package = lpt if issubclass(self.trainer_class, lpt.Trainer) else pl  # type: ignore[attr-defined]
        bar_base = package.callbacks.ProgressBar
        configured = [*(config.get("callbacks") or []), *callbacks]
        if config.get("enable_progress_bar", True) is not False and not any(isinstance(c, bar_base)
                                                                            for c in configured):
            from lightning_sgd.progress import HeadlineProgressBar, LightningHeadlineProgressBar

            bar = LightningHeadlineProgressBar() if package is lpt else HeadlineProgressBar()
            config["callbacks"] = [*(config.get("callbacks") or []), bar]
        return super()._instantiate_trainer(config, callbacks)  # type: ignore[misc]

    def after_fit(self) -> None:
        trainer = self.trainer  # type: ignore[attr-defined]
        metrics = _scalar_metrics(trainer)  # trainer.test replaces callback_metrics: keep fit's
        if self.config["fit"].get("test_after_fit"):  # type: ignore[attr-defined]
            trainer.test(self.model, datamodule=self.datamodule, verbose=False)  # type: ignore[attr-defined]
            metrics.update(_scalar_metrics(trainer))
        self.report_path = write_fit_report(trainer, metrics)
        print_run_summary(trainer, metrics, report=self.report_path)
        _finish_loggers(trainer)

    def after_validate(self) -> None:
        _finish_loggers(self.trainer)  # type: ignore[attr-defined]

    def after_test(self) -> None:
        _finish_loggers(self.trainer)  # type: ignore[attr-defined]


class LightningSGDCLI(LightningSGDCLIMixin, LightningCLI):
    """``lightning-sgd``'s LightningCLI for ``pytorch_lightning`` modules."""


class LightningSGDLightningCLI(LightningSGDCLIMixin, _LLightningCLI):
    """``lightning-sgd``'s LightningCLI for ``lightning.pytorch`` modules (``import lightning as L``)."""


def _finish_loggers(trainer: Any) -> None:
    """Close W&B runs so the offline run file is complete and a later run in this process starts a new one."""
    for logger in trainer.loggers:
        finish = getattr(logger, "finish", None)
        if callable(finish):
            finish()


def _scalar_metrics(trainer: Any) -> dict[str, float]:
    return {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}


def write_fit_report(trainer: Any, metrics: dict[str, float] | None = None) -> Path | None:
    """Write the report of a finished fit next to its CSV log (rank 0; ``None`` without a CSV logger). A report
    that cannot be written warns and returns ``None``: it never fails the run."""
    if trainer.global_rank != 0:
        return None
    csv_loggers = _csv_loggers(trainer)
    if not csv_loggers:
        return None
    logger = csv_loggers[0]
    try:
        logger.save()  # flush the rows still buffered
        from lightning_sgd.report import write_report

        return write_report(Path(logger.log_dir) / "metrics.csv", metrics={
            k: v for k, v in (metrics or {}).items() if k.startswith(("val/", "val_ema/", "test/"))})
    except Exception as err:  # noqa: BLE001 - the report is an extra; the run's results are already saved
        warnings.warn(f"lightning-sgd: could not write the report ({type(err).__name__}: {err}); run "
                      f"`lightning-sgd report {logger.log_dir}` to retry.", stacklevel=2)
        return None


def _checkpoint_path(trainer: Any) -> str | None:
    callback = getattr(trainer, "checkpoint_callback", None)
    if callback is None:
        return None
    path = getattr(callback, "best_model_path", "") or getattr(callback, "last_model_path", "")
    return path or None


def print_run_summary(trainer: Any, metrics: dict[str, float] | None = None, report: Path | None = None) -> None:
    """Print the headline measurements, the final metrics, the recommendation and where everything was written
    (rank 0 only)."""
    if trainer.global_rank != 0:
        return
    metrics = _scalar_metrics(trainer) if metrics is None else metrics
    keys = sorted(k for k in metrics if k.startswith(("val/", "val_ema/", "test/")))
    print("\n== lightning-sgd run summary ==")
    print(f"steps: {trainer.global_step}, epochs: {trainer.current_epoch}")
    run = _logged_run(trainer)
    if run is not None:
        from lightning_sgd.report import headline

        for line in headline(run):
            print(line)
    for key in keys:
        if math.isfinite(metrics[key]):
            print(f"{key:>24s}: {metrics[key]:.4f}")
    if run is not None:
        from lightning_sgd.report import recommend

        rec = recommend(run)
        if rec is not None:
            print("recommendation: " + " ".join(rec.lines()))
    for line in _where_lines(trainer, report):
        print(line)


def _logged_run(trainer: Any) -> Any:
    """The run's measurements as its first CSV logger wrote them (``None`` without one or when unreadable)."""
    csv_loggers = _csv_loggers(trainer)
    if not csv_loggers:
        return None
    from lightning_sgd.run_log import load_run

    try:
        return load_run(Path(csv_loggers[0].log_dir) / "metrics.csv")
    except (FileNotFoundError, ValueError, OSError):
        return None


def _where_lines(trainer: Any, report: Path | None) -> list[str]:
    """Where the run's report, checkpoint, config, CSV log and W&B run are."""
    lines = [f"report: {report}"] if report is not None else []
    checkpoint = _checkpoint_path(trainer)
    if checkpoint:
        lines.append(f"checkpoint: {checkpoint}")
    for logger in _csv_loggers(trainer):
        config = Path(logger.log_dir) / "config.yaml"
        if config.is_file():
            lines.append(f"config: {config}")
        lines.append(f"CSV metrics: {os.path.join(logger.log_dir, 'metrics.csv')}")
    for logger in trainer.loggers:
        run_dir = logger.run_dir() if hasattr(logger, "run_dir") else None
        if run_dir:
            lines.append(f"W&B run: {run_dir} (upload later with `wandb sync {run_dir}`)")
    return lines


# ------------------------------------------------------------------------------------------ the model's package
def _class_path(value: Any) -> str | None:
    """The class path in a config value for ``model``: ``{"class_path": ...}`` or a plain string."""
    if isinstance(value, dict):
        value = value.get("class_path")
    return value if isinstance(value, str) and value else None


def _model_class_path(args: Sequence[str]) -> str | None:
    """The model's ``class_path`` as LightningCLI will see it: the last one given by a ``--config`` file,
    ``--model`` or ``--model.class_path`` (later arguments override earlier ones, as in LightningCLI)."""
    found = None
    i = 0
    while i < len(args):
        key, eq, value = args[i].partition("=")
        if key in ("--config", "--model", "--model.class_path"):
            if not eq:
                i += 1
                value = args[i] if i < len(args) else ""
            try:
                if key == "--config":
                    if os.path.isfile(value):
                        with open(value) as f:
                            config = yaml.safe_load(f)
                    else:  # a config given as YAML text (lightning-sgd passes appended configs so)
                        config = yaml.safe_load(value)
                    path = _class_path(config.get("model")) if isinstance(config, dict) else None
                elif key == "--model" and os.path.isfile(value):  # --model model.yaml
                    with open(value) as f:
                        path = _class_path(yaml.safe_load(f))
                else:
                    path = _class_path(value if key == "--model.class_path" else yaml.safe_load(value))
            except (OSError, yaml.YAMLError):
                path = None  # LightningCLI reports the bad file or value itself
            found = path or found
        i += 1
    return found


def _subclasses(cls: type) -> list[type]:
    return [c for sub in cls.__subclasses__() for c in (sub, *_subclasses(sub))]


def model_package(args: Sequence[str]) -> ModuleType:
    """``lightning.pytorch`` when the model named in ``args`` subclasses its ``LightningModule``, else
    ``pytorch_lightning`` (also when it cannot tell: LightningCLI then reports any problem with the model)."""
    path = _model_class_path(args)
    if path is None:
        return pl
    module_name, _, name = path.rpartition(".")
    if module_name:
        try:
            cls = getattr(importlib.import_module(module_name), name, None)
        except Exception:  # noqa: BLE001 - LightningCLI imports it again and reports the error in its own words
            return pl
        return lpt if isinstance(cls, type) and issubclass(cls, lpt.LightningModule) else pl
    # a short name: LightningCLI resolves it among the LightningModule subclasses imported so far
    return lpt if any(c.__name__ == name for c in _subclasses(lpt.LightningModule)) else pl


def run_lightning(args: list[str], cli_args: list[str] | None, recipe: str | None,
                  expected_callbacks: Sequence[str]) -> Any:
    """Build and run the LightningCLI (``args``: the command's arguments after composition; ``cli_args``: what to
    pass LightningCLI as ``args``, ``None`` for ``sys.argv``)."""
    import time

    package = model_package(args)
    cli_class = LightningSGDLightningCLI if package is lpt else LightningSGDCLI
    name = f"{recipe}-{time.strftime('%Y%m%d-%H%M%S')}" if recipe else None
    return cli_class(
        model_class=package.LightningModule,
        datamodule_class=package.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        trainer_defaults={"logger": default_loggers(package, name=name, group=recipe)},
        save_config_callback=LightningSaveRunConfig if package is lpt else SaveRunConfig,
        save_config_kwargs={"overwrite": True},
        args=cli_args,
        expected_callbacks=expected_callbacks,
    )
