"""Check torchjd on a CUDA device: run the CUDA tests, then a short benchmark printed as one table.

Usage (through ``scripts/gpu-check.sh``, which forwards its arguments)::

    python benchmarks/gpu_check.py [--device cuda] [--quick] [--skip-tests] [--repeats N]
                                   [--output FILE]

Without a CUDA device (and ``--device cuda``, the default) it prints why and exits with 0, so the
script passes on any machine. ``--device cpu --quick`` runs every benchmark case on tiny sizes:
the test suite uses it to check the argument parsing and the layout of the table.

The benchmark (medians of ``--repeats`` calls after a warm-up, each call followed by
``torch.cuda.synchronize()``):

- the Gramian weightings of UPGrad, GradVac and NashMTL on ``m x m`` Gramians, ``m = 2 ... 128``;
- one multi-task step on the 1.08M-parameter trunk of the spec (``mtl_backward`` +
  ``jac_to_grad`` with UPGrad), m = 2 and 8, in float32 and under fp16 / bf16 autocast;
- one IWRM step with the autogram ``Engine`` on the IWRM MLP (batch 128), weights from
  ``UPGradWeighting``, and the plain step as its floor;
- the 12-block MLP with ``GroupedAggregator`` per tensor (76 groups), m = 2, and its whole-model
  step.

The table is Markdown, headed by the device name, the torch version and the date, ready to be
pasted into ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn.functional import cross_entropy, mse_loss

ROOT = Path(__file__).resolve().parent.parent
# The tests that need a CUDA device (each skips itself without one).
CUDA_TESTS = (
    "tests/aggregation/test_state_on_cuda.py",
    "tests/aggregation/test_sync_free_cuda.py",
    "tests/autogram/test_cuda.py",
    "tests/grouping/test_equivalence.py",
)
WEIGHTING_SIZES = (2, 8, 32, 128)
QUICK_WEIGHTING_SIZES = (2, 3)


@dataclass(frozen=True)
class Row:
    """One line of the table: what was timed, at which size, its median time in ms."""

    case: str
    size: str
    ms: float
    note: str = ""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="torch device (default: cuda)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a few repeats")
    parser.add_argument("--skip-tests", action="store_true", help="only the benchmark")
    parser.add_argument("--skip-bench", action="store_true", help="only the tests")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per case")
    parser.add_argument("--output", type=Path, default=None, help="also write the table here")
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 3 if args.quick else 30
    if args.repeats < 1:
        parser.error(f"--repeats must be a positive int, got {args.repeats}.")
    if not (args.device == "cpu" or args.device.startswith("cuda")):
        parser.error(f"--device must be cpu or cuda[:index], got {args.device!r}.")
    return args


def format_table(rows: Sequence[Row], device_name: str, date: str) -> str:
    """The Markdown table of ``rows``, headed by the device, the torch version and the date."""
    lines = [
        f"{device_name}, torch {torch.__version__}, {date}",
        "",
        "| case | size | median ms | note |",
        "|---|---|---:|---|",
    ]
    lines += [f"| {r.case} | {r.size} | {r.ms:.3f} | {r.note} |" for r in rows]
    return "\n".join(lines)


def median_ms(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(2):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _gramian(m: int, device: torch.device) -> Tensor:
    generator = torch.Generator().manual_seed(m)
    rows = torch.randn(m, 512, generator=generator) + 0.3 * torch.randn(1, 512, generator=generator)
    return (rows @ rows.T).to(device)


def weighting_cases(device: torch.device, quick: bool) -> list[tuple[str, str, Callable]]:
    from torchjd.aggregation import GradVacWeighting, NashMTL, UPGradWeighting

    cases = []
    for m in QUICK_WEIGHTING_SIZES if quick else WEIGHTING_SIZES:
        gramian = _gramian(m, device)
        for name, weighting in (
            ("UPGradWeighting", UPGradWeighting()),
            ("GradVacWeighting", GradVacWeighting()),
            ("NashMTL weighting", NashMTL(n_tasks=m).gramian_weighting),
        ):
            cases.append((name, f"m = {m}", lambda w=weighting, g=gramian: w(g)))
    return cases


def _trunk(quick: bool) -> nn.Module:
    widths = (16, 16, 8) if quick else (1024, 640, 256)
    encoder = nn.Sequential(nn.Linear(256, widths[0]), nn.ReLU(), nn.Linear(*widths[:2]), nn.ReLU())
    decoder = nn.Sequential(nn.Linear(*widths[1:]), nn.ReLU())
    return nn.Sequential(encoder, decoder)


def mtl_cases(device: torch.device, quick: bool) -> list[tuple[str, str, Callable]]:
    from torchjd.aggregation import UPGrad
    from torchjd.autojac import jac_to_grad, mtl_backward

    cases = []
    for m in (2,) if quick else (2, 8):
        torch.manual_seed(0)
        trunk = _trunk(quick).to(device)
        width = trunk[1][0].out_features
        heads = nn.ModuleList(nn.Linear(width, 1) for _ in range(m)).to(device)
        optimizer = torch.optim.SGD([*trunk.parameters(), *heads.parameters()], lr=1e-3)
        x = torch.randn(64, 256, device=device)
        targets = torch.randn(m, 64, 1, device=device)
        aggregator = UPGrad()
        autocast_dtypes: tuple[torch.dtype | None, ...] = (None,)
        if device.type == "cuda" or quick:
            autocast_dtypes = (None, torch.float16, torch.bfloat16)

        def step(dtype: torch.dtype | None, trunk=trunk, heads=heads, optimizer=optimizer,
                 x=x, targets=targets, aggregator=aggregator) -> None:  # fmt: skip
            enabled = dtype is not None
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=enabled):
                features = trunk(x)
                losses = [mse_loss(h(features).float(), t) for h, t in zip(heads, targets)]
            mtl_backward(losses, features=features)
            jac_to_grad(trunk.parameters(), aggregator)
            optimizer.step()
            optimizer.zero_grad()

        for dtype in autocast_dtypes:
            label = "float32" if dtype is None else f"autocast {str(dtype).split('.')[-1]}"
            cases.append((f"MTL step, UPGrad, {label}", f"m = {m}", lambda d=dtype, s=step: s(d)))
    return cases


def iwrm_cases(device: torch.device, quick: bool) -> list[tuple[str, str, Callable]]:
    from torchjd.aggregation import UPGradWeighting
    from torchjd.autogram import Engine

    torch.manual_seed(0)
    width = 16 if quick else 512
    batch = 8 if quick else 128
    model = nn.Sequential(
        nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10)
    ).to(device)
    hooked = copy.deepcopy(model)  # the engine hooks its own copy; the floor runs unhooked
    engine = Engine(hooked, batch_dim=0)
    weighting = UPGradWeighting()
    x = torch.randn(batch, 64, device=device)
    y = torch.randint(0, 10, (batch,), device=device)

    def plain() -> None:
        cross_entropy(model(x), y).backward()
        model.zero_grad(set_to_none=True)

    def autogram() -> None:
        losses = cross_entropy(hooked(x), y, reduction="none")
        losses.backward(weighting(engine.compute_gramian(losses)))
        hooked.zero_grad(set_to_none=True)

    size = f"batch {batch}"
    return [
        ("IWRM MLP, plain step (floor)", size, plain),
        ("IWRM MLP, autogram + UPGradWeighting", size, autogram),
    ]


class _Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fc2(torch.relu(self.fc1(self.norm(x))))


def grouping_cases(device: torch.device, quick: bool) -> list[tuple[str, str, Callable]]:
    from torchjd.aggregation import UPGrad
    from torchjd.autojac import jac_to_grad, mtl_backward
    from torchjd.grouping import GroupedAggregator, per_tensor

    torch.manual_seed(0)
    width = 8 if quick else 128
    trunk = nn.Sequential(
        nn.Linear(256, width), *(_Block(width) for _ in range(12)), nn.LayerNorm(width)
    ).to(device)
    m = 2
    heads = nn.ModuleList(nn.Linear(width, 1) for _ in range(m)).to(device)
    optimizer = torch.optim.SGD([*trunk.parameters(), *heads.parameters()], lr=1e-3)
    x = torch.randn(64, 256, device=device)
    targets = torch.randn(m, 64, 1, device=device)
    whole, grouped = UPGrad(), GroupedAggregator(per_tensor(trunk), UPGrad)

    def step(aggregate: Callable[[], object]) -> None:
        features = trunk(x)
        mtl_backward([mse_loss(h(features), t) for h, t in zip(heads, targets)], features=features)
        aggregate()
        optimizer.step()
        optimizer.zero_grad()

    def whole_model() -> None:
        jac_to_grad(trunk.parameters(), whole)

    size = f"m = {m}"
    return [
        ("12-block MLP, whole model", size, lambda: step(whole_model)),
        ("12-block MLP, GroupedAggregator per tensor", size, lambda: step(grouped.jac_to_grad)),
    ]


def run_benchmark(device: torch.device, quick: bool, repeats: int) -> list[Row]:
    rows = []
    for make in (weighting_cases, mtl_cases, iwrm_cases, grouping_cases):
        for case, size, fn in make(device, quick):
            try:
                rows.append(Row(case, size, median_ms(fn, repeats, device)))
            except Exception as error:  # one failing case must not hide the others
                rows.append(Row(case, size, float("nan"), f"failed: {type(error).__name__}"))
    return rows


def run_tests(device: torch.device) -> int:
    """Run the CUDA tests (they skip themselves without a CUDA device)."""
    if device.type != "cuda":
        print("CUDA tests: skipped (not a CUDA device).")
        return 0
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *CUDA_TESTS]
    return subprocess.call(command, cwd=ROOT)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("No CUDA device: skipping the GPU check.")
        return 0
    torch.set_num_threads(1)
    status = 0 if args.skip_tests else run_tests(device)
    if args.skip_bench:
        return status
    rows = run_benchmark(device, args.quick, args.repeats)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (1 thread)"
    table = format_table(rows, name, datetime.date.today().isoformat())
    print(table)
    if args.output is not None:
        args.output.write_text(table + "\n")
    if any(r.note.startswith("failed") for r in rows):
        status = status or 1
    return status


if __name__ == "__main__":
    sys.exit(main())
