"""GradientDiversity and its pure functions against brute-force per-example autograd and exact constructions."""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger
from torch import nn

from lightning_sgd.callbacks import GradientDiversity
from lightning_sgd.diversity import batch_size_bound, diversity_from_stats, gradient_diversity
from lightning_sgd.noise_scale import per_example_estimate
from lightning_sgd.per_example import per_example_gradient_stats, trainable_parameters
from lightning_sgd.recipes.classification import ClassificationModule
from lightning_sgd.recipes.language import TransformerLM
from lightning_sgd.recipes.mnist_1d import MNIST1DCNN, MNIST1DMLP
from lightning_sgd.recipes.modules import LanguageModelModule
from tests.helpers import TinyDataModule, classification_data, fast_trainer_kwargs, tiny_module


def brute_force_diversity(module, x, y):
    params = [p for p in module.parameters() if p.requires_grad]
    g = []
    for i in range(len(y)):
        loss = module.loss(module(x[i : i + 1]), y[i : i + 1])
        g.append(torch.cat([t.flatten() for t in torch.autograd.grad(loss, params)]).double())
    g = torch.stack(g)  # (n, P)
    return float(g.pow(2).sum() / g.sum(0).pow(2).sum())


def test_diversity_matches_brute_force_on_tiny_mlp():
    # float32 gradients, float64 reductions: relative 1e-5 is rounding.
    module = tiny_module()
    x, y = classification_data(n=9)
    stats = per_example_gradient_stats(module, (x, y), chunk_size=4, per_layer=True)
    value, layers = diversity_from_stats(stats, list(trainable_parameters(module)))
    assert value == pytest.approx(brute_force_diversity(module, x, y), rel=1e-5)
    assert set(layers) == {"network.0", "network.2", "network.4"}
    assert all(v >= 1 / 9 - 1e-6 for v in layers.values())  # Δ >= 1/n always (Cauchy-Schwarz)


class Linear1(pl.LightningModule):
    """f_i(w) = -wᵀx_i: the gradient of example i is -x_i exactly, so we choose the gradients."""

    def __init__(self, d):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(d))

    def split_batch(self, batch):
        return batch

    def forward(self, x):
        return x @ self.w

    def loss(self, out, y):
        return -out.mean()


def test_identical_and_orthogonal_gradients():
    # Exact constructions; the engine keeps gradients in float32, so 1e-6 relative (a few float32 ulps) is the
    # rounding tolerance.
    module = Linear1(6)
    same = torch.tensor([[1.0, 2.0, 0, 0, 0, 0]]).repeat(5, 1)
    stats = per_example_gradient_stats(module, (same, torch.zeros(5)))
    assert diversity_from_stats(stats)[0] == pytest.approx(1 / 5, rel=1e-6)
    ortho = torch.diag(torch.tensor([1.0, 2.0, 3.0, 0.5, 4.0, 1.5]))  # 6 orthogonal gradients of unequal norms
    stats = per_example_gradient_stats(module, (ortho, torch.zeros(6)))
    assert diversity_from_stats(stats)[0] == pytest.approx(1.0, rel=1e-6)


def test_exact_identity_with_the_per_example_noise_scale():
    # 1 + B̂_simple = (n − 1)Δ/(1 − Δ) on the same examples, to float64 rounding of the same two reductions.
    module = tiny_module(seed=3)
    x, y = classification_data(n=24, seed=5)
    stats = per_example_gradient_stats(module, (x, y))
    delta, _ = diversity_from_stats(stats)
    sample = per_example_estimate(stats.sq_norms, sum(float(g.double().pow(2).sum()) for g in stats.mean_grad))
    b_simple = sample.trace_cov / sample.grad_sq_norm
    assert 1 + b_simple == pytest.approx((24 - 1) * delta / (1 - delta), rel=1e-9)


def test_undefined_cases_return_nan_and_the_bound():
    assert math.isnan(gradient_diversity(torch.ones(3), 0.0))  # all-zero / cancelling gradients
    assert math.isnan(gradient_diversity(torch.tensor([1.0, float("inf")]), 1.0))
    assert batch_size_bound(0.05, 1000, delta=0.5) == 26.0
    with pytest.raises(ValueError, match="delta"):
        batch_size_bound(0.1, 10, delta=0.0)
    with pytest.raises(ValueError, match="probe_size"):
        GradientDiversity(probe_size=1)


class TinyTransformer(nn.Module):
    """Token classifier: embedding + 1 pre-LN encoder layer (LayerNorm, 2-head attention) + mean pool + head."""

    def __init__(self, vocab=11, d_model=16, classes=3, length=6):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(0.1 * torch.randn(length, d_model))
        self.encoder = nn.TransformerEncoderLayer(d_model, nhead=2, dim_feedforward=32, dropout=0.0,
                                                  batch_first=True, norm_first=True)
        self.head = nn.Linear(d_model, classes)

    def forward(self, tokens):  # (B, T) -> (B, T, d) -> (B, classes)
        h = self.encoder(self.embed(tokens) + self.pos)
        return self.head(h.mean(1))


def _bn_cnn():
    net = nn.Sequential(nn.Unflatten(1, (1, 40)), nn.Conv1d(1, 4, 5, stride=2), nn.BatchNorm1d(4), nn.ReLU(),
                        nn.Flatten(), nn.Linear(4 * 18, 10))
    return ClassificationModule(net, num_classes=10)


@pytest.mark.parametrize("kind", ["mlp", "cnn", "transformer", "recipe_transformer_lm", "bn_cnn"])
def test_engine_diversity_on_recipe_networks(kind):
    # Δ from the callback equals brute force on the recipes' MLP and CNN, a torch encoder-layer Transformer, the
    # recipes' Transformer LM (causal attention, tied embeddings, per-example token-mean loss) and a BatchNorm CNN.
    torch.manual_seed(0)
    if kind == "transformer":
        module = ClassificationModule(TinyTransformer(), num_classes=3)
        x, y = torch.randint(0, 11, (6, 6)), torch.randint(0, 3, (6,))
    elif kind == "recipe_transformer_lm":
        net = TransformerLM(vocab_size=13, d_model=16, num_heads=2, d_ff=32, num_layers=1, dropout=0.0, max_len=8)
        module = LanguageModelModule(net)
        tokens = torch.randint(0, 13, (6, 7))
        x, y = tokens[:, :-1], tokens[:, 1:]
    else:
        net = {"mlp": lambda: MNIST1DMLP(hidden=16), "cnn": lambda: MNIST1DCNN(channels=4)}.get(kind)
        module = ClassificationModule(net(), num_classes=10) if net else _bn_cnn()
        x, y = torch.randn(6, 40), torch.randint(0, 10, (6,))
    module.train()
    cb = GradientDiversity(schedule=1, per_layer=True)
    metrics = cb.measure(module, (x, y))
    assert all(m.training for m in module.modules())  # BatchNorm's train mode restored after the measurement
    # layer hooks (attention through the hooks' per-module fallback); tied weights and BatchNorm: vmap
    assert cb.engine_in_use == ("hooks" if kind in ("mlp", "cnn", "transformer") else "vmap")
    module.eval()  # brute force in eval mode = what the engine does for BatchNorm (no-op for the others)
    truth = brute_force_diversity(module, x, y)
    assert metrics["diversity/value"] == pytest.approx(truth, rel=1e-4)
    assert metrics["diversity/n_delta"] == pytest.approx(6 * truth, rel=1e-4)


def test_callback_logs_on_schedule_with_a_fixed_probe_set_and_skips_zero_gradients():
    cb = GradientDiversity(schedule=2, probe_size=24, delta=0.5, per_layer=True)
    trainer = pl.Trainer(**fast_trainer_kwargs(max_steps=5, callbacks=[cb], logger=CSVLogger("logs", name="div")))
    dm = TinyDataModule(n=64, batch_size=16, shuffle=True)
    trainer.fit(tiny_module(), datamodule=dm)
    assert cb.measured == 3 and cb.probe[0].shape[0] == 24 and math.isfinite(cb.diversity)
    assert cb.last_metrics["diversity/batch_bound"] == pytest.approx(0.5 * 24 * cb.diversity + 1)
    import csv

    with open(f"{trainer.logger.log_dir}/metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("diversity/value")]
    assert [int(r["step"]) for r in rows] == [0, 2, 4]
    assert {"diversity/n_delta", "diversity/layer/network.0"} <= set(rows[0])
    # Drawing the probe set leaves the shuffled training order alone: same batches as a run without the callback.
    seen = []

    class Spy(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(batch[1].clone())

    for callbacks in ([GradientDiversity(schedule=2, probe_size=24), Spy()], [Spy()]):
        pl.Trainer(**fast_trainer_kwargs(max_steps=3, callbacks=callbacks)).fit(
            tiny_module(), datamodule=TinyDataModule(n=64, batch_size=16, shuffle=True))
    assert all(torch.equal(a, b) for a, b in zip(seen[:3], seen[3:]))
    # All-zero gradients (a frozen-zero model with a zero-gradient loss): skipped and counted, nothing logged as Δ.
    zero = Linear1(4)
    out = cb.measure(zero, (torch.zeros(5, 4), torch.zeros(5)))
    assert out == {"diversity/skipped": 1.0} and cb.skipped["zero_gradient"] == 1
    assert cb.measure(zero, (torch.ones(1, 4), torch.zeros(1))) == {"diversity/skipped": 2.0}
    assert cb.measure(zero, (torch.full((3, 4), float("nan")), torch.zeros(3)))["diversity/skipped"] == 3.0
    assert cb.skipped == {"too_few": 1, "zero_gradient": 1, "nonfinite": 1, "failed": 0}
