"""Time and memory of a multi-task step with MTLEngine (no Jacobian) against the autojac route.

Models: the 1.08M-parameter trunk of the spec README (``spec``) and the deep trunk
``Sequential(Linear(256, 512), ReLU, 12 x [Linear(512, 512), ReLU], Linear(512, 256), ReLU)``
(``deep``, 3.41M parameters), one ``Linear(256, 1)`` head per task, MSE losses, batch 64,
m = 2, 8, 32 tasks, UPGrad. Two ways of grouping:

- ``whole``: one aggregator for the whole trunk (``jac_to_grad(trunk.parameters(), UPGrad())``
  against ``MTLEngine.backward(losses, features, UPGrad())``);
- ``per-tensor``: ``GroupedAggregator(per_tensor(trunk), UPGrad)``, one group per parameter tensor.

Each step is forward + backward + aggregation (the ``.grad`` fields are then cleared). The
autojac route is ``mtl_backward`` + ``jac_to_grad`` (or ``GroupedAggregator.jac_to_grad``).

Speed: one thread, the four paths of one (trunk, m) taking turns in every repeat; median wall
time and median CPU time (the CPU time of a single-threaded step is what it costs, whatever else
runs on the machine). Memory: the peak resident memory of one step above the resident memory
before it, each path in a fresh subprocess, as ``bench_autogram.py`` measures it.

Usage: ``python benchmarks/bench_gramian_first.py [--repeats N] [--skip-memory] [--trunk deep]``.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
from _timing import single_thread
from bench_training_step import make_trunk
from torch import nn
from torch.nn.functional import mse_loss

from torchjd.aggregation import UPGrad
from torchjd.autogram import MTLEngine
from torchjd.autojac import jac_to_grad, mtl_backward
from torchjd.grouping import GroupedAggregator, per_tensor

TASKS = (2, 8, 32)
PATHS = ("autojac whole", "engine whole", "autojac per-tensor", "engine per-tensor")


def deep_trunk() -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(256, 512), nn.ReLU()]
    for _ in range(12):
        layers += [nn.Linear(512, 512), nn.ReLU()]
    layers += [nn.Linear(512, 256), nn.ReLU()]
    return nn.Sequential(*layers)


def make_step(trunk_name: str, m: int, path: str) -> Callable[[], None]:
    """One training step of ``path`` (without the optimiser: it is the same for every path)."""
    torch.manual_seed(0)
    trunk = deep_trunk() if trunk_name == "deep" else make_trunk()
    heads = nn.ModuleList(nn.Linear(256, 1) for _ in range(m))
    x, targets = torch.randn(64, 256), torch.randn(m, 64, 1)
    params = [*trunk.parameters(), *heads.parameters()]
    engine = MTLEngine(trunk) if path.startswith("engine") else None
    if path.endswith("per-tensor"):
        aggregator: UPGrad | GroupedAggregator = GroupedAggregator(per_tensor(trunk), UPGrad)
    else:
        aggregator = UPGrad()

    def step() -> None:
        features = trunk(x)
        losses = [mse_loss(head(features), t) for head, t in zip(heads, targets)]
        if engine is not None:
            engine.backward(losses, features, aggregator)
        else:
            mtl_backward(losses, features=features)
            if isinstance(aggregator, GroupedAggregator):
                aggregator.jac_to_grad()
            else:
                jac_to_grad(trunk.parameters(), aggregator)
        for p in params:
            p.grad = None

    return step


def _interleaved(
    fns: dict[str, Callable[[], None]], repeats: int
) -> dict[str, tuple[float, float]]:
    """Median wall and CPU ms of each function, the functions taking turns in every repeat."""
    for fn in fns.values():
        fn()
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            fn()
            cpu[key].append(1000 * (time.process_time() - start_cpu))
            wall[key].append(1000 * (time.perf_counter() - start_wall))
    return {k: (statistics.median(wall[k]), statistics.median(cpu[k])) for k in fns}


def bench_speed(trunks: list[str], repeats: int) -> None:
    print("Speed, one thread: median wall ms (median CPU ms); ratios on CPU time")
    print(
        f"{'trunk':<5} {'m':>3} "
        + " ".join(f"{p:>20}" for p in PATHS)
        + f" {'engine/autojac':>15} {'(per-tensor)':>13} {'per-tensor/whole':>17}"
    )
    for trunk_name in trunks:
        for m in TASKS:
            fns = {path: make_step(trunk_name, m, path) for path in PATHS}
            t = _interleaved(fns, repeats)
            cells = " ".join(f"{t[p][0]:9.1f} ({t[p][1]:7.1f})" for p in PATHS)
            whole = t["engine whole"][1] / t["autojac whole"][1]
            grouped = t["engine per-tensor"][1] / t["autojac per-tensor"][1]
            per_tensor_ratio = t["engine per-tensor"][1] / t["engine whole"][1]
            print(
                f"{trunk_name:<5} {m:>3} {cells} {whole:15.2f} {grouped:13.2f} "
                f"{per_tensor_ratio:17.2f}",
                flush=True,
            )


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not found in /proc/self/status")


def _memory_child(trunk_name: str, m: int, path: str) -> None:
    single_thread()
    step = make_step(trunk_name, m, path)
    step()  # one-time initialisations (kernels, the aggregator's state)

    def peak_of_one_step() -> int:
        base = _status_bytes("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the high-water mark VmHWM to the current resident size
        step()
        return _status_bytes("VmHWM") - base

    print(json.dumps({"steady": min(peak_of_one_step() for _ in range(3))}))


def bench_memory(trunks: list[str]) -> None:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    print(
        "Memory: peak resident memory of a step above the resident memory before it (MiB), "
        "fresh process for each path"
    )
    print(
        f"{'trunk':<5} {'m':>3} "
        + " ".join(f"{p:>19}" for p in PATHS)
        + f" {'engine/autojac':>15} {'(per-tensor)':>13}"
    )
    for trunk_name in trunks:
        for m in TASKS:
            peaks = {}
            for path in PATHS:
                out = subprocess.run(
                    [sys.executable, __file__, "--memory-child", trunk_name, str(m), path],
                    env=env,
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout
                peaks[path] = json.loads(out.strip().splitlines()[-1])["steady"] / 2**20
            cells = " ".join(f"{peaks[p]:19.1f}" for p in PATHS)
            whole = peaks["engine whole"] / peaks["autojac whole"]
            grouped = peaks["engine per-tensor"] / peaks["autojac per-tensor"]
            print(f"{trunk_name:<5} {m:>3} {cells} {whole:15.2f} {grouped:13.2f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--trunk", choices=["spec", "deep"], action="append")
    parser.add_argument("--memory-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        trunk_name, m, path = args.memory_child
        _memory_child(trunk_name, int(m), path)
        return
    trunks = args.trunk or ["spec", "deep"]
    if not args.skip_memory:
        bench_memory(trunks)
    if not args.skip_speed:
        single_thread()
        bench_speed(trunks, args.repeats)


if __name__ == "__main__":
    main()
