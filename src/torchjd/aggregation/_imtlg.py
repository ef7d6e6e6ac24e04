"""IMTL-G: the combination of the rows whose projections on every row have equal length."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from torchjd._precision import promoted
from torchjd.aggregation._bases import GramianWeightedAggregator, NoGrad, Weighting
from torchjd.linalg._matrix import PSDMatrix
from torchjd.linalg._nonfinite import finite_part, poison

# Below this absolute value, the sum of the unnormalised weights is treated as zero.
_SUM_EPS = 1e-12


def _imtlg_weights(gramians: Tensor) -> Tensor:
    """IMTL-G's weights of a batch of Gramians ``[..., m, m]``, in their dtype and on their
    device (computed in float32 for half-precision Gramians; NaN for a Gramian holding an
    infinity or a NaN, on which ``eigh`` would raise)."""
    G, nan_where_non_finite = finite_part(promoted(gramians))
    m = G.shape[-1]
    if m == 0:
        return gramians.new_zeros(gramians.shape[:-1])
    if m == 1:
        g = G[..., 0]
        v = torch.where(g > 0.0, g.rsqrt(), 0.0)  # G^+ d = 1 / sqrt(g) for g > 0, else 0
    else:
        v = _pinv_times_norms(G)
    total = v.sum(dim=-1, keepdim=True)
    # A total within the rounding of the sum of |v| is zero (Pareto-stationary rows): dividing by
    # it would give weights of any size. A NaN total stays usable: NaN in, NaN out.
    rounding = v.abs().sum(dim=-1, keepdim=True) * (4 * m * torch.finfo(v.dtype).eps)
    usable = ~((total.abs() < _SUM_EPS) | (total.abs() < rounding))
    safe_total = torch.where(usable, total, torch.ones_like(total))
    weights = torch.where(usable, v / safe_total, torch.zeros_like(v))
    return poison(weights, nan_where_non_finite).to(dtype=gramians.dtype)


def _pinv_times_norms(G: Tensor) -> Tensor:
    """``G^+ d`` with ``d_i = sqrt(G_ii)``, from the eigendecomposition ``G = Q diag(l) Q^T``.

    The same as ``torch.linalg.pinv(G) @ d`` (for a symmetric ``G`` the singular values are the
    ``|l_i|``, and the default tolerance drops those below ``m eps max |l|``), without forming
    ``G^+``: one symmetric eigendecomposition instead of an SVD."""
    m = G.shape[-1]
    norms = G.diagonal(dim1=-2, dim2=-1).clamp(min=0.0).sqrt().unsqueeze(-1)  # d_i = ||g_i||
    eigenvalues, Q = torch.linalg.eigh(G)
    magnitudes = eigenvalues.abs()
    tolerance = magnitudes.amax(dim=-1, keepdim=True) * (m * torch.finfo(G.dtype).eps)
    kept = magnitudes > tolerance
    inverse = torch.where(kept, 1.0 / torch.where(kept, eigenvalues, 1.0), 0.0)
    v = (Q @ ((Q.mT @ norms) * inverse.unsqueeze(-1))).squeeze(-1)
    return v.add_(tolerance, alpha=0.0)  # a NaN of G (NaN tolerance) stays NaN


class IMTLGWeighting(NoGrad, Weighting[PSDMatrix]):
    r"""Weighting of :class:`IMTLG`: :math:`w = v / \mathbf 1^\top v` with
    :math:`v = G^+ d`, where :math:`d_i = \sqrt{G_{ii}} = \|g_i\|`.

    :math:`G^+` is the pseudo-inverse of :func:`torch.linalg.pinv` with its default tolerance
    (singular values below :math:`m \varepsilon \sigma_{\max}` are dropped, :math:`\varepsilon` the
    machine epsilon of the Gramian's dtype), applied through a symmetric eigendecomposition
    (:math:`m = 1`: :math:`v = 1 / \sqrt{G_{11}}`, or 0); half-precision Gramians are solved in
    float32. When :math:`|\mathbf 1^\top v| < 10^{-12}` (e.g. for a zero
    Gramian) the weights are all zero. Computed in the Gramian's dtype and on its device, without
    host synchronisation. Not differentiable: runs under :func:`torch.no_grad`.
    """

    def forward(self, stat: Tensor, /) -> Tensor:
        return _imtlg_weights(stat)

    @classmethod
    @torch.no_grad()
    def _forward_grouped(cls, weightings: Sequence[IMTLGWeighting], gramians: Tensor) -> Tensor:
        """Weights ``[b, m]`` of Gramians ``[b, m, m]``, the ``k``-th one weighted by
        ``weightings[k]`` (stateless and parameter-free, so all at once)."""
        if len(weightings) != gramians.shape[0]:
            raise ValueError(
                f"Got {len(weightings)} weightings for {gramians.shape[0]} Gramians: give one "
                "weighting per Gramian."
            )
        return _imtlg_weights(gramians)


class IMTLG(NoGrad, GramianWeightedAggregator):
    r"""Impartial multi-task learning (gradient part), from `Towards Impartial Multi-task Learning
    <https://openreview.net/forum?id=IMPnRXEWpvr>`_ (Liu et al., ICLR 2021), in the form of
    `Jacobian Descent for Multi-Objective Optimization <https://arxiv.org/abs/2406.16232>`_ (Quinton
    and Rey, 2024), which also covers linearly dependent rows.

    Returns :math:`d = J^\top w` with :math:`w = \frac{v}{\mathbf 1^\top v}`,
    :math:`v = G^+ (\|g_1\|, \dots, \|g_m\|)^\top` and :math:`G = J J^\top`. When the rows are
    linearly independent, :math:`d` is the combination of the rows summing to one (in the sense
    :math:`\mathbf 1^\top w = 1`) whose projection onto every unit row :math:`g_i / \|g_i\|` has the
    same length, which is IMTL-G's update. The weights are all zero when
    :math:`|\mathbf 1^\top v| < 10^{-12}` (a zero matrix gives a zero vector); this absolute
    threshold also zeroes the result when the rows have norms above about :math:`10^{12}`, since
    :math:`v` scales as the inverse of the norms. Not differentiable.

    >>> import torch
    >>> from torchjd.aggregation import IMTLG
    >>> IMTLG()(torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]))
    tensor([0.0767, 1.0000, 1.0000])
    """

    def __init__(self) -> None:
        super().__init__(IMTLGWeighting())
