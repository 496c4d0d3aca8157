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


@pytest.fixture
def one_thread():
    """One intra-op thread for the test: tiny models run fastest single-threaded, and on a busy 2-core machine a
    second thread waiting at every small op's barrier makes them 10-100x slower. Modules of tiny-model tests use it
    with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _in_tmp_dir(tmp_path, monkeypatch):
    """Every test runs in its own temporary directory, so runs/, .data/ and lightning_logs/ never leak."""
    monkeypatch.chdir(tmp_path)
    yield
