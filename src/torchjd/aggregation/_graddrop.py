"""GradDrop: per coordinate, keep only the positive or only the negative parts, at random."""

from collections.abc import Callable

import torch
from torch import Tensor

from torchjd._hyperparameters import check_vector, format_vector
from torchjd.aggregation._bases import Aggregator, NoGrad
from torchjd.linalg._matrix import Matrix

# Number of matrix entries processed at once (columns per chunk = this // m).
_CHUNK_ENTRIES = 2**18


def _identity(p: Tensor) -> Tensor:
    return p


def _check_leak(leak: Tensor | None) -> None:
    check_vector(leak, "leak", optional=True)


class GradDrop(NoGrad, Aggregator):
    r"""Gradient sign dropout, from `Just Pick a Sign: Optimizing Deep Multitask Models with
    Gradient Sign Dropout <https://arxiv.org/abs/2010.06808>`_ (Chen et al., NeurIPS 2020),
    Algorithm 1 (lines 10 to 15).

    For every column :math:`j` of :math:`J`, the positive sign purity is
    :math:`P_j = \frac12 \left(1 + \frac{\sum_i J_{ij}}{\sum_i |J_{ij}|}\right)`; with
    :math:`F = f(P)` and one uniform draw :math:`U_j \in [0, 1)` per column, row :math:`i` keeps
    its entry :math:`J_{ij}` when :math:`F_j > U_j` and :math:`J_{ij} > 0`, or when
    :math:`F_j < U_j` and :math:`J_{ij} < 0` (mask :math:`M_{ij}`). The result is

    .. math:: \sum_i \left(\ell_i + (1 - \ell_i) M_i\right) \odot g_i .

    A zero column has an undefined purity and keeps nothing (its result is 0). Randomness: one call
    ``torch.rand(n, dtype=J.dtype, device=J.device)`` per forward, after :math:`f(P)` is computed
    (none when :math:`m = 0` or :math:`n = 0`, which give zeros), so a seed gives TorchJD's
    numbers. The matrix is read by chunks of columns: the mask is never materialised. Not
    differentiable.

    :param f: the function applied to the whole vector :math:`P` (default: the identity).
    :param leak: the vector :math:`\ell` (1-D, one entry per row) of fractions of each row that are
        always kept, or None for zeros. Its length must equal the number of rows at call time.
    """

    _task_vectors = ("leak",)

    randomized = True

    def __init__(
        self, f: Callable[[Tensor], Tensor] = _identity, leak: Tensor | None = None
    ) -> None:
        super().__init__()
        self.f = f
        self.leak = leak

    @property
    def leak(self) -> Tensor | None:
        return self._leak

    @leak.setter
    def leak(self, value: Tensor | None) -> None:
        _check_leak(value)
        self._leak = value

    def forward(self, matrix: Matrix, /) -> Tensor:
        m, n = matrix.shape
        if self.leak is not None and self.leak.shape[0] != m:
            raise ValueError(
                f"`leak` has {self.leak.shape[0]} entries but the matrix has {m} rows: give one "
                "entry per row."
            )
        if m == 0 or n == 0:
            return matrix.new_zeros(n)

        # Column statistics, by chunks: the rows of `on_positive @ positive_parts +
        # on_negative @ negative_parts` are the sums of the positive parts and of the negative parts
        # and, with a leak, the leaked sum and the sums of the positive and negative parts weighted
        # by 1 - leak.
        ones = torch.ones(m, dtype=matrix.dtype, device=matrix.device)
        zeros = torch.zeros_like(ones)
        if self.leak is None:
            on_positive = torch.stack([ones, zeros])
            on_negative = torch.stack([zeros, ones])
        else:
            leak = self.leak.to(dtype=matrix.dtype, device=matrix.device)
            kept = 1.0 - leak
            on_positive = torch.stack([ones, zeros, leak, kept, zeros])
            on_negative = torch.stack([zeros, ones, leak, zeros, kept])
        stats = torch.empty(on_positive.shape[0], n, dtype=matrix.dtype, device=matrix.device)
        chunk = max(1, _CHUNK_ENTRIES // m)
        for start in range(0, n, chunk):
            x = matrix[:, start : start + chunk]
            positive = x.clamp(min=0.0)
            negative = x.clamp(max=0.0)
            stats[:, start : start + chunk] = torch.addmm(
                on_positive @ positive, on_negative, negative
            )

        positive_sum, negative_sum = stats[0], stats[1]
        if self.leak is None:
            leaked, kept_positive, kept_negative = None, positive_sum, negative_sum
        else:
            leaked, kept_positive, kept_negative = stats[2], stats[3], stats[4]

        # P = (1 + sum_i J_ij / sum_i |J_ij|) / 2, NaN for a zero column (then no entry is kept).
        purity = 0.5 * (1.0 + (positive_sum + negative_sum) / (positive_sum - negative_sum))
        f_purity = self.f(purity)
        u = torch.rand(n, dtype=matrix.dtype, device=matrix.device)
        result = torch.where(f_purity > u, kept_positive, 0.0)
        result = result + torch.where(f_purity < u, kept_negative, 0.0)
        # A non-finite column has an undefined purity too, but its result must stay non-finite
        # (0 * inf and 0 * NaN are NaN), so that a gradient scaler sees it.
        result = result + 0.0 * (positive_sum - negative_sum)
        return result if leaked is None else leaked + result

    def __repr__(self) -> str:
        return f"{type(self).__name__}(f={self.f!r}, leak={self.leak!r})"

    def __str__(self) -> str:
        name = type(self).__name__
        return name if self.leak is None else f"{name}({format_vector(self.leak)})"
