from torch import Tensor

from torchjd.scalarization._scalarizer import Scalarizer
from torchjd.scalarization._utils import check_values, check_values_tensor


class Mean(Scalarizer):
    r"""Average of the values: :math:`\frac{1}{K} \sum_{k=1}^K L_k`, with :math:`K` the number of
    elements of the input (of any shape).

    Empty inputs are rejected (their mean is undefined).

    >>> import torch
    >>> from torchjd.scalarization import Mean
    >>> Mean()(torch.tensor([1.0, 2.0, 3.0]))
    tensor(2.)
    """

    def forward(self, values: Tensor, /) -> Tensor:
        check_values_tensor(values)
        check_values(values, non_empty=True)
        return values.mean()
