"""Speed and memory of the autogram Engine on instance-wise risk minimisation (IWRM) steps.

Models (see the spec README): the IWRM MLP ``Linear(64,512), ReLU, Linear(512,512), ReLU,
Linear(512,10)`` and the IWRM CNN ``Conv2d(3,16,3,p=1), ReLU, MaxPool2d(2), Conv2d(16,32,3,p=1),
ReLU, MaxPool2d(2), Flatten, Linear(2048,64), ReLU, Linear(64,10)`` on 3x32x32 inputs, with
per-sample cross-entropy losses.

Speed (one thread, median wall time), for batch 32 and 128:

- ``plain``: forward + ``losses.mean().backward()`` (the floor; ratios are relative to it);
- ``autogram``: forward + ``Engine.compute_gramian(losses)`` + weights from the Gramian +
  ``losses.backward(weights)`` (the weights are uniform, so that only the engine is measured);
- ``gramian``: forward + ``compute_gramian`` alone;
- ``autogram + UPGrad``: as ``autogram`` but with the weights of ``UPGradWeighting`` (the real
  IWRM step), and the ``m = batch`` UPGrad solve alone on a stored Gramian (its share of the step);
- ``autojac-style``: forward + the per-sample Jacobian ``[B, n]`` by a vectorised backward + its
  Gramian + ``J^T w`` (what storing the full Jacobian costs).

Memory, on the 1.08M-parameter trunk of the spec README with a ``Linear(256, 10)`` head, batch 64:
peak resident memory of one step above the resident memory before it, each path in a fresh
subprocess (Linux: the high-water mark ``VmHWM``, reset just before the step through
``/proc/self/clear_refs``, with a fixed malloc mmap threshold so that freed large blocks go back to
the system), plus the bytes of the Jacobian that the autojac-style path stores.

Usage: ``python benchmarks/bench_autogram.py [--repeats N] [--skip-memory]``.
"""

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
from _timing import single_thread
from torch import Tensor, nn
from torch.nn.functional import cross_entropy

from torchjd.aggregation import UPGradWeighting
from torchjd.autogram import Engine


def iwrm_mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)
    )


def iwrm_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2048, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


def million_mlp() -> nn.Module:
    encoder = nn.Sequential(nn.Linear(256, 1024), nn.ReLU(), nn.Linear(1024, 640), nn.ReLU())
    decoder = nn.Sequential(nn.Linear(640, 256), nn.ReLU())
    return nn.Sequential(encoder, decoder, nn.Linear(256, 10))


def _data(name: str, batch: int) -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(0)
    if name == "mlp":
        model, x = iwrm_mlp(), torch.randn(batch, 64)
    elif name == "cnn":
        model, x = iwrm_cnn(), torch.randn(batch, 3, 32, 32)
    else:
        model, x = million_mlp(), torch.randn(batch, 256)
    return model, x, torch.randint(0, 10, (batch,))


def _steps(model: nn.Module, x: Tensor, y: Tensor) -> dict[str, object]:
    """The step functions. The engine hooks its own copy of the model (it must exist before the
    forward passes, and the other paths run on an unhooked copy)."""
    hooked = copy.deepcopy(model)
    engine = Engine(hooked, batch_dim=0)
    params = list(model.parameters())

    def losses(net: nn.Module = model) -> Tensor:
        return cross_entropy(net(x), y, reduction="none")

    def plain() -> None:
        losses().mean().backward()
        model.zero_grad(set_to_none=True)

    def autogram() -> None:
        per_sample = losses(hooked)
        gramian = engine.compute_gramian(per_sample)
        weights = torch.full_like(gramian[0], 1.0 / gramian.shape[0])
        per_sample.backward(weights)
        hooked.zero_grad(set_to_none=True)

    def gramian_only() -> None:
        engine.compute_gramian(losses(hooked))

    weighting = UPGradWeighting()

    def autogram_upgrad() -> None:
        per_sample = losses(hooked)
        per_sample.backward(weighting(engine.compute_gramian(per_sample)))
        hooked.zero_grad(set_to_none=True)

    # The Gramian of this batch, computed once by an engine on a copy of the model (the engine
    # needs the graph of the hooked copy's outputs, so not under no_grad).
    replica = copy.deepcopy(model)
    stored_gramian = (
        Engine(replica, batch_dim=0)
        .compute_gramian(cross_entropy(replica(x), y, reduction="none"))
        .detach()
    )

    def autojac_style() -> None:
        per_sample = losses()
        eye = torch.eye(per_sample.shape[0])
        jacobians = torch.autograd.grad(per_sample, params, eye, is_grads_batched=True)
        matrices = [j.reshape(j.shape[0], -1) for j in jacobians]
        gramian = sum(m @ m.T for m in matrices)
        weights = torch.full_like(gramian[0], 1.0 / gramian.shape[0])
        for p, m in zip(params, matrices):
            p.grad = (weights @ m).reshape(p.shape)
        model.zero_grad(set_to_none=True)

    return {
        "plain": plain,
        "autogram": autogram,
        "gramian": gramian_only,
        "autogram + UPGrad": autogram_upgrad,
        "UPGrad solve": lambda: weighting(stored_gramian),
        "autojac-style": autojac_style,
        "engine": engine,
    }


def _interleaved_medians(
    fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 3
) -> dict[str, tuple[float, float]]:
    """Median wall time and median CPU time (ms) of each function, the functions taking turns in
    every repeat so that a change of load on a shared machine affects them alike (CPU time, with
    one thread, is what the step itself costs, whatever the other processes do)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    wall: dict[str, list[float]] = {key: [] for key in fns}
    cpu: dict[str, list[float]] = {key: [] for key in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            fn()
            cpu[key].append(time.process_time() - start_cpu)
            wall[key].append(time.perf_counter() - start_wall)
    return {
        key: (1000 * statistics.median(wall[key]), 1000 * statistics.median(cpu[key]))
        for key in fns
    }


def bench_speed(repeats: int) -> None:
    targets = {("mlp", 32): 5.0, ("mlp", 128): 8.0, ("cnn", 32): 3.0, ("cnn", 128): 4.0}
    print("Speed, one thread: median wall-clock ms (median CPU ms); ratio = autogram / plain")
    header = ["model", "batch", "plain", "autogram", "ratio", "target", "gramian", "autojac-style"]
    print(f"{header[0]:<5} {header[1]:>5} " + " ".join(f"{h:>17}" for h in header[2:]))
    for (name, batch), target in targets.items():
        model, x, y = _data(name, batch)
        steps = _steps(model, x, y)
        keys = ["plain", "autogram", "gramian", "autogram + UPGrad", "UPGrad solve"]
        times = _interleaved_medians({key: steps[key] for key in keys}, repeats)
        # The autojac-style path is 20-200 times slower: a few repeats are enough.
        times |= _interleaved_medians(
            {"autojac-style": steps["autojac-style"]}, max(3, repeats // 5), warmup=1
        )
        ratio = [times["autogram"][k] / times["plain"][k] for k in (0, 1)]
        cells = [
            *(f"{times[key][0]:8.2f} ({times[key][1]:6.2f})" for key in ("plain", "autogram")),
            f"{ratio[0]:8.2f} ({ratio[1]:6.2f})",
            f"{target:17.1f}",
            *(
                f"{times[key][0]:8.2f} ({times[key][1]:6.2f})"
                for key in ("gramian", "autojac-style")
            ),
        ]
        print(f"{name:<5} {batch:>5} " + " ".join(f"{c:>17}" for c in cells))
        upgrad, solve, plain = (times[k][0] for k in ("autogram + UPGrad", "UPGrad solve", "plain"))
        print(
            f"      with UPGradWeighting (the real weighting): {upgrad:.2f} ms = "
            f"{upgrad / plain:.2f} x plain; the m = {batch} solve alone {solve:.2f} ms "
            f"({solve / upgrad:.0%} of the step)"
        )


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not found in /proc/self/status")


def _memory_child(path: str) -> None:
    single_thread()
    model, x, y = _data("million", 64)
    step = _steps(model, x, y)[path]
    with torch.no_grad():
        model(x)  # load the kernels (no_grad: not recorded by the engine)

    def peak_of_one_step() -> int:
        base = _status_bytes("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the high-water mark VmHWM to the current resident size
        step()  # type: ignore[operator]
        return _status_bytes("VmHWM") - base

    first = peak_of_one_step()
    steady = min(peak_of_one_step() for _ in range(3))
    n_params = sum(p.numel() for p in model.parameters())
    print(json.dumps({"first": first, "steady": steady, "n_params": n_params}))


def bench_memory() -> None:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    print(
        "Memory of an IWRM step, 1.08M-parameter MLP, batch 64: peak resident memory above the "
        "resident memory before the step (MiB), first step (with one-time initialisations) and "
        "later steps, fresh process for each path"
    )
    results = {}
    for path in ("plain", "autogram", "autojac-style"):
        out = subprocess.run(
            [sys.executable, __file__, "--memory-child", path],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        results[path] = json.loads(out.strip().splitlines()[-1])
    n_params = results["plain"]["n_params"]
    print(f"  {'path':<14} {'first step':>10} {'later steps':>12}")
    for path, result in results.items():
        print(f"  {path:<14} {result['first'] / 2**20:10.1f} {result['steady'] / 2**20:12.1f}")
    print(
        f"  (the autojac-style Jacobian alone: 64 x {n_params} float32 = "
        f"{64 * n_params * 4 / 2**20:.1f} MiB; the gradients: {n_params * 4 / 2**20:.1f} MiB)\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        _memory_child(args.memory_child)
        return
    if not args.skip_memory:
        bench_memory()
    single_thread()
    bench_speed(args.repeats)


if __name__ == "__main__":
    main()
