"""Tables (CSV, Markdown) and plots (PNG) of the benchmark's runs, aggregated over seeds.

Delta m is the average relative drop of each task's metric against the single-task models, in
percent (Maninis et al., CVPR 2019; the summary metric of Nash-MTL, CAGrad, ...):

    Delta m = 100 / T * sum_t (-1)^{h_t} (M_t - B_t) / B_t

with ``M_t`` the multi-task model's test metric on task ``t``, ``B_t`` the single-task model's
(averaged over seeds), and ``h_t = 1`` when higher is better (accuracy), 0 otherwise (MAE). Lower
is better; a negative value means the multi-task model beats the single-task ones on average.
"""

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from .methods import METHODS
from .model import GROUPINGS
from .train import TASKS, RunResult


def delta_m(metrics: Sequence[float], baselines: Sequence[float], tasks: Sequence[int]) -> float:
    """Average relative drop (%) of ``metrics`` against ``baselines`` (one value per task)."""
    terms = []
    for value, base, task in zip(metrics, baselines, tasks):
        sign = -1.0 if TASKS[task].higher_is_better else 1.0
        terms.append(sign * (value - base) / base)
    return 100.0 * sum(terms) / len(terms)


def conflict_summary(cosines: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """From cosines ``[steps, g, m, m]``: the lowest pairwise cosine ``[steps, g]`` (for m = 2,
    the cosine between the two tasks) and the mean pairwise cosine ``[steps, g]``."""
    m = cosines.shape[-1]
    i, j = np.triu_indices(m, k=1)
    pairs = cosines[..., i, j]
    return pairs.min(axis=-1), pairs.mean(axis=-1)


@dataclass
class Summary:
    """One row of the results table: a configuration, aggregated over its seeds."""

    label: str
    method: str
    grouping: str
    tasks: tuple[int, ...]
    seeds: list[int]
    metrics: np.ndarray  # [seeds, k]
    delta_m: np.ndarray | None  # [seeds]
    ms_per_step: np.ndarray  # [seeds]
    conflict_fraction: np.ndarray | None  # [seeds]: steps with a negative cosine, mean over groups
    mean_cosine: np.ndarray | None  # [seeds]

    @property
    def single_task(self) -> bool:
        return len(self.tasks) == 1


def summarise(results: list[RunResult]) -> tuple[list[Summary], dict[int, float]]:
    """Group the runs by configuration; return the summaries and the single-task baselines."""
    by_label: dict[str, list[RunResult]] = {}
    for result in results:
        by_label.setdefault(result.config.label, []).append(result)

    baselines = {
        runs[0].config.tasks[0]: float(np.mean([r.metrics[0] for r in runs]))
        for runs in by_label.values()
        if runs[0].config.single_task
    }
    summaries = []
    for label, runs in by_label.items():
        config = runs[0].config
        metrics = np.array([r.metrics for r in runs])
        dm = None
        if not config.single_task and all(t in baselines for t in config.tasks):
            base = [baselines[t] for t in config.tasks]
            dm = np.array([delta_m(r.metrics, base, config.tasks) for r in runs])
        fraction = cosine = None
        if runs[0].cosines is not None:
            lowest, mean = zip(*(conflict_summary(r.cosines.numpy()) for r in runs))
            fraction = np.array([(low < 0).mean() for low in lowest])
            cosine = np.array([m.mean() for m in mean])
        summaries.append(
            Summary(
                label=label,
                method=config.method,
                grouping=config.grouping,
                tasks=config.tasks,
                seeds=[r.config.seed for r in runs],
                metrics=metrics,
                delta_m=dm,
                ms_per_step=np.array([1e3 * r.seconds_per_step for r in runs]),
                conflict_fraction=fraction,
                mean_cosine=cosine,
            )
        )
    # Single-task references first, then the multi-task runs from best to worst Delta m.
    summaries.sort(
        key=lambda s: (
            not s.single_task,
            math.inf if s.delta_m is None else float(s.delta_m.mean()),
        )
    )
    return summaries, baselines


def _metric_scale(task: int) -> float:
    return 100.0 if TASKS[task].metric == "accuracy" else 1.0


def _metric_header(task: int) -> str:
    t = TASKS[task]
    return f"{t.key} {t.metric} (%)" if t.metric == "accuracy" else f"{t.key} {t.metric}"


def _mean_std(values: np.ndarray | None, digits: int) -> str:
    if values is None:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{values.mean():.{digits}f} ± {values.std(ddof=1):.{digits}f}"


def write_csv(summaries: list[Summary], tasks: Sequence[int], path: Path) -> None:
    """One row per configuration: mean and std over seeds of every column."""

    def stats(values: np.ndarray | None) -> list[str]:
        if values is None:
            return ["", ""]
        std = values.std(ddof=1) if len(values) > 1 else 0.0
        return [f"{values.mean():.6g}", f"{std:.6g}"]

    header = ["label", "method", "grouping", "seeds"]
    for task in tasks:
        header += [f"{TASKS[task].key}_{TASKS[task].metric.lower()}_{s}" for s in ("mean", "std")]
    for column in ("delta_m", "ms_per_step", "conflict_fraction", "mean_cosine"):
        header += [f"{column}_mean", f"{column}_std"]
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(header)
        for s in summaries:
            row = [s.label, s.method, "" if s.single_task else s.grouping, len(s.seeds)]
            for task in tasks:
                values = s.metrics[:, s.tasks.index(task)] if task in s.tasks else None
                row += stats(values)
            for values in (s.delta_m, s.ms_per_step, s.conflict_fraction, s.mean_cosine):
                row += stats(values)
            writer.writerow(row)


def write_runs_csv(
    results: list[RunResult], baselines: dict[int, float], tasks: Sequence[int], path: Path
) -> None:
    """One row per run (configuration and seed)."""
    header = ["label", "method", "grouping", "seed"]
    header += [f"{TASKS[t].key}_{TASKS[t].metric.lower()}" for t in tasks]
    header += ["delta_m", "ms_per_step", "conflict_fraction", "mean_cosine"]
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(header)
        for r in results:
            c = r.config
            row = [c.label, c.method, "" if c.single_task else c.grouping, c.seed]
            row += [f"{r.metrics[c.tasks.index(t)]:.6g}" if t in c.tasks else "" for t in tasks]
            dm = ""
            if not c.single_task and all(t in baselines for t in c.tasks):
                dm = f"{delta_m(r.metrics, [baselines[t] for t in c.tasks], c.tasks):.6g}"
            row += [dm, f"{1e3 * r.seconds_per_step:.6g}"]
            if r.cosines is None:
                row += ["", ""]
            else:
                lowest, mean = conflict_summary(r.cosines.numpy())
                row += [f"{(lowest < 0).mean():.6g}", f"{mean.mean():.6g}"]
            writer.writerow(row)


def markdown_table(summaries: list[Summary], tasks: Sequence[int]) -> str:
    """The results as a Markdown table (mean ± std over seeds), best Delta m first."""
    header = ["rank", "method", *(_metric_header(t) for t in tasks), "Δm (%) ↓", "ms / step"]
    header += ["steps in conflict (%)", "mean cosine"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    rank = 0
    for s in summaries:
        if not s.single_task:
            rank += 1
        cells = ["—" if s.single_task else str(rank), s.label]
        for task in tasks:
            if task in s.tasks:
                values = s.metrics[:, s.tasks.index(task)] * _metric_scale(task)
                cells.append(_mean_std(values, 2))
            else:
                cells.append("")
        cells.append(_mean_std(s.delta_m, 2))
        cells.append(_mean_std(s.ms_per_step, 1))
        fraction = None if s.conflict_fraction is None else 100.0 * s.conflict_fraction
        cells += [_mean_std(fraction, 1), _mean_std(s.mean_cosine, 3)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------- plots

_LINESTYLES = dict(zip(GROUPINGS, ("-", "--", "-.", ":")))


def _colour(method: str) -> tuple:
    # tab20 holds tab10's hues at even indices and lighter ones at odd indices: the first ten
    # methods keep tab10's colours, the next ten take the lighter ones.
    index = list(METHODS).index(method) % 20
    return matplotlib.colormaps["tab20"](2 * index if index < 10 else 2 * (index - 10) + 1)


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Moving average along the first axis (valid part only)."""
    window = max(1, min(window, len(values)))
    kernel = np.ones(window) / window
    return np.apply_along_axis(lambda v: np.convolve(v, kernel, mode="valid"), 0, values)


def _by_label(results: list[RunResult]) -> dict[str, list[RunResult]]:
    grouped: dict[str, list[RunResult]] = {}
    for result in results:
        grouped.setdefault(result.config.label, []).append(result)
    return grouped


def plot_losses(results: list[RunResult], tasks: Sequence[int], window: int, path: Path) -> None:
    """Training loss of each task over the steps (mean over seeds, smoothed), one line per run."""
    fig = Figure(figsize=(6 * len(tasks), 4.5), layout="tight")
    axes = fig.subplots(1, len(tasks), squeeze=False)
    for label, runs in _by_label(results).items():
        config = runs[0].config
        losses = np.mean([r.losses.numpy() for r in runs], axis=0)  # [steps, k]
        curve = _smooth(losses, window)
        steps = np.arange(len(curve)) + window
        if config.single_task:
            label = "single-task model"
            kwargs = {"color": "black", "linewidth": 2.0}
        else:
            kwargs = {"color": _colour(config.method), "linestyle": _LINESTYLES[config.grouping]}
        for column, task in enumerate(config.tasks):
            axes[0, tasks.index(task)].plot(steps, curve[:, column], label=label, **kwargs)
    for ax, task in zip(axes[0], tasks):
        ax.set_title(f"training loss: {TASKS[task].label}")
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0, -1].legend(fontsize=7, loc="upper right", ncol=2)
    fig.savefig(path, dpi=100)


def plot_metrics(summaries: list[Summary], tasks: Sequence[int], path: Path) -> None:
    """Test metric of each task per run (mean ± std over seeds); dashed: the single-task model."""
    runs = [s for s in summaries if not s.single_task]
    fig = Figure(figsize=(4.5 * len(tasks) + 1.5, 0.32 * len(runs) + 1.5), layout="tight")
    axes = fig.subplots(1, len(tasks), squeeze=False)
    y = np.arange(len(runs))[::-1]
    for ax, task in zip(axes[0], tasks):
        scale = _metric_scale(task)
        values = [s.metrics[:, s.tasks.index(task)] * scale for s in runs]
        means = np.array([v.mean() for v in values])
        stds = np.array([v.std(ddof=1) if len(v) > 1 else 0.0 for v in values])
        ax.barh(y, means, xerr=stds, color=[_colour(s.method) for s in runs], alpha=0.8)
        for s in summaries:
            if s.single_task and s.tasks[0] == task:
                ax.axvline(s.metrics.mean() * scale, color="black", linestyle="--")
        spread = means.max() - means.min() + stds.max()
        low, high = means.min() - stds.max(), means.max() + stds.max()
        ax.set_xlim(low - 0.6 * spread, high + 0.2 * spread)
        ax.set_title(f"test {TASKS[task].metric}: {TASKS[task].label}\n(dashed: single-task model)")
        ax.set_xlabel("%" if TASKS[task].metric == "accuracy" else "digits")
        ax.set_yticks(y)
        ax.set_yticklabels([s.label for s in runs] if ax is axes[0, 0] else [])
        ax.grid(axis="x", alpha=0.3)
    fig.savefig(path, dpi=100)


def _lowest_cosines(runs: list[RunResult]) -> np.ndarray:
    """``[steps, g]``: lowest pairwise cosine per group, mean over seeds."""
    return np.mean([conflict_summary(r.cosines.numpy())[0] for r in runs], axis=0)


def _conflict_fractions(runs: list[RunResult]) -> np.ndarray:
    """``[g]``: fraction of steps with a negative cosine in each group, mean over seeds."""
    lowest = [conflict_summary(r.cosines.numpy())[0] for r in runs]
    return np.mean([(low < 0).mean(axis=0) for low in lowest], axis=0)


def plot_conflict(results: list[RunResult], window: int, path: Path) -> None:
    """Gradient conflict on the whole trunk, for the runs that aggregate it in one group."""
    together = {
        label: runs
        for label, runs in _by_label(results).items()
        if runs[0].cosines is not None and runs[0].config.grouping == "together"
    }
    fig = Figure(figsize=(12, 4.5), layout="tight")
    left, right = fig.subplots(1, 2, width_ratios=(2, 1))
    labels, fractions = [], []
    for label, runs in together.items():
        lowest = _lowest_cosines(runs)[:, 0]
        curve = _smooth(lowest, window)
        colour = _colour(runs[0].config.method)
        left.plot(np.arange(len(curve)) + window, curve, label=label, color=colour)
        labels.append(label)
        fractions.append(100.0 * _conflict_fractions(runs)[0])
    left.axhline(0.0, color="black", linewidth=0.8)
    left.set_title("cosine between the task gradients on the trunk (smoothed)")
    left.set_xlabel("step")
    left.legend(fontsize=8)
    left.grid(alpha=0.3)
    y = np.arange(len(labels))[::-1]
    right.barh(y, fractions, color=[_colour(together[label][0].config.method) for label in labels])
    right.set_yticks(y)
    right.set_yticklabels(labels)
    right.set_title("steps in conflict (cosine < 0), %")
    right.grid(axis="x", alpha=0.3)
    fig.savefig(path, dpi=100)


def plot_group_conflict(results: list[RunResult], window: int, path: Path) -> bool:
    """Per-group conflict for the grouped methods: one panel per (method, grouping strategy).

    Returns False (and writes nothing) when no method was run under several strategies.
    """
    grid: dict[str, dict[str, list[RunResult]]] = {}
    for runs in _by_label(results).values():
        config = runs[0].config
        if runs[0].cosines is not None:
            grid.setdefault(config.method, {})[config.grouping] = runs
    grid = {method: row for method, row in grid.items() if len(row) > 1}
    if not grid:
        return False
    columns = [g for g in GROUPINGS if any(g in row for row in grid.values())]
    fig = Figure(figsize=(4.2 * len(columns), 3.4 * len(grid)), layout="tight")
    axes = fig.subplots(len(grid), len(columns), squeeze=False, sharey=True)
    for r, (method, row) in enumerate(grid.items()):
        for c, grouping in enumerate(columns):
            ax = axes[r, c]
            ax.axhline(0.0, color="black", linewidth=0.8)
            ax.grid(alpha=0.3)
            if grouping not in row:
                ax.set_visible(False)
                continue
            runs = row[grouping]
            lowest = _lowest_cosines(runs)  # [steps, g]
            fractions = _conflict_fractions(runs)
            curves = _smooth(lowest, window)
            steps = np.arange(len(curves)) + window
            for g, name in enumerate(runs[0].group_names):
                ax.plot(steps, curves[:, g], label=f"{name} ({100 * fractions[g]:.0f}%)")
            ax.set_title(f"{METHODS[method].label} / {grouping}", fontsize=10)
            ax.legend(
                fontsize=7, loc="lower right", title="group (steps in conflict)", title_fontsize=7
            )
            if r == len(grid) - 1:
                ax.set_xlabel("step")
            if c == 0:
                ax.set_ylabel("cosine between task gradients")
    fig.savefig(path, dpi=100)
    return True
