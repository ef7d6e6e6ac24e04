import torch.nn.functional as F
from torch import Tensor

from torchjd.scalarization._scalarizer import Scalarizer
from torchjd.scalarization._utils import (
    check_same_shape,
    check_tensor,
    check_values,
    check_values_tensor,
)


class COSMOS(Scalarizer):
    r"""Linear scalarization with a penalty on the angle between the values and a preference ray.

    From `Scalable Pareto Front Approximation for Deep Multi-Objective Learning
    <https://arxiv.org/abs/2103.13392>`_ (Ruchte and Grabocka, ICDM 2021):

    .. math::

        \sum_{k=1}^K r_k L_k - \lambda \, \cos(r, L),
        \qquad \cos(r, L) = \frac{r^\top L}{\max(\lVert r \rVert \, \lVert L \rVert, 10^{-8})},

    with both tensors flattened. The cosine term pulls the values towards the ray spanned by the
    preference vector :math:`r`, so that sweeping :math:`r` (for example drawn from a Dirichlet
    distribution before each call) traces the Pareto front. With :math:`\lambda = 0` this is the
    linear scalarization :class:`Constant`. The cosine is that of
    :func:`torch.nn.functional.cosine_similarity` (``eps=1e-8``), so all-zero values give a cosine
    of ``0`` rather than NaN.

    :param lambda_: the penalty weight :math:`\lambda`, in :math:`[0, \infty)`.
    :param weights: the preference vector :math:`r`, a tensor of exactly the values' shape. It is a
        plain attribute: re-assign it between calls to change the preference. At each call it is
        cast to the values' dtype and device and must be finite.

    >>> import torch
    >>> from torchjd.scalarization import COSMOS
    >>> COSMOS(0.0, torch.tensor([2.0, 1.0]))(torch.tensor([3.0, 4.0]))
    tensor(10.)
    """

    _task_vectors = ("weights",)

    def __init__(self, lambda_: float, weights: Tensor) -> None:
        super().__init__()
        self.lambda_ = lambda_
        self.weights = weights

    @property
    def lambda_(self) -> float:
        return self._lambda

    @lambda_.setter
    def lambda_(self, lambda_: float) -> None:
        if not lambda_ >= 0.0:
            raise ValueError(f"`lambda_` must be non-negative, got {lambda_}.")
        self._lambda = lambda_

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
        r = self.weights.to(values)
        check_values(values, finite=[("weights", r)])
        linear = (r * values).sum()
        cosine = F.cosine_similarity(r.flatten(), values.flatten(), dim=0)
        return linear - self.lambda_ * cosine

    def __repr__(self) -> str:
        return f"{type(self).__name__}(lambda_={self.lambda_}, weights={self.weights!r})"
