"""MNIST-1D generated offline (Greydanus & Kobak 2020, https://github.com/greydanus/mnist1d).

The ``mnist1d`` package's ``make_dataset`` builds one fixed set and normalizes it by its own statistics. Here we
call the same per-example ``transform`` with a private random state, so any number of disjoint i.i.d. sets (train,
val, test, and an unlimited fresh stream) come from the same generator, each fully determined by its seed, and the
caller normalizes all of them with the training set's statistics.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from mnist1d.data import get_dataset_args, get_templates
from mnist1d.data import transform as _transform

SEQUENCE_LENGTH = 40  # mnist1d default final_seq_length
NUM_CLASSES = 10


@contextmanager
def _numpy_global_seed(seed: int) -> Iterator[None]:
    """mnist1d draws from numpy's global RNG: seed it for the block and restore the caller's state after."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def generate_mnist1d(num_samples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``num_samples`` i.i.d. MNIST-1D examples (uniform labels), unnormalized.

    Returns ``x`` float32 of shape ``(num_samples, 40)`` and ``y`` int64 of shape ``(num_samples,)``. Deterministic
    in ``seed``; different seeds give independent draws. Seeds must fit numpy's 32-bit seeding.
    """
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}.")
    args = get_dataset_args()
    templates = get_templates()
    xs = np.empty((num_samples, SEQUENCE_LENGTH), dtype=np.float64)
    with _numpy_global_seed(seed % 2**32):
        labels = np.random.randint(0, NUM_CLASSES, size=num_samples)
        for i, label in enumerate(labels):
            xs[i], _ = _transform(templates["x"][label], templates["t"], args)
    return torch.from_numpy(xs.astype(np.float32)), torch.from_numpy(labels.astype(np.int64))
