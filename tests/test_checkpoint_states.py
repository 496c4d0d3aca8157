"""Checkpoint states that do not match the callback: a missing key gets a clear error naming the callback, the key and
the way out (or its documented default); a changed hyper-parameter is applied or refused with a warning, never
silently ignored; a checkpoint of EMAWeights loaded without it says what its state_dict holds."""

from __future__ import annotations

import re
import warnings

import pytest
import pytorch_lightning as pl
import torch

from lightning_sgd.callbacks import CurvatureSpectrum, GradientDiversity, GradientNoiseScale
from lightning_sgd.checks import CheckpointStateError
from lightning_sgd.plugins.ema_weights import EMAWeights
from lightning_sgd.plugins.lr_warmup_scaling import LRWarmupScaling
from tests.helpers import TinyDataModule, fast_trainer_kwargs, tiny_module


def _fit(callbacks: list[pl.Callback], max_steps: int, ckpt_in: str | None = None, ckpt_out: str | None = None,
         n: int = 64, batch_size: int = 16) -> pl.Trainer:
    trainer = pl.Trainer(**fast_trainer_kwargs(max_steps=max_steps, callbacks=callbacks))
    trainer.fit(tiny_module(), datamodule=TinyDataModule(n=n, batch_size=batch_size), ckpt_path=ckpt_in)
    if ckpt_out:
        trainer.save_checkpoint(ckpt_out)
    return trainer


def _saved_state(callback: pl.Callback, tmp_path, max_steps: int = 2) -> dict:
    path = str(tmp_path / "state.ckpt")
    _fit([callback], max_steps, ckpt_out=path)
    return torch.load(path, weights_only=False)["callbacks"][callback.state_key]


# ---------------------------------------------------------------------------------------------- missing keys
MISSING = [
    (lambda: GradientNoiseScale(source="split", schedule=1), "ema"),
    (lambda: GradientDiversity(schedule=1), "diversity"),
    (lambda: GradientDiversity(schedule=1), "measured"),
    (lambda: CurvatureSpectrum(schedule=1, k=1, trace_matvecs=0, at_fit_end=False), "history"),
    (lambda: CurvatureSpectrum(schedule=1, k=1, trace_matvecs=0, at_fit_end=False), "last_step"),
    (lambda: EMAWeights(half_life_samples=32), "pending_samples"),
    (lambda: LRWarmupScaling(reference_batch_size=16, warmup_steps=1), "scale"),
    (lambda: LRWarmupScaling(reference_batch_size=16, warmup_steps=1), "raw_lrs"),
]


@pytest.mark.parametrize("make, key", MISSING, ids=[key for _, key in MISSING])
def test_a_missing_key_names_the_callback_the_key_and_the_way_out(make, key, tmp_path):
    callback = make()
    state = _saved_state(callback, tmp_path)
    del state[key]
    fresh = make()
    with pytest.raises(KeyError) as info:
        fresh.load_state_dict(state)
    assert isinstance(info.value, CheckpointStateError)
    name = type(fresh).__name__
    assert re.match(rf"{name}: the checkpoint's state for this callback has no '{key}' \(it holds \[", str(info.value))
    assert f"delete checkpoint['callbacks'][{fresh.state_key!r}]" in str(info.value)


def test_a_missing_key_fails_the_resume_before_the_first_step(tmp_path):
    ckpt = str(tmp_path / "warmup.ckpt")
    _fit([LRWarmupScaling(reference_batch_size=16, warmup_steps=2)], 2, ckpt_out=ckpt)
    payload = torch.load(ckpt, weights_only=False)
    del payload["callbacks"]["LRWarmupScaling"]["steps"]
    torch.save(payload, ckpt)
    steps: list[int] = []

    class Count(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            steps.append(trainer.global_step)

    with pytest.raises(KeyError, match="LRWarmupScaling: .* has no 'steps'"):
        _fit([LRWarmupScaling(reference_batch_size=16, warmup_steps=2), Count()], 4, ckpt_in=ckpt)
    assert steps == []


def test_documented_defaults_for_keys_older_states_lack(tmp_path):
    gns = GradientNoiseScale(source="split", schedule=1)
    state = _saved_state(gns, tmp_path, max_steps=3)
    for key in ("measured", "skipped", "b_noise_ema", "layer_ema"):
        del state[key]
    del state["ema"]["beta"]
    fresh = GradientNoiseScale(source="split", schedule=1)
    fresh.load_state_dict(state)
    assert fresh.measured == fresh.ema.count == 3 and fresh.b_simple == gns.b_simple
    assert sum(fresh.skipped.values()) == 0 and fresh.b_noise_ema.count == 0

    ema = EMAWeights(decay=0.9)  # fixed decay: pending_samples does not matter, latest_update_step defaults to 0
    ema.load_state_dict({})
    assert (ema._latest_update_step, ema._pending_samples, ema.last_decay) == (0, 0.0, None)


# ------------------------------------------------------------------------------------ changed hyper-parameters
def test_gns_changed_beta_keeps_the_history_and_applies_from_now_on(tmp_path):
    ckpt = str(tmp_path / "gns.ckpt")
    first = GradientNoiseScale(source="split", schedule=1, beta=0.5)
    _fit([first], 3, ckpt_out=ckpt)
    second = GradientNoiseScale(source="split", schedule=1, beta=0.9)
    with pytest.warns(UserWarning, match=r"GradientNoiseScale: the checkpoint's EMAs were built with beta=0\.5; this "
                                         r"callback has beta=0\.9, which applies from the next measurement on") as rec:
        _fit([second], 5, ckpt_in=ckpt)
    assert sum("beta=0.5" in str(w.message) for w in rec) == 1
    assert second.ema.beta == 0.9 and second.ema.count == 5 and second.measured == 5
    # the debiased EMA after the change is the weighted mean it should be: weights (1-β_k)·Π later β
    samples_weight = second.ema._weight
    assert samples_weight == pytest.approx(1 - 0.5 ** 3 * 0.9 ** 2)


def test_diversity_changed_probe_size_draws_a_new_probe_set_with_a_warning(tmp_path):
    ckpt = str(tmp_path / "div.ckpt")
    _fit([GradientDiversity(schedule=1, probe_size=8)], 2, ckpt_out=ckpt)
    resumed = GradientDiversity(schedule=1, probe_size=16)
    with pytest.warns(UserWarning, match=r"GradientDiversity: the checkpoint measured Δ on a probe set of 8 examples "
                                         r"\(probe_size=8\); this callback has probe_size=16"):
        _fit([resumed], 3, ckpt_in=ckpt)
    assert resumed.probe[0].shape[0] == 16 and resumed.measured == 3
    assert resumed.last_metrics["diversity/n"] == 16.0

    same = GradientDiversity(schedule=1, probe_size=8)  # unchanged: the saved probe set, no warning
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="GradientDiversity: the checkpoint measured")
        _fit([same], 3, ckpt_in=ckpt)
    assert same.probe[0].shape[0] == 8


def test_curvature_changed_k_keeps_the_history_with_a_warning(tmp_path):
    ckpt = str(tmp_path / "curv.ckpt")
    kwargs = dict(schedule=1, trace_matvecs=0, at_fit_end=False)
    _fit([CurvatureSpectrum(k=1, **kwargs)], 2, ckpt_out=ckpt)
    resumed = CurvatureSpectrum(k=2, **kwargs)
    with pytest.warns(UserWarning, match=r"CurvatureSpectrum: the checkpoint's state was saved with k=1; this "
                                         r"callback has k=2\. Its history \(\d+ measurements\) is kept"):
        _fit([resumed], 3, ckpt_in=ckpt)
    steps = [entry["step"] for entry in resumed.history]
    assert steps[:2] == [0, 1] and steps[-1] == 3
    assert "eig_1" not in resumed.history[0] and "eig_1" in resumed.history[-1]


def test_lr_warmup_changed_rule_keeps_the_scale_with_a_warning(tmp_path):
    ckpt = str(tmp_path / "lr.ckpt")
    _fit([LRWarmupScaling(reference_batch_size=8, warmup_steps=1)], 2, ckpt_out=ckpt)
    resumed = LRWarmupScaling(reference_batch_size=8, rule="sqrt", warmup_steps=1)
    with pytest.warns(UserWarning, match=r"LRWarmupScaling: resumed with rule='linear' -> 'sqrt'; .* scaled by 2 "):
        _fit([resumed], 3, ckpt_in=ckpt)
    assert resumed.scale == 2.0


# ---------------------------------------------------------------------------------------------- EMA layout
def test_resuming_an_ema_checkpoint_without_emaweights_says_state_dict_holds_the_averaged_weights(tmp_path):
    ckpt = str(tmp_path / "ema.ckpt")
    _fit([EMAWeights(decay=0.5)], 2, ckpt_out=ckpt)
    with pytest.warns(UserWarning, match=r"Please add the following callbacks: .*EMAWeights.*holds the EMA "
                                         r"\(averaged\) weights.*resuming fit without EMAWeights would train from "
                                         r"the averaged"):
        _fit([], 3, ckpt_in=ckpt)


def test_checkpoints_with_the_old_state_key_still_resume(tmp_path):
    ckpt = str(tmp_path / "old.ckpt")
    first = EMAWeights(half_life_samples=32)
    _fit([first], 2, ckpt_out=ckpt)
    payload = torch.load(ckpt, weights_only=False)
    payload["callbacks"]["EMAWeights"] = payload["callbacks"].pop(first.state_key)
    payload["callbacks"]["EMAWeights"]["pending_samples"] = 7.0
    torch.save(payload, ckpt)
    seen: dict[str, float] = {}

    class Peek(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            seen["pending"] = resumed._pending_samples
            seen["updates"] = resumed.num_updates

    resumed = EMAWeights(half_life_samples=32)
    _fit([resumed, Peek()], 3, ckpt_in=ckpt)
    assert seen == {"pending": 7.0, "updates": 2}
