"""CurvatureSpectrum on LightningModules written as their authors write them: ``training_step`` and
``configure_optimizers`` only, tuple and dict batches, attention through ``F.scaled_dot_product_attention``.

Ground truth: dense Hessians of the same loss written out by hand (``torch.autograd.functional.hessian`` on the
flattened parameters, float64), and the empirical Fisher ``mean_i g_i g_iᵀ`` from one backward per example. Models
run in float64 so the tolerances reflect the algorithms (Lanczos with full reorthogonalization, exact Hutch++ with
``3P`` matvecs), not float32 rounding: they are those of the protocol tests in tests/test_curvature.py.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import lightning.pytorch as L
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.functional import hessian
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_sgd import curvature as C
from lightning_sgd.callbacks import CurvatureSpectrum
from lightning_sgd.module_loss import ModuleLoss, ProtocolRequired
from tests.helpers import classification_data, fast_trainer_kwargs


# ------------------------------------------------------------------------------------------------ modules
class PlainModule(pl.LightningModule):
    """Tuple batches, a Tensor loss, ``self.log`` in the step: the Lightning README's shape."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.hidden = nn.Linear(5, 4)
        self.out = nn.Linear(4, 3)
        self.steps = 0

    def training_step(self, batch, batch_idx):
        self.steps += 1
        x, y = batch
        loss = F.cross_entropy(self.out(torch.tanh(self.hidden(x))), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def plain_reference(p: dict[str, Tensor], batch) -> Tensor:
    x, y = batch
    h = torch.tanh(x @ p["hidden.weight"].T + p["hidden.bias"])
    return F.cross_entropy(h @ p["out.weight"].T + p["out.bias"], y)


VOCAB, T = 7, 4


class DictModule(L.LightningModule):
    """HuggingFace-style: a dict batch with ``input_ids``, ``attention_mask``, broadcast ``(1, T)`` position ids
    and ``labels``; returns ``{"loss": ..., "logits": ...}``; built on the ``lightning`` package."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.tok = nn.Embedding(VOCAB, 3)
        self.pos = nn.Embedding(T, 3)
        self.head = nn.Linear(3, 2)

    def training_step(self, batch, batch_idx):
        h = torch.tanh(self.tok(batch["input_ids"]) + self.pos(batch["position_ids"]))  # (B, T, 3)
        mask = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
        logits = self.head((h * mask).sum(1) / mask.sum(1))
        loss = F.cross_entropy(logits, batch["labels"])
        self.log("train_loss", loss)
        return {"loss": loss, "logits": logits}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def dict_reference(p: dict[str, Tensor], batch) -> Tensor:
    h = torch.tanh(p["tok.weight"][batch["input_ids"]] + p["pos.weight"][batch["position_ids"]])
    mask = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
    logits = ((h * mask).sum(1) / mask.sum(1)) @ p["head.weight"].T + p["head.bias"]
    return F.cross_entropy(logits, batch["labels"])


class DictDataset(Dataset):
    def __init__(self, n: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (n, T), generator=g)
        self.mask = torch.ones(n, T, dtype=torch.long)
        self.mask[: n // 2, -1] = 0  # padded examples
        self.labels = torch.randint(0, 2, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


def dict_collate(items):
    batch = torch.utils.data.default_collate(items)
    batch["position_ids"] = torch.arange(T)[None]  # (1, T): broadcast over the batch, not one row per example
    return batch


def dict_batch(n: int, seed: int = 0):
    return dict_collate([DictDataset(n, seed)[i] for i in range(n)])


# ------------------------------------------------------------------------------------------------ references
def _unflatten(module: nn.Module):
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    flat = torch.cat([p.detach().flatten() for _, p in named])

    def unflatten(vec: Tensor) -> dict[str, Tensor]:
        out, i = {}, 0
        for name, p in named:
            out[name] = vec[i:i + p.numel()].view_as(p)
            i += p.numel()
        return out

    return flat, unflatten


def dense_hessian(module: nn.Module, reference, batches) -> Tensor:
    flat, unflatten = _unflatten(module)
    return hessian(lambda v: sum(reference(unflatten(v), b) for b in batches) / len(batches), flat)


def _check_against_dense(result: C.CurvatureResult, h: Tensor, k: int) -> None:
    true = torch.linalg.eigvalsh(h).flip(0)  # descending
    for theta, res in zip(result.eigenvalues, result.residuals):  # a theorem for symmetric H
        assert (true - theta).abs().min() <= res + 1e-10
    torch.testing.assert_close(torch.tensor(result.eigenvalues, dtype=torch.float64), true[:k], rtol=1e-8, atol=1e-10)
    if result.trace is not None:  # Hutch++ with 3P matvecs sketches the whole space: exact up to rounding
        assert result.trace == pytest.approx(float(h.trace()), rel=1e-8)


# -------------------------------------------------------------------------------------------- Hessian, Fisher
@pytest.mark.parametrize("kind", ["plain", "dict"])
def test_hessian_of_training_step_matches_dense_hessian(kind):
    if kind == "plain":
        module, reference = PlainModule().double(), plain_reference
        x, y = classification_data(32, features=5, classes=3)
        batches = [(x[:16].double(), y[:16]), (x[16:].double(), y[16:])]
    else:
        module, reference = DictModule().double(), dict_reference
        batches = [dict_batch(16, seed=0), dict_batch(16, seed=1)]
    size = C.num_parameters(module)
    op = C.make_operator(module, batches, "hessian")
    result = C.measure(op, C.MeasureConfig(k=4, lanczos_iterations=25, trace_matvecs=3 * size))
    _check_against_dense(result, dense_hessian(module, reference, batches), k=4)
    # the measurement ran training_step: nothing logged (no trainer to log to), .grad untouched
    assert all(p.grad is None for p in module.parameters())


def test_empirical_fisher_of_training_step_matches_per_example_gradients():
    """Per-example gradients of a dict-batch training_step by vmap: the (1, T) position ids stay whole."""
    module = DictModule().double()
    batches = [dict_batch(8, seed=0), dict_batch(8, seed=1)]
    flat, unflatten = _unflatten(module)

    def example_gradient(batch, i):
        one = {k: (v if k == "position_ids" else v[i:i + 1]) for k, v in batch.items()}
        return torch.func.grad(lambda v: dict_reference(unflatten(v), one))(flat)

    grads = torch.stack([example_gradient(b, i) for b in batches for i in range(8)])  # (16, P)
    fisher = grads.T @ grads / 16
    op = C.make_operator(module, batches, "empirical_fisher")
    v = torch.randn(len(flat), dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(op.matvec(v), fisher @ v, rtol=1e-10, atol=1e-12)  # float64 rounding
    directions = torch.randn(2, len(flat), dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    var, n = C.projection_variance(module, batches, directions)
    assert n == 16
    torch.testing.assert_close(var, (grads @ directions.T).var(0), rtol=1e-10, atol=1e-14)


def test_callback_on_a_dict_batch_module_under_the_lightning_package_trainer():
    """``L.Trainer``, a dict batch, ``{"loss": ...}``: the step-0 measurement is the dense Hessian's spectrum."""
    module = DictModule()
    callback = CurvatureSpectrum(schedule=10_000, k=3, lanczos_iterations=25, trace_matvecs=3 * 41,
                                 probe_batch_size=16, at_fit_end=False)
    trainer = L.Trainer(precision="64-true", **fast_trainer_kwargs(max_steps=1, callbacks=[callback]))
    initial = {k: v.detach().clone().double() for k, v in module.named_parameters()}
    trainer.fit(module, DataLoader(DictDataset(64), batch_size=16, collate_fn=dict_collate))
    assert [h["step"] for h in callback.history] == [0]
    for name, p in module.named_parameters():  # back to the weights the step-0 measurement saw
        p.data = initial[name]
    h = dense_hessian(module, dict_reference, callback.probe)
    result = C.CurvatureResult(operator="hessian", eigenvalues=[callback.history[0][f"eig_{i}"] for i in range(3)],
                               residuals=[callback.history[0][f"residual_{i}"] for i in range(3)],
                               trace=callback.history[0]["trace"])
    _check_against_dense(result, h, k=3)


# ------------------------------------------------------------------------------------------------------ GGN
def test_ggn_on_a_training_step_only_module_is_refused_at_setup():
    module = PlainModule()
    x, y = classification_data(64, features=5, classes=3)
    trainer = pl.Trainer(**fast_trainer_kwargs(max_steps=2, callbacks=[CurvatureSpectrum(operator="ggn")]))
    with pytest.raises(ProtocolRequired) as info:
        trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=16))
    message = str(info.value)
    assert "CurvatureSpectrum(operator='ggn') needs the network's outputs separately from the loss" in message
    for fix in ("split_batch(batch) -> (inputs, targets)", "outputs(inputs) -> outputs", "loss(outputs, targets)",
                "operator='hessian'"):
        assert fix in message, fix
    assert module.steps == 0  # refused before any training step


class _ProtocolModule(pl.LightningModule):
    """The protocol, with ``forward`` returning log-probabilities (``nll_loss``) or logits (``cross_entropy``)."""

    def __init__(self, log_probs: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
        self.log_probs = log_probs

    def split_batch(self, batch):
        return batch

    def forward(self, x):
        logits = self.net(x)
        return F.log_softmax(logits, -1) if self.log_probs else logits

    def loss(self, outputs, targets):
        return F.nll_loss(outputs, targets) if self.log_probs else F.cross_entropy(outputs, targets)

    def training_step(self, batch, batch_idx):
        return self.loss(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_ggn_of_a_loss_linear_in_the_outputs_is_refused_not_silently_zero():
    x, y = classification_data(64, features=5, classes=3)
    trainer = pl.Trainer(**fast_trainer_kwargs(max_steps=2, callbacks=[CurvatureSpectrum(operator="ggn", k=2)]))
    with pytest.raises(C.LinearLossError) as info:
        trainer.fit(_ProtocolModule(log_probs=True), DataLoader(TensorDataset(x, y), batch_size=16))
    message = str(info.value)
    for part in ("linear in the network's outputs", "nll_loss", "GGN", "is 0", "Return logits from `forward`",
                 "cross_entropy", "operator='hessian'"):
        assert part in message, part
    # the same training loss with logits + cross_entropy: a GGN with the Hessian's top eigenvalue scale, accepted
    batches = [(x[:16], y[:16])]
    module = _ProtocolModule(log_probs=False)
    ggn = C.make_operator(module, batches, "ggn")
    top = C.measure(ggn, C.MeasureConfig(k=1, lanczos_iterations=10, trace_matvecs=0)).eigenvalues[0]
    assert top > 0


# ---------------------------------------------------------------------------------------------- attention
class AttentionModule(pl.LightningModule):
    """``F.scaled_dot_product_attention`` and ``nn.MultiheadAttention(need_weights=False)`` (which calls it)."""

    def __init__(self, dim: int = 4, heads: int = 2) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.mha = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.head = nn.Linear(dim, 3)

    def training_step(self, batch, batch_idx):
        x, y = batch  # (B, T, D)
        B, T_, D = x.shape
        q, k, v = self.qkv(x).view(B, T_, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # (B, nh, T, hs)
        h = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T_, D)
        h, _ = self.mha(h, h, h, need_weights=False)
        return F.cross_entropy(self.head(h.mean(1)), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:  # (B, nh, T, hs), written out
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1) @ v


def attention_reference(p: dict[str, Tensor], batch, heads: int = 2) -> Tensor:
    x, y = batch
    B, T_, D = x.shape

    def split(t: Tensor) -> Tensor:  # (B, T, D) -> (B, nh, T, hs)
        return t.view(B, T_, heads, D // heads).transpose(1, 2)

    def merge(t: Tensor) -> Tensor:
        return t.transpose(1, 2).reshape(B, T_, D)

    q, k, v = (x @ p["qkv.weight"].T + p["qkv.bias"]).chunk(3, dim=-1)
    h = merge(_attention(split(q), split(k), split(v)))
    q, k, v = (h @ p["mha.in_proj_weight"].T + p["mha.in_proj_bias"]).chunk(3, dim=-1)
    h = merge(_attention(split(q), split(k), split(v))) @ p["mha.out_proj.weight"].T + p["mha.out_proj.bias"]
    return F.cross_entropy(h.mean(1) @ p["head.weight"].T + p["head.bias"], y)


def test_hessian_through_scaled_dot_product_attention_matches_dense_hessian():
    module = AttentionModule().double()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(12, 3, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (12,), generator=g))]
    flat, unflatten = _unflatten(module)
    # the hand-written reference is the module's loss...
    loss = ModuleLoss(module, "test")
    with loss.isolated():
        assert float(loss.loss(batches[0])) == pytest.approx(float(attention_reference(unflatten(flat), batches[0])),
                                                            rel=1e-12)
        # ...and on this machine SDPA picks a fused kernel whose backward cannot be differentiated again: the
        # operator must switch to the math kernel for the Hessian to exist at all
        if flat.device.type == "cpu":
            params = list(module.parameters())
            grads = torch.autograd.grad(loss.loss(batches[0]), params, create_graph=True)
            with pytest.raises(RuntimeError, match="not implemented"):
                torch.autograd.grad(grads, params, grad_outputs=[torch.ones_like(p) for p in params])
    # 60 + 80 + 15 = 155 parameters; 40 Krylov steps converge the top 2 Ritz values to float64 rounding
    op = C.make_operator(module, batches, "hessian")
    result = C.measure(op, C.MeasureConfig(k=2, lanczos_iterations=40, trace_matvecs=0))
    assert all(result.converged)
    _check_against_dense(result, dense_hessian(module, attention_reference, batches), k=2)


# ---------------------------------------------------------------------------------------------------- safety
class BNDropoutModule(pl.LightningModule):
    """BatchNorm and dropout in a training_step-only module that logs its loss every step."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(25, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Dropout(0.3), nn.Linear(8, 3))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss, on_step=True, on_epoch=False)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def test_training_and_its_logged_loss_are_bit_identical_with_and_without_the_callback(tmp_path):
    """Measured every step in train mode (dropout masks, batch statistics) with the Hessian, the C ≈ H alignment
    and the empirical Fisher, all re-running training_step: weights and logged train_loss end bit-identical."""
    x, y = classification_data(128)

    def fit(callbacks):
        pl.seed_everything(0)
        module = BNDropoutModule()
        logger = pl.loggers.CSVLogger(tmp_path, name="run", version=len(callbacks))
        trainer = pl.Trainer(**fast_trainer_kwargs(max_steps=3, callbacks=callbacks, logger=logger,
                                                   log_every_n_steps=1))
        trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True,
                                       generator=torch.Generator().manual_seed(0)))
        rows = list(csv.DictReader((Path(logger.log_dir) / "metrics.csv").open()))
        return module, rows

    callbacks = [
        CurvatureSpectrum(schedule=1, k=2, lanczos_iterations=4, trace_matvecs=6, alignment=True, mode="train",
                          probe_batch_size=16),
        CurvatureSpectrum(schedule=1, operator="empirical_fisher", k=2, lanczos_iterations=4, trace_matvecs=0,
                          mode="train", probe_batch_size=16),
    ]
    plain, plain_rows = fit([])
    measured, measured_rows = fit(callbacks)
    for (name, p), q in zip(plain.named_parameters(), measured.parameters()):
        assert torch.equal(p, q), name
    for (name, b), c in zip(plain.named_buffers(), measured.buffers()):
        assert torch.equal(b, c), name

    def losses(rows):
        return [(r["step"], r["train_loss"]) for r in rows if r.get("train_loss")]

    assert len(losses(plain_rows)) == 3 and losses(measured_rows) == losses(plain_rows)  # the same strings
    assert [h["step"] for h in callbacks[0].history] == [0, 1, 2, 3]
    keys = {k for row in measured_rows for k, v in row.items() if v != ""}
    for name in ("curvature/hessian/eig_0", "curvature/hessian/alignment_corr", "curvature/empirical_fisher/eig_0"):
        assert name in keys, name
    assert callbacks[1].history[0]["eig_0"] > 0  # a PSD operator with a non-zero top eigenvalue


def test_wandb_plots_accept_the_wandb_logger_of_either_package():
    from lightning_sgd.callbacks.curvature_spectrum import WANDB_LOGGERS

    assert pl.loggers.WandbLogger in WANDB_LOGGERS and L.loggers.WandbLogger in WANDB_LOGGERS


class _ItemLoggingModule(PlainModule):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.log("loss_value", loss.item())  # a Python float: fine for training, impossible under vmap
        return loss


def test_per_example_quantities_of_a_training_step_vmap_cannot_run_fall_back_to_a_loop():
    """``.item()`` in training_step: vmap refuses it, so per-example gradients take one backward per example, with a
    warning; the empirical Fisher and the alignment variance still match the brute-force definition."""
    module = _ItemLoggingModule().double()
    x, y = classification_data(16, features=5, classes=3)
    batches = [(x[:8].double(), y[:8]), (x[8:].double(), y[8:])]
    flat, unflatten = _unflatten(module)
    grads = torch.stack([torch.func.grad(lambda v, i=i: plain_reference(unflatten(v), (x[i:i + 1].double(),
                                                                                         y[i:i + 1])))(flat)
                         for i in range(16)])  # (16, P)
    v = torch.randn(len(flat), dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match="vmap cannot run the loss.*one backward per example"):
        op = C.make_operator(module, batches, "empirical_fisher")
        fv = op.matvec(v)
    torch.testing.assert_close(fv, grads.T @ (grads @ v) / 16, rtol=1e-10, atol=1e-12)  # float64 rounding
    var, n = C.projection_variance(module, batches, v[None], loss=op.loss)
    torch.testing.assert_close(var, (grads @ v).var()[None], rtol=1e-10, atol=1e-14)

    # through the callback: measured at every step
    callback = CurvatureSpectrum(schedule=1, operator="empirical_fisher", k=1, lanczos_iterations=3,
                                 trace_matvecs=0, alignment=True, at_fit_end=False)
    trainer = pl.Trainer(**fast_trainer_kwargs(max_steps=2, callbacks=[callback]))
    with pytest.warns(UserWarning, match="one backward per example"):
        trainer.fit(_ItemLoggingModule(), DataLoader(TensorDataset(x.float(), y), batch_size=8))
    assert [h["step"] for h in callback.history] == [0, 1, 2] and callback.history[-1]["eig_0"] > 0
