"""Time the weightings of CRMOGM, ExcessMTL, FairGrad, MoDo, NashMTL, PCD and SDMGrad.

Single thread, median over repeats (stateful objects keep their state from call to call, as in
training). Inputs, float32 on CPU, from a random Jacobian ``J`` of shape ``[m, 1024]``:

- Gramian weightings (FairGrad, PCD, NashMTL's weighting, CRMOGM around them) on ``J J^T`` with
  ``m = 32``;
- cross-batch weightings (MoDo, SDMGrad) on ``J1 J2^T`` with ``m = 32``;
- ExcessMTL's matrix weighting on ``J`` itself (``m = 32``);
- the targets: ``NashMTL(8)`` (weighting on an 8x8 Gramian, and the aggregator on ``[8, 1024]``)
  and ``FairGradWeighting(1)`` on a 128x128 Gramian.

Usage: ``python benchmarks/bench_stateful_aggregators.py [--repeats N]``.
"""

import argparse
from collections.abc import Callable

import torch
from _timing import median_ms, single_thread

from torchjd.aggregation import (
    CRMOGMWeighting,
    ExcessMTLWeighting,
    FairGradWeighting,
    MoDoWeighting,
    NashMTL,
    PCDWeighting,
    SDMGradWeighting,
)

N_COLUMNS = 1024


def _jacobian(m: int, seed: int) -> torch.Tensor:
    return torch.randn(m, N_COLUMNS, generator=torch.Generator().manual_seed(seed))


def cases() -> list[tuple[str, Callable[[], object]]]:
    j1, j2 = _jacobian(32, 0), _jacobian(32, 1)
    gramian, cross = j1 @ j1.T, j1 @ j2.T
    j8 = _jacobian(8, 2)
    gramian8 = j8 @ j8.T
    j128 = _jacobian(128, 3)
    gramian128 = j128 @ j128.T

    crmogm_fairgrad = CRMOGMWeighting(FairGradWeighting(1.0))
    crmogm_modo = CRMOGMWeighting(MoDoWeighting())
    excess = ExcessMTLWeighting()
    fairgrad = FairGradWeighting(1.0)
    fairgrad_small_alpha = FairGradWeighting(0.1)
    modo = MoDoWeighting()
    pcd = PCDWeighting()
    sdmgrad = SDMGradWeighting()
    nash = NashMTL(n_tasks=8)
    nash_weighting = NashMTL(n_tasks=8).gramian_weighting
    nash32 = NashMTL(n_tasks=32).gramian_weighting
    fairgrad128 = FairGradWeighting(1.0)
    fairgrad128_2 = FairGradWeighting(2.0)

    return [
        ("CRMOGMWeighting(FairGradWeighting(1)) on G (32x32)", lambda: crmogm_fairgrad(gramian)),
        ("CRMOGMWeighting(MoDoWeighting()) on J1 J2^T (32x32)", lambda: crmogm_modo(cross)),
        ("ExcessMTLWeighting() on J (32x1024)", lambda: excess(j1)),
        ("FairGradWeighting(1) on G (32x32)", lambda: fairgrad(gramian)),
        ("FairGradWeighting(0.1) on G (32x32)", lambda: fairgrad_small_alpha(gramian)),
        ("MoDoWeighting() on J1 J2^T (32x32)", lambda: modo(cross)),
        ("NashMTL weighting on G (32x32)", lambda: nash32(gramian)),
        ("PCDWeighting() on G (32x32)", lambda: pcd(gramian)),
        ("SDMGradWeighting() on J1 J2^T (32x32)", lambda: sdmgrad(cross)),
        ("target: NashMTL weighting on G (8x8)", lambda: nash_weighting(gramian8)),
        ("target: NashMTL(8) on J (8x1024)", lambda: nash(j8)),
        ("target: FairGradWeighting(1) on G (128x128)", lambda: fairgrad128(gramian128)),
        ("target: FairGradWeighting(2) on G (128x128)", lambda: fairgrad128_2(gramian128)),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=51)
    args = parser.parse_args()
    single_thread()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    for name, fn in cases():
        print(f"{name:<55} {median_ms(fn, repeats=args.repeats):8.3f} ms")


if __name__ == "__main__":
    main()
