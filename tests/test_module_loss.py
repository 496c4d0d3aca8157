"""The one place that runs a user's module for a measurement (lightning_sgd.module_loss) and the batch helpers
(lightning_sgd.batches): what they promise, checked on modules written the way users write them."""

from __future__ import annotations

import random
from collections import UserDict, namedtuple
from dataclasses import dataclass

import lightning as L
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from lightning_sgd.batches import batch_size, flatten_batch, slice_batch
from lightning_sgd.module_loss import LossNotMeanError, ModuleLoss, ProtocolRequired, has_protocol, measuring

Pair = namedtuple("Pair", ["x", "y"])


class BatchEncoding(UserDict):
    """Like transformers' BatchEncoding: a UserDict with attribute access, not a dict subclass."""

    def __getattr__(self, name):
        try:
            return self.data[name]
        except KeyError as err:
            raise AttributeError(name) from err


@dataclass
class Batch:
    x: torch.Tensor
    y: torch.Tensor
    note: str = "dataclass"


# ------------------------------------------------------------------------------------------------------ batches
@pytest.mark.parametrize("kind", ["tuple", "list", "dict", "userdict", "namedtuple", "dataclass", "nested"])
def test_slice_and_count_keep_the_structure(kind):
    x, y = torch.arange(12.0).reshape(6, 2), torch.arange(6)
    pos = torch.arange(2)[None]  # (1, T): broadcast over the batch, never sliced
    batch = {
        "tuple": (x, y), "list": [x, y], "dict": {"x": x, "y": y, "pos": pos},
        "userdict": BatchEncoding({"x": x, "y": y, "pos": pos}), "namedtuple": Pair(x, y), "dataclass": Batch(x, y),
        "nested": {"inputs": (x, {"pos": pos, "name": "abc"}), "y": [y]},
    }[kind]
    assert batch_size(batch) == 6
    part = slice_batch(batch, slice(2, 5))
    assert type(part) is type(batch)
    leaves = {
        "tuple": lambda b: (b[0], b[1]), "list": lambda b: (b[0], b[1]), "dict": lambda b: (b["x"], b["y"]),
        "userdict": lambda b: (b.x, b.y), "namedtuple": lambda b: (b.x, b.y), "dataclass": lambda b: (b.x, b.y),
        "nested": lambda b: (b["inputs"][0], b["y"][0]),
    }[kind](part)
    assert torch.equal(leaves[0], x[2:5]) and torch.equal(leaves[1], y[2:5])
    if kind in ("dict", "userdict"):
        assert torch.equal(part["pos"], pos)
    if kind == "nested":
        assert torch.equal(part["inputs"][1]["pos"], pos) and part["inputs"][1]["name"] == "abc"
    if kind == "dataclass":
        assert part.note == "dataclass"


def test_flatten_batch_rebuilds_and_names_the_broadcast_leaves():
    batch = {"ids": torch.zeros(4, 3, dtype=torch.long), "pos": torch.arange(3)[None], "t": torch.tensor(2.0)}
    batched, rebuild, n = flatten_batch(batch)
    assert n == 4 and len(batched) == 1 and batched[0] is batch["ids"]
    again = rebuild([torch.ones(1, 3, dtype=torch.long)])
    assert again["ids"].shape == (1, 3) and again["pos"] is batch["pos"] and again["t"] is batch["t"]
    with pytest.raises(ValueError, match="expected 1 batched"):
        rebuild([])


def test_a_batch_without_a_tensor_is_a_clear_error():
    with pytest.raises(TypeError, match="GNS: the batch .* holds no tensor with a batch dimension"):
        batch_size({"text": ["a", "b"], "t": torch.tensor(1.0)}, "GNS")


# ------------------------------------------------------------------------------------------------ module loss
class LitAutoEncoder(L.LightningModule):
    """The Lightning README's autoencoder (smaller), with dropout and BatchNorm to make isolation observable."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(8, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Dropout(0.3), nn.Linear(6, 3))
        self.decoder = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 8))
        self.steps_seen = 0

    def forward(self, x):
        return self.encoder(x)  # an embedding, not what the loss compares

    def training_step(self, batch, batch_idx):
        x, y = batch
        x = x.view(x.size(0), -1)
        z = self.encoder(x)
        x_hat = self.decoder(z)
        loss = F.mse_loss(x_hat, x)
        self.log("train_loss", loss)
        random.random()
        np.random.rand()
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


class AdaptedAutoEncoder(LitAutoEncoder):
    """The README's adaptation for the GGN: forward stays the embedding; `outputs` names the reconstruction."""

    def split_batch(self, batch):
        x, _ = batch
        x = x.view(x.size(0), -1)
        return x, x

    def outputs(self, x):
        return self.decoder(self.encoder(x))

    def loss(self, outputs, targets):
        return F.mse_loss(outputs, targets)


class DictStep(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(4, 3)

    def training_step(self, batch):  # no batch_idx: Lightning allows it
        loss = F.cross_entropy(self.net(batch["x"]), batch["labels"])
        return {"loss": loss, "logits": None}


def test_isolated_mutes_logging_forks_rngs_restores_buffers_modes_and_hook_state():
    torch.manual_seed(0)
    module = LitAutoEncoder()
    module.train()
    module.encoder[1].eval()  # a mixed mode must come back as it was
    module._current_fx_name = "on_train_batch_end"
    batch = (torch.randn(10, 8), torch.zeros(10))
    params = list(module.parameters())
    for p in params:
        p.grad = torch.full_like(p, 7.0)
    before_buffers = [b.clone() for b in module.buffers()]
    modes = [m.training for m in module.modules()]
    torch_state, py_state, np_state = torch.get_rng_state(), random.getstate(), np.random.get_state()
    logged = []
    module.log = lambda *a, **k: logged.append(a)  # a user's own override of log survives too
    module.encoder[1].train()  # BatchNorm in train mode inside: its running stats move during the call
    ml = ModuleLoss(module, "test")
    assert not ml.uses_protocol and not has_protocol(module)
    with ml.isolated():
        assert measuring()
        loss = ml.loss(batch)
        grads = torch.autograd.grad(loss, params)
    assert not measuring()
    assert all(g is not None for g in grads)
    assert logged == []  # muted inside
    module.log("x", 1.0)
    assert logged == [("x", 1.0)]  # the user's override is back
    module.encoder[1].eval()
    assert [m.training for m in module.modules()] == modes
    assert all(torch.equal(a, b) for a, b in zip(before_buffers, module.buffers()))
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert random.getstate() == py_state
    assert all(np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b
               for a, b in zip(np.random.get_state(), np_state))
    assert module._current_fx_name == "on_train_batch_end"
    assert all(torch.equal(p.grad, torch.full_like(p, 7.0)) for p in params)


def test_training_step_forms_and_functional_loss_match_brute_force():
    torch.manual_seed(1)
    module = DictStep().double()
    batch = {"x": torch.randn(6, 4, dtype=torch.float64), "labels": torch.randint(0, 3, (6,))}
    ml = ModuleLoss(module, "test")
    params = {k: v.detach() for k, v in module.named_parameters()}
    with ml.isolated():
        direct = ml.loss(batch)
        functional = ml.functional_loss(params, batch)
        per_example = torch.func.vmap(torch.func.grad(lambda p, x, y: ml.functional_loss(
            p, {"x": x[None], "labels": y[None]})), in_dims=(None, 0, 0))(params, batch["x"], batch["labels"])
    expected = F.cross_entropy(module.net(batch["x"]), batch["labels"])
    assert torch.allclose(direct, expected, rtol=1e-12) and torch.allclose(functional, expected, rtol=1e-12)
    for i in range(6):  # per-example gradient of the training_step loss vs autograd on a batch of one
        loss_i = F.cross_entropy(module.net(batch["x"][i:i + 1]), batch["labels"][i:i + 1])
        g = torch.autograd.grad(loss_i, module.net.weight)[0]
        assert torch.allclose(per_example["net.weight"][i], g, rtol=1e-10, atol=1e-14)


def test_a_training_step_without_a_loss_is_a_clear_error():
    class ReturnsNone(DictStep):
        def training_step(self, batch, batch_idx):
            return None

    ml = ModuleLoss(ReturnsNone(), "GradientDiversity")
    with ml.isolated(), pytest.raises(ValueError, match="GradientDiversity: `training_step` returned None"):
        ml.loss({"x": torch.randn(2, 4), "labels": torch.zeros(2, dtype=torch.long)})


def test_manual_optimization_is_refused_with_the_reason():
    module = DictStep()
    module.automatic_optimization = False
    with pytest.raises(ValueError, match="manual optimization .* steps the optimizers itself"):
        ModuleLoss(module, "GradientNoiseScale").check_usable()


def test_check_mean_accepts_means_names_sums_and_skips_non_finite():
    torch.manual_seed(2)
    batch = {"x": torch.randn(9, 4), "labels": torch.randint(0, 3, (9,))}
    ModuleLoss(DictStep(), "t").check_mean(batch)  # mean: passes

    class Summed(DictStep):
        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self.net(batch["x"]), batch["labels"], reduction="sum")

    with pytest.raises(LossNotMeanError, match="a sum over examples"):
        ModuleLoss(Summed(), "t").check_mean(batch)

    class NaN(DictStep):
        def training_step(self, batch, batch_idx):
            return self.net(batch["x"]).sum() * float("nan")

    ml = ModuleLoss(NaN(), "t")
    ml.check_mean(batch)  # nothing to judge: no verdict, no error
    assert not ml._mean_checked


def test_protocol_outputs_method_for_a_forward_that_returns_an_embedding():
    """The README adaptation: `outputs` (not forward) gives what the loss compares; the GGN through it equals a
    dense Jᵀ H_ℓ J."""
    torch.manual_seed(3)
    module = AdaptedAutoEncoder().double().eval()
    assert has_protocol(module) and not has_protocol(LitAutoEncoder())
    ml = ModuleLoss(module, "CurvatureSpectrum", use_protocol=True)
    x = torch.randn(5, 8, dtype=torch.float64)
    outputs, targets = ml.outputs((x, None))
    assert torch.allclose(outputs, module.decoder(module.encoder(x))) and torch.equal(targets, x)
    with pytest.raises(ProtocolRequired, match="`outputs\\(inputs\\) -> outputs`"):
        ModuleLoss(LitAutoEncoder(), "CurvatureSpectrum(operator='ggn')", use_protocol=True)

    from lightning_sgd.curvature import make_operator

    names = [n for n, p in module.named_parameters() if p.requires_grad]
    params = {n: p.detach() for n, p in module.named_parameters() if p.requires_grad}
    flat = torch.cat([p.reshape(-1) for p in params.values()])

    def unflatten(v):
        out, start = {}, 0
        for n in names:
            out[n] = v[start:start + params[n].numel()].view_as(params[n])
            start += params[n].numel()
        return out

    jac = torch.autograd.functional.jacobian(lambda v: ml.functional_outputs(unflatten(v), x).reshape(-1), flat)
    h_out = 2.0 / outputs.numel() * torch.eye(outputs.numel(), dtype=torch.float64)  # mse_loss's Hessian
    dense = jac.T @ h_out @ jac
    operator = make_operator(module, [(x, None)], "ggn")
    probe = torch.randn(flat.numel(), dtype=torch.float64)
    assert torch.allclose(operator.matvec(probe), dense @ probe, rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------------------- targets that are not tensors
CLASSES = ["cat", "dog", "emu"]


class NamedLabels(pl.LightningModule):
    """Targets as label names: the default collate_fn makes a list of strings of them."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Linear(4, 3)

    def training_step(self, batch, batch_idx):
        x, names = batch
        y = torch.tensor([CLASSES.index(name) for name in names])
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class NamedDataset(torch.utils.data.Dataset):
    def __init__(self, n=24):
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(n, 4, generator=g)
        self.y = torch.randint(0, 3, (n,), generator=g).tolist()

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], CLASSES[self.y[i]]


def test_per_example_strings_are_sliced_with_their_examples_and_measured_exactly():
    from lightning_sgd.per_example import per_example_gradient_stats

    batch = next(iter(torch.utils.data.DataLoader(NamedDataset(), batch_size=6)))
    assert isinstance(batch[1], (list, tuple)) and len(batch[1]) == 6  # default_collate: a sequence of strings
    part = slice_batch(batch, slice(2, 4))
    assert part[1] == batch[1][2:4] and torch.equal(part[0], batch[0][2:4])
    module = NamedLabels().double()
    batch = (batch[0].double(), batch[1])
    with pytest.warns(UserWarning, match="loop over examples"):  # vmap cannot map over strings
        stats = per_example_gradient_stats(module, batch)
    brute = []
    for i in range(6):
        y = torch.tensor([CLASSES.index(batch[1][i])])
        grads = torch.autograd.grad(F.cross_entropy(module.net(batch[0][i:i + 1]), y), list(module.parameters()))
        brute.append(sum(float(g.square().sum()) for g in grads))
    assert torch.allclose(stats.sq_norms, torch.tensor(brute, dtype=torch.float64), rtol=1e-10)


@pytest.mark.parametrize("source", ["per_example", "split"])
def test_gns_runs_on_string_targets(source):
    from lightning_sgd.callbacks import GradientNoiseScale

    gns = GradientNoiseScale(source=source, schedule=1, engine="vmap" if source == "per_example" else "auto")
    trainer = pl.Trainer(max_steps=3, callbacks=[gns], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(NamedLabels(), torch.utils.data.DataLoader(NamedDataset(), batch_size=8))
    assert gns.measured == 3 and gns.source_in_use == source
    assert all(np.isfinite(gns.last_metrics[k]) for k in ("gns/grad_sq_norm", "gns/trace_cov"))
