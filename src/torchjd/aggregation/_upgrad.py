"""UPGrad: sum of the projections of the (weighted) rows onto the dual cone of all rows."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from torchjd.aggregation._bases import Forwarded, GramianWeightedAggregator, NoGrad, Weighting
from torchjd.aggregation._mean import MeanWeighting
from torchjd.aggregation._utils import (
    check_one_weighting_per_gramian,
    indices_by_projector,
    pref_vector_str,
    pref_vector_to_weighting,
    stacked_preferences,
)
from torchjd.linalg._block_pivoting import (
    BlockPivotingProjector,
    summed_diagonal_projection,
    summed_diagonal_projections,
)
from torchjd.linalg._matrix import PSDMatrix
from torchjd.linalg._projector import DualConeProjector, check_projection_shapes


def _upgrad_weights(projector: DualConeProjector, prefs: Tensor, gramians: Tensor) -> Tensor:
    """Weights ``[b, m]`` for Gramians ``[b, m, m]`` and preference weights ``[b, m]``: the column
    sums of ``projector(diag(p), G)``.

    :class:`BlockPivotingProjector` solves the whole batch at once; any other projector is called
    once per Gramian, as its contract (a single ``[m, m]`` Gramian) requires.
    """
    if isinstance(projector, BlockPivotingProjector):
        return summed_diagonal_projections(projector, prefs, gramians)
    U = torch.diag_embed(prefs)  # row i of U[k] is p_i e_i
    V = torch.stack([projector(U_k, G_k) for U_k, G_k in zip(U, gramians)])
    return V.sum(dim=-2)


class UPGradWeighting(NoGrad, Weighting[PSDMatrix]):
    r"""Weighting of :class:`UPGrad`: :math:`w = \sum_i v^{(i)}` where :math:`v^{(i)}` solves
    :math:`\min_{v \succeq p_i e_i} v^\top G v` (computed by ``projector``).

    ``p`` are the preference weights, given by the child weighting ``weighting`` (``MeanWeighting``
    when ``pref_vector`` is None, i.e. :math:`p = \frac1m \mathbf 1`, else ``ConstantWeighting``).
    With :math:`G = J J^\top`, :math:`J^\top v^{(i)}` is the projection of :math:`p_i g_i` onto the
    dual cone of the rows of :math:`J`, so :math:`J^\top w` is UPGrad's aggregation. Not
    differentiable: runs under :func:`torch.no_grad`.

    :param pref_vector: the preference vector :math:`p` (one entry per row, 1-D), or None for the
        mean. Its length must equal the number of rows at call time.
    :param projector: the :class:`~torchjd.linalg.DualConeProjector` that solves the problems, or
        None for :class:`~torchjd.linalg.BlockPivotingProjector` with its default parameters.
    """

    _task_vectors = ("pref_vector",)

    def __init__(
        self, pref_vector: Tensor | None = None, projector: DualConeProjector | None = None
    ) -> None:
        super().__init__()
        self.pref_vector = pref_vector
        self.projector = projector

    @property
    def pref_vector(self) -> Tensor | None:
        return self._pref_vector

    @pref_vector.setter
    def pref_vector(self, value: Tensor | None) -> None:
        self.weighting = pref_vector_to_weighting(value, MeanWeighting())
        self._pref_vector = value

    @property
    def projector(self) -> DualConeProjector:
        return self._projector

    @projector.setter
    def projector(self, value: DualConeProjector | None) -> None:
        self._projector = BlockPivotingProjector() if value is None else value

    def forward(self, stat: Tensor, /) -> Tensor:
        if isinstance(self.projector, BlockPivotingProjector):
            if self._pref_vector is None and stat.ndim == 2 and stat.shape[0] > 0:
                # The mean's preferences without building them: in a loop of one small
                # aggregation per parameter, the tensor costs as much as a small problem.
                check_projection_shapes(stat, stat)
                return summed_diagonal_projection(self.projector, None, stat)
            prefs = self.weighting(stat)
            check_projection_shapes(prefs, stat)
            return summed_diagonal_projection(self.projector, prefs, stat)
        prefs = self.weighting(stat)
        prefs = prefs.to(dtype=stat.dtype, device=stat.device)
        return self.projector(torch.diag(prefs), stat).sum(dim=0)

    @classmethod
    @torch.no_grad()
    def _forward_grouped(cls, weightings: Sequence[UPGradWeighting], gramians: Tensor) -> Tensor:
        """Weights ``[b, m]`` of Gramians ``[b, m, m]``, the ``k``-th one weighted by
        ``weightings[k]`` (with its preference vector and projector). Gramians whose weightings
        hold equal :class:`BlockPivotingProjector` settings are solved in one batch."""
        b, m = gramians.shape[0], gramians.shape[-1]
        check_one_weighting_per_gramian(weightings, gramians)
        if b == 0:
            return gramians.new_zeros(0, m)
        dtype, device = gramians.dtype, gramians.device
        prefs = stacked_preferences(weightings, gramians)
        groups = indices_by_projector(weightings)
        if len(groups) == 1:
            return _upgrad_weights(weightings[0].projector, prefs, gramians)
        weights = torch.empty(b, m, dtype=dtype, device=device)
        for indices in groups:
            index = torch.tensor(indices, device=device)
            projector = weightings[indices[0]].projector
            weights[index] = _upgrad_weights(projector, prefs[index], gramians[index])
        return weights


class UPGrad(NoGrad, GramianWeightedAggregator):
    r"""Unconflicting projection of gradients, from `Jacobian Descent for Multi-Objective
    Optimization <https://arxiv.org/abs/2406.16232>`_ (Quinton and Rey, 2024).

    Each row :math:`g_i`, scaled by its preference weight :math:`p_i`, is projected onto the dual
    cone :math:`\{x : J x \succeq 0\}` of the rows, and the projections are summed:

    .. math:: \mathcal A_{\text{UPGrad}}(J) = \sum_i \pi_J(p_i g_i),
        \qquad \pi_J(x) = \arg\min_{y :\, J y \succeq 0} \|y - x\|^2 .

    The result does not conflict with any row (:math:`J \mathcal A(J) \succeq 0`). The projections
    are computed from the Gramian :math:`G = J J^\top` (Proposition 1 of the paper) by
    :class:`UPGradWeighting`, whose ``projector`` normalises :math:`G` by its trace and adds
    ``reg_eps * I`` before solving: the guarantees then hold up to :math:`O(\text{reg\_eps})`, and
    a matrix with :math:`\|J\|_F^2 <` ``norm_eps`` is averaged (weighted by ``p``). Not
    differentiable.

    :param pref_vector: the preference vector :math:`p` (1-D, one entry per row), or None for
        :math:`p = \frac1m \mathbf 1`.
    :param projector: the :class:`~torchjd.linalg.DualConeProjector` to use, or None for
        :class:`~torchjd.linalg.BlockPivotingProjector` with its default parameters (TorchJD's
        default is :class:`~torchjd.linalg.QuadprogProjector`, which gives the same weights up to
        solver round-off).

    >>> import torch
    >>> from torchjd.aggregation import UPGrad
    >>> UPGrad()(torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]))
    tensor([0.2929, 1.9004, 1.9004])
    """

    def __init__(
        self, pref_vector: Tensor | None = None, projector: DualConeProjector | None = None
    ) -> None:
        super().__init__(UPGradWeighting(pref_vector, projector))

    pref_vector = Forwarded[Tensor | None]()
    projector = Forwarded[DualConeProjector]()

    def __str__(self) -> str:
        return pref_vector_str(type(self).__name__, self.pref_vector)
