"""IMTLG and IMTLGWeighting: worked examples, the impartiality property, edge cases."""

import math

import pytest
import torch
from torch.testing import assert_close

from torchjd.aggregation import IMTLG, IMTLGWeighting

from ._matrices import J_A, J_B, ONE, ZERO, ZR


def test_worked_examples() -> None:
    assert_close(IMTLG()(J_A), torch.tensor([0.0767, 1.0, 1.0]), rtol=0, atol=1e-4)
    assert_close(IMTLGWeighting()(J_A @ J_A.T), torch.tensor([0.5923, 0.4077]), rtol=0, atol=1e-4)
    assert_close(IMTLG()(J_B), torch.tensor([0.6493, 0.4765, 0.5534, 0.5818]), rtol=0, atol=1e-4)
    expected = torch.tensor([0.4779, 0.4623, 0.0598])
    assert_close(IMTLGWeighting()(J_B @ J_B.T), expected, rtol=0, atol=1e-4)


def test_duplicated_rows_share_their_weight() -> None:
    J = torch.tensor([[1.0, 2.0, 0.0], [1.0, 2.0, 0.0], [0.0, -1.0, 1.0]])
    assert_close(IMTLG()(J), torch.tensor([0.3874, 0.1623, 0.6126]), rtol=0, atol=1e-4)
    weights = IMTLGWeighting()(J @ J.T)
    assert_close(weights[0], weights[1])


def test_orthogonal_rows_by_hand() -> None:
    # G = diag(9, 16): v = G^-1 (3, 4) = (1/3, 1/4), w = v / (7/12) = (4/7, 3/7), d = (12/7, 12/7).
    J = torch.tensor([[3.0, 0.0], [0.0, 4.0]], dtype=torch.float64)
    assert_close(IMTLGWeighting()(J @ J.T), torch.tensor([4 / 7, 3 / 7], dtype=torch.float64))
    assert_close(IMTLG()(J), torch.tensor([12 / 7, 12 / 7], dtype=torch.float64))


@pytest.mark.parametrize("m", [2, 3, 5])
def test_equal_projections_on_the_unit_rows(m: int) -> None:
    # For linearly independent rows, d = J^T w with 1^T w = 1 has the same projection on every
    # g_i / ||g_i|| (the defining property of IMTL-G).
    J = torch.randn(m, m + 2, generator=torch.Generator().manual_seed(m), dtype=torch.float64)
    weights = IMTLGWeighting()(J @ J.T)
    assert_close(weights.sum(), torch.tensor(1.0, dtype=torch.float64))
    projections = (J / J.norm(dim=1, keepdim=True)) @ (weights @ J)
    assert_close(projections, projections[0].expand(m))


def test_edge_cases() -> None:
    assert torch.equal(IMTLG()(ZERO), torch.zeros(3))
    assert_close(IMTLG()(ONE), ONE[0])
    assert_close(IMTLG()(ZR), torch.tensor([1.0, 2.0, -1.0]))
    assert_close(IMTLGWeighting()(ZR @ ZR.T), torch.tensor([0.0, 1.0]))
    assert torch.equal(IMTLG()(torch.zeros(0, 3)), torch.zeros(3))
    assert IMTLG()(torch.zeros(2, 0)).shape == (0,)


def test_weights_vanish_when_their_sum_is_below_the_threshold() -> None:
    # v = G^+ d scales as 1 / ||g||: with rows of norm about 1e13, 1^T v < 1e-12.
    J = 1e13 * J_B.double()
    assert torch.equal(IMTLGWeighting()(J @ J.T), torch.zeros(3, dtype=torch.float64))
    assert_close(IMTLG()(1e5 * J_B.double()), 1e5 * IMTLG()(J_B.double()))


def test_batched_matches_single_calls() -> None:
    J = torch.randn(4, 3, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    gramians = J @ J.mT
    expected = torch.stack([IMTLGWeighting()(G) for G in gramians])
    assert_close(
        IMTLGWeighting._forward_grouped([IMTLGWeighting()] * len(gramians), gramians), expected
    )


def test_dtype_and_no_grad() -> None:
    assert IMTLG()(J_A.double()).dtype == torch.float64
    J = J_B.clone().requires_grad_()
    assert not IMTLG()(J).requires_grad
    assert not IMTLGWeighting()(J @ J.T).requires_grad


def test_repr_and_str() -> None:
    assert repr(IMTLG()) == "IMTLG()"
    assert str(IMTLG()) == "IMTLG"
    assert repr(IMTLGWeighting()) == "IMTLGWeighting()"


def _reference_weights(G: torch.Tensor) -> torch.Tensor:
    """The definition, through the SVD-based pseudo-inverse."""
    v = torch.linalg.pinv(G) @ G.diagonal().clamp(min=0.0).sqrt()
    return v / v.sum() if v.sum().abs() >= 1e-12 else torch.zeros_like(v)


@pytest.mark.parametrize("m", [2, 3, 8, 32])
def test_matches_the_pseudo_inverse_on_a_bank(m: int) -> None:
    generator = torch.Generator().manual_seed(m)
    for kind in ("random", "rank_deficient", "duplicated", "tiny", "huge"):
        n = max(1, m // 2) if kind == "rank_deficient" else 2 * m
        J = torch.randn(m, n, generator=generator, dtype=torch.float64)
        if kind == "duplicated":
            J[1] = J[0]
        J = J * {"tiny": 1e-4, "huge": 1e4}.get(kind, 1.0)
        G = J @ J.T
        assert_close(IMTLGWeighting()(G), _reference_weights(G), rtol=1e-7, atol=1e-9, msg=kind)
        G32 = G.float()
        assert_close(IMTLGWeighting()(G32), _reference_weights(G32), rtol=1e-3, atol=1e-4)


def test_one_row_by_hand() -> None:
    # G = [g]: v = 1 / sqrt(g) > 0, so w = 1; zero or negative g: v = 0, so w = 0.
    assert_close(IMTLGWeighting()(torch.tensor([[4.0]])), torch.tensor([1.0]))
    assert_close(IMTLGWeighting()(torch.tensor([[1e-30]])), torch.tensor([1.0]))
    assert torch.equal(IMTLGWeighting()(torch.tensor([[0.0]])), torch.tensor([0.0]))
    assert torch.equal(IMTLGWeighting()(torch.tensor([[-1.0]])), torch.tensor([0.0]))
    # 1 / sqrt(1e26) = 1e-13 < 1e-12: below the threshold.
    assert torch.equal(IMTLGWeighting()(torch.tensor([[1e26]])), torch.tensor([0.0]))
    assert_close(IMTLG()(torch.tensor([[3.0, -1.0]])), torch.tensor([3.0, -1.0]))


@pytest.mark.parametrize("m", [1, 2, 5])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_gramian_gives_non_finite_weights(m: int, bad: float) -> None:
    G = torch.eye(m)
    G[0, 0] = bad
    assert not IMTLGWeighting()(G).isfinite().all()


def test_half_precision_is_solved_in_float32() -> None:
    J = torch.randn(4, 6, generator=torch.Generator().manual_seed(3))
    G = J @ J.T
    weights = IMTLGWeighting()(G.half())
    assert weights.dtype == torch.float16
    assert_close(weights.float(), IMTLGWeighting()(G.half().float()), rtol=1e-3, atol=1e-3)


def test_two_rows_by_hand() -> None:
    # Independent rows: G^{-1} d = (||g_2||, ||g_1||) / (||g_1|| ||g_2|| + g_1.g_2), so the weights
    # are the swapped norms, normalised: rows of norms 3 and 4 (any angle) get (4/7, 3/7).
    for angle in (0.3, 1.5, 2.9):
        J = torch.tensor(
            [[3.0, 0.0], [4 * math.cos(angle), 4 * math.sin(angle)]], dtype=torch.float64
        )
        assert_close(IMTLGWeighting()(J @ J.T), torch.tensor([4 / 7, 3 / 7], dtype=torch.float64))
    # Rank one, G = l q q^T: G^+ d is parallel to q, so w = q / (q_1 + q_2). Rows g and 2g:
    # q ∝ (1, 2), w = (1/3, 2/3); rows g and -2g: q ∝ (1, -2), w = (-1, 2).
    g = torch.tensor([[1.0, -2.0, 2.0]], dtype=torch.float64)
    for factor, expected in ((2.0, [1 / 3, 2 / 3]), (-2.0, [-1.0, 2.0])):
        J = torch.cat([g, factor * g])
        assert_close(IMTLGWeighting()(J @ J.T), torch.tensor(expected, dtype=torch.float64))
    # One zero row: G^+ d = (1 / ||g||, 0), w = (1, 0) (and (0, 1) swapped).
    J = torch.cat([g, torch.zeros_like(g)])
    assert_close(IMTLGWeighting()(J @ J.T), torch.tensor([1.0, 0.0], dtype=torch.float64))
    assert_close(
        IMTLGWeighting()(J.flip(0) @ J.flip(0).T), torch.tensor([0.0, 1.0], dtype=torch.float64)
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_two_rows_match_the_pseudo_inverse_and_the_batched_path(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(5)
    tol = {"rtol": 1e-7, "atol": 1e-9} if dtype == torch.float64 else {"rtol": 1e-3, "atol": 1e-4}
    for _ in range(50):
        J = torch.randn(2, 3, generator=generator, dtype=torch.float64)
        kind = int(torch.randint(4, (), generator=generator))
        if kind == 1:  # parallel or anti-parallel rows
            J[1] = torch.randn((), generator=generator, dtype=torch.float64) * J[0]
        elif kind == 2:  # very different norms
            J[0] *= 1e-3
        G = (J @ J.T).to(dtype)
        weights = IMTLGWeighting()(G)
        # pinv's tolerance in G's dtype, applied to the exact pseudo-inverse of the rounded G.
        G64 = G.double()
        v = torch.linalg.pinv(G64, rtol=2 * torch.finfo(dtype).eps) @ G64.diagonal().sqrt()
        assert_close(weights, (v / v.sum()).to(dtype), **tol)
        assert_close(
            IMTLGWeighting._forward_grouped([IMTLGWeighting()], G[None])[0], weights, **tol
        )
    # Not positive semi-definite (the formula only needs an invertible G).
    G = torch.tensor([[1.0, 2.0], [2.0, -3.0]], dtype=dtype)
    assert_close(IMTLGWeighting()(G), _reference_weights(G.double()).to(dtype))
    G = torch.tensor([[-1.0, 0.0], [0.0, -4.0]], dtype=dtype)
    assert_close(IMTLGWeighting()(G), _reference_weights(G.double()).to(dtype))
