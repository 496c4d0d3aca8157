"""Each GradientNoiseScale source on its own, through its public interface (setup, start_batch, before/after
backward, samples), against brute-force autograd on the 25→4→4→3 MLP; the two customisation points of the
callback (a source object, ``fallback_source``); and ``layers="norm"`` against brute force on a LayerNorm model."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from torch import nn

from lightning_sgd.callbacks import GradientNoiseScale
from lightning_sgd.gns_sources import (
    AccumulationSource,
    DDPSource,
    NoiseScaleSource,
    ParamLayout,
    PerExampleSource,
    SourceFailed,
    SplitSource,
    _GradHooks,
)
from lightning_sgd.module_loss import ModuleLoss
from lightning_sgd.noise_scale import NoiseScaleSample, per_example_estimate, small_batches_estimate
from lightning_sgd.recipes.classification import ClassificationModule
from tests.helpers import TinyDataModule, classification_data, fast_trainer_kwargs, tiny_module


def _trainer(**kw):
    """What the sources read from a Trainer, and nothing else."""
    base = dict(world_size=1, accumulate_grad_batches=1, global_step=0, precision_plugin=None,
                strategy=SimpleNamespace())
    return SimpleNamespace(**{**base, **kw})


def _grads(module, x, y, names):
    """Brute force: the mean-loss gradient of (x, y) over the parameters ``names``, flattened, float64."""
    params = dict(module.named_parameters())
    loss = module.loss(module(x), y)
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, [params[n] for n in names])]).double()


def _assert_samples(got, truth, rel=1e-4):
    assert set(got) == set(truth)
    for key, sample in truth.items():
        assert (got[key].b_small, got[key].b_big) == (sample.b_small, sample.b_big), key
        assert got[key].grad_sq_norm == pytest.approx(sample.grad_sq_norm, rel=rel, abs=1e-9), key
        assert got[key].trace_cov == pytest.approx(sample.trace_cov, rel=rel, abs=1e-9), key


def _per_layer_truth(kind, module, batches, layout):
    """{key: sample} from brute-force gradients: per example (kind "per_example", one batch), per part of 4
    (kind "split", one batch), or per micro-batch (kind "micro", several batches)."""
    out = {}
    for key in layout.keys:
        names = [n for n in layout.names if not key or n.rpartition(".")[0] == key]
        if kind == "per_example":
            x, y = batches[0]
            g = torch.stack([_grads(module, x[i:i + 1], y[i:i + 1], names) for i in range(len(y))])
            out[key] = per_example_estimate(g.pow(2).sum(1), g.mean(0).pow(2).sum())
            continue
        parts = batches
        if kind == "split":
            x, y = batches[0]
            size = len(y) // 4
            parts = [(x[k * size:(k + 1) * size], y[k * size:(k + 1) * size]) for k in range(4)]
        g = torch.stack([_grads(module, x, y, names) for x, y in parts])
        out[key] = small_batches_estimate(g.pow(2).sum(1), len(parts[0][1]), g.mean(0).pow(2).sum())
    return out


@pytest.mark.parametrize("make, kind", [
    (lambda: SplitSource(parts=4), "split"),
    (lambda: PerExampleSource(engine="vmap", chunk_size=5), "per_example"),
    (lambda: PerExampleSource(engine="hooks"), "per_example"),
])
def test_sources_that_compute_match_brute_force(make, kind):
    # One measured step of batch 16 on the MLP, per layer too: float32 gradients, float64 sums (1e-4 relative).
    module = tiny_module()
    batch = classification_data(n=16, seed=2)
    source, trainer = make(), _trainer()
    layout = ParamLayout.of(module, per_layer=True)
    source.setup(trainer, module, layout, ModuleLoss(module, "test"))
    module._current_fx_name = "training_step"  # what Lightning sets around the step the hooks read
    source.start_batch(trainer, module, batch, 16, due=True)
    module.training_step(batch, 0).backward()  # the training backward (ignored by the split and vmap engines)
    got = source.samples(trainer, module, batch)
    _assert_samples(got, _per_layer_truth(kind, module, [batch], layout))
    if isinstance(source, PerExampleSource):
        assert source.engine_in_use == source.engine and source.hooks_validated == (source.engine == "hooks")


@pytest.mark.parametrize("sizes", [(8, 8), (8, 4, 4)])
def test_accumulation_source_matches_brute_force_with_unequal_micro_batches(sizes):
    # Micro-batches as Lightning runs them: each loss divided by accumulate_grad_batches, backward into .grad. With
    # unequal sizes the estimator uses b_eff = W / Σ 1/b_k (here truth from the same formula on brute-force norms).
    module = tiny_module()
    x, y = classification_data(n=sum(sizes), seed=4)
    bounds = torch.tensor((0, *sizes)).cumsum(0).tolist()
    micro = [(x[a:b], y[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    trainer = _trainer(accumulate_grad_batches=len(sizes))
    source = AccumulationSource()
    layout = ParamLayout.of(module, per_layer=True)
    source.setup(trainer, module, layout, ModuleLoss(module, "test"))
    for batch in micro:
        source.start_batch(trainer, module, batch, len(batch[1]), due=True)
        loss = module.training_step(batch, 0) / len(sizes)
        source.before_backward(trainer, loss)
        loss.backward()
        source.after_backward(trainer)
    got = source.samples(trainer, module, micro[-1])
    assert source.differencing
    for key in layout.keys:
        names = [n for n in layout.names if not key or n.rpartition(".")[0] == key]
        g = torch.stack([_grads(module, bx, by, names) for bx, by in micro])
        b_eff = len(sizes) / sum(1 / b for b in sizes)
        truth = small_batches_estimate(g.pow(2).sum(1), b_eff, g.mean(0).pow(2).sum())
        _assert_samples({key: got[key]}, {key: truth})


def test_sources_refuse_runs_they_cannot_measure():
    module = tiny_module()
    layout, loss = ParamLayout.of(module), ModuleLoss(module, "test")
    with pytest.raises(ValueError, match="more than one process"):
        DDPSource().setup(_trainer(), module, layout, loss)
    with pytest.raises(ValueError, match="accumulate_grad_batches >= 2"):
        AccumulationSource().setup(_trainer(), module, layout, loss)
    bn = ClassificationModule(nn.Sequential(nn.Linear(25, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)), 3)
    with pytest.raises(ValueError, match="BatchNorm"):
        PerExampleSource().setup(_trainer(), bn, ParamLayout.of(bn), ModuleLoss(bn, "test"))
    with pytest.raises(ValueError, match="layers='norm'.*no normalization layer"):
        PerExampleSource(layers="norm").setup(_trainer(), module, layout, loss)


class ConstantSource(NoiseScaleSource):
    """A user's source: the same sample every step (|G|² = 2, tr Σ = 6 -> B_simple = 3)."""

    name = "constant"

    def samples(self, trainer, pl_module, batch):
        return {"": NoiseScaleSample(2.0, 6.0, 1.0, 16.0)}


class FailingSource(ConstantSource):
    name = "failing"

    def samples(self, trainer, pl_module, batch):
        raise SourceFailed("cannot")


class FallsBackToConstant(GradientNoiseScale):
    def fallback_source(self, failed, error):
        return ConstantSource() if isinstance(failed, FailingSource) else None


def test_a_source_object_and_an_overridden_fallback_drive_the_callback():
    gns = GradientNoiseScale(source=ConstantSource(), schedule=1)
    pl.Trainer(**fast_trainer_kwargs(max_steps=3, callbacks=[gns])).fit(tiny_module(), datamodule=TinyDataModule())
    assert gns.source_in_use == "constant" and gns.measured == 3 and gns.b_simple == pytest.approx(3.0)
    assert gns.b_simple_se == 0.0  # identical samples

    gns = FallsBackToConstant(source=FailingSource(), schedule=1)
    with pytest.warns(UserWarning, match="the failing source cannot measure this model .*source='constant'"):
        pl.Trainer(**fast_trainer_kwargs(max_steps=2, callbacks=[gns])).fit(tiny_module(),
                                                                            datamodule=TinyDataModule())
    assert gns.source_in_use == "constant" and gns.measured == 2 and gns.skipped["failed"] == 0


# ------------------------------------------------------------------------------------------------ layers="norm"
class LayerNormNet(ClassificationModule):
    def __init__(self):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(25, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 6), nn.LayerNorm(6),
                            nn.Linear(6, 3))
        super().__init__(net, num_classes=3, optimizer=lambda p: torch.optim.SGD(p, lr=0.5))


class Recorder(Callback):
    def __init__(self, gns):
        self.gns, self.steps = gns, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.steps.append({"batch": [t.clone() for t in batch]})

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.steps[-1]["state"] = {k: v.clone() for k, v in pl_module.state_dict().items()}
        self.steps[-1]["sample"] = self.gns.last_sample


@pytest.mark.parametrize("engine", ["hooks", "vmap", "auto"])
def test_norm_layer_mode_matches_brute_force_over_the_norm_parameters(engine):
    # |G|² and tr Σ over the two LayerNorms' weights and biases only (Gray et al. 2024), per measured step, against
    # per-example gradients by autograd over single examples at the recorded parameters (1e-4: float32).
    gns = GradientNoiseScale(layers="norm", schedule=1, engine=engine)
    recorder = Recorder(gns)
    pl.Trainer(**fast_trainer_kwargs(max_steps=3, callbacks=[gns, recorder])).fit(
        LayerNormNet(), datamodule=TinyDataModule(n=64, batch_size=16))
    names = ["network.1.weight", "network.1.bias", "network.4.weight", "network.4.bias"]
    assert gns.source_in_use == "per_example" and gns.active_source.parameter_names == names
    assert gns.engine_in_use == ("vmap" if engine == "vmap" else "hooks") and gns.measured == 3
    brute = LayerNormNet()
    for entry in recorder.steps:
        brute.load_state_dict(entry["state"])
        x, y = entry["batch"]
        g = torch.stack([_grads(brute, x[i:i + 1], y[i:i + 1], names) for i in range(len(y))])
        truth = per_example_estimate(g.pow(2).sum(1), g.mean(0).pow(2).sum())
        _assert_samples({"": entry["sample"]}, {"": truth})
    assert math.isfinite(gns.b_simple)


def test_norm_layer_mode_bad_setups_fail_before_training():
    with pytest.raises(ValueError, match="layers must be one of"):
        GradientNoiseScale(layers="attention")
    with pytest.raises(TypeError, match="source must be one of .* or a NoiseScaleSource instance, got <class"):
        GradientNoiseScale(source=SplitSource)  # the class, not an instance
    for gns, match in ((GradientNoiseScale(layers="norm"), "no normalization layer"),
                       (GradientNoiseScale(layers="norm", source="split"), "needs the per_example source")):
        trainer = pl.Trainer(**fast_trainer_kwargs(callbacks=[gns]))
        with pytest.raises(ValueError, match=match):
            trainer.fit(tiny_module(), datamodule=TinyDataModule())


def test_tensor_hooks_read_the_summed_gradient_of_a_parameter_used_twice():
    # The gradient_as_bucket_view path reads gradients with a tensor hook per parameter. A leaf's hook runs once per
    # backward, on the sum of all its uses (autograd adds them before AccumulateGrad), so a layer applied twice (weight
    # sharing) is measured exactly: the squared norms equal those of .grad after one backward.
    torch.manual_seed(0)
    layer = nn.Linear(3, 3)
    params = list(layer.parameters())
    hooks = _GradHooks(params)
    hooks.arm()
    layer(torch.tanh(layer(torch.randn(4, 3)))).square().sum().backward()
    got = hooks.collect()
    hooks.remove()
    torch.testing.assert_close(got, torch.stack([p.grad.double().square().sum() for p in params]), rtol=1e-6, atol=0)
