from torch import Tensor

from torchjd._hyperparameters import format_vector
from torchjd.scalarization._scalarizer import Scalarizer
from torchjd.scalarization._utils import (
    check_same_shape,
    check_tensor,
    check_values,
    check_values_tensor,
)


class Constant(Scalarizer):
    r"""Weighted sum of the values with fixed weights (linear scalarization):
    :math:`\sum_k w_k L_k`.

    :param weights: the weights :math:`w`, a tensor of exactly the shape of the values that will be
        given (any shape, including 0-D). It is kept as a plain attribute (not a buffer), so it can
        be re-assigned between calls; at each call it is cast to the values' dtype and device and
        must be finite.

    >>> import torch
    >>> from torchjd.scalarization import Constant
    >>> Constant(torch.tensor([0.1, 0.2, 0.3, 0.4]))(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    tensor(3.)
    """

    _task_vectors = ("weights",)

    def __init__(self, weights: Tensor) -> None:
        super().__init__()
        self.weights = weights

    @property
    def weights(self) -> Tensor:
        return self._weights

    @weights.setter
    def weights(self, weights: Tensor) -> None:
        check_tensor("weights", weights)
        self._weights = weights

    def forward(self, values: Tensor, /) -> Tensor:
        check_values_tensor(values)
        check_same_shape("weights", self.weights, values)
        weights = self.weights.to(values)
        check_values(values, finite=[("weights", weights)])
        return (weights * values).sum()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(weights={self.weights!r})"

    def __str__(self) -> str:
        name = type(self).__name__
        if self.weights.ndim == 1:
            return f"{name}({format_vector(self.weights)})"
        return f"{name}(weights of shape {tuple(self.weights.shape)})"
