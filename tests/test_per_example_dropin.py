"""Both per-example engines on modules nobody wrote for them: only ``training_step``, batches of any structure,
``self.log`` and ``.item()`` in the step, position ids broadcast over the batch. Ground truth is brute force: one
``torch.autograd.grad`` per one-example batch, in float64.

Tolerance 1e-10 relative throughout: float64 rounding differs between ``vmap`` and the loop by ~1e-15, so any wrong
term (an example mixed into another, a broadcast tensor sliced, a missing layer) is off by orders of magnitude more.
"""

from __future__ import annotations

import warnings
from collections import UserDict

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.nn import functional as F

from lightning_sgd.batches import batch_size, slice_batch
from lightning_sgd.per_example import per_example_gradient_stats
from lightning_sgd.per_example_hooks import PerExampleNormHooks, hook_gradient_stats, validate

V, T, B = 11, 6, 5  # vocabulary, sequence length, examples


class _Encoding(UserDict):
    """Like transformers' ``BatchEncoding``: a ``UserDict``, not a ``dict``."""


def _step_loss(out):
    return out["loss"] if isinstance(out, dict) else out


class _Classifier(pl.LightningModule):
    """Tokens -> embedding (+ position embedding) -> mean -> Linear, loss in ``training_step`` only.

    ``layout`` is how its batch looks: "tuple" ``(ids, labels)``; "dict" ``{"input_ids", "labels"}`` returning
    ``{"loss": ...}`` from a ``training_step(batch)`` without ``batch_idx``; "userdict" an ``_Encoding`` with an
    attention mask; "nested" ``{"inputs": (ids, {"position_ids": (1, T)}), "labels", "source": str}`` (a
    non-tensor leaf and a broadcast tensor); "logging" a tuple batch whose step calls ``self.log`` and ``.item()``.
    """

    def __init__(self, layout: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layout = layout
        self.tok = nn.Embedding(V, 4)
        self.pos = nn.Embedding(T, 4)
        self.mix = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)
        self.logged: list[str] = []

    def log(self, name, value, *args, **kwargs):  # what the user's step logs, recorded
        self.logged.append(name)

    def _logits(self, ids, mask=None, position_ids=None):
        h = self.tok(ids)
        if position_ids is not None:
            h = h + self.pos(position_ids)  # (1, T, 4) broadcast over the batch
        h = torch.tanh(self.mix(h))
        if mask is not None:
            return self.head((h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True))
        return self.head(h.mean(1))

    def training_step(self, batch, batch_idx=0):
        if self.layout in ("tuple", "logging"):
            ids, y = batch
            loss = F.cross_entropy(self._logits(ids), y)
            if self.layout == "logging":
                self.log("train_loss", loss.item())  # .item(): vmap cannot run this step
            return loss
        if self.layout == "userdict":
            return F.cross_entropy(self._logits(batch["input_ids"], batch["attention_mask"]), batch["labels"])
        ids, extra = batch["inputs"]
        assert batch["source"] == "corpus"
        return {"loss": F.cross_entropy(self._logits(ids, position_ids=extra["position_ids"]), batch["labels"])}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _DictStep(_Classifier):
    def training_step(self, batch):  # no batch_idx, dict batch, {"loss": ...}
        return {"loss": F.cross_entropy(self._logits(batch["input_ids"]), batch["labels"])}


def _batch(layout: str):
    g = torch.Generator().manual_seed(1)
    ids, y = torch.randint(0, V, (B, T), generator=g), torch.randint(0, 3, (B,), generator=g)
    ids[0, :3] = 4  # a repeated token
    if layout in ("tuple", "logging"):
        return ids, y
    if layout == "dict":
        return {"input_ids": ids, "labels": y}
    if layout == "userdict":
        mask = torch.ones(B, T, dtype=torch.float64)
        mask[1, 4:] = 0
        return _Encoding(input_ids=ids, attention_mask=mask, labels=y)
    return {"inputs": (ids, {"position_ids": torch.arange(T)[None]}), "labels": y, "source": "corpus"}


def _module(layout: str) -> _Classifier:
    return (_DictStep if layout == "dict" else _Classifier)(layout).double()


def _brute_force(module, batch):
    """(n, P) per-example gradients: the step's loss of each one-example batch, one autograd.grad each."""
    params = [p for p in module.parameters() if p.requires_grad]
    rows = []
    for i in range(B):
        one = slice_batch(batch, slice(i, i + 1))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loss = _step_loss(module.training_step(one, 0) if module.layout != "dict" else module.training_step(one))
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for p, g in zip(params, grads)]))
    module.logged.clear()
    return torch.stack(rows)


@pytest.mark.parametrize("layout", ["tuple", "dict", "userdict", "nested"])
def test_vmap_engine_on_a_training_step_module_equals_brute_force(layout):
    module, batch = _module(layout), _batch(layout)
    truth = _brute_force(module, batch)
    directions = torch.randn(2, truth.shape[1], generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # vmap runs these steps: no loop fallback, no warning
        stats = per_example_gradient_stats(module, batch, chunk_size=2, per_layer=True, directions=directions)
    torch.testing.assert_close(stats.sq_norms, truth.pow(2).sum(1), rtol=1e-10, atol=0)
    torch.testing.assert_close(torch.cat([g.flatten() for g in stats.mean_grad]), truth.mean(0), rtol=1e-10,
                               atol=1e-15)
    torch.testing.assert_close(stats.projections, truth @ directions.T, rtol=1e-10, atol=1e-15)
    torch.testing.assert_close(sum(stats.layer_sq_norms.values()), stats.sq_norms, rtol=1e-12, atol=0)
    assert set(stats.layer_sq_norms) == {"tok", "pos", "mix", "head"}
    assert all(p.grad is None for p in module.parameters())


def test_a_step_vmap_cannot_run_falls_back_to_an_exact_loop_with_one_warning():
    module, batch = _module("logging"), _batch("logging")
    truth = _brute_force(module, batch)
    with pytest.warns(UserWarning, match=r"vmap cannot run _Classifier's loss \(RuntimeError.*loop over examples"):
        stats = per_example_gradient_stats(module, batch, chunk_size=2, per_layer=True)
    torch.testing.assert_close(stats.sq_norms, truth.pow(2).sum(1), rtol=1e-10, atol=0)
    torch.testing.assert_close(torch.cat([g.flatten() for g in stats.mean_grad]), truth.mean(0), rtol=1e-10,
                               atol=1e-15)
    assert module.logged == []  # the measurement's self.log calls were muted
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per module
        again = per_example_gradient_stats(module, batch)
    torch.testing.assert_close(again.sq_norms, stats.sq_norms, rtol=1e-12, atol=0)


@pytest.mark.parametrize("layout", ["tuple", "userdict"])
def test_hook_engine_and_validate_take_any_batch_through_training_step(layout):
    module, batch = _module(layout), _batch(layout)
    module.pos.weight.requires_grad_(False)  # unused by these layouts
    truth = _brute_force(module, batch)
    stats = hook_gradient_stats(module, batch, per_layer=True)
    torch.testing.assert_close(stats.sq_norms, truth.pow(2).sum(1), rtol=1e-10, atol=0)
    torch.testing.assert_close(torch.cat([g.flatten() for g in stats.mean_grad]), truth.mean(0), rtol=1e-10,
                               atol=1e-15)
    assert validate(module, batch) is None
    assert all(p.grad is None for p in module.parameters())


# ------------------------------------------------------------------------------- inputs broadcast over the batch
class _NanoGPT(nn.Module):
    """nanoGPT's embedding: ``wte(idx) + wpe(arange(T))`` (wpe's input (T,), output (T, C) broadcast), a block, a
    head (untied). ``training_step((idx, targets))`` is the mean token cross-entropy."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.wte, self.wpe = nn.Embedding(V, 4), nn.Embedding(16, 4)
        self.ln, self.mlp, self.lm_head = nn.LayerNorm(4), nn.Linear(4, 4), nn.Linear(4, V)

    def training_step(self, batch, batch_idx=0):
        idx, targets = batch
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)  # (B, T, C) + (T, C)
        x = x + torch.tanh(self.mlp(self.ln(x)))
        return F.cross_entropy(self.lm_head(x).flatten(0, 1), targets.flatten())


class _Bert(nn.Module):
    """HuggingFace BERT's embeddings: position ids of shape (1, T) from a buffer into an Embedding, a dict batch,
    ``{"loss": ...}``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.word, self.position, self.norm = nn.Embedding(V, 4), nn.Embedding(16, 4), nn.LayerNorm(4)
        self.classifier = nn.Linear(4, 3)
        self.register_buffer("position_ids", torch.arange(16)[None], persistent=False)

    def training_step(self, batch, batch_idx=0):
        ids = batch["input_ids"]
        h = self.norm(self.word(ids) + self.position(self.position_ids[:, :ids.shape[1]]))  # (B, T, C) + (1, T, C)
        return {"loss": F.cross_entropy(self.classifier(h[:, 0]), batch["labels"])}


def _token_batch(kind: str, n: int = B, t: int = T):
    g = torch.Generator().manual_seed(3)
    idx = torch.randint(0, V, (n, t + 1), generator=g)
    if kind == "nanogpt":
        return idx[:, :-1], idx[:, 1:]
    return {"input_ids": idx[:, :-1], "labels": idx[:, 0] % 3}


def _brute_sq(model, batch):
    params = [p for p in model.parameters() if p.requires_grad]
    n = batch_size(batch)
    return torch.stack([sum(g.pow(2).sum() for g in torch.autograd.grad(
        _step_loss(model.training_step(slice_batch(batch, slice(i, i + 1)))), params)) for i in range(n)])


@pytest.mark.parametrize("kind", ["nanogpt", "bert"])
@pytest.mark.parametrize("announce", [True, False])
def test_a_broadcast_layer_is_read_per_example_where_it_is_added_and_the_users_backward_runs_unchanged(kind, announce):
    # A layer whose output is shared by all examples (wpe(arange(T)), BERT's (1, T) position ids): autograd sums the
    # examples' gradients before its output's hook, so the hooks read them at the addition into the token
    # embeddings, where each example's is still its own. Exact against brute force; .grad bit-identical.
    model = (_NanoGPT if kind == "nanogpt" else _Bert)().double()
    batch = _token_batch(kind)
    _step_loss(model.training_step(batch)).backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    hooks = PerExampleNormHooks(model)
    hooks.arm(B if announce else None)  # without n: the first layer's leading dim (the token embedding's)
    _step_loss(model.training_step(batch)).backward()
    assert hooks.check_bias_sums(1.0) is None
    sq, _, problem = hooks.collect()
    assert problem is None
    assert set(hooks.broadcast) == {"wpe" if kind == "nanogpt" else "position"}
    torch.testing.assert_close(sq * B**2, _brute_sq(model, batch), rtol=1e-10, atol=0)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), plain))
    model.zero_grad()
    torch.testing.assert_close(hook_gradient_stats(model, batch).sq_norms, _brute_sq(model, batch), rtol=1e-10,
                               atol=0)
    assert validate(model, batch) is None


class _ScaledPositions(_NanoGPT):
    """The broadcast output is multiplied into the examples, not added: its per-example gradients are not read."""

    def training_step(self, batch, batch_idx=0):
        idx, targets = batch
        x = self.wte(idx) * torch.sigmoid(self.wpe(torch.arange(idx.shape[1])))
        x = x + torch.tanh(self.mlp(self.ln(x)))
        return F.cross_entropy(self.lm_head(x).flatten(0, 1), targets.flatten())


class _PositionsTwice(_NanoGPT):
    """The broadcast output is added to the examples and also used on its own (a term the hooks do not see)."""

    def training_step(self, batch, batch_idx=0):
        idx, targets = batch
        pos = self.wpe(torch.arange(idx.shape[1]))
        x = self.wte(idx) + pos
        x = x + torch.tanh(self.mlp(self.ln(x)))
        loss = F.cross_entropy(self.lm_head(x).flatten(0, 1), targets.flatten())
        return loss + 1e-2 * pos.square().sum()


@pytest.mark.parametrize("model_cls", [_ScaledPositions, _PositionsTwice])
def test_a_broadcast_output_used_other_than_added_is_reported_and_the_vmap_engine_is_exact(model_cls):
    model = model_cls().double()
    batch = _token_batch("nanogpt")
    _step_loss(model.training_step(batch)).backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    hooks = PerExampleNormHooks(model)
    hooks.arm(B)
    _step_loss(model.training_step(batch)).backward()
    _, _, problem = hooks.collect()
    assert problem is not None and "broadcast" in problem and "wpe" in problem
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), plain))
    with pytest.raises(ValueError, match="broadcast"):
        hook_gradient_stats(model, batch)
    assert "broadcast" in validate(model, batch)
    stats = per_example_gradient_stats(model, batch)
    torch.testing.assert_close(stats.sq_norms, _brute_sq(model, batch), rtol=1e-10, atol=0)


def test_validate_catches_a_broadcast_whose_length_equals_the_batch_size():
    # With T == B, wpe(arange(T)) looks batched to the hooks (the one case they cannot tell): their norms are wrong,
    # and the one-time check on 4 examples (where T != 4) reports the model, so callers use the vmap engine.
    model = _NanoGPT().double()
    batch = _token_batch("nanogpt", n=T)
    hooks = PerExampleNormHooks(model)
    hooks.arm(T)
    model.training_step(batch).backward()
    sq, _, problem = hooks.collect()
    assert problem is None and not torch.allclose(sq * T**2, _brute_sq(model, batch), rtol=1e-3)
    assert "broadcast" in validate(model, batch)
