"""The exact minimum-norm point of the convex hull of the rows of a matrix, from its Gramian."""

import torch
from torch import Tensor

# Optimality tolerance: alpha is optimal when every row i satisfies
# g_i . d >= ||d||^2 - _TOLERANCE ||g_i|| ||d||, a test that is invariant to the scale of each row.
_TOLERANCE = 1e-12
# Weights below this fraction of the largest one leave the support when a step reaches them.
_DROP = 1e-14
_REFINEMENTS = 2
_ROUNDING = 16


def conflict_tolerance(dtype: torch.dtype) -> float:
    r"""The relative tolerance :math:`\tau` of a non-conflict claim in ``dtype``:
    :math:`g_i^\top d \ge -\tau \|g_i\| \|d\|`, with :math:`\tau = 10^{-6}` in float64,
    :math:`10^{-4}` in float32 and :math:`10^{-2}` in float16 and bfloat16."""
    if dtype in (torch.float16, torch.bfloat16):
        return 1e-2
    return 1e-4 if dtype == torch.float32 else 1e-6


def min_norm_weights(gramian: Tensor, eps: float | None = None) -> Tensor:
    r"""The weights :math:`\alpha \in \Delta_m` minimising :math:`\alpha^\top G \alpha`, exactly.

    Wolfe's algorithm (P. Wolfe, *Finding the nearest point in a polytope*, Math. Programming 11,
    1976), on the Gramian :math:`G = J J^\top` of one ``[m, m]`` problem, in float64. The support
    :math:`S` starts at the shortest row; each major step adds the row :math:`j` with the smallest
    :math:`(G\alpha)_j = g_j^\top d` while :math:`g_j^\top d < \|d\|^2` (up to a relative
    :math:`10^{-12}` per row, and to the rounding of the Gramian, ``16 * eps`` times
    :math:`\|g_j\| \sum_i \alpha_i \|g_i\|`); each minor step moves towards the minimiser of
    :math:`\|J^\top x\|^2` over the affine hull of :math:`S` (:math:`\mathbf 1^\top x = 1`) as far
    as the simplex allows and drops the rows whose weight reaches 0. It ends in finitely many
    steps (it also stops when a major step fails to decrease :math:`\|d\|^2`, which only rounding
    causes), at a point where :math:`g_i^\top d \ge \|d\|^2 \ge 0` for every row up to these
    tolerances: whatever the scales of the rows, :math:`d = J^\top \alpha` conflicts with none.

    The choices of the support read tensors on the host (an inherently sequential active-set
    method); the weights returned are recomputed from :math:`G` on the final support, so they are
    differentiable with respect to ``gramian``. Returned in float64, on ``gramian``'s device.

    :param gramian: the ``[m, m]`` Gramian, ``m >= 1``.
    :param eps: the relative rounding of ``gramian`` (default: its dtype's machine epsilon; give
        float32's for a Gramian of float32 rows cast to float64).
    """
    g = gramian.to(torch.float64)
    if eps is None:
        eps = torch.finfo(gramian.dtype).eps
    with torch.no_grad():
        support = _support(g.detach(), eps)
    return _on_support(g, support)


def _support(g: Tensor, eps: float) -> list[int]:
    m = g.shape[0]
    diagonal = g.diagonal().clamp(min=0.0)
    norms = diagonal.sqrt()
    support = [int(diagonal.argmin())]
    alpha = g.new_zeros(m)
    alpha[support[0]] = 1.0
    best = (torch.inf, list(support))
    for _ in range(4 * m + 4):
        products = g @ alpha
        norm2 = torch.clamp(alpha @ products, min=0.0)
        if not float(norm2) < best[0]:  # no progress (rounding): keep the best support
            break
        best = (float(norm2), list(support))
        # Below the rounding of the Gramian (about eps ||g_j|| sum_i alpha_i ||g_i|| in g_j . d),
        # a row cannot be told to conflict: without this floor, points near 0 would cycle.
        rounding = _ROUNDING * eps * norms * (alpha @ norms)
        gaps = products - norm2 + _TOLERANCE * norms * norm2.sqrt() + rounding
        gaps[support] = 0.0
        j = int(gaps.argmin())
        if not bool(gaps[j] < 0):  # optimal (or NaN: nothing to improve)
            break
        support.append(j)
        alpha, support = _minor_steps(g, alpha, support)
    return best[1]


def _minor_steps(g: Tensor, alpha: Tensor, support: list[int]) -> tuple[Tensor, list[int]]:
    """Move towards the affine minimiser on ``support`` until it lies inside the simplex."""
    for _ in range(len(support)):
        x = _affine_minimiser(g, support)
        index = torch.tensor(support, device=g.device)
        if bool((x > 0).all()):
            return alpha.zero_().index_put_((index,), x), support
        # The largest step theta in [0, 1] from the current weights towards x that keeps every
        # weight >= 0; the weight that reaches 0 first leaves the support, with any negligible one.
        current = alpha[index]
        leaving = x <= 0
        ratios = torch.where(leaving, current / torch.where(leaving, current - x, 1.0), torch.inf)
        theta = ratios.min().clamp(0.0, 1.0)
        moved = current + theta * (x - current)
        keep = moved > _DROP * moved.max()
        keep[int(ratios.argmin())] = False
        moved = torch.where(keep, moved, 0.0).clamp(min=0.0)
        alpha = alpha.zero_().index_put_((index,), moved / moved.sum())
        support = [s for s, k in zip(support, keep.tolist(), strict=True) if k]
        if len(support) == 1:
            break
    return alpha, support


def _affine_minimiser(g: Tensor, support: list[int]) -> Tensor:
    r"""The minimiser of :math:`x^\top G_{SS} x` subject to :math:`\mathbf 1^\top x = 1`.

    Solved in the variables :math:`y = s \odot x`, with :math:`\hat G = G_{SS}` scaled to a unit
    diagonal (the rows may differ in norm by many orders of magnitude).
    The bordered system :math:`[\hat G, s^{-1}; s^{-\top}, 0]` (with :math:`s` the row norms) is
    solved directly; it is singular only when the rows of :math:`S` are affinely dependent, where
    its pseudo-inverse gives the minimum-norm solution.
    """
    index = torch.tensor(support, device=g.device)
    block = g[index][:, index]
    k = len(support)
    scale = block.diagonal().clamp(min=0.0).sqrt()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    unit = block / scale.unsqueeze(0) / scale.unsqueeze(1)
    # Bordered KKT system [G 1; 1^T 0] [x; -lambda] = [0; 1], in the scaled variables x = y / s.
    kkt = unit.new_zeros(k + 1, k + 1)
    kkt[:k, :k] = unit
    kkt[:k, k] = 1.0 / scale
    kkt[k, :k] = 1.0 / scale
    rhs = unit.new_zeros(k + 1)
    rhs[k] = 1.0
    solution, info = torch.linalg.solve_ex(kkt, rhs)
    if not bool((info == 0) & torch.isfinite(solution).all()):
        return (torch.linalg.pinv(kkt, hermitian=True) @ rhs)[:k] / scale
    # Iterative refinement: near a stationary point d = J^T x is a small difference of large
    # terms, which one LU solve leaves several orders of magnitude above the rounding of d.
    for _ in range(_REFINEMENTS):
        correction, _ = torch.linalg.solve_ex(kkt, rhs - kkt @ solution)
        solution = solution + correction
    return solution[:k] / scale


def _on_support(g: Tensor, support: list[int]) -> Tensor:
    m = g.shape[0]
    if len(support) == 1:
        return (torch.arange(m, device=g.device) == support[0]).to(g.dtype) + 0.0 * g[0]
    x = _affine_minimiser(g, support)
    index = torch.tensor(support, device=g.device)
    return g.new_zeros(m).index_put((index,), x)
