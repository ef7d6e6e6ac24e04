"""Time this project against TorchJD 0.18.0, side by side, on the same torch build.

Usage::

    python benchmarks/compare_torchjd.py [--rounds 5] [--venv /tmp/torchjd-0.18-venv]
                                         [--only SUBSTRING ...] [--write-readme]

``--write-readme`` (with every case, i.e. without ``--only``) replaces the block between the
markers ``<!-- compare-torchjd:begin -->`` and ``<!-- compare-torchjd:end -->`` of
``benchmarks/README.md`` with the table, the date, the torch version and a note on the machine.

TorchJD 0.18.0 is never installed in the project's environment: the script creates (once) a
throw-away virtual environment **outside the repository** (``--venv``, default
``/tmp/torchjd-0.18-venv``), installs ``torchjd==0.18.0`` into it without dependencies, and
then lets it see the site-packages of the interpreter running this script through a ``.pth``
file, so that both libraries run on the very same torch build (``torch==2.13.0``; the script
refuses another version) and optional solvers (quadprog, cvxpy). Our side runs with
``PYTHONPATH=src``.

Each library is timed in its own subprocess (``--worker``), one thread, and the two alternate
over ``--rounds`` interleaved rounds (the order flips every round); each subprocess reports the
median of its repeated calls per case and the table shows, per case, the median over the rounds
of each library and the ratio of these medians. The machine these numbers come from is shared and
noisy: the interleaving and the medians are there for that, and small ratios differences (a few
percent) are within noise.

Cases: the rows of the performance table of the project (weightings on ``m x m`` Gramians,
aggregators on ``[m, n]`` matrices, and the floor ``J J^T`` + ``w^T J`` for the largest ones), and
the grouping loop of the spec (one ``jac_to_grad`` call per group, one aggregator instance per
group) on the 12-block MLP, per layer and per tensor, next to the whole-model step; for those the
table also gives each library's loop / whole-model ratio.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any  # torch is imported by the workers only

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
README = HERE / "README.md"
BEGIN_MARK = "<!-- compare-torchjd:begin -->"
END_MARK = "<!-- compare-torchjd:end -->"
DEFAULT_VENV = Path("/tmp/torchjd-0.18-venv")
TORCH_VERSION = "2.13.0"
TORCHJD_VERSION = "0.18.0"


# --------------------------------------------------------------------------------------------
# Cases (run inside a worker, against whichever ``torchjd`` the worker imports)
# --------------------------------------------------------------------------------------------


def _matrix(m: int, n: int) -> Any:
    """A fixed ``[m, n]`` matrix: Gaussian rows plus a shared component (correlated tasks)."""
    import torch

    generator = torch.Generator().manual_seed(1000 * m + n % 997)
    shared = torch.randn(1, n, generator=generator)
    return torch.randn(m, n, generator=generator) + 0.3 * shared


def _gramian(m: int) -> Any:
    J = _matrix(m, 512)
    return J @ J.T


def _weighting_case(name: str, m: int) -> tuple[Callable[[], object], int]:
    import torchjd.aggregation as agg

    weighting = getattr(agg, name)()
    G = _gramian(m)
    return (lambda: weighting(G)), 50


def _aggregator_case(name: str, m: int, n: int) -> tuple[Callable[[], object], int]:
    import torchjd.aggregation as agg

    aggregator = agg.CAGrad(c=0.5) if name == "CAGrad" else getattr(agg, name)()
    J = _matrix(m, n)
    return (lambda: aggregator(J)), (40 if n <= 10**4 else 9)


def _floor_case(m: int, n: int) -> tuple[Callable[[], object], int]:
    """``J J^T`` and ``w^T J``: what every Gramian-based aggregator computes at least."""
    import torch

    J = _matrix(m, n)
    w = torch.full((m,), 1.0 / m)
    return (lambda: (J @ J.T, w @ J)), 9


def _grouping_case(aggregator: str, m: int, strategy: str) -> tuple[Callable[[], object], int]:
    """One multi-task step on the 12-block MLP of the spec; the aggregation is one
    ``jac_to_grad`` call on all the parameters ("whole"), or the spec's loop of calls, one per
    layer or per tensor, each group with its own aggregator instance."""
    import torch
    from torch import nn
    from torch.nn.functional import mse_loss

    import torchjd.aggregation as agg
    from torchjd.autojac import jac_to_grad, mtl_backward

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.LayerNorm(128)
            self.fc1 = nn.Linear(128, 128)
            self.fc2 = nn.Linear(128, 128)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.fc2(torch.relu(self.fc1(self.norm(x))))

    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(256, 128), *(Block() for _ in range(12)), nn.LayerNorm(128))
    heads = nn.ModuleList(nn.Linear(128, 1) for _ in range(m))
    optimizer = torch.optim.SGD([*trunk.parameters(), *heads.parameters()], lr=1e-3)
    x = torch.randn(64, 256)
    targets = torch.randn(m, 64, 1)
    if strategy == "whole":
        groups = [list(trunk.parameters())]
    elif strategy == "per layer":
        layers = [mod for mod in trunk.modules() if list(mod.parameters(recurse=False))]
        groups = [list(mod.parameters(recurse=False)) for mod in layers]
    else:
        groups = [[p] for p in trunk.parameters()]
    aggregators = [getattr(agg, aggregator)() for _ in groups]

    def step() -> None:
        features = trunk(x)
        losses = [mse_loss(head(features), t) for head, t in zip(heads, targets)]
        mtl_backward(losses, features=features)
        for group, group_aggregator in zip(groups, aggregators):
            jac_to_grad(group, group_aggregator)
        optimizer.step()
        optimizer.zero_grad()

    return step, 15


def cases() -> dict[str, Callable[[], tuple[Callable[[], object], int]]]:
    """Every case by name: a factory returning the function to time and its number of calls."""
    table: dict[str, Callable[[], tuple[Callable[[], object], int]]] = {}
    for m in (2, 8, 32):
        table[f"`MGDAWeighting`, m = {m}"] = lambda m=m: _weighting_case("MGDAWeighting", m)
        table[f"`DualProjWeighting`, m = {m}"] = lambda m=m: _weighting_case("DualProjWeighting", m)
    table["`IMTLGWeighting`, m = 32"] = lambda: _weighting_case("IMTLGWeighting", 32)
    for name in ("MGDA", "UPGrad", "PCGrad", "GradVac"):
        table[f"`{name}()(J)`, m = 2, n = 1e4"] = lambda name=name: _aggregator_case(name, 2, 10**4)
    for name, m in (("GradVac", 2), ("PCGrad", 8), ("IMTLG", 2), ("CAGrad", 32)):
        table[f"`{name}()(J)`, m = {m}, n = 1e6"] = lambda n=name, m=m: _aggregator_case(
            n, m, 10**6
        )
        table[f"floor `J Jᵀ + wᵀJ`, m = {m}, n = 1e6"] = lambda m=m: _floor_case(m, 10**6)
    for aggregator in ("UPGrad", "GradVac"):
        for m in (2, 8):
            for strategy in ("whole", "per layer", "per tensor"):
                key = f"12-block MLP step, {aggregator}, m = {m}, {strategy}"
                table[key] = lambda a=aggregator, m=m, s=strategy: _grouping_case(a, m, s)
    return table


def run_worker(names: list[str]) -> dict[str, tuple[float, float]]:
    """Median CPU time and median wall time in ms of every named case (in this process, one
    thread)."""
    import torch

    torch.set_num_threads(1)
    factories = cases()
    results = {}
    for name in names:
        fn, repeats = factories[name]()
        for _ in range(3):
            fn()
        wall, cpu = [], []
        for _ in range(repeats):
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            fn()
            cpu.append(time.process_time() - start_cpu)
            wall.append(time.perf_counter() - start_wall)
        results[name] = (1e3 * statistics.median(cpu), 1e3 * statistics.median(wall))
    return results


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def _venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def ensure_reference_venv(venv: Path) -> Path:
    """Create the throw-away environment holding TorchJD 0.18.0 (once) and return its python."""
    if venv.resolve().is_relative_to(ROOT):
        raise ValueError(f"`--venv` must be outside the repository, got {venv}.")
    python = _venv_python(venv)
    if not python.exists():
        subprocess.check_call([sys.executable, "-m", "venv", "--without-pip", str(venv)])
        # pip of this interpreter installs into the new environment; torchjd goes in before the
        # .pth below exists, so that pip never sees (nor touches) the project's own install.
        site = _site_packages(python)
        subprocess.check_call(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", site,
             f"torchjd=={TORCHJD_VERSION}"]
        )  # fmt: skip
        Path(site, "_project_site_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    check = (
        "import torch, torchjd, importlib.metadata as md;"
        "print(torch.__version__, md.version('torchjd'), torchjd.__file__)"
    )
    out = subprocess.check_output([str(python), "-c", check], text=True, env=_clean_env()).split()
    if not out[0].startswith(TORCH_VERSION) or out[1] != TORCHJD_VERSION:
        raise RuntimeError(
            f"The reference environment {venv} has torch {out[0]}, torchjd {out[1]}."
        )
    if not out[2].startswith(str(venv)):
        raise RuntimeError(f"The reference environment imports torchjd from {out[2]}.")
    return python


def _site_packages(python: Path) -> str:
    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    return subprocess.check_output([str(python), "-c", code], text=True).strip()


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **extra)
    return env


def _run(python: Path | str, names: list[str], ours: bool) -> dict[str, list[float]]:
    env = _clean_env(PYTHONPATH=str(ROOT / "src")) if ours else _clean_env()
    command = [str(python), str(Path(__file__)), "--worker", json.dumps(names)]
    return json.loads(subprocess.check_output(command, text=True, env=env, cwd=HERE))


def format_table(
    names: list[str],
    ours: dict[str, float],
    theirs: dict[str, float],
    medians: dict[str, list[dict[str, float]]] | None = None,
) -> str:
    header = "| case | TorchJD 0.18 (ms) | ours (ms) | ours / TorchJD |"
    lines = [header + " wall-time ratio |", "|---|---:|---:|---:|---:|"]
    for name in names:
        wall = ""
        if medians is not None:
            wall = f"{medians['ours'][1][name] / medians['theirs'][1][name]:.2f}"
        lines.append(
            f"| {name} | {theirs[name]:.3f} | {ours[name]:.3f} | {ours[name] / theirs[name]:.2f} "
            f"| {wall} |"
        )
    loops = [n for n in names if n.startswith("12-block") and not n.endswith("whole")]
    if loops:
        lines += [
            "",
            "| grouping loop, as a multiple of the whole-model step | TorchJD 0.18 | ours |",
            "|---|---:|---:|",
        ]
        for name in loops:
            whole = name.rsplit(", ", 1)[0] + ", whole"
            if whole in ours:
                ratio_theirs, ratio_ours = theirs[name] / theirs[whole], ours[name] / ours[whole]
                lines.append(f"| {name} | {ratio_theirs:.2f} | {ratio_ours:.2f} |")
    return "\n".join(lines)


def machine_note() -> str:
    """One line on where the figures come from."""
    cpu = platform.processor() or platform.machine()
    model = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines()
                 if ln.startswith("model name")]  # fmt: skip
        model = names[0] if names else ""
    return f"{model or cpu}, {os.cpu_count()} logical cores, {platform.system()}"


def replace_block(text: str, block: str) -> str:
    """``text`` with what lies between the two markers replaced by ``block``."""
    if text.count(BEGIN_MARK) != 1 or text.count(END_MARK) != 1:
        raise ValueError(
            f"The README must hold the markers {BEGIN_MARK} and {END_MARK} once each, in order."
        )
    head, rest = text.split(BEGIN_MARK)
    if END_MARK not in rest:
        raise ValueError(f"{END_MARK} must come after {BEGIN_MARK}.")
    _, tail = rest.split(END_MARK)
    return f"{head}{BEGIN_MARK}\n{block.strip()}\n{END_MARK}{tail}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV)
    parser.add_argument("--only", nargs="*", default=None, help="cases containing a substring")
    parser.add_argument(
        "--write-readme", action="store_true", help="replace the table block of README.md"
    )
    args = parser.parse_args()
    if args.write_readme and args.only:
        parser.error("--write-readme needs every case: drop --only.")
    if args.worker is not None:
        print(json.dumps(run_worker(json.loads(args.worker))))
        return
    names = list(cases())
    if args.only:
        names = [n for n in names if any(s in n for s in args.only)]
        if any(n.startswith("12-block") for n in names):
            names += [n.rsplit(", ", 1)[0] + ", whole" for n in names if n.startswith("12-block")]
            names = [n for n in cases() if n in set(names)]
    reference = ensure_reference_venv(args.venv)
    # [library][clock][case] -> one median per round; clock 0 is CPU time, 1 is wall time.
    samples = {lib: [{n: [] for n in names} for _ in range(2)] for lib in ("ours", "theirs")}
    for round_ in range(args.rounds):
        runs = [(sys.executable, "ours"), (reference, "theirs")]
        for python, lib in runs if round_ % 2 == 0 else runs[::-1]:
            for name, times in _run(python, names, lib == "ours").items():
                for clock, ms in enumerate(times):
                    samples[lib][clock][name].append(ms)
        print(f"round {round_ + 1}/{args.rounds} done", file=sys.stderr)
    medians = {
        lib: [{n: statistics.median(v) for n, v in by_case.items()} for by_case in clocks]
        for lib, clocks in samples.items()
    }
    import torch

    header = (
        f"torch {torch.__version__}, one thread, median over {args.rounds} interleaved rounds of "
        "each round's median over repeated calls. Process CPU time (less disturbed than wall "
        "time by the other processes of a shared machine; both libraries alike); the last column "
        "is the same ratio in wall time. Expect several percent of noise."
    )
    table = format_table(names, medians["ours"][0], medians["theirs"][0], medians)
    print(header)
    print()
    print(table)
    if args.write_readme:
        today = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
        note = f"Measured on {today} with TorchJD {TORCHJD_VERSION}; machine: {machine_note()}."
        README.write_text(replace_block(README.read_text(), f"{note} {header}\n\n{table}"))


if __name__ == "__main__":
    main()
