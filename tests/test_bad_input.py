"""Bad constructor values and bad setups: a TypeError/ValueError naming the class and the argument, raised at
construction (or, for what needs the trainer and the data, a clear error or warning before the first training step);
a sweep storage that cannot be opened: one line naming the URL, in seconds."""

from __future__ import annotations

import contextlib
import math
import socket
import threading
import time
import warnings

import pytest
import pytorch_lightning as pl

from lightning_sgd.callbacks import CurvatureSpectrum, DeepBootstrap, GradientDiversity, GradientNoiseScale
from lightning_sgd.cli import run as cli_run
from lightning_sgd.plugins import (
    AdaptiveBatchSize,
    BatchSizeSchedule,
    GhostBatchNorm,
    GhostBatchNormCallback,
    GradStatsDDPStrategy,
)
from lightning_sgd.plugins.ema_weights import EMAWeights
from lightning_sgd.plugins.lr_warmup_scaling import LRWarmupScaling
from lightning_sgd.schedules import EveryNSteps, LogSpaced, as_schedule
from tests.helpers import TinyDataModule, fast_trainer_kwargs, tiny_module

NAN, INF = math.nan, math.inf
T, V = TypeError, ValueError

# (class, keyword arguments, error, the argument the message must name)
CASES = [
    # GradientNoiseScale
    (GradientNoiseScale, {"split_parts": 2.5}, T, "split_parts"),
    (GradientNoiseScale, {"split_parts": True}, T, "split_parts"),
    (GradientNoiseScale, {"split_parts": 1}, V, "split_parts"),
    (GradientNoiseScale, {"chunk_size": 0}, V, "chunk_size"),
    (GradientNoiseScale, {"chunk_size": 8.0}, T, "chunk_size"),
    (GradientNoiseScale, {"beta": NAN}, V, "beta"),
    (GradientNoiseScale, {"beta": 1.0}, V, "beta"),
    (GradientNoiseScale, {"beta": -0.1}, V, "beta"),
    (GradientNoiseScale, {"beta": "0.9"}, T, "beta"),
    (GradientNoiseScale, {"b_noise_groups": 1}, V, "b_noise_groups"),
    (GradientNoiseScale, {"b_noise_groups": 3.5}, T, "b_noise_groups"),
    (GradientNoiseScale, {"schedule": 2.5}, T, "schedule"),
    (GradientNoiseScale, {"schedule": 0}, V, "schedule"),
    (GradientNoiseScale, {"schedule": True}, T, "schedule"),
    (GradientNoiseScale, {"b_noise_schedule": -3}, V, "b_noise_schedule"),
    (GradientNoiseScale, {"b_noise_schedule": "often"}, T, "b_noise_schedule"),
    (GradientNoiseScale, {"per_layer": "yes"}, T, "per_layer"),
    (GradientNoiseScale, {"source": "both"}, V, "source"),
    (GradientNoiseScale, {"engine": "jit"}, V, "engine"),
    (GradientNoiseScale, {"layers": "attention"}, V, "layers"),
    (GradientNoiseScale, {"source": 3}, T, "source"),
    # GradientDiversity
    (GradientDiversity, {"probe_size": 2.5}, T, "probe_size"),
    (GradientDiversity, {"probe_size": 1}, V, "probe_size"),
    (GradientDiversity, {"probe_size": False}, T, "probe_size"),
    (GradientDiversity, {"delta": 0.0}, V, "delta"),
    (GradientDiversity, {"delta": NAN}, V, "delta"),
    (GradientDiversity, {"delta": 1.5}, V, "delta"),
    (GradientDiversity, {"chunk_size": -1}, V, "chunk_size"),
    (GradientDiversity, {"schedule": 0}, V, "schedule"),
    (GradientDiversity, {"schedule": 1.5}, T, "schedule"),
    (GradientDiversity, {"per_layer": 1}, T, "per_layer"),
    (GradientDiversity, {"engine": "x"}, V, "engine"),
    # CurvatureSpectrum
    (CurvatureSpectrum, {"k": 2.5}, T, "k"),
    (CurvatureSpectrum, {"k": 0}, V, "k"),
    (CurvatureSpectrum, {"lanczos_iterations": 3}, V, "lanczos_iterations"),
    (CurvatureSpectrum, {"lanczos_iterations": 30.0}, T, "lanczos_iterations"),
    (CurvatureSpectrum, {"trace_matvecs": -1}, V, "trace_matvecs"),
    (CurvatureSpectrum, {"trace_matvecs": 2}, V, "trace_matvecs"),
    (CurvatureSpectrum, {"frobenius_matvecs": 1.5}, T, "frobenius_matvecs"),
    (CurvatureSpectrum, {"density_runs": -2}, V, "density_runs"),
    (CurvatureSpectrum, {"density_steps": 1}, V, "density_steps"),
    (CurvatureSpectrum, {"alignment": "no"}, T, "alignment"),
    (CurvatureSpectrum, {"probe_batches": 0}, V, "probe_batches"),
    (CurvatureSpectrum, {"probe_batches": 1.5}, T, "probe_batches"),
    (CurvatureSpectrum, {"probe_batch_size": 0}, V, "probe_batch_size"),
    (CurvatureSpectrum, {"mode": "test"}, V, "mode"),
    (CurvatureSpectrum, {"operator": "fisher"}, V, "operator"),
    (CurvatureSpectrum, {"time_budget": INF}, V, "time_budget"),
    (CurvatureSpectrum, {"time_budget": 0}, V, "time_budget"),
    (CurvatureSpectrum, {"at_fit_end": None}, T, "at_fit_end"),
    (CurvatureSpectrum, {"seed": 0.5}, T, "seed"),
    (CurvatureSpectrum, {"schedule": 0}, V, "schedule"),
    # EMAWeights
    (EMAWeights, {"decay": NAN}, V, "decay"),
    (EMAWeights, {"decay": 1.0}, V, "decay"),
    (EMAWeights, {"half_life_samples": INF}, V, "half_life_samples"),
    (EMAWeights, {"half_life_samples": NAN}, V, "half_life_samples"),
    (EMAWeights, {"half_life_samples": -5}, V, "half_life_samples"),
    (EMAWeights, {"warmup": "yes"}, T, "warmup"),
    (EMAWeights, {"warmup_gamma": 0}, V, "warmup_gamma"),
    (EMAWeights, {"warmup_power": INF}, V, "warmup_power"),
    (EMAWeights, {"update_every_n_steps": 2.5}, T, "update_every_n_steps"),
    (EMAWeights, {"update_every_n_steps": 0}, V, "update_every_n_steps"),
    (EMAWeights, {"start_step": 1.5}, T, "start_step"),
    (EMAWeights, {"start_step": -1}, V, "start_step"),
    (EMAWeights, {"bn_buffers": "median"}, V, "bn_buffers"),
    (EMAWeights, {"recalibrate_batches": 0}, V, "recalibrate_batches"),
    (EMAWeights, {"recalibrate_batches": 2.0}, T, "recalibrate_batches"),
    (EMAWeights, {"validate": "x"}, V, "validate"),
    (EMAWeights, {"device": "gpu0"}, V, "device"),
    (EMAWeights, {"device": 0}, T, "device"),
    # LRWarmupScaling
    (LRWarmupScaling, {"reference_batch_size": 0}, V, "reference_batch_size"),
    (LRWarmupScaling, {"reference_batch_size": 256.5}, T, "reference_batch_size"),
    (LRWarmupScaling, {"rule": "cubic"}, V, "rule"),
    (LRWarmupScaling, {"warmup_steps": 2.5}, T, "warmup_steps"),
    (LRWarmupScaling, {"warmup_steps": -1}, V, "warmup_steps"),
    (LRWarmupScaling, {"warmup_epochs": NAN}, V, "warmup_epochs"),
    (LRWarmupScaling, {"warmup_epochs": INF}, V, "warmup_epochs"),
    (LRWarmupScaling, {"warmup_epochs": -1.0}, V, "warmup_epochs"),
    (LRWarmupScaling, {"warmup_start_factor": NAN}, V, "warmup_start_factor"),
    (LRWarmupScaling, {"warmup_start_factor": 2.0}, V, "warmup_start_factor"),
    (LRWarmupScaling, {"batch_size": 0}, V, "batch_size"),
    (LRWarmupScaling, {"batch_size": 16.5}, T, "batch_size"),
    # DeepBootstrap
    (DeepBootstrap, {"split": "train"}, V, "split"),
    (DeepBootstrap, {"max_eval_examples": 2.5}, T, "max_eval_examples"),
    (DeepBootstrap, {"max_eval_examples": 0}, V, "max_eval_examples"),
    (DeepBootstrap, {"max_train_eval_examples": -1}, V, "max_train_eval_examples"),
    (DeepBootstrap, {"max_train_eval_examples": "all"}, T, "max_train_eval_examples"),
    (DeepBootstrap, {"online": "yes"}, T, "online"),
    (DeepBootstrap, {"seed": 1.5}, T, "seed"),
    (DeepBootstrap, {"plot": 1}, T, "plot"),
    (DeepBootstrap, {"schedule": 0}, V, "schedule"),
    (DeepBootstrap, {"schedule": NAN}, T, "schedule"),
    # ghost batch norm (a wrong type of ghost_batch_size is a ValueError: the layer's contract since 0.1.0)
    (GhostBatchNorm, {"num_features": 4, "ghost_batch_size": 2.5}, V, "ghost_batch_size"),
    (GhostBatchNorm, {"num_features": 4, "ghost_batch_size": -8}, V, "ghost_batch_size"),
    (GhostBatchNorm, {"num_features": 0}, V, "num_features"),
    (GhostBatchNorm, {"num_features": 4.0}, T, "num_features"),
    (GhostBatchNorm, {"num_features": 4, "eps": -1e-5}, V, "eps"),
    (GhostBatchNorm, {"num_features": 4, "eps": INF}, V, "eps"),
    (GhostBatchNorm, {"num_features": 4, "momentum": 1.5}, V, "momentum"),
    (GhostBatchNorm, {"num_features": 4, "momentum": NAN}, V, "momentum"),
    (GhostBatchNormCallback, {"ghost_batch_size": True}, V, "ghost_batch_size"),
    (GhostBatchNormCallback, {"ghost_batch_size": 0}, V, "ghost_batch_size"),
    (GhostBatchNormCallback, {"ghost_batch_size": 8, "include_sync_batchnorm": "no"}, T, "include_sync_batchnorm"),
    # BatchSizeSchedule / AdaptiveBatchSize
    (BatchSizeSchedule, {"milestones": 3}, T, "milestones"),
    (BatchSizeSchedule, {"milestones": [2.5]}, T, "milestone"),
    (BatchSizeSchedule, {"milestones": [-1]}, V, "milestone"),
    (BatchSizeSchedule, {"milestones": [3, 2]}, V, "milestones"),
    (BatchSizeSchedule, {"milestones": [3], "factors": NAN}, V, "factor"),
    (BatchSizeSchedule, {"milestones": [3], "factors": INF}, V, "factor"),
    (BatchSizeSchedule, {"milestones": [3], "factors": -2.0}, V, "factor"),
    (BatchSizeSchedule, {"milestones": [3], "factors": "2"}, T, "factors"),
    (BatchSizeSchedule, {"milestones": [3], "factors": [2.0, 3.0]}, V, "factors"),
    (BatchSizeSchedule, {"milestones": [3], "interval": "batch"}, V, "interval"),
    (BatchSizeSchedule, {"milestones": [3], "lr_rule": "cube"}, V, "lr_rule"),
    (AdaptiveBatchSize, {"max_batch_size": 0}, V, "max_batch_size"),
    (AdaptiveBatchSize, {"max_batch_size": 2.5}, T, "max_batch_size"),
    (AdaptiveBatchSize, {"max_batch_size": 64, "every_n_steps": 2.5}, T, "every_n_steps"),
    (AdaptiveBatchSize, {"max_batch_size": 64, "start_step": -1}, V, "start_step"),
    (AdaptiveBatchSize, {"max_batch_size": 64, "target_ratio": NAN}, V, "target_ratio"),
    (AdaptiveBatchSize, {"max_batch_size": 64, "target_ratio": 0}, V, "target_ratio"),
    (AdaptiveBatchSize, {"max_batch_size": 64, "hysteresis": -0.1}, V, "hysteresis"),
    (AdaptiveBatchSize, {"max_batch_size": 64, "hysteresis": INF}, V, "hysteresis"),
    (AdaptiveBatchSize, {"max_batch_size": 64, "max_per_device_batch_size": 0}, V, "max_per_device_batch_size"),
    (AdaptiveBatchSize, {"max_batch_size": 64, "accumulate": "yes"}, T, "accumulate"),
    (AdaptiveBatchSize, {"max_batch_size": 64, "accumulate": True}, V, "max_per_device_batch_size"),
    (AdaptiveBatchSize, {"max_batch_size": 64, "multiple_of": 0}, V, "multiple_of"),
    (AdaptiveBatchSize, {"max_batch_size": 64, "min_measurements": 1.5}, T, "min_measurements"),
    (AdaptiveBatchSize, {"max_batch_size": 64, "max_growth": 1.0}, V, "max_growth"),
    (AdaptiveBatchSize, {"max_batch_size": 64, "max_growth": NAN}, V, "max_growth"),
    (AdaptiveBatchSize, {"max_batch_size": 64, "lr_rule": "cube"}, V, "lr_rule"),
    (AdaptiveBatchSize, {"max_batch_size": 64, "noise_scale": 3}, T, "noise_scale"),
    # GradStatsDDPStrategy
    (GradStatsDDPStrategy, {"every_n_steps": 0}, V, "every_n_steps"),
    (GradStatsDDPStrategy, {"every_n_steps": 2.5}, T, "every_n_steps"),
    (GradStatsDDPStrategy, {"max_logged_ranks": -1}, V, "max_logged_ranks"),
    (GradStatsDDPStrategy, {"max_logged_ranks": 1.5}, T, "max_logged_ranks"),
    (GradStatsDDPStrategy, {"log_grad_norms": "yes"}, T, "log_grad_norms"),
    # schedules
    (EveryNSteps, {"interval": 2.5}, T, "interval"),
    (EveryNSteps, {"interval": 0}, V, "interval"),
    (EveryNSteps, {"offset": -1}, V, "offset"),
    (EveryNSteps, {"offset": 0.5}, T, "offset"),
    (LogSpaced, {"start": -1}, V, "start"),
    (LogSpaced, {"start": 10, "end": 5}, V, "end"),
    (LogSpaced, {"end": 1e6}, T, "end"),
    (LogSpaced, {"per_decade": 0}, V, "per_decade"),
]


@pytest.mark.parametrize("cls, kwargs, error, argument", CASES,
                         ids=[f"{c.__name__}-{k}" for c, k, _, _ in CASES])
def test_constructor_refuses_bad_values_naming_class_and_argument(cls, kwargs, error, argument):
    with pytest.raises(error) as info:
        cls(**kwargs)
    message = str(info.value)
    assert message.startswith(f"{cls.__name__}: {argument} must be ") or (
        # the few values that are only wrong together with another one say so
        cls.__name__ in message and argument in message), message


def test_as_schedule_names_the_callback_and_argument():
    with pytest.raises(TypeError, match=r"^GradientDiversity: schedule must be an int >= 1 .*got 2\.5 \(float\)"):
        as_schedule(2.5, "GradientDiversity", "schedule")
    with pytest.raises(ValueError, match="^CurvatureSpectrum: schedule must be an int >= 1"):
        as_schedule(0, "CurvatureSpectrum")
    assert as_schedule(3).interval == 3  # type: ignore[attr-defined]


def test_good_values_are_stored_as_given():
    gns = GradientNoiseScale(split_parts=3, chunk_size=None, beta=0.9, b_noise_groups=2, b_noise_schedule=5)
    assert (gns.split_parts, gns.chunk_size, gns.beta, gns.b_noise_groups) == (3, None, 0.9, 2)
    assert EMAWeights(half_life_samples=1000).half_life_samples == 1000.0
    assert LRWarmupScaling(warmup_epochs=2).warmup_epochs == 2.0


# ------------------------------------------------------------------------------------------------- at setup
def _fit(callback: pl.Callback, n: int = 32, batch_size: int = 16, max_steps: int = 2) -> pl.Trainer:
    trainer = pl.Trainer(**fast_trainer_kwargs(max_steps=max_steps, callbacks=[callback]))
    trainer.fit(tiny_module(), datamodule=TinyDataModule(n=n, batch_size=batch_size))
    return trainer


class _StepCounter(pl.Callback):
    def __init__(self) -> None:
        self.steps = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.steps += 1


def test_diversity_probe_larger_than_the_data_fails_before_the_first_step():
    counter = _StepCounter()
    trainer = pl.Trainer(**fast_trainer_kwargs(max_steps=2, callbacks=[GradientDiversity(probe_size=100), counter]))
    with pytest.raises(ValueError, match=r"GradientDiversity: probe_size=100 is larger than the training data.*"
                                         r"only 40 example\(s\).*probe_size <= 40"):
        trainer.fit(tiny_module(), datamodule=TinyDataModule(n=40, batch_size=8))
    assert counter.steps == 0


def test_ema_start_step_past_the_run_warns_at_train_start():
    with pytest.warns(UserWarning, match=r"EMAWeights: start_step=10 is past the end of training \(2 optimizer "
                                         r"steps\).*never starts"):
        _fit(EMAWeights(start_step=10), max_steps=2)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*start_step")
        _fit(EMAWeights(start_step=1), max_steps=2)  # starts at the last step: no warning


def test_b_noise_on_a_batch_too_small_to_split_warns_naming_b_noise_groups():
    gns = GradientNoiseScale(source="split", schedule=1, b_noise_schedule=1, b_noise_groups=4)
    with pytest.warns(UserWarning, match=r"GradientNoiseScale: a batch of 6 example\(s\) is too small for the "
                                         r"B_noise estimate with b_noise_groups=4.*>= 2 \* b_noise_groups = 8") as rec:
        _fit(gns, n=12, batch_size=6, max_steps=2)
    assert sum("b_noise_groups=4" in str(w.message) for w in rec) == 1  # once, at train start
    assert gns.skipped["too_few"] == 2 and math.isnan(gns.b_noise)


# -------------------------------------------------------------------------------------------- sweep storage
def _sweep(storage: str) -> list[str]:
    return ["sweep", "--config", "does-not-matter.yaml", "--sweep.batch_sizes=[8]", "--sweep.target=0.5",
            f"--sweep.storage={storage}", "--no_progress=true", "--sweep.wandb=false"]


def test_sqlite_storage_in_a_missing_folder_is_one_line(tmp_path):
    url = f"sqlite:///{tmp_path}/missing/sweep.db"
    with pytest.raises(SystemExit) as info:
        cli_run(_sweep(url))
    message = str(info.value.code)
    assert message.startswith(f"lightning-sgd sweep: cannot open sweep.storage {url}: the folder ")
    assert "\n" not in message and not (tmp_path / "missing").exists()


@pytest.mark.timeout(60)
def test_unreachable_postgres_storage_fails_in_seconds_naming_the_url(monkeypatch):
    pytest.importorskip("psycopg2")
    import lightning_sgd.sweep.runner as runner

    monkeypatch.setattr(runner, "CONNECT_TIMEOUT_S", 2)
    with socket.socket() as silent:  # accepts the TCP connection, then never answers: a hung server
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        stop = threading.Event()
        held: list[socket.socket] = []

        def accept() -> None:
            silent.settimeout(0.2)
            while not stop.is_set():
                with contextlib.suppress(OSError):  # the accept timed out: look at `stop` again
                    held.append(silent.accept()[0])

        thread = threading.Thread(target=accept, daemon=True)
        thread.start()
        url = f"postgresql+psycopg2://sweeper:secret@127.0.0.1:{port}/sweeps"
        start = time.monotonic()
        try:
            with pytest.raises(SystemExit) as info:
                cli_run(_sweep(url))
        finally:
            stop.set()
            thread.join()
            for conn in held:
                conn.close()
    elapsed = time.monotonic() - start
    message = str(info.value.code)
    assert message.startswith(f"lightning-sgd sweep: cannot open sweep.storage postgresql+psycopg2://sweeper:***@"
                              f"127.0.0.1:{port}/sweeps: ")
    assert "secret" not in message and "\n" not in message
    assert elapsed < 20, elapsed


# ------------------------------------------------------------------------------------------------ CLI entry points
# (argv, exit code, text the one-line error must hold: the argument it names). Run in-process through the console
# script's main() from an empty folder: the error comes before any training (no checkpoint, no run folder).
CLI_CASES = [
    (["fit", "--config", "mnist1d", "--data.batch_size=0"], 2, "batch_size"),
    (["fit", "--config", "mnist1d", "--data.batch_size=2.5"], 2, "batch_size"),
    (["fit", "--config", "mnist1d", "--threads=0"], 2, "--threads"),
    (["fit", "--config", "mnist1d", "--trainer.max_steps=abc"], 2, "max_steps"),
    (["fit", "--config", "mnist1d", "--trainer.callbacks+=lightning_sgd.callbacks.GradientNoiseScale",
      "--trainer.callbacks.init_args.beta=nan"], 2, "beta"),
    (["fit", "--config", "mnist1d", "--trainer.callbacks+=lightning_sgd.callbacks.CurvatureSpectrum",
      "--trainer.callbacks.init_args.k=0"], 2, "k"),
    (["fit", "--config", "no_such_recipe"], 2, "no_such_recipe"),
    (["sweep", "--sweep", "RECIPES/mnist1d_sweep.yaml", "--sweep.trials=0"], 1, "sweep.trials"),
    (["sweep", "--sweep", "RECIPES/mnist1d_sweep.yaml", "--sweep.gns_beta=1.5"], 1, "sweep.gns_beta"),
    (["sweep", "--sweep", "RECIPES/mnist1d_sweep.yaml", "--sweep.max_steps=-5"], 1, "sweep.max_steps"),
    (["sweep", "--sweep", "RECIPES/mnist1d_sweep.yaml", "--sweep.batch_sizes=[0,16]"], 1, "sweep.batch_sizes"),
    (["sweep", "--sweep", "RECIPES/mnist1d_sweep.yaml", "--sweep.gns_every=2.5"], 2, "sweep.gns_every"),
    (["sweep", "--sweep", "no_such_sweep.yaml"], 2, "no_such_sweep.yaml"),
    (["report", "no_such_run"], 1, "no_such_run"),
    (["nqm", "steps", "--batch-sizes", "-3"], 2, "--batch-sizes"),
    (["nqm", "steps", "--batch-sizes", "inf"], 2, "--batch-sizes"),
]


@pytest.mark.parametrize("argv, code, names", CLI_CASES, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_cli_entry_points_refuse_bad_values_in_one_line_before_training(argv, code, names, tmp_path, monkeypatch,
                                                                         capsys):
    from pathlib import Path

    from lightning_sgd.cli import main

    recipes = Path(__file__).resolve().parents[1] / "recipes"
    argv = [a.replace("RECIPES", str(recipes)) for a in argv]
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    status = exit_info.value.code
    message = status if isinstance(status, str) else err  # SystemExit("message") exits 1 with it on stderr
    assert (1 if isinstance(status, str) else status) == code, (status, err[-2000:])
    assert names in message, message[-2000:]
    assert "Traceback" not in message
    written = [p for p in tmp_path.rglob("*") if p.is_file()]  # (a logger may have made its empty folder)
    assert written == [], f"written before the error: {written}"
