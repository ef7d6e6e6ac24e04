"""IMTL-G: the combination of the rows whose projections on every row have equal length."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from torchjd._precision import promoted, working_dtype
from torchjd.aggregation._bases import GramianWeightedAggregator, NoGrad, Weighting
from torchjd.linalg._matrix import PSDMatrix
from torchjd.linalg._nonfinite import finite_part, poison

# Below this absolute value, the sum of the unnormalised weights is treated as zero.
_SUM_EPS = 1e-12
# How far below pinv's threshold 1 / (m eps) a bound on the condition number must be for G^{-1}
# to replace the pseudo-inverse.
_CONDITION_MARGIN = 100.0


def _imtlg_weights(gramians: Tensor) -> Tensor:
    """IMTL-G's weights of a batch of Gramians ``[..., m, m]``, in their dtype and on their
    device (computed in float32 for half-precision Gramians; NaN for a Gramian holding an
    infinity or a NaN, on which ``eigh`` would fail). Few tensor operations: at small ``m`` their
    fixed cost, not the arithmetic, is the price of a call."""
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
    # A total within the rounding of the sum of |v| (Pareto-stationary rows), or below _SUM_EPS,
    # is zero: dividing by it would give weights of any size.
    threshold = v.abs().sum(dim=-1, keepdim=True).mul_(4 * m * torch.finfo(v.dtype).eps)
    usable = total.abs() >= threshold.clamp_(min=_SUM_EPS)
    weights = torch.where(usable, v / total, 0.0)
    return poison(weights, nan_where_non_finite).to(dtype=gramians.dtype)


def _pinv_times_norms(G: Tensor) -> Tensor:
    """``G^+ d`` with ``d_i = sqrt(G_ii)`` for a batch of finite Gramians ``[..., m, m]``.

    The same as ``torch.linalg.pinv(G) @ d`` (for a symmetric ``G`` the singular values are the
    ``|l_i|`` of its eigenvalues, and the default tolerance drops those below ``m eps max |l|``),
    from the eigendecomposition ``G = Q diag(l) Q^T`` (one ``eigh`` instead of an SVD), or, on the
    CPU, from ``G^{-1}`` for the Gramians whose inverse replaces the pseudo-inverse
    (:func:`_well_conditioned_inverse`); when all of them do, no eigendecomposition is made."""
    m = G.shape[-1]
    norms = G.diagonal(dim1=-2, dim2=-1).clamp(min=0.0).sqrt_().unsqueeze_(-1)  # d_i = ||g_i||
    inverse, invertible = None, None
    if G.device.type == "cpu":  # host reads synchronise with nothing there
        inverse, invertible = _well_conditioned_inverse(G)
        if invertible is True or (isinstance(invertible, Tensor) and bool(invertible.all())):
            return (inverse @ norms).squeeze_(-1)
    eigenvalues, Q = torch.linalg.eigh(G)
    magnitudes = eigenvalues.abs()
    tolerance = magnitudes.amax(dim=-1, keepdim=True).mul_(m * torch.finfo(G.dtype).eps)
    scales = torch.where(magnitudes > tolerance, eigenvalues.reciprocal(), 0.0).unsqueeze_(-1)
    by_eigenvalues = (Q @ (Q.mT @ norms).mul_(scales)).squeeze_(-1)
    if not isinstance(invertible, Tensor):
        return by_eigenvalues
    # The same choice as for each Gramian alone.
    return torch.where(invertible.unsqueeze(-1), (inverse @ norms).squeeze_(-1), by_eigenvalues)


def _well_conditioned_inverse(G: Tensor) -> tuple[Tensor | None, Tensor | bool]:
    """``G^{-1}`` through a Cholesky factorisation (a fraction of the cost of an
    eigendecomposition), and whether it replaces the pseudo-inverse, for each Gramian: ``G`` is
    positive definite with a condition number provably ``_CONDITION_MARGIN`` times below the
    ``1 / (m eps)`` of ``pinv``'s tolerance, so that ``pinv`` keeps every eigenvalue whatever its
    rounding (``cond(G) <= tr(G) tr(G^{-1})``, since ``l_max <= tr(G)`` and
    ``1 / l_min <= tr(G^{-1})``). For one Gramian (``[m, m]``), the answer is a bool (and the
    inverse None when ``G`` is not positive definite)."""
    L, info = torch.linalg.cholesky_ex(G)
    limit = 1.0 / (_CONDITION_MARGIN * G.shape[-1] * torch.finfo(G.dtype).eps)
    if G.ndim == 2:  # fewer tensor operations
        if int(info) != 0:
            return None, False
        inverse = torch.cholesky_inverse(L)
        return inverse, float(G.trace() * inverse.trace()) < limit
    failed = info != 0
    if bool(failed.any()):
        # Invert the identity instead (cholesky_inverse raises on a singular factor).
        eye = torch.eye(G.shape[-1], dtype=G.dtype, device=G.device)
        L = torch.where(failed[..., None, None], eye, L)
    inverse = torch.cholesky_inverse(L)
    bound = G.diagonal(dim1=-2, dim2=-1).sum(dim=-1) * inverse.diagonal(dim1=-2, dim2=-1).sum(
        dim=-1
    )
    return inverse, (bound < limit) & ~failed


def _two_rows_on_host(G: Tensor) -> Tensor:
    """:func:`_imtlg_weights` of one ``2 x 2`` Gramian on the CPU, in closed form with Python
    numbers (reading a CPU tensor synchronises with nothing; a dozen tensor operations would cost
    more than the whole formula).

    With ``G = [[a, c], [c, b]]``, ``l`` its eigenvalue of largest magnitude and ``k = det / l`` the
    other one, ``pinv`` keeps ``k`` when ``|k| > 2 eps |l|``. Then, for ``a, b >= 0``,
    ``G^{-1} d = (sqrt(b), sqrt(a)) / (sqrt(ab) + c)`` (the factor ``sqrt(ab) - c`` of the
    determinant cancels), so that the weights are the norms, swapped and normalised; otherwise
    ``G^+ = q q^T / l`` with ``q = (cos t, sin t)``, ``t = atan2(2c, a - b) / 2``, the unit
    eigenvector of ``l`` (turned by a right angle when ``l < 0``)."""
    (a, c_upper), (c_lower, b) = G.tolist()
    if not all(math.isfinite(x) for x in (a, b, c_upper, c_lower)):
        return torch.full((2,), math.nan, dtype=G.dtype)
    c = 0.5 * (c_upper + c_lower)
    n_a, n_b = math.sqrt(max(a, 0.0)), math.sqrt(max(b, 0.0))  # d = (||g_1||, ||g_2||)
    trace, spread = a + b, math.hypot(a - b, 2.0 * c)
    large = 0.5 * (trace + spread) if trace >= 0.0 else 0.5 * (trace - spread)
    if large == 0.0:
        return torch.zeros(2, dtype=G.dtype)
    eps = torch.finfo(working_dtype(G.dtype)).eps
    small = a * (b / large) - c * (c / large)  # det / large, without overflowing det
    if abs(small) > 2.0 * eps * abs(large):
        s = n_a * n_b + c
        if a >= 0.0 and b >= 0.0 and s != 0.0:
            v = (n_b / s, n_a / s)
        else:  # adj(G) d / det
            v = (((b / large) * n_a - (c / large) * n_b) / small,
                 ((a / large) * n_b - (c / large) * n_a) / small)  # fmt: skip
    else:
        angle = 0.5 * math.atan2(2.0 * c, a - b)
        q = (
            (math.cos(angle), math.sin(angle))
            if large > 0.0
            else (-math.sin(angle), math.cos(angle))
        )
        scale = (q[0] * n_a + q[1] * n_b) / large
        v = (q[0] * scale, q[1] * scale)
    total = v[0] + v[1]
    threshold = max(4 * 2 * eps * (abs(v[0]) + abs(v[1])), _SUM_EPS)
    if not abs(total) >= threshold:
        return torch.zeros(2, dtype=G.dtype)
    return torch.tensor((v[0] / total, v[1] / total), dtype=G.dtype)


def _well_conditioned_on_host(gramian: Tensor) -> Tensor | None:
    """:func:`_imtlg_weights` of one finite, well-conditioned Gramian on the CPU (see
    :func:`_well_conditioned_inverse`), with the few tensor operations of ``G^{-1} d`` and the
    normalisation of the weights in Python numbers; None for any other Gramian."""
    G = promoted(gramian)
    if not math.isfinite(float(G.sum())):  # an overflowing sum only sends G to the general path
        return None
    inverse, invertible = _well_conditioned_inverse(G)
    if invertible is not True:
        return None
    v = inverse @ G.diagonal().clamp(min=0.0).sqrt_()
    # The sums in G's dtype, as in _imtlg_weights: near Pareto-stationary rows, the weights
    # v / total magnify their rounding.
    total, magnitude = float(v.sum()), float(torch.linalg.vector_norm(v, ord=1))
    threshold = max(magnitude * (4 * v.shape[0] * torch.finfo(G.dtype).eps), _SUM_EPS)
    if not abs(total) >= threshold:
        return torch.zeros(v.shape[0], dtype=gramian.dtype)
    return torch.tensor([x / total for x in v.tolist()], dtype=gramian.dtype)


class IMTLGWeighting(NoGrad, Weighting[PSDMatrix]):
    r"""Weighting of :class:`IMTLG`: :math:`w = v / \mathbf 1^\top v` with
    :math:`v = G^+ d`, where :math:`d_i = \sqrt{G_{ii}} = \|g_i\|`.

    :math:`G^+` is the pseudo-inverse of :func:`torch.linalg.pinv` with its default tolerance
    (singular values below :math:`m \varepsilon \sigma_{\max}` are dropped, :math:`\varepsilon` the
    machine epsilon of the Gramian's dtype), applied through a symmetric eigendecomposition
    (:math:`m = 1`: :math:`v = 1 / \sqrt{G_{11}}`, or 0); half-precision Gramians are solved in
    float32. When :math:`|\mathbf 1^\top v| < 10^{-12}` (e.g. for a zero
    Gramian) the weights are all zero. Computed in the Gramian's dtype and on its device, without
    host synchronisation, except on the CPU (where reading values synchronises with nothing): one
    ``2 x 2`` Gramian has a closed form, evaluated with Python numbers in double precision (for
    independent rows, the row norms swapped and normalised), and a Gramian whose condition number
    is provably far below ``1 / (m eps)`` is inverted through its Cholesky factor (``pinv`` would
    keep all its eigenvalues); the eigendecomposition is made only when some Gramian needs it.
    Not differentiable: runs under :func:`torch.no_grad`.
    """

    def forward(self, stat: Tensor, /) -> Tensor:
        if stat.device.type == "cpu":
            if stat.shape[0] == 2:
                return _two_rows_on_host(stat)
            if stat.shape[0] > 2:
                weights = _well_conditioned_on_host(stat)
                if weights is not None:
                    return weights
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
