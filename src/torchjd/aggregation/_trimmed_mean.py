"""Trimmed mean: per coordinate, the mean of the values left after dropping the extremes."""

import operator

import torch
from torch import Tensor

from torchjd.aggregation._bases import Aggregator
from torchjd.linalg._matrix import Matrix

# Number of matrix entries processed at once (columns per chunk = this // m): bounds the memory
# of the temporaries and keeps them in cache.
_CHUNK_ENTRIES = 2**18


def _order_statistics(x: Tensor, q: int, largest: bool) -> list[Tensor]:
    """The ``q`` smallest (or largest) entries of each column of ``x`` (``[m, c]``, ``q <= m``),
    as a list of ``q`` tensors of shape ``[c]``, from the most extreme on.

    A reduction tree over the rows: each node holds the ``q`` most extreme values of its rows,
    sorted, as a list of ``[nodes, c]`` tensors; two nodes are merged with the identity
    ``merged_j = min_i max(A_{i-1}, B_{j-i})`` (``A_{-1} = B_{-1} = -inf``, for the smallest), so
    every step is an elementwise minimum or maximum over contiguous rows.
    """
    outer, inner = (torch.maximum, torch.minimum) if largest else (torch.minimum, torch.maximum)
    padding = -torch.inf if largest else torch.inf
    lists = [x]
    while lists[0].shape[0] > 1:
        nodes = lists[0].shape[0]
        half = nodes // 2
        a = [t[:half] for t in lists]
        b = [t[half : 2 * half] for t in lists]
        size = len(lists)
        merged = []
        for j in range(min(q, 2 * size)):
            best = None
            # i values taken from a, j + 1 - i from b.
            for i in range(max(0, j + 1 - size), min(j + 1, size) + 1):
                if i == 0:
                    term = b[j]
                elif i == j + 1:
                    term = a[j]
                else:
                    term = inner(a[i - 1], b[j - i])
                best = term if best is None else outer(best, term)
            merged.append(best)
        if nodes % 2 == 1:  # the last node has no partner: it moves up unchanged
            left = [t[2 * half :] for t in lists]
            fill = torch.full_like(left[0], padding)
            left += [fill] * (len(merged) - len(left))
            merged = [torch.cat([t, extra]) for t, extra in zip(merged, left)]
        lists = merged
    return [t[0] for t in lists]


def _trimmed_mean(matrix: Tensor, trim_number: int) -> Tensor:
    """The trimmed mean of each column of ``matrix`` (``[m, n]``, ``m >= 2 * trim_number + 1``)."""
    m, n = matrix.shape
    if trim_number == 0:
        return matrix.sum(dim=0) / m
    chunk = max(1, _CHUNK_ENTRIES // m)
    parts = []
    for start in range(0, n, chunk):
        x = matrix[:, start : start + chunk]
        # low = s_{k+1} and high = s_{m-k}: the extreme values that are kept.
        low = _order_statistics(x, trim_number + 1, largest=False)[trim_number]
        high = _order_statistics(x, trim_number + 1, largest=True)[trim_number]
        # Clamping maps the k smallest values to `low` and the k largest to `high` and leaves the
        # kept ones unchanged, so no dropped value (possibly huge) enters the sum.
        clamped_sum = x.clamp(min=low, max=high).sum(dim=0)
        parts.append((clamped_sum - trim_number * (low + high)) / (m - 2 * trim_number))
    if not parts:
        return matrix.new_zeros(0)
    return torch.cat(parts)


class TrimmedMean(Aggregator):
    r"""Coordinate-wise trimmed mean, from `Byzantine-Robust Distributed Learning: Towards Optimal
    Statistical Rates <https://proceedings.mlr.press/v80/yin18a.html>`_ (Yin et al., ICML 2018).

    For every column of :math:`J`, the ``trim_number`` smallest and the ``trim_number`` largest
    values are dropped and the :math:`m - 2\,\text{trim\_number}` others are averaged.
    ``TrimmedMean(0)`` is the mean. Differentiable (the gradient of each output entry is spread over
    the values it keeps).

    **Computation.** No sort: with :math:`k` = ``trim_number``, the :math:`(k+1)`-th smallest
    value :math:`\ell` and the :math:`(k+1)`-th largest value :math:`h` of each column are found by
    a reduction tree of elementwise minima and maxima over the rows; then the kept values sum to
    :math:`\sum_i \mathrm{clamp}(J_{ij}, \ell, h) - k(\ell + h)`, in which no dropped value
    appears (ties are handled exactly). The columns are processed by chunks, so the extra memory is
    a few times ``2**18`` entries. The cost grows with :math:`k` (about :math:`k^2` elementwise
    operations per merge).

    :param trim_number: the number :math:`k \ge 0` of values dropped at each end of every column;
        the matrix must have at least :math:`2k + 1` rows.

    >>> import torch
    >>> from torchjd.aggregation import TrimmedMean
    >>> J = torch.tensor([[1e11, 3.0], [1.0, -1e11], [-1e10, 1e10], [2.0, 2.0]])
    >>> TrimmedMean(trim_number=1)(J)
    tensor([1.5000, 2.5000])
    """

    def __init__(self, trim_number: int) -> None:
        super().__init__()
        self.trim_number = trim_number

    @property
    def trim_number(self) -> int:
        return self._trim_number

    @trim_number.setter
    def trim_number(self, value: int) -> None:
        try:
            operator.index(value)
        except TypeError:
            raise TypeError(f"`trim_number` must be an int, got {value!r}.") from None
        if value < 0:
            raise ValueError(f"`trim_number` must be an int >= 0, got {value!r}.")
        self._trim_number = value

    def forward(self, matrix: Matrix, /) -> Tensor:
        m = matrix.shape[0]
        minimum = 2 * self.trim_number + 1
        if m < minimum:
            raise ValueError(
                f"TrimmedMean with trim_number={self.trim_number} needs at least "
                f"2 * trim_number + 1 = {minimum} rows, got a matrix of shape "
                f"{tuple(matrix.shape)}."
            )
        return _trimmed_mean(matrix, self.trim_number)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(trim_number={self.trim_number})"

    def __str__(self) -> str:
        return f"TM{self.trim_number}"
