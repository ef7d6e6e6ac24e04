"""Tests of the MultiDigits benchmark (examples/multidigits): data, grouping, monitoring, report,
and a --quick run of the whole command."""

import csv
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from examples.multidigits import __main__ as cli
from examples.multidigits import methods
from examples.multidigits.data import (
    HEIGHT,
    WIDTH,
    compose,
    load_source_digits,
    make_multidigits,
    make_pairs,
    split_sources,
)
from examples.multidigits.model import (
    GROUPINGS,
    make_heads,
    make_trunk,
    parameter_groups,
)
from examples.multidigits.report import conflict_summary, delta_m
from examples.multidigits.train import (
    RunConfig,
    gramian_cosines,
    group_gramians,
    train_run,
)
from torch.nn.functional import cosine_similarity

from torchjd.autojac import mtl_backward

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------ data


def test_compose_places_both_digits_and_keeps_the_max_where_they_overlap() -> None:
    left = np.full((8, 8), 0.25, dtype=np.float32)
    right = np.full((8, 8), 0.75, dtype=np.float32)
    right[:, 0] = 0.0  # darker than the left digit: the left digit must show through
    canvas = compose(left, right, left_row=1, right_row=2, right_col=5)

    assert canvas.shape == (HEIGHT, WIDTH)
    expected = np.zeros((HEIGHT, WIDTH), dtype=np.float32)
    expected[1:9, 0:8] = 0.25
    expected[2:10, 6:13] = 0.75  # the right digit's first column is 0: the left one shows there
    np.testing.assert_array_equal(canvas, expected)


def test_sources_split_is_stratified_disjoint_and_complete() -> None:
    _, labels = load_source_digits()
    train, test = split_sources(labels, 0.3, np.random.default_rng(0))
    assert len(np.intersect1d(train, test)) == 0
    assert len(train) + len(test) == len(labels) == 1797
    for digit in range(10):
        total = (labels == digit).sum()
        assert (labels[test] == digit).sum() == round(0.3 * total)


def test_labels_match_the_digits_drawn_in_the_images() -> None:
    images, labels = load_source_digits()
    pool = [int(np.flatnonzero(labels == 3)[0]), int(np.flatnonzero(labels == 8)[0])]
    split = make_pairs(images[pool], labels[pool], 40, np.random.default_rng(1))
    source = {3: images[pool[0]], 8: images[pool[1]]}
    for image, (left, right) in zip(split.images[:, 0].numpy(), split.labels.tolist()):
        # Columns 0-4 only hold the left digit (the right one starts at column 5 or 6),
        # columns 8-13 only the right one (the left digit ends at column 7).
        assert any(np.array_equal(image[r : r + 8, :5], source[left][:, :5]) for r in range(3)), (
            "left digit not found where expected"
        )
        assert any(
            np.array_equal(image[r : r + 8, 8 : c + 8], source[right][:, 8 - c :])
            for r in range(3)
            for c in (5, 6)
        ), "right digit not found where expected"


def test_multidigits_is_deterministic_with_the_expected_shapes() -> None:
    a = make_multidigits(n_train=30, n_test=10, seed=3)
    b = make_multidigits(n_train=30, n_test=10, seed=3)
    c = make_multidigits(n_train=30, n_test=10, seed=4)
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.labels, b.test.labels)
    assert not torch.equal(a.train.images, c.train.images)
    assert a.train.images.shape == (30, 1, HEIGHT, WIDTH) and a.test.labels.shape == (10, 2)
    assert a.train.images.dtype == torch.float32
    assert a.train.images.min() >= 0.0 and a.train.images.max() <= 1.0
    assert a.train.labels.min() >= 0 and a.train.labels.max() <= 9
    torch.testing.assert_close(a.train.sums, a.train.labels.sum(dim=1).float() / 18.0)
    with pytest.raises(ValueError, match="n_train"):
        make_multidigits(n_train=0)


# -------------------------------------------------------------------------------- model, groups


@pytest.mark.parametrize(
    ("strategy", "names"),
    [
        ("together", ["trunk"]),
        ("per_network", ["encoder", "decoder"]),
        ("per_layer", ["conv1", "conv2", "fc"]),
        (
            "per_tensor",
            ["conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias", "fc.weight", "fc.bias"],
        ),
    ],
)
def test_each_strategy_partitions_the_trunk(strategy: str, names: list[str]) -> None:
    trunk = make_trunk()
    groups = parameter_groups(trunk, strategy)
    assert [name for name, _ in groups] == names
    flat = [p for _, params in groups for p in params]
    assert [id(p) for p in flat] == [id(p) for p in trunk.parameters()]


def test_unknown_strategy_is_rejected() -> None:
    with pytest.raises(ValueError, match="strategy"):
        parameter_groups(make_trunk(), "per_block")


def test_gramian_cosines_equal_the_cosines_of_the_task_gradients() -> None:
    torch.manual_seed(0)
    trunk, heads = make_trunk(), make_heads([10, 10])
    data = make_multidigits(n_train=16, n_test=4).train
    targets = [data.labels[:, 0], data.labels[:, 1]]

    def losses() -> list[torch.Tensor]:
        features = trunk(data.images)
        ce = torch.nn.functional.cross_entropy
        return [ce(head(features), t) for head, t in zip(heads, targets)], features

    for strategy in GROUPINGS:
        groups = [params for _, params in parameter_groups(trunk, strategy)]
        expected = []
        for params in groups:
            task_losses, _ = losses()
            grads = [
                torch.cat(
                    [g.flatten() for g in torch.autograd.grad(loss, params, retain_graph=True)]
                )
                for loss in task_losses
            ]
            expected.append(cosine_similarity(grads[0], grads[1], dim=0))
        task_losses, features = losses()
        mtl_backward(task_losses, features=features)
        cosines = gramian_cosines(group_gramians(groups))
        for p in trunk.parameters():
            del p.jac
        heads.zero_grad()
        assert cosines.shape == (len(groups), 2, 2)
        torch.testing.assert_close(cosines[:, 0, 1], torch.stack(expected), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(cosines[:, 0, 0], torch.ones(len(groups)))


def test_a_run_is_deterministic_under_its_seed() -> None:
    data = make_multidigits(n_train=96, n_test=32)
    config = RunConfig("gradvac", "per_layer", (0, 1), seed=5, epochs=1, batch_size=32)
    first, second = (train_run(data, config, progress=False) for _ in range(2))
    assert torch.equal(first.losses, second.losses)
    assert torch.equal(first.cosines, second.cosines)
    assert first.metrics == second.metrics
    assert first.cosines.shape == (3, 3, 2, 2) and first.group_names == ["conv1", "conv2", "fc"]
    other = train_run(data, RunConfig("gradvac", "per_layer", (0, 1), 6, 1, 32), progress=False)
    assert not torch.equal(first.losses, other.losses)


# -------------------------------------------------------------------------------------- report


def test_delta_m_by_hand() -> None:
    # Accuracies: 0.9 vs 0.9 (no change), 0.72 vs 0.8 (a 10 % drop) -> mean drop 5 %.
    assert delta_m([0.9, 0.72], [0.9, 0.8], [0, 1]) == pytest.approx(5.0)
    # Accuracy 0.99 vs 0.9 (10 % better: -10), MAE 1.0 vs 0.8 (25 % worse: +25) -> 7.5.
    assert delta_m([0.99, 1.0], [0.9, 0.8], [0, 2]) == pytest.approx(7.5)


def test_conflict_summary_takes_the_lowest_and_mean_pairwise_cosine() -> None:
    cosines = np.array([[1.0, 0.5, -0.2], [0.5, 1.0, 0.1], [-0.2, 0.1, 1.0]])[None, None]
    lowest, mean = conflict_summary(cosines)
    assert lowest.shape == mean.shape == (1, 1)
    assert lowest[0, 0] == pytest.approx(-0.2)
    assert mean[0, 0] == pytest.approx(0.4 / 3)


# ----------------------------------------------------------------------------------------- CLI


def test_help_lists_the_options(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--methods", "--groupings", "--epochs", "--seeds", "--output", "--quick"):
        assert option in text


@pytest.mark.parametrize(
    "argv", [["--methods", "upgrad,adam"], ["--groupings", "per_block"], ["--epochs", "0"]]
)
def test_bad_options_are_rejected(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_args(argv)
    assert exit_info.value.code == 2


def test_plan_covers_methods_groupings_and_single_task_models() -> None:
    runs, notes = cli.plan(cli.parse_args(["--seeds", "0", "1"]))
    assert notes == [] or all("skipped" in note for note in notes)
    labels = {run.label for run in runs}
    assert {"single-task (left)", "single-task (right)", "Sum (summed loss)", "UPGrad"} <= labels
    for grouped in ("UPGrad", "GradVac"):
        for strategy in ("per_network", "per_layer", "per_tensor"):
            assert f"{grouped} / {strategy}" in labels
    assert len(runs) == 2 * len(labels)  # every configuration once per seed


def test_a_method_that_cannot_be_built_is_skipped_with_a_note(monkeypatch) -> None:
    def missing(m: int):
        raise ImportError("needs a package that is not installed")

    broken = methods.Method("pcgrad", "PCGrad", missing)
    monkeypatch.setitem(methods.METHODS, "pcgrad", broken)
    args = cli.parse_args(["--methods", "mean,pcgrad", "--grouped-methods", "mean"])
    runs, notes = cli.plan(args)
    assert [note for note in notes if "PCGrad skipped" in note and "not installed" in note]
    assert all(run.method != "pcgrad" for run in runs)
    assert any(run.method == "mean" for run in runs)


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as file:
        return list(csv.DictReader(file))


def test_quick_run_writes_sane_tables_and_plots(tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    try:
        assert cli.main(["--quick", "--no-progress", "--output", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)

    for name in ("loss_curves", "metrics", "conflict", "conflict_groups"):
        content = (tmp_path / f"{name}.png").read_bytes()
        assert content.startswith(PNG_SIGNATURE) and len(content) > 10_000

    rows = {row["label"]: row for row in _read_csv(tmp_path / "results.csv")}
    n_rows = 2 + len(methods.METHODS) + 2 * 3  # single-task, every method, 2 x 3 grouped runs
    assert len(rows) == n_rows
    base = {
        "left": float(rows["single-task (left)"]["left_accuracy_mean"]),
        "right": float(rows["single-task (right)"]["right_accuracy_mean"]),
    }
    for label, row in rows.items():
        if label.startswith("single-task"):
            continue
        accuracies = [float(row["left_accuracy_mean"]), float(row["right_accuracy_mean"])]
        assert all(0.4 < a <= 1.0 for a in accuracies), (label, accuracies)  # chance: 0.1
        expected = -50.0 * sum((a - base[k]) / base[k] for a, k in zip(accuracies, base))
        assert float(row["delta_m_mean"]) == pytest.approx(expected, rel=1e-4, abs=1e-4)
        assert float(row["ms_per_step_mean"]) > 0.0
        if methods.METHODS[row["method"]].make is not None:  # conflict measured on .jac
            assert 0.0 <= float(row["conflict_fraction_mean"]) <= 1.0
            assert -1.0 <= float(row["mean_cosine_mean"]) <= 1.0
    assert all(0.4 < v <= 1.0 for v in base.values())

    runs = _read_csv(tmp_path / "runs.csv")
    assert len(runs) == n_rows and {r["seed"] for r in runs} == {"0"}

    markdown = (tmp_path / "results.md").read_text()
    assert "| rank | method |" in markdown and "Lowest Δm" in markdown
    table_rows = [line for line in markdown.splitlines() if line.startswith("| ")]
    assert len(table_rows) == 1 + n_rows
    assert not any(math.isnan(float(row["delta_m_mean"] or 0)) for row in rows.values())


def test_the_gramian_first_step_gives_the_same_run() -> None:
    # MTLEngine in place of mtl_backward + jac_to_grad: same weights, hence the same training.
    data = make_multidigits(n_train=96, n_test=32)
    config = RunConfig("gradvac", "per_layer", (0, 1), seed=5, epochs=1, batch_size=32)
    expected = train_run(data, config, progress=False)
    actual = train_run(data, replace(config, gramian_first=True), progress=False)
    torch.testing.assert_close(actual.losses, expected.losses, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(actual.cosines, expected.cosines, rtol=1e-3, atol=1e-4)
