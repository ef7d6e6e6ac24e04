"""The exact min-norm point of the convex hull: KKT conditions, quadprog, and hard inputs."""

import numpy as np
import pytest
import quadprog
import torch
from torch import Tensor
from torch.testing import assert_close

from torchjd.linalg._min_norm import min_norm_weights


def _quadprog_weights(gramian: Tensor) -> Tensor:
    """Independent reference: argmin of a^T G a over the simplex (G regularised to be definite)."""
    m = gramian.shape[0]
    regularised = gramian.numpy() + 1e-12 * np.trace(gramian.numpy()) * np.eye(m)
    constraints = np.concatenate([np.ones((m, 1)), np.eye(m)], axis=1)
    bounds = np.concatenate([[1.0], np.zeros(m)])
    solution = quadprog.solve_qp(regularised, np.zeros(m), constraints, bounds, meq=1)[0]
    return torch.from_numpy(solution)


def _assert_kkt(matrix: Tensor, alpha: Tensor, tolerance: float) -> None:
    """On the simplex, and g_i . d >= ||d||^2 per row (relative to ||g_i|| ||d||, plus the
    rounding of d = J^T alpha, which dominates where d is 0 up to rounding)."""
    assert bool((alpha >= 0).all())
    assert_close(alpha.sum(), torch.tensor(1.0, dtype=alpha.dtype))
    d = matrix.T @ alpha
    slack = matrix @ d - d @ d
    row_norms = matrix.norm(dim=1)
    rounding = 64 * torch.finfo(matrix.dtype).eps * row_norms * (alpha @ row_norms)
    assert bool((slack >= -tolerance * row_norms * d.norm() - rounding).all()), slack


@pytest.mark.parametrize(("m", "n", "seed"), [(3, 5, 0), (10, 20, 1), (20, 5, 2), (64, 128, 3)])
def test_agrees_with_quadprog(m: int, n: int, seed: int) -> None:
    matrix = torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    gramian = matrix @ matrix.T
    alpha = min_norm_weights(gramian)
    _assert_kkt(matrix, alpha, 1e-9)
    expected = _quadprog_weights(gramian)
    assert_close(matrix.T @ alpha, matrix.T @ expected, atol=1e-6 * matrix.norm(), rtol=0)


@pytest.mark.parametrize("seed", range(10))
def test_rows_of_very_different_norms(seed: int) -> None:
    # Norms from 1e-6 to 1e6: the min-norm point is about as short as the shortest row, so a
    # tolerance relative to the largest row would accept a point that conflicts with the short ones.
    generator = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-6, 6, 8, dtype=torch.float64)[torch.randperm(8, generator=generator)]
    matrix = torch.randn(8, 6, generator=generator, dtype=torch.float64) * scales.unsqueeze(1)
    _assert_kkt(matrix, min_norm_weights(matrix @ matrix.T), 1e-9)


def test_pareto_stationary_and_degenerate_rows() -> None:
    # 0 = (1000, 3) a + (1, -1000) b + (-100, 100) c + (2, 2) e for some a, b, c, e >= 0.
    matrix = torch.tensor([[1000.0, 3], [1, -1000], [-100, 100], [2, 2]], dtype=torch.float64)
    d = matrix.T @ min_norm_weights(matrix @ matrix.T)
    assert float(d.norm()) <= 1e-12 * float(matrix.norm())
    zeros = torch.zeros(3, 3, dtype=torch.float64)
    assert_close(min_norm_weights(zeros).sum(), torch.tensor(1.0, dtype=torch.float64))
    rows = torch.randn(4, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    opposite = torch.cat([rows, -rows])
    d = opposite.T @ min_norm_weights(opposite @ opposite.T)
    assert float(d.norm()) <= 1e-12 * float(opposite.norm())
    duplicated = torch.cat([rows, rows])
    _assert_kkt(duplicated, min_norm_weights(duplicated @ duplicated.T), 1e-9)


def test_differentiable() -> None:
    # Two rows, the min-norm point inside the segment:
    # alpha_0 = (G11 - G01) / (G00 + G11 - 2 G01).
    gramian = torch.tensor([[4.0, 1.0], [1.0, 2.0]], dtype=torch.float64, requires_grad=True)
    alpha = min_norm_weights(gramian)
    assert_close(alpha, torch.tensor([0.25, 0.75], dtype=torch.float64))
    (grad,) = torch.autograd.grad(alpha[0], gramian)
    # d alpha_0 / d G00 = -(G11 - G01) / (G00 + G11 - 2 G01)^2 = -1 / 16.
    assert_close(grad[0, 0], torch.tensor(-1 / 16, dtype=torch.float64))
