"""Timing helpers for the benchmarks: one thread, warm-up, median over repeats."""

import statistics
import time
from collections.abc import Callable

import torch


def single_thread() -> None:
    torch.set_num_threads(1)


def median_ms(fn: Callable[[], object], repeats: int = 21, warmup: int = 3) -> float:
    """Median wall time of ``fn()`` in milliseconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)
