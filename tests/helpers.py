"""Tiny models, data and modules shared by the tests (cockpit-style: brute force must stay cheap)."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_sgd.recipes.classification import ClassificationModule


def tiny_mlp(
    sizes: tuple[int, ...] = (25, 4, 4, 3), seed: int = 0, activation: type[nn.Module] = nn.Sigmoid
) -> nn.Sequential:
    """The 25→4→4→3 MLP cockpit tests its quantities on (smooth activation: Hessians are non-trivial)."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(fan_in, fan_out))
        if i < len(sizes) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


def classification_data(n: int = 64, features: int = 25, classes: int = 3, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Gaussian inputs with labels from a random linear teacher (learnable, not separable)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    teacher = torch.randn(features, classes, generator=g)
    y = (x @ teacher + 0.5 * torch.randn(n, classes, generator=g)).argmax(1)
    return x, y


class TinyDataModule(pl.LightningDataModule):
    """Random classification data as a DataModule; ``batch_size`` is per device."""

    def __init__(self, n: int = 256, features: int = 25, classes: int = 3, batch_size: int = 16, seed: int = 0,
                 shuffle: bool = False) -> None:
        super().__init__()
        self.x, self.y = classification_data(n, features, classes, seed)
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(self.seed)
        return DataLoader(TensorDataset(self.x, self.y), batch_size=self.batch_size, shuffle=self.shuffle, generator=g)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x, self.y), batch_size=64)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()


def tiny_module(
    lr: float = 0.1, seed: int = 0, sizes: tuple[int, ...] = (25, 4, 4, 3), **kwargs: Any
) -> ClassificationModule:
    """A ClassificationModule around :func:`tiny_mlp` with plain SGD."""
    return ClassificationModule(
        tiny_mlp(sizes, seed=seed),
        num_classes=sizes[-1],
        optimizer=lambda params: torch.optim.SGD(params, lr=lr),
        **kwargs,
    )


def fast_trainer_kwargs(**overrides: Any) -> dict[str, Any]:
    """Trainer arguments for unit tests: CPU, a few steps, no checkpoints, progress bar, summary or logger."""
    kwargs: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        max_steps=5,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    kwargs.update(overrides)
    return kwargs
