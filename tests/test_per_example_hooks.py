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
    bias = d.sum(1).pow(2).sum(1)  # the bias gradient of a layer with input a: Σ_t d_t
    for form in ("auto", "materialize", "gram"):
        torch.testing.assert_close(_sq_norm_of_products(a, d, form), truth, rtol=1e-12, atol=0)
        torch.testing.assert_close(_sq_norm_of_products(a, d, form, bias=True), truth + bias, rtol=1e-12, atol=0)


def test_unsupported_layers_names_only_what_even_the_fallback_cannot_handle():
    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gain = nn.Parameter(torch.ones(()))

        def forward(self, x):
            return x * self.gain

    # Handled (closed form or per-module fallback): a bare parameter, grouped and 'same' convolutions, attention.
    handled = nn.Sequential(nn.Linear(4, 4), Scale(), nn.Conv1d(4, 4, 3, groups=2), nn.Conv1d(4, 4, 3, padding="same"),
                            nn.MultiheadAttention(4, 2), nn.GRU(4, 4), nn.BatchNorm1d(4))
    assert unsupported_layers(handled) == []
    tied = nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 5, bias=False))
    tied[1].weight = tied[0].weight
    model = nn.Sequential(nn.Embedding(5, 4, scale_grad_by_freq=True), tied,
                          nn.BatchNorm1d(4, track_running_stats=False))
    problems = unsupported_layers(model)
    assert [p.split(":")[0] for p in problems] == ["0", "2", "1.1"]
    assert "scale_grad_by_freq" in problems[0] and "running statistics" in problems[1] and "tied" in problems[2]
    frozen = nn.Sequential(nn.Embedding(5, 4, scale_grad_by_freq=True))
    frozen[0].weight.requires_grad_(False)
    assert unsupported_layers(frozen) == []  # frozen parameters need no per-example gradient
    with pytest.raises(ValueError, match="scale_grad_by_freq"):
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
    # engine="hooks": with "auto" a timing on a busy machine may pick vmap first, and then there is nothing to catch
    gns = GradientNoiseScale(source="per_example", schedule=1, engine="hooks")
    trainer = pl.Trainer(**fast_trainer_kwargs(max_steps=2, callbacks=[gns]))
    with pytest.warns(UserWarning, match="measuring through vmap"):
        trainer.fit(_TinyLM(tied=True), train_dataloaders=_lm_loader())
    assert gns.engine_in_use == "vmap" and gns.measured == 2 and math.isfinite(gns.b_simple)

    gns = GradientNoiseScale(source="per_example", schedule=1, engine="hooks")
    trainer = pl.Trainer(**fast_trainer_kwargs(max_steps=2, callbacks=[gns]))
    trainer.fit(_TinyLM(tied=False), train_dataloaders=_lm_loader())
    assert gns.engine_in_use == "hooks" and gns.active_source.hooks_validated and gns.measured == 2


def test_bias_check_catches_a_loss_term_outside_the_layers():
    class Penalized(ClassificationModule):
        def training_step(self, batch, batch_idx):  # an L2 penalty in the loss: .grad is not Σ of what hooks see
            x, y = batch
            return self.loss(self(x), y) + sum(p.pow(2).sum() for p in self.parameters())

    gns = GradientNoiseScale(source="per_example", schedule=1, engine="hooks")
    model = Penalized(nn.Sequential(nn.Linear(25, 4), nn.Tanh(), nn.Linear(4, 3)), num_classes=3)
    trainer = pl.Trainer(**fast_trainer_kwargs(max_steps=1, callbacks=[gns]))
    with pytest.warns(UserWarning, match="do not add up to its .grad"):
        trainer.fit(model, datamodule=TinyDataModule(n=32, batch_size=16))
    assert gns.engine_in_use == "vmap" and gns.measured == 1


def test_engine_hooks_refuses_unsupported_models_before_training():
    net = nn.Sequential(nn.Linear(25, 25), nn.PReLU(), nn.Linear(25, 25), nn.Linear(25, 3))
    net[2].weight = net[0].weight  # tied: the per-example gradient of the shared weight sums two layers' parts
    model = ClassificationModule(net, num_classes=3)
    trainer = pl.Trainer(**fast_trainer_kwargs(callbacks=[GradientNoiseScale(source="per_example", engine="hooks")]))
    with pytest.raises(ValueError, match="tied"):
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
    assert gns_hooks.engine_in_use == "hooks" and gns_vmap.engine_in_use == "vmap"
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
    assert gns.engine_in_use == "hooks" and gns.measured == 3  # no fallback
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


def test_a_model_vmap_cannot_run_gets_the_hooks_and_an_exact_cross_check():
    # The hooks only need a plain backward; the cross-check's reference loops over the examples where vmap cannot
    # run (quietly: it is 4 examples). Norms equal brute force (float32: 1e-5).
    torch.manual_seed(0)
    module = ClassificationModule(_NoVmapNet(), num_classes=3)
    x, y = torch.randn(8, 25), torch.randint(0, 3, (8,))
    assert validate(module, (x, y)) is None
    problem = validate(ClassificationModule(nn.Sequential(_NoVmapNet(), nn.Linear(3, 3)), num_classes=3), (x, y))
    assert problem is None
    hooks = PerExampleNormHooks(module)
    hooks.arm(8)
    module.loss(module(x), y).backward()
    sq, _, problem = hooks.collect()
    assert problem is None
    torch.testing.assert_close((sq * 64).float(), _brute_sq_norms(module, x, y), rtol=1e-5, atol=0)


# ------------------------------------------------------------------------------------------- per-module fallback
class _Scale(nn.Module):
    """A custom module with a bare parameter and a child layer: the gain is its own, the child's weights are not."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, width))
        self.inner = nn.Linear(width, width)

    def forward(self, x):
        return self.inner(x) * self.gain


class _Odd(nn.Module):
    """One layer without a closed form (``layer``) between two Linear layers; ``call`` says how to call it and
    ``dims`` where each input carries the batch. Logits (B, 3)."""

    def __init__(self, layer: nn.Module, call, width: int) -> None:
        super().__init__()
        self.layer, self.call = layer, call
        self.head = nn.LazyLinear(3)
        self.width = width

    def forward(self, *inputs):
        return self.head(self.call(self.layer, *inputs).flatten(1))


def _rnn_call(batch_first):
    def call(rnn, x, *state):
        out, h = rnn(x, *state)
        out = out if batch_first else out.transpose(0, 1)  # (B, T, dirs·H)
        h = h if isinstance(h, torch.Tensor) else h[0] + h[1] ** 2  # LSTM: (h_n, c_n)
        return torch.cat([out.flatten(1), h.transpose(0, 1).flatten(1)], 1)  # both outputs reach the loss
    return call


def _mha_call(batch_first):
    def call(mha, x, pad):
        out, weights = mha(x, x, x, key_padding_mask=pad)  # weights (B, L, S) also reach the loss
        out = out if batch_first else out.transpose(0, 1)
        return torch.cat([out.flatten(1), weights.flatten(1)], 1)
    return call


def _fallback_cases():
    """name -> (layer, call, inputs, batch dims of the inputs); B = 5 examples."""
    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    pad = torch.zeros(5, 4, dtype=torch.bool)
    pad[1, 3:], pad[3, 2:] = True, True
    return {
        "gru_seq_first": (nn.GRU(3, 4, num_layers=2, bidirectional=True), _rnn_call(False), (randn(4, 5, 3),), (1,)),
        "gru_batch_first_h0": (nn.GRU(3, 4, batch_first=True), _rnn_call(True), (randn(5, 4, 3), randn(1, 5, 4)),
                               (0, 1)),
        "lstm_h0_c0": (nn.LSTM(3, 4, batch_first=True, num_layers=2), lambda m, x, h, c: _rnn_call(True)(m, x, (h, c)),
                       (randn(5, 4, 3), randn(2, 5, 4), randn(2, 5, 4)), (0, 1, 1)),
        "mha_seq_first": (nn.MultiheadAttention(4, 2), _mha_call(False), (randn(4, 5, 4), pad), (1, 0)),
        "mha_batch_first": (nn.MultiheadAttention(4, 2, batch_first=True, bias=False, add_bias_kv=True),
                            _mha_call(True), (randn(5, 4, 4), pad), (0, 0)),
        "depthwise_same_conv": (nn.Conv2d(3, 6, 3, groups=3, padding="same", padding_mode="circular"),
                                lambda m, x: m(x), (randn(5, 3, 4, 4),), (0,)),
        "conv_transpose": (nn.ConvTranspose2d(2, 3, 3, stride=2), lambda m, x: m(x), (randn(5, 2, 3, 3),), (0,)),
        "instance_norm": (nn.InstanceNorm1d(3, affine=True), lambda m, x: torch.tanh(m(x)), (randn(5, 3, 6),), (0,)),
        "rms_norm": (nn.RMSNorm(6), lambda m, x: torch.tanh(m(x)), (randn(5, 2, 6),), (0,)),
        "batchnorm_eval": (nn.BatchNorm1d(3).eval(), lambda m, x: torch.tanh(m(x)), (randn(5, 3, 2),), (0,)),
        "linear_subclass": (nn.modules.linear.NonDynamicallyQuantizableLinear(6, 4), lambda m, x: torch.tanh(m(x)),
                            (randn(5, 6),), (0,)),
        "custom_parameter": (_Scale(6), lambda m, x: torch.tanh(m(x)), (randn(5, 2, 6),), (0,)),
    }


def _one_example(inputs, dims, i):
    return tuple(x.narrow(d, i, 1) for x, d in zip(inputs, dims))


@pytest.mark.parametrize("case", list(_fallback_cases()))
def test_per_module_fallback_equals_brute_force_and_leaves_grad_bit_identical(case):
    # float64: the fallback's vector-Jacobian products and the brute-force loop round differently (~1e-15), so
    # 1e-10 relative catches any wrong term (a wrong batch dim, a missing output's gradient) by orders of magnitude.
    # GRU has no vmap batching rule on CPU: that case also runs the fallback's loop over examples.
    torch.manual_seed(0)
    layer, call, inputs, dims = _fallback_cases()[case]
    model = _Odd(layer, call, 0).double()
    if case == "batchnorm_eval":
        layer.running_mean.uniform_(-0.5, 0.5)
        layer.running_var.uniform_(0.5, 2.0)
    y = torch.tensor([0, 2, 1, 1, 0])
    model(*inputs)  # materialize the lazy head
    params = [p for p in model.parameters() if p.requires_grad]

    truth = torch.stack([sum(g.pow(2).sum() for g in torch.autograd.grad(
        nn.functional.cross_entropy(model(*_one_example(inputs, dims, i)), y[i:i + 1]), params)) for i in range(5)])

    model.zero_grad()
    nn.functional.cross_entropy(model(*inputs), y).backward()
    plain = [p.grad.clone() for p in params]

    model.zero_grad()
    hooks = PerExampleNormHooks(model, layer_names=True)
    hooks.arm(5)
    nn.functional.cross_entropy(model(*inputs), y).backward()
    assert hooks.check_bias_sums(1.0, rtol=1e-10) is None
    sq, layers, problem = hooks.collect()
    assert problem is None
    torch.testing.assert_close(sq * 25, truth, rtol=1e-10, atol=0)
    assert all(torch.equal(p.grad, g) for p, g in zip(params, plain))  # the hooks never touch a gradient
    expected_layers = {name.rsplit(".", 1)[0] for name, p in model.named_parameters() if "." in name}
    assert set(layers) == expected_layers  # MultiheadAttention: "layer" and "layer.out_proj"
    torch.testing.assert_close(sum(layers.values()), sq, rtol=1e-12, atol=0)


def test_fallback_refuses_what_it_cannot_recompute_without_breaking_backward():
    # Dropout inside a GRU in train mode draws random masks: recomputing cannot reproduce them -> a problem, and the
    # backward is the plain one.
    torch.manual_seed(0)
    model = _Odd(nn.GRU(3, 4, num_layers=2, dropout=0.5, batch_first=True), _rnn_call(True), 0)
    x = torch.randn(5, 4, 3)
    model(x)
    hooks = PerExampleNormHooks(model)
    hooks.arm(5)
    model(x).sum().backward()
    assert "draws random numbers" in hooks.collect()[2]
    # A PackedSequence interleaves the examples: reported, backward unaffected.
    rnn = nn.GRU(3, 4)
    packed = nn.utils.rnn.pack_padded_sequence(torch.randn(4, 5, 3), [4, 4, 3, 2, 1])
    hooks = PerExampleNormHooks(rnn)
    hooks.arm(5)
    rnn(packed)[1].sum().backward()
    assert "PackedSequence" in hooks.collect()[2]
    # A batch-norm layer in train mode couples the examples.
    bn = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    hooks = PerExampleNormHooks(bn)
    hooks.arm(5)
    bn(torch.randn(5, 3)).sum().backward()
    assert "BatchNorm" in hooks.collect()[2]


def test_a_hook_that_fails_records_a_problem_instead_of_raising_into_backward(monkeypatch):
    import lightning_sgd.per_example_hooks as engine

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(engine, "_layer_sq_norms", broken)
    monkeypatch.setattr(engine, "_fallback_grads", broken)
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.PReLU(), nn.Linear(3, 2))
    hooks = PerExampleNormHooks(model)
    hooks.arm(4)
    model(torch.randn(4, 3)).sum().backward()  # must not raise
    assert "boom" in hooks.collect()[2]
    assert all(p.grad is not None for p in model.parameters())
