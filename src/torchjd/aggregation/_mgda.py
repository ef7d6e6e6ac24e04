"""MGDA: the minimum-norm point of the convex hull of the gradients, by Frank–Wolfe."""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from torchjd._host_values import float32_values
from torchjd._precision import promoted
from torchjd.aggregation._bases import Forwarded, GramianWeightedAggregator, Weighting
from torchjd.linalg._matrix import PSDMatrix
from torchjd.linalg._min_norm import conflict_tolerance, min_norm_weights

# On accelerators, convergence is checked on the host every this many iterations (see
# ``_mgda_weights``): every check is a synchronisation, so 8 saves 7 of every 8 of them for at most
# 7 extra (frozen) iterations. On the CPU a check synchronises with nothing: it is made at every
# iteration, which stops as early as the definition.
_CHECK_EVERY = 8


def _check_every(device: torch.device) -> int:
    return 1 if device.type == "cpu" else _CHECK_EVERY


def _step(gramian: Tensor, diagonal: Tensor, alpha: Tensor) -> tuple[Tensor, Tensor]:
    """One Frank–Wolfe iteration on a batch ``[..., m]``: the vertex ``t`` and the step ``gamma``
    (both ``[..., 1]``)."""
    products = (gramian @ alpha.unsqueeze(-1)).squeeze(-1)  # G alpha
    a, t = products.min(dim=-1, keepdim=True)  # the first index among ties
    b = torch.linalg.vecdot(alpha, products).unsqueeze(-1)
    c = diagonal.gather(-1, t)
    gap = b - a
    to_vertex = c <= a
    stay = b <= a
    # b + c - 2a > 0 wherever the quotient is used; elsewhere divide by 1 (finite gradients).
    denominator = torch.where(to_vertex | stay, 1.0, gap + (c - a))
    gamma = torch.where(to_vertex, 1.0, torch.where(stay, 0.0, gap / denominator))
    return t, gamma


def _mgda_weights(
    gramian: Tensor, epsilon: float | Tensor, max_iters: int | Sequence[int]
) -> Tensor:
    r"""Frank–Wolfe weights of a batch of Gramians ``[..., m, m]`` (``m >= 1``), differentiable.

    Minimises :math:`\alpha^\top G \alpha` over the simplex, from :math:`\alpha = \mathbf 1 / m`.
    Each iteration takes :math:`t = \arg\min_k (G\alpha)_k` (the first index among ties),
    :math:`a = (G\alpha)_t`, :math:`b = \alpha^\top G \alpha`, :math:`c = G_{tt}`, the exact line
    search :math:`\gamma = 1` if :math:`c \le a`, else :math:`0` if :math:`b \le a`, else
    :math:`(b - a) / (b + c - 2a)`, and :math:`\alpha \leftarrow (1 - \gamma)\alpha + \gamma e_t`.
    A problem stops after the iteration whose :math:`\gamma < \epsilon`, or after ``max_iters``.

    With ``m = 2`` the first iteration's line search spans the whole simplex (from the midpoint
    towards the descent vertex), so it lands on the minimiser and the next step is 0: the result
    is that minimiser, computed in closed form, which avoids the cancellation
    of ``1 - gamma`` when the rows have very different norms.

    A stopped problem is frozen (its later steps use :math:`\gamma = 0`, which leaves
    :math:`\alpha` unchanged exactly), so the batch runs without branching on tensor values; the
    loop ends early when every problem has stopped, which is checked on the host at every
    iteration on the CPU, and every ``_CHECK_EVERY`` iterations (a synchronisation) elsewhere.

    :param gramian: the Gramians ``[..., m, m]``.
    :param epsilon: the stopping threshold, a float or one value per Gramian (shape ``[...]``).
    :param max_iters: the iteration budget, an int or one per Gramian (flattened order).
    """
    *batch, m, _ = gramian.shape
    alpha = torch.full((*batch, m), 1.0 / m, dtype=gramian.dtype, device=gramian.device)
    if m == 1:
        return alpha + 0.0 * gramian[..., 0]  # keeps the graph and a NaN
    diagonal = gramian.diagonal(dim1=-2, dim2=-1)
    if m == 2:
        return _two_rows(gramian)
    if isinstance(max_iters, int):
        n_iters, budgets = max_iters, None
    else:
        n_iters = max(max_iters)
        budgets = torch.tensor(list(max_iters), device=gramian.device).view(*batch, 1)
    if isinstance(epsilon, Tensor):
        epsilon = epsilon.to(dtype=gramian.dtype, device=gramian.device).view(*batch, 1)
    check_every = _check_every(gramian.device)
    if not batch or (math.prod(batch) == 1 and budgets is None and check_every == 1):
        return _single_problem(gramian, diagonal, alpha, epsilon, n_iters)
    stopped = torch.zeros(*batch, 1, dtype=torch.bool, device=gramian.device)
    for iteration in range(n_iters):
        t, gamma = _step(gramian, diagonal, alpha)
        gamma = torch.where(stopped, 0.0, gamma)
        alpha = (alpha * (1 - gamma)).scatter_add(-1, t, gamma)
        stopped = stopped | (gamma < epsilon)
        if budgets is not None:
            stopped = stopped | (budgets <= iteration + 1)
        if (iteration + 1) % check_every == 0 and iteration + 1 < n_iters and bool(stopped.all()):
            break
    return alpha


def _solve(gramians: Tensor, epsilon: float | Tensor, max_iters: int | Sequence[int]) -> Tensor:
    """Frank–Wolfe weights of Gramians ``[..., m, m]`` in their working dtype, each replaced by
    the exact minimum-norm weights where it conflicts with a row beyond the tolerance."""
    gramian = promoted(gramians)
    alpha = _mgda_weights(gramian, epsilon, max_iters)
    if gramians.shape[-1] > 2:  # one or two rows: exact already (closed form), no host check
        alpha = _finish(gramian, alpha, conflict_tolerance(gramians.dtype))
    return alpha.to(gramians.dtype)


def _finish(gramian: Tensor, alpha: Tensor, tolerance: float) -> Tensor:
    r"""``alpha``, except for the problems where :math:`d = J^\top \alpha` conflicts with a row
    beyond the tolerance, :math:`g_i^\top d < -\tau \|g_i\| \|d\|`, whose weights are replaced
    by the exact minimum-norm weights (:func:`torchjd.linalg._min_norm.min_norm_weights`).

    Checking the condition reads one boolean on the host; the exact solve runs only for the
    problems that fail it (Frank–Wolfe's early stop at mixed row scales, large ``m``).
    """
    products = (gramian @ alpha.unsqueeze(-1)).squeeze(-1)
    norm = torch.linalg.vecdot(alpha, products).clamp(min=0.0).sqrt().unsqueeze(-1)
    row_norms = gramian.diagonal(dim1=-2, dim2=-1).clamp(min=0.0).sqrt()
    # Half of the tolerance, so that the rounding of d = J^T alpha keeps the claim.
    conflicts = (products < -0.5 * tolerance * row_norms * norm).any(dim=-1)
    if not bool(conflicts.any()):
        return alpha
    m = gramian.shape[-1]
    flat_gramians = gramian.reshape(-1, m, m)
    eps = torch.finfo(gramian.dtype).eps
    rows = [
        min_norm_weights(flat_gramians[k], eps).to(alpha.dtype) if conflict else None
        for k, conflict in enumerate(conflicts.reshape(-1).tolist())
    ]
    flat = alpha.reshape(-1, m)
    exact = torch.stack([flat[k] if row is None else row for k, row in enumerate(rows)])
    return exact.reshape(alpha.shape)


def _two_rows(gramian: Tensor) -> Tensor:
    """The minimiser for ``m = 2``: ``alpha_0 = (G_11 - G_01) / (G_00 + G_11 - 2 G_01)`` and
    ``alpha_1 = (G_00 - G_01) / (...)``, clipped to ``[0, 1]``; identical rows (zero
    denominator) give ``e_0``, as the first Frank–Wolfe step does (ties take the first index)."""
    g00, g01, g11 = gramian[..., 0, 0], gramian[..., 0, 1], gramian[..., 1, 1]
    numerators = torch.stack([g11 - g01, g00 - g01], dim=-1)
    denominator = (numerators[..., 0] + numerators[..., 1]).unsqueeze(-1)
    positive = denominator > 0
    # e_0, built on the device (a copy from the host would synchronise).
    identical = (torch.arange(2, device=gramian.device) == 0).to(gramian.dtype)
    # Divide by 1 where the quotient is not used (finite gradients).
    quotient = numerators / torch.where(positive, denominator, 1.0)
    return torch.where(positive | denominator.isnan(), quotient.clamp(0.0, 1.0), identical)


def _single_problem(
    gramian: Tensor, diagonal: Tensor, alpha: Tensor, epsilon: float | Tensor, n_iters: int
) -> Tensor:
    """Frank–Wolfe on one problem, stopping as soon as ``gamma < epsilon`` (read on the host at
    every iteration, where the CPU has nothing to synchronise with; on an accelerator, every
    ``_CHECK_EVERY`` iterations, the later steps being frozen as in the batched loop)."""
    check_every = _check_every(gramian.device)
    if check_every == 1 and isinstance(epsilon, float) and not _tracked(gramian):
        return _single_problem_on_host(gramian, alpha, epsilon, n_iters)
    if check_every == 1:
        for _ in range(n_iters):
            t, gamma = _step(gramian, diagonal, alpha)
            alpha = (alpha * (1 - gamma)).scatter_add(-1, t, gamma)
            if bool(gamma < epsilon):
                break
        return alpha
    stopped = torch.zeros(1, dtype=torch.bool, device=gramian.device)
    for iteration in range(n_iters):
        t, gamma = _step(gramian, diagonal, alpha)
        gamma = torch.where(stopped, 0.0, gamma)
        alpha = (alpha * (1 - gamma)).scatter_add(-1, t, gamma)
        stopped = stopped | (gamma < epsilon)
        if (iteration + 1) % check_every == 0 and iteration + 1 < n_iters and bool(stopped):
            break
    return alpha


def _tracked(tensor: Tensor) -> bool:
    return tensor.requires_grad and torch.is_grad_enabled()


def _single_problem_on_host(gramian: Tensor, alpha: Tensor, epsilon: float, n_iters: int) -> Tensor:
    """:func:`_single_problem` on the CPU when no gradient is tracked: the scalars of each step
    (``t``, ``a``, ``b``, ``c``, ``gamma``) are Python numbers (reading a CPU tensor synchronises
    with nothing), which leaves two matrix-vector products and an update as tensor work.

    The steps are :func:`_step`'s operations in the same order, each rounded to the Gramian's dtype
    (float32 included): Frank–Wolfe's vertex choices and stopping test turn a last-place difference
    of ``gamma`` into a different iterate (e.g. ``1 - gamma`` of 0 or 3e-8 next to a row of norm
    1e6), so anything else departs from the tensor path far beyond its tolerance."""
    shape = alpha.shape
    gramian = gramian.reshape(gramian.shape[-1], -1)
    alpha = alpha.reshape(-1).clone()
    diagonal = gramian.diagonal().tolist()
    rounded = _rounding(gramian.dtype)
    epsilon = rounded(epsilon)  # the comparison with the tensor's gamma is made in its dtype
    for _ in range(n_iters):
        products = gramian @ alpha
        a_tensor, t_tensor = products.min(dim=0)
        t, a, b = int(t_tensor), float(a_tensor), float(alpha @ products)
        c = diagonal[t]
        if c <= a:
            gamma = 1.0
        elif b <= a:
            gamma = 0.0
        else:
            gap = rounded(b - a)
            gamma = rounded(gap / rounded(gap + rounded(c - a)))
        alpha.mul_(rounded(1.0 - gamma))
        alpha[t] += gamma
        if gamma < epsilon or gamma != gamma:  # NaN: a NaN Gramian gives NaN weights
            break
    return alpha.view(shape)


def _rounding(dtype: torch.dtype) -> Callable[[float], float]:
    """Rounds a Python float to ``dtype`` (float32 or float64), as a tensor operation would."""
    if dtype == torch.float64:
        return float
    return lambda value: float32_values((value,))[0]


def _check_epsilon(epsilon: float) -> float:
    if not epsilon > 0.0:
        raise ValueError(f"`epsilon` must be a positive number, got {epsilon!r}.")
    return epsilon


def _check_max_iters(max_iters: int) -> int:
    try:
        operator.index(max_iters)
    except TypeError:
        raise TypeError(f"`max_iters` must be an int, got {max_iters!r}.") from None
    if max_iters <= 0:
        raise ValueError(f"`max_iters` must be a positive int, got {max_iters!r}.")
    return max_iters


class MGDAWeighting(Weighting[PSDMatrix]):
    r"""Weighting of :class:`MGDA`: the weights :math:`\alpha` in the simplex minimising
    :math:`\alpha^\top G \alpha = \|J^\top \alpha\|^2`, found by Frank–Wolfe.

    From :math:`\alpha = \mathbf 1 / m`, each iteration picks the vertex
    :math:`t = \arg\min_k (G\alpha)_k` (first index among ties), computes :math:`a = (G\alpha)_t`,
    :math:`b = \alpha^\top G \alpha`, :math:`c = G_{tt}` and the exact line-search step

    .. math::

        \gamma = \begin{cases} 1 & c \le a \\ 0 & b \le a \\ \frac{b - a}{b + c - 2a} &
        \text{otherwise,} \end{cases}
        \qquad \alpha \leftarrow (1 - \gamma) \alpha + \gamma e_t,

    and stops after the first iteration with :math:`\gamma < \epsilon`, or after ``max_iters``.

    Where the result conflicts with a row beyond the tolerance of :class:`MGDA` (Frank–Wolfe's
    early stop), it is replaced by the exact minimiser (Wolfe's active-set algorithm, in float64).

    Plain tensor arithmetic in the input's dtype (float32 for float16 and bfloat16 inputs, see
    :mod:`torchjd._precision`; the weights are returned in the input's dtype) and on its device,
    differentiable with respect to the Gramian. Stopping early is a data-dependent decision:
    whether every problem has converged is read on the host (a device synchronisation) once every
    8 iterations; in between, converged problems are frozen, so the result is exactly that of
    checking at every iteration. The conflict check reads one more boolean on the host; the
    active-set steps, inherently sequential, run on the host for the problems that fail it.

    :param epsilon: stopping threshold on the step :math:`\gamma`, ``> 0`` (default ``0.001``).
    :param max_iters: maximum number of iterations, ``>= 1`` (default ``100``).
    """

    def __init__(self, epsilon: float = 0.001, max_iters: int = 100) -> None:
        super().__init__()
        self.epsilon = epsilon
        self.max_iters = max_iters

    @property
    def epsilon(self) -> float:
        return self._epsilon

    @epsilon.setter
    def epsilon(self, value: float) -> None:
        self._epsilon = _check_epsilon(value)

    @property
    def max_iters(self) -> int:
        return self._max_iters

    @max_iters.setter
    def max_iters(self, value: int) -> None:
        self._max_iters = _check_max_iters(value)

    def forward(self, stat: Tensor, /) -> Tensor:
        return self._forward_batched(stat)

    def _forward_batched(self, gramians: Tensor) -> Tensor:
        """Weights ``[..., m]`` of Gramians ``[..., m, m]``, each solved independently."""
        if gramians.shape[-1] == 0:
            raise ValueError(
                "MGDA needs at least one objective: got a Gramian of shape "
                f"{tuple(gramians.shape)}."
            )
        return _solve(gramians, float(self.epsilon), int(self.max_iters))

    @classmethod
    def _forward_grouped(cls, weightings: Sequence[MGDAWeighting], gramians: Tensor) -> Tensor:
        """Weights ``[b, m]`` of Gramians ``[b, m, m]``, the ``k``-th one with the ``epsilon`` and
        ``max_iters`` of ``weightings[k]``."""
        if len(weightings) != gramians.shape[0]:
            raise ValueError(
                f"Got {len(weightings)} weightings for {gramians.shape[0]} Gramians: give one "
                "weighting per Gramian."
            )
        if gramians.shape[-1] == 0 or not weightings:
            return MGDAWeighting()._forward_batched(gramians)
        epsilons = [float(w.epsilon) for w in weightings]
        budgets = [int(w.max_iters) for w in weightings]
        if len(set(epsilons)) == 1 and len(set(budgets)) == 1:
            return _solve(gramians, epsilons[0], budgets[0])
        return _solve(gramians, torch.tensor(epsilons, dtype=torch.float64), budgets)


class MGDA(GramianWeightedAggregator):
    r"""Multiple-gradient descent algorithm: the minimum-norm point of the convex hull of the rows,
    from `Multiple-gradient descent algorithm (MGDA) for multiobjective optimization
    <https://doi.org/10.1016/j.crma.2012.03.014>`_ (Désidéri, C. R. Math. 2012), solved by
    Frank–Wolfe as in `Multi-Task Learning as Multi-Objective Optimization
    <https://arxiv.org/abs/1810.04650>`_ (Sener and Koltun, NeurIPS 2018), Algorithm 2.

    Returns :math:`J^\top \alpha` with :math:`\alpha \in \arg\min_{\alpha \in \Delta_m}
    \|J^\top \alpha\|^2` (approximately, see :class:`MGDAWeighting` for the iteration and the
    stopping rule). Differentiable.

    The exact min-norm point conflicts with no row. The point where Frank–Wolfe stops may (its
    stopping rule is absolute, not relative to each row: with rows of norms 1e-6 and 1e6, or with
    many rows, cosines down to -0.9 occur), so it is checked: wherever a row has
    :math:`g_k^\top d < -\tfrac12 \tau \|g_k\| \|d\|`, with :math:`\tau = 10^{-6}` in float64,
    :math:`10^{-4}` in float32 and :math:`10^{-2}` in half precision, the weights are replaced by
    the exact minimiser, found by Wolfe's active-set algorithm (deviation from the reference, which
    returns the Frank–Wolfe point). Hence every row satisfies
    :math:`g_k^\top d \ge -\tau \|g_k\| \|d\|` up to the rounding of :math:`d`, whatever the
    scales, at Pareto-stationary points included (where :math:`d \approx 0`).

    :param epsilon: stopping threshold on the Frank–Wolfe step, ``> 0`` (default ``0.001``).
    :param max_iters: maximum number of iterations, ``>= 1`` (default ``100``).

    >>> import torch
    >>> from torchjd.aggregation import MGDA
    >>> MGDA()(torch.tensor([[-1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]))
    tensor([0., 1., 1.])
    """

    def __init__(self, epsilon: float = 0.001, max_iters: int = 100) -> None:
        super().__init__(MGDAWeighting(epsilon=epsilon, max_iters=max_iters))

    epsilon = Forwarded[float]()
    max_iters = Forwarded[int]()
