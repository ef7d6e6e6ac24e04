import torch
from torch import Tensor

from torchjd.scalarization._scalarizer import Scalarizer
from torchjd.scalarization._utils import check_values, check_values_tensor


class Random(Scalarizer):
    r"""Weighted sum of the values with random weights drawn at every call (Random Loss Weighting).

    From `Reasonable Effectiveness of Random Weighting: A Litmus Test for Multi-Task Learning
    <https://arxiv.org/abs/2111.10603>`_ (Lin et al., TMLR 2022), Algorithm 2:

    .. math::

        \lambda = \mathrm{softmax}(\varepsilon), \quad \varepsilon \sim \mathcal N(0, I_K),
        \qquad \text{result} = \sum_{k=1}^K \lambda_k L_k.

    The weights are positive and sum to one. The draw is one call to ``torch.randn(K)`` per
    forward, in the values' dtype, on the global CPU generator (so the same seed gives the same
    numbers on every device); the weights are then moved to the values' device.

    >>> import torch
    >>> from torchjd.scalarization import Random
    >>> _ = torch.manual_seed(0)
    >>> Random()(torch.tensor([1.0, 2.0, 4.0]))
    tensor(1.1963)
    """

    # The draws are made in the values' own dtype (as in the reference), half precision included.
    _promotes_half = False

    def forward(self, values: Tensor, /) -> Tensor:
        check_values_tensor(values)
        check_values(values)
        epsilon = torch.randn(values.numel(), dtype=values.dtype).to(values.device)
        weights = torch.softmax(epsilon, dim=0).reshape(values.shape)
        return (weights * values).sum()
