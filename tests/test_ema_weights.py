"""EMAWeights against a hand-computed EMA of the recorded parameter trajectory.

The trajectory is recorded after every optimizer step; the expected EMA repeats the recursion in float64 from the
same float32 snapshots, so float32 rounding of the in-place lerp bounds the difference (atol 1e-6 on weights of
order 1).
"""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from torch.nn.utils import parameters_to_vector

from lightning_sgd.plugins.ema_weights import EMAWeights, ema_decay
from tests.helpers import TinyDataModule, fast_trainer_kwargs, tiny_module


class _Trajectory(pl.Callback):
    """Parameters after each optimizer step, and those seen by each validation epoch."""

    def __init__(self) -> None:
        self.steps: dict[int, torch.Tensor] = {}
        self.validated: list[tuple[int, bool, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps[trainer.global_step] = parameters_to_vector(pl_module.parameters()).detach().clone()

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        vec = parameters_to_vector(pl_module.parameters()).detach().clone()
        self.validated.append((trainer.global_step, trainer.sanity_checking, vec))


def _fit(ema: EMAWeights, max_steps: int = 6, batch_size: int = 16, n: int = 40, **kwargs):
    module = tiny_module(lr=0.5)
    initial = parameters_to_vector(module.parameters()).detach().clone()
    trajectory = _Trajectory()
    trainer = pl.Trainer(**fast_trainer_kwargs(max_steps=max_steps, callbacks=[ema, trajectory], **kwargs))
    trainer.fit(module, datamodule=TinyDataModule(n=n, batch_size=batch_size))
    return trainer, module, trajectory, initial


def _hand_ema(trajectory, steps, decays):
    ema = None
    for step, decay in zip(steps, decays):
        theta = trajectory.steps[step].double()
        ema = theta.clone() if ema is None else decay * ema + (1 - decay) * theta
    return ema


def test_half_life_in_samples_with_uneven_batches_and_delayed_start():
    # 40 examples, batch 16: batches of 16, 16, 8 examples. start_step=1: the EMA starts as a copy of the weights
    # after step index 1 (global step 2) and has then seen 32 examples; later updates cover 8, 16, 16, 8 examples.
    ema = EMAWeights(half_life_samples=32, start_step=1)
    trainer, module, trajectory, _ = _fit(ema)
    samples = [32, 8, 16, 16, 8]
    decays = [0.0] + [0.5 ** (n / 32) for n in samples[1:]]
    expected = _hand_ema(trajectory, range(2, 7), decays)
    got = parameters_to_vector(module.parameters()).detach().double()  # fit ends with the EMA weights
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert ema.num_updates == 5 and ema.last_decay == pytest.approx(decays[-1])
    raw = ema.raw_state_dict()
    assert raw is not None
    ema.restore_raw_weights(module)  # the raw weights are recoverable after fit
    assert torch.equal(parameters_to_vector(module.parameters()), trajectory.steps[6])


def test_fixed_decay_with_timm_warmup_every_two_steps():
    ema = EMAWeights(decay=0.9, warmup=True, warmup_power=0.75, update_every_n_steps=2)
    _, module, trajectory, _ = _fit(ema, max_steps=7)
    steps = [1, 3, 5, 7]  # step indices 0, 2, 4, 6
    decays = [ema_decay(k, 0, decay=0.9, warmup=True, warmup_power=0.75) for k in range(4)]
    assert decays[0] == 0.0 and decays[1] == pytest.approx(1 - 2 ** -0.75) and decays[3] <= 0.9
    expected = _hand_ema(trajectory, steps, decays)
    torch.testing.assert_close(parameters_to_vector(module.parameters()).double(), expected, rtol=0, atol=1e-6)


def test_validation_uses_raw_before_start_and_ema_after(tmp_path):
    ema = EMAWeights(decay=0.5, start_step=3)
    trainer, module, trajectory, initial = _fit(
        ema, max_steps=6, batch_size=8, n=48, num_sanity_val_steps=1, limit_val_batches=1, val_check_interval=2,
    )
    by_step = {(step, sanity): vec for step, sanity, vec in trajectory.validated}
    assert torch.equal(by_step[(0, True)], initial)  # sanity check: raw weights, the EMA has not started
    assert torch.equal(by_step[(2, False)], trajectory.steps[2])  # before start_step: raw weights
    expected = _hand_ema(trajectory, [4, 5, 6], [0.0, 0.5, 0.5])
    torch.testing.assert_close(by_step[(6, False)].double(), expected, rtol=0, atol=1e-6)
    # trainer.test(ckpt_path=...) after fit evaluates the checkpoint's EMA weights; the raw ones are stored too.
    ckpt = tmp_path / "ema.ckpt"
    trainer.save_checkpoint(ckpt)
    payload = torch.load(ckpt, weights_only=False)
    raw = torch.cat([payload["current_model_state"][k].flatten() for k, _ in module.named_parameters()])
    assert torch.equal(raw, trajectory.steps[6])
    fresh = tiny_module(lr=0.5, seed=3)
    tester = pl.Trainer(**fast_trainer_kwargs(callbacks=[EMAWeights(decay=0.5)], limit_test_batches=1))
    tester.test(fresh, datamodule=TinyDataModule(n=40), ckpt_path=str(ckpt), verbose=False)
    torch.testing.assert_close(parameters_to_vector(fresh.parameters()).double(), expected, rtol=0, atol=1e-6)
    trainer.test(module, datamodule=TinyDataModule(n=40), ckpt_path=str(ckpt), verbose=False)
    torch.testing.assert_close(parameters_to_vector(module.parameters()).double(), expected, rtol=0, atol=1e-6)


def test_validate_both_logs_raw_and_ema_metrics():
    ema = EMAWeights(decay=0.5, validate="both")
    trainer, module, _, _ = _fit(ema, max_steps=3, limit_val_batches=1, val_check_interval=3)
    metrics = trainer.callback_metrics
    assert {"val/loss", "val_ema/loss", "val_ema/acc"} <= set(metrics)
    # val_ema/loss is the loss of the EMA weights, which fit leaves in the module: recompute it directly.
    x, y = TinyDataModule(n=40).x, TinyDataModule(n=40).y
    with torch.no_grad():
        loss = module.loss(module(x[:64]), y[:64])
    assert float(metrics["val_ema/loss"]) == pytest.approx(float(loss), rel=1e-5)


def test_bn_buffers_modes():
    # A BN model: "copy" makes the EMA buffers equal the raw ones; "recalibrate" recomputes them from data.
    from lightning_sgd.recipes.classification import ClassificationModule

    def bn_module():
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(25, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(),
                                  torch.nn.Linear(8, 3))
        return ClassificationModule(net, num_classes=3, optimizer=lambda p: torch.optim.SGD(p, lr=0.1))

    for mode in ("copy", "recalibrate"):
        ema = EMAWeights(decay=0.5, bn_buffers=mode, recalibrate_batches=2)
        module = bn_module()
        trainer = pl.Trainer(**fast_trainer_kwargs(max_steps=3, callbacks=[ema]))
        trainer.fit(module, datamodule=TinyDataModule(n=64, batch_size=16))
        raw_mean = ema.raw_state_dict()["network.1.running_mean"]
        mean = module.network[1].running_mean
        if mode == "copy":
            assert torch.equal(mean, raw_mean)
        else:  # cumulative average over 2 batches of 16 of the EMA network's pre-BN activations
            x = TinyDataModule(n=64).x[:32]
            with torch.no_grad():
                h = module.network[0](x)
            torch.testing.assert_close(mean, h.mean(0), rtol=1e-5, atol=1e-6)
            assert int(module.network[1].num_batches_tracked) == 2


def test_bad_input():
    for kwargs in ({"decay": 0.0}, {"decay": 1.0}, {"decay": 1.5}, {"decay": -0.1}, {"half_life_samples": 0},
                   {"decay": 0.9, "half_life_samples": 10}, {"bn_buffers": "median"}, {"validate": "x"},
                   {"update_every_n_steps": 0}, {"start_step": -1}):
        with pytest.raises(ValueError):
            EMAWeights(**kwargs)


def test_yaml_switch():
    from tests.test_ghost_batchnorm import cli_fit

    cli = cli_fit({"trainer": {"val_check_interval": 4, "callbacks": [{
        "class_path": "lightning_sgd.plugins.EMAWeights",
        "init_args": {"half_life_samples": 100, "warmup": True, "validate": "both"}}]}})
    ema = next(cb for cb in cli.trainer.callbacks if isinstance(cb, EMAWeights))
    assert ema.num_updates == 4 and ema.half_life_samples == 100
    assert {"val/loss", "val_ema/loss", "val_ema/acc"} <= set(cli.trainer.callback_metrics)


def test_resume_mid_fit_continues_the_ema(tmp_path):
    # Checkpoint after 2 steps, resume to 6. Lightning restarts a non-resumable DataLoader's epoch on resume, so the
    # raw trajectory differs from an uninterrupted run: compare with the hand EMA of the trajectory actually taken.
    def fit(max_steps, ckpt_in=None, ckpt_out=None):
        ema, trajectory = EMAWeights(half_life_samples=32, start_step=1, warmup=True), _Trajectory()
        module = tiny_module(lr=0.5)
        trainer = pl.Trainer(**fast_trainer_kwargs(max_steps=max_steps, callbacks=[ema, trajectory]))
        trainer.fit(module, datamodule=TinyDataModule(n=64, batch_size=16), ckpt_path=ckpt_in)
        if ckpt_out:
            trainer.save_checkpoint(ckpt_out)
        return ema, module, trajectory

    ckpt = str(tmp_path / "mid.ckpt")
    _, _, first = fit(2, ckpt_out=ckpt)
    resumed, module, second = fit(6, ckpt_in=ckpt)
    trajectory = _Trajectory()
    trajectory.steps = {**first.steps, **second.steps}
    assert sorted(trajectory.steps) == [1, 2, 3, 4, 5, 6] and resumed.num_updates == 5
    decays = [ema_decay(k, 16, half_life_samples=32, warmup=True) for k in range(5)]
    expected = _hand_ema(trajectory, range(2, 7), decays)
    torch.testing.assert_close(parameters_to_vector(module.parameters()).double(), expected, rtol=0, atol=1e-6)
    resumed.restore_raw_weights(module)
    assert torch.equal(parameters_to_vector(module.parameters()), trajectory.steps[6])
