"""Loggers that never stop a run: W&B offline when no credentials are present, and degrading to a no-op on failure.

:class:`WandbLogger` is Lightning's ``WandbLogger`` with two changes:

- ``offline=None`` (the default) means *offline unless W&B credentials are present* (``WANDB_API_KEY``, a
  ``~/.netrc`` entry for api.wandb.ai, or ``WANDB_MODE`` set explicitly), so a run never hangs at a login prompt.
- If W&B cannot start (no network, bad key, broken install), it warns once and turns into a no-op: the run goes on
  and the other loggers (the CSV logger in every recipe) keep the metrics.

Both Lightning packages: :class:`WandbLogger` is a ``pytorch_lightning`` logger and :class:`LightningWandbLogger` its
``lightning.pytorch`` twin (``import lightning as L``), the same :class:`NeverFatalWandbMixin` on each package's
``WandbLogger`` (a logger holds state, so one class cannot subclass both). Either object works as a logger in either
Trainer (the Trainer does not check a logger's class); LightningCLI does, so a ``lightning.pytorch`` CLI config names
``lightning_sgd.loggers.LightningWandbLogger``. :func:`wandb_logger_class` picks the class for a package.
"""

from __future__ import annotations

import netrc
import os
import warnings
from types import ModuleType
from typing import Any

from lightning.pytorch.loggers import WandbLogger as _LWandbLogger
from pytorch_lightning.loggers import WandbLogger as _PLWandbLogger
from pytorch_lightning.utilities.rank_zero import rank_zero_only  # one object shared by both packages


def wandb_credentials_present() -> bool:
    """True when W&B could log online without asking for a login."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
        return os.path.exists(path) and netrc.netrc(path).authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


class _NullExperiment:
    """Accepts any attribute access, call, item access or assignment and does nothing."""

    def __getattr__(self, name: str) -> _NullExperiment:
        return self

    def __call__(self, *args: Any, **kwargs: Any) -> _NullExperiment:
        return self

    def __getitem__(self, key: Any) -> _NullExperiment:
        return self

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def __bool__(self) -> bool:
        return False


class NeverFatalWandbMixin:
    """A Lightning ``WandbLogger`` (the next base class), offline by default without credentials, and never fatal.

    Args:
        offline: ``True``/``False`` force the mode; ``None`` picks offline unless credentials are present or
            ``WANDB_MODE`` is set. To log online: ``wandb login`` (or set ``WANDB_API_KEY``) and pass
            ``--trainer.logger.init_args.project=<your project>``, or set ``offline: false`` in YAML.
        **kwargs: everything Lightning's ``WandbLogger`` takes (``project``, ``name``, ``save_dir``, ...).
    """

    def __init__(self, *args: Any, offline: bool | None = None, **kwargs: Any) -> None:
        if offline is None:
            mode = os.environ.get("WANDB_MODE", "").lower()
            offline = mode in ("offline", "dryrun") or (mode == "" and not wandb_credentials_present())
        kwargs.setdefault("project", os.environ.get("WANDB_PROJECT", "lightning-sgd"))
        if kwargs.get("save_dir") is not None:
            # absolute: W&B's service process outlives a run and resolves relative paths against its own cwd
            kwargs["save_dir"] = os.path.abspath(kwargs["save_dir"])
            os.makedirs(kwargs["save_dir"], exist_ok=True)  # wandb falls back to /tmp when it does not exist
        super().__init__(*args, offline=offline, **kwargs)
        self._failed = False
        self.last_run_dir: str | None = None

    @property
    def failed(self) -> bool:
        """True once W&B could not start and this logger became a no-op."""
        return self._failed

    @property
    def experiment(self) -> Any:
        if self._failed:
            return _NullExperiment()
        try:
            return super().experiment
        except Exception as err:  # any W&B start-up failure must not end the training run
            self._failed = True
            warnings.warn(
                f"W&B could not start ({type(err).__name__}: {err}); training goes on without W&B and the other "
                "loggers (CSV) keep the metrics. Set WANDB_MODE=offline to log locally, or run `wandb login`.",
                stacklevel=2,
            )
            return _NullExperiment()

    @rank_zero_only
    def log_metrics(self, metrics: Any, step: int | None = None) -> None:
        if self.experiment:
            super().log_metrics(metrics, step)

    @rank_zero_only
    def log_hyperparams(self, params: Any) -> None:
        if self.experiment:
            super().log_hyperparams(params)

    @rank_zero_only
    def finalize(self, status: str) -> None:
        if not self._failed:
            super().finalize(status)
            if status == "failed":  # the run ended with an exception: close the W&B run so nothing reuses it
                self.finish()

    def finish(self) -> None:
        """End the W&B run (flushes the offline run file); a later ``experiment`` access starts a new run."""
        if self._experiment is not None and not self._failed:
            self.last_run_dir = self.run_dir()
            self._experiment.finish()
            self._experiment = None

    def run_dir(self) -> str | None:
        """The local W&B run folder (``.../wandb/offline-run-...``) of the current or last run, without starting one."""
        files_dir = getattr(self._experiment, "dir", None) if self._experiment is not None else None
        return os.path.dirname(files_dir) if isinstance(files_dir, str) else self.last_run_dir


class WandbLogger(NeverFatalWandbMixin, _PLWandbLogger):
    """``pytorch_lightning``'s ``WandbLogger``, offline by default without credentials, and never fatal (arguments:
    :class:`NeverFatalWandbMixin`; for ``lightning.pytorch``: :class:`LightningWandbLogger`)."""


class LightningWandbLogger(NeverFatalWandbMixin, _LWandbLogger):
    """:class:`WandbLogger` for ``lightning.pytorch`` (``import lightning as L``): the same logger on that package's
    ``WandbLogger`` (arguments: :class:`NeverFatalWandbMixin`)."""


def wandb_logger_class(package: ModuleType | str) -> type[NeverFatalWandbMixin]:
    """The W&B logger class for a Lightning package (``pytorch_lightning`` or ``lightning.pytorch``, module or name).

    >>> wandb_logger_class("lightning.pytorch").__name__
    'LightningWandbLogger'
    """
    name = package if isinstance(package, str) else package.__name__
    classes = {"pytorch_lightning": WandbLogger, "lightning.pytorch": LightningWandbLogger}
    if name not in classes:
        raise ValueError(f"wandb_logger_class: unknown Lightning package {name!r}; expected one of {sorted(classes)}.")
    return classes[name]
