"""Time aggregators on a large Jacobian and their weightings on small Gramians.

Single thread, median of repeated calls, CPU::

    python benchmarks/bench_aggregators.py [--m 32] [--n 1000000] [--repeats 11] [--memory]

Three tables:

* the floor ``J @ J.T`` + ``w @ J`` on an ``m x n`` float32 Jacobian, and each aggregator on it,
  as a time and a ratio to the floor (the target for ConFIG, TrimmedMean and GradDrop is 3x);
* each Gramian weighting on an ``m x m`` Gramian;
* CAGrad's weighting on small Gramians (target: 1 ms up to m = 8).

Times are wall-clock and process CPU (the CPU time is less sensitive to other processes sharing
the machine). With ``--memory``, each aggregator also runs once in a fresh subprocess that reports
the growth of its peak resident memory over the Jacobian itself (``ru_maxrss``), to compare with the
size of the Jacobian.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

from torchjd.aggregation import (
    IMTLG,
    AlignedMTL,
    AlignedMTLWeighting,
    CAGrad,
    CAGradWeighting,
    ConFIG,
    DualProj,
    DualProjWeighting,
    GradDrop,
    IMTLGWeighting,
    Krum,
    KrumWeighting,
    TrimmedMean,
)

AGGREGATORS: dict[str, Callable[[], torch.nn.Module]] = {
    "ConFIG": ConFIG,
    "TrimmedMean(1)": lambda: TrimmedMean(1),
    "TrimmedMean(2)": lambda: TrimmedMean(2),
    "TrimmedMean(4)": lambda: TrimmedMean(4),
    "GradDrop": GradDrop,
    "AlignedMTL": AlignedMTL,
    "CAGrad(0.5)": lambda: CAGrad(0.5),
    "DualProj": DualProj,
    "IMTLG": IMTLG,
    "Krum(1)": lambda: Krum(1),
}

WEIGHTINGS: dict[str, Callable[[], torch.nn.Module]] = {
    "AlignedMTLWeighting": AlignedMTLWeighting,
    "CAGradWeighting(0.5)": lambda: CAGradWeighting(0.5),
    "DualProjWeighting": DualProjWeighting,
    "IMTLGWeighting": IMTLGWeighting,
    "KrumWeighting(1)": lambda: KrumWeighting(1),
}

TARGET_RATIO = 3.0
CAGRAD_TARGET_MS = 1.0


def _median_ms(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Median wall-clock and process-CPU times of ``fn`` in milliseconds."""
    for _ in range(2):
        fn()
    wall, cpu = [], []
    for _ in range(repeats):
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - start_wall)
        cpu.append(time.process_time() - start_cpu)
    return 1e3 * statistics.median(wall), 1e3 * statistics.median(cpu)


def _jacobian(m: int, n: int) -> torch.Tensor:
    return torch.randn(m, n, generator=torch.Generator().manual_seed(0))


def _gramian(m: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(m)
    shared = torch.randn(1, 512, generator=generator, dtype=torch.float64)
    rows = torch.randn(m, 512, generator=generator, dtype=torch.float64) + 0.3 * shared
    return (rows @ rows.T).float()


def _peak_memory_mib(name: str, m: int, n: int) -> float:
    """Growth of the peak resident memory of a fresh process while it runs the aggregator once."""
    code = (
        "import json, resource, torch, sys\n"
        "sys.path.insert(0, 'benchmarks')\n"
        "from bench_aggregators import AGGREGATORS, _jacobian\n"
        "torch.set_num_threads(1)\n"
        f"J = _jacobian({m}, {n})\n"
        f"aggregator = AGGREGATORS[{name!r}]()\n"
        "aggregator(J[:, :1000])\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "aggregator(J)\n"
        "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print(json.dumps((after - before) / 1024))\n"
    )
    output = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    return float(json.loads(output.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", type=int, default=32)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--memory", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)

    J = _jacobian(args.m, args.n)
    w = torch.randn(args.m)
    gramian_ms = _median_ms(lambda: J @ J.T, args.repeats)
    combination_ms = _median_ms(lambda: w @ J, args.repeats)
    floor = tuple(a + b for a, b in zip(gramian_ms, combination_ms))
    size_mib = J.numel() * J.element_size() / 2**20
    print(f"Jacobian {args.m} x {args.n} float32 ({size_mib:.0f} MiB), 1 thread")
    print(f"{'':24}{'wall ms':>10}{'cpu ms':>10}{'x floor':>10}")
    print(f"{'J @ J.T':24}{gramian_ms[0]:10.1f}{gramian_ms[1]:10.1f}")
    print(f"{'w @ J':24}{combination_ms[0]:10.1f}{combination_ms[1]:10.1f}")
    print(f"{'floor':24}{floor[0]:10.1f}{floor[1]:10.1f}{1.0:10.2f}")
    with torch.no_grad():
        for name, make in AGGREGATORS.items():
            aggregator = make()
            wall, cpu = _median_ms(lambda a=aggregator: a(J), args.repeats)
            line = f"{name:24}{wall:10.1f}{cpu:10.1f}{cpu / floor[1]:10.2f}"
            if args.memory:
                line += f"   peak +{_peak_memory_mib(name, args.m, args.n):.0f} MiB"
            print(line)
    print(f"(target for ConFIG, TrimmedMean, GradDrop: <= {TARGET_RATIO:g} x floor)")

    G = _gramian(args.m)
    print(f"\nWeightings on a {args.m} x {args.m} Gramian")
    print(f"{'':24}{'wall ms':>10}{'cpu ms':>10}")
    for name, make in WEIGHTINGS.items():
        weighting = make()
        wall, cpu = _median_ms(lambda f=weighting: f(G), 5 * args.repeats)
        print(f"{name:24}{wall:10.3f}{cpu:10.3f}")

    print(
        f"\nCAGradWeighting(0.5) on small Gramians (target <= {CAGRAD_TARGET_MS:g} ms up to m = 8)"
    )
    print(f"{'m':>4}{'wall ms':>10}{'cpu ms':>10}")
    weighting = CAGradWeighting(0.5)
    for m in (2, 3, 4, 6, 8, 9, 12, 16):
        G = _gramian(m)
        wall, cpu = _median_ms(lambda G=G: weighting(G), 10 * args.repeats)
        print(f"{m:4}{wall:10.3f}{cpu:10.3f}")


if __name__ == "__main__":
    main()
