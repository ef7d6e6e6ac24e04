"""Steps where some tasks are absent, through backward, mtl_backward, jac_to_grad and the grouped
aggregator: the absent rows are never read, the present ones give the step on the sub-Jacobian."""

import warnings

import pytest
import torch
from torch.testing import assert_close

from torchjd.aggregation import MGDA, Constant, GradVac, Krum, Mean, Random, TrimmedMean, UPGrad
from torchjd.autojac import backward, jac_to_grad, mtl_backward
from torchjd.grouping import GroupedAggregator

NAN = float("nan")


def _nan_loss(p: torch.Tensor) -> torch.Tensor:
    """A loss whose every derivative is NaN: a mean over no labelled sample, written naively."""
    return (p * 0.0).sum() / torch.tensor(0.0)


def test_backward_computes_only_the_present_rows() -> None:
    p = torch.tensor([3.0, -1.0], requires_grad=True)
    backward([2 * p[0] - p[1], _nan_loss(p), p[0] * p[1]], present=[True, False, True])
    # d(2 p0 - p1) = (2, -1); d(p0 p1) = (p1, p0) = (-1, 3); the absent row is zero, not NaN.
    assert_close(p.jac, torch.tensor([[2.0, -1.0], [0.0, 0.0], [-1.0, 3.0]]))


def test_backward_present_entries_of_one_tensor() -> None:
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    backward(x**2, present=torch.tensor([False, True]))
    assert_close(x.jac, torch.tensor([[0.0, 0.0], [0.0, 4.0]]))


def test_backward_with_no_row_present_gives_zeros() -> None:
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    backward([x.sum(), _nan_loss(x)], present=[False, False])
    assert torch.equal(x.jac, torch.zeros(2, 2))


def test_mtl_backward_leaves_an_absent_task_alone() -> None:
    p0 = torch.tensor([1.0, 2.0], requires_grad=True)
    w1 = torch.tensor([1.0, 0.0], requires_grad=True)
    w2 = torch.tensor([0.0, 1.0], requires_grad=True)
    f = p0 * 3
    mtl_backward([w1 @ f, _nan_loss(w2 @ f)], features=f, present=[True, False])
    assert_close(p0.jac, torch.tensor([[3.0, 0.0], [0.0, 0.0]]))
    assert_close(w1.grad, torch.tensor([3.0, 6.0]))
    assert w2.grad is None


def _jacobian_with_nan_rows(m: int, n: int, absent: list[int]) -> torch.Tensor:
    jacobian = torch.randn(m, n, generator=torch.Generator().manual_seed(m * n))
    jacobian[absent] = NAN
    return jacobian


@pytest.mark.parametrize(
    "make", [UPGrad, Mean, MGDA, lambda: Constant(torch.tensor([1.0, 2.0, 3.0, 4.0]))]
)
def test_jac_to_grad_on_a_subset_is_the_step_on_the_sub_jacobian(make) -> None:
    jacobian = _jacobian_with_nan_rows(4, 6, absent=[1])
    p = torch.zeros(2, 3, requires_grad=True)
    p.jac = jacobian.reshape(4, 2, 3)
    weights = jac_to_grad([p], make(), present=[True, False, True, True])

    sub = jacobian[[0, 2, 3]]
    reference = make()
    if isinstance(reference, Constant):  # the hyper-parameter of the present tasks
        reference = Constant(torch.tensor([1.0, 3.0, 4.0]))
    assert_close(p.grad.reshape(-1), reference(sub), rtol=1e-5, atol=1e-6)
    assert weights[1] == 0.0
    assert_close(weights[[0, 2, 3]] @ sub, p.grad.reshape(-1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("make", [UPGrad, Mean, MGDA, GradVac, Random])
@pytest.mark.parametrize("as_tensor", [False, True])
def test_all_present_is_bit_identical_to_no_present(make, as_tensor: bool) -> None:
    jacobian = _jacobian_with_nan_rows(3, 5, absent=[])
    results = []
    for present in [None, torch.ones(3, dtype=torch.bool) if as_tensor else [True] * 3]:
        p = torch.zeros(5, requires_grad=True)
        p.jac = jacobian.clone()
        aggregator = make()
        torch.manual_seed(0)
        weights = jac_to_grad([p], aggregator, present=present)
        results.append(
            (
                p.grad,
                weights,
                [
                    t.clone()
                    for t in aggregator.state_dict().values()
                    if isinstance(t, torch.Tensor)
                ],
            )
        )
    (g0, w0, s0), (g1, w1, s1) = results
    assert torch.equal(g0, g1)
    assert torch.equal(w0, w1)
    assert all(torch.equal(a, b) for a, b in zip(s0, s1))


def test_no_task_present_warns_and_leaves_grad_untouched() -> None:
    p = torch.zeros(3, requires_grad=True)
    p.grad = torch.tensor([1.0, 2.0, 3.0])
    p.jac = torch.full((2, 3), NAN)
    with pytest.warns(UserWarning, match="No task is present"):
        weights = jac_to_grad([p], UPGrad(), present=[False, False])
    assert torch.equal(p.grad, torch.tensor([1.0, 2.0, 3.0]))
    assert torch.equal(weights, torch.zeros(2))
    assert not hasattr(p, "jac")


@pytest.mark.parametrize(
    ("present", "error", "match"),
    [
        ([True, False], ValueError, r"one entry per task \(3\)"),
        (torch.tensor([1, 0, 1]), TypeError, "boolean tensor"),
        ([1, 0, 1], TypeError, "booleans"),
        ("TFT", TypeError, "boolean tensor or a sequence"),
    ],
)
def test_invalid_present_is_refused_before_anything_changes(present, error, match) -> None:
    p = torch.zeros(2, requires_grad=True)
    p.jac = torch.ones(3, 2)
    with pytest.raises(error, match=match):
        jac_to_grad([p], UPGrad(), present=present)
    assert p.grad is None and hasattr(p, "jac")


def test_krum_below_its_minimum_names_k() -> None:
    p = torch.zeros(2, requires_grad=True)
    p.jac = torch.randn(4, 2)
    with pytest.raises(ValueError, match=r"k=2 present tasks \(of 4\)"):
        jac_to_grad([p], Krum(n_byzantine=1), present=[True, False, True, False])


def test_stateful_weights_follow_the_present_tasks() -> None:
    """GradVac's targets: the step on tasks {0, 2} reads and writes only the (0, 2) block."""
    torch.manual_seed(0)
    jacobian = torch.randn(3, 4)
    p = torch.zeros(4, requires_grad=True)
    aggregator = GradVac(beta=0.5)
    p.jac = jacobian
    jac_to_grad([p], aggregator)
    before = aggregator.gramian_weighting.phi_hat.clone()

    # The same step by hand: a two-task GradVac whose targets are the (0, 2) block.
    reference = GradVac(beta=0.5)
    reference.gramian_weighting.phi_hat = before[[0, 2]][:, [0, 2]].clone()
    second = torch.randn(3, 4)
    expected = reference(second[[0, 2]])

    second[1] = NAN
    p.grad = None
    p.jac = second
    jac_to_grad([p], aggregator, present=[True, False, True])
    after = aggregator.gramian_weighting.phi_hat
    assert_close(p.grad, expected)
    assert torch.equal(after[1], before[1]) and torch.equal(after[:, 1], before[:, 1])
    assert_close(after[[0, 2]][:, [0, 2]], reference.gramian_weighting.phi_hat)


def test_grouped_aggregator_with_present() -> None:
    a = torch.zeros(3, requires_grad=True)
    b = torch.zeros(2, requires_grad=True)
    ja, jb = _jacobian_with_nan_rows(3, 3, absent=[2]), _jacobian_with_nan_rows(3, 2, absent=[2])
    a.jac, b.jac = ja, jb
    grouped = GroupedAggregator([[a], [b]], UPGrad())
    weights = grouped.jac_to_grad(present=[True, True, False])
    assert_close(a.grad, UPGrad()(ja[:2]))
    assert_close(b.grad, UPGrad()(jb[:2]))
    assert all(w[2] == 0.0 for w in weights)


def test_grouped_aggregator_all_present_is_bit_identical() -> None:
    jacobians = [torch.randn(3, 3), torch.randn(3, 2)]
    grads = []
    for present in [None, [True, True, True]]:
        a, b = torch.zeros(3, requires_grad=True), torch.zeros(2, requires_grad=True)
        a.jac, b.jac = jacobians[0].clone(), jacobians[1].clone()
        GroupedAggregator([[a], [b]], UPGrad()).jac_to_grad(present=present)
        grads.append((a.grad, b.grad))
    assert all(torch.equal(x, y) for x, y in zip(*grads))


def test_end_to_end_with_a_nan_loss_gives_a_finite_step() -> None:
    torch.manual_seed(0)
    trunk = torch.nn.Linear(4, 3)
    heads = [torch.nn.Linear(3, 1) for _ in range(3)]
    x = torch.randn(8, 4)
    features = trunk(x)
    losses = [head(features).mean() for head in heads[:2]]
    losses.append(_nan_loss(heads[2](features)))
    present = [True, True, False]
    mtl_backward(losses, features=features, present=present)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jac_to_grad(trunk.parameters(), UPGrad(), present=present)
    assert all(torch.isfinite(p.grad).all() for p in trunk.parameters())
    assert heads[2].weight.grad is None


def test_trimmed_mean_below_its_minimum_names_k() -> None:
    p = torch.zeros(2, requires_grad=True)
    p.jac = torch.randn(3, 2)
    with pytest.raises(ValueError, match=r"k=2 present tasks \(of 3\)"):
        jac_to_grad([p], TrimmedMean(trim_number=1), present=[True, True, False])


def test_grouped_gramians_keep_one_row_per_task() -> None:
    a = torch.zeros(2, requires_grad=True)
    a.jac = torch.tensor([[1.0, 0.0], [NAN, NAN], [1.0, 1.0]])
    grouped = GroupedAggregator([[a]], UPGrad())
    grouped.jac_to_grad(present=[True, False, True])
    expected = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0], [1.0, 0.0, 2.0]])
    assert_close(grouped.last_gramians[0], expected)
