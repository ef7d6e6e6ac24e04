"""ConFIG: worked examples, the definition with an explicit pseudo-inverse, edge cases."""

import pytest
import torch
from torch.testing import assert_close

from torchjd.aggregation import ConFIG, ConstantWeighting, SumWeighting

from ._matrices import J_A, J_B, ONE, ZERO, ZR


def _by_definition(
    J: torch.Tensor, p: torch.Tensor | None = None, rtol: float | None = None
) -> torch.Tensor:
    """The paper's formula, written directly on the unit rows (materialised here)."""
    p = torch.ones(J.shape[0], dtype=J.dtype) if p is None else p.to(J.dtype)
    norms = J.norm(dim=1, keepdim=True)
    units = torch.where(norms > 0, J / torch.where(norms > 0, norms, 1.0), 0.0)
    d = torch.linalg.pinv(units, rtol=rtol) @ p
    u = d / d.norm().clamp(min=1e-12)
    return (J @ u).sum() * u


@pytest.mark.parametrize(
    ["pref_vector", "matrix", "expected"],
    [
        (None, J_A, [0.1588, 2.0706, 2.0706]),
        (None, J_B, [1.9536, 1.4337, 1.6651, 1.7507]),
        ([1.0, 2.0, 3.0], J_B, [0.7866, 1.7764, 1.7458, 2.9062]),
        ([1.0, 2.0], J_A, [0.4684, 2.1656, 2.1656]),
    ],
)
def test_worked_examples(pref_vector: list | None, matrix: torch.Tensor, expected: list) -> None:
    p = None if pref_vector is None else torch.tensor(pref_vector)
    assert_close(ConFIG(p)(matrix), torch.tensor(expected), rtol=0, atol=1e-4)


def test_orthogonal_rows_by_hand() -> None:
    # Orthogonal rows g1 = (3, 0), g2 = (0, 4): the unit rows are e1, e2, d = (1, 1),
    # u = (1, 1)/sqrt(2), sum of projections (3 + 4)/sqrt(2), result (7/2, 7/2).
    J = torch.tensor([[3.0, 0.0], [0.0, 4.0]], dtype=torch.float64)
    assert_close(ConFIG()(J), torch.tensor([3.5, 3.5], dtype=torch.float64))
    # With p = (1, 3): d = (1, 3), u = (1, 3)/sqrt(10), sum (3 + 12)/sqrt(10), result 1.5 (1, 3).
    assert_close(ConFIG(torch.tensor([1.0, 3.0]))(J), torch.tensor([1.5, 4.5], dtype=torch.float64))


@pytest.mark.parametrize("shape", [(1, 4), (2, 5), (3, 3), (4, 2), (6, 9)])
def test_matches_the_definition(shape: tuple[int, int]) -> None:
    generator = torch.Generator().manual_seed(shape[0] * 17 + shape[1])
    J = torch.randn(shape, generator=generator, dtype=torch.float64)
    low_rank = J[:, :1] @ torch.randn(1, shape[1], generator=generator, dtype=torch.float64)
    duplicated = torch.cat([J[:1], J[:-1]])
    p = torch.rand(shape[0], generator=generator, dtype=torch.float64) + 0.5
    for matrix in (J, low_rank, duplicated, 1e-6 * J, 1e6 * J):
        atol = 1e-9 * matrix.abs().max()
        assert_close(ConFIG()(matrix), _by_definition(matrix), rtol=1e-8, atol=atol)
        assert_close(ConFIG(p)(matrix), _by_definition(matrix, p), rtol=1e-8, atol=atol)


def test_drops_small_singular_values_as_pinv_does() -> None:
    # With n = 100000 columns in float32, pinv's default relative tolerance is
    # max(m, n) * eps = 0.0119: two unit rows at an angle theta have singular values
    # sqrt(1 +- cos(theta)), whose ratio crosses it between the two angles below. With p = (1, 2),
    # dropping the small one changes the result completely.
    n = 100_000
    p = torch.tensor([1.0, 2.0])
    generator = torch.Generator().manual_seed(0)
    e1 = torch.randn(n, generator=generator)
    e1 = e1 / e1.norm()
    e2 = torch.randn(n, generator=generator)
    e2 = e2 - (e2 @ e1) * e1
    e2 = e2 / e2.norm()
    for theta in (0.010, 0.030):  # ratio ~ theta / 2: below, then above the tolerance
        g1 = 2.0 * e1
        g2 = 3.0 * (torch.cos(torch.tensor(theta)) * e1 + torch.sin(torch.tensor(theta)) * e2)
        J = torch.stack([g1, g2])
        # The definition in float64 with float32's tolerance (more accurate than pinv's float32
        # SVD of this wide matrix).
        expected = _by_definition(J.double(), p, rtol=torch.finfo(torch.float32).eps * n)
        scale = expected.abs().max()
        assert_close(ConFIG(p)(J).double(), expected, rtol=1e-4, atol=1e-4 * scale)
        untruncated = _by_definition(J.double(), p, rtol=0.0)
        assert ((untruncated - expected).abs().max() > 0.1 * scale) == (theta < 0.02)


def test_linear_under_scaling() -> None:
    J = torch.randn(4, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert_close(ConFIG()(7.5 * J), 7.5 * ConFIG()(J))


def test_edge_cases() -> None:
    assert torch.equal(ConFIG()(ZERO), torch.zeros(3))
    assert_close(ConFIG()(ONE), ONE[0])
    assert_close(ConFIG()(ZR), torch.tensor([1.0, 2.0, -1.0]))
    assert torch.equal(ConFIG()(torch.zeros(0, 3)), torch.zeros(3))
    assert ConFIG()(torch.zeros(2, 0)).shape == (0,)


def test_pref_vector() -> None:
    assert isinstance(ConFIG().weighting, SumWeighting)
    p = torch.tensor([1.0, 2.0, 3.0])
    aggregator = ConFIG(p)
    assert aggregator.pref_vector is p
    assert isinstance(aggregator.weighting, ConstantWeighting)
    assert aggregator.weighting.weights is p
    aggregator.pref_vector = None
    assert isinstance(aggregator.weighting, SumWeighting)
    with pytest.raises(ValueError, match="`pref_vector`"):
        ConFIG(torch.ones(2, 2))
    with pytest.raises(ValueError):
        ConFIG(torch.tensor([1.0, 2.0, 3.0]))(J_A)


def test_dtype_and_no_grad() -> None:
    assert ConFIG()(J_A.double()).dtype == torch.float64
    J = J_B.clone().requires_grad_()
    assert not ConFIG()(J).requires_grad


def test_repr_and_str() -> None:
    assert repr(ConFIG()) == "ConFIG(pref_vector=None)"
    p = torch.tensor([1.0, 2.0, 3.0])
    assert repr(ConFIG(pref_vector=p)) == "ConFIG(pref_vector=tensor([1., 2., 3.]))"
    assert str(ConFIG()) == "ConFIG"
    assert str(ConFIG(p)) == "ConFIG([1., 2., 3.])"
