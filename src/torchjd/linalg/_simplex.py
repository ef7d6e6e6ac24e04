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
    ``[..., m]`` with ``m >= 1``. NaN entries give NaN outputs.

    The projection is invariant to adding a constant to every entry, so the maximum of each vector
    is subtracted first: with entries far larger than 1 (e.g. ``1e7`` in float32), the partial
    sums ``s_1 + ... + s_k - 1`` would otherwise round the ``- 1`` away and the result would leave
    the simplex.

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
