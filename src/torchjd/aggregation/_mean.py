import torch
from torch import Tensor

from torchjd.aggregation._bases import WeightedAggregator, Weighting
from torchjd.linalg._matrix import Matrix


class MeanWeighting(Weighting[Matrix]):
    r"""Uniform weights :math:`w = \frac{1}{m} \mathbf{1}`, in the input's dtype and device.

    Only the number of rows of the input is used, so it also works on a Gramian.
    """

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
