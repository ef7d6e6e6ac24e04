import torch
from torch import Tensor

from torchjd.aggregation._bases import WeightedAggregator, Weighting
from torchjd.linalg._matrix import Matrix


class RandomWeighting(Weighting[Matrix]):
    r"""Random positive weights summing to one: :math:`w = \mathrm{softmax}(z)`,
    :math:`z \sim \mathcal N(0, I_m)` drawn at every call.

    One call to ``torch.randn(m)`` per forward, in the input's dtype, on the global CPU generator
    (so a seed gives the same weights as TorchJD on the CPU, and the same weights on every device);
    the draw is then moved to the input's device.
    """

    row_count_only = True
    randomized = True

    def forward(self, stat: Tensor, /) -> Tensor:
        z = torch.randn(stat.shape[0], dtype=stat.dtype).to(stat.device)
        return torch.softmax(z, dim=0)


class Random(WeightedAggregator):
    """Random weighting of the rows (RGW), from `Reasonable Effectiveness of Random Weighting: A
    Litmus Test for Multi-Task Learning <https://arxiv.org/abs/2111.10603>`_ (Lin et al., TMLR
    2022), Algorithm 2. See :class:`RandomWeighting`.
    """

    def __init__(self) -> None:
        super().__init__(RandomWeighting())
