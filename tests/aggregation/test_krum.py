"""Krum and KrumWeighting: worked examples, a case scored by hand, validation."""

import pytest
import torch
from torch.testing import assert_close

from torchjd.aggregation import Krum, KrumWeighting

from ._matrices import J_B

J_K = torch.tensor(
    [[1.0, 1.0, 1.0], [1.0, 0.0, 1.0], [75.0, -666.0, 23.0], [1.0, 2.0, 3.0], [2.0, 0.0, 1.0]]
)


@pytest.mark.parametrize(
    ["n_byzantine", "n_selected", "expected", "weights"],
    [
        (1, 4, [1.25, 0.75, 1.5], [0.25, 0.25, 0.0, 0.25, 0.25]),
        (1, 1, [1.0, 0.0, 1.0], [0.0, 1.0, 0.0, 0.0, 0.0]),
        (1, 2, [1.5, 0.0, 1.0], [0.0, 0.5, 0.0, 0.0, 0.5]),
        (0, 1, [1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0, 0.0]),
    ],
)
def test_worked_examples(n_byzantine: int, n_selected: int, expected: list, weights: list) -> None:
    assert_close(Krum(n_byzantine, n_selected)(J_K), torch.tensor(expected))
    out = KrumWeighting(n_byzantine, n_selected)(J_K @ J_K.T)
    assert_close(out, torch.tensor(weights))


def test_worked_examples_on_j_b() -> None:
    assert_close(Krum(0)(J_B), torch.tensor([0.5, 2.0, -1.0, 1.0]))
    assert_close(KrumWeighting(0)(J_B @ J_B.T), torch.tensor([0.0, 1.0, 0.0]))
    assert_close(Krum(0, 2)(J_B), torch.tensor([-0.25, 1.25, 0.0, 1.5]))


def test_points_on_a_line_by_hand() -> None:
    # Rows 0, 1, 3, 10 (one coordinate), f = 1, so each score sums k = 4 - 1 - 2 = 1 distance:
    # the nearest neighbour's, 1, 1, 2, 7. Rows 0 and 1 tie for the smallest score.
    J = torch.tensor([[0.0], [1.0], [3.0], [10.0]], dtype=torch.float64)
    assert_close(Krum(1, 2)(J), torch.tensor([0.5], dtype=torch.float64))
    # With f = 0, k = 2: scores 1 + 3, 1 + 2, 2 + 3, 7 + 9; the best is row 1.
    assert_close(Krum(0)(J), torch.tensor([1.0], dtype=torch.float64))
    assert_close(Krum(0, 3)(J), torch.tensor([4 / 3], dtype=torch.float64))


def test_ties_are_broken_like_topk() -> None:
    # Four identical rows with f = 1, s = 1: TorchJD selects row 2 on the CPU.
    G = torch.ones(4, 3) @ torch.ones(3, 4)
    assert_close(KrumWeighting(1)(G), torch.tensor([0.0, 0.0, 1.0, 0.0]))


def test_squared_distances_are_clamped() -> None:
    # Nearly equal rows: G_ii + G_jj - 2 G_ij can be slightly negative after rounding.
    base = torch.tensor([1e4, 3e4, -2e4])
    J = torch.stack([base, base + 1e-3, base - 1e-3, base + 2e-3])
    assert torch.isfinite(Krum(1)(J)).all()


@pytest.mark.parametrize(
    ["n_byzantine", "n_selected", "m", "accepted"],
    [
        (1, 1, 3, False),
        (1, 1, 4, True),
        (1, 4, 4, True),
        (12, 4, 14, False),
        (12, 4, 15, True),
        (12, 15, 15, True),
        (12, 16, 15, False),
    ],
)
def test_number_of_rows(n_byzantine: int, n_selected: int, m: int, accepted: bool) -> None:
    aggregator = Krum(n_byzantine, n_selected)
    if accepted:
        assert aggregator(torch.ones(m, 5)).shape == (5,)
    else:
        with pytest.raises(ValueError, match="Krum"):
            aggregator(torch.ones(m, 5))


def test_validation() -> None:
    Krum(0, 1)
    with pytest.raises(ValueError, match="`n_byzantine`"):
        Krum(n_byzantine=-1)
    with pytest.raises(ValueError, match="`n_selected`"):
        Krum(1, n_selected=0)
    with pytest.raises(TypeError, match="`n_byzantine`"):
        Krum(1.5)
    aggregator = Krum(1)
    with pytest.raises(ValueError, match="`n_selected`"):
        aggregator.n_selected = 0
    aggregator.n_byzantine = 2
    assert aggregator.gramian_weighting.n_byzantine == 2
    with pytest.raises(ValueError, match="n_byzantine \\+ 3 = 5"):
        aggregator(torch.ones(4, 2))


def test_gradients() -> None:
    # The selection is constant; the average is differentiable with respect to the selected rows.
    J = J_K.clone().requires_grad_()
    out = Krum(1, 2)(J)
    assert out.requires_grad
    out.sum().backward()
    expected = torch.zeros_like(J_K)
    expected[[1, 4]] = 0.5
    assert_close(J.grad, expected)
    G = (J_K @ J_K.T).requires_grad_()
    assert not KrumWeighting(0)(G).requires_grad


def test_batched_matches_single_calls() -> None:
    J = torch.randn(3, 6, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    gramians = J @ J.mT
    weighting = KrumWeighting(1, 2)
    expected = torch.stack([weighting(G) for G in gramians])
    assert_close(type(weighting)._forward_grouped([weighting] * len(gramians), gramians), expected)


def test_repr_and_str() -> None:
    assert repr(Krum(n_byzantine=1, n_selected=2)) == "Krum(n_byzantine=1, n_selected=2)"
    assert str(Krum(n_byzantine=1, n_selected=2)) == "Krum1-2"
    assert repr(KrumWeighting(1)) == "KrumWeighting()"
