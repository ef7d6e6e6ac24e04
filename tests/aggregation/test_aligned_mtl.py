"""AlignedMTL and AlignedMTLWeighting: worked examples, cases derived by hand, validation."""

import math

import pytest
import torch
from torch.testing import assert_close

from torchjd.aggregation import AlignedMTL, AlignedMTLWeighting, ConstantWeighting, MeanWeighting

from ._matrices import J_A, J_B, ONE, ZERO, ZR


@pytest.mark.parametrize(
    ["aggregator", "matrix", "expected"],
    [
        (AlignedMTL(), J_A, [0.2133, 0.9673, 0.9673]),
        (AlignedMTL(scale_mode="rmse"), J_A, [0.5764, 2.6142, 2.6142]),
        (AlignedMTL(), J_B, [0.2916, 0.3395, 0.4435, 0.5615]),
        (AlignedMTL(scale_mode="median"), J_B, [0.5113, 0.5954, 0.7778, 0.9847]),
        (AlignedMTL(scale_mode="rmse"), J_B, [0.4953, 0.5767, 0.7535, 0.9539]),
        (AlignedMTL(pref_vector=torch.tensor([1.0, 2.0])), J_A, [2.0079, 2.7512, 2.7512]),
    ],
)
def test_worked_examples(aggregator: AlignedMTL, matrix: torch.Tensor, expected: list) -> None:
    assert_close(aggregator(matrix), torch.tensor(expected), rtol=0, atol=1e-4)


def test_worked_example_weights() -> None:
    weighting = AlignedMTLWeighting()
    assert_close(weighting(J_A @ J_A.T), torch.tensor([0.5591, 0.4083]), rtol=0, atol=1e-4)
    assert_close(weighting(J_B @ J_B.T), torch.tensor([0.2918, 0.2805, 0.1405]), rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    ["scale_mode", "expected"],
    [
        # G = diag(9, 4, 1, 0.25): B = sqrt(s) diag(1/3, 1/2, 1, 2) and p = 1/4, so every
        # coordinate of J^T B p = diag(3, 2, 1, 0.5) B p is sqrt(s) / 4.
        ("min", math.sqrt(0.25) / 4),  # s = 0.25
        ("median", math.sqrt(1.0) / 4),  # lower median of (0.25, 1, 4, 9) is 1
        ("rmse", math.sqrt(14.25 / 4) / 4),  # mean of the eigenvalues
    ],
)
def test_orthogonal_rows_by_hand(scale_mode: str, expected: float) -> None:
    J = torch.diag(torch.tensor([3.0, 2.0, 1.0, 0.5], dtype=torch.float64))
    out = AlignedMTL(scale_mode=scale_mode)(J)
    assert_close(out, torch.full((4,), expected, dtype=torch.float64))


def test_median_is_the_lower_one_for_an_odd_number_of_kept_eigenvalues() -> None:
    # G = diag(16, 4, 1): median 4, so every coordinate is sqrt(4) / 3.
    J = torch.diag(torch.tensor([4.0, 2.0, 1.0], dtype=torch.float64))
    assert_close(AlignedMTL(scale_mode="median")(J), torch.full((3,), 2.0 / 3, dtype=torch.float64))


def test_rank_deficient_uses_only_the_non_zero_directions() -> None:
    # Two equal rows g: G = |g|^2 [[1, 1], [1, 1]] has one non-zero eigenvalue s = 2|g|^2, with
    # v = (1, 1) / sqrt(2), so B = sqrt(s) v v^T / sqrt(s) = v v^T and B p = p: the mean, i.e. g.
    g = torch.tensor([1.0, -2.0, 2.0], dtype=torch.float64)
    assert_close(AlignedMTL()(torch.stack([g, g])), g)


def test_rank_tolerance_uses_the_dtype_epsilon() -> None:
    # G = diag(1, 1e-9): in float64 both eigenvalues are kept (tolerance 2 * 2.2e-16) and "min"
    # gives s = 1e-9, so w = sqrt(1e-9) * (p1 / 1, p2 / sqrt(1e-9)); in float32 the tolerance is
    # 2 * 1.19e-7, only the eigenvalue 1 is kept, s = 1 and w = (p1, 0).
    G = torch.diag(torch.tensor([1.0, 1e-9]))
    expected64 = torch.tensor([0.5 * math.sqrt(1e-9), 0.5], dtype=torch.float64)
    assert_close(AlignedMTLWeighting()(G.double()), expected64)
    assert_close(AlignedMTLWeighting()(G), torch.tensor([0.5, 0.0]))


def test_edge_cases() -> None:
    assert torch.equal(AlignedMTL()(ZERO), torch.zeros(3))
    assert_close(AlignedMTL()(ONE), ONE[0])
    assert_close(AlignedMTL()(ZR), torch.tensor([0.5, 1.0, -0.5]))
    assert AlignedMTL()(torch.zeros(2, 0)).shape == (0,)
    with pytest.raises(ValueError, match="m >= 1"):
        AlignedMTL()(torch.zeros(0, 3))


def test_invalid_scale_mode_is_rejected_at_call_time_only_for_a_non_zero_matrix() -> None:
    aggregator = AlignedMTL(scale_mode="test")  # no validation at construction
    with pytest.raises(ValueError, match=r"Invalid scale_mode=.*Expected"):
        aggregator(torch.ones(3, 4))
    assert torch.equal(aggregator(torch.zeros(2, 3)), torch.zeros(3))
    aggregator.scale_mode = "min"
    assert_close(aggregator(J_A), torch.tensor([0.2133, 0.9673, 0.9673]), rtol=0, atol=1e-4)


def test_pref_vector() -> None:
    p = torch.tensor([1.0, 2.0])
    aggregator = AlignedMTL(pref_vector=p)
    assert aggregator.pref_vector is p
    assert isinstance(aggregator.gramian_weighting.weighting, ConstantWeighting)
    assert aggregator.gramian_weighting.weighting.weights is p
    aggregator.pref_vector = None
    assert isinstance(aggregator.gramian_weighting.weighting, MeanWeighting)
    with pytest.raises(ValueError, match="`pref_vector`"):
        AlignedMTL(pref_vector=torch.ones(2, 2))
    with pytest.raises(ValueError, match="`pref_vector`"):
        aggregator.pref_vector = torch.ones(())
    with pytest.raises(ValueError):
        AlignedMTL(pref_vector=torch.ones(3))(J_A)


def test_pref_vector_of_another_dtype_is_cast() -> None:
    out = AlignedMTL(pref_vector=torch.tensor([1.0, 2.0]))(J_A.double())
    assert out.dtype == torch.float64
    assert_close(
        out, torch.tensor([2.0079, 2.7512, 2.7512], dtype=torch.float64), rtol=0, atol=1e-4
    )


def test_differentiable() -> None:
    G = (J_B @ J_B.T).double().requires_grad_()
    assert AlignedMTLWeighting()(G).requires_grad
    J = J_B.double().requires_grad_()
    out = AlignedMTL()(J)
    assert out.requires_grad
    # Distinct eigenvalues: the eigendecomposition is differentiable, and so is the result.
    for mode in ("min", "median", "rmse"):
        torch.autograd.gradcheck(AlignedMTL(scale_mode=mode), (J,))


def test_gradient_of_a_rank_deficient_matrix_is_finite() -> None:
    J = torch.tensor([[1.0, 2.0, 0.0], [2.0, 4.0, 0.0], [0.0, 1.0, 1.0]], dtype=torch.float64)
    J.requires_grad_()
    AlignedMTL()(J).sum().backward()
    assert torch.isfinite(J.grad).all()


def test_repr_and_str() -> None:
    assert repr(AlignedMTL()) == "AlignedMTL(pref_vector=None, scale_mode='min')"
    assert str(AlignedMTL()) == "AlignedMTL"
    aggregator = AlignedMTL(torch.tensor([0.333333, 2.5]), scale_mode="rmse")
    assert repr(aggregator) == "AlignedMTL(pref_vector=tensor([0.3333, 2.5000]), scale_mode='rmse')"
    assert str(aggregator) == "AlignedMTL([0.33, 2.5])"
    assert repr(AlignedMTLWeighting()) == "AlignedMTLWeighting(\n  (weighting): MeanWeighting()\n)"
    assert AlignedMTL(scale_mode="median").scale_mode == "median"


def test_batched_matches_single_calls() -> None:
    J = torch.randn(4, 3, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    J[1, 2] = J[1, 0]  # a rank-deficient Gramian in the batch
    J[2] = 0.0  # and a zero one
    gramians = J @ J.mT
    for mode in ("min", "median", "rmse"):
        weighting = AlignedMTLWeighting(pref_vector=torch.tensor([1.0, 2.0, 0.5]), scale_mode=mode)
        expected = torch.stack([weighting(G) for G in gramians])
        assert_close(
            type(weighting)._forward_grouped([weighting] * len(gramians), gramians), expected
        )
    assert AlignedMTLWeighting._forward_grouped([], torch.zeros(0, 3, 3)).shape == (0, 3)
