"""Constructor-argument checks whose messages name the class and the argument, and say what would be accepted.

Wrong types raise ``TypeError`` (a float where an int is meant, a bool where a number is meant), wrong values raise
``ValueError`` (out of range, NaN, inf). Each check returns the value, so ``__init__`` can store what it checked::

    self.split_parts = check_int("GradientNoiseScale", "split_parts", split_parts, minimum=2)
    >>> check_int("GradientNoiseScale", "split_parts", 2.5, minimum=2)
    Traceback (most recent call last):
    ...
    TypeError: GradientNoiseScale: split_parts must be an int >= 2, got 2.5 (float).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Integral, Real
from typing import Any

__all__ = ["CheckpointStateError", "check_bool", "check_choice", "check_float", "check_int", "missing_state_keys"]


def _got(value: Any) -> str:
    return f"got {value!r} ({type(value).__name__})"


def check_int(who: str, name: str, value: Any, *, minimum: int | None = None, maximum: int | None = None,
              optional: bool = False, hint: str = "") -> Any:
    """``value`` must be an int (not a bool, not 2.5, not 2.0) in ``[minimum, maximum]``; ``None`` when
    ``optional``."""
    if value is None and optional:
        return None
    bounds = ([f">= {minimum}"] if minimum is not None else []) + ([f"<= {maximum}"] if maximum is not None else [])
    want = "an int" + (" " + " and ".join(bounds) if bounds else "") + (" or None" if optional else "")
    tail = f" {hint}" if hint else ""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{who}: {name} must be {want}, {_got(value)}.{tail}")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(f"{who}: {name} must be {want}, got {value}.{tail}")
    return int(value)


def check_float(who: str, name: str, value: Any, *, low: float | None = None, high: float | None = None,
                low_open: bool = False, high_open: bool = False, optional: bool = False, hint: str = "") -> Any:
    """``value`` must be a finite real number (not a bool) in the interval given by ``low``/``high`` (closed unless
    ``low_open``/``high_open``); ``None`` when ``optional``. Returns it as a ``float``."""
    if value is None and optional:
        return None
    lo = "" if low is None else ("(" if low_open else "[") + f"{low}"
    hi = "" if high is None else f"{high}" + (")" if high_open else "]")
    if low is not None and high is not None:
        want = f"a finite number in {lo}, {hi}"
    elif low is not None:
        want = f"a finite number {'>' if low_open else '>='} {low}"
    elif high is not None:
        want = f"a finite number {'<' if high_open else '<='} {high}"
    else:
        want = "a finite number"
    want += " or None" if optional else ""
    tail = f" {hint}" if hint else ""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{who}: {name} must be {want}, {_got(value)}.{tail}")
    x = float(value)
    if (not math.isfinite(x) or (low is not None and (x <= low if low_open else x < low))
            or (high is not None and (x >= high if high_open else x > high))):
        raise ValueError(f"{who}: {name} must be {want}, got {value!r}.{tail}")
    return x


def check_bool(who: str, name: str, value: Any) -> bool:
    """``value`` must be ``True`` or ``False``."""
    if not isinstance(value, bool):
        raise TypeError(f"{who}: {name} must be True or False, {_got(value)}.")
    return value


def check_choice(who: str, name: str, value: Any, choices: Sequence[Any]) -> Any:
    """``value`` must be one of ``choices``."""
    if isinstance(value, bool) or value not in tuple(choices):
        raise ValueError(f"{who}: {name} must be one of {tuple(choices)}, got {value!r}.")
    return value


class CheckpointStateError(KeyError):
    """A callback's checkpoint state lacks a key it needs (a ``KeyError`` whose message prints unquoted)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def missing_state_keys(who: str, state: Any, keys: Sequence[str], state_key: str | None = None) -> None:
    """A callback's checkpoint state must hold ``keys``: else a ``KeyError`` that names the callback, the missing
    keys and how to resume anyway (drop this callback's entry from the checkpoint: it then starts afresh)."""
    if not isinstance(state, dict):
        raise TypeError(f"{who}: the checkpoint's state for this callback must be a dict, got {type(state).__name__}.")
    missing = [k for k in keys if k not in state]
    if missing:
        entry = (f"checkpoint['callbacks'][{state_key!r}]" if state_key
                 else "this callback's entry of checkpoint['callbacks']")
        raise CheckpointStateError(
            f"{who}: the checkpoint's state for this callback has no {', '.join(map(repr, missing))} (it holds "
            f"{sorted(state)}): it was written by another version of lightning_sgd or edited. To resume anyway with "
            f"this callback starting afresh, delete {entry} from the checkpoint (torch.load, del, torch.save)."
        )
