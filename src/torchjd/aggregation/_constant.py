from torch import Tensor

from torchjd._hyperparameters import check_vector, format_vector
from torchjd.aggregation._bases import WeightedAggregator, Weighting
from torchjd.linalg._matrix import Matrix


def _check_weights(weights: Tensor) -> None:
    check_vector(weights, "weights")


class ConstantWeighting(Weighting[Matrix]):
    """Returns the given weights, whatever the input (which must have ``len(weights)`` rows).

    :param weights: the weight vector, returned as is (no copy, no cast).
    """

    _task_vectors = ("weights",)

    row_count_only = True

    def __init__(self, weights: Tensor) -> None:
        super().__init__()
        _check_weights(weights)
        self.weights = weights

    def forward(self, stat: Tensor, /) -> Tensor:
        if stat.shape[0] != self.weights.shape[0]:
            raise ValueError(
                f"The weighting holds {self.weights.shape[0]} weights but the input has "
                f"{stat.shape[0]} rows (objectives): give one weight per objective."
            )
        return self.weights


class Constant(WeightedAggregator):
    r"""Weighted sum of the rows with fixed weights: :math:`\sum_i w_i g_i`.

    :param weights: the vector :math:`w`, one entry per row.

    >>> import torch
    >>> from torchjd.aggregation import Constant
    >>> Constant(torch.tensor([1.0, 2.0]))(torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]))
    tensor([8., 3., 3.])
    """

    def __init__(self, weights: Tensor) -> None:
        super().__init__(ConstantWeighting(weights))
        self._weights = weights

    def __repr__(self) -> str:
        return f"{type(self).__name__}(weights={self._weights!r})"

    def __str__(self) -> str:
        return f"{type(self).__name__}({format_vector(self._weights)})"
