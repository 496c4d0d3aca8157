"""Batches as users have them: count, slice and flatten any structure a DataLoader yields.

A batch may be a tensor, a tuple or list, a dict, a ``namedtuple``, a dataclass, a HuggingFace ``BatchEncoding``
(a ``UserDict``) or any nesting of them, with non-tensor leaves (strings, ids, ints) mixed in. The measurement
callbacks need three things of it:

- **how many examples** it holds: ``dim 0`` of its first tensor with at least one dimension
  (:func:`batch_size`);
- **which leaves carry that example dimension**: tensors whose ``shape[0]`` equals the batch size, and lists or
  tuples of ``n`` plain values (strings, numbers, ``None``: what the default ``collate_fn`` makes of per-example
  strings, e.g. raw texts or label names). Other tensors (BERT's position ids of shape ``(1, T)``, a scalar
  temperature, a shared mask of shape ``(T, T)``) are *broadcast* over the batch and stay whole when the batch is
  sliced, and so do other values (:func:`batched_mask`). A tuple of plain values that happens to have ``n`` items
  but is not per-example data (an image size of 3 in a batch of 3) would be sliced too: keep such metadata out of
  the batch or in a tensor;
- **a slice of the examples** in the same structure and type (:func:`slice_batch`), and a flat list of the batched
  tensors with a function that rebuilds the batch from it (:func:`flatten_batch`), which is what ``vmap`` needs
  for containers torch's pytree does not know (``BatchEncoding``, dataclasses).

Rebuilding keeps the container type where it can (``type(batch)(...)`` for mappings and sequences,
``dataclasses.replace`` for dataclasses, ``_make`` for namedtuples); a mapping whose type cannot be rebuilt that way
becomes a plain ``dict``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor

__all__ = ["batch_size", "batched_mask", "flatten_batch", "slice_batch", "tensor_leaves"]


_PLAIN = (str, bytes, int, float, complex, bool, type(None))


def _plain_sequence(node: Any) -> bool:
    """A list or tuple (not a namedtuple) of plain values: a leaf that may hold one value per example."""
    return (isinstance(node, (list, tuple)) and not hasattr(node, "_fields") and len(node) > 0
            and all(isinstance(item, _PLAIN) for item in node))


def _children(node: Any) -> tuple[list[Any], Callable[[list[Any]], Any]] | None:
    """``(children, rebuild)`` for a container node, ``None`` for a leaf."""
    if isinstance(node, Tensor) or _plain_sequence(node):
        return None
    if isinstance(node, Mapping):
        keys = list(node.keys())

        def rebuild_mapping(values: list[Any]) -> Any:
            items = dict(zip(keys, values))
            try:
                return type(node)(items)
            except Exception:  # noqa: BLE001 - a mapping type without a dict constructor
                return items

        return [node[k] for k in keys], rebuild_mapping
    if isinstance(node, tuple) and hasattr(node, "_fields"):  # namedtuple
        return list(node), lambda values: type(node)._make(values)
    if isinstance(node, (tuple, list)):
        return list(node), lambda values: type(node)(values)
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        fields = [f.name for f in dataclasses.fields(node) if f.init]
        return ([getattr(node, name) for name in fields],
                lambda values: dataclasses.replace(node, **dict(zip(fields, values))))
    return None


def _flatten(node: Any) -> tuple[list[Any], Callable[[list[Any]], Any]]:
    """All leaves in order, and a function that rebuilds ``node`` from a list of the same length."""
    found = _children(node)
    if found is None:
        return [node], lambda leaves: leaves[0]
    children, rebuild = found
    parts = [_flatten(child) for child in children]
    sizes = [len(leaves) for leaves, _ in parts]

    def unflatten(leaves: list[Any]) -> Any:
        out, start = [], 0
        for (_, sub_rebuild), size in zip(parts, sizes):
            out.append(sub_rebuild(leaves[start:start + size]))
            start += size
        return rebuild(out)

    return [leaf for leaves, _ in parts for leaf in leaves], unflatten


def tensor_leaves(batch: Any) -> list[Tensor]:
    """Every tensor in ``batch``, in a fixed depth-first order."""
    return [leaf for leaf in _flatten(batch)[0] if isinstance(leaf, Tensor)]


def batch_size(batch: Any, who: str = "lightning_sgd") -> int:
    """Examples in ``batch``: ``dim 0`` of its first tensor with at least one dimension.

    Raises a ``TypeError`` naming ``who`` when the batch holds no such tensor.

    >>> import torch
    >>> batch_size({"input_ids": torch.zeros(4, 7, dtype=torch.long), "position_ids": torch.arange(7)[None]})
    4
    """
    for leaf in tensor_leaves(batch):
        if leaf.dim() >= 1:
            return int(leaf.shape[0])
    raise TypeError(f"{who}: the batch ({type(batch).__name__}) holds no tensor with a batch dimension, so its "
                    "examples cannot be counted or sliced. Yield tensors from the DataLoader (e.g. with the default "
                    "collate_fn).")


def batched_mask(leaves: list[Any], n: int) -> list[bool]:
    """For each leaf: does it carry the example dimension (a tensor with ``shape[0] == n``, or a list/tuple of ``n``
    plain values)?"""
    return [(isinstance(leaf, Tensor) and leaf.dim() >= 1 and leaf.shape[0] == n)
            or (_plain_sequence(leaf) and len(leaf) == n) for leaf in leaves]


def flatten_batch(batch: Any, who: str = "lightning_sgd") -> tuple[list[Any], Callable[[list[Any]], Any], int]:
    """``(batched, rebuild, n)``: the leaves that carry the example dimension (tensors, and lists/tuples of ``n``
    plain values; each supports ``leaf[part]``), a function that puts (sliced or ``vmap``-ed) replacements of them
    back into the batch's structure, and the number of examples ``n``.

    Leaves that are not batched (broadcast tensors, single strings, numbers) are kept as they are by ``rebuild``.
    ``vmap`` cannot map over a list of strings: engines that ``vmap`` over ``batched`` fall back to a loop over
    examples for such batches.
    """
    n = batch_size(batch, who)
    leaves, unflatten = _flatten(batch)
    mask = batched_mask(leaves, n)
    batched = [leaf for leaf, m in zip(leaves, mask) if m]

    def rebuild(replacements: list[Tensor]) -> Any:
        if len(replacements) != len(batched):
            raise ValueError(f"{who}: expected {len(batched)} batched tensors, got {len(replacements)}.")
        it = iter(replacements)
        return unflatten([next(it) if m else leaf for leaf, m in zip(leaves, mask)])

    return batched, rebuild, n


def slice_batch(batch: Any, part: slice, who: str = "lightning_sgd") -> Any:
    """The examples ``part`` of ``batch``, in the same structure; broadcast tensors and other leaves kept whole.

    >>> import torch
    >>> b = {"x": torch.arange(6).reshape(3, 2), "pos": torch.arange(2)[None], "name": "digits",
    ...      "text": ["a", "b", "c"]}
    >>> s = slice_batch(b, slice(1, 3))
    >>> s["x"].tolist(), s["pos"].tolist(), s["name"], s["text"]
    ([[2, 3], [4, 5]], [[0, 1]], 'digits', ['b', 'c'])
    """
    batched, rebuild, _ = flatten_batch(batch, who)
    return rebuild([t[part] for t in batched])
