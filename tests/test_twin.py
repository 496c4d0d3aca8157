"""The deep bootstrap's ideal world on its own (lightning_sgd.twin.Twin): no Trainer, ground truth by hand."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_sgd.twin import Twin, optimizers_and_schedulers

pytestmark = pytest.mark.usefixtures("one_thread")


class Net(nn.Module):
    """A training_step module with a branch only some batches use (``unused`` never runs, ``extra`` when x > 9)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(4, 3)
        self.extra = nn.Linear(3, 3)
        self.unused = nn.Linear(3, 3)

    def training_step(self, batch):
        x, y = batch
        h = self.body(x)
        if bool((x > 9).any()):
            h = self.extra(h)
        return nn.functional.cross_entropy(h, y)

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
        return [optimizer], [torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)]


def batches(n: int, seed: int, big: bool = False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(5, 4, generator=g) + (10.0 if big else 0.0)
        out.append((x, torch.randint(0, 3, (5,), generator=g)))
    return out


def test_a_step_is_the_plain_accumulated_clipped_step_bit_for_bit():
    module = Net()
    twin = Twin.clone(module)
    reference = Twin.clone(module)  # the same weights, stepped by hand
    data = batches(3, seed=1)
    loss, count = twin.step(data, accumulate=3, clip_val=0.5)
    ref_module, ref_opt = reference.module, reference.optimizer
    ref_opt.zero_grad(set_to_none=True)
    losses = []
    for x, y in data:
        value = ref_module.training_step((x, y))
        (value / 3).backward()
        losses.append(value.item())
    torch.nn.utils.clip_grad_norm_([p for p in ref_module.parameters() if p.grad is not None], 0.5)
    ref_opt.step()
    assert count == 15 and loss == pytest.approx(sum(losses) / 3, rel=1e-12)
    assert twin.steps == 1
    for p, q in zip(twin.module.parameters(), ref_module.parameters()):
        assert torch.equal(p, q)
    assert twin.module.unused.weight.grad is None  # never used: no gradient, as on one process


def test_two_processes_average_with_one_flat_all_reduce_and_keep_unused_parameters_gradient_free():
    """Rank 0 never runs ``extra``, rank 1 does: after the all-reduce both have the mean gradient of the two shards,
    ``extra`` included, ``unused`` still without one. Rank 1's buffer is captured first, then added in rank 0's
    all-reduce; the result must equal one process training on both shards (the mean of equal-sized shards)."""
    module = Net()
    rank0, rank1, single = Twin.clone(module), Twin.clone(module), Twin.clone(module)
    shard0, shard1 = batches(1, seed=2), batches(1, seed=3, big=True)
    captured: list[torch.Tensor] = []
    calls = []

    def capture(flat):
        calls.append(flat.numel())
        captured.append(flat.clone())

    rank1.step(shard1, all_reduce=capture, world_size=2)  # rank 1's own buffer (its step is not under test)

    def add_rank1(flat):
        calls.append(flat.numel())
        flat.add_(captured[0])

    loss, count = rank0.step(shard0, all_reduce=add_rank1, world_size=2)
    assert calls[0] == calls[1] == sum(p.numel() for p in module.parameters()) + 6 + 2  # grads, 6 flags, loss, n
    assert count == 10
    # one process on both shards, each shard's loss weighted 1/2 (its share of the examples)
    single.optimizer.zero_grad(set_to_none=True)
    values = [single.module.training_step(b) for b in (shard0[0], shard1[0])]
    ((values[0] + values[1]) / 2).backward()
    assert loss == pytest.approx(float(values[0] + values[1]) / 2, rel=1e-6)
    for name, p in rank0.module.named_parameters():
        q = dict(single.module.named_parameters())[name]
        if q.grad is None:
            assert p.grad is None, name
        else:
            assert p.grad is not None and torch.allclose(p.grad, q.grad, atol=1e-7), name
    assert rank0.module.extra.weight.grad is not None and rank0.module.unused.weight.grad is None


def test_a_non_finite_loss_does_not_step():
    twin = Twin.clone(Net())
    before = [p.clone() for p in twin.module.parameters()]
    x, y = batches(1, seed=4)[0]
    loss, count = twin.step([(x * float("nan"), y)])
    assert loss != loss and count == 5 and twin.steps == 0
    assert all(torch.equal(p, q) for p, q in zip(twin.module.parameters(), before))


def test_schedulers_follow_the_real_clock_and_state_round_trips():
    module = Net()
    twin = Twin.clone(module)
    twin.step(batches(1, seed=5))
    twin.sync_schedulers([3])
    assert twin.schedulers[0].last_epoch == 3 and twin.optimizer.param_groups[0]["lr"] == pytest.approx(0.05)
    other = Twin.clone(module)
    other.load_state_dict(twin.state_dict())
    assert other.steps == 1 and other.schedulers[0].last_epoch == 3
    assert all(torch.equal(p, q) for p, q in zip(other.module.parameters(), twin.module.parameters()))
    assert other.optimizer.state_dict()["state"].keys() == twin.optimizer.state_dict()["state"].keys()


def test_clone_refuses_what_it_cannot_mirror():
    module = Net()
    with pytest.raises(ValueError, match="exactly one optimizer; configure_optimizers returned 2"):
        Twin.clone(module, lambda m: [torch.optim.SGD(m.body.parameters(), lr=0.1),
                                      torch.optim.SGD(m.extra.parameters(), lr=0.1)])

    def plateau(m):
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.ReduceLROnPlateau(opt)}}

    with pytest.raises(ValueError, match="ReduceLROnPlateau"):
        Twin.clone(module, plateau)
    with pytest.raises(ValueError, match="could not read the optimizer"):
        optimizers_and_schedulers("adam")
