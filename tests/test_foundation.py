"""Foundation: packaging, the MNIST-1D recipe, the classification module, the CLI, logging and test helpers."""

from __future__ import annotations

import csv
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from lightning_sgd.cli import run
from lightning_sgd.protocols import SupervisedModule, require_supervised
from lightning_sgd.recipes.mnist_1d import MNIST1DCNN, MNIST1DMLP, MNIST1DDataModule
from lightning_sgd.schedules import EveryNSteps, LogSpaced, as_schedule
from tests.ddp import run_ddp
from tests.helpers import TinyDataModule, fast_trainer_kwargs, tiny_module
from tests.wandb_reader import logged_keys

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "recipes" / "mnist1d.yaml")
SMALL_DATA = ["--data.init_args.num_train=200", "--data.init_args.num_val=100", "--data.init_args.num_test=100",
              "--data.init_args.batch_size=50"]


# --------------------------------------------------------------------------------------------------------- data
def test_mnist1d_datamodule_is_deterministic_disjoint_and_cached(tmp_path):
    dm = MNIST1DDataModule(num_train=300, num_val=50, num_test=60, cache_dir=str(tmp_path / "cache"), seed=3)
    dm.setup()
    x_train, y_train = dm.tensors["train"]
    assert x_train.shape == (300, 40) and y_train.dtype == torch.int64
    assert dm.tensors["val"][0].shape == (50, 40) and dm.tensors["test"][0].shape == (60, 40)
    # normalized with the train statistics
    assert abs(float(x_train.mean())) < 1e-5 and abs(float(x_train.std()) - 1) < 1e-4
    # splits come from different seeds: no shared example
    assert not (x_train[:50] == dm.tensors["val"][0]).all(dim=1).any()
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 3
    again = MNIST1DDataModule(num_train=300, num_val=50, num_test=60, cache_dir=str(tmp_path / "cache"), seed=3)
    again.setup()
    fresh = MNIST1DDataModule(num_train=300, num_val=50, num_test=60, cache_dir=None, seed=3)
    fresh.setup()
    for split in ("train", "val", "test"):
        assert torch.equal(again.tensors[split][0], x_train if split == "train" else dm.tensors[split][0])
        assert torch.equal(fresh.tensors[split][0], dm.tensors[split][0])  # the cache stores what generation gives
    other = MNIST1DDataModule(num_train=300, num_val=0, num_test=0, cache_dir=None, seed=4)
    other.setup()
    assert not torch.equal(other.tensors["train"][0], x_train)
    assert len(dm.train_dataloader()) == 300 // 100


@pytest.mark.parametrize("kwargs", [{"num_train": 0}, {"batch_size": -1}, {"num_val": -5}, {"eval_batch_size": 0}])
def test_mnist1d_datamodule_rejects_bad_sizes(kwargs):
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=name):
        MNIST1DDataModule(**kwargs)


def test_mnist1d_networks_match_the_paper_sizes():
    assert sum(p.numel() for p in MNIST1DCNN().parameters()) == 5210
    assert sum(p.numel() for p in MNIST1DMLP().parameters()) == 15210
    x = torch.randn(7, 40)
    assert MNIST1DCNN()(x).shape == (7, 10) and MNIST1DMLP()(x).shape == (7, 10)


# ------------------------------------------------------------------------------------------------------- module
def test_classification_module_learns_and_implements_the_protocol():
    module = tiny_module(lr=0.5, sizes=(25, 32, 3))
    assert isinstance(module, SupervisedModule) and require_supervised(module, "test") is module
    dm = TinyDataModule(n=256, batch_size=32, shuffle=True)
    x, y = dm.x, dm.y
    before = float(module.loss(module(x), y).detach())
    pl.Trainer(**fast_trainer_kwargs(max_steps=80)).fit(module, datamodule=dm)
    after = float(module.loss(module(x), y).detach())
    assert after < 0.8 * before


def test_require_supervised_says_what_is_missing():
    with pytest.raises(TypeError, match="split_batch.*loss"):
        require_supervised(torch.nn.Linear(2, 2), "GradientNoiseScale")


def test_label_smoothing_and_bad_arguments():
    with pytest.raises(ValueError, match="label_smoothing"):
        tiny_module(label_smoothing=1.0)
    module = tiny_module(label_smoothing=0.1)
    logits, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    expected = torch.nn.functional.cross_entropy(logits, y, label_smoothing=0.1)
    assert torch.allclose(module.loss(logits, y), expected)


# --------------------------------------------------------------------------------------------------- schedules
def test_schedules():
    every = EveryNSteps(5, offset=2)
    assert [s for s in range(20) if every(s)] == [2, 7, 12, 17]
    log = LogSpaced(start=0, end=1000, per_decade=4)
    steps = [s for s in range(1001) if log(s)]
    assert steps[0] == 0 and steps[-1] == 1000 and 1 in steps
    assert len([s for s in steps if s >= 100]) < len([s for s in steps if s < 100]) + 2  # sparse late
    assert isinstance(as_schedule(3), EveryNSteps)
    with pytest.raises(ValueError, match="interval"):
        EveryNSteps(0)
    with pytest.raises(TypeError):
        as_schedule("often")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------------- CLI
def test_cli_fit_logs_to_wandb_offline_and_csv(capsys):
    cli = run(["fit", "--config", CONFIG, "--trainer.max_epochs=2", "--trainer.log_every_n_steps=1", *SMALL_DATA])
    out = capsys.readouterr().out
    assert "test/acc" in out and "W&B run:" in out and "CSV metrics:" in out
    trainer = cli.trainer
    assert trainer.global_step == 8
    csv_logger = next(lg for lg in trainer.loggers if isinstance(lg, pl.loggers.CSVLogger))
    with open(Path(csv_logger.log_dir) / "metrics.csv") as f:
        header = next(csv.reader(f))
    assert {"val/loss", "val/acc", "test/acc", "train/loss_step"} <= set(header)
    wandb_logger = next(lg for lg in trainer.loggers if not isinstance(lg, pl.loggers.CSVLogger))
    run_dir = wandb_logger.last_run_dir
    assert run_dir is not None and "offline-run" in run_dir
    keys = logged_keys(run_dir)
    assert {"train/loss_step", "val/loss", "val/acc", "test/loss", "test/acc", "trainer/global_step"} <= keys


def test_cli_names_the_bad_key_and_value(capsys):
    with pytest.raises(SystemExit):
        run(["fit", "--config", CONFIG, "--trainer.max_stepz=3"])
    assert "max_stepz" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run(["fit", "--config", CONFIG, "--data.init_args.batch_size=lots"])
    assert "batch_size" in capsys.readouterr().err


def test_cli_help_lists_every_command(capsys):
    run(["--help"])
    out = capsys.readouterr().out
    for command in ("fit", "validate", "test", "sweep", "nqm"):
        assert f"  {command}" in out
    with pytest.raises(SystemExit, match="unknown command"):
        run(["train"])


def test_console_script_exits_zero():
    proc = subprocess.run([sys.executable, "-m", "lightning_sgd.cli", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "lightning-sgd <command>" in proc.stdout


def test_wandb_failure_warns_once_and_training_goes_on(monkeypatch, tmp_path):
    import wandb

    from lightning_sgd.loggers import WandbLogger

    def broken_init(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(wandb, "init", broken_init)
    csv_logger = pl.loggers.CSVLogger(str(tmp_path), name="csv")
    wandb_logger = WandbLogger(save_dir=str(tmp_path))
    trainer = pl.Trainer(**fast_trainer_kwargs(max_steps=4, logger=[wandb_logger, csv_logger], log_every_n_steps=1))
    with pytest.warns(UserWarning, match="W&B could not start") as record:
        trainer.fit(tiny_module(), datamodule=TinyDataModule())
    assert sum("W&B could not start" in str(w.message) for w in record) == 1
    assert wandb_logger.failed and trainer.global_step == 4
    assert (Path(csv_logger.log_dir) / "metrics.csv").read_text().count("\n") >= 4


def test_a_failed_fit_closes_its_wandb_run(tmp_path):
    import wandb

    from lightning_sgd.loggers import WandbLogger

    class Boom(pl.Callback):
        def on_train_batch_start(self, *args):
            raise RuntimeError("boom")

    wandb_logger = WandbLogger(save_dir=str(tmp_path))
    trainer = pl.Trainer(**fast_trainer_kwargs(logger=wandb_logger, callbacks=[Boom()]))
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(tiny_module(), datamodule=TinyDataModule())
    assert wandb.run is None and wandb_logger.last_run_dir is None  # nothing logged: no W&B run started


def test_wandb_is_offline_without_credentials(monkeypatch):
    from lightning_sgd.loggers import WandbLogger

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", "/nonexistent/netrc")
    assert WandbLogger(save_dir="runs")._offline
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert not WandbLogger(save_dir="runs")._offline


# ----------------------------------------------------------------------------------------------- packaging
def test_built_wheel_ships_and_imports_callbacks_and_recipes(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                           str(tmp_path / "dist"), str(REPO)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    wheel = next((tmp_path / "dist").glob("lightning_sgd-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for expected in ("lightning_sgd/callbacks/__init__.py", "lightning_sgd/recipes/mnist_1d.py",
                     "lightning_sgd/recipes/mnist1d.yaml", "lightning_sgd/py.typed", "lightning_sgd/cli.py"):
        assert expected in names
    assert not any(name.startswith(("callbacks/", "recipes/", "tests/")) for name in names)
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = ("import lightning_sgd, lightning_sgd.callbacks, lightning_sgd.recipes; "
            f"assert lightning_sgd.__file__.startswith({str(site)!r}); "
            "from lightning_sgd.recipes import MNIST1DDataModule; print('ok')")
    proc = subprocess.run([sys.executable, "-S", "-c", f"import sys; sys.path[:0] = [{str(site)!r}] + "
                           f"{[p for p in sys.path if 'site-packages' in p]!r}; {code}"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


# ------------------------------------------------------------------------------------------------------ DDP
@pytest.mark.ddp
def test_ddp_helper_runs_two_synchronized_ranks(tmp_path):
    rank0, rank1 = run_ddp("tests.ddp_entries:fit_tiny", tmp_path, steps=3)
    assert rank0["world"] == rank1["world"] == 2
    assert rank0["params"] == rank1["params"]  # DDP kept the replicas identical
    assert rank0["seen"] != rank1["seen"]  # each rank got its own shard of the data
