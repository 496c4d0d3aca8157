"""Ghost batch norm against its ground truth: nn.BatchNorm fed the ghost chunks one by one.

Tolerances: with ghost size = batch the layer calls the same kernel as nn.BatchNorm, so outputs, gradients and
buffers are compared with ``torch.equal``. For several chunks the vectorized path reduces over the same elements in
another memory layout and folds the running-statistic updates into one weighted sum, so float64 inputs are compared
at rtol 1e-12 (a few ulps of the reductions), float32 at 1e-5.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from lightning_sgd.plugins import ghost_batchnorm
from lightning_sgd.plugins.ghost_batchnorm import GhostBatchNorm, GhostBatchNormCallback, convert_to_ghost_batchnorm


def _pair(bn_cls, features, ghost, dtype=torch.float64, **kwargs):
    torch.manual_seed(0)
    bn = bn_cls(features, dtype=dtype, **kwargs)
    if bn.affine:
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    ghost = GhostBatchNorm.from_batchnorm(copy.deepcopy(bn), ghost)
    return bn, ghost


def _run(layer, x, upstream):
    x = x.clone().requires_grad_(True)
    out = layer(x)
    (out * upstream).sum().backward()
    params = [p.grad for p in layer.parameters()]
    return out.detach(), x.grad, params


def test_ghost_equals_batch_is_exactly_batchnorm():
    bn, ghost = _pair(nn.BatchNorm2d, 6, ghost=16, dtype=torch.float32)
    x = torch.randn(16, 6, 5, 5)
    upstream = torch.randn(16, 6, 5, 5)
    for _ in range(2):  # two steps: buffers after the first feed the second
        ref, mine = _run(bn, x, upstream), _run(ghost, x, upstream)
        assert torch.equal(ref[0], mine[0]) and torch.equal(ref[1], mine[1])
        assert all(torch.equal(a, b) for a, b in zip(ref[2], mine[2]))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(bn, name), getattr(ghost, name)), name


def _ghost_chunks(x, g):
    """The ghost batches by definition: chunks of ``g``, then the remainder; a remainder of ONE example joins the
    last full chunk (``g + 1`` examples)."""
    sizes = [g] * (x.shape[0] // g) + ([x.shape[0] % g] if x.shape[0] % g else [])
    if len(sizes) > 1 and sizes[-1] == 1:
        sizes = sizes[:-2] + [g + 1]
    return torch.split(x, sizes)


@pytest.fixture(params=["per_chunk", "vectorized"])
def chunk_path(request, monkeypatch):
    """Both ways of normalizing the full chunks (one call per chunk: CPU; chunks in the channel axis: accelerators),
    each checked on CPU."""
    monkeypatch.setattr(ghost_batchnorm, "_vectorize", lambda input: request.param == "vectorized")
    return request.param


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("bn_cls,shape", [(nn.BatchNorm1d, (7,)), (nn.BatchNorm1d, (7, 9)),
                                          (nn.BatchNorm2d, (7, 4, 3)), (nn.BatchNorm3d, (7, 2, 3, 2))])
# 4 chunks of 32; 4 chunks + a remainder of 9; 3 chunks + one of 33 (remainder 1); one chunk of 33 (N = G + 1)
@pytest.mark.parametrize("batch", [128, 137, 129, 33])
def test_ghost_equals_bn_on_each_chunk(bn_cls, shape, momentum, batch, chunk_path):
    bn, ghost = _pair(bn_cls, shape[0], ghost=32, momentum=momentum)
    with torch.no_grad():
        bn.num_batches_tracked.fill_(3)  # the cumulative average must continue from an existing count
        ghost.num_batches_tracked.fill_(3)
    torch.manual_seed(1)
    x = torch.randn(batch, *shape, dtype=torch.float64) * 3 + 1
    upstream = torch.randn(batch, *shape, dtype=torch.float64)
    # Ground truth: one nn.BatchNorm call per chunk, in order.
    xs = x.clone().requires_grad_(True)
    chunks = _ghost_chunks(xs, 32)
    outs = [bn(chunk) for chunk in chunks]
    (torch.cat(outs) * upstream).sum().backward()
    out, grad_x, grad_params = _run(ghost, x, upstream)
    torch.testing.assert_close(out, torch.cat(outs).detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_x, xs.grad, rtol=1e-12, atol=1e-12)
    for a, b in zip(grad_params, [p.grad for p in bn.parameters()]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ghost.running_mean, bn.running_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ghost.running_var, bn.running_var, rtol=1e-12, atol=1e-12)
    assert int(ghost.num_batches_tracked) == int(bn.num_batches_tracked) == 3 + len(chunks)
    assert len(chunks) == {128: 4, 137: 5, 129: 4, 33: 1}[batch] and chunks[-1].shape[0] in (32, 9, 33)
    # Eval mode is plain batch norm with the running statistics (equal to a few ulps, like the buffers).
    ghost.eval(), bn.eval()
    torch.testing.assert_close(ghost(x), bn(x), rtol=1e-12, atol=1e-12)


def test_cpu_normalizes_chunk_by_chunk():
    # The per-chunk path is the one CPU runs (faster there: benchmarks/ghost_bn.py); accelerators vectorize.
    assert not ghost_batchnorm._vectorize(torch.zeros(2, 3))
    assert ghost_batchnorm._vectorize(torch.zeros(2, 3, device="meta"))


def test_float32_matches_chunks(chunk_path):
    bn, ghost = _pair(nn.BatchNorm2d, 8, ghost=32, dtype=torch.float32)
    x = torch.randn(128, 8, 4, 4)
    ref = torch.cat([bn(c) for c in x.split(32)])
    torch.testing.assert_close(ghost(x), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ghost.running_var, bn.running_var, rtol=1e-5, atol=1e-6)


def test_no_affine_no_running_stats():
    bn, ghost = _pair(nn.BatchNorm1d, 5, ghost=4, affine=False)
    x = torch.randn(12, 5, dtype=torch.float64)
    torch.testing.assert_close(ghost(x), torch.cat([bn(c) for c in x.split(4)]))
    plain = nn.BatchNorm1d(5, track_running_stats=False, dtype=torch.float64)
    ghost = GhostBatchNorm.from_batchnorm(plain, 4)
    torch.testing.assert_close(ghost(x), torch.cat([plain(c) for c in x.split(4)]))


def test_bad_ghost_sizes():
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="ghost_batch_size"):
            GhostBatchNorm(4, ghost_batch_size=bad)
        with pytest.raises(ValueError, match="ghost_batch_size"):
            GhostBatchNormCallback(bad)
    layer = GhostBatchNorm(4, ghost_batch_size=64)
    layer.eval()
    layer(torch.randn(8, 4))  # evaluation batches are never checked
    layer.train()
    with pytest.raises(ValueError, match="larger than"):
        layer(torch.randn(16, 4))
    layer = GhostBatchNorm(4, ghost_batch_size=8)
    layer(torch.randn(16, 4))
    layer(torch.randn(5, 4))  # after the first batch, a short last batch is plain BN
    layer(torch.randn(17, 4))  # a remainder of one example joins the last ghost batch (torch would refuse it alone)
    with pytest.raises(ValueError, match=r"GhostBatchNorm: a training batch of 1 example of shape \(1, 4\)"):
        layer(torch.randn(1, 4))  # nothing to fold into: refused by name, as nn.BatchNorm refuses it
    spatial = GhostBatchNorm(4, ghost_batch_size=8)
    spatial(torch.randn(8, 4, 3))
    assert spatial(torch.randn(1, 4, 3)).shape == (1, 4, 3)  # one example with 3 values per channel: plain BN
    with pytest.raises(ValueError, match="ghost_batch_size=1"):
        GhostBatchNorm(4, ghost_batch_size=1)(torch.randn(6, 4))


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Sequential(nn.Flatten(), nn.Linear(4 * 4 * 4, 6), nn.BatchNorm1d(6)),
                         nn.SyncBatchNorm(6))


def test_converter_state_dict_both_ways_and_sync_skipped():
    net = _net()
    keys = list(net.state_dict())
    ghost = convert_to_ghost_batchnorm(copy.deepcopy(net), 8)
    assert isinstance(ghost[1], GhostBatchNorm) and isinstance(ghost[3][2], GhostBatchNorm)
    assert type(ghost[4]) is nn.SyncBatchNorm  # skipped unless asked
    assert list(ghost.state_dict()) == keys
    ghost.load_state_dict(net.state_dict())  # plain -> ghost
    fresh = _net()
    with torch.no_grad():
        for p in ghost.parameters():
            p.add_(1.0)
    fresh.load_state_dict(ghost.state_dict())  # ghost -> plain
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), ghost.state_dict().values()))
    with_sync = convert_to_ghost_batchnorm(_net(), 8, include_sync_batchnorm=True)
    assert isinstance(with_sync[4], GhostBatchNorm)
    root = convert_to_ghost_batchnorm(nn.BatchNorm1d(3), 4)
    assert isinstance(root, GhostBatchNorm)


def test_converter_shares_parameters_and_warns_without_bn():
    net = _net()
    weight = net[1].weight
    convert_to_ghost_batchnorm(net, 8)
    assert net[1].weight is weight  # an optimizer built before conversion still updates the layer
    with pytest.warns(UserWarning, match="no BatchNorm"):
        out = convert_to_ghost_batchnorm(nn.Linear(3, 3), 8)
    assert isinstance(out, nn.Linear)


# ------------------------------------------------------------------- YAML switches (shared with the other plugin tests)
REPO = Path(__file__).resolve().parents[1]


class MNIST1DBNNet(nn.Module):
    """A tiny MNIST-1D CNN with BatchNorm (the recipe's CNN has none), for the YAML tests of the plugins."""

    def __init__(self, channels: int = 8, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv1d(1, channels, 5, stride=2, padding=1), nn.BatchNorm1d(channels),
                                      nn.ReLU(), nn.AdaptiveAvgPool1d(4), nn.Flatten())
        self.head = nn.Linear(4 * channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 40) -> (B, 1, 40) -> (B, C*4) -> (B, 10)
        return self.head(self.features(x.reshape(x.shape[0], 1, -1)))


def cli_fit(overrides: dict, max_steps: int = 4, *args: str):
    """``lightning-sgd fit`` on recipes/mnist1d.yaml shrunk to 200 examples, plus ``overrides`` as a second YAML."""
    from lightning_sgd.cli import run

    tiny = {
        "test_after_fit": False,
        # callbacks: []: the recipe's measurement callbacks are not what these tests are about (and cost ~25 s)
        "trainer": {"max_steps": max_steps, "logger": False, "enable_checkpointing": False, "callbacks": [],
                    "enable_model_summary": False, "num_sanity_val_steps": 0, "limit_val_batches": 1},
        "data": {"init_args": {"num_train": 200, "num_val": 50, "num_test": 50, "batch_size": 50,
                               "eval_batch_size": 50}},
        "model": {"init_args": {"network": {"init_args": {"channels": 8}}}},
    }
    Path("tiny.yaml").write_text(yaml.safe_dump(tiny))
    Path("plugin.yaml").write_text(yaml.safe_dump(overrides))
    return run(["fit", "--config", str(REPO / "recipes" / "mnist1d.yaml"), "--config", "tiny.yaml",
                "--config", "plugin.yaml", *args])


def test_yaml_switch_ghost_batchnorm():
    cli = cli_fit({
        "trainer": {"callbacks": [{"class_path": "lightning_sgd.plugins.GhostBatchNormCallback",
                                   "init_args": {"ghost_batch_size": 10}}]},
        "model": {"init_args": {"network": {"class_path": "tests.test_ghost_batchnorm.MNIST1DBNNet",
                                            "init_args": {"channels": 8}}}},
    })
    bn = cli.model.network.features[1]
    assert isinstance(bn, GhostBatchNorm) and bn.ghost_batch_size == 10
    assert int(bn.num_batches_tracked) == 4 * 5  # 4 steps x (50 / 10) ghost batches
    optimizer_params = {id(p) for group in cli.trainer.optimizers[0].param_groups for p in group["params"]}
    assert id(bn.weight) in optimizer_params


@pytest.mark.slow  # a 2-process DDP job: ~15 s on an idle machine
def test_plugins_under_ddp(tmp_path):
    """2-process gloo DDP: ghost size per device, EMA samples counted over the world, B = devices x batch x accum."""
    from tests.ddp import run_ddp

    ranks = run_ddp("tests.ddp_entries_plugins:plugins_under_ddp", tmp_path)
    for result in ranks:
        assert result["ghost"] == "GhostBatchNorm"
        assert result["num_batches_tracked"] == 3 * 2 * (8 // 4)  # steps x accumulated batches x ghosts per batch
        assert result["num_updates"] == 3
        assert result["last_decay"] == pytest.approx(0.5 ** ((8 * 2 * 2) / 64))  # batch x world x accumulation
        assert result["scale"] == 4.0  # B = 2 devices x 8 x 2 = 32, B_ref = 8
        assert result["lrs"] == pytest.approx([0.1 * 4 * (0.25 + 0.75 * min(1.0, t / 2)) for t in range(3)])
    assert ranks[0]["ema_weights"] == ranks[1]["ema_weights"]  # the EMA of identical DDP weights is identical
