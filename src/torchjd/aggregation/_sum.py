import torch
from torch import Tensor

from torchjd.aggregation._bases import WeightedAggregator, Weighting
from torchjd.linalg._matrix import Matrix


class SumWeighting(Weighting[Matrix]):
    r"""Unit weights :math:`w = \mathbf{1}`, in the input's dtype and device."""

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
