"""Time UPGradWeighting (the dual-cone projections) on the Gramian of a random ``[m, 1000]`` matrix.

For each m, single-threaded, the median time of ``UPGradWeighting()(G)`` with the default
projector (``BlockPivotingProjector``), next to its target, and, when quadprog is installed, the
same call with ``QuadprogProjector`` (TorchJD's default). Also the batched path used by grouped
aggregation: 76 Gramians of size m at once, against a loop of 76 calls. The time of one tiny torch
operation is printed first: on a loaded machine, read the figures as multiples of it. Each figure is
the median over ``--repeats`` calls, taken in ``--rounds`` rounds of which the best is kept (this
filters out bursts of load from other processes on a shared machine).

Usage: ``python benchmarks/bench_projector.py [--repeats N] [--no-quadprog]``.
"""

import argparse
import importlib.util
from collections.abc import Callable

import torch
from _timing import median_ms, single_thread

from torchjd.aggregation import UPGradWeighting
from torchjd.linalg import QuadprogProjector

TARGETS_MS = {1: 0.3, 2: 0.3, 4: 0.3, 8: 0.3, 32: 2.0, 128: 40.0}
SIZES = [1, 2, 4, 8, 16, 32, 64, 128]


def gramian(m: int, n: int = 1000, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    J = torch.randn(m, n, generator=generator)
    return J @ J.T


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=31)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-quadprog", action="store_true")
    args = parser.parse_args()
    single_thread()

    def timed(fn: Callable[[], object], repeats: int) -> float:
        return min(median_ms(fn, repeats=repeats) for _ in range(args.rounds))

    with_quadprog = not args.no_quadprog and importlib.util.find_spec("quadprog") is not None

    x = torch.ones(8)
    print(f"one tiny torch op (x + 1): {1000 * timed(lambda: x + 1, 1001):.1f} us\n")

    print(f"{'m':>4} {'UPGradWeighting ms':>19} {'target ms':>10} {'quadprog ms':>12}")
    for m in SIZES:
        G = gramian(m)
        repeats = args.repeats if m <= 64 else max(5, args.repeats // 4)
        ours = timed(lambda G=G: UPGradWeighting()(G), repeats)
        target = TARGETS_MS.get(m)
        target_text = f"{target:.1f}" if target is not None else "-"
        status = "" if target is None else ("  ok" if ours <= target else "  OVER")
        line = f"{m:>4} {ours:>19.3f} {target_text:>10}"
        if with_quadprog:
            weighting = UPGradWeighting(projector=QuadprogProjector())
            theirs = timed(lambda G=G, w=weighting: w(G), max(3, repeats // 4))
            line += f" {theirs:>12.3f}"
        print(line + status)

    print(f"\n{'m':>4} {'76 Gramians batched ms':>23} {'loop of 76 calls ms':>20}")
    weighting = UPGradWeighting()
    for m in (2, 8, 32):
        gramians = torch.stack([gramian(m, seed=seed) for seed in range(76)])
        batched = timed(lambda g=gramians: weighting._forward_batched(g), 11)
        looped = timed(lambda g=gramians: [weighting(G) for G in g], 5)
        print(f"{m:>4} {batched:>23.3f} {looped:>20.3f}")


if __name__ == "__main__":
    main()
