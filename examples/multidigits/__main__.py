"""MultiDigits benchmark: multi-task learning with Jacobian descent on real handwritten digits.

Each image holds two overlapping handwritten digits (from the 8x8 digits bundled with
scikit-learn); a shared CNN trunk feeds one head per task (class of the left digit, class of the
right digit, optionally the sum of both). The same model is trained from the same initialisation
with the summed loss (baseline) and with several aggregators of the task Jacobian, GradVac and
UPGrad also under the four grouping strategies of Gradient Vaccine (together, per network, per
layer, per tensor), plus one single-task model per task as the reference of Delta m.

Writes to the output folder: results.csv and results.md (test metrics, Delta m, time per step and
gradient conflict, mean ± std over seeds), runs.csv (one row per run), and the plots
loss_curves.png, metrics.png, conflict.png and conflict_groups.png.

Run:  python -m examples.multidigits [options]      (python -m examples.multidigits --help)
"""

import argparse
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from .data import make_multidigits
from .methods import GROUPABLE, METHODS, unavailable_reason
from .model import GROUPINGS
from .report import (
    markdown_table,
    plot_conflict,
    plot_group_conflict,
    plot_losses,
    plot_metrics,
    summarise,
    write_csv,
    write_runs_csv,
)
from .train import TASKS, RunConfig, RunResult, train_run

DEFAULT_EPOCHS = 5
DEFAULT_SEEDS = (0, 1, 2)
QUICK_EPOCHS = 3
QUICK_TRAIN_SIZE = 2000
QUICK_TEST_SIZE = 1000


def _keys(allowed: Sequence[str]):
    def parse(text: str) -> list[str]:
        keys = [k.strip() for k in text.split(",") if k.strip()]
        wrong = [k for k in keys if k not in allowed]
        if wrong:
            raise argparse.ArgumentTypeError(
                f"unknown {wrong}; choose a comma-separated list from {', '.join(allowed)}"
            )
        return keys

    return parse


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m examples.multidigits",
        description=__doc__.split("\n\n")[0],
        epilog=(
            "Methods: "
            + ", ".join(f"{k} = {m.label}" for k, m in METHODS.items())
            + ". Methods whose aggregator cannot be built here (missing optional dependency) "
            "are skipped with a note. Delta m: average relative drop (%) of the test metrics "
            "against the single-task models; lower is better."
        ),
    )
    parser.add_argument(
        "--methods",
        type=_keys(list(METHODS)),
        default=list(METHODS),
        help="comma-separated methods trained with the whole trunk as one group "
        f"(default: all: {','.join(METHODS)})",
    )
    parser.add_argument(
        "--grouped-methods",
        type=_keys(GROUPABLE),
        default=["upgrad", "gradvac"],
        help="comma-separated methods also trained under each strategy of --groupings, with one "
        "aggregator instance per group (default: upgrad,gradvac)",
    )
    parser.add_argument(
        "--groupings",
        type=_keys(GROUPINGS),
        default=list(GROUPINGS),
        help="comma-separated grouping strategies for --grouped-methods: together = the whole "
        "trunk, per_network = encoder and decoder, per_layer = each layer, per_tensor = each "
        f"weight and bias (default: {','.join(GROUPINGS)})",
    )
    parser.add_argument(
        "--epochs",
        type=int,
        default=None,
        help=f"training epochs per run (default: {DEFAULT_EPOCHS}; {QUICK_EPOCHS} with --quick)",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=None,
        help="training seeds: initialisation and batch order; each configuration is trained once "
        f"per seed (default: {' '.join(map(str, DEFAULT_SEEDS))}; 0 with --quick)",
    )
    parser.add_argument(
        "--tasks",
        type=int,
        choices=(2, 3),
        default=2,
        help="2: left and right digit classes; 3: also the regression of their sum (default: 2)",
    )
    parser.add_argument(
        "--output",
        "-o",
        type=Path,
        default=Path("demo-output"),
        help="folder for the tables and plots (created if needed; default: demo-output)",
    )
    parser.add_argument(
        "--train-size",
        type=int,
        default=None,
        help=f"number of training images (default: 6000; {QUICK_TRAIN_SIZE} with --quick)",
    )
    parser.add_argument("--batch-size", type=int, default=64, help="batch size (default: 64)")
    parser.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate (default: 2e-3)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads; the model is small, so one thread is the fastest (default: 1)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run in well under 30 s: {QUICK_EPOCHS} epochs on {QUICK_TRAIN_SIZE} images, "
        "seed 0, every method and grouping (explicit --epochs/--seeds/--train-size still apply)",
    )
    parser.add_argument(
        "--gramian-first",
        action="store_true",
        help="compute the trunk's update from per-layer Gramians (autogram.MTLEngine), without "
        "its Jacobian, for the methods whose aggregator reads only the Gramian or the number of "
        "tasks (the others keep mtl_backward + jac_to_grad)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = parser.parse_args(argv)

    if args.epochs is None:
        args.epochs = QUICK_EPOCHS if args.quick else DEFAULT_EPOCHS
    if args.seeds is None:
        args.seeds = [0] if args.quick else list(DEFAULT_SEEDS)
    if args.train_size is None:
        args.train_size = QUICK_TRAIN_SIZE if args.quick else 6000
    args.test_size = QUICK_TEST_SIZE if args.quick else 2000
    for name in ("epochs", "train_size", "batch_size", "threads"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.lr <= 0:
        parser.error(f"--lr must be positive, got {args.lr}")
    return args


def plan(args: argparse.Namespace) -> tuple[list[RunConfig], list[str]]:
    """The configurations to train (one per seed each), and notes on the skipped methods."""
    tasks = tuple(range(args.tasks))
    common = {
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "gramian_first": args.gramian_first,
    }
    notes, available = [], []
    for key in dict.fromkeys([*args.methods, *args.grouped_methods]):
        reason = unavailable_reason(key, len(tasks))
        if reason is None:
            available.append(key)
        else:
            notes.append(f"{METHODS[key].label} skipped: {reason}")

    configs = [("sum", "together", (t,)) for t in tasks]  # single-task references
    configs += [(k, "together", tasks) for k in args.methods if k in available]
    configs += [
        (k, g, tasks)
        for k in args.grouped_methods
        if k in available
        for g in args.groupings
        if g != "together" or k not in args.methods
    ]
    runs = [
        RunConfig(method, grouping, run_tasks, seed=seed, **common)
        for method, grouping, run_tasks in configs
        for seed in args.seeds
    ]
    return runs, notes


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    runs, notes = plan(args)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    data = make_multidigits(n_train=args.train_size, n_test=args.test_size, seed=0)
    print(
        f"MultiDigits: {len(data.train)} training and {len(data.test)} test images of two "
        f"digits; {len(runs)} runs ({args.epochs} epoch(s), seeds {args.seeds})",
        file=sys.stderr,
    )

    results: list[RunResult] = [train_run(data, run, progress=not args.no_progress) for run in runs]

    tasks = list(range(args.tasks))
    summaries, baselines = summarise(results)
    out: Path = args.output
    out.mkdir(parents=True, exist_ok=True)
    write_csv(summaries, tasks, out / "results.csv")
    write_runs_csv(results, baselines, tasks, out / "runs.csv")
    table = markdown_table(summaries, tasks)
    window = max(1, -(-args.train_size // args.batch_size) // 4)
    plot_losses(results, tasks, window, out / "loss_curves.png")
    plot_metrics(summaries, tasks, out / "metrics.png")
    plot_conflict(results, window, out / "conflict.png")
    plot_group_conflict(results, window, out / "conflict_groups.png")

    elapsed = time.perf_counter() - start
    setup = (
        f"{len(data.train)} training / {len(data.test)} test images, tasks: "
        f"{', '.join(TASKS[t].label for t in tasks)}; {args.epochs} epoch(s), batch "
        f"{args.batch_size}, Adam lr {args.lr:g}, seeds {' '.join(map(str, args.seeds))}; "
        f"{args.threads} thread(s) on {platform.machine()} "
        f"with {os.cpu_count()} CPUs, {elapsed:.0f} s in total."
    )
    ranked = [s for s in summaries if s.delta_m is not None]
    verdict = ""
    if ranked:
        verdict = (
            f"Lowest Δm: **{ranked[0].label}** ({ranked[0].delta_m.mean():+.2f} %). Δm is the "
            "average relative drop of the test metrics against the single-task models (lower is "
            "better)."
        )
    lines = ["# MultiDigits benchmark", "", setup, "", table, verdict]
    lines += [f"\nNote: {note}" for note in notes]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n" + table)
    print(verdict)
    print(f"\nWrote {out}/: results.csv, results.md, runs.csv and PNG plots ({elapsed:.0f} s).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
