"""TrimmedMean: worked examples, the sort-based definition, gradients, validation."""

import pytest
import torch
from torch import Tensor
from torch.testing import assert_close

from torchjd.aggregation import Mean, TrimmedMean

from ._matrices import J_B

J_T = torch.tensor([[1e11, 3.0], [1.0, -1e11], [-1e10, 1e10], [2.0, 2.0]])


def _by_definition(J: Tensor, trim_number: int) -> Tensor:
    """Sort every column, drop the extremes, average the rest."""
    m = J.shape[0]
    return J.sort(dim=0).values[trim_number : m - trim_number].mean(dim=0)


def test_worked_examples() -> None:
    assert_close(TrimmedMean(1)(J_T), torch.tensor([1.5, 2.5]))
    assert_close(TrimmedMean(1)(J_B), torch.tensor([0.5, 0.5, 1.0, 1.0]))


def test_by_hand() -> None:
    # Column (5, -1, 2, 2, 9, 0, 2) sorted: -1, 0, 2, 2, 2, 5, 9. Trimming 2 keeps 2, 2, 2;
    # trimming 1 keeps 0, 2, 2, 2, 5 (mean 11 / 5).
    # Column (1, 2, 3, 4, 5, 6, 100): trimming 1 keeps 2..6 (mean 4), trimming 3 keeps 4.
    J = torch.tensor([[5.0, 1.0], [-1, 2], [2, 3], [2, 4], [9, 5], [0, 6], [2, 100]])
    assert_close(TrimmedMean(2)(J), torch.tensor([2.0, 4.0]))
    assert_close(TrimmedMean(1)(J), torch.tensor([11 / 5, 4.0]))
    assert_close(TrimmedMean(3)(J), torch.tensor([2.0, 4.0]))


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8, 13, 32])
def test_matches_the_definition(m: int) -> None:
    generator = torch.Generator().manual_seed(m)
    continuous = torch.randn(m, 50, generator=generator, dtype=torch.float64)
    with_ties = torch.randint(-2, 3, (m, 50), generator=generator).double()
    for trim_number in range((m - 1) // 2 + 1):
        for J in (continuous, with_ties):
            assert_close(TrimmedMean(trim_number)(J), _by_definition(J, trim_number))


def test_many_chunks_of_columns() -> None:
    J = torch.randn(5, 150_000, generator=torch.Generator().manual_seed(0))
    assert_close(TrimmedMean(2)(J), _by_definition(J, 2))


def test_huge_outliers_do_not_enter_the_sum() -> None:
    J = torch.tensor([[1.0, -2.0], [1e30, 3.0], [2.0, -1e30], [3.0, 4.0], [-1e30, 1e30]])
    assert_close(TrimmedMean(1)(J), torch.tensor([2.0, 5.0 / 3]))


def test_zero_trim_is_the_mean() -> None:
    J = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    assert_close(TrimmedMean(0)(J), Mean()(J))
    assert_close(TrimmedMean(0)(J[:1]), J[0])


def test_gradient_spreads_over_the_kept_values() -> None:
    J = torch.randn(7, 20, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ours = J.clone().requires_grad_()
    reference = J.clone().requires_grad_()
    weights = torch.randn(20, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    (TrimmedMean(2)(ours) @ weights).backward()
    (_by_definition(reference, 2) @ weights).backward()
    assert_close(ours.grad, reference.grad)


def test_edge_cases() -> None:
    assert torch.equal(TrimmedMean(1)(torch.zeros(3, 3)), torch.zeros(3))
    assert TrimmedMean(1)(torch.zeros(3, 0)).shape == (0,)
    assert TrimmedMean(1)(J_B.double()).dtype == torch.float64


@pytest.mark.parametrize(
    ["m", "trim_number", "accepted"], [(1, 0, True), (1, 1, False), (10, 4, True), (10, 5, False)]
)
def test_number_of_rows(m: int, trim_number: int, accepted: bool) -> None:
    if accepted:
        assert TrimmedMean(trim_number)(torch.ones(m, 5)).shape == (5,)
    else:
        with pytest.raises(ValueError, match=f"{2 * trim_number + 1} rows"):
            TrimmedMean(trim_number)(torch.ones(m, 5))
    with pytest.raises(ValueError, match="at least"):
        TrimmedMean(0)(torch.zeros(0, 5))


def test_validation() -> None:
    with pytest.raises(ValueError, match="`trim_number`"):
        TrimmedMean(-1)
    with pytest.raises(TypeError, match="`trim_number`"):
        TrimmedMean(1.0)
    aggregator = TrimmedMean(1)
    with pytest.raises(ValueError, match="`trim_number`"):
        aggregator.trim_number = -2
    aggregator.trim_number = 2
    assert aggregator.trim_number == 2


def test_repr_and_str() -> None:
    assert repr(TrimmedMean(trim_number=2)) == "TrimmedMean(trim_number=2)"
    assert str(TrimmedMean(trim_number=2)) == "TM2"
