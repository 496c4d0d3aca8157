"""Loggers that never stop a run: W&B offline when no credentials are present, and degrading to a no-op on failure.

:class:`WandbLogger` is Lightning's ``WandbLogger`` with two changes:

- ``offline=None`` (the default) means *offline unless W&B credentials are present* (``WANDB_API_KEY``, a
  ``~/.netrc`` entry for api.wandb.ai, or ``WANDB_MODE`` set explicitly), so a run never hangs at a login prompt.
- If W&B cannot start (no network, bad key, broken install), it warns once and turns into a no-op: the run goes on
  and the other loggers (the CSV logger in every recipe) keep the metrics.
- The W&B run starts at the first logged metric, not before: a run that fails in setup (a bad argument, a callback
  that refuses the model) leaves no empty W&B run. Hyper-parameters and the resolved config
  (:meth:`~NeverFatalWandbMixin.set_run_config`) logged before then are applied when it starts. Its id is drawn up
  front, so ``version`` (and the checkpoint folder named after it) is known from the start.
- The project is ``lightning-sgd`` unless given (``$WANDB_PROJECT`` overrides; LightningCLI's ``project=None`` counts
  as not given); ``group`` groups runs (the CLI passes the recipe's name).
- W&B summaries follow the metric: the best (max) accuracy and the least loss of validation and test, the largest
  top eigenvalue. At the end of the run the top-k spectrum over steps and the deep bootstrap's real vs ideal error are
  logged as multi-line charts (``wandb.plot.line_series``) under ``charts/``.

Both Lightning packages: :class:`WandbLogger` is a ``pytorch_lightning`` logger and :class:`LightningWandbLogger` its
``lightning.pytorch`` twin (``import lightning as L``), the same :class:`NeverFatalWandbMixin` on each package's
``WandbLogger`` (a logger holds state, so one class cannot subclass both). Either object works as a logger in either
Trainer (the Trainer does not check a logger's class); LightningCLI does, so a ``lightning.pytorch`` CLI config names
``lightning_sgd.loggers.LightningWandbLogger``. :func:`wandb_logger_class` picks the class for a package.
"""

from __future__ import annotations

import contextlib
import netrc
import os
import re
import uuid
import warnings
from collections.abc import Mapping
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


class _DeferredRun:
    """Stands for a W&B run that has not started: any use starts it (:meth:`NeverFatalWandbMixin.start`)."""

    def __init__(self, logger: NeverFatalWandbMixin) -> None:
        self._logger = logger

    def __getattr__(self, name: str) -> Any:
        return getattr(self._logger.start(), name)

    def __bool__(self) -> bool:
        return True


class NeverFatalWandbMixin:
    """A Lightning ``WandbLogger`` (the next base class), offline by default without credentials, and never fatal.

    Args:
        offline: ``True``/``False`` force the mode; ``None`` picks offline unless credentials are present or
            ``WANDB_MODE`` is set. To log online: ``wandb login`` (or set ``WANDB_API_KEY``) and pass
            ``--trainer.logger.init_args.project=<your project>``, or set ``offline: false`` in YAML.
        **kwargs: everything Lightning's ``WandbLogger`` takes (``project``, ``name``, ``save_dir``, ...).
    """

    def __init__(self, *args: Any, offline: bool | None = None, group: str | None = None, **kwargs: Any) -> None:
        if offline is None:
            mode = os.environ.get("WANDB_MODE", "").lower()
            offline = mode in ("offline", "dryrun") or (mode == "" and not wandb_credentials_present())
        if kwargs.get("project") is None:  # LightningCLI passes project=None explicitly
            kwargs["project"] = os.environ.get("WANDB_PROJECT") or "lightning-sgd"
        if kwargs.get("save_dir") is not None:
            # absolute: W&B's service process outlives a run and resolves relative paths against its own cwd
            kwargs["save_dir"] = os.path.abspath(kwargs["save_dir"])
            os.makedirs(kwargs["save_dir"], exist_ok=True)  # wandb falls back to /tmp when it does not exist
        if kwargs.get("id") is None and kwargs.get("version") is None and kwargs.get("experiment") is None:
            kwargs["id"] = uuid.uuid4().hex[:8]  # known before the run starts (checkpoint folder, version)
        if group is not None:
            kwargs["group"] = group
        super().__init__(*args, offline=offline, **kwargs)
        if self._wandb_init.get("anonymous", 0) is None:  # W&B warns about anonymous=None at every start
            del self._wandb_init["anonymous"]
        self._failed = False
        self.last_run_dir: str | None = None
        self._pending_hparams: list[Any] = []  # log_hyperparams before the run started
        self._pending_config: list[dict[str, Any]] = []  # set_run_config before the run started
        self._config_text: str | None = None
        self._defined: set[str] = set()
        self._curves: dict[str, dict[str, dict[int, float]]] = {}  # chart -> line name -> step -> value

    @property
    def failed(self) -> bool:
        """True once W&B could not start and this logger became a no-op."""
        return self._failed

    @property
    def experiment(self) -> Any:
        """The W&B run; until something uses it (logs, reads an attribute), a stand-in that starts it on first use.
        Lightning touches ``experiment`` before the setup hooks, so a run that fails in setup would otherwise leave
        an empty W&B run."""
        if self._failed:
            return _NullExperiment()
        if self._experiment is None:
            return _DeferredRun(self)
        return self.start()

    def start(self) -> Any:
        """Start the W&B run now (if it has not started) and return it; a no-op object when W&B cannot start."""
        if self._failed:
            return _NullExperiment()
        started = self._experiment is not None
        try:
            experiment = super().experiment
        except Exception as err:  # any W&B start-up failure must not end the training run
            self._failed = True
            warnings.warn(
                f"W&B could not start ({type(err).__name__}: {err}); training goes on without W&B and the other "
                "loggers (CSV) keep the metrics. Set WANDB_MODE=offline to log locally, or run `wandb login`.",
                stacklevel=2,
            )
            return _NullExperiment()
        if not started and experiment:
            self._on_start(experiment)
        return experiment

    def _on_start(self, experiment: Any) -> None:
        """Apply what was logged before the run started: hyper-parameters, the resolved config and its file."""
        hparams, self._pending_hparams = self._pending_hparams, []
        for params in hparams:
            super().log_hyperparams(params)  # type: ignore[misc]
        for params in self._pending_config:
            experiment.config.update(params, allow_val_change=True)
        self._pending_config = []
        if self._config_text is not None and isinstance(getattr(experiment, "dir", None), str):
            with open(os.path.join(experiment.dir, "config.yaml"), "w") as f:  # synced with the run's files
                f.write(self._config_text)

    @property
    def started(self) -> bool:
        """Whether the W&B run has started (it does at the first logged metric)."""
        return self._experiment is not None

    @rank_zero_only
    def set_run_config(self, config: Mapping[str, Any], text: str | None = None) -> None:
        """The run's resolved configuration: its values go into the W&B run config, ``text`` (the YAML) into the run
        file ``config.yaml``; applied when the run starts if it has not yet."""
        self._config_text = text
        params = _sanitize(dict(config))
        self._pending_config.append(params)
        if self.started:
            self._on_start(self._experiment)

    @rank_zero_only
    def log_metrics(self, metrics: Any, step: int | None = None) -> None:
        if self.start():
            self._define_metrics(metrics)
            super().log_metrics(metrics, step)
            self._record_curves(metrics, step)

    @rank_zero_only
    def log_hyperparams(self, params: Any) -> None:
        if self._failed:
            return
        if not self.started:  # do not start the W&B run for hyper-parameters alone
            self._pending_hparams.append(params)
            return
        super().log_hyperparams(params)

    def _define_metrics(self, metrics: Mapping[str, Any]) -> None:
        """W&B summaries: max accuracy and min loss of val/test, max top eigenvalue (once per key)."""
        for key in metrics:
            if key in self._defined:
                continue
            self._defined.add(key)
            summary = _summary_of(key)
            if summary is None:
                continue
            with contextlib.suppress(Exception):  # summaries are extras; older W&B versions may lack an option
                self.experiment.define_metric(key, summary=summary, step_metric="trainer/global_step")

    def _record_curves(self, metrics: Mapping[str, Any], step: int | None) -> None:
        if step is None:
            return
        for key, value in metrics.items():
            curve = chart_line(key)
            if curve is None:
                continue
            chart, line = curve
            try:
                self._curves.setdefault(chart, {}).setdefault(line, {})[int(step)] = float(value)
            except (TypeError, ValueError):
                continue

    def _log_charts(self) -> None:
        """Multi-line charts of the recorded curves (the top-k spectrum over steps, real vs ideal bootstrap)."""
        if not self._curves or not self.started:
            return
        try:
            import wandb

            payload: dict[str, Any] = {}
            last_step = 0
            for chart, lines in sorted(self._curves.items()):
                names = sorted(lines, key=_natural)
                steps = [sorted(lines[n]) for n in names]
                last_step = max([last_step, *(s[-1] for s in steps if s)])
                payload[f"charts/{chart}"] = wandb.plot.line_series(
                    xs=steps, ys=[[lines[n][s] for s in xs] for n, xs in zip(names, steps)], keys=names,
                    title=chart.replace("_", " "), xname="step")
            self._experiment.log({**payload, "trainer/global_step": last_step})
        except Exception as err:  # noqa: BLE001 - charts are extras; never end the run over them
            warnings.warn(f"W&B charts could not be logged: {err}", stacklevel=2)
        self._curves = {}

    @rank_zero_only
    def finalize(self, status: str) -> None:
        if not self._failed:
            super().finalize(status)
            if status == "failed":  # the run ended with an exception: close the W&B run so nothing reuses it
                self.finish()

    def finish(self) -> None:
        """End the W&B run (logs the multi-line charts, flushes the offline run file); a later ``experiment`` access
        starts a new run. Nothing to do when no metric was logged: no run was started."""
        if self._experiment is not None and not self._failed:
            self._log_charts()
            self.last_run_dir = self.run_dir()
            self._experiment.finish()
            self._experiment = None
            self._defined = set()

    def run_dir(self) -> str | None:
        """The local W&B run folder (``.../wandb/offline-run-...``) of the current or last run, without starting one."""
        files_dir = getattr(self._experiment, "dir", None) if self._experiment is not None else None
        return os.path.dirname(files_dir) if isinstance(files_dir, str) else self.last_run_dir


#: metric keys recorded for the multi-line charts logged at the end of a run
_SPECTRUM = re.compile(r"^curvature/(?P<operator>[^/]+)/(?P<line>eig_\d+)$")
_BOOTSTRAP = re.compile(r"^bootstrap/(?P<line>(?:real|ideal)_\w+_error)$")


def chart_line(key: str) -> tuple[str, str] | None:
    """``(chart, line)`` for a metric key drawn in one of the end-of-run multi-line charts, else ``None``.

    >>> chart_line("curvature/ggn/eig_3"), chart_line("bootstrap/real_test_error"), chart_line("gns/b_simple")
    (('curvature_ggn_spectrum', 'eig_3'), ('bootstrap_real_vs_ideal', 'real_test_error'), None)
    """
    match = _SPECTRUM.match(key)
    if match:
        return f"curvature_{match.group('operator')}_spectrum", match.group("line")
    match = _BOOTSTRAP.match(key)
    if match:
        return "bootstrap_real_vs_ideal", match.group("line")
    return None


def _natural(name: str) -> tuple[str, int]:
    head, _, tail = name.rpartition("_")
    return (head, int(tail)) if tail.isdigit() else (name, 0)


def _summary_of(key: str) -> str | None:
    if key.startswith(("val/", "val_ema/", "test/")):
        if key.endswith(("/acc", "_acc", "/accuracy")):
            return "max"
        if key.endswith(("/loss", "_loss", "/ppl", "/mse", "_error")):
            return "min"
    if re.match(r"^curvature/[^/]+/eig_0$", key) or key.endswith("/sharpness"):
        return "max"
    return None


def _sanitize(config: dict[str, Any]) -> dict[str, Any]:
    """A config as W&B takes it: ``None`` kept, everything else JSON-like (str for unknown objects)."""

    def clean(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {str(k): clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        return str(value)

    return clean(config)


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
