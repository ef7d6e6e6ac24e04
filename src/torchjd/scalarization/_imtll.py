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


class IMTLL(Scalarizer, Stateful):
    r"""IMTL-L: loss balancing with a learned scale per value.

    The loss-balance part of `Towards Impartial Multi-task Learning
    <https://openreview.net/forum?id=IMPnRXEWpvr>`_ (Liu et al., ICLR 2021). With one learned
    log-scale :math:`s_k` per value:

    .. math::

        \sum_{k=1}^K \big(e^{s_k} L_k - s_k\big).

    The log-scales are the :class:`torch.nn.Parameter` ``log_scale`` (zeros at construction, so
    the first result is :math:`\sum_k L_k`): give ``imtll.parameters()`` to your optimizer together
    with the model's parameters. For a fixed positive :math:`L_k`, the minimum over :math:`s_k` is
    at :math:`s_k = -\log L_k`, where the scaled loss :math:`e^{s_k} L_k` equals ``1``: every task
    is brought to the same scale. With parameter :math:`s` this equals twice :class:`UW` with
    parameter :math:`-s`. The values are not required to be positive (only finite).

    ``log_scale`` is created with the default float dtype and cast to the values' dtype and device
    inside the computation (gradients still reach it).

    :param shape: the shape of the values this scalarizer accepts: an int ``n`` for ``(n,)`` or a
        sequence of sizes.

    >>> import torch
    >>> from torchjd.scalarization import IMTLL
    >>> IMTLL(3)(torch.tensor([1.0, 2.0, 4.0]))
    tensor(7., grad_fn=<SumBackward0>)
    """

    _task_state = (("log_scale", 1, 0.0),)

    def __init__(self, shape: int | Sequence[int]) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.zeros(as_shape(shape)))

    def forward(self, values: Tensor, /) -> Tensor:
        check_values_tensor(values)
        check_built_shape(str(self), self.log_scale.shape, values)
        check_values(values)
        s = self.log_scale.to(values)
        return (torch.exp(s) * values - s).sum()

    def reset(self) -> None:
        """Set ``log_scale`` back to zero, in place (optimizers holding it stay valid)."""
        with torch.no_grad():
            self.log_scale.zero_()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={tuple(self.log_scale.shape)})"
