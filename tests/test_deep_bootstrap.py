"""DeepBootstrap and its helpers: fresh streams, pools, metrics, twin alignment, isolation, resume, bad input."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_sgd.bootstrap import ChunkedStream, PoolSampler, PrivateRNG, batch_metrics, evaluate, split_pool
from lightning_sgd.callbacks import DeepBootstrap
from lightning_sgd.data.mnist1d import generate_mnist1d
from lightning_sgd.recipes.classification import ClassificationModule
from lightning_sgd.recipes.mnist_1d import MNIST1DDataModule, fresh_chunk_seed, split_seed
from lightning_sgd.schedules import EveryNSteps
from tests.ddp import run_ddp
from tests.helpers import TinyDataModule, fast_trainer_kwargs

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread (tests/conftest.py)


# ------------------------------------------------------------------------------------------- test data modules
class TeacherData(pl.LightningDataModule):
    """Gaussian inputs labelled by a fixed noisy linear teacher; train, test and fresh draws use disjoint seeds."""

    def __init__(self, n_train: int, n_test: int = 1000, batch_size: int = 16, features: int = 10,
                 classes: int = 3, chunk: int = 256) -> None:
        super().__init__()
        self.features, self.batch_size = features, batch_size
        self.teacher = torch.randn(features, classes, generator=torch.Generator().manual_seed(123))
        self.x, self.y = self.sample(n_train, seed=1)
        self.x_test, self.y_test = self.sample(n_test, seed=2)
        self.stream = ChunkedStream(lambda i: self.sample(chunk, seed=1000 + i), chunk)

    def sample(self, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, self.features, generator=g)
        y = (x @ self.teacher + 0.7 * torch.randn(n, self.teacher.shape[1], generator=g)).argmax(1)
        return x, y

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x, self.y), batch_size=self.batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x_test, self.y_test), batch_size=500)

    def fresh_batch(self, start: int, size: int):
        return self.stream.take(start, size)


class EchoData(TeacherData):
    """The 'fresh' stream replays the training set in the order the real world reads it (no shuffling)."""

    def fresh_batch(self, start: int, size: int):
        n = len(self.y)
        idx = torch.arange(start, start + size) % n
        return self.x[idx], self.y[idx]


class PoolData(TeacherData):
    """No stream: a held-out pool of ``pool`` examples instead."""

    fresh_batch = None  # type: ignore[assignment]

    def __init__(self, *args, pool: int = 40, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.pool = TensorDataset(*self.sample(pool, seed=3))

    def fresh_pool(self):
        return self.pool


class NaNAfter(TeacherData):
    """Fresh inputs become NaN from example ``bad_from`` on: the twin diverges, the real world does not."""

    def __init__(self, *args, bad_from: int = 48, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.bad_from = bad_from

    def fresh_batch(self, start: int, size: int):
        x, y = super().fresh_batch(start, size)
        if start + size > self.bad_from:
            x = torch.full_like(x, float("nan"))
        return x, y


class EvalTurnsInf(TeacherData):
    """The test set is read ``finite_passes`` times as it is, then with infinite inputs (a non-finite test loss)."""

    def __init__(self, *args, finite_passes: int = 4, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.finite_passes, self.passes = finite_passes, 0

    def test_dataloader(self):
        data = self

        class Passes:
            batch_size = 500

            def __iter__(self):
                data.passes += 1
                scale = 1.0 if data.passes <= data.finite_passes else float("inf")
                for start in range(0, len(data.y_test), 500):
                    yield data.x_test[start:start + 500] * scale, data.y_test[start:start + 500]

        return Passes()


def mlp_module(features: int = 10, hidden: int = 16, classes: int = 3, lr: float = 0.1, dropout: float = 0.0,
               seed: int = 0, scheduler: bool = False, momentum: float = 0.0,
               interval: str = "step") -> ClassificationModule:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, classes))

    def sched(opt):
        return torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)

    return ClassificationModule(net, num_classes=classes,
                                optimizer=lambda p: torch.optim.SGD(p, lr=lr, momentum=momentum),
                                lr_scheduler=sched if scheduler else None, scheduler_interval=interval)


def fit(module, dm, callbacks=(), **overrides) -> pl.Trainer:
    trainer = pl.Trainer(**fast_trainer_kwargs(callbacks=list(callbacks), **overrides))
    trainer.fit(module, datamodule=dm)
    return trainer


def params(module: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


# ------------------------------------------------------------------------------------------------- pure helpers
def test_chunked_stream_gives_deterministic_random_access_across_chunks():
    calls = []

    def make(i):
        calls.append(i)
        return torch.arange(i * 10, i * 10 + 10), -torch.arange(i * 10, i * 10 + 10)

    stream = ChunkedStream(make, chunk_size=10)
    a, b = stream.take(7, 25)  # spans chunks 0, 1, 2, 3
    assert torch.equal(a, torch.arange(7, 32)) and torch.equal(b, -torch.arange(7, 32))
    assert torch.equal(stream.take(30, 3)[0], torch.arange(30, 33))
    assert calls == [0, 1, 2, 3]  # sequential reads generate each chunk once
    with pytest.raises(ValueError, match="expected 10"):
        ChunkedStream(lambda i: (torch.zeros(3),), chunk_size=10).take(0, 1)


def test_pool_sampler_is_without_replacement_and_split_pool_is_disjoint():
    data = TensorDataset(torch.arange(50).float(), torch.arange(50))
    pool = PoolSampler(data, seed=1)
    seen = torch.cat([pool.take(start, 10)[1] for start in range(0, 50, 10)])
    assert sorted(seen.tolist()) == list(range(50))  # every example exactly once
    assert not torch.equal(seen, torch.arange(50))  # in a seeded random order
    assert torch.equal(PoolSampler(data, seed=1).take(0, 10)[1], seen[:10])
    with pytest.raises(IndexError, match="holds 50"):
        pool.take(45, 10)
    train, rest = split_pool(data, 30, seed=0)
    assert len(train) == 30 and len(rest) == 20 and not set(train.indices) & set(rest.indices)


def test_private_rng_leaves_global_rng_untouched_and_is_resumable():
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    rng = PrivateRNG(seed=0)
    with rng:
        first = torch.rand(2)
    state = rng.state_dict()
    with rng:
        second = torch.rand(2)
    assert torch.equal(torch.rand(3), expected)  # the global stream did not move
    other = PrivateRNG(seed=123)
    other.load_state_dict(state)
    with other:
        assert torch.equal(torch.rand(2), second)  # resumes the private stream where it was saved
    with PrivateRNG(seed=0):
        assert torch.equal(torch.rand(2), first)


def test_batch_metrics_and_evaluate_match_brute_force():
    torch.manual_seed(0)
    module = mlp_module()
    x, y = torch.randn(70, 10), torch.randint(0, 3, (70,))
    logits = module(x).detach()
    probs = torch.softmax(logits, 1)
    got = evaluate(module, DataLoader(TensorDataset(x, y), batch_size=32))  # batches of 32, 32, 6
    assert got["loss"] == pytest.approx(float(nn.functional.cross_entropy(logits, y)), rel=1e-5)
    assert got["error"] == pytest.approx(float((logits.argmax(1) != y).float().mean()), abs=1e-6)
    assert got["soft_error"] == pytest.approx(float(1 - probs[torch.arange(70), y].mean()), rel=1e-5)
    capped = evaluate(module, DataLoader(TensorDataset(x, y), batch_size=32), max_examples=40)
    assert capped["error"] == pytest.approx(float((logits[:40].argmax(1) != y[:40]).float().mean()), abs=1e-6)
    assert batch_metrics(torch.randn(4), torch.zeros(4)) is None  # regression outputs: no error defined
    with pytest.raises(ValueError, match="no examples"):
        evaluate(module, [])
    assert evaluate(module, [], allow_empty=True) == {}  # EMAWeights: no validation batch, nothing to log


# ---------------------------------------------------------------------------------------------------- MNIST-1D
def test_mnist1d_fresh_stream_is_deterministic_disjoint_and_normalized(tmp_path):
    kwargs = dict(num_train=200, num_val=50, num_test=50, seed=5, fresh_chunk_size=150)
    dm = MNIST1DDataModule(cache_dir=str(tmp_path / "cache"), **kwargs)
    dm.setup()
    x, y = dm.fresh_batch(100, 120)  # spans chunks 0 and 1
    assert x.shape == (120, 40) and y.dtype == torch.int64
    raw0, _ = generate_mnist1d(150, fresh_chunk_seed(5, 0))
    assert torch.equal(x[:50], dm.normalize(raw0)[100:])  # per-chunk seeds, train-set normalization
    again = MNIST1DDataModule(cache_dir=None, **kwargs)
    again.setup()
    assert torch.equal(again.fresh_batch(100, 120)[0], x)  # a pure function of (start, size); cache is faithful
    assert torch.equal(torch.cat([dm.fresh_batch(0, 100)[0], x]), dm.fresh_batch(0, 220)[0])
    everything = torch.cat([dm.tensors[s][0] for s in ("train", "val", "test")])
    assert not (x[:, None, :] == everything[None]).all(-1).any()  # no fresh example is a train/val/test example
    assert fresh_chunk_seed(5, 0) not in {split_seed(5, s) for s in range(3)}
    assert len(list((tmp_path / "cache").glob("fresh-*.pt"))) == 2


# ---------------------------------------------------------------------------------------------- alignment
@pytest.mark.parametrize("interval, scheduler_steps", [("step", 4), ("epoch", 1)])
def test_twin_on_replayed_training_data_is_bit_identical_to_the_real_world(interval, scheduler_steps):
    """Ground truth for the alignment: if the 'fresh' stream replays the real training batches, both worlds see
    the same data, so with the same init, optimizer, schedule, accumulation and clipping they must stay equal.
    StepLR(3, 0.5) over 12 steps = 3 epochs of 4 steps: 4 decays per step, 1 per epoch."""
    dm = EchoData(n_train=64, batch_size=8)
    module = mlp_module(scheduler=True, momentum=0.9, interval=interval)
    cb = DeepBootstrap(schedule=1, online=False, plot=False)
    trainer = fit(module, dm, [cb], max_steps=12, accumulate_grad_batches=2, gradient_clip_val=0.5)
    assert cb.twin_steps == trainer.global_step == 12 and cb.fresh_position == 12 * 2 * 8
    assert same(params(cb.twin), params(module))
    lr = 0.1 * 0.5**scheduler_steps
    assert cb.optimizer.param_groups[0]["lr"] == trainer.optimizers[0].param_groups[0]["lr"] == lr
    gaps = [h["bootstrap/gap"] for h in cb.history]
    assert len(gaps) == 13 and all(g == 0.0 for g in gaps)  # steps 0..12


def test_twin_starts_bit_identical_and_never_changes_the_real_trajectory():
    class Recording(DeepBootstrap):
        def on_fit_start(self, trainer, pl_module):
            super().on_fit_start(trainer, pl_module)
            self.initial = (params(pl_module), params(self.twin))

    # dropout draws from the global torch RNG every step: any draw by the callback would shift the real world
    pl.seed_everything(3)
    plain = mlp_module(dropout=0.3)
    fit(plain, TeacherData(n_train=128), max_steps=10)
    pl.seed_everything(3)
    real = mlp_module(dropout=0.3)
    cb = Recording(schedule=2, plot=False)
    fit(real, TeacherData(n_train=128), [cb], max_steps=10)
    real_init, twin_init = cb.initial
    assert same(real_init, twin_init)
    assert same(params(real), params(plain))  # bit-identical with and without the callback
    assert not same(params(cb.twin), twin_init) and not same(params(cb.twin), params(real))
    assert "bootstrap/online_loss" in cb.history[1] and "bootstrap/ideal_online_loss" in cb.history[1]
    pl.seed_everything(99)  # the twin's own randomness (dropout) comes from its private, seeded stream only
    cb2 = DeepBootstrap(schedule=2, plot=False)
    fit(mlp_module(dropout=0.3), TeacherData(n_train=128), [cb2], max_steps=10)
    assert same(params(cb2.twin), params(cb.twin))


def test_gap_stays_near_zero_without_reuse_and_opens_with_reuse():
    """With less than one epoch both worlds train on fresh i.i.d. data: the gap is seed noise only. Tolerance:
    the two models differ only through which 2.4k i.i.d. examples they saw; a test error on 2000 examples has a
    standard deviation of ~0.01 and the two errors are positively correlated; over init seeds 0-3 the largest
    |gap| was 0.020, so |gap| < 0.04 fails only on a real misalignment. With n = 32 (75 epochs) the 64-unit MLP
    fits its data and the gap opens (0.20-0.23 over the same seeds): it must exceed 0.08."""
    hidden, steps, lr = 64, 150, 0.2
    no_reuse = DeepBootstrap(schedule=EveryNSteps(50), plot=False)
    fit(mlp_module(hidden=hidden, lr=lr), TeacherData(n_train=4000, n_test=2000), [no_reuse], max_steps=steps)
    reuse = DeepBootstrap(schedule=EveryNSteps(50), plot=False)
    fit(mlp_module(hidden=hidden, lr=lr), TeacherData(n_train=32, n_test=2000), [reuse], max_steps=steps)
    fresh_gaps = [h["bootstrap/gap"] for h in no_reuse.history[1:]]
    assert max(abs(g) for g in fresh_gaps) < 0.04, fresh_gaps
    final = reuse.history[-1]
    assert final["bootstrap/real_train_error"] < 0.1 < final["bootstrap/real_test_error"]
    assert final["bootstrap/gap"] > 0.08, final
    # the ideal worlds of both runs are the same twin (same init, same fresh stream), whatever n is
    assert no_reuse.history[-1]["bootstrap/ideal_test_error"] == final["bootstrap/ideal_test_error"]


# -------------------------------------------------------------------------------------------------- resume
def test_resume_restores_both_worlds(tmp_path):
    class Snapshot(pl.Callback):
        """Both worlds' weights after step 8: at the end of step 8 of the full run, at the start of the resumed one."""

        def __init__(self, cb):
            self.cb, self.at8 = cb, None

        def on_train_batch_end(self, trainer, pl_module, *args):
            if trainer.global_step == 8:
                self.at8 = (params(pl_module), params(self.cb.twin))

        def on_train_start(self, trainer, pl_module):
            if trainer.global_step == 8:
                self.at8 = (params(pl_module), params(self.cb.twin))

    def run(max_steps, ckpt_path=None):
        pl.seed_everything(0)
        cb = DeepBootstrap(schedule=EveryNSteps(4), plot=False)
        snap = Snapshot(cb)
        saver = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=8, save_top_k=-1, filename="{step}")
        module = mlp_module(dropout=0.2, scheduler=True, momentum=0.9)
        trainer = pl.Trainer(**fast_trainer_kwargs(callbacks=[cb, snap, saver], max_steps=max_steps,
                                                   enable_checkpointing=True))
        trainer.fit(module, datamodule=TeacherData(n_train=64, batch_size=8), ckpt_path=ckpt_path)
        return cb, snap

    full, full_snap = run(16)
    resumed, resumed_snap = run(16, ckpt_path=str(tmp_path / "step=8.ckpt"))
    for a, b in zip(full_snap.at8, resumed_snap.at8):
        assert same(a, b)  # the real world and the twin both come back as they were after step 8
    # the twin's continuation depends only on its own state (weights, momentum, LR schedule, private RNG for its
    # dropout, stream position), so it ends bit-identical to the uninterrupted run. (The real world's dropout uses
    # the global RNG, which Lightning does not checkpoint, so its continuation is not compared.)
    assert resumed.twin_steps == 16 and resumed.fresh_position == full.fresh_position == 16 * 8
    assert same(params(resumed.twin), params(full.twin))
    assert resumed.optimizer.param_groups[0]["lr"] == full.optimizer.param_groups[0]["lr"] == 0.1 * 0.5**5
    assert resumed.history[:3] == full.history[:3]  # the measurements before the checkpoint came back too
    assert [h["step"] for h in resumed.history] == [0, 4, 8, 12, 16]
    assert [h["bootstrap/ideal_test_error"] for h in resumed.history] == \
        [h["bootstrap/ideal_test_error"] for h in full.history]


# ---------------------------------------------------------------------------------------------- bad input
def test_datamodule_without_fresh_samples_is_refused_with_the_fix():
    with pytest.raises(MisconfigurationException, match=r"fresh_batch\(start, size\).*fresh_pool\(\)"):
        fit(mlp_module(features=25), TinyDataModule(), [DeepBootstrap(plot=False)], max_steps=2)


def test_small_pool_warns_once_with_the_steps_covered_and_stops_the_ideal_world():
    cb = DeepBootstrap(schedule=1, plot=False)
    with pytest.warns(RuntimeWarning, match=r"pool \(40 examples\) ran out after 2 twin steps") as record:
        fit(mlp_module(), PoolData(n_train=128, pool=40), [cb], max_steps=6)
    messages = [str(w.message) for w in record if "ran out" in str(w.message)]
    assert len(messages) == 1 and "need >= 96" in messages[0]  # 6 steps x batch 16
    assert [("bootstrap/ideal_test_error" in h) for h in cb.history] == [True, True, True, False, False, False, False]


def test_diverging_twin_is_logged_and_stopped_while_the_real_run_goes_on(tmp_path):
    pl.seed_everything(1)
    plain = mlp_module(dropout=0.3)
    fit(plain, TeacherData(n_train=128), max_steps=8)
    pl.seed_everything(1)
    real = mlp_module(dropout=0.3)
    cb = DeepBootstrap(schedule=1, plot=True)
    logger = pl.loggers.CSVLogger(str(tmp_path), name="csv")
    with pytest.warns(RuntimeWarning, match="non-finite at step 4"):
        fit(real, NaNAfter(n_train=128, bad_from=48), [cb], max_steps=8, logger=logger)  # batch 16: step 4 is bad
    assert same(params(real), params(plain))
    assert cb.stopped == "diverged at step 4" and cb.twin_steps == 3
    assert "bootstrap/ideal_test_error" in cb.history[3] and "bootstrap/ideal_test_error" not in cb.history[4]
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["step"] for r in rows if r.get("bootstrap/twin_diverged")] == ["4"]
    assert cb.plot_path is not None and Path(cb.plot_path).parent == Path(logger.log_dir)
    assert Path(cb.plot_path).stat().st_size > 1000


# ----------------------------------------------------------------------------------------------------------- DDP
@pytest.mark.ddp
def test_ddp_twin_equals_the_single_process_twin_at_the_global_batch(tmp_path):
    """Ground truth: 2 ranks x batch 8 reading consecutive slices of the stream, gradients averaged, is one process
    at batch 16 on the same examples (mean losses of equal halves average to the full mean); float32 sums in a
    different order: 1e-6."""
    rank0, rank1 = run_ddp("tests.ddp_entries_bootstrap:bootstrap_twin", tmp_path, steps=4, per_rank_batch=8)
    assert rank0["twin"] == rank1["twin"]  # the replicas of the twin stay identical
    assert rank0["fresh_pos"] == rank1["fresh_pos"] == 4 * 16 and rank0["steps"] == 4
    assert [h["step"] for h in rank0["history"]] == [0, 2, 4] and rank1["history"] == []  # rank 0 measures
    pl.seed_everything(0)
    cb = DeepBootstrap(schedule=2, plot=False)
    fit(mlp_module(momentum=0.9), TeacherData(n_train=128, batch_size=16), [cb], max_steps=4)
    single = torch.cat([p.detach().flatten() for p in cb.twin.parameters()])
    assert torch.allclose(torch.tensor(rank0["twin"]), single, atol=1e-6)
    assert not torch.allclose(single, torch.cat([p.flatten() for p in mlp_module().parameters()]))


@pytest.mark.ddp
def test_ddp_pool_running_out_on_one_rank_stops_every_rank(tmp_path):
    """Pool of 40, 8 examples per rank: at step 2 rank 0's share (32-39) exists, rank 1's (40-47) does not. Rank 1
    used to stop alone and leave rank 0 waiting in the twin's gradient all-reduce (a hang, or a collective paired
    with DDP's own); now both agree to stop after 2 twin steps, and the real run finishes its 6 steps."""
    rank0, rank1 = run_ddp("tests.ddp_entries_bootstrap:pool_runs_out_on_one_rank", tmp_path, timeout=150)
    for rank in (rank0, rank1):
        assert rank["stopped"] == "fresh pool exhausted after 2 steps" and rank["twin_steps"] == 2
        assert rank["fresh_pos"] == 2 * 16 and rank["global_step"] == 6
    assert rank0["twin"] == rank1["twin"]
    assert rank0["ideal"] == [0, 1, 2] and rank0["measured"] == [0, 1, 2, 3, 4, 5, 6]


@pytest.mark.ddp
def test_ddp_non_finite_eval_loss_on_rank_zero_stops_every_rank(tmp_path):
    """Only rank 0 evaluates; its twin's test loss turns non-finite at the measurement of step 4. Rank 0 used to stop
    alone while rank 1 kept stepping the twin into an all-reduce rank 0 never joined; now the stop is agreed: both
    twins stop after 4 steps, equal, and the real run finishes its 8 steps."""
    rank0, rank1 = run_ddp("tests.ddp_entries_bootstrap:eval_diverges_on_rank_zero", tmp_path, timeout=150)
    for rank in (rank0, rank1):
        assert rank["stopped"] == "diverged at step 4" and rank["twin_steps"] == 4 and rank["global_step"] == 8
        assert rank["fresh_pos"] == 4 * 16
    assert rank0["twin"] == rank1["twin"]
    assert rank0["measured"] == [0, 2, 4, 6, 8] and rank0["ideal"] == [0, 2] and rank1["measured"] == []


# ------------------------------------------------------------------------------------------------------ recipe
def test_recipe_yaml_runs_through_the_cli_and_writes_metrics_and_plot():
    from lightning_sgd.cli import run

    recipe = str(Path(__file__).resolve().parents[1] / "recipes" / "mnist1d_bootstrap.yaml")
    cli = run(["fit", "--config", recipe, "--trainer.max_steps=6", "--data.init_args.num_train=100",
               "--data.init_args.num_test=100", "--data.init_args.fresh_chunk_size=200"])
    cb = next(c for c in cli.trainer.callbacks if isinstance(c, DeepBootstrap))
    steps = [h["step"] for h in cb.history]
    assert steps[0] == 0 and steps[-1] == 6 and len(steps) >= 5  # log-spaced: dense early, and the last step
    csv_logger = next(lg for lg in cli.trainer.loggers if isinstance(lg, pl.loggers.CSVLogger))
    with open(Path(csv_logger.log_dir) / "metrics.csv") as f:
        header = set(next(csv.reader(f)))
    assert {"bootstrap/real_test_error", "bootstrap/ideal_test_error", "bootstrap/gap", "bootstrap/real_train_error",
            "bootstrap/real_test_soft_error", "bootstrap/online_loss"} <= header
    assert cb.plot_path == str(Path(csv_logger.log_dir) / "deep_bootstrap.png") and Path(cb.plot_path).exists()
