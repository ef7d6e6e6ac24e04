"""Compare the cost of applying aggregations (``.jac`` → ``.grad``) between two commits.

Each commit is checked out in a temporary git worktree; the cases below run in a fresh
subprocess per (commit, round), alternating the commits round after round, single-threaded, and
the report gives, per case, the median over rounds of each commit's median time and their ratio
(new / old). Only the public API is used, so any two commits of the project can be compared.

Cases (the 12-block MLP of ``bench_grouping.py``, 76 tensors, ``.jac`` filled at random):

- ``jac_to_grad`` on the whole trunk with Mean, UPGrad, GradVac and ConFIG (row count, Gramian,
  Gramian with state, matrix), m = 2 and 8;
- the documented loop ``jac_to_grad(group, aggregator)`` per layer and per tensor, UPGrad, m = 2,
  and per tensor, UPGrad and GradVac, m = 8;
- ``GroupedAggregator`` per tensor, UPGrad and GradVac, m = 8;
- one call on one small tensor (the fixed cost of a call), UPGrad, m = 2, and with a weighting
  that costs one indexing (the application's own fixed cost, without the weighting's).
- ``UPGradWeighting`` on the ``m = 128`` per-sample Gramians of 4 batches of the IWRM MLP and
  CNN of ``bench_autogram.py`` (the instance-wise risk minimisation solve).

Usage: ``python benchmarks/compare_commits.py OLD NEW [--rounds 5] [--repeats 15]``
(e.g. ``HEAD~3 HEAD``; ``WORKTREE`` for the working tree as it is).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _cases() -> dict[str, object]:
    import torch

    from torchjd.aggregation import (
        ConFIG,
        GradVac,
        GramianWeightedAggregator,
        Mean,
        UPGrad,
        Weighting,
    )
    from torchjd.autojac import jac_to_grad
    from torchjd.grouping import GroupedAggregator, per_layer, per_tensor

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_grouping import make_trunk

    torch.manual_seed(0)
    trunk, _, _ = make_trunk()
    params = list(trunk.parameters())

    jacobians = {m: [torch.randn(m, *p.shape) for p in params] for m in (2, 8)}

    def fill(m: int) -> None:
        """Every case keeps the same `.jac` fields (retain_jac=True) and starts without `.grad`."""
        for p, jacobian in zip(params, jacobians[m]):
            p.jac = jacobian
            p.grad = None

    def whole(make: type, m: int) -> object:
        aggregator = make()
        return lambda: (fill(m), jac_to_grad(params, aggregator, retain_jac=True))

    def loop(groups: list, m: int, make: type = UPGrad) -> object:
        aggregators = [make() for _ in groups]
        return lambda: (
            fill(m),
            [jac_to_grad(g, a, retain_jac=True) for g, a in zip(groups, aggregators)],
        )

    def grouped(make: type, m: int) -> object:
        container = GroupedAggregator(per_tensor(trunk), make)
        return lambda: (fill(m), container.jac_to_grad(retain_jac=True))

    small = torch.zeros(10, requires_grad=True)
    small.jac = torch.ones(2, 10)
    upgrad = UPGrad()

    def one_small_call() -> None:
        small.grad = None
        jac_to_grad([small], upgrad, retain_jac=True)

    class FirstRow(Weighting):
        """Weights that cost one indexing (the first row of the Gramian): no meaning, no work."""

        def forward(self, gramian: torch.Tensor, /) -> torch.Tensor:
            return gramian[0]

    trivial = GramianWeightedAggregator(FirstRow())

    def one_small_call_trivial() -> None:
        small.grad = None
        jac_to_grad([small], trivial, retain_jac=True)

    cases = {
        f"whole {c.__name__} m={m}": whole(c, m) for c in (Mean, UPGrad, GradVac) for m in (2, 8)
    }
    cases["whole ConFIG m=8"] = whole(ConFIG, 8)
    cases["loop per layer UPGrad m=2"] = loop(per_layer(trunk), 2)
    cases["loop per tensor UPGrad m=2"] = loop(per_tensor(trunk), 2)
    cases["loop per tensor UPGrad m=8"] = loop(per_tensor(trunk), 8)
    cases["loop per tensor GradVac m=8"] = loop(per_tensor(trunk), 8, GradVac)
    cases["grouped per tensor UPGrad m=8"] = grouped(UPGrad, 8)
    cases["grouped per tensor GradVac m=8"] = grouped(GradVac, 8)
    cases["one small call UPGrad m=2"] = one_small_call
    cases["one small call, trivial weighting, m=2"] = one_small_call_trivial
    for model in ("mlp", "cnn"):
        cases[f"UPGradWeighting on 4 IWRM {model.upper()} Gramians, m=128"] = _iwrm_solves(model)
    return cases


def _iwrm_solves(model: str) -> object:
    """``UPGradWeighting`` on the per-sample Gramians of 4 batches of 128 (the IWRM models of
    ``bench_autogram.py``, computed by the autogram ``Engine``)."""
    from bench_autogram import _data, _gramians

    from torchjd.aggregation import UPGradWeighting

    gramians = _gramians(*_data(model, 128, 4))
    weighting = UPGradWeighting()
    return lambda: [weighting(gramian) for gramian in gramians]


def measure(repeats: int) -> dict[str, float]:
    import time

    import torch

    torch.set_num_threads(1)
    result = {}
    for name, fn in _cases().items():
        for _ in range(3):
            fn()  # type: ignore[operator]
        times = []
        for _ in range(repeats):
            start = time.process_time()
            fn()  # type: ignore[operator]
            times.append(time.process_time() - start)
        result[name] = 1000 * statistics.median(times)
    return result


def _worktree(ref: str, directory: str) -> Path:
    if ref == "WORKTREE":
        return ROOT
    path = Path(directory) / ref.replace("/", "_").replace("~", "-")
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(path), ref], check=True
    )
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.repeats)))
        return

    with tempfile.TemporaryDirectory() as directory:
        trees = {ref: _worktree(ref, directory) for ref in (args.old, args.new)}
        runs: dict[str, list[dict[str, float]]] = {args.old: [], args.new: []}
        try:
            for round_ in range(args.rounds):
                order = [args.old, args.new] if round_ % 2 == 0 else [args.new, args.old]
                for ref in order:
                    env = {**os.environ, "PYTHONPATH": str(trees[ref] / "src")}
                    command = [sys.executable, __file__, "x", "y", "--measure"]
                    command += ["--repeats", str(args.repeats)]
                    out = subprocess.run(command, env=env, capture_output=True, text=True)
                    if out.returncode:
                        raise RuntimeError(out.stderr)
                    runs[ref].append(json.loads(out.stdout.strip().splitlines()[-1]))
        finally:
            for path in trees.values():
                if path != ROOT:
                    remove = ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(path)]
                    subprocess.run(remove, check=False)

    print(
        f"Medians over {args.rounds} interleaved rounds (CPU ms of the process, one thread); "
        "ratio = new / old.\n"
    )
    print(f"| case | {args.old} | {args.new} | ratio |")
    print("|---|---|---|---|")
    for name in runs[args.old][0]:
        old = statistics.median(r[name] for r in runs[args.old])
        new = statistics.median(r[name] for r in runs[args.new])
        print(f"| {name} | {old:.3f} | {new:.3f} | {new / old:.2f} |")


if __name__ == "__main__":
    main()
