"""Tables, verdicts and plots of the main job, computed from its output files only.

The run writes ``settings.json``, ``multimnist_runs.csv`` (one row per MultiMNIST run) and
``iwrm_runs.csv`` (one row per IWRM run and epoch); everything else (``results.md``, the plots, the
README block) is derived from them here, so that a table can always be regenerated and never
drifts from the numbers it reports.
"""

import csv
import json
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from .stats import Estimate, estimate, is_tied, tied_with_best

SETTINGS = "settings.json"
MULTIMNIST_RUNS = "multimnist_runs.csv"
IWRM_RUNS = "iwrm_runs.csv"
DELTA_M_PLOT = "multimnist_delta_m.png"
IWRM_PLOT = "iwrm_training_loss.png"
SINGLE = ("single-task (left)", "single-task (right)")


@dataclass(frozen=True)
class Row:
    label: str
    estimates: dict[str, Estimate]  # column -> estimate over seeds
    difference: Estimate  # paired difference of the ranked score to the best method
    tied: bool


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as file:
        return list(csv.DictReader(file))


def write_csv(path: Path, rows: list[dict[str, object]]) -> None:
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _by_label(rows: list[dict[str, str]], column: str) -> dict[str, dict[int, float]]:
    """label -> seed -> value of ``column`` (rows with an empty value are left out)."""
    table: dict[str, dict[int, float]] = defaultdict(dict)
    for row in rows:
        if row[column] != "":
            table[row["label"]][int(row["seed"])] = float(row[column])
    return table


def delta_m(rows: list[dict[str, str]]) -> dict[str, dict[int, float]]:
    """label -> seed -> Δm (%): the mean relative drop of the two test accuracies against the
    single-task models of the same seed (lower is better; 0: as good as single-task)."""
    left, right = _by_label(rows, "left_acc"), _by_label(rows, "right_acc")
    reference = (left[SINGLE[0]], right[SINGLE[1]])
    result: dict[str, dict[int, float]] = {}
    for label in left:
        if label in SINGLE:
            continue
        result[label] = {
            seed: 50 * sum((ref[seed] - acc) / ref[seed] for ref, acc in zip(reference, accs))
            for seed, accs in ((s, (left[label][s], right[label][s])) for s in left[label])
        }
    return result


def _ranked(
    scores: dict[str, dict[int, float]], columns: dict[str, dict[str, dict[int, float]]]
) -> list[Row]:
    _, differences = tied_with_best(scores)
    rows = [
        Row(
            label,
            {
                name: estimate(list(col[label].values()))
                for name, col in columns.items()
                if label in col
            },
            differences[label],
            is_tied(differences[label]),
        )
        for label in scores
    ]
    return sorted(rows, key=lambda r: r.difference.mean)


def multimnist_rows(rows: list[dict[str, str]]) -> list[Row]:
    """One row per method, best Δm first."""
    scores = delta_m(rows)
    columns = {
        "left": _by_label(rows, "left_acc"),
        "right": _by_label(rows, "right_acc"),
        "delta_m": scores,
        "ms": _by_label(rows, "cpu_ms_per_step"),
        "conflict": _by_label(rows, "conflict"),
    }
    return _ranked(scores, columns)


def iwrm_curves(rows: list[dict[str, str]]) -> dict[str, dict[int, list[float]]]:
    """label -> seed -> training loss after each epoch (index 0: before training)."""
    curves: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in sorted(rows, key=lambda r: int(r["epoch"])):
        curves[row["label"]][int(row["seed"])].append(float(row["loss"]))
    return curves


def iwrm_rows(rows: list[dict[str, str]]) -> list[Row]:
    """One row per method, lowest final training loss first."""
    curves = iwrm_curves(rows)
    final = {k: {s: c[-1] for s, c in v.items()} for k, v in curves.items()}
    first = {k: {s: c[1] for s, c in v.items()} for k, v in curves.items()}
    ms = _by_label([r for r in rows if r["epoch"] == "0"], "cpu_ms_per_step")
    return _ranked(final, {"first": first, "final": final, "ms": ms})


def _fmt(e: Estimate | None, digits: int = 2) -> str:
    if e is None:
        return ""
    return f"{e.mean:.{digits}f} ± {e.std:.{digits}f}"


def _interval(e: Estimate, digits: int = 2) -> str:
    if math.isinf(e.half_width):
        return "—"
    return f"[{e.low:+.{digits}f}, {e.high:+.{digits}f}]"


def _verdict(rows: list[Row], score: str) -> str:
    tied = [r.label for r in rows if r.tied]
    worse = [r.label for r in rows if not r.tied]
    if len(tied) == 1:
        return (
            f"**{tied[0]}** has the best {score}, and every other method is significantly worse "
            "(the 95% t-interval of its paired difference to the best excludes 0)."
        )
    text = (
        f"No single best method: **{len(tied)} methods are tied with the best** {score} (the 95% "
        f"t-interval of their paired difference to the best contains 0): {', '.join(tied)}."
    )
    if worse:
        text += f" Significantly worse: {', '.join(worse)}."
    return text


def multimnist_table(rows: list[Row], references: list[dict[str, str]]) -> str:
    left, right = _by_label(references, "left_acc"), _by_label(references, "right_acc")
    lines = [
        "| method | left acc. (%) | right acc. (%) | Δm (%) ↓ | Δm − best, 95% CI | tied with best "
        "| CPU ms / step | conflicting steps (%) |",
        "|---|---|---|---|---|---|---|---|",
        f"| single-task models | {_fmt(estimate(list(left[SINGLE[0]].values())))} "
        f"| {_fmt(estimate(list(right[SINGLE[1]].values())))} | 0 (reference) | | | | |",
    ]
    for r in rows:
        e = r.estimates
        conflict = e.get("conflict")
        lines.append(
            f"| {r.label} | {_fmt(e['left'])} | {_fmt(e['right'])} | {_fmt(e['delta_m'])} "
            f"| {_interval(r.difference)} | {'yes' if r.tied else 'no'} | {_fmt(e['ms'], 1)} "
            f"| {'' if conflict is None else _fmt(_scaled(conflict, 100), 1)} |"
        )
    return "\n".join(lines)


def _scaled(e: Estimate, factor: float) -> Estimate:
    return Estimate(e.mean * factor, e.std * factor, e.half_width * factor, e.n)


def iwrm_table(rows: list[Row], epochs: int) -> str:
    lines = [
        f"| method | training loss after 1 epoch | after {epochs} epochs ↓ | final − best, 95% CI "
        "| tied with best | CPU ms / step |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        e = r.estimates
        lines.append(
            f"| {r.label} | {_fmt(e['first'], 3)} | {_fmt(e['final'], 3)} "
            f"| {_interval(r.difference, 3)} | {'yes' if r.tied else 'no'} | {_fmt(e['ms'], 1)} |"
        )
    return "\n".join(lines)


def render(out: Path) -> str:
    """The Markdown report of the run whose files are in ``out`` (also the README's block)."""
    settings = json.loads((out / SETTINGS).read_text())
    mm_runs, iwrm_runs = read_csv(out / MULTIMNIST_RUNS), read_csv(out / IWRM_RUNS)
    mm, iw = multimnist_rows(mm_runs), iwrm_rows(iwrm_runs)
    m, i = settings["multimnist"], settings["iwrm"]
    seeds = " ".join(map(str, settings["seeds"]))
    return "\n".join(
        [
            f"Run: seeds {seeds} ({len(settings['seeds'])} paired seeds: every method starts from "
            f"the same initialisation and sees the same batches); {settings['cpu_seconds']:.0f} s "
            f"of CPU time, {settings['wall_seconds']:.0f} s wall-clock, {settings['threads']} "
            f"thread(s), torch {settings['torch']}. Mean ± std over seeds.",
            "",
            f"**MultiMNIST** ({m['train']} training / {m['test']} test images, {m['epochs']} "
            f"epoch(s), batch {m['batch_size']}, Adam lr {m['lr']:g}). Δm: mean relative drop of "
            "the two test accuracies against the single-task models of the same seed (%, lower "
            "is better).",
            "",
            multimnist_table(mm, mm_runs),
            "",
            _verdict(mm, "Δm"),
            "",
            f"**Instance-wise risk minimisation** ({i['train']} MNIST training images, one loss "
            f"per example, batches of {i['batch_size']} losses, SGD lr {i['lr']:g}, {i['epochs']} "
            "epochs; loss: mean cross-entropy over the whole training set).",
            "",
            iwrm_table(iw, i["epochs"]),
            "",
            _verdict(iw, "final training loss"),
        ]
    )


def plot(out: Path, folder: Path | None = None) -> list[Path]:
    """Draw the two plots of the run in ``out`` into ``folder`` (default ``out``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    folder = out if folder is None else folder
    settings = json.loads((out / SETTINGS).read_text())
    n = len(settings["seeds"])
    rows = multimnist_rows(read_csv(out / MULTIMNIST_RUNS))

    figure, axis = plt.subplots(figsize=(7.5, 0.32 * len(rows) + 1.6))
    labels = [r.label for r in rows][::-1]
    means = [r.estimates["delta_m"].mean for r in rows][::-1]
    halves = [_finite(r.estimates["delta_m"].half_width) for r in rows][::-1]
    colors = ["tab:blue" if r.tied else "tab:gray" for r in rows][::-1]
    for y, (mean, half, color) in enumerate(zip(means, halves, colors)):
        axis.errorbar(mean, y, xerr=half, fmt="o", color=color, capsize=3)
    axis.axvline(0.0, color="black", linewidth=0.8, linestyle="--")
    axis.set_yticks(range(len(labels)), labels)
    axis.set_xlabel("Δm (%): mean drop of test accuracy vs single-task models (lower is better)")
    axis.set_title(
        f"MultiMNIST: Δm, mean over {n} seeds with 95% t-interval\n"
        "blue: tied with the best (paired test); gray: significantly worse",
        fontsize=10,
    )
    axis.grid(axis="x", alpha=0.3)
    figure.tight_layout()
    paths = [folder / DELTA_M_PLOT]
    figure.savefig(paths[0], dpi=110)
    plt.close(figure)

    curves = iwrm_curves(read_csv(out / IWRM_RUNS))
    figure, axis = plt.subplots(figsize=(7.5, 4.2))
    for label, by_seed in curves.items():
        per_epoch = list(zip(*by_seed.values()))
        stats = [estimate(list(values)) for values in per_epoch]
        epochs = range(len(stats))
        axis.plot(epochs, [s.mean for s in stats], label=label)
        axis.fill_between(
            epochs,
            [s.mean - _finite(s.half_width) for s in stats],
            [s.mean + _finite(s.half_width) for s in stats],
            alpha=0.2,
        )
    axis.set_ylim(bottom=0.0)  # from zero: the gaps between the curves are not exaggerated
    axis.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    axis.set_xlabel("epoch (0: before training)")
    axis.set_ylabel("training loss (mean cross-entropy, nats)")
    axis.set_title(
        f"Instance-wise risk minimisation on MNIST: mean over {n} seeds, 95% t-interval shaded",
        fontsize=10,
    )
    axis.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    paths.append(folder / IWRM_PLOT)
    figure.savefig(paths[1], dpi=110)
    plt.close(figure)
    return paths


def _finite(half_width: float) -> float:
    return 0.0 if math.isinf(half_width) else half_width
