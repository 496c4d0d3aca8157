"""When a measurement runs: small schedule objects mapping a global step to yes/no (as cockpit does).

Callbacks take ``schedule: int | Schedule``; an ``int`` n means :class:`EveryNSteps` (n). In YAML::

    schedule:
      class_path: lightning_sgd.schedules.LogSpaced
      init_args: {start: 1, end: 100000, per_decade: 8}
"""

from __future__ import annotations

import math


class Schedule:
    """Base class: ``schedule(step) -> bool`` says whether to measure at ``step`` (trainer.global_step)."""

    def __call__(self, step: int) -> bool:
        raise NotImplementedError(f"{type(self).__name__} must implement __call__(step) -> bool")


class EveryNSteps(Schedule):
    """Measure at ``offset, offset + interval, offset + 2·interval, ...``."""

    def __init__(self, interval: int = 10, offset: int = 0) -> None:
        if interval < 1:
            raise ValueError(f"interval must be >= 1, got {interval}; use 1 to measure every step.")
        if offset < 0:
            raise ValueError(f"offset must be >= 0, got {offset}.")
        self.interval = interval
        self.offset = offset

    def __call__(self, step: int) -> bool:
        return step >= self.offset and (step - self.offset) % self.interval == 0

    def __repr__(self) -> str:
        return f"EveryNSteps(interval={self.interval}, offset={self.offset})"


class LogSpaced(Schedule):
    """Dense early, sparse late: ``per_decade`` roughly evenly log-spaced steps in each decade of [start, end].

    Step 0 is included when ``start`` is 0. Every step below ``per_decade`` is measured (the grid is that dense there).
    """

    def __init__(self, start: int = 0, end: int = 1_000_000, per_decade: int = 10) -> None:
        if start < 0 or end < start:
            raise ValueError(f"need 0 <= start <= end, got start={start}, end={end}.")
        if per_decade < 1:
            raise ValueError(f"per_decade must be >= 1, got {per_decade}.")
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


def as_schedule(schedule: int | Schedule) -> Schedule:
    """Accept an int (every n steps) or a :class:`Schedule`; anything else is a configuration error."""
    if isinstance(schedule, bool):
        raise TypeError("schedule must be an int (every n steps) or a lightning_sgd.schedules.Schedule, not a bool.")
    if isinstance(schedule, int):
        return EveryNSteps(schedule)
    if isinstance(schedule, Schedule) or callable(schedule):
        return schedule  # type: ignore[return-value]
    raise TypeError(
        f"schedule must be an int (every n steps) or a lightning_sgd.schedules.Schedule, got {type(schedule).__name__}."
    )
