"""PCGrad: project each gradient onto the normal plane of the gradients it conflicts with."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from torchjd._permutations import randperm_lists, randperm_rows
from torchjd.aggregation._bases import GramianWeightedAggregator, NoGrad, Weighting
from torchjd.linalg._matrix import PSDMatrix


def _draw_orders(n_problems: int, m: int) -> Tensor:
    """Draw PCGrad's visiting orders, shape ``[n_problems, m, m - 1]``, on the CPU.

    For each problem in turn and for ``i = 0, ..., m - 1``, one ``torch.randperm(m)`` on the global
    CPU generator (TorchJD's order of draws, so a seed gives TorchJD's numbers); task ``i`` then
    visits the other tasks in that order, skipping itself.
    """
    stacked = randperm_rows(n_problems * m, m)  # [n_problems * m, m]
    if m <= 1 or n_problems == 0:
        return torch.zeros(n_problems, m, max(m - 1, 0), dtype=torch.long)
    if m == 2:  # one partner each: task 0 visits 1, task 1 visits 0
        return _TWO_TASK_ORDERS.expand(n_problems, 2, 1)
    tasks = torch.arange(m).repeat(n_problems)[:, None]
    position = (stacked == tasks).int().argmax(dim=1, keepdim=True)  # column of i in its draw
    steps = torch.arange(m - 1)[None, :]
    kept = torch.gather(stacked, 1, steps + (steps >= position))  # skip that position
    return kept.view(n_problems, m, m - 1)


_TWO_TASK_ORDERS = torch.tensor([[[1], [0]]])


def _to_device(indices: Tensor, device: torch.device) -> Tensor:
    """Copy host indices to ``device``: through pinned memory and without blocking on CUDA (a
    copy from pageable memory would synchronise the host with the device)."""
    if device.type == "cuda":
        return indices.pin_memory().to(device, non_blocking=True)
    return indices.to(device)


def _step_indices(orders: Tensor, device: torch.device) -> tuple[Tensor, Tensor]:
    """Flat indices of the partners visited at each step, each of shape ``[m - 1, n_tasks]``.

    The ``n_problems`` problems of size ``m`` are flattened into ``n_tasks = n_problems * m`` tasks
    ``t = b * m + i``. At step ``s`` task ``t`` visits ``j = orders[b, i, s]``:

    * ``rows[s, t] = b * m + j`` is the row of ``g_j`` in the ``[n_tasks, m]`` stack of Gramians
      (and the entry of ``j`` in the ``[n_tasks]`` weight vector);
    * ``entries[s, t] = t * m + j`` is the entry ``(t, j)`` of an ``[n_tasks, m]`` matrix.

    The indices are computed where ``orders`` lives (the CPU for drawn orders) and moved to
    ``device`` in a single transfer.
    """
    n_problems, m, n_steps = orders.shape
    partners = orders.reshape(n_problems * m, n_steps)
    tasks = torch.arange(n_problems * m, device=orders.device)[:, None]
    rows = partners + (tasks // m) * m
    entries = partners + tasks * m
    both = _to_device(torch.stack([rows.T, entries.T]), device)
    return both[0], both[1]


def _pcgrad_weights(gramian: Tensor, orders: Tensor) -> Tensor:
    r"""PCGrad's weights for a batch of Gramians ``[..., m, m]``, given the visiting orders.

    Task ``i``'s modified gradient is :math:`g_i^{PC} = \sum_k C_{ik} g_k` with :math:`C = I` at
    first; when it visits ``j`` and :math:`g_i^{PC} \cdot g_j < 0` it becomes
    :math:`g_i^{PC} - \frac{g_i^{PC} \cdot g_j}{\|g_j\|^2} g_j`. The weights are the column sums of
    ``C``. All tasks (of all problems) take their ``s``-th step at once; only the ``m - 1`` steps
    are sequential. ``P = C G`` (``P_{ij} = g_i^{PC} \cdot g_j``) is updated instead of ``C``, whose
    only off-diagonal entries are the recorded corrections.

    :param gramian: the Gramians ``[..., m, m]``.
    :param orders: the visiting orders ``[..., m, m - 1]``, on any device (moved once).
    """
    *batch, m, _ = gramian.shape
    n_tasks = math.prod(batch) * m
    if m <= 1:
        return torch.ones(*batch, m, dtype=gramian.dtype, device=gramian.device)
    if m == 2:
        # Each task makes one step, against the other's original gradient: the weight of g_j is
        # 1 - min(g_0 . g_1, 0) / ||g_j||^2 (no correction by a zero row).
        squared_norms = gramian.diagonal(dim1=-2, dim2=-1)
        inverse = torch.where(squared_norms > 0, squared_norms.reciprocal(), 0.0)
        return 1.0 - gramian[..., 0, 1:].clamp(max=0.0) * inverse
    rows, entries = _step_indices(orders.reshape(-1, m, m - 1), gramian.device)
    stacked = gramian.reshape(n_tasks, m)
    partner_squared_norms = gramian.diagonal(dim1=-2, dim2=-1).reshape(n_tasks)[rows]
    # -1 / ||g_j||^2, and 0 for a zero row (it conflicts with nothing in an exact Gramian).
    neg_inverse = torch.where(partner_squared_norms > 0, -partner_squared_norms.reciprocal(), 0.0)

    products = stacked.clone()  # P = C G with C = I
    flat_products = products.view(-1)
    partner_rows = torch.empty_like(stacked)
    corrections = torch.empty(m - 1, n_tasks, dtype=gramian.dtype, device=gramian.device)
    steps = zip(
        entries.unbind(0),
        rows.unbind(0),
        neg_inverse.unbind(0),
        corrections.unbind(0),
        corrections.unsqueeze(-1).unbind(0),
    )
    for entry, row, inverse, correction, correction_column in steps:
        inner = flat_products.index_select(0, entry)  # g_i^PC . g_j
        torch.mul(inner.clamp_(max=0.0), inverse, out=correction)
        torch.index_select(stacked, 0, row, out=partner_rows)
        products.addcmul_(correction_column, partner_rows)
    weights = torch.ones(n_tasks, dtype=gramian.dtype, device=gramian.device)
    weights.index_add_(0, rows.reshape(-1), corrections.reshape(-1))
    return weights.view(*batch, m)


# Up to this many tasks, one Gramian on the CPU is weighed with Python numbers (see _on_host).
_HOST_MAX_M = 8


def _on_host(gramian: Tensor) -> Tensor | None:
    """:func:`_pcgrad_weights` of one Gramian of ``2 <= m <= _HOST_MAX_M`` tasks on the CPU, with
    Python numbers in double precision, after the draws of :func:`_draw_orders`: reading a CPU
    tensor synchronises with nothing, and the ``m (m - 1)`` steps of ``O(m)`` scalar operations
    cost less than the kernel's tensor operations. None for a non-finite Gramian (no draw made),
    which the kernel handles."""
    m = gramian.shape[0]
    g = gramian.tolist()
    if not math.isfinite(sum(sum(row) for row in g)):
        return None
    # The draws of _draw_orders: task i visits the others in the order of its permutation.
    orders = [[k for k in p if k != i] for i, p in enumerate(randperm_lists(m, m))]
    weights = [1.0] * m
    for i in range(m):
        products = g[i]  # g_i^PC . g_k for every k
        for j in orders[i]:
            if products[j] < 0.0 and g[j][j] > 0.0:
                correction = -products[j] / g[j][j]
                weights[j] += correction
                products = [p + correction * x for p, x in zip(products, g[j])]
    return torch.tensor(weights, dtype=gramian.dtype)


class PCGradWeighting(NoGrad, Weighting[PSDMatrix]):
    r"""Weighting of :class:`PCGrad`: the weights ``w`` such that ``w @ J`` is the sum of the
    projected gradients.

    The algorithm only needs inner products, so it runs on the Gramian :math:`G = J J^\top`: each
    task ``i``, visiting the other tasks in a random order, replaces its current gradient
    :math:`g_i^{PC}` by :math:`g_i^{PC} - \frac{g_i^{PC} \cdot g_j}{\|g_j\|^2} g_j` whenever
    :math:`g_i^{PC} \cdot g_j < 0` (``g_j`` is always the original gradient). The weights are the
    coefficients of :math:`\sum_i g_i^{PC}` on the original gradients.

    Randomness: for ``i = 0, ..., m - 1``, one ``torch.randperm(m)`` on the global CPU generator,
    whatever the input's device (the order of TorchJD, so a seed gives the same numbers; all of a
    call's draws are replayed from one random call, with the same values); the drawn indices are
    moved to the input's device once per call and the computation stays there, in the input's
    dtype, without host synchronisation. A zero row (:math:`\|g_j\|^2 = 0`) is never
    projected on. Not differentiable: runs under :func:`torch.no_grad`.
    """

    randomized = True

    def forward(self, stat: Tensor, /) -> Tensor:
        if 2 <= stat.shape[-1] <= _HOST_MAX_M and stat.device.type == "cpu":
            weights = _on_host(stat)
            if weights is not None:
                return weights
        return self._forward_batched(stat[None])[0]

    @torch.no_grad()
    def _forward_batched(self, gramians: Tensor) -> Tensor:
        """Weights ``[b, m]`` of a batch of Gramians ``[b, m, m]``; the random orders are drawn
        problem by problem, as ``b`` successive calls would draw them."""
        n_problems, m = gramians.shape[0], gramians.shape[-1]
        return _pcgrad_weights(gramians, _draw_orders(n_problems, m))

    @classmethod
    @torch.no_grad()
    def _forward_grouped(cls, weightings: Sequence[PCGradWeighting], gramians: Tensor) -> Tensor:
        """Weights ``[b, m]`` of Gramians ``[b, m, m]``, the ``k``-th one weighted by
        ``weightings[k]`` (stateless and parameter-free, so this is :meth:`_forward_batched`)."""
        if len(weightings) != gramians.shape[0]:
            raise ValueError(
                f"Got {len(weightings)} weightings for {gramians.shape[0]} Gramians: give one "
                "weighting per Gramian."
            )
        return _pcgrad_weights(gramians, _draw_orders(gramians.shape[0], gramians.shape[-1]))


class PCGrad(NoGrad, GramianWeightedAggregator):
    r"""PCGrad ("projecting conflicting gradients"), from `Gradient Surgery for Multi-Task Learning
    <https://arxiv.org/abs/2001.06782>`_ (Yu et al., NeurIPS 2020), Algorithm 1.

    Each row :math:`g_i` of the matrix, visiting the other rows :math:`g_j` in a random order, is
    projected onto the normal plane of :math:`g_j` whenever they conflict:

    .. math::

        g_i^{PC} \leftarrow g_i^{PC} - \frac{g_i^{PC} \cdot g_j}{\|g_j\|^2} g_j
        \quad\text{if}\quad g_i^{PC} \cdot g_j < 0,

    and the result is :math:`\sum_i g_i^{PC}`. Computed from the Gramian by
    :class:`PCGradWeighting` (see there for the random draws); not differentiable.

    >>> import torch
    >>> from torchjd.aggregation import PCGrad
    >>> PCGrad()(torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]))
    tensor([0.5848, 3.8012, 3.8012])
    """

    def __init__(self) -> None:
        super().__init__(PCGradWeighting())
