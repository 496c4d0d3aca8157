"""The recipes under a real 2-process DDP job: the on-device tensor loaders are sharded like any DataLoader, and the
logged evaluation metrics are those of the whole set, not of rank 0's shard."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from lightning_sgd.data import synthetic
from tests.ddp import ddp_trainer_kwargs, dump, run_ddp
from tests.helpers import classification_data, tiny_mlp


def fit_cifar_shards(outdir: Path, root: str, steps: int) -> None:
    """Entry (both ranks): one epoch of CIFAR10DataModule batches; report a fingerprint of every example seen."""
    from lightning_sgd.recipes import CIFAR10DataModule, ClassificationModule

    pl.seed_everything(0)
    module = ClassificationModule(nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10)), num_classes=10)
    seen: list[float] = []

    class Record(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            images, _ = batch
            seen.extend(images.flatten(1)[:, :8].sum(1).tolist())  # identifies an (un-augmented) image

    datamodule = CIFAR10DataModule(root=root, batch_size=8, eval_batch_size=8, num_val=16, augment=False)
    trainer = pl.Trainer(**ddp_trainer_kwargs(max_steps=steps, callbacks=[Record()]))
    trainer.fit(module, datamodule=datamodule)
    dump(outdir, trainer.global_rank, {"seen": seen, "world": trainer.world_size})


@pytest.mark.ddp
def test_tensor_loader_is_sharded_across_ddp_ranks(tmp_path):
    root = synthetic.write_cifar10(tmp_path / "cifar", per_batch=16)  # 80 images: 64 train + 16 val
    results = run_ddp("tests.test_recipes_ddp:fit_cifar_shards", tmp_path / "job", root=str(root), steps=4)
    assert [r["world"] for r in results] == [2, 2]
    first, second = (torch.tensor(r["seen"]) for r in results)
    assert len(first) == len(second) == 4 * 8  # one epoch: 64 examples / (2 ranks x batch 8) = 4 steps
    # disjoint shards that together cover the training set exactly once
    everything = torch.cat([first, second]).sort().values
    assert torch.unique(everything).numel() == 64


def evaluate_on_the_full_set(outdir: Path) -> None:
    """Entry (both ranks): ``trainer.test`` of a ClassificationModule on 64 examples, 32 per rank; and the loss and
    accuracy of the same weights on all 64 computed directly."""
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_sgd.recipes import ClassificationModule

    module = ClassificationModule(tiny_mlp((25, 4, 3), seed=0), num_classes=3)
    x, y = classification_data(n=64, seed=1)
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    trainer = pl.Trainer(**ddp_trainer_kwargs())
    (logged,) = trainer.test(module, dataloaders=loader, verbose=False)
    with torch.no_grad():
        logits = module(x)
    shard = slice(trainer.global_rank, None, trainer.world_size)  # DistributedSampler(shuffle=False)'s indices
    dump(outdir, trainer.global_rank, {"logged": logged, "loss": float(nn.functional.cross_entropy(logits, y)),
                                       "acc": float((logits.argmax(1) == y).float().mean()),
                                       "shard_loss": float(nn.functional.cross_entropy(logits[shard], y[shard]))})


@pytest.mark.slow  # a 2-process DDP job: ~15 s idle, 50 s on the loaded 2-core VM
@pytest.mark.ddp
def test_ddp_test_metrics_are_the_whole_test_sets(tmp_path):
    """sync_dist: the printed test loss was rank 0's shard mean; with equal shards the mean over ranks of the shard
    means is the full-set mean (float32 rounding only); the accuracy is a torchmetrics Metric and was already exact."""
    results = run_ddp("tests.test_recipes_ddp:evaluate_on_the_full_set", tmp_path / "job")
    for r in results:
        assert abs(r["shard_loss"] - r["loss"]) > 1e-3 * r["loss"]  # one shard's mean would be told apart
        assert r["logged"]["test/loss"] == pytest.approx(r["loss"], rel=1e-5)
        assert r["logged"]["test/acc"] == pytest.approx(r["acc"], abs=1e-6)
