import torch
from torch import Tensor

from torchjd.scalarization._scalarizer import Scalarizer
from torchjd.scalarization._utils import check_values, check_values_tensor


class GeometricMean(Scalarizer):
    r"""Geometric mean of the values (the Geometric Loss Strategy, GLS).

    From `MultiNet++: Multi-Stream Feature Aggregation and Geometric Loss Strategy for Multi-Task
    Learning <https://arxiv.org/abs/1904.08492>`_ (Chennupati et al., CVPR Workshops 2019):

    .. math::

        \Big(\prod_{k=1}^K L_k\Big)^{1/K} = \exp\Big(\frac{1}{K} \sum_{k=1}^K \log L_k\Big),

    computed in the log domain as on the right, so that many small or large values do not
    underflow or overflow. The gradient with respect to :math:`L_k` is
    :math:`\frac{G}{K L_k}`, where :math:`G` is the result: tasks with a smaller loss get a larger
    relative weight.

    The values must be finite and non-negative (a ``ValueError`` is raised otherwise) and the
    input must not be empty. A zero value gives a result of exactly ``0``; the gradient entry of
    that value is then NaN (the true derivative is infinite there).

    >>> import torch
    >>> from torchjd.scalarization import GeometricMean
    >>> GeometricMean()(torch.tensor([1.0, 2.0, 4.0]))
    tensor(2.)
    """

    def forward(self, values: Tensor, /) -> Tensor:
        check_values_tensor(values)
        check_values(
            values,
            non_empty=True,
            lower_bound=0.0,
            lower_bound_text="non-negative (the geometric mean takes their logarithm)",
        )
        return torch.exp(torch.log(values).mean())
