"""Time GradNorm, DB-MTL, MoCo and Momentum ConFIG, and the M-ConFIG training step.

Single thread, median over interleaved repeats (each repeat calls every candidate once, in turn,
so that a slow period of a shared machine hits them all), stateful objects keeping their state
from call to call as in training. Two parts:

1. Cost per call on a float32 Jacobian ``J`` of shape ``[m, 10^6]``, ``m`` in {8, 32}, against the
   floor ``J @ J.T`` + ``w @ J`` measured in the same run (the two products any Gramian-based
   aggregation does). GradNorm and DB-MTL receive their losses with ``update_losses`` before each
   call. ``MConFIGBackward direction`` is the part of an M-ConFIG step after the backward pass:
   one momentum row updated, its Gramian row, the ConFIG weights and ``w @ M``.
2. The M-ConFIG training step (``MConFIGBackward.backward`` + SGD) on the 1.08M-parameter trunk
   of ``bench_training_step.py`` (batch 64, one ``Linear(256, 1)`` head per task, MSE) at
   ``m = 8``, against the plain ``sum(losses).backward()`` step (+ SGD) on the same model. The
   target is a ratio of at most 1.2. The M-ConFIG overhead (two passes over the ``[m, n]``
   momenta, memory-bound) does not grow with the batch: the step is also timed at batch 256.

Usage: ``python benchmarks/bench_new_methods.py [--repeats N] [--device cpu|cuda]``.
"""

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from _timing import single_thread
from bench_training_step import make_trunk
from torch import nn
from torch.nn.functional import mse_loss

from torchjd.aggregation import DBMTL, GradNorm, MConFIGBackward, MoCo, MomentumConFIG

N_COLUMNS = 1_000_000


def _synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_medians(
    cases: dict[str, Callable[[], object]], repeats: int, device: torch.device, warmup: int = 2
) -> dict[str, float]:
    """Median wall time (ms) of each case, the cases called in turn at every repeat."""
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            _synchronise(device)
            start = time.perf_counter()
            fn()
            _synchronise(device)
            times[name].append(time.perf_counter() - start)
    return {name: 1000 * statistics.median(values) for name, values in times.items()}


def aggregator_cases(m: int, device: torch.device) -> dict[str, Callable[[], object]]:
    generator = torch.Generator().manual_seed(m)
    matrix = torch.randn(m, N_COLUMNS, generator=generator).to(device)
    losses = (torch.rand(m, generator=generator) + 0.5).to(device)
    weights = torch.ones(m, device=device)
    gradnorm, db_mtl, moco, momentum_config = GradNorm(), DBMTL(), MoCo(), MomentumConFIG()

    def floor() -> None:
        _ = matrix @ matrix.T
        _ = weights @ matrix

    def with_losses(aggregator: GradNorm | DBMTL) -> Callable[[], object]:
        def call() -> object:
            aggregator.update_losses(losses)
            return aggregator(matrix)

        return call

    # The part of an M-ConFIG step after its backward pass, on a [m, 10^6] state.
    parameter = torch.zeros(N_COLUMNS, device=device, requires_grad=True)
    step = MConFIGBackward([parameter])
    step.aggregator._prepare_state(m, N_COLUMNS, torch.float32, device)
    gradient = [torch.randn(N_COLUMNS, generator=generator).to(device)]
    for i in range(m):
        step.aggregator._update_row(i, gradient, step._slices)

    def config_direction() -> None:
        with torch.no_grad():
            step.aggregator._update_row(0, gradient, step._slices)
            step.aggregator._direction()

    return {
        "J @ J.T + w @ J (floor)": floor,
        "GradNorm()": with_losses(gradnorm),
        "DBMTL()": with_losses(db_mtl),
        "MoCo()": lambda: moco(matrix),
        "MomentumConFIG()": lambda: momentum_config(matrix),
        "MConFIGBackward direction": config_direction,
    }


def training_step_cases(
    m: int, batch: int, device: torch.device
) -> dict[str, Callable[[], object]]:
    torch.manual_seed(0)
    trunk = make_trunk().to(device)
    heads = nn.ModuleList(nn.Linear(256, 1) for _ in range(m)).to(device)
    params = [*trunk.parameters(), *heads.parameters()]
    optimizer = torch.optim.SGD(params, lr=1e-3)
    x = torch.randn(batch, 256, device=device)
    targets = torch.randn(m, batch, 1, device=device)
    step = MConFIGBackward(params)

    def losses() -> list[torch.Tensor]:
        features = trunk(x)
        return [mse_loss(head(features), t) for head, t in zip(heads, targets)]

    def plain() -> None:
        sum(losses()).backward()
        optimizer.step()
        optimizer.zero_grad()

    def m_config() -> None:
        step.backward(losses())
        optimizer.step()
        optimizer.zero_grad()

    return {"sum(losses).backward() step (floor)": plain, "MConFIGBackward step": m_config}


def _report(title: str, medians: dict[str, float]) -> None:
    floor = next(iter(medians.values()))
    print(f"\n{title}")
    for name, ms in medians.items():
        print(f"  {name:<38} {ms:9.2f} ms   {ms / floor:5.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    single_thread()
    print(f"Device {device}, single thread, median of {args.repeats} interleaved runs")
    for m in (8, 32):
        medians = interleaved_medians(aggregator_cases(m, device), args.repeats, device)
        _report(f"Per call on a [{m}, {N_COLUMNS:,}] float32 Jacobian", medians)
    n = sum(p.numel() for p in make_trunk().parameters())
    for batch in (64, 256):
        cases = training_step_cases(8, batch, device)
        medians = interleaved_medians(cases, 3 * args.repeats, device)
        _report(f"Training step, trunk of {n:,} parameters, m = 8, batch {batch}", medians)


if __name__ == "__main__":
    main()
