"""Every layer type the per-example hooks cover, exact against brute-force autograd in float64, the convolution
forms one by one, the normalization-layer mode and the engine choice.

Tolerance: float64 throughout, so the hooks and a loop of ``autograd.grad`` over one-example batches differ only by
rounding (~1e-15 relative); 1e-10 catches any wrong term (a missing position, padding row, group or bias is off by
more than 1e-3).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import lightning_sgd.per_example_hooks as engine
from lightning_sgd.per_example_hooks import (
    PerExampleNormHooks,
    choose_engine,
    hook_gradient_stats,
    is_norm_layer,
    unsupported_layers,
    validate,
)

B = 4  # examples per batch


class _Net(nn.Module):
    """``layer`` (called by ``call``) then a linear head to 3 logits."""

    def __init__(self, layer: nn.Module, call=None) -> None:
        super().__init__()
        self.layer = layer
        self.call = call or (lambda m, x: torch.tanh(m(x)))
        self.head = nn.LazyLinear(3)

    def forward(self, *inputs):
        return self.head(self.call(self.layer, *inputs).flatten(1))

    def split_batch(self, batch):  # (x, y): one input
        return batch[0], batch[1]

    def loss(self, outputs, targets):
        return F.cross_entropy(outputs, targets)


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _brute(model: nn.Module, inputs: tuple, dims: tuple, y: torch.Tensor, names: list[str] | None = None):
    """(B,) |∇ℓ_i|² over ``names`` (default: every trainable parameter), one autograd call per example."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad and (names is None or n in names)}
    out = []
    for i in range(len(y)):
        one = tuple(x.narrow(d, i, 1) for x, d in zip(inputs, dims))
        grads = torch.autograd.grad(F.cross_entropy(model(*one), y[i:i + 1]), list(params.values()), allow_unused=True)
        out.append(sum(g.pow(2).sum() for g in grads if g is not None))
    return torch.stack(out)


def _hooked(model: nn.Module, inputs: tuple, y: torch.Tensor, **kwargs):
    hooks = PerExampleNormHooks(model, layer_names=True, **kwargs)
    model.zero_grad()
    hooks.arm(len(y))
    F.cross_entropy(model(*inputs), y).backward()
    assert hooks.check_bias_sums(1.0, rtol=1e-10) is None
    sq, layers, problem = hooks.collect()
    assert problem is None, problem
    return sq * len(y) ** 2, hooks  # contributions to a mean over B examples -> per-example gradients


def _conv_cases():
    """name -> (layer, input shape, closed form expected)."""
    return {
        "conv1d_ints": (nn.Conv1d(3, 4, 3, stride=2, padding=1), (3, 9)),
        "conv1d_same_even_kernel": (nn.Conv1d(3, 4, 4, padding="same", dilation=2), (3, 9)),
        "conv1d_valid_reflect": (nn.Conv1d(3, 4, 3, padding="valid", padding_mode="reflect"), (3, 7)),
        "conv2d_replicate_asym": (nn.Conv2d(2, 3, (3, 2), padding=(1, 2), padding_mode="replicate"), (2, 5, 4)),
        "conv2d_circular_same": (nn.Conv2d(2, 3, 3, padding="same", padding_mode="circular"), (2, 5, 5)),
        "conv2d_grouped_strided": (nn.Conv2d(4, 6, 3, groups=2, stride=2, padding=1), (4, 6, 6)),
        "conv2d_depthwise_dilated": (nn.Conv2d(3, 6, 3, groups=3, dilation=2, padding=2, bias=False), (3, 6, 5)),
        "conv3d_same_groups": (nn.Conv3d(2, 4, (2, 3, 1), padding="same", groups=2), (2, 4, 3, 3)),
        "conv3d_strided_dilated": (nn.Conv3d(2, 3, 2, stride=(1, 2, 1), dilation=(2, 1, 1), padding=1), (2, 4, 4, 3)),
        "convT1d": (nn.ConvTranspose1d(3, 4, 3, stride=2, output_padding=1), (3, 5)),
        "convT2d_groups_dilation": (nn.ConvTranspose2d(4, 6, (3, 2), stride=2, padding=1, groups=2, dilation=2),
                                    (4, 3, 4)),
        "convT3d": (nn.ConvTranspose3d(2, 3, 2, stride=(2, 1, 1), padding=(0, 1, 0)), (2, 3, 3, 2)),
    }


@pytest.mark.parametrize("case", list(_conv_cases()))
def test_convolutions_have_exact_closed_forms(case):
    torch.manual_seed(0)
    layer, shape = _conv_cases()[case]
    model = _Net(layer).double()
    x, y = _randn(B, *shape), torch.tensor([0, 2, 1, 0])
    model(x)  # materialize the lazy head
    got, hooks = _hooked(model, (x,), y)
    assert hooks._units[layer].closed  # no per-module recomputation
    torch.testing.assert_close(got, _brute(model, (x,), (0,), y), rtol=1e-10, atol=0)


def test_a_transposed_convolution_with_output_size_reads_its_output_padding_per_call():
    torch.manual_seed(0)
    layer = nn.ConvTranspose2d(2, 3, 3, stride=2)
    model = _Net(layer, call=lambda m, x: torch.tanh(m(x, output_size=(8, 6)))).double()  # output_padding (1, 0)
    x, y = _randn(B, 2, 3, 2), torch.tensor([0, 2, 1, 0])
    model(x)
    got, _ = _hooked(model, (x,), y)
    torch.testing.assert_close(got, _brute(model, (x,), (0,), y), rtol=1e-10, atol=0)


@pytest.mark.parametrize("case", ["conv1d_ints", "conv2d_replicate_asym", "conv2d_grouped_strided", "convT1d",
                                  "conv3d_strided_dilated", "conv2d_small_map", "conv2d_strided_dilated"])
def test_every_convolution_form_is_exact(case):
    # Which form runs depends on the shapes (test below): each must be exact on its own, wherever it could run.
    cases = {**_conv_cases(), "conv2d_small_map": (nn.Conv2d(8, 8, 3, padding=1), (8, 3, 3)),
             "conv2d_strided_dilated": (nn.Conv2d(4, 5, 2, stride=2, dilation=2, padding=1), (4, 5, 6))}
    layer, shape = cases[case]
    layer = layer.double()
    x = _randn(B, *shape)
    d = _randn(*layer(x).shape, seed=1)
    per_example = torch.stack([torch.autograd.grad(layer(x[i:i + 1]), layer.weight, d[i:i + 1])[0] for i in range(B)])
    truth = per_example.flatten(1).square().sum(1)
    forms = engine._conv_forms(layer, x, d)
    patches = layer.groups == 1 and not isinstance(layer, nn.ConvTranspose1d)
    assert set(forms) == ({"conv", "strided", "pixel_gram"} | ({"unfold"} if x.dim() <= 4 else set())
                          if patches else {"conv"})
    for name, form in forms.items():
        torch.testing.assert_close(form(), truth, rtol=1e-10, atol=0, msg=name)
    if layer.bias is not None:  # weight and bias together (strided and pixel-Gram forms: the bias is an input of ones)
        bias = torch.stack([torch.autograd.grad(layer(x[i:i + 1]), layer.bias, d[i:i + 1])[0] for i in range(B)])
        for name in forms:
            got = engine._conv_form_sq_norms(name, layer, x, d, bias=True)
            torch.testing.assert_close(got, truth + bias.square().sum(1), rtol=1e-10, atol=0, msg=name)


def test_the_convolution_form_is_a_fixed_rule_of_the_shapes():
    # A rule, not a timing: every process computes the same numbers, so a resumed run equals the uninterrupted one.
    def form(conv, *shape):
        x = torch.zeros(2, *shape)
        return engine._conv_form(conv, x, conv(x))

    assert form(nn.Conv2d(64, 64, 3, padding=1), 64, 8, 8) == "pixel_gram"  # small map, many channels
    assert form(nn.Conv1d(25, 25, 3, stride=2, padding=1), 25, 19) == "pixel_gram"
    assert form(nn.Conv2d(3, 16, 3, padding=1), 3, 32, 32) == "strided"  # an image stem
    assert form(nn.Conv1d(1, 25, 5, stride=2, padding=1), 1, 40) == "strided"
    assert form(nn.Conv2d(16, 16, 3, padding=1), 16, 32, 32) == "conv"  # a large map: no patches
    assert form(nn.Conv1d(16, 16, 3, padding=1), 16, 200) == "strided"
    assert form(nn.Conv2d(16, 16, 3, padding=1, groups=4), 16, 8, 8) == "conv"  # the only form for groups > 1
    assert form(nn.Conv2d(256, 256, 3, padding=1), 256, 40, 40) == "conv"  # cheap in MACs, but a 27 MB pixel Gram


def _norm_cases():
    """name -> (layer, input shape); the batch norms are put in eval mode with moved running statistics."""
    return {
        "layer_norm": (nn.LayerNorm((2, 5)), (3, 2, 5)),
        "rms_norm": (nn.RMSNorm(5), (3, 5)),
        "rms_norm_eps": (nn.RMSNorm((2, 5), eps=1e-3), (2, 5)),
        "group_norm": (nn.GroupNorm(2, 4), (4, 3, 2)),
        "batch_norm1d_eval": (nn.BatchNorm1d(3), (3, 4)),
        "batch_norm1d_eval_2d_input": (nn.BatchNorm1d(5), (5,)),
        "batch_norm2d_eval": (nn.BatchNorm2d(3), (3, 2, 3)),
        "instance_norm1d": (nn.InstanceNorm1d(3, affine=True), (3, 6)),
        "instance_norm2d_running_eval": (nn.InstanceNorm2d(3, affine=True, track_running_stats=True), (3, 3, 4)),
    }


@pytest.mark.parametrize("case", list(_norm_cases()))
def test_normalization_layers_have_exact_closed_forms(case):
    torch.manual_seed(0)
    layer, shape = _norm_cases()[case]
    with torch.no_grad():
        for p in layer.parameters():
            p.uniform_(0.5, 1.5)  # not the identity init: a wrong scale shows
        if getattr(layer, "running_mean", None) is not None:
            layer.running_mean.uniform_(-0.5, 0.5)
            layer.running_var.uniform_(0.5, 2.0)
            layer.eval()
    model = _Net(layer).double()
    x, y = _randn(B, *shape), torch.tensor([0, 2, 1, 0])
    model(x)
    got, hooks = _hooked(model, (x,), y)
    assert hooks._units[layer].closed
    torch.testing.assert_close(got, _brute(model, (x,), (0,), y), rtol=1e-10, atol=0)


class _Gain(nn.Module):
    """A bare ``nn.Parameter`` used by its own module's forward."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 4))
        self.shift = nn.Parameter(torch.tensor(0.3))

    def forward(self, x):
        return x * self.scale + self.shift


def _fallback_cases():
    """name -> (layer, call, inputs, batch dims)."""
    pad = torch.zeros(B, 3, dtype=torch.bool)
    pad[1, 2:] = True

    def rnn_call(m, x):
        out, h = m(x)
        return torch.cat([out.transpose(0, 1).flatten(1), h.transpose(0, 1).flatten(1)], 1)

    return {
        "rnn_tanh_seq_first": (nn.RNN(3, 4, num_layers=2), rnn_call, (_randn(3, B, 3),), (1,)),
        "rnn_relu_bidirectional": (nn.RNN(3, 4, nonlinearity="relu", bidirectional=True), rnn_call,
                                   (_randn(3, B, 3),), (1,)),
        "lstm": (nn.LSTM(3, 4, batch_first=True), lambda m, x: m(x)[0], (_randn(B, 3, 3),), (0,)),
        "gru": (nn.GRU(3, 4, batch_first=True), lambda m, x: m(x)[0], (_randn(B, 3, 3),), (0,)),
        "mha": (nn.MultiheadAttention(4, 2, batch_first=True),
                lambda m, x, p: m(x, x, x, key_padding_mask=p)[0], (_randn(B, 3, 4), pad), (0, 0)),
        "bare_parameter": (_Gain(), lambda m, x: torch.tanh(m(x)), (_randn(B, 2, 4),), (0,)),
    }


@pytest.mark.parametrize("case", list(_fallback_cases()))
def test_layers_without_closed_form_are_exact_through_their_own_recomputation(case):
    torch.manual_seed(0)
    layer, call, inputs, dims = _fallback_cases()[case]
    model = _Net(layer, call).double()
    y = torch.tensor([0, 2, 1, 0])
    model(*inputs)
    got, hooks = _hooked(model, inputs, y)
    assert not hooks._units[layer].closed
    torch.testing.assert_close(got, _brute(model, inputs, dims, y), rtol=1e-10, atol=0)


class _Mosaic(nn.Module):
    """Closed-form layers (embedding, depthwise and circular convolutions, RMSNorm, linear) and recomputed ones (GRU,
    attention, a bare parameter) in one model: tokens (B, 6) -> logits (B, 3)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(9, 4, padding_idx=0)
        self.depthwise = nn.Conv1d(4, 8, 3, groups=4, padding="same", padding_mode="circular")
        self.norm = nn.RMSNorm(8)
        self.gru = nn.GRU(8, 4, batch_first=True)
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.gain = _Gain()
        self.up = nn.ConvTranspose1d(4, 2, 2, stride=2)
        self.head = nn.Linear(24, 3)

    def forward(self, tokens):
        h = self.depthwise(self.emb(tokens).transpose(1, 2)).transpose(1, 2)  # (B, 6, 8)
        h, _ = self.gru(self.norm(h))
        h = self.gain(self.attn(h, h, h)[0])  # (B, 6, 4)
        return self.head(torch.tanh(self.up(h.transpose(1, 2))).flatten(1))  # (B, 2, 12) -> (B, 3)

    def split_batch(self, batch):
        return batch[0], batch[1]

    def loss(self, outputs, targets):
        return F.cross_entropy(outputs, targets)


def test_a_model_mixing_closed_form_and_recomputed_layers_measures_through_the_hooks():
    # No whole-model fallback: one hooked backward gives every example's norm, equal to brute force, and the
    # one-off cross-check against the vmap engine passes.
    torch.manual_seed(0)
    model = _Mosaic().double()
    tokens = torch.randint(0, 9, (B, 6), generator=torch.Generator().manual_seed(0))
    tokens[0, :2] = 0
    y = torch.tensor([0, 2, 1, 0])
    assert unsupported_layers(model) == []
    got, hooks = _hooked(model, (tokens,), y)
    kinds = {name: unit.closed for name, unit in ((u.name, u) for u in hooks._units.values())}
    assert kinds == {"emb": True, "depthwise": True, "norm": True, "gru": False, "attn": False, "gain": False,
                     "up": True, "head": True}
    torch.testing.assert_close(got, _brute(model, (tokens,), (0,), y), rtol=1e-10, atol=0)
    stats = hook_gradient_stats(model, (tokens, y))
    torch.testing.assert_close(stats.sq_norms, got, rtol=1e-10, atol=0)
    assert validate(model, (tokens, y)) is None


# ------------------------------------------------------------------------------------------ norm-layer mode
class _NormLM(nn.Module):
    """Embedding, LayerNorm, RMSNorm, a GroupNorm over channels and a tied output layer: tokens (B, 5) -> (B, 3)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 6)
        self.ln = nn.LayerNorm(6)
        self.mix = nn.Linear(6, 6)
        self.rms = nn.RMSNorm(6)
        self.gn = nn.GroupNorm(1, 5)
        self.head = nn.Linear(6, 3)

    def forward(self, tokens):
        h = self.rms(torch.tanh(self.mix(self.ln(self.emb(tokens)))))  # (B, 5, 6)
        h = self.gn(h) + (h @ self.emb.weight.T)[..., :6]  # a tied use of the embedding outside its layer
        return self.head(h.mean(1))

    def split_batch(self, batch):
        return batch[0], batch[1]

    def loss(self, outputs, targets):
        return F.cross_entropy(outputs, targets)


def test_norm_mode_measures_only_the_normalization_layers_exactly():
    torch.manual_seed(0)
    model = _NormLM().double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.split(".")[0] in ("ln", "rms", "gn"):
                p.uniform_(0.5, 1.5)
    tokens = torch.randint(0, 7, (B, 5), generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 2, 1, 0])
    assert unsupported_layers(model) == [] and unsupported_layers(model, "norm") == []
    assert [name for name, m in model.named_modules() if is_norm_layer(m)] == ["ln", "rms", "gn"]
    assert is_norm_layer(nn.BatchNorm2d(3)) and is_norm_layer(nn.InstanceNorm1d(3)) and not is_norm_layer(model.mix)

    got, hooks = _hooked(model, (tokens,), y, layers="norm")
    selected = hooks.selected_parameter_names()
    assert selected == ["ln.weight", "ln.bias", "rms.weight", "gn.weight", "gn.bias"]
    torch.testing.assert_close(got, _brute(model, (tokens,), (0,), y, selected), rtol=1e-10, atol=0)
    hooks.arm(B)  # the other layers get no hook at all
    assert not model.mix._forward_hooks and not model.emb._forward_hooks and model.ln._forward_hooks
    hooks.disarm()

    stats = hook_gradient_stats(model, (tokens, y), layers="norm", per_layer=True)
    torch.testing.assert_close(stats.sq_norms, got, rtol=1e-10, atol=0)
    assert set(stats.layer_sq_norms) == {"ln", "rms", "gn"} and len(stats.mean_grad) == len(selected)
    params = dict(model.named_parameters())
    mean = torch.autograd.grad(F.cross_entropy(model(tokens), y), [params[n] for n in selected])
    for a, b in zip(stats.mean_grad, mean):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)
    # the tied embedding breaks the full hooks (caught by the cross-check), not the norm mode
    assert "differ from the vmap engine" in validate(model, (tokens, y))
    assert validate(model, (tokens, y), layers="norm") is None


def test_norm_mode_refuses_what_it_cannot_measure():
    with pytest.raises(ValueError, match="no normalization layer"):
        PerExampleNormHooks(nn.Sequential(nn.Linear(3, 3)), layers="norm")
    for call in (lambda: PerExampleNormHooks(nn.LayerNorm(3), layers="some"),
                 lambda: hook_gradient_stats(nn.LayerNorm(3), torch.zeros(2, 3), layers="ln"),
                 lambda: unsupported_layers(nn.LayerNorm(3), layers="")):
        with pytest.raises(ValueError, match="layers must be 'all' or 'norm'"):
            call()
    shared = nn.Sequential(nn.LayerNorm(3), nn.Linear(3, 3))
    shared[1].bias = shared[0].bias  # a norm parameter owned by another layer too
    assert "tied" in unsupported_layers(shared, "norm")[0]
    bn_train = _Net(nn.BatchNorm1d(3)).double()
    bn_train(_randn(B, 3))
    hooks = PerExampleNormHooks(bn_train, layers="norm")
    hooks.arm(B)
    bn_train(_randn(B, 3)).sum().backward()
    assert "BatchNorm" in hooks.collect()[2]


# --------------------------------------------------------------------------------------------- engine choice
def test_choose_engine_picks_the_engine_that_adds_less_time(monkeypatch):
    # A fake clock: the hooks add (hooked - plain) to a step, vmap a whole pass. The rule, not the machine.
    torch.manual_seed(0)
    model = _Net(nn.Conv1d(2, 3, 3)).double()
    x, y = _randn(B, 2, 6), torch.tensor([0, 2, 1, 0])
    model(x)
    batch = (x, y)
    for costs, expected in (({"plain": 1.0, "hooked": 1.6, "vmapped": 0.5}, "vmap"),
                            ({"plain": 1.0, "hooked": 1.4, "vmapped": 0.5}, "hooks"),  # adds 0.4 < 0.5
                            ({"plain": 2.0, "hooked": 2.2, "vmapped": 0.1}, "vmap")):
        def fake(fn, device, costs=costs):
            return (costs.get(fn.__name__, 0.0), fn())
        monkeypatch.setattr(engine, "_timed", fake)
        assert choose_engine(model, batch) == expected
    monkeypatch.undo()
    grad_before = [p.grad for p in model.parameters()]
    assert choose_engine(model, batch) in ("hooks", "vmap")  # the real clock runs
    assert [p.grad for p in model.parameters()] == grad_before  # nothing touched


def test_choose_engine_never_picks_hooks_that_cannot_measure():
    tied = _NormLM().double()
    tokens = torch.randint(0, 7, (B, 5), generator=torch.Generator().manual_seed(0))
    batch = (tokens, torch.tensor([0, 2, 1, 0]))
    shared = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 3))
    shared[2].weight = shared[0].weight

    class Wrap(_Net):
        pass

    wrapped = Wrap(shared).double()
    x = _randn(B, 3)
    wrapped(x)
    assert choose_engine(wrapped, (x, torch.tensor([0, 2, 1, 0]))) == "vmap"  # tied weights
    assert choose_engine(tied, batch, layers="norm") == "hooks"  # the norm mode has no vmap twin
    broadcast = _Net(nn.Embedding(5, 2), call=lambda m, x: torch.tanh(x[..., None] * m(torch.arange(3)))).double()
    x = _randn(B, 3)
    broadcast(x)
    assert choose_engine(broadcast, (x, torch.tensor([0, 2, 1, 0]))) == "vmap"  # a layer broadcast over the batch


def test_choose_engine_takes_the_hooks_where_vmap_cannot_run_the_model(monkeypatch):
    # .item() in the forward: vmap fails on two examples, so its engine would loop over every example; no timing.
    model = _Net(nn.Linear(3, 4), call=lambda m, x: torch.tanh(m(x)) if x.sum().item() < 1e9 else m(x)).double()
    x = _randn(B, 3)
    model(x)

    def no_timing(fn, device):
        raise AssertionError("timed although vmap cannot run the model")

    monkeypatch.setattr(engine, "_timed", no_timing)
    assert choose_engine(model, (x, torch.tensor([0, 2, 1, 0]))) == "hooks"
