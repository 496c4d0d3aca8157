"""LRWarmupScaling: the learning rate of every optimizer step equals the closed-form schedule, also across a resume.

The LR used by step t is read in ``on_before_optimizer_step`` (the value the optimizer applies). The expected value
is computed by hand from the formula (see the module docstring) in float64 Python arithmetic; the callback does
the same multiplications, so the comparison uses rel 1e-12.
"""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch

from lightning_sgd.plugins.lr_warmup_scaling import LRWarmupScaling, scale_factor, warmup_factor
from lightning_sgd.recipes.classification import ClassificationModule
from tests.helpers import TinyDataModule, fast_trainer_kwargs, tiny_mlp


class _RecordLR(pl.Callback):
    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.lrs.append(optimizer.param_groups[0]["lr"])


def _module(base_lr: float, scheduler: bool) -> ClassificationModule:
    return ClassificationModule(
        tiny_mlp(seed=0), num_classes=3,
        optimizer=lambda params: torch.optim.SGD(params, lr=base_lr, momentum=0.9),
        lr_scheduler=(lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)) if scheduler else None,
    )


def _fit(max_steps, callback, ckpt_in=None, ckpt_out=None, scheduler=True, **kwargs):
    recorder = _RecordLR()
    trainer = pl.Trainer(**fast_trainer_kwargs(max_steps=max_steps, callbacks=[callback, recorder],
                                               accumulate_grad_batches=2, **kwargs))
    trainer.fit(_module(0.05, scheduler), datamodule=TinyDataModule(n=64, batch_size=8), ckpt_path=ckpt_in)
    if ckpt_out:
        trainer.save_checkpoint(ckpt_out)
    return recorder.lrs


def _expected(steps, base_lr, scale, warmup, start):
    # StepLR(step_size=4, gamma=0.5) on the scaled base LR, times the warmup factor.
    return [base_lr * scale * 0.5 ** (t // 4) * (start + (1 - start) * min(1.0, t / warmup)) for t in steps]


def test_lr_every_step_matches_formula_across_resume(tmp_path, rule="linear"):  # sqrt: see test_yaml_switch
    # 64 examples, batch 8, accumulation 2 -> 4 optimizer steps per epoch; B = 1 * 8 * 2 = 16, B_ref = 4.
    make = lambda: LRWarmupScaling(reference_batch_size=4, rule=rule, warmup_epochs=1.5)  # noqa: E731 -> 6 steps
    scale = {"linear": 4.0, "sqrt": 2.0}[rule]
    expected = _expected(range(12), 0.05, scale, warmup=6, start=1 / scale)
    straight = _fit(12, make())
    ckpt = str(tmp_path / "mid.ckpt")
    first = _fit(6, make(), ckpt_out=ckpt)
    resumed = _fit(12, make(), ckpt_in=ckpt)
    assert len(straight) == 12 and len(first) == 6 and len(resumed) == 6
    assert straight == pytest.approx(expected, rel=1e-12)
    assert first + resumed == pytest.approx(expected, rel=1e-12)


def test_warmup_steps_from_zero_without_scheduler_and_none_rule():
    lrs = _fit(6, LRWarmupScaling(reference_batch_size=16, rule="none", warmup_steps=4, warmup_start_factor=0.0),
               scheduler=False)
    assert lrs == pytest.approx([0.05 * min(1.0, t / 4) for t in range(6)], rel=1e-12)


def test_pure_functions():
    assert scale_factor("linear", 1024, 256) == 4.0
    assert scale_factor("sqrt", 1024, 256) == 2.0
    assert scale_factor("none", 1024, 256) == 1.0
    assert warmup_factor(0, 5, 0.25) == 0.25 and warmup_factor(5, 5, 0.25) == 1.0
    assert math.isclose(warmup_factor(2, 4, 0.0), 0.5)
    assert warmup_factor(3, 0, 0.0) == 1.0


def test_bad_input():
    for kwargs in ({"reference_batch_size": 0}, {"reference_batch_size": -8}, {"rule": "cubic"},
                   {"warmup_steps": 3, "warmup_epochs": 1.0}, {"warmup_steps": -1}, {"batch_size": 0},
                   {"warmup_start_factor": -0.5}):
        with pytest.raises(ValueError):
            LRWarmupScaling(**kwargs)
    with pytest.raises(ValueError, match="longer than training"):
        _fit(4, LRWarmupScaling(reference_batch_size=4, warmup_steps=10))


def test_yaml_switch():
    from tests.test_ghost_batchnorm import cli_fit

    # recipes/mnist1d.yaml: Adam lr 0.01; batch 50 here, B_ref 25: the sqrt rule scales the LR by sqrt(2).
    cli = cli_fit({"trainer": {"callbacks": [
        {"class_path": "lightning_sgd.plugins.LRWarmupScaling",
         "init_args": {"reference_batch_size": 25, "rule": "sqrt", "warmup_steps": 2}},
        {"class_path": "tests.test_lr_warmup_scaling._RecordLR"}]}})
    recorder = next(cb for cb in cli.trainer.callbacks if isinstance(cb, _RecordLR))  # after the recipe's own
    target = 0.01 * math.sqrt(2)
    expected = [target * (1 / math.sqrt(2) + (1 - 1 / math.sqrt(2)) * min(1.0, t / 2)) for t in range(4)]
    assert recorder.lrs == pytest.approx(expected, rel=1e-12)
