import math

import torch
from torch import Tensor

from torchjd.aggregation._bases import Forwarded, GramianWeightedAggregator, NoGrad, Weighting
from torchjd.linalg._matrix import PSDMatrix
from torchjd.linalg._min_norm import conflict_tolerance, min_norm_weights

_DEFAULT_MAX_ITERS = 100
# Scale (relative to the typical weight) that the weights reach where the system has no root.
_DEGENERATE_WEIGHT = 1e7
_MAX_WEIGHT = 100 * _DEGENERATE_WEIGHT
_RESIDUAL_TOL = 1e-10
# A convex hull whose min-norm point has a squared norm below this many machine epsilons (relative
# to its rows) contains 0 up to the rounding of the Gramian.
_STATIONARITY = 4
# The line search tries the steps 2^4, 2^3, ..., 2^-11 and 0 at once.
_N_STEPS = 16
_FULL_STEP = 4  # index of the step 2^0


def _barrier(y: Tensor, p: float) -> Tensor:
    """Antiderivative of ``y ** -p`` (``log y`` for ``p = 1``), summed over the last axis."""
    if p == 1.0:
        return torch.log(y).sum(dim=-1)
    return (y ** (1.0 - p)).sum(dim=-1) / (1.0 - p)


def solve_fair_weights(gramian: Tensor, alpha: float, max_iters: int) -> Tensor:
    r"""The weights solving :math:`G x = x^{\circ(-1/\alpha)}` or, where no root exists, the
    limit of the aggregate :math:`J^\top x` at a Pareto-stationary point; in float64.

    First, the rows that make the input Pareto-stationary are found: while the minimum-norm point
    :math:`J_R^\top \lambda` of the convex hull of the remaining rows :math:`R` (exact, by
    :func:`torchjd.linalg._min_norm.min_norm_weights`) is 0 up to the rounding of the Gramian
    (:math:`\|J_R^\top \lambda\|^2 \le 4\,\varepsilon\,(\sum_i \lambda_i \|g_i\|)^2`, with
    :math:`\varepsilon` the machine epsilon of ``gramian``'s dtype, whose rounding it is),
    the rows of its support join the stationary set :math:`Z` and the others are projected onto
    the orthogonal complement of the span of :math:`J_Z` (a Schur complement of :math:`G`). A zero
    row is such a set on its own. Along these rows the system has no root: the weights grow
    without bound and drive :math:`J_Z d` to 0. The limit of :math:`d` is therefore the solution
    of the same system for the projected remaining rows, :math:`d = P J_R^\top x_R`, which
    conflicts with no row (:math:`J_Z d = 0`); it is returned as the weights
    :math:`x_R` and :math:`x_Z = -G_{ZZ}^{+} G_{ZR} x_R` (finite, possibly negative; 0 for a zero
    row), which give exactly that :math:`d = J^\top x`. With every row stationary, :math:`x = 0`.
    ``[[0, 0], [0, 1]]`` thus gives ``[0, 1]``.

    Near a Pareto-stationary point, the root exists but may need weights too large for
    :func:`_solve_root` to reach within ``max_iters`` steps, and the Gramian of nearly dependent
    rows may be too ill-conditioned for an accurate projection. So the result is checked: where
    its aggregate conflicts with a row (beyond half of :math:`\tau` = 1e-6 in float64, 1e-4 in
    float32, 1e-2 in half precision, relative to :math:`\|g_i\| \|d\|`), the weights of the
    min-norm point, scaled optimally along their ray (:func:`_min_norm_ray`), are returned
    instead: they conflict with no row, whatever ``max_iters``.

    Order of the work: the system is first solved for every row by :func:`_solve_root`; when the
    aggregate makes with every row a cosine above :math:`\sqrt{4\varepsilon}`, no row can be
    stationary and that solution is returned (the usual case: the search above is skipped). A
    non-finite Gramian gives NaN weights.
    """
    g = gramian.to(dtype=torch.float64)
    m = g.shape[0]
    eps = torch.finfo(gramian.dtype).eps
    if not bool(torch.isfinite(g).all()):
        # Non-finite in, non-finite out: NaN weights (an infinity could otherwise be solved away).
        return torch.full((m,), torch.nan, dtype=g.dtype, device=g.device)
    return _solve(g, alpha, max_iters, eps, conflict_tolerance(gramian.dtype))


def _solve(g: Tensor, alpha: float, max_iters: int, eps: float, tolerance: float) -> Tensor:
    """:func:`solve_fair_weights` on a finite float64 Gramian (recursive on the rows left)."""
    m = g.shape[0]
    weights = _solve_root(g, alpha, max_iters)
    if _separates(g, weights, eps):
        return weights
    stationary = _stationary_rows(g, eps)
    rest = [i for i in range(m) if i not in stationary]
    if stationary:
        weights = g.new_zeros(m)
        if rest:
            projected, coefficients = _project_out(g, stationary, rest, eps)
            rest_weights = _solve(projected, alpha, max_iters, eps, tolerance)
            weights[rest] = rest_weights
            weights[stationary] = -(coefficients @ rest_weights)
    if not _conflicts(g, weights, tolerance):
        return weights
    return _min_norm_ray(g, alpha, eps)


def _min_norm_ray(g: Tensor, alpha: float, eps: float) -> Tensor:
    r"""The fallback :math:`x = c \lambda`: the min-norm point's weights :math:`\lambda`, scaled by
    the best :math:`c > 0` of the objective of :func:`_solve_root` along that ray,
    :math:`c^{1 + 1/\alpha} = \sum_{\lambda_i > 0} \lambda_i^{1 - 1/\alpha} / \lambda^\top G
    \lambda`; zeros where the min-norm point is 0 up to rounding. :math:`J^\top \lambda`
    conflicts with no row (:math:`g_i^\top J^\top \lambda \ge \|J^\top \lambda\|^2`)."""
    weights = min_norm_weights(g, eps)
    norm2 = weights @ g @ weights
    norms = g.diagonal().clamp(min=0.0).sqrt()
    if not bool(norm2 > _STATIONARITY * eps * (weights @ norms) ** 2):
        return torch.zeros_like(weights)
    p = 1.0 / alpha
    support = weights[weights > 0]
    return weights * ((support ** (1.0 - p)).sum() / norm2) ** (1.0 / (1.0 + p))


def _conflicts(g: Tensor, weights: Tensor, tolerance: float) -> bool:
    """Whether :math:`d = J^\top x` is not finite or conflicts with a row beyond half of the
    tolerance of the claim (the other half is left to the rounding of :math:`d`)."""
    products = g @ weights
    norm = torch.clamp(weights @ products, min=0.0).sqrt()
    row_norms = g.diagonal().clamp(min=0.0).sqrt()
    conflict = products < -0.5 * tolerance * row_norms * norm
    return bool((conflict | ~torch.isfinite(products)).any())


def _separates(g: Tensor, weights: Tensor, eps: float) -> bool:
    r"""Whether :math:`d = J^\top x` makes with every row a cosine above
    :math:`\sqrt{4 \varepsilon}`. Then, for every :math:`\lambda` in the simplex,
    :math:`\|J^\top \lambda\| \ge \lambda^\top J d / \|d\| > \sqrt{4 \varepsilon}
    \sum_i \lambda_i \|g_i\|`: no row is stationary, which spares the search (the usual case)."""
    products = g @ weights
    norm = torch.clamp(weights @ products, min=0.0).sqrt()
    row_norms = g.diagonal().clamp(min=0.0).sqrt()
    return bool((products > (_STATIONARITY * eps) ** 0.5 * row_norms * norm).all())


def _stationary_rows(g: Tensor, eps: float) -> list[int]:
    """The rows of the stationary set :math:`Z` (see :func:`solve_fair_weights`), sorted."""
    m = g.shape[0]
    norms = g.diagonal().clamp(min=0.0).sqrt()
    stationary: list[int] = []
    while len(stationary) < m:
        rest = [i for i in range(m) if i not in stationary]
        projected = _project_out(g, stationary, rest, eps)[0] if stationary else g
        # Rows that are 0 up to rounding (once projected) are stationary sets of their own: all
        # join at once (e.g. every row, once a spanning set has been projected out).
        zero = projected.diagonal() <= _STATIONARITY * eps * norms[rest] ** 2
        if bool(zero.any()):
            stationary = sorted(stationary + [r for r, z in zip(rest, zero.tolist()) if z])
            continue
        weights = min_norm_weights(projected, eps)
        if not bool(torch.isfinite(weights).all()):
            break
        norm2 = weights @ projected @ weights
        if bool(norm2 > _STATIONARITY * eps * (weights @ norms[rest]) ** 2):
            break
        stationary = sorted(stationary + [r for r, w in zip(rest, weights.tolist()) if w > 0])
    return stationary


def _project_out(
    g: Tensor, stationary: list[int], rest: list[int], eps: float
) -> tuple[Tensor, Tensor]:
    """The Gramian of the rows ``rest`` projected onto the orthogonal complement of the rows
    ``stationary``, :math:`G_{RR} - G_{RZ} C`, and :math:`C = G_{ZZ}^{+} G_{ZR}`."""
    z = torch.tensor(stationary, device=g.device)
    r = torch.tensor(rest, device=g.device)
    g_zz, g_zr = g[z][:, z], g[z][:, r]
    # The pseudo-inverse of G_ZZ scaled to a unit diagonal (rows of any norms), cutting what is
    # zero up to rounding (a zero row, rows that are dependent), as the stationarity test does.
    scale = g_zz.diagonal().clamp(min=0.0).sqrt()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    unit = g_zz / scale.unsqueeze(0) / scale.unsqueeze(1)
    inverse = torch.linalg.pinv(unit, rtol=_STATIONARITY * eps, hermitian=True)
    coefficients = (inverse @ (g_zr / scale.unsqueeze(1))) / scale.unsqueeze(1)
    projected = g[r][:, r] - g_zr.T @ coefficients
    return 0.5 * (projected + projected.T), coefficients


def _solve_root(g: Tensor, alpha: float, max_iters: int) -> Tensor:
    r"""The weights :math:`x > 0` solving :math:`G x = x^{\circ(-1/\alpha)}`, in float64.

    ``G`` is first divided by its mean diagonal :math:`c` (the solution scales as
    :math:`c^{-\alpha/(\alpha+1)}`) and regularised into :math:`\hat G = G / c + \delta I`, with
    :math:`\delta = (10^7)^{-(1 + 1/\alpha)}`. This changes each equation by a relative
    :math:`\delta y_i^{1 + 1/\alpha}`, below :math:`10^{-7}` for weights of the usual size. The
    root is then the minimiser over :math:`y > 0` of

    .. math:: f(y) = \tfrac12 y^\top \hat G y - \sum_i h(y_i), \qquad h'(y) = y^{-1/\alpha},

    strictly convex (:math:`h` is concave) and with a unique minimiser when :math:`\hat G` is
    positive definite.

    It is found by Newton's method: the Newton step :math:`s` (an LU solve with the Hessian
    :math:`\hat G + \mathrm{diag}(\frac1\alpha y^{-1/\alpha - 1})`) is applied multiplicatively,
    :math:`y \leftarrow y \odot \exp(t\, s \oslash y)`, which keeps :math:`y > 0`, with the step
    :math:`t \in \{2^4, 2^3, \dots, 2^{-11}, 0\}` giving the lowest :math:`f` (all evaluated at
    once; long steps let weights grow fast where they must; :math:`t = 1` whenever it is as good up
    to rounding, which keeps the quadratic convergence near the root). :math:`y` starts from the
    solution of the diagonal problem, rescaled optimally, and is capped at :math:`10^9`. It stops
    when every equation holds to a relative :math:`10^{-10}`, when no step decreases :math:`f`, or
    after ``max_iters`` steps. These tests read values back to the host (every step on CPU, every
    fifth elsewhere).

    Where :math:`G` has no root (a non-negative vector :math:`v \ne 0` with :math:`G v = 0`),
    :func:`solve_fair_weights` has already set the stationary rows aside; the regularisation only
    keeps the weights finite along directions that are null up to rounding.
    """
    p = 1.0 / alpha
    scale = g.diagonal().mean()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    g_hat = g / scale
    g_hat.diagonal().add_(_DEGENERATE_WEIGHT ** (-(1.0 + p)))

    # Start from the solution of the diagonal problem, rescaled by the best factor along that ray.
    y = g_hat.diagonal() ** (-1.0 / (1.0 + p))
    curvature = y @ g_hat @ y
    y = (y * ((y ** (1.0 - p)).sum() / curvature) ** (1.0 / (1.0 + p))).clamp(max=_MAX_WEIGHT)

    powers = torch.arange(4, 4 - _N_STEPS, -1, dtype=g.dtype, device=g.device)
    steps = torch.cat([2.0**powers, g.new_zeros(1)]).unsqueeze(-1)
    check_every = 1 if g.device.type == "cpu" else 5
    stalled = torch.tensor(False, device=g.device)
    for iteration in range(max_iters):
        y_pow = y ** (-p)
        gradient = g_hat @ y - y_pow
        if iteration % check_every == 0:
            converged = (gradient.abs() <= _RESIDUAL_TOL * y_pow) | ~torch.isfinite(gradient)
            if bool(converged.all() | stalled):
                break
        hessian = g_hat.clone()
        hessian.diagonal().add_(p * y_pow / y)
        newton, _ = torch.linalg.solve_ex(hessian, -gradient)
        candidates = (y * torch.exp(steps * (newton / y))).clamp(max=_MAX_WEIGHT)
        values = 0.5 * ((candidates @ g_hat) * candidates).sum(dim=-1) - _barrier(candidates, p)
        values = torch.nan_to_num(values, nan=math.inf)
        best = torch.argmin(values)
        # Near the root, f cannot tell the steps apart any more: take the full Newton step when it
        # is as good as the best up to rounding, so that the quadratic convergence goes on.
        newton_is_as_good = values[_FULL_STEP] <= values[best] + 1e-12 * values[best].abs()
        best = torch.where(newton_is_as_good, _FULL_STEP, best)
        stalled = best == _N_STEPS
        y = candidates[best]
    return y * scale ** (-alpha / (alpha + 1.0))


def _check_alpha(alpha: float) -> None:
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha >= 0):
        raise ValueError(
            f"`alpha` must be a finite number >= 0 to compute FairGrad weights, got {alpha!r}."
        )


def _resolve_max_iters(max_iters: int | None) -> int:
    if max_iters is None:
        return _DEFAULT_MAX_ITERS
    if isinstance(max_iters, bool) or not isinstance(max_iters, int) or max_iters < 1:
        raise ValueError(f"`max_iters` must be None or an integer >= 1, got {max_iters!r}.")
    return max_iters


class FairGradWeighting(Weighting[PSDMatrix]):
    r"""Weights of FairGrad, the :math:`\alpha`-fair allocation of the update among the tasks.

    From `Fair Resource Allocation in Multi-Task Learning <https://arxiv.org/abs/2402.15638>`_
    (H. Ban and K. Ji, ICML 2024), Eq. 4 and Algorithm 1. Given the Gramian :math:`G = J J^\top`,
    the weights :math:`w > 0` solve

    .. math:: G w = w^{\circ(-1/\alpha)} \qquad \text{(element-wise power)},

    i.e. every task's rate of improvement :math:`(G w)_i = g_i^\top J^\top w` equals
    :math:`w_i^{-1/\alpha}`; hence :math:`J (J^\top w) > 0`: the update conflicts with no task.
    :math:`\alpha = 0` gives uniform weights :math:`\frac1m \mathbf 1` (the mean);
    :math:`\alpha = 1` gives the Nash bargaining solution :math:`w \odot G w = \mathbf 1` (see
    :class:`NashMTL`). :math:`G` is used unnormalised, so the result is not scale-equivariant.

    Solver: TorchJD solves this system with ``scipy.optimize.least_squares``. This implementation
    needs no optional dependency: it finds the same root with a torch-native damped Newton method
    in float64 on the :math:`m \times m` system (see ``solve_fair_weights`` in this module), on
    the Gramian's device, and casts the weights back to the Gramian's dtype. Where a root exists,
    the two agree to the reference solver's tolerance.

    Pareto-stationary inputs (deviation from the reference, which returns solver artefacts
    there): where 0 is in the convex hull of some rows (a zero row, two opposite rows, rows
    whose positive combination vanishes), no root exists; the weights of these rows grow without
    bound and drive their products with the update to 0. The rows are detected first, from the
    exact minimum-norm point of the convex hull (0 up to the rounding of the Gramian), and the
    limit of the aggregate is returned: the solution of the same system for the other rows
    projected off the span of the stationary ones. It conflicts with no row (it is orthogonal to
    the stationary rows and fair among the others) and is 0 when every row is stationary: e.g.
    the zero matrix gives a zero aggregate and ``[[0, 0], [0, 1]]`` gives ``[0, 1]``. The weights
    returned give exactly that aggregate: the stationary rows' weights are the finite part of
    their limit (0 for a zero row; they can be negative), and all are 0 when every row is
    stationary. "0 up to rounding" is relative to the machine epsilon of the Gramian's dtype.

    Near such points the root exists but may need weights too large for the solver to reach
    within ``max_iters`` steps. The result is therefore checked: if its aggregate conflicts with
    a row (:math:`g_i^\top d < -\frac12 \tau \|g_i\| \|d\|`, :math:`\tau` = 1e-6 in float64,
    1e-4 in float32, 1e-2 in half precision), the weights of the minimum-norm point of the convex
    hull (the direction of :class:`MGDA`, which conflicts with no row), scaled by the best factor
    of the objective along that ray, are returned instead. Hence, in every case, the aggregate
    conflicts with no row up to :math:`\tau` and rounding. A non-finite Gramian gives NaN
    weights.

    :param alpha: the fairness parameter :math:`\alpha \ge 0`, required. Any value is accepted
        at construction (as in TorchJD); a negative or non-finite one raises ``ValueError`` at
        call time, where the :math:`\alpha`-fair utility is undefined.
    :param max_iters: the maximum number of Newton steps (``None``: 100; the solver usually
        converges in fewer than 10). TorchJD passes this value to scipy as its maximum number of
        function evaluations, so with a tiny budget the two return different unconverged points.

    Stateless, deterministic; runs under :func:`torch.no_grad` (the weights come from an
    iterative solver).
    """

    def __init__(self, alpha: float, max_iters: int | None = None) -> None:
        super().__init__()
        self.alpha = alpha
        self.max_iters = max_iters

    @torch.no_grad()
    def forward(self, stat: Tensor, /) -> Tensor:
        alpha = self.alpha
        _check_alpha(alpha)
        max_iters = _resolve_max_iters(self.max_iters)
        m = stat.shape[0]
        if m == 0:
            return torch.zeros(0, dtype=stat.dtype, device=stat.device)
        if alpha == 0:
            return torch.full((m,), 1.0 / m, dtype=stat.dtype, device=stat.device)
        weights = solve_fair_weights(stat, float(alpha), max_iters)
        return weights.to(dtype=stat.dtype)


class FairGrad(NoGrad, GramianWeightedAggregator):
    r"""FairGrad: aggregates the rows with the :math:`\alpha`-fair weights of
    :class:`FairGradWeighting`, from `Fair Resource Allocation in Multi-Task Learning
    <https://arxiv.org/abs/2402.15638>`_ (H. Ban and K. Ji, ICML 2024). Returns :math:`J^\top w`
    with :math:`J J^\top w = w^{\circ(-1/\alpha)}`.

    Uses a torch-native Newton solver; scipy is not needed (see :class:`FairGradWeighting`).

    :param alpha: the fairness parameter :math:`\alpha \ge 0` (required; ``0`` gives the mean).
    :param max_iters: the maximum number of Newton steps, or ``None`` for the default (100).

    >>> import torch
    >>> from torchjd.aggregation import FairGrad
    >>> FairGrad(alpha=1.0)(torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]))
    tensor([0.0766, 0.9985, 0.9985])
    """

    def __init__(self, alpha: float, max_iters: int | None = None) -> None:
        super().__init__(FairGradWeighting(alpha, max_iters))

    alpha = Forwarded[float]()
    max_iters = Forwarded[int | None]()

    def __str__(self) -> str:
        return f"{self.alpha}-FairGrad"
