"""Euclidean projection onto the probability simplex, vectorised over leading dimensions."""

import torch
from torch import Tensor


def project_onto_simplex(y: Tensor) -> Tensor:
    r"""Project each vector along the last dimension of ``y`` onto the probability simplex.

    Returns :math:`\Pi_\Delta(y) = \arg\min_{w \ge 0,\ \mathbf 1^\top w = 1} \|w - y\|`, the unique
    Euclidean projection, by the sort-based rule (Held, Wolfe and Crowder, 1974; see also Duchi et
    al., *Efficient Projections onto the l1-Ball for Learning in High Dimensions*, ICML 2008): sort
    :math:`y` decreasingly into :math:`s_1 \ge \dots \ge s_m`, let
    :math:`c_k = (s_1 + \dots + s_k - 1) / k` and :math:`\rho` the largest :math:`k` with
    :math:`s_k > c_k`; the result is :math:`\max(y - c_\rho, 0)`.

    Branch-free (no host synchronisation), in the dtype and on the device of ``y``; ``y`` of shape
    ``[..., m]`` with ``m >= 1``. NaN entries give NaN outputs, and so does an infinite entry.

    The projection is unchanged by adding a constant to every entry: ``y`` is first shifted so
    that its largest entry is 0, which keeps the ``1`` of the constraint visible next to huge
    entries (without it, ``1e17 - 1`` rounds to ``1e17`` and every weight to 0).

    >>> project_onto_simplex(torch.tensor([0.5, 0.1, 0.1]))
    tensor([0.6000, 0.2000, 0.2000])
    """
    m = y.shape[-1]
    y = y - y.amax(dim=-1, keepdim=True)
    s, _ = torch.sort(y, dim=-1, descending=True)
    k = torch.arange(1, m + 1, dtype=y.dtype, device=y.device)
    c = (torch.cumsum(s, dim=-1) - 1.0) / k
    # s_k > c_k holds for a prefix k = 1..rho (always for k = 1): rho is the size of that prefix.
    rho = (s > c).sum(dim=-1, keepdim=True).clamp(min=1)
    threshold = torch.gather(c, -1, rho - 1)
    return torch.clamp(y - threshold, min=0.0)
