"""LARS / LAMB with biases and norm parameters excluded from the trust ratio.

Ground truth: LARS's first step in closed form (momentum buffer = gradient); LAMB against pytorch_optimizer.Lamb
run on each tensor alone with the options its group should have (trust ratios are per tensor, so the split must not
change anything else). Both compare at rtol 1e-6 (float32, same operations).
"""

from __future__ import annotations

import pytest
import pytorch_optimizer
import torch
from torch import nn

from lightning_sgd.plugins.optimizers import LAMB, LARS, split_trust_ratio_groups
from tests.test_ghost_batchnorm import cli_fit


def _model_and_grads():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Linear(5, 2))
    x, y = torch.randn(16, 6), torch.randint(0, 2, (16,))
    nn.functional.cross_entropy(model(x), y).backward()
    return model


def test_split_groups():
    model = _model_and_grads()
    groups = split_trust_ratio_groups(model.parameters(), {"adam": True})
    assert [len(g["params"]) for g in groups] == [2, 4]
    assert all(p.ndim == 2 for p in groups[0]["params"]) and groups[1]["adam"] is True
    groups = split_trust_ratio_groups([{"params": list(model[0].parameters()), "lr": 0.5}], {"weight_decay": 0.0})
    assert groups[0]["lr"] == groups[1]["lr"] == 0.5 and groups[1]["weight_decay"] == 0.0


def test_lars_first_step_closed_form():
    model = _model_and_grads()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    lr, wd, tc = 0.1, 0.01, 0.02
    LARS(model.parameters(), lr=lr, weight_decay=wd, momentum=0.9, trust_coefficient=tc).step()
    for name, p in model.named_parameters():
        w, g = before[name], grads[name]
        if w.ndim > 1:
            trust = tc * w.norm() / (g.norm() + wd * w.norm())
            expected = w - lr * trust * (g + wd * w)
        else:  # bias / LayerNorm: plain SGD step, no decay, no trust ratio
            expected = w - lr * g
        torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=1e-7)


def test_lamb_excludes_bias_and_norm_from_trust_ratio():
    model = _model_and_grads()
    reference = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
    for name, p in model.named_parameters():
        reference[name].grad = p.grad.clone()
    optimizer = LAMB(model.parameters(), lr=0.05, weight_decay=0.1)
    for _ in range(2):
        optimizer.step()
    for name, p in model.named_parameters():
        single = reference[name]
        options = {"adam": False, "weight_decay": 0.1} if p.ndim > 1 else {"adam": True, "weight_decay": 0.0}
        ref_opt = pytorch_optimizer.Lamb([single], lr=0.05, **options)
        for _ in range(2):
            ref_opt.step()
        torch.testing.assert_close(p.detach(), single.detach(), rtol=1e-6, atol=1e-7)
    # The trust ratio really differs from 1 on the matrices (so the exclusion is observable).
    assert any(abs(float(optimizer.state[p]["trust_ratio"]) - 1) > 1e-3 for p in model.parameters() if p.ndim > 1)


@pytest.mark.parametrize("name", ["LARS", "LAMB"])
def test_selectable_from_yaml(name):
    cli = cli_fit({"model": {"init_args": {"optimizer": {
        "class_path": f"lightning_sgd.plugins.optimizers.{name}", "init_args": {"lr": 0.01, "weight_decay": 0.01}}}}})
    optimizer = cli.trainer.optimizers[0]
    assert type(optimizer).__name__ == name and len(optimizer.param_groups) == 2
    assert cli.trainer.global_step == 4
