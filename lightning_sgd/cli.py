"""The ``lightning-sgd`` command: LightningCLI's ``fit``/``validate``/``test`` plus project subcommands.

``fit``, ``validate`` and ``test`` are LightningCLI with ``subclass_mode`` for both model and data, so any recipe
(or user) LightningModule / LightningDataModule is named by ``class_path`` in YAML or on the command line. Other
subcommands (``sweep``, ``nqm``, ...) are registered in :data:`EXTRA_COMMANDS` as ``module:function`` entries that
take the remaining arguments.

Both Lightning packages: a Trainer fits only modules of its own package, and each package's LightningCLI checks
``class_path`` values against its own base classes. So ``fit``/``validate``/``test`` look at the model's
``class_path`` (from ``--config`` files, ``--model`` or ``--model.class_path``) before parsing: a subclass of
``lightning.pytorch.LightningModule`` runs under ``lightning.pytorch``'s LightningCLI and Trainer, anything else
under ``pytorch_lightning``'s. The datamodule, callbacks and loggers named in the config must then be of that same
package (our callbacks are of both; the default loggers follow the model's package).
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import lightning.pytorch as lpt
import pytorch_lightning as pl
import yaml
from lightning.pytorch.cli import LightningCLI as _LLightningCLI
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI

from lightning_sgd.compat import PACKAGES

#: name -> (``module:function`` taking ``argv``, one-line help). Add new subcommands here.
EXTRA_COMMANDS: dict[str, tuple[str, str]] = {
    "sweep": ("lightning_sgd.sweep.cli:main", "steps-to-target vs batch size with tuned learning rates (Optuna)"),
    "nqm": ("lightning_sgd.nqm.cli:main", "noisy quadratic model predictions and the paper's figures"),
}

LIGHTNING_COMMANDS: dict[str, str] = {
    "fit": "train a recipe (add --test_after_fit=true to test the final model too)",
    "validate": "run one evaluation epoch on the validation set",
    "test": "run one evaluation epoch on the test set",
}



def default_loggers(package: ModuleType = pl) -> list[dict[str, Any]]:
    """Every recipe logs to W&B (offline unless credentials are present) and to CSV, under ``runs/``: the loggers
    of ``package`` (``pytorch_lightning`` or ``lightning.pytorch``) as LightningCLI ``class_path`` entries."""
    wandb = "WandbLogger" if package is pl else "LightningWandbLogger"
    return [
        {"class_path": f"lightning_sgd.loggers.{wandb}", "init_args": {"save_dir": "runs"}},  # project: $WANDB_PROJECT
        {"class_path": f"{package.__name__}.loggers.CSVLogger", "init_args": {"save_dir": "runs", "name": "csv"}},
    ]


#: The ``pytorch_lightning`` default loggers (:func:`default_loggers`).
DEFAULT_LOGGERS: list[dict[str, Any]] = default_loggers(pl)


class LightningSGDCLIMixin:
    """What ``lightning-sgd`` adds to a LightningCLI (the next base class): fit/validate/test only, W&B + CSV
    logging, an optional test after fit and a run summary."""

    @classmethod
    def subcommands(cls) -> dict[str, set[str]]:
        return {name: kwargs for name, kwargs in super().subcommands().items() if name in LIGHTNING_COMMANDS}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--test_after_fit", type=bool, default=False,
            help="fit only: after training, test the final model on the datamodule's test set and print the metrics.",
        )

    def after_fit(self) -> None:
        metrics = _scalar_metrics(self.trainer)  # trainer.test replaces callback_metrics: keep fit's
        if self.config["fit"].get("test_after_fit"):
            self.trainer.test(self.model, datamodule=self.datamodule, verbose=False)
            metrics.update(_scalar_metrics(self.trainer))
        print_run_summary(self.trainer, metrics)
        _finish_loggers(self.trainer)

    def after_validate(self) -> None:
        _finish_loggers(self.trainer)

    def after_test(self) -> None:
        _finish_loggers(self.trainer)


class LightningSGDCLI(LightningSGDCLIMixin, LightningCLI):
    """``lightning-sgd``'s LightningCLI for ``pytorch_lightning`` modules."""


class LightningSGDLightningCLI(LightningSGDCLIMixin, _LLightningCLI):
    """``lightning-sgd``'s LightningCLI for ``lightning.pytorch`` modules (``import lightning as L``)."""


def _finish_loggers(trainer: pl.Trainer) -> None:
    """Close W&B runs so the offline run file is complete and a later run in this process starts a new one."""
    for logger in trainer.loggers:
        finish = getattr(logger, "finish", None)
        if callable(finish):
            finish()


def _scalar_metrics(trainer: pl.Trainer) -> dict[str, float]:
    return {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}


def print_run_summary(trainer: pl.Trainer, metrics: dict[str, float] | None = None) -> None:
    """Print the final metrics and where each logger wrote (rank 0 only)."""
    if trainer.global_rank != 0:
        return
    metrics = _scalar_metrics(trainer) if metrics is None else metrics
    keys = sorted(k for k in metrics if k.startswith(("val/", "val_ema/", "test/")))
    print("\n== lightning-sgd run summary ==")
    print(f"steps: {trainer.global_step}, epochs: {trainer.current_epoch}")
    for key in keys:
        print(f"{key:>24s}: {metrics[key]:.4f}")
    csv_loggers = tuple(package.loggers.CSVLogger for package in PACKAGES)
    for logger in trainer.loggers:
        if isinstance(logger, csv_loggers):
            print(f"CSV metrics: {os.path.join(logger.log_dir, 'metrics.csv')}")
        elif hasattr(logger, "run_dir"):
            run_dir = logger.run_dir()
            if run_dir:
                print(f"W&B run: {run_dir} (upload later with `wandb sync {run_dir}`)")


def _help_text() -> str:
    lines = [
        "usage: lightning-sgd <command> [options]",
        "",
        "Measure and act on gradient noise, curvature and batch size in PyTorch Lightning training.",
        "",
        "commands:",
    ]
    commands = {**LIGHTNING_COMMANDS, **{name: text for name, (_, text) in EXTRA_COMMANDS.items()}}
    lines += [f"  {name:<10s}{text}" for name, text in commands.items()]
    lines += [
        "",
        "examples:",
        "  lightning-sgd fit --config recipes/mnist1d.yaml",
        "  lightning-sgd fit --help          (all options of a command)",
        "  lightning-sgd fit --config recipes/mnist1d.yaml --print_config   (the resolved configuration)",
    ]
    return "\n".join(lines)


def _run_extra(name: str, argv: Sequence[str]) -> Any:
    target, _ = EXTRA_COMMANDS[name]
    module_name, function_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        raise SystemExit(f"lightning-sgd {name}: this installation lacks {module_name} ({err}).") from err
    return getattr(module, function_name)(list(argv))


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
                    with open(value) as f:
                        config = yaml.safe_load(f)
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


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``lightning-sgd`` console script (returns nothing: a return value becomes the exit code)."""
    run(sys.argv[1:] if argv is None else argv)


def run(argv: Sequence[str]) -> Any:
    """Run a ``lightning-sgd`` command; return the LightningCLI object (fit/validate/test) or the command's result."""
    args = list(argv)
    if not args or args[0] in ("-h", "--help"):
        print(_help_text())
        return None
    if args[0] in EXTRA_COMMANDS:
        return _run_extra(args[0], args[1:])
    if args[0] not in LIGHTNING_COMMANDS:
        raise SystemExit(f"lightning-sgd: unknown command {args[0]!r}.\n\n{_help_text()}")
    package = model_package(args[1:])
    cli_class = LightningSGDLightningCLI if package is lpt else LightningSGDCLI
    return cli_class(
        model_class=package.LightningModule,
        datamodule_class=package.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        trainer_defaults={"logger": default_loggers(package)},
        save_config_kwargs={"overwrite": True},
        args=None if args == sys.argv[1:] else args,  # LightningCLI warns when given sys.argv's own arguments
    )


if __name__ == "__main__":
    main()
