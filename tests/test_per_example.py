"""The shared per-example gradient engine against a brute-force per-example autograd loop."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_sgd.per_example import per_example_gradient_stats
from lightning_sgd.recipes.classification import ClassificationModule
from tests.helpers import classification_data, tiny_module


def brute_force(module, x, y):
    """Per-example gradients by one autograd.grad call per example: (n, P) flattened over trainable parameters."""
    params = [p for p in module.parameters() if p.requires_grad]
    rows = []
    for i in range(len(y)):
        loss = module.loss(module(x[i : i + 1]), y[i : i + 1])
        rows.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)]))
    return torch.stack(rows)


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_engine_matches_brute_force_on_tiny_mlp(chunk_size):
    # float32 throughout; per-example norms of ~1e-1 agree to ~1e-7 relative, so 1e-5 is rounding with headroom.
    module = tiny_module()
    x, y = classification_data(n=7)
    truth = brute_force(module, x, y)  # (7, P)
    directions = torch.randn(2, truth.shape[1], generator=torch.Generator().manual_seed(1))
    stats = per_example_gradient_stats(module, (x, y), chunk_size=chunk_size, per_layer=True, directions=directions)
    assert stats.n == 7
    torch.testing.assert_close(stats.sq_norms, truth.pow(2).sum(1).double(), rtol=1e-5, atol=1e-9)
    mean = torch.cat([g.flatten() for g in stats.mean_grad])
    torch.testing.assert_close(mean, truth.mean(0), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(stats.projections, (truth @ directions.T).double(), rtol=1e-4, atol=1e-6)
    # Per layer: network.0, network.2, network.4 (weight + bias each); their sum is the total.
    assert list(stats.layer_sq_norms) == ["network.0", "network.2", "network.4"]
    torch.testing.assert_close(sum(stats.layer_sq_norms.values()), stats.sq_norms, rtol=1e-12, atol=0)
    first = truth[:, : 25 * 4 + 4]
    torch.testing.assert_close(stats.layer_sq_norms["network.0"], first.pow(2).sum(1).double(), rtol=1e-5, atol=1e-9)
    # The mean gradient is the gradient of the mean loss (what training uses).
    module.zero_grad()
    module.loss(module(x), y).backward()
    torch.testing.assert_close(mean, torch.cat([p.grad.flatten() for p in module.parameters()]), rtol=1e-5, atol=1e-7)


def test_engine_skips_frozen_parameters_and_keeps_rng():
    module = tiny_module()
    module.network[0].weight.requires_grad_(False)
    x, y = classification_data(n=4)
    torch.manual_seed(3)
    expected_next = torch.rand(1)
    torch.manual_seed(3)
    stats = per_example_gradient_stats(module, (x, y))
    assert torch.equal(torch.rand(1), expected_next)  # measuring does not move the training RNG
    assert [g.shape for g in stats.mean_grad] == [p.shape for p in module.parameters() if p.requires_grad]
    truth = brute_force(module, x, y)
    torch.testing.assert_close(stats.sq_norms, truth.pow(2).sum(1).double(), rtol=1e-5, atol=1e-9)


def _bn_module(track_running_stats=True):
    net = nn.Sequential(nn.Linear(25, 6), nn.BatchNorm1d(6, track_running_stats=track_running_stats), nn.ReLU(),
                        nn.Linear(6, 3))
    return ClassificationModule(net, num_classes=3)


def test_batchnorm_runs_in_eval_mode_and_is_restored():
    module = _bn_module()
    module.train()
    bn = module.network[1]
    bn.running_mean.uniform_(-0.5, 0.5)
    bn.running_var.uniform_(0.5, 2.0)
    x, y = classification_data(n=5)
    before = bn.running_mean.clone()
    stats = per_example_gradient_stats(module, (x, y))
    assert bn.training and torch.equal(bn.running_mean, before)  # mode restored, statistics untouched
    module.eval()
    truth = brute_force(module, x, y)  # eval mode: each example's loss uses the running statistics
    torch.testing.assert_close(stats.sq_norms, truth.pow(2).sum(1).double(), rtol=1e-5, atol=1e-9)


def test_batchnorm_without_running_stats_is_a_clear_error():
    module = _bn_module(track_running_stats=False)
    x, y = classification_data(n=5)
    with pytest.raises(ValueError, match="track_running_stats=False"):
        per_example_gradient_stats(module, (x, y))


def test_bad_arguments():
    module = tiny_module()
    x, y = classification_data(n=4)
    with pytest.raises(ValueError, match="chunk_size"):
        per_example_gradient_stats(module, (x, y), chunk_size=0)
    with pytest.raises(ValueError, match="directions"):
        per_example_gradient_stats(module, (x, y), directions=torch.zeros(2, 5))
    with pytest.raises(TypeError, match="split_batch"):
        per_example_gradient_stats(nn.Linear(2, 2), (x, y))


class _ScaledMLP(nn.Module):
    """An MLP with a 0-dimensional parameter (a SkipInit-style scalar gain)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(25, 4), nn.Tanh(), nn.Linear(4, 3))
        self.gain = nn.Parameter(torch.tensor(0.7))

    def forward(self, x):
        return self.gain * self.body(x)


def test_engine_handles_zero_dimensional_parameters():
    # Same rounding argument as the MLP test above: float32, 1e-5 relative.
    torch.manual_seed(0)
    module = ClassificationModule(_ScaledMLP(), num_classes=3)
    x, y = classification_data(n=5)
    truth = brute_force(module, x, y)
    stats = per_example_gradient_stats(module, (x, y), chunk_size=2)
    torch.testing.assert_close(stats.sq_norms, truth.pow(2).sum(1).double(), rtol=1e-5, atol=1e-9)
    assert stats.mean_grad[0].shape == ()  # a module's own parameters come before its children's
    torch.testing.assert_close(stats.mean_grad[0].reshape(1), truth[:, :1].mean(0), rtol=1e-5, atol=1e-7)
