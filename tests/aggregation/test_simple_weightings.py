"""Mean, Sum, Constant and Random: the weightings that only look at the number of rows."""

import pytest
import torch

from torchjd.aggregation import (
    Constant,
    ConstantWeighting,
    Mean,
    MeanWeighting,
    Random,
    RandomWeighting,
    Sum,
    SumWeighting,
)

from ._matrices import J_A, J_B


def test_mean_values() -> None:
    torch.testing.assert_close(Mean()(J_A), torch.tensor([1.0, 1.0, 1.0]))
    torch.testing.assert_close(Mean()(J_B), torch.tensor([1 / 6, 0.5, 2 / 3, 1.0]))
    torch.testing.assert_close(MeanWeighting()(J_A @ J_A.T), torch.tensor([0.5, 0.5]))


def test_mean_of_no_rows_is_an_error() -> None:
    with pytest.raises(ValueError, match="m >= 1 rows"):
        Mean()(torch.zeros(0, 3))


def test_sum_values() -> None:
    torch.testing.assert_close(Sum()(J_A), torch.tensor([2.0, 2.0, 2.0]))
    torch.testing.assert_close(Sum()(J_B), torch.tensor([0.5, 1.5, 2.0, 3.0]))
    torch.testing.assert_close(Sum()(torch.zeros(0, 3)), torch.zeros(3))


def test_constant_values() -> None:
    torch.testing.assert_close(Constant(torch.tensor([1.0, 2.0]))(J_A), torch.tensor([8.0, 3, 3]))
    out = Constant(torch.tensor([0.5, -1.0, 2.0]))(J_B)
    torch.testing.assert_close(out, torch.tensor([-2.0, -1.5, 4.0, 3.0]))
    weights = torch.tensor([1.0, 2.0])
    assert ConstantWeighting(weights)(J_A @ J_A.T) is weights


def test_constant_validation() -> None:
    for bad in (torch.ones(()), torch.ones(1, 1)):
        with pytest.raises(ValueError, match="`weights`"):
            Constant(bad)
    Constant(torch.ones(0))
    with pytest.raises(ValueError, match="4 weights but the input has 5 rows"):
        Constant(torch.ones(4))(torch.ones(5, 5))
    torch.testing.assert_close(Constant(torch.ones(0))(torch.zeros(0, 3)), torch.zeros(3))


def test_constant_casts_weights_to_the_matrix_dtype() -> None:
    out = Constant(torch.tensor([1.0, 2.0]))(J_A.double())
    assert out.dtype == torch.float64


def test_constant_string_forms() -> None:
    assert repr(Constant(torch.tensor([1.0, 2.0]))) == "Constant(weights=tensor([1., 2.]))"
    assert str(Constant(torch.tensor([1.0, 2.0]))) == "Constant([1., 2.])"
    assert (
        str(Constant(torch.tensor([0.1234, 1.005, 10.0, -0.5])))
        == "Constant([0.12, 1., 10., -0.5])"
    )
    assert repr(ConstantWeighting(torch.tensor([1.0]))) == "ConstantWeighting()"


def test_random_follows_the_global_seed() -> None:
    torch.manual_seed(0)
    z = torch.randn(2)
    expected_weights = torch.exp(z) / torch.exp(z).sum()
    torch.manual_seed(0)
    torch.testing.assert_close(RandomWeighting()(J_A @ J_A.T), expected_weights)
    torch.manual_seed(0)
    torch.testing.assert_close(Random()(J_A), expected_weights @ J_A)


def test_random_spec_values() -> None:
    torch.manual_seed(0)
    torch.testing.assert_close(Random()(J_A), torch.tensor([-2.6229, 1.0, 1.0]), atol=1e-4, rtol=0)
    torch.manual_seed(0)
    out = Random()(J_B)
    torch.testing.assert_close(
        out, torch.tensor([0.8916, -0.5646, 1.5748, 0.1758]), atol=1e-4, rtol=0
    )


def test_random_weights_are_positive_and_sum_to_one() -> None:
    weights = RandomWeighting()(torch.zeros(7, 7, dtype=torch.float64))
    assert (weights > 0).all() and weights.dtype == torch.float64
    torch.testing.assert_close(weights.sum(), torch.tensor(1.0, dtype=torch.float64))


@pytest.mark.parametrize(
    ("aggregator", "name"), [(Mean(), "Mean"), (Sum(), "Sum"), (Random(), "Random")]
)
def test_string_forms(aggregator: torch.nn.Module, name: str) -> None:
    assert repr(aggregator) == f"{name}()" and str(aggregator) == name
    assert repr(aggregator.weighting) == f"{name}Weighting()"


def test_weights_do_not_require_grad() -> None:
    matrix = J_B.clone().requires_grad_()
    for weighting in (MeanWeighting(), SumWeighting(), RandomWeighting()):
        assert not weighting(matrix).requires_grad
    assert Mean()(matrix).requires_grad
