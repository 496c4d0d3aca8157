"""GradientNoiseScale and GradientDiversity on LightningModules written the way their authors write them: only
``training_step`` + ``configure_optimizers``, tuple or dict batches, ``self.log``, ``{"loss": ...}`` returns, manual
optimization, a summed loss. Every number is checked against brute force in float64: per-example gradients from
one autograd call per example, the Hessian as a dense matrix."""

from __future__ import annotations

import copy
import csv
import math
import warnings

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import CSVLogger
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils._pytree import tree_map
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_sgd.callbacks import GradientDiversity, GradientNoiseScale
from lightning_sgd.compat import Callback
from lightning_sgd.noise_scale import per_example_estimate, small_batches_estimate, two_batch_estimate
from tests.helpers import fast_trainer_kwargs

# ------------------------------------------------------------------------------------------------ user modules


class PlainMLP(pl.LightningModule):
    """A classifier as the Lightning README writes one: layers in ``__init__``, the loss in ``training_step``."""

    def __init__(self, dropout: float = 0.0, reduction: str = "mean", lr: float = 0.5) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Dropout(dropout), nn.Linear(5, 3))
        self.reduction, self.lr = reduction, lr

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y, reduction=self.reduction)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def mlp_loss(module: nn.Module, batch) -> Tensor:
    """PlainMLP's loss written out for the brute force (no ``training_step``, no ``self.log``)."""
    x, y = batch
    return F.cross_entropy(module.net(x), y)


def mlp_loader(n: int = 16, batch_size: int = 16) -> DataLoader:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


class DictLM(pl.LightningModule):
    """A HuggingFace-style token model: dict batches (``input_ids``, ``labels`` and BERT-style ``position_ids`` of
    shape ``(1, T)`` broadcast over the batch), ``training_step`` returns ``{"loss": loss}``."""

    def __init__(self, vocab: int = 7, dim: int = 4, length: int = 5) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, dim)
        self.position = nn.Embedding(length, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def training_step(self, batch, batch_idx):
        h = self.norm(self.embed(batch["input_ids"]) + self.position(batch["position_ids"]))  # (B, T, d)
        logits = self.head(torch.tanh(h))  # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())  # same T per example: a mean
        self.log("train_loss", loss)
        return {"loss": loss}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def lm_loss(module: nn.Module, batch) -> Tensor:
    h = module.norm(module.embed(batch["input_ids"]) + module.position(batch["position_ids"]))
    return F.cross_entropy(module.head(torch.tanh(h)).flatten(0, 1), batch["labels"].flatten())


class Tokens(Dataset):
    def __init__(self, n: int = 16, vocab: int = 7, length: int = 5) -> None:
        g = torch.Generator().manual_seed(2)
        self.ids = torch.randint(0, vocab, (n, length), generator=g)
        self.labels = torch.randint(0, vocab, (n, length), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def lm_loader(n: int = 16, batch_size: int = 8) -> DataLoader:
    def collate(items):
        batch = torch.utils.data.default_collate(items)
        batch["position_ids"] = torch.arange(batch["input_ids"].shape[1])[None]  # (1, T), as BERT builds them
        return batch

    return DataLoader(Tokens(n), batch_size=batch_size, collate_fn=collate)


# ------------------------------------------------------------------------------------------------ brute force


def example_slices(batch, n: int):
    """The batch's examples one at a time (tensors with ``shape[0] == n`` sliced, the others kept whole)."""
    return [part(batch, n, i, i + 1) for i in range(n)]


def part(batch, n: int, start: int, stop: int):
    return tree_map(lambda t: t[start:stop] if isinstance(t, Tensor) and t.dim() and t.shape[0] == n else t, batch)


def size_of(batch) -> int:
    return len(batch[1]) if isinstance(batch, (tuple, list)) else len(batch["input_ids"])


class Float64:
    """A float64 copy of ``module`` at the recorded parameters, and the gradient of ``loss_fn`` on a batch."""

    def __init__(self, module: nn.Module, params: list[Tensor], loss_fn) -> None:
        # the module's layers (same names and parameter order), without the LightningModule and its Trainer
        layers = nn.ModuleDict({name: copy.deepcopy(child) for name, child in module.named_children()})
        self.module = layers.double().eval()  # eval: the brute-force losses have no dropout
        with torch.no_grad():
            for p, v in zip(self.module.parameters(), params):
                p.copy_(v)
        self.params = list(self.module.parameters())
        self.names = [name for name, _ in self.module.named_parameters()]
        self.loss_fn = loss_fn

    @staticmethod
    def double(batch):
        return tree_map(lambda t: t.double() if isinstance(t, Tensor) and t.is_floating_point() else t, batch)

    def grad(self, batch) -> Tensor:
        loss = self.loss_fn(self.module, self.double(batch))
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss, self.params)])

    def per_example(self, batch) -> Tensor:
        return torch.stack([self.grad(one) for one in example_slices(batch, size_of(batch))])  # (n, P)

    def hessian(self, batch) -> Tensor:
        shapes = [p.shape for p in self.params]
        sizes = [p.numel() for p in self.params]
        batch = self.double(batch)

        def loss_of(theta: Tensor) -> Tensor:
            chunks = [c.reshape(s) for c, s in zip(theta.split(sizes), shapes)]
            return self.loss_fn(_Bound(self.module, dict(zip(self.names, chunks))), batch)

        theta = torch.cat([p.detach().flatten() for p in self.params])
        return torch.autograd.functional.hessian(loss_of, theta)  # (P, P)


class _Bound:
    """Attribute access to ``module``'s submodules, called with substituted parameters (for the dense Hessian)."""

    def __init__(self, module: nn.Module, params: dict[str, Tensor]) -> None:
        self._module, self._params = module, params

    def __getattr__(self, name: str):
        sub = getattr(self._module, name)
        prefix = f"{name}."
        own = {k[len(prefix):]: v for k, v in self._params.items() if k.startswith(prefix)}
        return lambda *args: functional_call(sub, own, args)


def brute_per_example(f64: Float64, batch):
    g = f64.per_example(batch)
    return per_example_estimate(g.pow(2).sum(1), g.mean(0).pow(2).sum())


def brute_split(f64: Float64, batch, parts: int = 4):
    n = size_of(batch)
    size = n // parts
    g = torch.stack([f64.grad(part(batch, n, k * size, (k + 1) * size)) for k in range(parts)])
    return small_batches_estimate(g.pow(2).sum(1), size, g.mean(0).pow(2).sum())


def brute_b_noise(f64: Float64, batch, groups: int = 4):
    """The callback's estimator with a dense Hessian: group gradients from the first half, H from the second."""
    n = size_of(batch)
    size = (n // 2) // groups
    g = torch.stack([f64.grad(part(batch, n, k * size, (k + 1) * size)) for k in range(groups)])
    h = f64.hessian(part(batch, n, n // 2, n))
    q_small = float(torch.einsum("kp,pq,kq->k", g, h, g).mean())
    mean = g.mean(0)
    return two_batch_estimate(q_small, size, float(mean @ h @ mean), groups * size)


def brute_diversity(f64: Float64, batch) -> float:
    g = f64.per_example(batch)
    return float(g.pow(2).sum() / g.sum(0).pow(2).sum())


# ------------------------------------------------------------------------------------------------ recording


class Recorder(Callback):
    """Listed after the measuring callbacks: per optimizer step the batch, the parameters at which it was measured,
    and the callbacks' raw values (GNS: its last sample and B_noise EMA; diversity: Δ at batch start)."""

    def __init__(self, gns: GradientNoiseScale | None = None, diversity: GradientDiversity | None = None) -> None:
        self.gns, self.diversity, self.steps = gns, diversity, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        entry = {"batch": tree_map(lambda t: t.clone() if isinstance(t, Tensor) else t, batch),
                 "params": [p.detach().clone().double() for p in pl_module.parameters()]}
        if self.diversity is not None:
            entry["diversity"] = self.diversity.diversity
        self.steps.append(entry)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.gns is not None:
            self.steps[-1]["sample"], self.gns.last_sample = self.gns.last_sample, None
            self.steps[-1]["b_noise"] = (self.gns.b_noise_ema.grad_sq_norm, self.gns.b_noise_ema.trace_cov)


def fit(module: pl.LightningModule, loader: DataLoader, callbacks: list, max_steps: int = 3, **kwargs) -> pl.Trainer:
    trainer = pl.Trainer(**fast_trainer_kwargs(max_steps=max_steps, callbacks=callbacks, **kwargs))
    trainer.fit(module, train_dataloaders=loader)
    return trainer


def assert_sample(got, truth, rel: float) -> None:
    assert (got.b_small, got.b_big) == (truth.b_small, truth.b_big)
    assert got.grad_sq_norm == pytest.approx(truth.grad_sq_norm, rel=rel, abs=1e-8)
    assert got.trace_cov == pytest.approx(truth.trace_cov, rel=rel, abs=1e-8)


# ------------------------------------------------------------------------------------------------ GNS


@pytest.mark.parametrize("source, engine", [("per_example", "hooks"), ("per_example", "vmap"), ("split", "auto")])
def test_gns_on_a_training_step_only_module_matches_brute_force(source, engine):
    # Each measured step's raw sample equals the same estimator on float64 brute-force gradients at the recorded
    # parameters. The callback's gradients are float32, its sums float64: relative 1e-4 is rounding (tr Σ is a
    # difference of norms of similar size), as in tests/test_noise_scale.py.
    gns = GradientNoiseScale(source=source, engine=engine, schedule=1, split_parts=4, chunk_size=5)
    recorder = Recorder(gns)
    module = PlainMLP()
    fit(module, mlp_loader(n=48), [gns, recorder])
    assert gns.measured == 3 and gns.source_in_use == source
    assert gns.engine_in_use == (engine if source == "per_example" else None)  # no fallback happened
    for entry in recorder.steps:
        f64 = Float64(module, entry["params"], mlp_loss)
        truth = (brute_per_example if source == "per_example" else brute_split)(f64, entry["batch"])
        assert_sample(entry["sample"], truth, rel=1e-4)


def test_b_noise_on_a_training_step_only_module_matches_a_dense_hessian():
    # B_noise's Hessian-vector products go through torch.func over training_step. Against a dense float64 Hessian
    # of the 48-parameter MLP: float32 HVPs (~1e-5 relative seen on GᵀHG, tr(HΣ) a difference of two quadratic
    # forms): relative 1e-4, as the other sources.
    gns = GradientNoiseScale(source="split", schedule=1, b_noise_schedule=1, b_noise_groups=4, beta=0.0)
    recorder = Recorder(gns)
    module = PlainMLP()
    fit(module, mlp_loader(n=48), [gns, recorder])
    assert gns.b_noise_ema.count == 3
    for entry in recorder.steps:
        truth = brute_b_noise(Float64(module, entry["params"], mlp_loss), entry["batch"])
        ghg, trace_h = entry["b_noise"]  # beta = 0: the EMA is the last sample
        assert ghg == pytest.approx(truth.grad_sq_norm, rel=1e-4, abs=1e-8)
        assert trace_h == pytest.approx(truth.trace_cov, rel=1e-4, abs=1e-8)


@pytest.mark.parametrize("engine", ["hooks", "vmap"])
def test_gns_on_a_dict_batch_module_returning_a_loss_dict(engine):
    # Dict batches with a (1, T) position-id tensor broadcast over the examples, and {"loss": loss}; relative 1e-4
    # as above.
    gns = GradientNoiseScale(source="per_example", engine=engine, schedule=1)
    recorder = Recorder(gns)
    module = DictLM()
    fit(module, lm_loader(n=24, batch_size=8), [gns, recorder])
    assert gns.measured == 3 and gns.source_in_use == "per_example"
    assert gns.engine_in_use == engine  # the hooks read the broadcast position embedding at its addition: no fallback
    for entry in recorder.steps:
        truth = brute_per_example(Float64(module, entry["params"], lm_loss), entry["batch"])
        assert_sample(entry["sample"], truth, rel=1e-4)


# ------------------------------------------------------------------------------------------------ diversity


@pytest.mark.parametrize("kind, engine", [("mlp", "auto"), ("mlp", "vmap"), ("lm", "auto"), ("lm", "vmap")])
def test_diversity_on_user_modules_matches_brute_force(kind, engine):
    # Δ at each step's parameters (measured at batch start) equals brute force; float32 gradients, float64
    # reductions: relative 1e-5... 1e-4 (the hooks' Gram-matrix form rounds differently): 1e-4.
    cb = GradientDiversity(schedule=1, engine=engine)
    recorder = Recorder(diversity=cb)
    module, loader, loss_fn = ((PlainMLP(), mlp_loader(n=48), mlp_loss) if kind == "mlp"
                               else (DictLM(), lm_loader(n=24, batch_size=8), lm_loss))
    fit(module, loader, [cb, recorder])
    assert cb.measured == 3 and cb.skipped == {"too_few": 0, "zero_gradient": 0, "nonfinite": 0, "failed": 0}
    if engine == "vmap":
        assert cb.engine_in_use == "vmap"
    for entry in recorder.steps:
        truth = brute_diversity(Float64(module, entry["params"], loss_fn), entry["batch"])
        assert entry["diversity"] == pytest.approx(truth, rel=1e-4)


def test_diversity_probe_set_from_dict_batches():
    # probe_size=12 from batches of 8: the batched tensors of two batches concatenated and cut to 12, the (1, T)
    # position ids kept whole; Δ on the probe at the last measured parameters equals brute force (relative 1e-4).
    cb = GradientDiversity(schedule=1, probe_size=12)
    recorder = Recorder(diversity=cb)
    module = DictLM()
    fit(module, lm_loader(n=24, batch_size=8), [cb, recorder], max_steps=2)
    assert set(cb.probe) == {"input_ids", "labels", "position_ids"}
    assert cb.probe["input_ids"].shape == (12, 5) and cb.probe["position_ids"].shape == (1, 5)
    assert torch.equal(cb.probe["labels"], Tokens(24).labels[:12])
    for entry in recorder.steps:
        truth = brute_diversity(Float64(module, entry["params"], lm_loss), cb.probe)
        assert entry["diversity"] == pytest.approx(truth, rel=1e-4)


# ------------------------------------------------------------------------------------------------ no side effects


def _csv_column(trainer: pl.Trainer, key: str) -> list[str]:
    with open(f"{trainer.logger.log_dir}/metrics.csv") as f:
        return [row[key] for row in csv.DictReader(f) if row.get(key)]


@pytest.mark.parametrize("gns_kwargs", [
    {"engine": "hooks", "b_noise_schedule": 1},
    {"engine": "vmap"},
    {"source": "split"},
])
def test_training_is_bit_identical_with_and_without_the_callbacks(gns_kwargs):
    # Dropout draws masks from the global RNG and training_step logs train_loss: the measurements re-run
    # training_step (B_noise, split, vmap, diversity's probes, the hook engine's cross-check) with the RNG forked and
    # self.log muted, so weights and logged losses are identical to the plain run's.
    def run(callbacks):
        torch.manual_seed(0)
        module = PlainMLP(dropout=0.3)
        trainer = fit(module, mlp_loader(n=64), callbacks, max_steps=4, log_every_n_steps=1,
                      logger=CSVLogger(".", name="run"))
        return module, trainer

    gns, diversity = GradientNoiseScale(schedule=1, **gns_kwargs), GradientDiversity(schedule=1)
    measured, with_cb = run([gns, diversity])
    plain, without = run([])
    assert gns.measured == 4 and diversity.measured == 4
    for (name, a), b in zip(measured.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(a, b), name
    assert torch.equal(with_cb.callback_metrics["train_loss"], without.callback_metrics["train_loss"])
    assert _csv_column(with_cb, "train_loss") == _csv_column(without, "train_loss")
    assert len(_csv_column(with_cb, "train_loss")) == 4


# ------------------------------------------------------------------------------------------------ clear errors


class ManualGAN(pl.LightningModule):
    """A GAN the way Lightning's docs write one: manual optimization, two optimizers, ``toggle_optimizer``."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.generator = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 6))
        self.discriminator = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 1))
        self.steps_run = 0

    def training_step(self, batch, batch_idx):
        self.steps_run += 1
        real = batch[0]
        opt_g, opt_d = self.optimizers()
        ones, zeros = torch.ones(len(real), 1), torch.zeros(len(real), 1)
        self.toggle_optimizer(opt_g)
        fake = self.generator(torch.randn(len(real), 2))
        g_loss = F.binary_cross_entropy_with_logits(self.discriminator(fake), ones)
        self.manual_backward(g_loss)
        opt_g.step()
        opt_g.zero_grad()
        self.untoggle_optimizer(opt_g)
        self.toggle_optimizer(opt_d)
        d_loss = (F.binary_cross_entropy_with_logits(self.discriminator(real), ones)
                  + F.binary_cross_entropy_with_logits(self.discriminator(fake.detach()), zeros)) / 2
        self.manual_backward(d_loss)
        opt_d.step()
        opt_d.zero_grad()
        self.untoggle_optimizer(opt_d)

    def configure_optimizers(self):
        return [torch.optim.Adam(self.generator.parameters()), torch.optim.Adam(self.discriminator.parameters())]


@pytest.mark.parametrize("callback", [
    lambda: GradientNoiseScale(), lambda: GradientNoiseScale(source="split"),
    lambda: GradientNoiseScale(source="per_example", engine="hooks"), lambda: GradientDiversity(),
])
def test_manual_optimization_is_refused_at_setup(callback):
    module = ManualGAN()
    loader = DataLoader(TensorDataset(torch.randn(32, 6)), batch_size=8)
    with pytest.raises(ValueError, match=r"manual optimization \(automatic_optimization=False\)"):
        fit(module, loader, [callback()])
    assert module.steps_run == 0  # at setup, before any training step


@pytest.mark.parametrize("callback", [
    lambda: GradientNoiseScale(source="per_example", schedule=1),
    lambda: GradientNoiseScale(source="per_example", engine="vmap", schedule=1),
    lambda: GradientNoiseScale(source="split", schedule=1),
    lambda: GradientDiversity(schedule=1),
])
def test_a_summed_loss_is_refused_at_the_first_measurement(callback):
    # reduction="sum": the estimators compare gradients of batches of different sizes, which needs a mean.
    module = PlainMLP(reduction="sum")
    with pytest.raises(ValueError, match="the training loss is a sum over examples"):
        fit(module, mlp_loader(n=32), [callback()])
    assert module.global_step == 0


# ------------------------------------------------------------------------------------------------ fallbacks


class SqueezeBinary(PlainMLP):
    """A binary classifier with the common ``.squeeze()``: a one-example batch loses its batch dimension, so its
    loss fails on single examples (the per-example engines) but not on slices of several (the split source)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.binary_cross_entropy_with_logits(self.net(x).squeeze(), (y > 0).float())


def squeeze_loss(module: nn.Module, batch) -> Tensor:
    x, y = batch
    return F.binary_cross_entropy_with_logits(module.net(x).squeeze(-1), (y > 0).to(x.dtype))


class FixedBatch(PlainMLP):
    """Hard-codes its batch size in a reshape: only the full batch runs, so no source can re-run slices of it."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x).reshape(16, 3), y)


def test_per_example_failure_falls_back_to_split_with_one_warning():
    gns = GradientNoiseScale(source="per_example", engine="vmap", schedule=1, split_parts=4)
    recorder = Recorder(gns)
    module = SqueezeBinary()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(module, mlp_loader(n=48), [gns, recorder])
    fallbacks = [w for w in caught if "measuring with source='split' from now on" in str(w.message)]
    assert len(fallbacks) == 1
    assert gns.source_in_use == "split" and gns.measured == 3 and gns.skipped["failed"] == 0
    for entry in recorder.steps:  # every step, the first included, measured by the split source: exact
        truth = brute_split(Float64(module, entry["params"], squeeze_loss), entry["batch"])
        assert_sample(entry["sample"], truth, rel=1e-4)


def test_when_no_source_can_run_the_model_the_callbacks_stop_without_crashing_the_run():
    gns = GradientNoiseScale(source="per_example", engine="vmap", schedule=1, b_noise_schedule=1)
    diversity = GradientDiversity(schedule=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = fit(FixedBatch(), mlp_loader(n=64), [gns, diversity], max_steps=4)
    assert trainer.global_step == 4  # training ran to the end
    messages = [str(w.message) for w in caught]
    assert sum("measuring with source='split'" in m for m in messages) == 1
    assert sum("split source cannot measure this model either" in m for m in messages) == 1
    assert sum("B_noise estimate cannot run" in m for m in messages) == 1
    assert sum("GradientDiversity: per-example gradients cannot be computed" in m for m in messages) == 1
    assert gns.measured == 0 and gns.source_in_use is None
    assert gns.skipped["failed"] == 4 + 1  # 4 scheduled measurements not taken, and B_noise once
    assert diversity.measured == 0 and diversity.skipped["failed"] == 4
    assert math.isnan(gns.b_simple) and math.isnan(diversity.diversity)


@pytest.mark.parametrize("source", ["per_example", "split"])
def test_a_one_example_last_batch_is_skipped_not_raised(source):
    # 17 examples in batches of 8: the epoch's last batch holds one example (no drop_last).
    gns, diversity = GradientNoiseScale(source=source, schedule=1), GradientDiversity(schedule=1)
    fit(PlainMLP(), mlp_loader(n=17, batch_size=8), [gns, diversity], max_steps=-1, max_epochs=1)
    assert gns.measured == 2 and gns.skipped["too_few"] == 1
    assert diversity.measured == 2 and diversity.skipped["too_few"] == 1


def test_both_lightning_packages():
    # The same callbacks in a lightning.Trainer (``import lightning as L``) on a lightning.LightningModule.
    L = pytest.importorskip("lightning")

    class LitMLP(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.5)

    gns, diversity = GradientNoiseScale(schedule=1), GradientDiversity(schedule=1)
    trainer = L.Trainer(**fast_trainer_kwargs(max_steps=2, callbacks=[gns, diversity]))
    trainer.fit(LitMLP(), train_dataloaders=mlp_loader(n=32))
    assert gns.measured == 2 and diversity.measured == 2
    assert math.isfinite(gns.b_simple) and math.isfinite(diversity.diversity)


class SDPAClassifier(pl.LightningModule):
    """Attention through ``F.scaled_dot_product_attention``: on CPU it may pick a flash kernel whose backward is not
    differentiable, so B_noise's Hessian-vector products must run it on the math kernel."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.qkv = nn.Linear(4, 12)
        self.head = nn.Linear(4, 3)

    def training_step(self, batch, batch_idx):
        return sdpa_loss(self, batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def sdpa_loss(module: nn.Module, batch) -> Tensor:
    x, y = batch  # (B, T, 4), (B,)
    b, t, d = x.shape
    q, k, v = module.qkv(x).view(b, t, 3, 2, d // 2).permute(2, 0, 3, 1, 4)  # each (B, nh=2, T, hs=2)
    h = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # 4-D inputs: the CPU flash kernel
    return F.cross_entropy(module.head(h.transpose(1, 2).reshape(b, t, d).mean(1)), y)


def test_b_noise_through_fused_attention_runs_on_the_math_kernel_and_matches_a_dense_hessian():
    from lightning_sgd.module_loss import twice_differentiable_attention

    g = torch.Generator().manual_seed(3)
    loader = DataLoader(TensorDataset(torch.randn(32, 5, 4, generator=g), torch.randint(0, 3, (32,), generator=g)),
                        batch_size=32)
    gns = GradientNoiseScale(source="split", schedule=1, b_noise_schedule=1, b_noise_groups=4, beta=0.0)
    recorder = Recorder(gns)
    module = SDPAClassifier()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a disabled B_noise warns: fail on it
        warnings.filterwarnings("ignore", message=".*(does not have many workers|GPU available|LeafSpec).*")
        fit(module, loader, [gns, recorder], max_steps=2)
    assert gns.b_noise_ema.count == 2
    for entry in recorder.steps:
        with twice_differentiable_attention():
            truth = brute_b_noise(Float64(module, entry["params"], sdpa_loss), entry["batch"])
        ghg, trace_h = entry["b_noise"]
        assert ghg == pytest.approx(truth.grad_sq_norm, rel=1e-4, abs=1e-8)
        assert trace_h == pytest.approx(truth.trace_cov, rel=1e-4, abs=1e-8)
