"""Time the sequential Gramian weightings (GradVac, PCGrad, MGDA) on ``m x m`` Gramians.

Single thread, median of repeated calls, CPU by default::

    python benchmarks/bench_weightings.py [--repeats 50] [--device cpu] [--dtype float32]

The Gramians are ``J J^T`` for ``J`` with ``m`` Gaussian rows of length 512 plus a shared
component (correlated tasks, as in multi-task training). MGDA's cost depends on how many
Frank–Wolfe iterations it runs; the table also times its variants that check convergence on the
host at every iteration, every 8 iterations (the library's choice) and never (always ``max_iters``).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from torchjd.aggregation import GradVacWeighting, MGDAWeighting, PCGradWeighting, _mgda

TARGETS_MS = {
    ("GradVacWeighting", 32): 3.0,
    ("GradVacWeighting", 128): 30.0,
    ("PCGradWeighting", 32): 1.5,
    ("PCGradWeighting", 128): 10.0,
}


def _gramian(m: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(m)
    shared = torch.randn(1, 512, generator=generator, dtype=torch.float64)
    rows = torch.randn(m, 512, generator=generator, dtype=torch.float64) + 0.3 * shared
    return (rows @ rows.T).to(dtype=dtype, device=device)


def _median_ms(fn: Callable[[], object], repeats: int, device: str) -> tuple[float, float]:
    """Median wall-clock and process-CPU times of ``fn`` in ms (CPU time is less sensitive to
    other processes sharing the machine; on a GPU only the wall-clock time is meaningful)."""

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    for _ in range(3):
        fn()
    sync()
    wall, cpu = [], []
    for _ in range(repeats):
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        fn()
        sync()
        wall.append(time.perf_counter() - start_wall)
        cpu.append(time.process_time() - start_cpu)
    return 1e3 * statistics.median(wall), 1e3 * statistics.median(cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    dtype = getattr(torch, args.dtype)
    print(
        f"torch {torch.__version__}, 1 thread, {args.device}, {args.dtype}, median of "
        f"{args.repeats}"
    )
    print(f"{'weighting':<34} {'m':>4} {'wall ms':>9} {'cpu ms':>9} {'target':>8}")

    def row(name: str, m: int, fn: Callable[[], object]) -> None:
        wall, cpu = _median_ms(fn, args.repeats, args.device)
        target = TARGETS_MS.get((name, m))
        verdict = "" if target is None else f"{target:>6.1f}  {'ok' if wall <= target else 'MISS'}"
        print(f"{name:<34} {m:>4} {wall:>9.3f} {cpu:>9.3f} {verdict:>8}")

    for m in (8, 32, 128):
        gramian = _gramian(m, dtype, args.device)
        gradvac = GradVacWeighting()
        row("GradVacWeighting", m, lambda g=gramian, w=gradvac: w(g))
        row("PCGradWeighting", m, lambda g=gramian: PCGradWeighting()(g))
    for m in (8, 32):
        gramian = _gramian(m, dtype, args.device)
        row("MGDAWeighting", m, lambda g=gramian: MGDAWeighting()(g))
        default = _mgda._CHECK_EVERY
        for check_every, label in ((1, "check every iteration"), (101, "never check")):
            _mgda._CHECK_EVERY = check_every
            row(f"  MGDA, {label}", m, lambda g=gramian: MGDAWeighting()(g))
        _mgda._CHECK_EVERY = default
        iterations = _count_mgda_iterations(gramian)
        print(f"  (Frank–Wolfe iterations at m = {m}: {iterations})")


def _count_mgda_iterations(gramian: torch.Tensor) -> int:
    """Iterations run by the default MGDA on this Gramian (from the per-iteration check)."""
    final = _mgda._mgda_weights(gramian, 1e-3, 100)
    for n in range(1, 101):
        if torch.equal(_mgda._mgda_weights(gramian, 1e-3, n), final):
            return n
    return 100


if __name__ == "__main__":
    main()
