"""The on-device tensor loaders under a real 2-process DDP job: Lightning shards them like any DataLoader."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from lightning_sgd.data import synthetic
from tests.ddp import ddp_trainer_kwargs, dump, run_ddp


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
