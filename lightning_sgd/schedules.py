"""When a measurement runs: small schedule objects mapping a global step to yes/no (as cockpit does).

Callbacks take ``schedule: int | Schedule``; an ``int`` n means :class:`EveryNSteps` (n). In YAML::

    schedule:
      class_path: lightning_sgd.schedules.LogSpaced
      init_args: {start: 1, end: 100000, per_decade: 8}
"""

from __future__ import annotations

import math
from numbers import Integral

from lightning_sgd.checks import check_int


class Schedule:
    """Base class: ``schedule(step) -> bool`` says whether to measure at ``step`` (trainer.global_step)."""

    def __call__(self, step: int) -> bool:
        raise NotImplementedError(f"{type(self).__name__} must implement __call__(step) -> bool")


class EveryNSteps(Schedule):
    """Measure at ``offset, offset + interval, offset + 2·interval, ...``."""

    def __init__(self, interval: int = 10, offset: int = 0) -> None:
        self.interval = check_int("EveryNSteps", "interval", interval, minimum=1,
                                  hint="Use 1 to measure every step.")
        self.offset = check_int("EveryNSteps", "offset", offset, minimum=0)

    def __call__(self, step: int) -> bool:
        return step >= self.offset and (step - self.offset) % self.interval == 0

    def __repr__(self) -> str:
        return f"EveryNSteps(interval={self.interval}, offset={self.offset})"


class LogSpaced(Schedule):
    """Dense early, sparse late: ``per_decade`` roughly evenly log-spaced steps in each decade of [start, end].

    Step 0 is included when ``start`` is 0. Every step below ``per_decade`` is measured (the grid is that dense there).
    """

    def __init__(self, start: int = 0, end: int = 1_000_000, per_decade: int = 10) -> None:
        start = check_int("LogSpaced", "start", start, minimum=0)
        end = check_int("LogSpaced", "end", end, minimum=start, hint="(end is the last step measured, >= start.)")
        per_decade = check_int("LogSpaced", "per_decade", per_decade, minimum=1)
        self.start, self.end, self.per_decade = start, end, per_decade
        lo = max(start, 1)
        n = max(1, math.ceil(per_decade * math.log10(max(end, lo) / lo)) + 1)
        steps = {round(lo * (max(end, lo) / lo) ** (i / max(n - 1, 1))) for i in range(n)}
        if start == 0:
            steps.add(0)
        self._steps = frozenset(s for s in steps if start <= s <= end)

    def __call__(self, step: int) -> bool:
        return step in self._steps

    def __repr__(self) -> str:
        return f"LogSpaced(start={self.start}, end={self.end}, per_decade={self.per_decade})"


def as_schedule(schedule: int | Schedule, who: str | None = None, name: str = "schedule") -> Schedule:
    """Accept an int n >= 1 (every n steps) or a :class:`Schedule` (any callable ``step -> bool``); anything else is a
    configuration error naming ``who`` (the callback) and ``name`` (its argument)."""
    prefix = f"{who}: " if who else ""
    want = f"{prefix}{name} must be an int >= 1 (every n steps) or a lightning_sgd.schedules.Schedule"
    if isinstance(schedule, bool) or not isinstance(schedule, (Integral, Schedule)) and not callable(schedule):
        raise TypeError(f"{want}, got {schedule!r} ({type(schedule).__name__}).")
    if isinstance(schedule, Integral):
        if schedule < 1:
            raise ValueError(f"{want}, got {schedule}; use 1 to measure every step.")
        return EveryNSteps(int(schedule))
    return schedule  # type: ignore[return-value]
