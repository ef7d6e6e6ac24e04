import torch
from torch import Tensor

from torchjd.scalarization._scalarizer import Scalarizer
from torchjd.scalarization._utils import (
    check_same_shape,
    check_tensor,
    check_values,
    check_values_tensor,
)

_SMOOTHING = 1e-12


class PBI(Scalarizer):
    r"""Penalty-based Boundary Intersection: distance along a preference ray plus a penalty on the
    distance to that ray.

    From `MOEA/D: A Multiobjective Evolutionary Algorithm Based on Decomposition
    <https://doi.org/10.1109/TEVC.2007.892759>`_ (Zhang and Li, IEEE TEVC 2007). With
    :math:`f = L - z` (or :math:`f = L` without reference point), flattened, and
    :math:`\hat w = w / \lVert w \rVert`:

    .. math::

        d_1 = f^\top \hat w, \qquad
        d_2 = \sqrt{\lVert f - d_1 \hat w \rVert^2 + 10^{-12}}, \qquad
        \text{result} = d_1 + \theta \, d_2.

    :math:`d_1` measures progress along the ray, :math:`d_2` the distance to it. Deviation from
    the paper: the :math:`10^{-12}` under the square root keeps the gradient finite when the
    values lie on the ray (where the exact :math:`d_2` is not differentiable); it shifts the result
    by about :math:`\theta \cdot 10^{-6}` there.

    :param theta: the penalty :math:`\theta`, in :math:`[0, \infty)`.
    :param weights: the preference direction :math:`w`, a tensor of exactly the values' shape, not
        all zero. A plain attribute: cast to the values' dtype and device at each call.
    :param reference: the reference point :math:`z` (the ideal point of MOEA/D), a tensor of the
        values' shape, or ``None`` (default) for the origin.

    >>> import torch
    >>> from torchjd.scalarization import PBI
    >>> PBI(0.0, torch.tensor([1.0, 1.0]))(torch.tensor([2.0, 0.0]))
    tensor(1.4142)
    """

    _task_vectors = ("weights", "reference")

    def __init__(self, theta: float, weights: Tensor, reference: Tensor | None = None) -> None:
        super().__init__()
        self.theta = theta
        self.weights = weights
        self.reference = reference

    @property
    def theta(self) -> float:
        return self._theta

    @theta.setter
    def theta(self, theta: float) -> None:
        if not theta >= 0.0:
            raise ValueError(f"`theta` must be non-negative, got {theta}.")
        self._theta = theta

    @property
    def weights(self) -> Tensor:
        return self._weights

    @weights.setter
    def weights(self, weights: Tensor) -> None:
        check_tensor("weights", weights)
        self._weights = weights

    @property
    def reference(self) -> Tensor | None:
        return self._reference

    @reference.setter
    def reference(self, reference: Tensor | None) -> None:
        check_tensor("reference", reference, optional=True)
        self._reference = reference

    def forward(self, values: Tensor, /) -> Tensor:
        check_values_tensor(values)
        check_same_shape("weights", self.weights, values)
        if self.reference is not None:
            check_same_shape("reference", self.reference, values)
        w = self.weights.to(values).flatten()
        finite = [("weights", w)]
        if self.reference is None:
            f = values.flatten()
        else:
            z = self.reference.to(values)
            finite.append(("reference", z))
            f = (values - z).flatten()
        check_values(values, finite=finite, nonzero=[("weights", w)])

        w_hat = w / torch.linalg.vector_norm(w)
        d1 = f @ w_hat
        d2 = torch.sqrt((f - d1 * w_hat).square().sum() + _SMOOTHING)
        return d1 + self.theta * d2

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(theta={self.theta}, weights={self.weights!r}, "
            f"reference={self.reference!r})"
        )
