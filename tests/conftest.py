"""Shared fixtures. Helpers to import directly: tests.helpers (tiny models/data), tests.ddp (2-process DDP runs),
tests.wandb_reader (read an offline W&B run back)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def trainer_kwargs():
    """Fast Trainer arguments (see tests.helpers.fast_trainer_kwargs); tests override what they need."""
    from tests.helpers import fast_trainer_kwargs

    return fast_trainer_kwargs()


@pytest.fixture(autouse=True)
def _in_tmp_dir(tmp_path, monkeypatch):
    """Every test runs in its own temporary directory, so runs/, .data/ and lightning_logs/ never leak."""
    monkeypatch.chdir(tmp_path)
    yield
