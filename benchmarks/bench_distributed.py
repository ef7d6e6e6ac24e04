"""Communication per training step of torchjd.distributed, against plain DistributedDataParallel.

Two processes (gloo, CPU, one thread each) train with DistributedDataParallel:

- **MTL**: the 1.08M-parameter trunk of the spec README, one ``Linear(256, 1)`` head per task,
  batch 64 (32 per process), MSE losses, ``mtl_backward``; ``rows="mean"``; m = 2 and 8 tasks.
- **IWRM**: the MLP ``Linear(64,512), ReLU, Linear(512,512), ReLU, Linear(512,10)``, batch 32 (16
  per process), one cross-entropy per sample, ``backward``; ``rows="stack"`` (32 rows in all).

For each, the baseline is plain DDP (``sum(losses).backward()``, whose hooks all-reduce the
gradients), then ``torchjd.distributed.jac_to_grad`` with each strategy: ``update`` (Mean),
``gramian`` and ``jacobian`` (UPGrad). The table gives, per step and per process: the collectives
called, the bytes handed to them (the payload: the input of an all-reduce, reduce-scatter or
all-to-all, the output of an all-gather), the bytes each process sends with ring algorithms
(all-reduce of B bytes: 2B(R-1)/R; reduce-scatter and all-to-all of B: B(R-1)/R; all-gather of
B out: B(R-1)/R), the median time of the exchange and aggregation (``jac_to_grad``) and that of
a whole step (forward, backward, exchange, aggregation, SGD) on this machine.

Usage: ``python benchmarks/bench_distributed.py [--steps N]``.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _timing import single_thread
from torch import Tensor, nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.functional import cross_entropy, mse_loss
from torch.nn.parallel import DistributedDataParallel

from torchjd import distributed
from torchjd.aggregation import Mean, UPGrad
from torchjd.autojac import backward, mtl_backward

WORLD_SIZE = 2
_COLLECTIVES = {
    "all_reduce": "all_reduce",
    "all_gather_single": "all_gather",
    "all_gather_into_tensor": "all_gather",
    "reduce_scatter_single": "reduce_scatter",
    "reduce_scatter_tensor": "reduce_scatter",
    "all_to_all_single": "all_to_all",
}


class Recorder:
    """Records (collective, payload bytes) of the calls made through ``torch.distributed``."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []
        self.active = False
        for name, kind in _COLLECTIVES.items():
            original = getattr(dist, name, None)
            if original is not None:
                setattr(dist, name, self._wrap(kind, original))

    def _wrap(self, kind: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if self.active:
                # The payload: what goes in, except for all-gather, whose output is R times it.
                tensor = args[0] if kind in ("all_reduce", "all_gather") else args[1]
                self.calls.append((kind, tensor.numel() * tensor.element_size()))
            return original(*args, **kwargs)

        return wrapper


def ring_bytes(calls: list[tuple[str, int]], world_size: int) -> float:
    share = (world_size - 1) / world_size
    return sum(2 * share * b if kind == "all_reduce" else share * b for kind, b in calls)


class MTLNet(nn.Module):
    def __init__(self, n_tasks: int) -> None:
        super().__init__()
        encoder = nn.Sequential(nn.Linear(256, 1024), nn.ReLU(), nn.Linear(1024, 640), nn.ReLU())
        decoder = nn.Sequential(nn.Linear(640, 256), nn.ReLU())
        self.trunk = nn.Sequential(encoder, decoder)
        self.heads = nn.ModuleList(nn.Linear(256, 1) for _ in range(n_tasks))

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        features = self.trunk(x)
        return features, [head(features).squeeze(1) for head in self.heads]


def iwrm_model() -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)
    )


def run_case(
    problem: str, n_tasks: int, method: str, recorder: Recorder, steps: int
) -> dict[str, Any]:
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = MTLNet(n_tasks) if problem == "mtl" else iwrm_model()
    ddp = DistributedDataParallel(model)
    if method == "ddp":
        # DDP's default all-reduce, but through torch.distributed.all_reduce, which is recorded.
        ddp.register_comm_hook(None, allreduce_hook)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(rank)
    if problem == "mtl":
        x, y = torch.randn(32, 256, generator=generator), torch.randn(32, n_tasks)
    else:
        x, y = torch.randn(16, 64, generator=generator), torch.randint(0, 10, (16,))
    aggregator = Mean() if method == "update" else UPGrad()
    rows = "mean" if problem == "mtl" else "stack"

    def local_part() -> None:
        """Forward and (Jacobian) backward: everything before the exchange."""
        if problem == "mtl":
            features, outputs = ddp(x)
            losses = [mse_loss(out, y[:, i]) for i, out in enumerate(outputs)]
            if method == "ddp":
                sum(losses).backward()  # the all-reduce happens in DDP's hooks
            else:
                mtl_backward(losses, features=features)
        else:
            losses = cross_entropy(ddp(x), y, reduction="none")
            if method == "ddp":
                losses.mean().backward()
            else:
                backward(losses)

    def exchange_part() -> None:
        """The exchange and the aggregation (nothing left to do for plain DDP)."""
        if method == "ddp":
            return
        if problem == "mtl":
            distributed.jac_to_grad(
                model.trunk.parameters(),
                aggregator,
                grad_params=model.heads.parameters(),
                strategy=method,
            )
        else:
            distributed.jac_to_grad(model.parameters(), aggregator, rows=rows, strategy=method)

    def step() -> float:
        """One training step; returns the time of its exchange part."""
        local_part()
        dist.barrier()  # the exchange starts when both processes are ready
        start = time.perf_counter()
        exchange_part()
        elapsed = time.perf_counter() - start
        optimizer.step()
        optimizer.zero_grad()
        return elapsed

    for _ in range(2):
        step()
    recorder.calls, recorder.active = [], True
    step()
    recorder.active = False
    calls = recorder.calls
    times, exchange_times = [], []
    for _ in range(steps):
        dist.barrier()
        start = time.perf_counter()
        exchange_times.append(step())
        times.append(time.perf_counter() - start)
    return {
        "calls": calls,
        "ms": 1000 * statistics.median(times),
        "exchange_ms": 1000 * statistics.median(exchange_times),
    }


CASES = [
    ("mtl", 2, "ddp"),
    ("mtl", 2, "update"),
    ("mtl", 2, "gramian"),
    ("mtl", 2, "jacobian"),
    ("mtl", 8, "ddp"),
    ("mtl", 8, "update"),
    ("mtl", 8, "gramian"),
    ("mtl", 8, "jacobian"),
    ("iwrm", 32, "ddp"),
    ("iwrm", 32, "update"),
    ("iwrm", 32, "gramian"),
    ("iwrm", 32, "jacobian"),
]


def worker(rank: int, init_file: str, out_file: str, steps: int) -> None:
    single_thread()
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=timedelta(minutes=5),
    )
    try:
        recorder = Recorder()
        results = [run_case(problem, m, method, recorder, steps) for problem, m, method in CASES]
        if rank == 0:
            torch.save(results, out_file)
        dist.barrier()
    finally:
        gc.collect()  # free the DistributedDataParallel modules (in reference cycles) first
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        out_file = os.path.join(directory, "results.pt")
        mp.spawn(
            worker,
            args=(os.path.join(directory, "store"), out_file, args.steps),
            nprocs=WORLD_SIZE,
        )
        results = torch.load(out_file)

    print(f"{WORLD_SIZE} processes, gloo on CPU, one thread each; sizes per step and per process.")
    print()
    print(
        "| problem | rows m | exchange | collectives | payload | sent (ring) | vs DDP "
        "| exchange + aggregation | step |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    baseline = 0.0
    for (problem, m, method), result in zip(CASES, results):
        sent = ring_bytes(result["calls"], WORLD_SIZE)
        if method == "ddp":
            baseline = sent
        payload = sum(b for _, b in result["calls"])
        kinds = ", ".join(kind for kind, _ in result["calls"])
        label = "plain DDP (.backward())" if method == "ddp" else method
        exchange = "in backward" if method == "ddp" else f"{result['exchange_ms']:.1f} ms"
        print(
            f"| {problem} | {m} | {label} | {len(result['calls'])}: {kinds} | "
            f"{payload / 2**20:.2f} MiB | {sent / 2**20:.2f} MiB | {sent / baseline:.2f}x | "
            f"{exchange} | {result['ms']:.0f} ms |"
        )


if __name__ == "__main__":
    main()
