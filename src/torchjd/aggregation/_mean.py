from collections.abc import Sequence

import torch
from torch import Tensor

from torchjd.aggregation._bases import WeightedAggregator, Weighting
from torchjd.linalg._matrix import Matrix


class MeanWeighting(Weighting[Matrix]):
    r"""Uniform weights :math:`w = \frac{1}{m} \mathbf{1}`, in the input's dtype and device.

    Only the number of rows of the input is used, so it also works on a Gramian.
    """

    row_count_only = True

    @classmethod
    def _forward_grouped(cls, weightings: Sequence[Weighting], stats: Tensor) -> Tensor:
        """The same weights for every input of the stack: computed once."""
        b, m = stats.shape[0], stats.shape[1]
        return weightings[0](stats[0]).expand(b, m).clone() if b else stats.new_zeros(0, m)

    def forward(self, stat: Tensor, /) -> Tensor:
        m = stat.shape[0]
        if m == 0:
            raise ValueError("The mean of zero rows is undefined: give a matrix with m >= 1 rows.")
        return torch.full((m,), 1.0 / m, dtype=stat.dtype, device=stat.device)


class Mean(WeightedAggregator):
    r"""Averages the rows: :math:`\frac{1}{m} \sum_i g_i`.

    >>> import torch
    >>> from torchjd.aggregation import Mean
    >>> Mean()(torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]))
    tensor([1., 1., 1.])
    """

    def __init__(self) -> None:
        super().__init__(MeanWeighting())
