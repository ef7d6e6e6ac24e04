from collections.abc import Sequence

import torch
from torch import Tensor, nn

from torchjd._stateful import Stateful
from torchjd.scalarization._scalarizer import Scalarizer
from torchjd.scalarization._utils import (
    as_shape,
    check_built_shape,
    check_values,
    check_values_tensor,
)


class UW(Scalarizer, Stateful):
    r"""Uncertainty Weighting: each value is weighted by a learned inverse variance.

    From `Multi-Task Learning Using Uncertainty to Weigh Losses for Scene Geometry and Semantics
    <https://arxiv.org/abs/1705.07115>`_ (Kendall, Gal and Cipolla, CVPR 2018). With one learned
    log-variance :math:`s_k = \log \sigma_k^2` per value:

    .. math::

        \sum_{k=1}^K \Big(\tfrac12 e^{-s_k} L_k + \tfrac12 s_k\Big).

    The log-variances are the :class:`torch.nn.Parameter` ``log_var`` (zeros at construction, so
    the first result is :math:`\frac12 \sum_k L_k`): give ``uw.parameters()`` to your optimizer
    together with the model's parameters. For a fixed positive :math:`L_k`, the minimum over
    :math:`s_k` is at :math:`s_k = \log L_k`, so the effective weight :math:`\frac12 e^{-s_k}`
    tends to :math:`\frac{1}{2 L_k}` and each task contributes on a comparable scale. The values
    are not required to be positive (only finite).

    ``log_var`` is created with the default float dtype; it is cast to the values' dtype and
    device inside the computation (gradients still reach it), so the result has the values'
    dtype.

    :param shape: the shape of the values this scalarizer accepts: an int ``n`` for ``(n,)`` or a
        sequence of sizes.

    >>> import torch
    >>> from torchjd.scalarization import UW
    >>> UW(3)(torch.tensor([1.0, 2.0, 4.0]))
    tensor(3.5000, grad_fn=<SumBackward0>)
    """

    _task_state = (("log_var", 1, 0.0),)

    def __init__(self, shape: int | Sequence[int]) -> None:
        super().__init__()
        self.log_var = nn.Parameter(torch.zeros(as_shape(shape)))

    def forward(self, values: Tensor, /) -> Tensor:
        check_values_tensor(values)
        check_built_shape(str(self), self.log_var.shape, values)
        check_values(values)
        s = self.log_var.to(values)
        return (0.5 * torch.exp(-s) * values + 0.5 * s).sum()

    def reset(self) -> None:
        """Set ``log_var`` back to zero, in place (optimizers holding it stay valid)."""
        with torch.no_grad():
            self.log_var.zero_()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={tuple(self.log_var.shape)})"
