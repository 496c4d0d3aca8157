"""Everything works under both Lightning packages: ``pytorch_lightning`` and ``lightning.pytorch`` (``import lightning
as L``): every callback and plugin in each package's Trainer, the gradient-statistics DDP strategy by name and as an
object (real 2-process gloo runs), the W&B logger, ``lightning.pytorch``'s own LightningCLI naming our classes in
YAML, and ``lightning-sgd fit`` on a ``lightning.pytorch`` module."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import lightning.pytorch as lpt
import pytest
import pytorch_lightning as pl
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tests.helpers import fast_trainer_kwargs

PACKAGES = ["pytorch_lightning", "lightning.pytorch"]


def boring_data(n: int = 64, batch_size: int = 8, seed: int = 0) -> DataLoader:
    """Lightning's BoringModel data, made learnable: 32 random features, 2 targets from a fixed linear map."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 32, generator=g)
    y = x @ torch.randn(32, 2, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


class _Boring:
    """A BoringModel-like module (Linear 32→2, or 32→8→BatchNorm→2) whose ``training_step`` returns the mean-squared
    error of a tuple batch: no protocol methods, as a user writes it. Placed before a package's LightningModule."""

    def __init__(self, batchnorm: bool = False, lr: float = 0.1) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lr = lr
        self.layer = (nn.Sequential(nn.Linear(32, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2)) if batchnorm
                      else nn.Linear(32, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)

    def loss_of(self, batch: Any) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self.loss_of(batch)
        self.log("train/loss", loss)
        return loss

    def train_dataloader(self) -> DataLoader:
        return boring_data()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class PLBoring(_Boring, pl.LightningModule):
    """The BoringModel-like module on ``pytorch_lightning``."""


class LBoring(_Boring, lpt.LightningModule):
    """The BoringModel-like module on ``lightning.pytorch``."""


class _BoringData:
    """Its data as a DataModule (LightningCLI's ``data``). Placed before a package's LightningDataModule."""

    def __init__(self, batch_size: int = 8) -> None:
        super().__init__()
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        return boring_data(batch_size=self.batch_size)


class PLBoringData(_BoringData, pl.LightningDataModule):
    """The data on ``pytorch_lightning``."""


class LBoringData(_BoringData, lpt.LightningDataModule):
    """The data on ``lightning.pytorch``."""


def boring_module(package: str, **kwargs: Any) -> _Boring:
    """The module subclassing ``package``'s LightningModule."""
    return {"pytorch_lightning": PLBoring, "lightning.pytorch": LBoring}[package](**kwargs)


# ------------------------------------------------------------------------------------------ callbacks and plugins
def _ghost_batchnorm() -> tuple[Any, dict[str, Any], Any]:
    from lightning_sgd.plugins import GhostBatchNorm, GhostBatchNormCallback

    return GhostBatchNormCallback(4), {"batchnorm": True}, lambda cb, m, t: isinstance(m.layer[1], GhostBatchNorm)


def _lr_warmup_scaling() -> tuple[Any, dict[str, Any], Any]:
    from lightning_sgd.plugins import LRWarmupScaling

    # B_ref 4, batch 8: linear rule doubles the LR; no warmup, so the optimizer runs at 2 × 0.1
    return (LRWarmupScaling(reference_batch_size=4, warmup_steps=0), {},
            lambda cb, m, t: t.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.2))


def _gradient_noise_scale() -> tuple[Any, dict[str, Any], Any]:
    from lightning_sgd.callbacks import GradientNoiseScale

    return GradientNoiseScale(schedule=1), {}, lambda cb, m, t: cb.measured == 3


def _gradient_diversity() -> tuple[Any, dict[str, Any], Any]:
    from lightning_sgd.callbacks import GradientDiversity

    return GradientDiversity(schedule=1), {}, lambda cb, m, t: 0.0 < cb.last_metrics["diversity/value"] <= 1.0


def _curvature_spectrum() -> tuple[Any, dict[str, Any], Any]:
    from lightning_sgd.callbacks import CurvatureSpectrum

    callback = CurvatureSpectrum(schedule=1, k=1, lanczos_iterations=4, trace_matvecs=3, probe_batch_size=8)
    return callback, {}, lambda cb, m, t: len(cb.history) >= 1


def _ema_weights() -> tuple[Any, dict[str, Any], Any]:
    from lightning_sgd.plugins import EMAWeights

    return EMAWeights(decay=0.5), {}, lambda cb, m, t: t.global_step == 3


def _batch_size_schedule() -> tuple[Any, dict[str, Any], Any]:
    from lightning_sgd.plugins import BatchSizeSchedule

    # the per-device batch doubles after optimizer step 1: 8 → 16
    return (BatchSizeSchedule(milestones=[1], factors=2, interval="step"), {},
            lambda cb, m, t: cb.batch_size == 16)


CALLBACKS = {
    "GhostBatchNormCallback": _ghost_batchnorm,
    "LRWarmupScaling": _lr_warmup_scaling,
    "GradientNoiseScale": _gradient_noise_scale,
    "GradientDiversity": _gradient_diversity,
    "CurvatureSpectrum": _curvature_spectrum,
    "EMAWeights": _ema_weights,
    "BatchSizeSchedule": _batch_size_schedule,
}


@pytest.mark.parametrize("name", list(CALLBACKS))
@pytest.mark.parametrize("package", PACKAGES)
def test_callback_runs_in_each_packages_trainer(package: str, name: str) -> None:
    """The callback is a Callback of ``package`` (so its Trainer accepts it), and a 3-step fit of a module of that
    package runs and does what the callback is for."""
    lightning = importlib.import_module(package)
    callback, module_kwargs, did_its_job = CALLBACKS[name]()
    assert isinstance(callback, lightning.Callback)
    module = boring_module(package, **module_kwargs)
    trainer = lightning.Trainer(**fast_trainer_kwargs(max_steps=3, callbacks=[callback]))
    trainer.fit(module)
    assert trainer.global_step == 3
    assert did_its_job(callback, module, trainer)


# ------------------------------------------------------------------------------------------------------ strategy
@pytest.mark.parametrize("package", PACKAGES)
def test_strategy_name_is_registered_in_both_packages(package: str) -> None:
    """``strategy="ddp_grad_stats"`` builds that package's strategy (registered when any of our modules is imported),
    and the object of the other package is refused by the Trainer, as Lightning refuses any foreign strategy."""
    import lightning_sgd.plugins  # noqa: F401 - registers the name
    from lightning_sgd.plugins import GradStatsDDPStrategy, LightningGradStatsDDPStrategy

    lightning = importlib.import_module(package)
    assert "ddp_grad_stats" in lightning.strategies.StrategyRegistry
    trainer = lightning.Trainer(accelerator="cpu", devices=1, strategy="ddp_grad_stats", logger=False)
    own, other = ((GradStatsDDPStrategy, LightningGradStatsDDPStrategy) if package == "pytorch_lightning"
                  else (LightningGradStatsDDPStrategy, GradStatsDDPStrategy))
    assert type(trainer.strategy) is own
    assert isinstance(trainer.strategy, lightning.strategies.DDPStrategy)
    assert trainer.strategy.latest_grad_stats is None
    with pytest.raises(ValueError, match="strategy"):
        lightning.Trainer(accelerator="cpu", devices=1, strategy=other(), logger=False)


@pytest.mark.ddp
@pytest.mark.parametrize("package", PACKAGES)
def test_strategy_norms_match_hand_gradients_under_each_package(package: str, tmp_path: Path) -> None:
    """2-process gloo DDP under ``package``'s Trainer, by name and as an object: each rank's recorded local |g_r|²
    equals the hand-computed gradient of its own batch, the global |ḡ|² the all-reduced ``.grad``, which is the
    mean of the two hand gradients. fp32 gradients of a 66-parameter model summed in another order: rtol 1e-5."""
    from tests.ddp import run_ddp
    from tests.test_grad_stats_ddp import assert_record_matches

    ranks = run_ddp("tests.ddp_entries_lightning:grad_stats_fits", tmp_path, package=package, steps=2)
    expected_class = "GradStatsDDPStrategy" if package == "pytorch_lightning" else "LightningGradStatsDDPStrategy"
    for form in ("name", "object"):
        assert [r[form]["strategy"] for r in ranks] == [expected_class] * 2
        assert ranks[0][form]["ddp_base"].startswith(package)
        for t in range(2):
            grads = [torch.tensor(r[form]["steps"][t]["local"], dtype=torch.float64) for r in ranks]  # [(P,), (P,)]
            assert not torch.allclose(grads[0], grads[1])  # each rank saw its own batch
            for r in ranks:
                record = r[form]["steps"][t]
                assert_record_matches(record, t, grads)
                assert (record["local_batch_size"], record["global_batch_size"]) == (8, 16)
    assert ranks[0]["name"]["steps"] == ranks[0]["object"]["steps"]  # same seed, same strategy: same run


# ------------------------------------------------------------------------------------------------------- loggers
@pytest.mark.parametrize("package", PACKAGES)
def test_wandb_logger_of_each_package_logs_offline(package: str, tmp_path: Path) -> None:
    """Our W&B logger class for the package is that package's Logger (LightningCLI checks it) and logs a fit."""
    from lightning_sgd.loggers import wandb_logger_class
    from tests.wandb_reader import logged_keys

    lightning = importlib.import_module(package)
    logger = wandb_logger_class(package)(save_dir=str(tmp_path))
    assert isinstance(logger, lightning.loggers.Logger)
    trainer = lightning.Trainer(**fast_trainer_kwargs(max_steps=3, logger=logger, log_every_n_steps=1))
    trainer.fit(boring_module(package))
    logger.finish()
    assert "train/loss" in logged_keys(logger.last_run_dir)


# ----------------------------------------------------------------------------------------------------------- CLI
_CALLBACKS_YAML = [
    {"class_path": "lightning_sgd.callbacks.GradientNoiseScale", "init_args": {"schedule": 1}},
    {"class_path": "lightning_sgd.plugins.EMAWeights", "init_args": {"decay": 0.5}},
    {"class_path": "lightning_sgd.plugins.LRWarmupScaling", "init_args": {"reference_batch_size": 8}},
    {"class_path": "lightning_sgd.plugins.GhostBatchNormCallback", "init_args": {"ghost_batch_size": 4}},
]


def test_lightning_pytorch_cli_accepts_our_callbacks_and_logger_in_yaml(tmp_path: Path) -> None:
    """A user's own ``lightning.pytorch.cli.LightningCLI`` with a YAML naming our callbacks and logger by
    ``class_path`` parses, builds them and fits."""
    from lightning.pytorch.cli import LightningCLI

    from lightning_sgd.loggers import LightningWandbLogger
    from lightning_sgd.plugins import GhostBatchNorm

    config = {
        "model": {"batchnorm": True},
        "trainer": {
            "max_steps": 3, "accelerator": "cpu", "devices": 1,
            "enable_progress_bar": False, "enable_model_summary": False, "enable_checkpointing": False,
            "logger": {"class_path": "lightning_sgd.loggers.LightningWandbLogger",
                       "init_args": {"save_dir": str(tmp_path)}},
            "callbacks": _CALLBACKS_YAML,
        },
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = LightningCLI(LBoring, LBoringData, args=["fit", "--config", str(path)], save_config_callback=None)
    assert cli.trainer.global_step == 3
    names = [type(c).__name__ for c in cli.trainer.callbacks]
    assert {"GradientNoiseScale", "EMAWeights", "LRWarmupScaling", "GhostBatchNormCallback"} <= set(names)
    assert isinstance(cli.model.layer[1], GhostBatchNorm)
    assert isinstance(cli.trainer.logger, LightningWandbLogger)
    cli.trainer.logger.finish()


@pytest.mark.parametrize("package", PACKAGES)
def test_lightning_sgd_fit_runs_a_module_of_either_package(package: str) -> None:
    """``lightning-sgd fit`` picks the LightningCLI and Trainer of the model's package from its ``class_path``."""
    from lightning_sgd.cli import run

    prefix = "PL" if package == "pytorch_lightning" else "L"
    cli = run(["fit", f"--model=tests.test_lightning_packages.{prefix}Boring",
               f"--data=tests.test_lightning_packages.{prefix}BoringData", "--trainer.max_steps=3",
               "--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.accelerator=cpu",
               "--trainer.enable_checkpointing=false",
               "--trainer.callbacks+=lightning_sgd.plugins.EMAWeights", "--trainer.callbacks.decay=0.5"])
    lightning = importlib.import_module(package)
    assert isinstance(cli.trainer, lightning.Trainer) and isinstance(cli.model, lightning.LightningModule)
    assert cli.trainer.global_step == 3


def test_model_package_reads_the_class_path_from_configs_and_flags(tmp_path: Path) -> None:
    from lightning_sgd.cli import model_package

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": {"class_path": "tests.test_lightning_packages.LBoring"}}))
    assert model_package(["--config", str(path)]) is lpt
    assert model_package([f"--config={path}", "--model.class_path=tests.test_lightning_packages.PLBoring"]) is pl
    assert model_package(["--model", "{class_path: tests.test_lightning_packages.LBoring}"]) is lpt
    assert model_package(["--model=LBoring"]) is lpt  # a short name, resolved among imported subclasses
    model_file = tmp_path / "model.yaml"
    model_file.write_text(yaml.safe_dump({"class_path": "tests.test_lightning_packages.LBoring"}))
    assert model_package(["--model", str(model_file)]) is lpt
    assert model_package(["--trainer.max_steps=3"]) is pl  # nothing named: the default package
    assert model_package(["--config", str(tmp_path / "missing.yaml")]) is pl  # LightningCLI reports the error


@pytest.mark.parametrize("form", ["name", "class_path"])
def test_lightning_pytorch_cli_builds_the_strategy_from_yaml(form: str) -> None:
    """``trainer.strategy: ddp_grad_stats``, or the ``lightning.pytorch`` twin by ``class_path`` with our arguments
    and ``DDPStrategy``'s (through ``**kwargs``). Built only (``run=False``): a DDP fit in the test process would
    leave its process group and ``MASTER_PORT`` behind for the DDP jobs of later tests."""
    from lightning.pytorch.cli import LightningCLI

    from lightning_sgd.plugins import LightningGradStatsDDPStrategy

    strategy = "ddp_grad_stats"
    if form == "class_path":
        strategy = yaml.safe_dump({"class_path": "lightning_sgd.plugins.LightningGradStatsDDPStrategy",
                                   "init_args": {"every_n_steps": 2, "static_graph": True}}, default_flow_style=True)
    cli = LightningCLI(LBoring, LBoringData, run=False, save_config_callback=None,
                       args=["--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.logger=false",
                             f"--trainer.strategy={strategy.strip()}"])
    assert isinstance(cli.trainer.strategy, LightningGradStatsDDPStrategy)
    if form == "class_path":
        assert cli.trainer.strategy.every_n_steps == 2 and cli.trainer.strategy._ddp_kwargs["static_graph"] is True
