"""Speed and memory of the autogram Engine on instance-wise risk minimisation (IWRM) steps.

Models (see the spec README): the IWRM MLP ``Linear(64,512), ReLU, Linear(512,512), ReLU,
Linear(512,10)`` and the IWRM CNN ``Conv2d(3,16,3,p=1), ReLU, MaxPool2d(2), Conv2d(16,32,3,p=1),
ReLU, MaxPool2d(2), Flatten, Linear(2048,64), ReLU, Linear(64,10)`` on 3x32x32 inputs, with
per-sample cross-entropy losses.

Speed (one thread, medians of interleaved repeats, process CPU time), for batch 32 and 128, each
step taking the next of a few different batches in turn (as in training, no two consecutive
Gramians are equal):

- ``plain``: forward + ``losses.mean().backward()`` (the floor; ratios are relative to it);
- ``UPGrad step``: the real IWRM step, forward + ``Engine.compute_gramian(losses)`` + the weights
  of ``UPGradWeighting`` on the ``m = batch`` Gramian + ``losses.backward(weights)``;
- ``solve``: ``UPGradWeighting`` alone on the stored Gramians of the same batches (its share of the
  UPGrad step is reported);
- ``uniform``: the same step with uniform weights instead (the engine alone), and ``gramian``:
  forward + ``compute_gramian``;
- ``autojac-style``: forward + the per-sample Jacobian ``[B, n]`` by a vectorised backward + its
  Gramian + ``J^T w`` (what storing the full Jacobian costs).

With ``--solve-profile``, where the time of the ``m = 128`` solve goes: the operators that take it
(torch profiler, grouped into factorisations, gathers, matrix products, dtype conversions and host
reads) and the number of batched factorisations (one per pivoting iteration, plus the shared
inverse) and of host reads per call.

Memory, on the 1.08M-parameter trunk of the spec README with a ``Linear(256, 10)`` head, batch 64:
peak resident memory of one step above the resident memory before it, each path in a fresh
subprocess (Linux: the high-water mark ``VmHWM``, reset just before the step through
``/proc/self/clear_refs``, with a fixed malloc mmap threshold so that freed large blocks go back to
the system), plus the bytes of the Jacobian that the autojac-style path stores.

Usage: ``python benchmarks/bench_autogram.py [--repeats N] [--skip-memory] [--solve-profile]``.
"""

import argparse
import copy
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import TypeVar

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


Batch = tuple[Tensor, Tensor]
T = TypeVar("T")


def _data(name: str, batch: int, n_batches: int = 1) -> tuple[nn.Module, list[Batch]]:
    """The model and ``n_batches`` different batches of inputs and targets (seeded)."""
    torch.manual_seed(0)
    if name == "mlp":
        model, shape = iwrm_mlp(), (batch, 64)
    elif name == "cnn":
        model, shape = iwrm_cnn(), (batch, 3, 32, 32)
    else:
        model, shape = million_mlp(), (batch, 256)
    batches = [(torch.randn(shape), torch.randint(0, 10, (batch,))) for _ in range(n_batches)]
    return model, batches


def _cycling(items: list[T]) -> Callable[[], T]:
    """A function returning the items in turn."""
    iterator = itertools.cycle(items)
    return lambda: next(iterator)


def _steps(model: nn.Module, batches: list[Batch]) -> dict[str, Callable[[], object]]:
    """The step functions, each taking the next batch at every call. The engine hooks its own copy
    of the model (it must exist before the forward passes, and the other paths run on an unhooked
    copy)."""
    hooked = copy.deepcopy(model)
    engine = Engine(hooked, batch_dim=0)
    params = list(model.parameters())
    keys = ("plain", "uniform", "gramian", "upgrad", "jac")
    next_batch = {key: _cycling(batches) for key in keys}

    def losses(key: str, net: nn.Module = model) -> Tensor:
        x, y = next_batch[key]()
        return cross_entropy(net(x), y, reduction="none")

    def plain() -> None:
        losses("plain").mean().backward()
        model.zero_grad(set_to_none=True)

    def uniform() -> None:
        per_sample = losses("uniform", hooked)
        gramian = engine.compute_gramian(per_sample)
        weights = torch.full_like(gramian[0], 1.0 / gramian.shape[0])
        per_sample.backward(weights)
        hooked.zero_grad(set_to_none=True)

    def gramian_only() -> None:
        engine.compute_gramian(losses("gramian", hooked))

    weighting = UPGradWeighting()

    def upgrad_step() -> None:
        per_sample = losses("upgrad", hooked)
        per_sample.backward(weighting(engine.compute_gramian(per_sample)))
        hooked.zero_grad(set_to_none=True)

    next_gramian = _cycling(_gramians(model, batches))

    def autojac_style() -> None:
        per_sample = losses("jac")
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
        "UPGrad step": upgrad_step,
        "solve": lambda: weighting(next_gramian()),
        "uniform": uniform,
        "gramian": gramian_only,
        "autojac-style": autojac_style,
    }


def _gramians(model: nn.Module, batches: list[Batch]) -> list[Tensor]:
    """The Gramians of the per-sample losses of each batch, computed by an engine on a copy of the
    model (the engine needs the graph of the hooked copy's outputs, so not under no_grad)."""
    replica = copy.deepcopy(model)
    engine = Engine(replica, batch_dim=0)
    return [
        engine.compute_gramian(cross_entropy(replica(x), y, reduction="none")).detach()
        for x, y in batches
    ]


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


# Targets: the UPGrad step at most this many plain steps, the solve at most this share of it
# (IWRM MLP, batch 128), and the uniform-weight step at most this many plain steps.
_STEP_TARGET = 10.0
_SHARE_TARGET = 0.25
_UNIFORM_TARGETS = {("mlp", 32): 5.0, ("mlp", 128): 8.0, ("cnn", 32): 3.0, ("cnn", 128): 4.0}
# Different batches each step function cycles through.
_N_BATCHES = 4


def bench_speed(repeats: int) -> None:
    print(
        "Speed, one thread: median CPU ms (median wall ms in brackets), each step on the next of "
        f"{_N_BATCHES} batches; targets for the UPGrad step: <= {_STEP_TARGET:g} x plain, the "
        f"solve <= {_SHARE_TARGET:.0%} of it (MLP, batch 128)"
    )
    header = ["model", "batch", "plain", "UPGrad step", "x plain", "solve", "share", "uniform"]
    header += ["x plain", "target", "gramian", "autojac-style"]
    widths = [5, 5, 16, 16, 7, 16, 6, 16, 7, 6, 16, 18]
    print(" ".join(f"{h:>{w}}" for h, w in zip(header, widths)))
    for (name, batch), target in _UNIFORM_TARGETS.items():
        model, batches = _data(name, batch, _N_BATCHES)
        steps = _steps(model, batches)
        keys = ["plain", "UPGrad step", "solve", "uniform", "gramian"]
        times = _interleaved_medians({key: steps[key] for key in keys}, repeats)
        # The autojac-style path is 20-200 times slower: a few repeats are enough.
        times |= _interleaved_medians(
            {"autojac-style": steps["autojac-style"]}, max(3, repeats // 5), warmup=1
        )
        cpu = {key: value[1] for key, value in times.items()}
        cell = {key: f"{value[1]:7.2f} ({value[0]:6.2f})" for key, value in times.items()}

        cells = [
            name,
            str(batch),
            cell["plain"],
            cell["UPGrad step"],
            f"{cpu['UPGrad step'] / cpu['plain']:.2f}",
            cell["solve"],
            f"{cpu['solve'] / cpu['UPGrad step']:.0%}",
            cell["uniform"],
            f"{cpu['uniform'] / cpu['plain']:.2f}",
            f"{target:.1f}",
            cell["gramian"],
            cell["autojac-style"],
        ]
        print(" ".join(f"{c:>{w}}" for c, w in zip(cells, widths)))


# Profiler operators by kind, for the breakdown of the solve (the rest is "other").
_KINDS = {
    "factorisations and triangular solves": (
        "cholesky",
        "solve_triangular",
        "linalg_inv",
        "lu",
        "potr",
        "trsm",
        "tril",
    ),
    "matrix products": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"),
    "gathers, scatters, sorts, masks": (
        "index",
        "gather",
        "scatter",
        "sort",
        "where",
        "masked",
        "nonzero",
        "cumsum",
    ),
    "dtype conversions": ("aten::_to_copy", "aten::copy_"),
    "host reads": ("aten::item", "aten::_local_scalar_dense", "aten::is_nonzero"),
}
# Tensor methods that read values on the host (a synchronisation on a GPU), and nonzero, whose
# output size the host must know.
_READS = ("tolist", "item", "__bool__", "__int__", "__float__", "nonzero")


def _count_reads(fn: Callable[[], object]) -> dict[str, int]:
    """How many times ``fn()`` calls each method of ``_READS`` on a tensor."""
    counts = dict.fromkeys(_READS, 0)
    originals = {name: getattr(torch.Tensor, name) for name in _READS}

    def counting(name: str) -> Callable[..., object]:
        def method(self: Tensor, *args: object, **kwargs: object) -> object:
            counts[name] += 1
            return originals[name](self, *args, **kwargs)

        return method

    try:
        for name in _READS:
            setattr(torch.Tensor, name, counting(name))
        fn()
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
    return counts


def bench_solve_profile(repeats: int) -> None:
    """Where the time of UPGradWeighting on the m = 128 Gramians goes (self CPU time per call)."""
    from torch.profiler import ProfilerActivity, profile

    weighting = UPGradWeighting()
    for name in ("mlp", "cnn"):
        model, batches = _data(name, 128, _N_BATCHES)
        gramians = _gramians(model, batches)
        for gramian in gramians:
            weighting(gramian)
        calls = repeats * len(gramians)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(repeats):
                for gramian in gramians:
                    weighting(gramian)
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events) / calls / 1000
        by_kind = dict.fromkeys([*_KINDS, "other"], 0.0)
        factorisations = 0
        for event in events:
            kind = next(
                (k for k, names in _KINDS.items() if any(n in event.key for n in names)), "other"
            )
            by_kind[kind] += event.self_cpu_time_total / calls / 1000
            if event.key == "aten::linalg_cholesky_ex":
                factorisations += event.count
        reads = _count_reads(lambda: [weighting(gramian) for gramian in gramians])  # noqa: B023
        n_nonzero = reads.pop("nonzero") / len(gramians)
        print(
            f"UPGradWeighting, IWRM {name.upper()} Gramian, m = 128: {total:.2f} ms of operators "
            f"per call; {factorisations / calls:.1f} batched factorisations, "
            f"{sum(reads.values()) / len(gramians):.1f} host reads and {n_nonzero:.1f} nonzero "
            "per call"
        )
        for kind, ms in sorted(by_kind.items(), key=lambda item: -item[1]):
            print(f"  {kind:<38} {ms:6.2f} ms ({ms / total:.0%})")
        top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:8]
        print(
            "  top operators: "
            + ", ".join(
                f"{e.key} {e.self_cpu_time_total / calls / 1000:.2f} ms ({e.count / calls:g}x)"
                for e in top
            )
        )


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not found in /proc/self/status")


def _memory_child(path: str) -> None:
    single_thread()
    model, batches = _data("million", 64)
    step = _steps(model, batches)[path]
    with torch.no_grad():
        model(batches[0][0])  # load the kernels (no_grad: not recorded by the engine)

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
    for path in ("plain", "uniform", "autojac-style"):
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
        label = "autogram" if path == "uniform" else path
        print(f"  {label:<14} {result['first'] / 2**20:10.1f} {result['steady'] / 2**20:12.1f}")
    print(
        f"  (the autojac-style Jacobian alone: 64 x {n_params} float32 = "
        f"{64 * n_params * 4 / 2**20:.1f} MiB; the gradients: {n_params * 4 / 2**20:.1f} MiB)\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument(
        "--solve-profile", action="store_true", help="also break down the time of the m = 128 solve"
    )
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        _memory_child(args.memory_child)
        return
    if not args.skip_memory:
        bench_memory()
    single_thread()
    bench_speed(args.repeats)
    if args.solve_profile:
        bench_solve_profile(max(3, args.repeats // 4))


if __name__ == "__main__":
    main()
