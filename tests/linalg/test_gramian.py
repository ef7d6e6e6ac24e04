import torch

from torchjd.linalg._gramian import compute_gramian, normalize, regularize


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
