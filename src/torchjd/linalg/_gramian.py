"""Gramian helpers shared by the aggregators, :func:`torchjd.autojac.jac_to_grad` and autogram."""

import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

# A Gramian of 3 to 8 rows whose matrix takes at least this many bytes, on the CPU, is summed over
# blocks of _BLOCK_COLUMNS columns: each block is read once from memory and reused from the
# cache, where one product of the whole matrix reads it twice (in float32 at n = 1e6, the blocks
# take about 0.5-0.75 of the product's time at m = 8 and 0.8 at m = 3; from 12 rows, the product
# is as fast). Two rows keep the product: blocks are slower there on some CPUs, and dot products
# of the rows, faster on some, take twice its time on others.
_BLOCK_MIN_ROWS, _BLOCK_MAX_ROWS = 3, 8
_BLOCK_MIN_BYTES = 16 << 20
_BLOCK_COLUMNS = 1 << 15


def compute_gramian(t: Tensor) -> Tensor:
    """Return ``M @ M.T`` where ``M`` views ``t`` as a matrix with one row per entry of dim 0.

    A 1-D tensor of length ``m`` is an ``[m, 1]`` column (the ``.jac`` of a scalar parameter); a
    tensor with more dimensions is flattened to ``[t.shape[0], -1]``.
    """
    return matrix_gramian(_as_matrix(t))


def matrix_gramian(matrix: Tensor) -> Tensor:
    """``matrix @ matrix.T`` of a 2-D ``matrix``; a few long rows on the CPU by blocks of
    columns."""
    if _by_column_blocks(matrix):
        blocks = matrix.split(_BLOCK_COLUMNS, dim=1)
        gramian = blocks[0] @ blocks[0].T
        for block in blocks[1:]:
            gramian = torch.addmm(gramian, block, block.T)
        return gramian
    return matrix @ matrix.T


def _by_column_blocks(matrix: Tensor) -> bool:
    m, n = matrix.shape
    return (
        _BLOCK_MIN_ROWS <= m <= _BLOCK_MAX_ROWS
        and m * n * matrix.element_size() >= _BLOCK_MIN_BYTES
        and matrix.device.type == "cpu"
        and matrix.dtype in (torch.float32, torch.float64)
        and matrix.is_contiguous()
    )


def _as_matrix(t: Tensor) -> Tensor:
    """``t`` viewed as ``[t.shape[0], -1]`` (also with zero rows, where ``-1`` is ambiguous)."""
    return t.flatten(start_dim=1) if t.ndim > 1 else t.unsqueeze(1)


def sum_of_gramians(blocks: Iterable[Tensor], dtype: torch.dtype) -> Tensor:
    """``Σ_b M_b M_bᵀ`` in ``dtype``, where ``M_b`` views block ``b`` as in :func:`compute_gramian`
    (the blocks share their first dimension ``m``): the Gramian of the blocks concatenated along
    their columns, computed without concatenating them. At least one block."""
    gramian: Tensor | None = None
    for block in blocks:
        matrix = _as_matrix(block).to(dtype=dtype)
        if gramian is None:
            gramian = matrix_gramian(matrix)
        elif _by_column_blocks(matrix):
            gramian.add_(matrix_gramian(matrix))
        else:
            gramian.addmm_(matrix, matrix.T)
    if gramian is None:
        raise ValueError("`blocks` must contain at least one block.")
    return gramian


def normalize(gramian: Tensor, eps: float) -> Tensor:
    """Divide the (batch of) Gramian(s) by its trace, or return zeros when the trace is ``< eps``.

    Branch-free on the tensor values, so it never synchronises with the host.
    """
    trace = gramian.diagonal(dim1=-2, dim2=-1).sum(dim=-1, keepdim=True).unsqueeze(-1)
    large_enough = trace >= eps
    safe_trace = torch.where(large_enough, trace, torch.ones_like(trace))
    return torch.where(large_enough, gramian / safe_trace, torch.zeros_like(gramian))


def regularize(gramian: Tensor, eps: float) -> Tensor:
    """Return ``gramian + eps * I`` (broadcast over leading batch dimensions)."""
    m = gramian.shape[-1]
    identity = torch.eye(m, dtype=gramian.dtype, device=gramian.device)
    return gramian + eps * identity


# Generalised Gramians.
#
# A generalised Gramian of "half shape" ``S`` (``k = len(S)`` dims) has shape ``S + reversed(S)``
# and entries ``G[i_1, ..., i_k, j_k, ..., j_1] = <A[i_1, ..., i_k], A[j_1, ..., j_k]>`` for some
# tensor ``A`` of shape ``S + [n]``. Storing the second index block reversed makes the flattening
# to a matrix a plain reshape of ``A``'s rows. The helpers below reshape, move dims of, and flatten
# such a tensor so that the result is the generalised Gramian of the correspondingly reshaped /
# moved ``A``; they only permute and view entries (no arithmetic).


def _half_ndim(gramian: Tensor) -> int:
    if gramian.ndim % 2 != 0:
        raise ValueError(
            "A generalised Gramian must have an even number of dimensions, got shape "
            f"{tuple(gramian.shape)}."
        )
    return gramian.ndim // 2


def _reverse_second_half(gramian: Tensor) -> Tensor:
    """Reverse the order of the last ``ndim // 2`` dims (an involution)."""
    k = _half_ndim(gramian)
    if k == 0:
        return gramian
    return gramian.permute(*range(k), *reversed(range(k, 2 * k)))


def reshape_gramian(gramian: Tensor, half_shape: Sequence[int]) -> Tensor:
    """Reshape a generalised Gramian to the half shape ``half_shape``.

    The result has shape ``half_shape + reversed(half_shape)`` and equals the generalised Gramian of
    ``A.reshape(*half_shape, n)`` when ``gramian`` is the one of ``A``. ``half_shape`` may hold one
    ``-1``. A ``[]`` half shape gives a 0-dim tensor, ``[1]`` a ``[1, 1]`` matrix.
    """
    k = _half_ndim(gramian)
    m = math.prod(gramian.shape[:k])
    target = tuple(torch.empty(m, device="meta").reshape(tuple(half_shape)).shape)  # resolves -1
    plain = _reverse_second_half(gramian).reshape(target + target)
    return _reverse_second_half(plain)


def flatten_gramian(gramian: Tensor) -> Tensor:
    """Flatten a generalised Gramian of half shape ``S`` to an ``[M, M]`` matrix, ``M = prod(S)``.

    Rows follow the row-major order of ``S`` (the order of ``A.reshape(M, n)``).
    """
    k = _half_ndim(gramian)
    return reshape_gramian(gramian, [math.prod(gramian.shape[:k])])


def movedim_gramian(
    gramian: Tensor, half_source: int | Sequence[int], half_destination: int | Sequence[int]
) -> Tensor:
    """Move dims of the first half of a generalised Gramian and mirror the move on the second half.

    Equals the generalised Gramian of ``A.movedim(half_source, half_destination)`` when ``gramian``
    is the one of ``A``. Indices refer to the half shape: they must lie in ``[-k, k)``.
    """
    k = _half_ndim(gramian)
    source = [half_source] if isinstance(half_source, int) else list(half_source)
    destination = (
        [half_destination] if isinstance(half_destination, int) else list(half_destination)
    )
    for name, dims in (("half_source", source), ("half_destination", destination)):
        for dim in dims:
            if not -k <= dim < k:
                raise IndexError(
                    f"`{name}` must hold dims in [{-k}, {k}) for a half shape of {k} dims, "
                    f"got {dim}."
                )
    source = [dim % k for dim in source]
    destination = [dim % k for dim in destination]
    plain = _reverse_second_half(gramian)
    moved = plain.movedim(
        [*source, *(dim + k for dim in source)], [*destination, *(dim + k for dim in destination)]
    )
    return _reverse_second_half(moved)
