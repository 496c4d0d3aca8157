"""The ``lightning-sgd`` command: instant help, version, recipes by name, configs that compose without dropping a
callback, ``--threads``, the oversubscription warning and a quiet console."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import yaml

from lightning_sgd import __version__
from lightning_sgd.cli import compose_configs, recipes_dir, resolve_config, run

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--data.init_args.num_train=200", "--data.init_args.num_val=100", "--data.init_args.num_test=100",
         "--data.init_args.batch_size=50"]

#: the README's growth.yaml, as written there (a later config naming only its own callback)
GROWTH = """\
trainer:
  callbacks:
    - class_path: lightning_sgd.plugins.BatchSizeSchedule
      init_args: {milestones: [30, 60, 80], factors: 2, interval: epoch}  # batch 100 -> 800
"""


def test_help_and_version_import_neither_torch_nor_lightning():
    code = ("import sys; from lightning_sgd.cli import run; run(['--help']); run(['--version']); "
            "print(sorted(m for m in ('torch', 'lightning', 'pytorch_lightning', 'wandb') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "lightning-sgd <command>" in proc.stdout and f"lightning-sgd {__version__}" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_recipes_are_listed_and_found_by_name(capsys, tmp_path):
    names = run(["recipes"])
    out = capsys.readouterr().out
    assert "mnist1d" in names and "  mnist1d " in out and "resnet32_cifar10" in out
    packaged = str(recipes_dir() / "mnist1d.yaml")
    assert resolve_config("mnist1d") == packaged
    assert resolve_config("mnist1d.yaml") == packaged
    assert resolve_config("recipes/mnist1d.yaml") == packaged  # the README's path, from any folder (cwd: tmp)
    mine = tmp_path / "mnist1d.yaml"
    mine.write_text("seed_everything: 1\n")
    os.chdir(tmp_path)
    assert resolve_config("mnist1d.yaml") == "mnist1d.yaml"  # a file of that name wins
    assert resolve_config("no_such_recipe") == "no_such_recipe"  # LightningCLI reports it


def _callback_names(config: dict) -> list[str]:
    return [c["class_path"].rsplit(".", 1)[1] for c in config["trainer"]["callbacks"]]


#: the README's curvature.yaml pattern: a later config re-declaring a recipe's callback to change its arguments
CURVATURE = """\
trainer:
  callbacks:
    - class_path: lightning_sgd.callbacks.CurvatureSpectrum
      init_args: {k: 3, density_runs: 2}
"""


def test_callbacks_merge_by_class_across_configs(tmp_path):
    curvature, growth = tmp_path / "curvature.yaml", tmp_path / "growth.yaml"
    curvature.write_text(CURVATURE)
    growth.write_text(GROWTH)
    args, expected, recipe = compose_configs(["--config", "mnist1d", "--config", str(curvature), "--config",
                                              str(growth), "--trainer.max_steps=3"])
    assert recipe == "mnist1d" and args[1] == str(recipes_dir() / "mnist1d.yaml")
    assert args[-1] == "--trainer.max_steps=3"
    final = yaml.safe_load(args[5])["trainer"]["callbacks"]  # the last config, passed on as YAML text
    assert [c["class_path"].rsplit(".", 1)[1] for c in final] == [
        "GradientNoiseScale", "GradientDiversity", "CurvatureSpectrum", "BatchSizeSchedule"]
    assert final[2]["init_args"] == {"k": 3, "density_runs": 2}  # replaced in place, not a second one
    assert [p.rsplit(".", 1)[1] for p in expected] == [
        "GradientNoiseScale", "GradientDiversity", "CurvatureSpectrum", "BatchSizeSchedule"]
    # callbacks+ (jsonargparse's append) merges the same way; an empty list clears, and the cleared are expected
    appended = tmp_path / "appended.yaml"
    appended.write_text(GROWTH.replace("callbacks:", "callbacks+:"))
    args, expected, _ = compose_configs(["--config", "mnist1d", "--config", str(appended)])
    assert len(yaml.safe_load(args[3])["trainer"]["callbacks"]) == 4
    empty = tmp_path / "empty.yaml"
    empty.write_text("trainer:\n  callbacks: []\n")
    args, expected, _ = compose_configs(["--config", "mnist1d", "--config", str(empty)])
    assert yaml.safe_load(args[3])["trainer"]["callbacks"] == [] and len(expected) == 3


def test_a_later_config_appends_its_callbacks_as_in_the_readme(tmp_path, capsys):
    growth = tmp_path / "growth.yaml"
    growth.write_text(GROWTH)
    with pytest.raises(SystemExit):
        run(["fit", "--config", "recipes/mnist1d.yaml", "--config", str(growth), "--print_config"])
    config = yaml.safe_load(capsys.readouterr().out)
    assert _callback_names(config) == ["GradientNoiseScale", "GradientDiversity", "CurvatureSpectrum",
                                       "BatchSizeSchedule"]
    # and the trainer built from it (no training batch: nothing to measure)
    cli = run(["fit", "--config", "recipes/mnist1d.yaml", "--config", str(growth), "--trainer.max_steps=0",
               "--trainer.limit_val_batches=0", "--test_after_fit=false", *SMALL])
    assert [type(c).__name__ for c in cli.trainer.callbacks][:4] == [
        "GradientNoiseScale", "GradientDiversity", "CurvatureSpectrum", "BatchSizeSchedule"]


@pytest.mark.parametrize("how", ["argument", "config"])
def test_removing_the_callbacks_warns_and_names_what_is_gone(how, tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("trainer:\n  callbacks: []\n")
    removal = ["--trainer.callbacks=[]"] if how == "argument" else ["--config", str(empty)]
    with pytest.warns(UserWarning, match=r"has no GradientNoiseScale, GradientDiversity, CurvatureSpectrum"):
        cli = run(["fit", "--config", "mnist1d", *removal, "--trainer.fast_dev_run=true",
                   "--trainer.enable_progress_bar=false", *SMALL])
    assert not any(type(c).__name__ == "GradientNoiseScale" for c in cli.trainer.callbacks)


def test_threads_are_set_and_oversubscription_warns(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # restored after the test
    many = 4 * (os.cpu_count() or 1)
    try:
        with pytest.warns(UserWarning, match="threads will wait on each other"):
            run(["fit", "--config", "mnist1d", "--threads", str(many), "--trainer.fast_dev_run=true",
                 "--trainer.callbacks=[]", "--trainer.enable_progress_bar=false", *SMALL])
        assert torch.get_num_threads() == many and os.environ["OMP_NUM_THREADS"] == str(many)
    finally:
        torch.set_num_threads(1)
    with pytest.raises(ValueError, match="--threads must be >= 1"):
        run(["fit", "--config", "mnist1d", "--threads", "0", "--trainer.fast_dev_run=true", *SMALL])


def test_console_has_no_adverts_and_the_headline_progress_bar(capfd):
    from lightning_sgd.progress import HeadlineProgressBar

    cli = run(["fit", "--config", "mnist1d", "--trainer.fast_dev_run=true", "--trainer.callbacks=[]", *SMALL])
    bars = [c for c in cli.trainer.callbacks if isinstance(c, HeadlineProgressBar)]
    assert len(bars) == 1 and cli.trainer.progress_bar_callback is bars[0]
    captured = capfd.readouterr()
    assert "💡 Tip" not in captured.out + captured.err
    assert "args parameter is intended" not in captured.err


def test_headline_values_read_the_callbacks():
    from lightning_sgd.progress import headline_values

    class GNS:
        b_simple, b_simple_se, b_noise, measured = 190.4, 12.2, float("inf"), 3

    class Result:
        lambda_max = 30.06

    class Curvature:
        last_result = Result()

    assert headline_values([GNS(), Curvature()]) == {"B_simple": "190±12", "λ_max": "30.1"}



class FolderLogger(pl.loggers.Logger):
    """A user's own logger with a log folder (neither CSV nor W&B)."""

    def __init__(self, save_dir: str) -> None:
        super().__init__()
        self._save_dir = save_dir

    name, version = "mine", 0

    @property
    def log_dir(self) -> str:
        return os.path.join(self._save_dir, "mine")

    def log_metrics(self, metrics, step=None) -> None:
        pass

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass


def test_the_config_is_saved_beside_other_loggers_too(tmp_path):
    """A config naming its own logger (no CSV, no W&B) still gets config.yaml, in that logger's folder."""
    logger = f"--trainer.logger={{class_path: tests.test_cli.FolderLogger, init_args: {{save_dir: {tmp_path}}}}}"
    cli = run(["fit", "--config", "mnist1d", logger, "--trainer.callbacks=[]", "--trainer.max_steps=1",
               "--trainer.limit_val_batches=0", "--test_after_fit=false", "--trainer.enable_progress_bar=false",
               *SMALL])
    saved = yaml.safe_load((tmp_path / "mine" / "config.yaml").read_text())
    assert saved["trainer"]["logger"]["class_path"] == "tests.test_cli.FolderLogger" and cli.trainer.global_step == 1
