"""Reshaping, moving dims of and flattening generalised Gramians (shape S + reversed(S))."""

import pytest
import torch
from torch import Tensor

from torchjd.linalg._gramian import flatten_gramian, movedim_gramian, reshape_gramian


def _generalized_gramian(a: Tensor) -> Tensor:
    """G[i_1..i_k, j_k..j_1] = <a[i_1..i_k], a[j_1..j_k]>, written with explicit loops-free maths:
    contract the last dim, then reverse the order of the second block of dims."""
    k = a.ndim - 1
    plain = torch.tensordot(a, a, dims=([k], [k]))  # S + S
    if k == 0:
        return plain
    return plain.permute(*range(k), *reversed(range(k, 2 * k)))


@pytest.mark.parametrize(
    ("original", "target"),
    [
        ([], []),
        ([], [1, 1]),
        ([1], []),
        ([12], [2, 3, 2]),
        ([4, 3], [3, 4]),
        ([6, 7, 9], [9, 42]),
        ([2, 3, 4], [-1, 2]),
        ([5], [5]),
    ],
)
def test_reshape_is_equivariant(original: list[int], target: list[int]) -> None:
    torch.manual_seed(0)
    a = torch.randn(*original, 3, dtype=torch.float64)
    expected = _generalized_gramian(a.reshape(*target, 3))
    actual = reshape_gramian(_generalized_gramian(a), target)
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected)


def test_hand_example() -> None:
    # A = [[a0, a1], [a2, a3]] with a_i = e_i in R^4: G[i, j, l, k] = [(i, j) == (k, l)]
    a = torch.eye(4).reshape(2, 2, 4)
    gramian = _generalized_gramian(a)
    assert gramian[0, 1, 1, 0] == 1 and gramian[0, 1, 0, 1] == 0
    torch.testing.assert_close(flatten_gramian(gramian), torch.eye(4))


@pytest.mark.parametrize("shape", [[], [5], [2, 3], [3, 1, 2, 2]])
def test_flatten_is_square_psd_and_matches_the_matrix_gramian(shape: list[int]) -> None:
    torch.manual_seed(0)
    a = torch.randn(*shape, 4, dtype=torch.float64)
    flat = flatten_gramian(_generalized_gramian(a))
    matrix = a.reshape(-1, 4)
    torch.testing.assert_close(flat, matrix @ matrix.T)
    assert torch.linalg.eigvalsh(flat).min() >= -1e-10


@pytest.mark.parametrize(
    ("shape", "source", "destination"),
    [
        ([2, 3, 4], 0, 2),
        ([2, 3, 4], -1, 0),
        ([2, 3, 4], [0, 1], [2, 0]),
        ([5, 2], 1, 0),
        ([3], 0, -1),
    ],
)
def test_movedim_is_equivariant(
    shape: list[int], source: int | list[int], destination: int | list[int]
) -> None:
    torch.manual_seed(0)
    a = torch.randn(*shape, 3, dtype=torch.float64)
    k = len(shape)
    src = [source] if isinstance(source, int) else source
    dst = [destination] if isinstance(destination, int) else destination
    moved = a.movedim([s % k for s in src], [d % k for d in dst])  # dims of the half shape
    expected = _generalized_gramian(moved)
    actual = movedim_gramian(_generalized_gramian(a), source, destination)
    torch.testing.assert_close(actual, expected)


def test_errors() -> None:
    with pytest.raises(ValueError, match="even number"):
        flatten_gramian(torch.zeros(2, 2, 2))
    with pytest.raises(IndexError, match="half_source"):
        movedim_gramian(torch.zeros(2, 3, 3, 2), 2, 0)
