"""The layer-hook per-example norm engine against brute-force autograd, and its guards."""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_sgd.callbacks import GradientNoiseScale
from lightning_sgd.per_example_hooks import PerExampleNormHooks, _sq_norm_of_products, unsupported_layers, validate
from lightning_sgd.recipes import MNIST1DCNN
from lightning_sgd.recipes.classification import ClassificationModule
from tests.helpers import TinyDataModule, fast_trainer_kwargs


class _Mixed(nn.Module):
    """Every supported layer type once: token ids (B, 8) -> logits (B, 3)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 6, padding_idx=0)
        self.ln = nn.LayerNorm(6)
        self.lin = nn.Linear(6, 5)  # on (B, T, 6): a sequence, T = 8
        self.conv = nn.Conv1d(5, 4, 3, stride=2, padding=1)
        self.gn = nn.GroupNorm(2, 4)
        self.conv2 = nn.Conv2d(1, 3, (2, 3), padding=(1, 0), stride=(1, 2), dilation=(1, 1))
        self.conv3 = nn.Conv3d(3, 2, (1, 2, 1), padding=(0, 1, 0), dilation=(1, 2, 1))
        self.head = nn.Linear(2 * 1 * 5 * 1, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(self.ln(self.emb(x)))  # (B, T, 5)
        h = torch.relu_(self.conv(h.transpose(1, 2)))  # in-place on the conv's output: (B, 4, 4)
        h = self.conv2(self.gn(h).unsqueeze(1))  # (B, 3, 5, 1)
        h = self.conv3(h.unsqueeze(-1))  # (B, 2, 5, 1, 1) -> 3-d conv with dilation
        return self.head(h.flatten(1))


def _brute_sq_norms(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """|∇ℓ_i|² for each example, one autograd call per example."""
    out = []
    for i in range(len(y)):
        loss = nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        out.append(sum(g.pow(2).sum() for g in torch.autograd.grad(loss, list(model.parameters()))))
    return torch.stack(out)


def test_norms_equal_brute_force_for_every_supported_layer():
    # float64 model: rounding is ~1e-15 relative, so 1e-10 leaves room for the sums but catches any wrong term
    # (a missing position, padding row, bias or scale is off by >1e-2). The batch has repeated tokens in one row
    # (they share an embedding row) and padding tokens (no gradient).
    torch.manual_seed(0)
    model = _Mixed().double()
    x = torch.randint(0, 7, (6, 8))
    x[0, :3], x[1] = 0, 3
    y = torch.randint(0, 3, (6,))
    hooks = PerExampleNormHooks(model, layer_names=True)
    hooks.arm()
    nn.functional.cross_entropy(model(x), y).backward()
    assert hooks.check_bias_sums(1.0, rtol=1e-10) is None
    sq, layers, problem = hooks.collect()
    assert problem is None and not hooks.armed
    truth = _brute_sq_norms(model, x, y)
    torch.testing.assert_close(sq * 36, truth, rtol=1e-10, atol=0)  # contributions of a mean over 6 -> × 6²
    assert set(layers) == {"emb", "ln", "lin", "conv", "gn", "conv2", "conv3", "head"}
    torch.testing.assert_close(sum(layers.values()), sq, rtol=1e-12, atol=0)


@pytest.mark.parametrize("t", [1, 6])
def test_materialized_and_gram_forms_equal_the_explicit_per_example_gradient(t):
    g = torch.Generator().manual_seed(t)
    a, d = torch.randn(5, t, 7, generator=g, dtype=torch.float64), torch.randn(5, t, 3, generator=g,
                                                                                  dtype=torch.float64)
    truth = torch.einsum("bto,bti->boi", d, a).pow(2).sum((1, 2))
    for form in ("auto", "materialize", "gram"):
        torch.testing.assert_close(_sq_norm_of_products(a, d, form), truth, rtol=1e-12, atol=0)


def test_unsupported_layers_are_named_and_refused():
    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gain = nn.Parameter(torch.ones(()))

        def forward(self, x):
            return x * self.gain

    model = nn.Sequential(nn.Linear(4, 4), Scale(), nn.Conv1d(4, 4, 3, groups=2), nn.Conv1d(4, 4, 3, padding="same"),
                          nn.Embedding(5, 4, scale_grad_by_freq=True), nn.MultiheadAttention(4, 2))
    problems = unsupported_layers(model)
    # MultiheadAttention's out_proj is a Linear subclass that attention uses functionally: also refused.
    assert [p.split(":")[0] for p in problems] == ["1", "2", "3", "4", "5", "5.out_proj"]
    assert "groups=2" in problems[1] and "same" in problems[2] and "scale_grad_by_freq" in problems[3]
    assert "MultiheadAttention" in problems[4] and "NonDynamicallyQuantizableLinear" in problems[5]
    frozen = nn.Sequential(nn.Linear(4, 4), Scale())
    frozen[1].gain.requires_grad_(False)
    assert unsupported_layers(frozen) == []  # frozen parameters need no per-example gradient
    with pytest.raises(ValueError, match="MultiheadAttention"):
        PerExampleNormHooks(model)


def test_step_problems_are_reported_not_hidden():
    lin = nn.Linear(3, 3)
    shared = nn.Sequential(lin, nn.Tanh(), lin)  # one layer, two calls: per-example norms of a sum of two terms
    hooks = PerExampleNormHooks(shared)
    hooks.arm()
    shared(torch.randn(4, 3)).sum().backward()
    assert "more than once" in hooks.collect()[2]

    model = nn.Sequential(nn.Linear(3, 3))
    hooks = PerExampleNormHooks(model)
    hooks.arm()
    model(torch.randn(4, 3))  # forward without backward
    assert "got no gradient" in hooks.collect()[2]


class _TinyLM(pl.LightningModule):
    """Embedding + Linear LM on (B, T) tokens, optionally with the output layer tied to the embedding."""

    def __init__(self, tied: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.tied = tied
        self.emb = nn.Embedding(11, 8)
        self.mix = nn.Linear(8, 8)
        self.out = nn.Linear(8, 11)

    def split_batch(self, batch):
        return batch[0], batch[1]

    def forward(self, tokens):
        h = torch.tanh(self.mix(self.emb(tokens)))
        return h @ self.emb.weight.T if self.tied else self.out(h)

    def loss(self, outputs, targets):
        return nn.functional.cross_entropy(outputs.flatten(0, 1), targets.flatten())

    def training_step(self, batch, batch_idx):
        return self.loss(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _lm_loader(n: int = 32, batch: int = 8) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 11, (n, 6), generator=g)
    return DataLoader(TensorDataset(x, x.roll(-1, 1)), batch_size=batch)


def test_validate_catches_a_tied_output_layer():
    # The tied matmul sends gradient into emb.weight outside the Embedding's forward: the hooks miss it, so the
    # check against vmap must fail (the miss is tens of percent; float32 agreement is ~1e-6 at rtol 1e-3).
    batch = next(iter(_lm_loader()))
    assert validate(_TinyLM(tied=False), batch) is None
    problem = validate(_TinyLM(tied=True), batch)
    assert problem is not None and "outside its layer" in problem


def test_callback_falls_back_to_vmap_with_a_warning_on_tied_weights():
    gns = GradientNoiseScale(source="per_example", schedule=1)
    trainer = pl.Trainer(**fast_trainer_kwargs(max_steps=2, callbacks=[gns]))
    with pytest.warns(UserWarning, match="measuring through vmap"):
        trainer.fit(_TinyLM(tied=True), train_dataloaders=_lm_loader())
    assert gns._hooks is None and gns.measured == 2 and math.isfinite(gns.b_simple)

    gns = GradientNoiseScale(source="per_example", schedule=1)
    trainer = pl.Trainer(**fast_trainer_kwargs(max_steps=2, callbacks=[gns]))
    trainer.fit(_TinyLM(tied=False), train_dataloaders=_lm_loader())
    assert gns._hooks is not None and gns._hooks_validated and gns.measured == 2


def test_bias_check_catches_a_loss_term_outside_the_layers():
    class Penalized(ClassificationModule):
        def training_step(self, batch, batch_idx):  # an L2 penalty in the loss: .grad is not Σ of what hooks see
            x, y = batch
            return self.loss(self(x), y) + sum(p.pow(2).sum() for p in self.parameters())

    gns = GradientNoiseScale(source="per_example", schedule=1)
    model = Penalized(nn.Sequential(nn.Linear(25, 4), nn.Tanh(), nn.Linear(4, 3)), num_classes=3)
    trainer = pl.Trainer(**fast_trainer_kwargs(max_steps=1, callbacks=[gns]))
    with pytest.warns(UserWarning, match="do not add up to its .grad"):
        trainer.fit(model, datamodule=TinyDataModule(n=32, batch_size=16))
    assert gns._hooks is None and gns.measured == 1


def test_engine_hooks_refuses_unsupported_models_before_training():
    model = ClassificationModule(nn.Sequential(nn.Linear(25, 4), nn.PReLU(), nn.Linear(4, 3)), num_classes=3)
    trainer = pl.Trainer(**fast_trainer_kwargs(callbacks=[GradientNoiseScale(source="per_example", engine="hooks")]))
    with pytest.raises(ValueError, match="PReLU"):
        trainer.fit(model, datamodule=TinyDataModule())
    with pytest.raises(ValueError, match="engine must be"):
        GradientNoiseScale(engine="fast")


def test_hooks_and_vmap_engines_give_the_same_samples_on_the_mnist1d_cnn():
    # Same run twice (same seed, data and trajectory: measuring never changes training), once per engine. Conv1d
    # layers with stride and padding, float32: per-step samples agree to 1e-4 relative (tr Σ is a difference of
    # norms of similar size, so it loses a few digits of float32 precision).
    def run(engine):
        torch.manual_seed(0)
        module = ClassificationModule(MNIST1DCNN(channels=6), num_classes=10,
                                      optimizer=lambda p: torch.optim.SGD(p, lr=0.05))
        g = torch.Generator().manual_seed(0)
        loader = DataLoader(TensorDataset(torch.randn(96, 40, generator=g), torch.randint(0, 10, (96,), generator=g)),
                            batch_size=32)
        samples = []

        class Keep(pl.Callback):
            def on_train_batch_end(self, *args):
                samples.append(gns.last_sample)

        gns = GradientNoiseScale(source="per_example", schedule=1, engine=engine, per_layer=True)
        trainer = pl.Trainer(**fast_trainer_kwargs(max_steps=3, callbacks=[gns, Keep()]))
        trainer.fit(module, train_dataloaders=loader)
        return samples, gns

    hooks, gns_hooks = run("hooks")
    vmap, gns_vmap = run("vmap")
    assert gns_hooks._hooks is not None and gns_vmap._hooks is None
    for a, b in zip(hooks, vmap, strict=True):
        assert a.grad_sq_norm == pytest.approx(b.grad_sq_norm, rel=1e-4)
        assert a.trace_cov == pytest.approx(b.trace_cov, rel=1e-4)
    for layer, ema in gns_vmap.layer_ema.items():
        assert gns_hooks.layer_ema[layer].b_simple == pytest.approx(ema.b_simple, rel=1e-3)


def test_standalone_hook_stats_equal_the_vmap_engine():
    # One forward/backward with hooks vs vmap over examples, float64 CNN: same per-example norms (total and per
    # layer) and batch-mean gradient to 1e-10 (rounding only). BatchNorm in train mode is refused.
    from lightning_sgd.per_example import per_example_gradient_stats
    from lightning_sgd.per_example_hooks import hook_gradient_stats

    torch.manual_seed(0)
    module = ClassificationModule(MNIST1DCNN(channels=5), num_classes=10).double()
    batch = (torch.randn(7, 40, dtype=torch.float64), torch.randint(0, 10, (7,)))
    got = hook_gradient_stats(module, batch, per_layer=True)
    ref = per_example_gradient_stats(module, batch, per_layer=True)
    torch.testing.assert_close(got.sq_norms, ref.sq_norms, rtol=1e-10, atol=0)
    for layer, value in ref.layer_sq_norms.items():
        torch.testing.assert_close(got.layer_sq_norms[layer], value, rtol=1e-10, atol=0)
    for a, b in zip(got.mean_grad, ref.mean_grad, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)
    assert all(p.grad is None for p in module.parameters())  # .grad untouched
    bn = ClassificationModule(nn.Sequential(nn.Linear(40, 4), nn.BatchNorm1d(4, affine=False), nn.Linear(4, 10)),
                              num_classes=10)
    with pytest.raises(ValueError, match="BatchNorm in train mode"):
        hook_gradient_stats(bn, (torch.randn(7, 40), torch.randint(0, 10, (7,))))


def test_other_callbacks_passes_between_arm_and_collect_are_ignored():
    # GradientDiversity (after GNS in the list) runs its own forward/backward on a probe set in on_train_batch_start,
    # after GNS armed its hooks: GNS must capture only the training step's forward (else its norms mix the probe's
    # in and its self-checks send it to vmap). Same samples as the vmap engine, step by step (1e-4: float32).
    from lightning_sgd.callbacks import GradientDiversity

    def run(engine):
        torch.manual_seed(0)
        gns = GradientNoiseScale(source="per_example", schedule=1, engine=engine)
        samples = []

        class Keep(pl.Callback):
            def on_train_batch_end(self, *args):
                samples.append(gns.last_sample)

        callbacks = [gns, GradientDiversity(schedule=1, probe_size=24), Keep()]
        trainer = pl.Trainer(**fast_trainer_kwargs(max_steps=3, callbacks=callbacks))
        trainer.fit(ClassificationModule(nn.Sequential(nn.Linear(25, 8), nn.Tanh(), nn.Linear(8, 3)), num_classes=3),
                    datamodule=TinyDataModule(n=64, batch_size=16))
        return samples, gns

    hooks, gns = run("hooks")
    vmap, _ = run("vmap")
    assert gns._hooks is not None and gns.measured == 3  # no fallback
    for a, b in zip(hooks, vmap, strict=True):
        assert a.grad_sq_norm == pytest.approx(b.grad_sq_norm, rel=1e-4)
        assert a.trace_cov == pytest.approx(b.trace_cov, rel=1e-4)


class _NoVmapTanh(torch.autograd.Function):
    """tanh as an autograd.Function without a vmap rule: vmap(grad) cannot run it, a plain backward can."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * (1 - y * y)


class _NoVmapNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(25, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.b(_NoVmapTanh.apply(self.a(x)))


def test_a_model_vmap_cannot_run_still_gets_the_hooks_with_a_warning():
    # The one-time cross-check needs vmap; when vmap cannot run the model the hooks are still right (they only need
    # a plain backward): a warning, no fallback, and the per-example norms equal brute force (float32: 1e-5).
    torch.manual_seed(0)
    module = ClassificationModule(_NoVmapNet(), num_classes=3)
    x, y = torch.randn(8, 25), torch.randint(0, 3, (8,))
    with pytest.warns(UserWarning, match="vmap engine cannot run this model"):
        assert validate(module, (x, y)) is None
    hooks = PerExampleNormHooks(module)
    hooks.arm()
    module.loss(module(x), y).backward()
    sq, _, problem = hooks.collect()
    assert problem is None
    torch.testing.assert_close((sq * 64).float(), _brute_sq_norms(module, x, y), rtol=1e-5, atol=0)
