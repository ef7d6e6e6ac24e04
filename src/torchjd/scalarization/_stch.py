import torch
from torch import Tensor

from torchjd.scalarization._scalarizer import Scalarizer
from torchjd.scalarization._utils import (
    check_same_shape,
    check_tensor,
    check_values,
    check_values_tensor,
)


class STCH(Scalarizer):
    r"""Smooth Tchebycheff scalarization: a soft maximum of the weighted values.

    From `Smooth Tchebycheff Scalarization for Multi-Objective Optimization
    <https://arxiv.org/abs/2402.19078>`_ (Lin et al., ICML 2024). With
    :math:`y = \lambda \odot (L - z)` flattened:

    .. math::

        \mu \log \sum_{k=1}^K \exp\big(y_k / \mu\big)
        = \mu \log \sum_{k=1}^K \exp\Big(\frac{y_k - M}{\mu}\Big) + M,
        \qquad M = \max_k y_k.

    The right-hand form is the one computed: it cannot overflow, even for huge values or a tiny
    :math:`\mu`. As :math:`\mu \to 0` the result tends to the Tchebycheff scalarization
    :math:`\max_k y_k`; the gradient with respect to :math:`y` is
    :math:`\mathrm{softmax}(y / \mu)`.

    :param mu: the smoothing parameter :math:`\mu`, in :math:`(0, \infty)`.
    :param weights: the preference :math:`\lambda`, a tensor of exactly the values' shape, or
        ``None`` (default) for uniform weights :math:`1/K`. Cast to the values' dtype and device.
    :param reference: the reference point :math:`z` (an ideal point), a tensor of the values'
        shape, or ``None`` (default) for no shift.

    Empty inputs are rejected (their maximum is undefined).

    >>> import torch
    >>> from torchjd.scalarization import STCH
    >>> STCH(1.0)(torch.tensor([0.0, 0.0]))
    tensor(0.6931)
    """

    _task_vectors = ("weights", "reference")

    def __init__(
        self, mu: float, weights: Tensor | None = None, reference: Tensor | None = None
    ) -> None:
        super().__init__()
        self.mu = mu
        self.weights = weights
        self.reference = reference

    @property
    def mu(self) -> float:
        return self._mu

    @mu.setter
    def mu(self, mu: float) -> None:
        if not mu > 0.0:
            raise ValueError(f"`mu` must be positive, got {mu}.")
        self._mu = mu

    @property
    def weights(self) -> Tensor | None:
        return self._weights

    @weights.setter
    def weights(self, weights: Tensor | None) -> None:
        check_tensor("weights", weights, optional=True)
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
        if self.weights is not None:
            check_same_shape("weights", self.weights, values)
        if self.reference is not None:
            check_same_shape("reference", self.reference, values)
        finite = []
        if self.weights is None:
            weights = torch.full_like(values, 1.0 / max(values.numel(), 1))
        else:
            weights = self.weights.to(values)
            finite.append(("weights", weights))
        if self.reference is None:
            shifted = values
        else:
            z = self.reference.to(values)
            finite.append(("reference", z))
            shifted = values - z
        check_values(values, non_empty=True, finite=finite)

        y = (weights * shifted).flatten()
        m = y.max().detach()  # the shift cancels in the value; detached, the gradient is softmax
        return self.mu * torch.logsumexp((y - m) / self.mu, dim=0) + m

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(mu={self.mu}, weights={self.weights!r}, "
            f"reference={self.reference!r})"
        )
