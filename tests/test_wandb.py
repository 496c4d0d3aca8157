"""W&B the way its users expect, read back from the offline run files of real fits: the resolved config, the run name,
group and project, metric summaries, the multi-line charts, the uncertainty keys, diagnostics under ``diag/``, no
empty run after a failed start, and curvature plots under either Lightning package's own ``WandbLogger``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import pytorch_lightning as pl
import yaml

from lightning_sgd.cli import run
from lightning_sgd.report import recommend, write_report
from lightning_sgd.run_log import load_run
from tests.wandb_reader import read_complete_run

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]


def _small_recipe(folder: Path) -> Path:
    """recipes/mnist1d.yaml with every measurement made within 8 steps (the classes and keys stay the recipe's)."""
    config = yaml.safe_load((REPO / "recipes" / "mnist1d.yaml").read_text())
    config["trainer"].update(max_steps=8, log_every_n_steps=1, val_check_interval=4, enable_progress_bar=False)
    config["trainer"].pop("max_epochs")
    for callback in config["trainer"]["callbacks"]:
        name = callback["class_path"].rsplit(".", 1)[1]
        if name == "GradientNoiseScale":
            callback["init_args"].update(schedule=2, b_noise_schedule=2)
        elif name == "GradientDiversity":
            callback["init_args"].update(schedule=4, probe_size=50)
        elif name == "CurvatureSpectrum":
            callback["init_args"].update(schedule=4, k=3, lanczos_iterations=6, trace_matvecs=6,
                                         probe_batch_size=50)
    config["data"]["init_args"].update(num_train=200, num_val=100, num_test=100, batch_size=50)
    path = folder / "mnist1d.yaml"  # the recipe's name: the W&B run's group
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


class FailAtFitStart(pl.Callback):
    """Fails after the loggers were set up and the hyper-parameters and config logged, before any metric."""

    def on_fit_start(self, trainer, pl_module):
        logger = trainer.loggers[0]  # the config is waiting for the run, which has not started
        assert not logger.started and "model" in logger._pending_config[-1]
        raise RuntimeError("refused at fit start")


def test_recipe_fit_reads_back_with_config_name_group_charts_and_uncertainty(tmp_path):
    cli = run(["fit", "--config", str(_small_recipe(tmp_path))])
    wandb_logger = next(lg for lg in cli.trainer.loggers if hasattr(lg, "last_run_dir"))
    run_dir = Path(wandb_logger.last_run_dir)
    offline = read_complete_run(run_dir)

    assert offline.project == "lightning-sgd" and offline.group == "mnist1d" and offline.name.startswith("mnist1d-")
    config = offline.config  # the full resolved config: optimizer, LR, network, trainer, callbacks, seed
    assert config["seed_everything"] == 0
    model = config["model"]["init_args"]
    assert model["optimizer"]["class_path"] == "torch.optim.Adam" and model["optimizer"]["init_args"]["lr"] == 0.01
    assert model["network"]["class_path"] == "lightning_sgd.recipes.MNIST1DCNN"
    assert config["trainer"]["max_steps"] == 8
    assert [c["class_path"].rsplit(".", 1)[1] for c in config["trainer"]["callbacks"]] == [
        "GradientNoiseScale", "GradientDiversity", "CurvatureSpectrum"]
    # config.yaml saved with this run (W&B files and the CSV log folder), not one shared runs/config.yaml
    csv_logger = next(lg for lg in cli.trainer.loggers if isinstance(lg, pl.loggers.CSVLogger))
    saved = (run_dir / "files" / "config.yaml").read_text()
    assert saved == (Path(csv_logger.log_dir) / "config.yaml").read_text()
    assert yaml.safe_load(saved)["model"] == config["model"]
    assert not (tmp_path / "runs" / "config.yaml").exists()

    keys = offline.keys()
    assert "charts/curvature_hessian_spectrum_table/path" in keys  # the multi-line chart, with every point:
    (table,) = (run_dir / "files" / "media" / "table" / "charts").glob("curvature_hessian_spectrum_table*.json")
    chart = json.loads(table.read_text())
    assert chart["columns"] == ["step", "lineKey", "lineVal"]
    points = {(line, step): value for step, line, value in chart["data"]}
    history = {(k.rsplit("/", 1)[1], row["trainer/global_step"]): v for row in offline.history
               for k, v in row.items() if k.startswith("curvature/hessian/eig_")}
    assert points == history and {line for line, _ in points} == {"eig_0", "eig_1", "eig_2"}
    assert {"gns/b_simple", "gns/b_simple_se", "gns/b_noise", "gns/b_noise_se"} <= keys  # values and their errors
    assert {"diag/curvature/hessian/matvecs", "diag/curvature/hessian/residual_0"} <= keys
    assert not any(k.startswith("curvature/hessian/residual") for k in keys)
    assert offline.metrics["val/acc"]["summary"] == ["max"] and offline.metrics["val/loss"]["summary"] == ["min"]
    assert offline.metrics["curvature/hessian/eig_0"]["summary"] == ["max"]

    # the report reads the W&B run as well as the CSV log, to the same recommendation
    from_wandb, from_csv = load_run(run_dir), load_run(Path(csv_logger.log_dir))
    assert recommend(from_wandb) == recommend(from_csv) and recommend(from_csv) is not None
    assert "Gradient noise scale" in write_report(from_wandb, tmp_path / "wandb_report").read_text()


def test_a_run_that_fails_before_its_first_metric_leaves_no_wandb_run(tmp_path):
    recipe = _small_recipe(tmp_path)
    with pytest.raises(RuntimeError, match="refused at fit start"):
        run(["fit", "--config", str(recipe), "--trainer.callbacks+=tests.test_wandb.FailAtFitStart"])
    assert not list((tmp_path / "runs" / "wandb").glob("offline-run-*"))


@pytest.mark.parametrize("package", ["pytorch_lightning", "lightning.pytorch"])
def test_curvature_plots_go_to_either_packages_own_wandb_logger(package, tmp_path):
    import importlib

    from lightning_sgd.callbacks import CurvatureSpectrum
    from tests.helpers import fast_trainer_kwargs
    from tests.test_lightning_packages import boring_module

    lightning = importlib.import_module(package)
    logger = lightning.loggers.WandbLogger(save_dir=str(tmp_path), offline=True)  # Lightning's own class
    callback = CurvatureSpectrum(schedule=100, k=2, lanczos_iterations=4, trace_matvecs=0, alignment=True,
                                 probe_batch_size=8)
    trainer = lightning.Trainer(**fast_trainer_kwargs(max_steps=1, logger=logger, callbacks=[callback]))
    trainer.fit(boring_module(package))
    run_dir = Path(logger.experiment.dir).parent
    logger.experiment.finish()
    keys = read_complete_run(run_dir).keys()
    assert any(k.startswith("curvature/hessian/spectrum") for k in keys)
    assert any(k.startswith("curvature/hessian/alignment_table") for k in keys)



def test_chart_lines_group_the_spectrum_and_the_two_worlds():
    from lightning_sgd.loggers import chart_line

    assert chart_line("curvature/hessian/eig_12") == ("curvature_hessian_spectrum", "eig_12")
    assert chart_line("bootstrap/ideal_val_error") == ("bootstrap_real_vs_ideal", "ideal_val_error")
    for key in ("curvature/hessian/eig_0_stderr", "diag/curvature/hessian/residual_0", "bootstrap/gap",
                "bootstrap/real_test_loss"):
        assert chart_line(key) is None
