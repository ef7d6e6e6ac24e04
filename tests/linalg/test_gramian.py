import pytest
import torch

import torchjd.linalg._gramian as gramian_module
from torchjd.linalg._gramian import (
    compute_gramian,
    matrix_gramian,
    normalize,
    regularize,
    sum_of_gramians,
)


def _assert_psd(matrix: torch.Tensor) -> None:
    torch.testing.assert_close(matrix, matrix.T)
    assert (torch.linalg.eigvalsh(matrix) >= -1e-6 * max(1.0, matrix.abs().max())).all()


def test_compute_gramian_examples() -> None:
    torch.testing.assert_close(
        compute_gramian(torch.tensor([2.0, 3.0])), torch.tensor([[4.0, 6.0], [6.0, 9.0]])
    )
    torch.testing.assert_close(compute_gramian(torch.ones(2, 3, 4)), 12 * torch.ones(2, 2))
    torch.testing.assert_close(
        compute_gramian(torch.tensor([[1.0, 2.0], [3.0, 4.0]])),
        torch.tensor([[5.0, 11.0], [11.0, 25.0]]),
    )
    torch.testing.assert_close(compute_gramian(torch.zeros(5, 0)), torch.zeros(5, 5))


def test_compute_gramian_is_psd() -> None:
    generator = torch.Generator().manual_seed(0)
    for shape in [(4, 3), (6, 7, 9), (12,)]:
        _assert_psd(compute_gramian(torch.randn(shape, generator=generator)))


def test_normalize() -> None:
    torch.testing.assert_close(
        normalize(torch.tensor([[2.0, 1.0], [1.0, 2.0]]), 1e-4),
        torch.tensor([[0.5, 0.25], [0.25, 0.5]]),
    )
    torch.testing.assert_close(normalize(1e-6 * torch.eye(2), 1e-4), torch.zeros(2, 2))


def test_normalize_batched() -> None:
    batch = torch.stack([torch.tensor([[2.0, 1.0], [1.0, 2.0]]), 1e-6 * torch.eye(2)])
    out = normalize(batch, 1e-4)
    torch.testing.assert_close(out[0], torch.tensor([[0.5, 0.25], [0.25, 0.5]]))
    torch.testing.assert_close(out[1], torch.zeros(2, 2))


def test_regularize() -> None:
    out = regularize(torch.zeros(3, 3, dtype=torch.float64), 0.5)
    torch.testing.assert_close(out, 0.5 * torch.eye(3, dtype=torch.float64))
    _assert_psd(regularize(normalize(compute_gramian(torch.randn(4, 3)), 1e-4), 1e-4))


@pytest.mark.parametrize("m", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gramian_of_long_rows(m: int, dtype: torch.dtype) -> None:
    # Long rows (below the size of the column blocks): all agree with the float64 product.
    n = 1 << 17
    J = torch.randn(m, n, generator=torch.Generator().manual_seed(m), dtype=torch.float64)
    expected = J @ J.T
    G = matrix_gramian(J.to(dtype))
    assert G.dtype == dtype and G.shape == (m, m)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(G.double(), expected, rtol=tol, atol=tol * n)
    # Blocks of both kinds in one sum: a long block, a short one, a long one.
    blocks = [J.to(dtype), J[:, :100].to(dtype), J.to(dtype).flip(1)]
    summed = sum_of_gramians(blocks, dtype)
    reference = 2 * expected + J[:, :100] @ J[:, :100].T
    torch.testing.assert_close(summed.double(), reference, rtol=tol, atol=tol * n)


def test_gramian_by_column_blocks_is_differentiable() -> None:
    J = torch.randn(3, (1 << 21) + 5, dtype=torch.float64, requires_grad=True)
    assert gramian_module._by_column_blocks(J)
    weights = torch.arange(1.0, 10.0, dtype=torch.float64).view(3, 3)
    (matrix_gramian(J) * weights).sum().backward()
    # d/dJ sum_ij W_ij (J Jᵀ)_ij = (W + Wᵀ) J
    torch.testing.assert_close(J.grad, (weights + weights.T) @ J.detach())


@pytest.mark.parametrize(("m", "dtype"), [(3, torch.float32), (8, torch.float64)])
def test_gramian_by_column_blocks(m: int, dtype: torch.dtype) -> None:
    # A matrix of at least _BLOCK_MIN_BYTES with 3 to 8 rows is summed over blocks of columns
    # (the last one shorter): it agrees with the float64 product.
    n = gramian_module._BLOCK_MIN_BYTES // (m * torch.finfo(dtype).bits // 8) + 1000
    J = torch.randn(m, n, generator=torch.Generator().manual_seed(m), dtype=dtype)
    assert gramian_module._by_column_blocks(J)
    expected = J.double() @ J.double().T
    G = matrix_gramian(J)
    assert G.dtype == dtype and G.shape == (m, m)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(G.double(), expected, rtol=tol, atol=tol * n)
    summed = sum_of_gramians([J[:, :10], J], dtype)
    torch.testing.assert_close(
        summed.double(),
        expected + J[:, :10].double() @ J[:, :10].double().T,
        rtol=tol,
        atol=tol * n,
    )
