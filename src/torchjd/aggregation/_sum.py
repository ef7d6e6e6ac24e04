from collections.abc import Sequence

import torch
from torch import Tensor

from torchjd.aggregation._bases import WeightedAggregator, Weighting
from torchjd.linalg._matrix import Matrix


class SumWeighting(Weighting[Matrix]):
    r"""Unit weights :math:`w = \mathbf{1}`, in the input's dtype and device."""

    row_count_only = True

    @classmethod
    def _forward_grouped(cls, weightings: Sequence[Weighting], stats: Tensor) -> Tensor:
        """The same weights for every input of the stack: computed once."""
        b, m = stats.shape[0], stats.shape[1]
        return weightings[0](stats[0]).expand(b, m).clone() if b else stats.new_zeros(0, m)

    def forward(self, stat: Tensor, /) -> Tensor:
        return torch.ones(stat.shape[0], dtype=stat.dtype, device=stat.device)


class Sum(WeightedAggregator):
    r"""Sums the rows: :math:`\sum_i g_i` (the update of ordinary gradient descent on the sum of
    the losses).

    >>> import torch
    >>> from torchjd.aggregation import Sum
    >>> Sum()(torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]))
    tensor([2., 2., 2.])
    """

    def __init__(self) -> None:
        super().__init__(SumWeighting())
