"""Batch-size schedules: the (batch, LR) sequence of every optimizer step against a hand simulation, across a resume,
under 2-process DDP, and the adaptive controller against a scripted B_simple signal.

Ground truth: ``_simulate`` replays the definition independently of the implementation: each epoch is one pass over
the N examples, cut into batches of the size the schedule gives for the current optimizer step (the last batch of
a pass holds whatever is left), and the LR of step t is ``lr0 * s(B_t) / s(B_0)`` times the user's StepLR factor.
The LR is compared with rel 1e-12 because both sides do the same few float64 multiplications.
"""

from __future__ import annotations

import logging
import math

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import Logger

from lightning_sgd.batch_size import ResizableBatchSampler, milestone_multiplier, split_global_batch
from lightning_sgd.plugins import AdaptiveBatchSize, BatchSizeSchedule, EMAWeights, LRWarmupScaling
from lightning_sgd.recipes.classification import ClassificationModule
from tests.ddp import run_ddp
from tests.helpers import TinyDataModule, fast_trainer_kwargs, tiny_mlp


class _Record(pl.Callback):
    """(epoch, global_step, batch size, LR) of every batch, and the rows each epoch saw."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, int, int, float]] = []
        self.seen: dict[int, list[torch.Tensor]] = {}
        self.val_epochs: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        lr = trainer.optimizers[0].param_groups[0]["lr"]
        self.rows.append((trainer.current_epoch, trainer.global_step, int(batch[0].shape[0]), lr))
        self.seen.setdefault(trainer.current_epoch, []).append(batch[0][:, 0].clone())

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.val_epochs.append(trainer.current_epoch)


def _module(lr: float = 0.05, step_lr: bool = True) -> ClassificationModule:
    return ClassificationModule(
        tiny_mlp(seed=0), num_classes=3,
        optimizer=lambda params: torch.optim.SGD(params, lr=lr, momentum=0.9),
        lr_scheduler=(lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)) if step_lr else None,
    )


def _simulate(n, epochs, size_at, lr0, rule_scale, step_lr=True):
    rows, step = [], 0
    for epoch in range(epochs):
        left = n
        while left:
            size = min(size_at(step, epoch), left)
            lr = lr0 * rule_scale(size_at(step, epoch)) / rule_scale(size_at(0, 0))
            rows.append((epoch, step, size, lr * (0.5 ** (step // 5) if step_lr else 1.0)))
            left -= size
            step += 1
    return rows


def _fit(callbacks, max_epochs, ckpt_in=None, ckpt_out=None, n=88, batch_size=8, shuffle=True, **kwargs):
    recorder = _Record()
    trainer = pl.Trainer(**fast_trainer_kwargs(max_steps=-1, max_epochs=max_epochs, callbacks=[*callbacks, recorder],
                                               **kwargs))
    module = _module()
    trainer.fit(module, datamodule=TinyDataModule(n=n, batch_size=batch_size, shuffle=shuffle), ckpt_path=ckpt_in)
    if ckpt_out:
        trainer.save_checkpoint(ckpt_out)
    return recorder, trainer, module


# ------------------------------------------------------------------------------------------------ pure pieces
def test_resizable_sampler_is_one_pass_and_len_tracks_changes():
    sampler = ResizableBatchSampler(range(10), 3)
    assert len(sampler) == 4
    it = iter(sampler)
    assert next(it) == [0, 1, 2] and len(sampler) == 4
    sampler.batch_size = 5  # 7 left -> 2 batches: [3..7], [8, 9]
    assert len(sampler) == 3
    assert list(it) == [[3, 4, 5, 6, 7], [8, 9]]
    assert len(sampler) == 2  # the next pass at the new size: ceil(10 / 5)
    dropping = ResizableBatchSampler(range(10), 4, drop_last=True)
    assert list(dropping) == [[0, 1, 2, 3], [4, 5, 6, 7]] and len(dropping) == 2


def test_pure_arithmetic():
    assert milestone_multiplier(2, [3, 6], [2.0, 4.0]) == 1.0
    assert milestone_multiplier(3, [3, 6], [2.0, 4.0]) == 2.0
    assert milestone_multiplier(9, [3, 6], [2.0, 4.0]) == 8.0
    assert split_global_batch(100, 2) == (50, 1, "")
    assert split_global_batch(1000, 2, max_per_device=128)[:2] == (128, 1)
    assert split_global_batch(1000, 2, max_per_device=128, allow_accumulation=True)[:2] == (125, 4)


def test_bad_input():
    with pytest.raises(TypeError, match="BatchSizeSchedule: each milestone must be an int >= 0, got 2.5"):
        BatchSizeSchedule(milestones=[2.5])  # a wrong type is a TypeError, as in lightning_sgd.checks
    for kwargs in ({"milestones": []}, {"milestones": [3, 3]}, {"milestones": [-1]},
                   {"milestones": [2, 4], "factors": [2.0]}, {"milestones": [2], "factors": 0},
                   {"milestones": [2], "interval": "batch"}, {"milestones": [2], "lr_rule": "cubic"}):
        with pytest.raises(ValueError):
            BatchSizeSchedule(**kwargs)
    for kwargs in ({"max_batch_size": 0}, {"max_batch_size": 64, "every_n_steps": 0},
                   {"max_batch_size": 64, "hysteresis": -0.1}, {"max_batch_size": 64, "target_ratio": 0},
                   {"max_batch_size": 64, "accumulate": True}, {"max_batch_size": 64, "multiple_of": 0},
                   {"max_batch_size": 64, "lr_rule": "cubic"}):
        with pytest.raises(ValueError):
            AdaptiveBatchSize(**kwargs)
    for kwargs, error in (({"min_measurements": 0}, ValueError), ({"min_measurements": 2.5}, TypeError),
                          ({"min_measurements": None}, TypeError)):
        with pytest.raises(error, match="AdaptiveBatchSize: min_measurements must be an int >= 1"):
            AdaptiveBatchSize(max_batch_size=64, **kwargs)
    for bad in (1.0, 0.5, -2.0, math.nan, True, "2"):
        with pytest.raises(ValueError, match=r"max_growth .* must be a number > 1"):
            AdaptiveBatchSize(max_batch_size=64, max_growth=bad)
    AdaptiveBatchSize(max_batch_size=64, max_growth=math.inf)  # no cap
    with pytest.raises(TypeError):
        AdaptiveBatchSize(max_batch_size=64, noise_scale=object())
    with pytest.raises(TypeError, match="lacks grad_sq_norm, measured"):  # B_simple alone cannot be trusted
        AdaptiveBatchSize(max_batch_size=64, noise_scale=type("OnlyBSimple", (), {"b_simple": 10.0})())
    with pytest.raises(ValueError, match="GradientNoiseScale"):  # nothing to read B_simple from
        _fit([AdaptiveBatchSize(max_batch_size=64)], max_epochs=1)
    with pytest.raises(ValueError, match="limit_train_batches"):
        _fit([BatchSizeSchedule([1])], max_epochs=1, limit_train_batches=0.5)


# ------------------------------------------------------------------------------------- schedule, step by step
def test_step_milestones_reproduce_batch_and_lr_sequence_across_resume(tmp_path):
    # 88 examples, batch 8: steps 0-2 batch 8, 3-6 batch 16, 7+ batch 32, linear rule; StepLR(5, 0.5) on top.
    make = lambda: BatchSizeSchedule(milestones=[3, 7], factors=2, interval="step", lr_rule="linear")  # noqa: E731
    expected = _simulate(88, 3, lambda step, epoch: 8 * milestone_multiplier(step, [3, 7], [2, 2]), 0.05,
                         lambda b: b)
    # shuffle=False: a fresh DataModule re-seeds its shuffling generator, so only a fixed order replays exactly.
    straight, _, module_a = _fit([make()], max_epochs=3, shuffle=False)
    assert [r[:3] for r in straight.rows] == [r[:3] for r in expected]  # epoch 0: 8,8,8,16,16,16,16,8 (the rest)
    assert [r[3] for r in straight.rows] == pytest.approx([r[3] for r in expected], rel=1e-12)
    for epoch, parts in straight.seen.items():  # every epoch is exactly one pass over the 88 examples
        seen = torch.cat(parts)
        assert seen.numel() == 88 and torch.unique(seen).numel() == 88, epoch
    assert straight.val_epochs == []  # limit_val_batches=0 here; the YAML test checks end-of-epoch validation

    ckpt = str(tmp_path / "epoch1.ckpt")
    first, _, _ = _fit([make()], max_epochs=1, ckpt_out=ckpt, shuffle=False)
    resumed, trainer, module_b = _fit([make()], max_epochs=3, ckpt_in=ckpt, shuffle=False)
    both = first.rows + resumed.rows
    assert [r[:3] for r in both] == [r[:3] for r in straight.rows]
    assert [r[3] for r in both] == pytest.approx([r[3] for r in straight.rows], rel=1e-12)
    callback = next(cb for cb in trainer.callbacks if isinstance(cb, BatchSizeSchedule))
    assert callback.batch_size == 32 and callback.lr_factor == 4.0
    for a, b in zip(module_a.parameters(), module_b.parameters()):  # the same trajectory, bit for bit
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_reload_dataloaders_every_epoch_keeps_the_schedule():
    # Lightning builds a fresh train loader each epoch: it is wrapped again and keeps the current batch.
    recorder, _, _ = _fit([BatchSizeSchedule([3, 12], factors=2, interval="step")], max_epochs=3,
                          reload_dataloaders_every_n_epochs=1, limit_val_batches=1)
    expected = _simulate(88, 3, lambda step, epoch: 8 * milestone_multiplier(step, [3, 12], [2, 2]), 0.05, lambda b: 1)
    assert [r[:3] for r in recorder.rows] == [r[:3] for r in expected]
    assert recorder.val_epochs == [0, 1, 2]


class _WorkersDataModule(TinyDataModule):
    def train_dataloader(self):
        from torch.utils.data import DataLoader, TensorDataset

        return DataLoader(TensorDataset(self.x, self.y), batch_size=self.batch_size, shuffle=True, num_workers=2,
                          persistent_workers=True)


def test_workers_prefetch_lag_keeps_epochs_one_pass():
    # 2 workers x prefetch_factor 2: the 4 batches drawn ahead of step 3 keep batch 8, so 16 starts at step 7; an
    # epoch is still the 88 examples once and the end-of-epoch validation still runs.
    recorder = _Record()
    trainer = pl.Trainer(**fast_trainer_kwargs(max_steps=-1, max_epochs=2, limit_val_batches=1, callbacks=[
        BatchSizeSchedule([3], factors=2, interval="step"), recorder]))
    trainer.fit(_module(), datamodule=_WorkersDataModule(n=88, batch_size=8))
    assert [r[2] for r in recorder.rows] == [8] * 7 + [16] * 2 + [16] * 5 + [8]
    for parts in recorder.seen.values():
        seen = torch.cat(parts)
        assert seen.numel() == 88 and torch.unique(seen).numel() == 88
    assert recorder.val_epochs == [0, 1]


class _DropLastDataModule(TinyDataModule):
    def train_dataloader(self):
        from torch.utils.data import DataLoader, TensorDataset

        return DataLoader(TensorDataset(self.x, self.y), batch_size=self.batch_size, drop_last=True)


def test_batch_larger_than_the_data_is_capped_when_dropping_last():
    # x100 would make batch 800 > 64 examples: with drop_last that is 0 batches per epoch, so it is capped at 64.
    recorder = _Record()
    schedule = BatchSizeSchedule([1], factors=100.0)
    trainer = pl.Trainer(**fast_trainer_kwargs(max_steps=-1, max_epochs=2, callbacks=[schedule, recorder]))
    with pytest.warns(UserWarning, match="larger than"):
        trainer.fit(_module(), datamodule=_DropLastDataModule(n=64, batch_size=8))
    assert [r[2] for r in recorder.rows] == [8] * 8 + [64] and schedule.batch_size == 64


def test_epoch_milestones_sqrt_rule_with_lr_warmup_scaling():
    # Epoch milestones (batch x4 from epoch 1) with the sqrt rule, composed with LRWarmupScaling (linear B_ref 8, no
    # warmup: scale 1 at batch 8): epoch 1 runs at batch 32 with LR x sqrt(4) = 2, then StepLR halves it.
    recorder, trainer, _ = _fit([LRWarmupScaling(reference_batch_size=8, rule="linear"),
                                 BatchSizeSchedule([1], factors=4.0, lr_rule="sqrt")], max_epochs=2, n=64)
    expected = _simulate(64, 2, lambda step, epoch: 8 * milestone_multiplier(epoch, [1], [4.0]), 0.05, math.sqrt)
    assert [r[:3] for r in recorder.rows] == [r[:3] for r in expected]
    assert [r[3] for r in recorder.rows] == pytest.approx([r[3] for r in expected], rel=1e-12)
    assert trainer.global_step == 8 + 2


def test_ema_half_life_in_samples_follows_the_batch():
    # After the change to batch 32 each EMA update consumed 32 examples: d = 0.5 ** (32 / H).
    ema = EMAWeights(half_life_samples=100.0)
    _fit([BatchSizeSchedule([1], factors=4.0, interval="epoch"), ema], max_epochs=2, n=64)
    assert ema.last_decay == pytest.approx(0.5 ** (32 / 100.0), rel=1e-12)
    assert ema.num_updates == 8 + 2


# ------------------------------------------------------------------------------------------ adaptive controller
class _FakeGNS(pl.Callback):
    """Scripted B_simple: ``script`` maps the first step it holds from to the value; one measurement per step and a
    positive |G|², like a GradientNoiseScale measuring every step."""

    def __init__(self, script: dict[int, float]) -> None:
        self.script, self.step = script, 0
        self.grad_sq_norm = 1.0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.step = trainer.global_step

    @property
    def b_simple(self) -> float:
        return self.script[max(k for k in self.script if k <= self.step)]

    @property
    def measured(self) -> int:
        return self.step


class _ListLogger(Logger):
    def __init__(self) -> None:
        super().__init__()
        self.metrics: list[tuple[int, dict]] = []

    name, version, experiment = "list", 0, None

    def log_metrics(self, metrics, step=None) -> None:
        self.metrics.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass


def test_adaptive_follows_scripted_b_simple():
    # Decisions at steps 2, 4, 6, ...; max_growth 2 per decision. B_simple: nan (no estimate), 9 (< 1.25 x 8: keep),
    # 20 -> min(20, 2 x 8) = 16, 23 (>= 1.25 x 16) -> 23, 1000 -> min(60, 2 x 23) = 46, then 60 (max_batch_size,
    # >= 1.25 x 46), then nothing (60 < 1.25 x 60).
    gns = _FakeGNS({0: math.nan, 3: 9.0, 5: 20.0, 7: 23.0, 9: 1000.0})
    controller = AdaptiveBatchSize(max_batch_size=60, every_n_steps=2, start_step=2, hysteresis=0.25, lr_rule="linear",
                                   min_measurements=2, max_growth=2.0)
    logger = _ListLogger()
    recorder, trainer, _ = _fit([gns, controller], max_epochs=1, n=400, logger=logger, shuffle=False)
    sizes = {step: size for _, step, size, _ in recorder.rows}
    lrs = {step: lr for _, step, _, lr in recorder.rows}
    expected = {**{s: 8 for s in range(0, 6)}, 6: 16, 7: 16, 8: 23, 9: 23, 10: 46, 11: 46, 12: 60, 13: 60, 14: 60}
    assert {s: sizes[s] for s in expected} == expected
    for step, size in expected.items():  # linear rule and StepLR(5, 0.5) on top
        assert lrs[step] == pytest.approx(0.05 * size / 8 * 0.5 ** (step // 5), rel=1e-12)
    decisions = [(step, m) for step, m in logger.metrics if "batch_size/target" in m]
    assert [step for step, _ in decisions] == list(range(2, trainer.global_step + 1, 2))
    assert [m["batch_size/grew"] for _, m in decisions] == [0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    assert [m["batch_size/gns_measurements"] for _, m in decisions][:3] == [2.0, 4.0, 6.0]
    assert [h["global_batch_size"] for h in controller.history] == [8, 16, 23, 46, 60]
    reasons = [h["reason"] for h in controller.history]
    assert "max_growth=2 x 8" in reasons[1] and "B_simple 23" in reasons[2] and "max_growth=2 x 23" in reasons[3]
    assert "max_batch_size" in reasons[4]


class _Estimate:
    """A fixed noise-scale estimate (what AdaptiveBatchSize reads from a GradientNoiseScale)."""

    def __init__(self, b_simple: float, grad_sq_norm: float, measured: int) -> None:
        self.b_simple, self.grad_sq_norm, self.measured = b_simple, grad_sq_norm, measured


@pytest.mark.parametrize("b_simple, grad_sq_norm, measured, why", [
    (math.inf, -0.5, 50, "not finite and positive"),  # the EMA's |G|^2 <= 0: B_simple is inf (pure noise)
    (math.inf, 0.0, 50, "not finite and positive"),
    (1000.0, math.nan, 50, "not finite and positive"),
    (math.inf, 1.0, 50, "no usable B_simple"),
    (1000.0, 1.0, 9, "9 GNS measurement(s), fewer than min_measurements=10"),  # a settled-looking value too early
])
def test_adaptive_takes_no_decision_on_an_untrustworthy_estimate(b_simple, grad_sq_norm, measured, why, caplog):
    caplog.set_level(logging.INFO)
    controller = AdaptiveBatchSize(max_batch_size=1024, every_n_steps=1, start_step=1,
                                   noise_scale=_Estimate(b_simple, grad_sq_norm, measured))
    logger = _ListLogger()
    recorder, trainer, _ = _fit([controller], max_epochs=1, n=64, logger=logger, shuffle=False)
    assert [r[2] for r in recorder.rows] == [8] * 8  # never resized
    assert [h["reason"] for h in controller.history] == ["start"] and trainer.accumulate_grad_batches == 1
    decisions = [m for _, m in logger.metrics if "batch_size/target" in m]
    assert len(decisions) == 8 and all(m["batch_size/grew"] == 0.0 for m in decisions)
    assert all(math.isnan(m["batch_size/target"]) for m in decisions)
    assert caplog.text.count("keep global batch 8; reason: ") == 8 and why in caplog.text  # the log says why


def test_adaptive_growth_per_decision_is_capped():
    # B_simple 1e6 (a trusted estimate): every decision at most doubles the global batch, 8 -> 16 -> 32 -> 64 -> 128.
    controller = AdaptiveBatchSize(max_batch_size=4096, every_n_steps=1, start_step=1, hysteresis=0.0,
                                   noise_scale=_Estimate(1e6, 1.0, 100))
    recorder, _, _ = _fit([controller], max_epochs=1, n=256, shuffle=False)
    assert [r[2] for r in recorder.rows] == [8, 16, 32, 64, 128, 8]  # the pass ends with the 8 examples left
    grown = [h["global_batch_size"] for h in controller.history]
    assert grown == [8, 16, 32, 64, 128, 256, 512]  # one decision after each of the 6 steps
    assert all(b <= 2 * a for a, b in zip(grown, grown[1:]))
    assert all("max_growth=2" in h["reason"] for h in controller.history[1:])
    three = AdaptiveBatchSize(max_batch_size=50, every_n_steps=1, start_step=1, hysteresis=0.0, max_growth=3.0,
                              noise_scale=_Estimate(1e6, 1.0, 100))
    recorder, _, _ = _fit([three], max_epochs=1, n=64, shuffle=False)
    assert [h["global_batch_size"] for h in three.history] == [8, 24, 50]  # x3, then max_batch_size


def test_adaptive_resume_continues_at_the_grown_batch(tmp_path):
    make = lambda: [_FakeGNS({0: 20.0, 10: 60.0}),  # noqa: E731
                    AdaptiveBatchSize(max_batch_size=64, every_n_steps=2, start_step=2, lr_rule="sqrt",
                                      min_measurements=2, max_growth=2.0)]
    straight, _, module_a = _fit(make(), max_epochs=3, n=128, shuffle=False)
    ckpt = str(tmp_path / "epoch1.ckpt")
    first, _, _ = _fit(make(), max_epochs=1, n=128, shuffle=False, ckpt_out=ckpt)
    resumed, trainer, module_b = _fit(make(), max_epochs=3, n=128, shuffle=False, ckpt_in=ckpt)
    both = first.rows + resumed.rows
    assert [r[:3] for r in both] == [r[:3] for r in straight.rows]
    assert [r[3] for r in both] == pytest.approx([r[3] for r in straight.rows], rel=1e-12)
    assert {r[2] for r in straight.rows} >= {8, 16, 20, 40, 60}  # 8 -> 16 -> 20 (epoch 0), 40 -> 60 (x2 at most)
    assert [h["global_batch_size"] for h in trainer.callbacks[1].history] == [8, 16, 20, 40, 60]
    for a, b in zip(module_a.parameters(), module_b.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_adaptive_accumulates_beyond_the_memory_limit_from_the_next_epoch():
    gns = _FakeGNS({0: 64.0})
    controller = AdaptiveBatchSize(max_batch_size=64, every_n_steps=2, start_step=2, max_per_device_batch_size=16,
                                   accumulate=True, lr_rule="none", min_measurements=2, max_growth=8.0)
    recorder, trainer, _ = _fit([gns, controller], max_epochs=2, n=128, shuffle=False)
    # Epoch 0: batch 8 for steps 0, 1; then 16 per device at once (accumulation pending) for the other 96 examples
    # (7 steps); epoch 1: 16 x 4 accumulated = global 64: 128 / 64 = 2 steps.
    epoch1 = [r for r in recorder.rows if r[0] == 1]
    assert [r[2] for r in recorder.rows if r[0] == 0] == [8, 8] + [16] * 7
    assert [r[2] for r in epoch1] == [16] * 8 and trainer.accumulate_grad_batches == 4
    assert trainer.global_step == 9 + 2
    assert [h["global_batch_size"] for h in controller.history] == [8, 16, 64]


# -------------------------------------------------------------------------------------------- YAML and DDP
def test_yaml_schedule_on_mnist1d_datamodule():
    from tests.test_ghost_batchnorm import cli_fit

    # 200 examples, batch 50 (4 batches per epoch); batch x2 after 2 steps: epoch 0 = 50, 50, 100; epoch 1 = 100, 100.
    cli = cli_fit({"trainer": {"callbacks": [
        {"class_path": "lightning_sgd.plugins.BatchSizeSchedule",
         "init_args": {"milestones": [2], "factors": 2, "interval": "step"}},
        {"class_path": "tests.test_batch_size_schedule._Record"}]}}, 5)
    recorder = next(cb for cb in cli.trainer.callbacks if isinstance(cb, _Record))
    assert [r[2] for r in recorder.rows] == [50, 50, 100, 100, 100]
    assert recorder.val_epochs == [0, 1]  # end-of-epoch validation still runs after the mid-epoch change


def test_ddp_every_rank_sees_the_same_batch(tmp_path):
    results = run_ddp("tests.ddp_entries_batch_size:schedule_and_adaptive", tmp_path)
    r0, r1 = results
    assert r0["schedule_sizes"] == r1["schedule_sizes"]
    # 64 examples, 2 ranks -> 32 per rank per epoch; batch 4 for 2 steps then 8: 4, 4, 8, 8, 8 (=32).
    assert r0["schedule_sizes"][:5] == [4, 4, 8, 8, 8]
    rows0, rows1 = set(r0["epoch0_rows"]), set(r1["epoch0_rows"])  # DistributedSampler still shards the data
    assert rows0.isdisjoint(rows1) and len(rows0 | rows1) == 64
    # Rank 0's B_simple (40) decides although rank 1's script says 1000: global 40 = 2 x 20 per device from step 2;
    # 32 - 8 - 20 leaves 4 examples per rank for the last batch of the epoch.
    assert r0["adaptive_sizes"] == r1["adaptive_sizes"]
    assert r0["adaptive_sizes"] == [4, 4, 20, 4] and r0["adaptive_global"] == r1["adaptive_global"] == 40
