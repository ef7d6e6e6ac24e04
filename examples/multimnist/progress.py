"""Progress a person can follow: ``run k / N``, the time left, and the labelled task losses.

On a terminal the current line is rewritten as the steps go; when the output is redirected to a
file, only one line per finished run is written (no carriage returns).
"""

import sys
import time
from typing import TextIO

from torch import Tensor


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


class Progress:
    def __init__(self, costs: list[float], stream: TextIO = sys.stderr, enabled: bool = True):
        """``costs``: the expected relative cost of each run (e.g. its number of steps)."""
        self.costs = costs
        self.stream = stream
        self.enabled = enabled
        self.live = enabled and stream.isatty()
        self.start = time.perf_counter()
        self.done_cost = 0.0
        self.index = 0
        self.title = ""
        self.names: tuple[str, ...] = ()
        self._last_draw = 0.0

    def begin(self, title: str, names: tuple[str, ...]) -> None:
        """Start the next run; ``names`` label the losses reported by :meth:`step`."""
        self.index += 1
        self.title = title
        self.names = names

    def _left(self, fraction_of_run: float) -> str:
        done = self.done_cost + fraction_of_run * self.costs[self.index - 1]
        if done <= 0:
            return "time left: estimating"
        elapsed = time.perf_counter() - self.start
        return f"about {_duration(elapsed * (sum(self.costs) - done) / done)} left"

    def _losses(self, losses: Tensor) -> str:
        return ", ".join(f"{n} loss {v:.3f}" for n, v in zip(self.names, losses.tolist()))

    def step(self, step: int, steps: int, losses: Tensor) -> None:
        now = time.perf_counter()
        if not self.live or (now - self._last_draw < 0.2 and step < steps):
            return
        self._last_draw = now
        line = (
            f"run {self.index} / {len(self.costs)}  {self.title}  step {step}/{steps}  "
            f"{self._losses(losses)}  ({self._left(step / steps)})"
        )
        self.stream.write("\r\033[K" + line)
        self.stream.flush()

    def end(self, summary: str) -> None:
        self.done_cost += self.costs[self.index - 1]
        if not self.enabled:
            return
        prefix = "\r\033[K" if self.live else ""
        self.stream.write(
            f"{prefix}run {self.index} / {len(self.costs)}  {self.title}: {summary}  "
            f"({self._left(0.0)})\n"
        )
        self.stream.flush()
