"""Argument checks shared by the NQM's public functions: each raises a TypeError or ValueError naming the argument.

Numbers must be real (int, float or a NumPy number; never a bool or a string) and finite; sizes must be ints; a
range is written as an interval in the message, e.g. ``momentum must be in [0, 1), got 1.0``.
"""

from __future__ import annotations

import numbers
import os
from typing import Any, NamedTuple

import numpy as np


class Range(NamedTuple):
    """An interval of the real line; ``None`` for an unbounded end."""

    low: float | None
    high: float | None
    low_closed: bool = True
    high_closed: bool = True

    def text(self) -> str:
        if self.low is None and self.high is None:
            return "(NaN and inf allowed)"
        if self.high is None:
            return f"{'>=' if self.low_closed else '>'} {self.low:g}"
        if self.low is None:
            return f"{'<=' if self.high_closed else '<'} {self.high:g}"
        return f"in {'[' if self.low_closed else '('}{self.low:g}, {self.high:g}{']' if self.high_closed else ')'}"

    def outside(self, x: np.ndarray) -> np.ndarray:
        """Mask of the entries of ``x`` that are not in the interval (NaN and ±inf are outside unless it is ANY)."""
        if self.low is None and self.high is None:
            return np.zeros(np.shape(x), dtype=bool)
        bad = ~np.isfinite(x)
        if self.low is not None:
            bad |= (x < self.low) if self.low_closed else (x <= self.low)
        if self.high is not None:
            bad |= (x > self.high) if self.high_closed else (x >= self.high)
        return bad


POSITIVE = Range(0.0, None, low_closed=False)
NON_NEGATIVE = Range(0.0, None)
UNIT = Range(0.0, 1.0)  # [0, 1]
UNIT_OPEN = Range(0.0, 1.0, high_closed=False)  # [0, 1): momentum β, EMA γ
ANY = Range(None, None)  # any real, NaN and ±inf included


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def real(name: str, value: Any, rng: Range = POSITIVE) -> float:
    """A finite real number in ``rng``, as a float."""
    if not _is_real(value):
        raise TypeError(f"{name} must be a real number {rng.text()}, got {value!r} ({type(value).__name__}).")
    v = float(value)
    if rng.outside(np.asarray(v)):
        raise ValueError(f"{name} must be finite and {rng.text()}, got {value!r}.")
    return v


def reals(name: str, value: Any, rng: Range = POSITIVE, *, scalar_ok: bool = True) -> np.ndarray:
    """A non-empty number or array of finite reals in ``rng``, as a float array (shape kept)."""
    if isinstance(value, (str, bytes)) or value is None or isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a number or an array of numbers {rng.text()}, got {value!r}.")
    try:
        arr = np.asarray(value)
    except (TypeError, ValueError) as err:  # ragged nesting
        raise TypeError(f"{name} must be a number or an array of numbers {rng.text()}, got {value!r}.") from err
    if arr.dtype.kind not in "iuf":
        raise TypeError(f"{name} must hold real numbers {rng.text()}, got {value!r} (dtype {arr.dtype}).")
    if arr.size == 0:
        raise ValueError(f"{name} is empty: give at least one value.")
    if not scalar_ok and arr.ndim == 0:
        raise ValueError(f"{name} must be an array (one entry per step), got the scalar {value!r}.")
    arr = arr.astype(float)
    bad = rng.outside(arr)
    if bad.any():
        first = arr[bad].flat[0]
        where = "" if arr.ndim == 0 else f" (entry {np.argwhere(bad)[0].tolist()} of {arr.size})"
        raise ValueError(f"{name} must be finite and {rng.text()}, got {first!r}{where}.")
    return arr


def whole(name: str, value: Any, minimum: int = 0) -> np.ndarray:
    """A number or array of whole numbers >= ``minimum`` (integral floats allowed: steps may come as floats)."""
    arr = reals(name, value, Range(float(minimum), None))
    frac = arr != np.round(arr)
    if frac.any():
        raise ValueError(f"{name} must be whole numbers >= {minimum}, got {arr[frac].flat[0]!r}.")
    return arr


def integer(name: str, value: Any, minimum: int = 1) -> int:
    """An int (Python or NumPy; never a bool or a float) >= ``minimum``."""
    if not isinstance(value, (int, np.integer)) or isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be an int >= {minimum}, got {value!r} ({type(value).__name__}).")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}.")
    return int(value)


def optional_integer(name: str, value: Any, minimum: int = 1) -> int | None:
    return None if value is None else integer(name, value, minimum)


def flag(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__}).")
    return bool(value)


def choice(name: str, value: Any, options: tuple) -> Any:
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, options))}; got {value!r}.")
    return value


def tunable(name: str, value: Any, rng: Range, *, allow_none: bool = True) -> None:
    """None (unused), ``"tune"``, a number or an array of numbers in ``rng``."""
    if value is None and allow_none:
        return
    if isinstance(value, str):
        if value != "tune":
            raise ValueError(f"{name} must be a number {rng.text()}, an array of them"
                             f"{', None' if allow_none else ''} or 'tune'; got {value!r}.")
        return
    reals(name, value, rng)


def power(value: Any) -> float:
    """The preconditioning power p of P = H^p: 0 (SGD) to 1 (Newton)."""
    return real("precondition_power", value, UNIT)


def momentum_ema(momentum: Any, ema: Any, *, scalar: bool = False) -> None:
    """β and γ in [0, 1) (1 never forgets: the risk never settles), and not both."""
    for name, value in (("momentum", momentum), ("ema", ema)):
        if value is not None:
            real(name, value, UNIT_OPEN) if scalar else reals(name, value, UNIT_OPEN)
    if momentum is not None and ema is not None:
        raise ValueError("momentum and ema together are not modelled; pick one")


def path(name: str, value: Any) -> str:
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        raise TypeError(f"{name} must be a non-empty path, got {value!r}.")
    return os.fspath(value)

