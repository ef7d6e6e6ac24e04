from torch import Tensor

from torchjd.scalarization._scalarizer import Scalarizer
from torchjd.scalarization._utils import check_values, check_values_tensor


class Sum(Scalarizer):
    r"""Sum of the values: :math:`\sum_{k=1}^K L_k`, over all the elements of the input (of any
    shape). The sum of an empty tensor is ``0``.

    >>> import torch
    >>> from torchjd.scalarization import Sum
    >>> Sum()(torch.tensor([1.0, 2.0, 3.0]))
    tensor(6.)
    """

    def forward(self, values: Tensor, /) -> Tensor:
        check_values_tensor(values)
        check_values(values)
        return values.sum()
