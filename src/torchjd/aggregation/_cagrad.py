"""CAGrad: the update closest to the mean gradient that maximises the worst improvement."""

import math
import warnings
from functools import cache

import torch
from torch import Tensor

from torchjd.aggregation._bases import Forwarded, GramianWeightedAggregator, NoGrad, Weighting
from torchjd.linalg._block_pivoting import BlockPivotingProjector
from torchjd.linalg._gramian import normalize
from torchjd.linalg._matrix import PSDMatrix
from torchjd.linalg._nonfinite import finite_part, poison

# Up to this many objectives, every face of the simplex is solved at once (2^m - 1 small systems,
# no host synchronisation); above, an active-set method walks from face to face.
_ENUMERATE_UP_TO = 8
# A candidate of the enumeration is feasible when its entries are >= -_FEASIBILITY_TOL.
_FEASIBILITY_TOL = 1e-10
# The active-set method stops when no vertex improves the linearised objective by more than this,
# or when a step decreases the objective by less than _PROGRESS_TOL (relative).
_OPTIMALITY_TOL = 1e-12
_PROGRESS_TOL = 1e-14


def _check_non_negative(name: str, value: float) -> float:
    if not value >= 0.0:
        raise ValueError(f"`{name}` must be a non-negative number, got {value!r}.")
    return value


def _solver_device_dtype(device: torch.device) -> tuple[torch.device, torch.dtype]:
    # MPS has no float64: solve on the CPU there.
    return (torch.device("cpu"), torch.float64) if device.type == "mps" else (device, torch.float64)


def _objective(W: Tensor, A: Tensor, a: Tensor, s: Tensor) -> Tensor:
    """``w^T a + s sqrt(w^T A w)`` for each row ``w`` of ``W``."""
    quadratic = ((W @ A) * W).sum(dim=-1)
    return W @ a + s * quadratic.clamp(min=0.0).sqrt()


def _solve_faces(systems: Tensor, a_masked: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    r"""Solve the bordered systems of a batch of faces of the simplex.

    ``systems[..., :, :]`` is ``[[A_SS, 1_S], [1_S^T, 0]]`` for a face ``S``, padded with the
    identity outside ``S``, and ``a_masked`` is ``a`` restricted to ``S``. Returns ``u_a`` (with
    ``1^T u_a = 0``, the minimiser of ``a^T u + u^T A u / 2`` on the directions of the face),
    ``u_1`` (the point of minimal ``A``-norm of the affine hull of the face, ``1^T u_1 = 1``) and
    whether the system was solved (it is singular when the rows of the face are affinely
    dependent).
    """
    m = a_masked.shape[-1]
    rhs = torch.zeros(*systems.shape[:-1], 2, dtype=systems.dtype, device=systems.device)
    rhs[..., :m, 0] = -a_masked
    rhs[..., m, 1] = 1.0
    solution, info = torch.linalg.solve_ex(systems, rhs)
    return solution[..., :m, 0], solution[..., :m, 1], info == 0


def _stationary_points(
    u_a: Tensor, u_1: Tensor, A: Tensor, s: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    r"""The stationary points of ``w^T a + s ||w||_A`` on the affine hulls of faces.

    On a face, stationarity reads ``a + beta A w = mu 1`` with ``beta = s / ||w||_A``, whose
    solution is ``w = u_1 + u_a / beta`` with ``beta^2 ||u_1||_A^2 = s^2 - ||u_a||_A^2``. Returns
    the points, whether they exist (``beta > 0`` real), and ``u_a``'s squared norm: when
    ``s^2 < ||u_a||_A^2`` the objective decreases without bound along ``u_a``.
    """
    norm_1 = ((u_1 @ A) * u_1).sum(dim=-1)
    norm_a = ((u_a @ A) * u_a).sum(dim=-1)
    bounded = (norm_1 > 0.0) & (s * s > norm_a)
    beta = torch.where(bounded, (s * s - norm_a) / torch.where(bounded, norm_1, 1.0), 1.0).sqrt()
    return u_1 + u_a / beta.unsqueeze(-1), bounded, norm_a


@cache
def _face_templates(m: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Constant parts of the bordered systems of the ``2^m - 1`` faces of the simplex, in float64.

    Returns ``block`` (``[K, m + 1, m + 1]``, 1 where an entry of ``A_SS`` goes), ``base`` (the
    identity outside ``S`` and the borders ``1_S``), ``rhs_mask`` (``[K, m + 1, 2]``, 1 where an
    entry of ``-a_S`` goes) and ``rhs_base`` (the 1 of ``1^T u_1 = 1``).
    """
    subsets = torch.arange(1, 2**m)
    masks = ((subsets.unsqueeze(1) >> torch.arange(m)) & 1).to(torch.float64)  # [K, m]
    padded = torch.nn.functional.pad(masks, (0, 1))  # [K, m + 1], 0 on the border
    block = padded.unsqueeze(2) * padded.unsqueeze(1)
    base = torch.diag_embed(1.0 - padded)
    base[:, m, m] = 0.0
    base[:, :m, m] = masks
    base[:, m, :m] = masks
    rhs_mask = torch.zeros(masks.shape[0], m + 1, 2, dtype=torch.float64)
    rhs_mask[:, :m, 0] = masks
    rhs_base = torch.zeros_like(rhs_mask)
    rhs_base[:, m, 1] = 1.0
    return block.to(device), base.to(device), rhs_mask.to(device), rhs_base.to(device)


def _minimise_by_enumeration(A: Tensor, s: Tensor) -> Tensor:
    """Minimiser over the simplex, by solving the stationarity conditions on every face at once.

    Every candidate that is feasible is a point of the simplex, evaluated exactly, and the minimiser
    is the stationary point of its own face (or a vertex, or the point of minimal norm of its
    face): the best feasible candidate is the minimiser, whatever the conditioning of the faces
    that are not optimal. Branch-free: no host synchronisation.
    """
    m = A.shape[0]
    block, base, rhs_mask, rhs_base = _face_templates(m, A.device)
    a = A.mean(dim=1)  # A p_bar
    systems = torch.addcmul(base, block, torch.nn.functional.pad(A, (0, 1, 0, 1)))
    rhs = torch.addcmul(rhs_base, rhs_mask, torch.nn.functional.pad(-a, (0, 1)).unsqueeze(1))
    solution, info = torch.linalg.solve_ex(systems, rhs)
    u_a, u_1 = solution[:, :m, 0], solution[:, :m, 1]
    solved = info == 0
    stationary, bounded, _ = _stationary_points(u_a, u_1, A, s)
    candidates = torch.cat([stationary, u_1])
    valid = torch.cat([bounded & solved, solved])
    valid = valid & torch.isfinite(candidates).all(dim=1)
    valid = valid & (candidates >= -_FEASIBILITY_TOL).all(dim=1)
    candidates = torch.where(valid.unsqueeze(1), candidates.clamp(min=0.0), 1.0)
    candidates = candidates / candidates.sum(dim=1, keepdim=True)
    values = torch.where(valid, _objective(candidates, A, a, s), torch.inf)
    best = values.argmin().unsqueeze(0)  # vertices are always valid: some value is finite
    return candidates.index_select(0, best).squeeze(0)


def _start_point(A: Tensor, a: Tensor, s: Tensor) -> Tensor:
    """A starting point of the simplex with a negative objective whenever the minimum is negative.

    By duality, ``min_w a^T w + s ||w||_A < 0`` exactly when the distance from the mean gradient
    ``g_0`` to the dual cone ``{d : J d >= 0}`` exceeds ``s``; then, with ``v`` the solution of
    ``min_{v >= p_bar} v^T A v`` (``J^T v`` is the projection of ``g_0`` onto the dual cone), the
    point ``w = (v - p_bar) / 1^T (v - p_bar)`` has objective ``||e|| (s - ||e||) / 1^T (v - p_bar)
    < 0`` where ``e = J^T (v - p_bar)``. Returns the better of that point and the best vertex.
    """
    m = A.shape[0]
    vertex_values = a + s * A.diagonal().clamp(min=0.0).sqrt()
    vertex = torch.zeros(m, dtype=A.dtype)
    vertex[int(vertex_values.argmin())] = 1.0
    p_bar = torch.full((1, m), 1.0 / m, dtype=A.dtype)
    shift = (BlockPivotingProjector(norm_eps=0.0, reg_eps=0.0)(p_bar, A) - p_bar)[0].clamp(min=0.0)
    total = float(shift.sum())
    if total <= 0.0:
        return vertex
    projected = shift / total
    values = _objective(torch.stack([vertex, projected]), A, a, s)
    return vertex if float(values[0]) <= float(values[1]) else projected


def _solve_face(A: Tensor, a: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
    """``u_a`` and ``u_1`` of the face ``index`` (see :func:`_solve_faces`); a singular system
    (affinely dependent rows) is solved in the least-squares sense, which is exact since it is
    consistent."""
    k = index.numel()
    system = torch.zeros(k + 1, k + 1, dtype=A.dtype)
    system[:k, :k] = A[index][:, index]
    system[:k, k] = 1.0
    system[k, :k] = 1.0
    u_a, u_1, solved = _solve_faces(system, a[index])
    if not bool(solved) or not bool(torch.isfinite(u_a).all() & torch.isfinite(u_1).all()):
        rhs = torch.zeros(k + 1, 2, dtype=A.dtype)
        rhs[:k, 0] = -a[index]
        rhs[k, 1] = 1.0
        solution = torch.linalg.lstsq(system, rhs, driver="gelsd").solution
        u_a, u_1 = solution[:k, 0], solution[:k, 1]
    return u_a, u_1


def _interior_minimiser(A: Tensor, a: Tensor, s: Tensor) -> Tensor | None:
    """The stationary point of the objective on the affine hull of the whole simplex, when it
    lies inside the simplex (then it is the minimiser: no constraint is active and the problem is
    convex), else None. Tasks that all pull their weight (correlated gradients) often give such a
    minimiser; one linear system then replaces the active-set walk."""
    u_a, u_1 = _solve_face(A, a, torch.arange(A.shape[0]))
    stationary, bounded, _ = _stationary_points(u_a, u_1, A, s)
    if bool(bounded) and bool((stationary > 0.0).all()):
        return stationary
    return None


def _minimise_by_active_set(A: Tensor, s: Tensor) -> Tensor:
    """Minimiser over the simplex, by a primal active-set method (like Wolfe's for the
    minimum-norm point), on the CPU. It reads numbers on the host at every step (the method is
    sequential); it ends after a few steps per objective.

    From :func:`_start_point`, repeat: move towards the minimiser on the affine hull of the active
    face (or along a direction of unbounded decrease), dropping the vertex whose weight reaches
    zero first, until that minimiser lies inside the face; then stop if no vertex improves the
    linearisation of the objective, else add the best one to the face. The objective decreases
    at every step. It is not differentiable where ``w^T A w = 0``; the iterates reach such a point
    only when the minimum is 0 (the start point has a negative objective otherwise), so it is then
    optimal.
    """
    device = A.device
    A = A.cpu()
    s = s.cpu()
    m = A.shape[0]
    # Round-off (e.g. a Gramian computed in float32) can leave slightly negative eigenvalues, which
    # break the convexity the method relies on: set them to 0.
    eigenvalues, eigenvectors = torch.linalg.eigh(A)
    A = (eigenvectors * eigenvalues.clamp(min=0.0)) @ eigenvectors.T
    A = 0.5 * (A + A.T)
    a = A.mean(dim=1)
    if float(s) == 0.0:  # a linear objective: the best vertex
        w = torch.zeros(m, dtype=A.dtype)
        w[int(a.argmin())] = 1.0
        return w.to(device)
    interior = _interior_minimiser(A, a, s)
    if interior is not None:
        return interior.to(device)
    w = _start_point(A, a, s)
    active = w > 0.0
    previous = math.inf
    for _ in range(20 * m):
        for _ in range(m + 1):  # each pass either ends or drops a vertex
            index = active.nonzero().squeeze(1)
            u_a, u_1 = _solve_face(A, a, index)
            A_face = A[index][:, index]
            stationary, bounded, norm_a = _stationary_points(u_a, u_1, A_face, s)
            direction = torch.zeros(m, dtype=A.dtype)
            if bool(bounded) or float(s * s - norm_a) > 0.0:
                # The minimiser on the affine hull: the stationary point, or u_1 (where
                # w^T A w = 0) when the affine hull contains such points.
                target = stationary if bool(bounded) else u_1
                if bool((target > 0.0).all()):
                    w = torch.zeros(m, dtype=A.dtype)
                    w[index] = target
                    break
                direction[index] = target - w[index]
                blocking = torch.zeros(m, dtype=torch.bool)
                blocking[index] = target <= 0.0
            else:  # the objective decreases without bound along u_a: walk to the boundary
                direction[index] = u_a
                blocking = active & (direction < 0.0)
            if not bool(blocking.any()):
                break
            ratios = torch.where(blocking, w / (-direction).clamp(min=1e-300), torch.inf)
            leaving = int(ratios.argmin())
            w = (w + ratios[leaving] * direction).clamp(min=0.0)
            w[leaving] = 0.0
            w = w / w.sum()
            active = w > 0.0
        Aw = A @ w
        norm = float(w @ Aw)
        value = float(a @ w) + float(s) * math.sqrt(max(norm, 0.0))
        if norm <= 0.0 or value > previous - _PROGRESS_TOL * (1.0 + abs(value)):
            # At w^T A w = 0, see above; no progress: the degenerate steps that remain (ties
            # between faces) cannot improve the objective beyond round-off.
            break
        previous = value
        gradient = a + (s / math.sqrt(norm)) * Aw
        j = int(gradient.argmin())
        if bool(active[j]) or float(gradient[j]) >= float(gradient @ w) - _OPTIMALITY_TOL:
            break
        active[j] = True
    else:
        warnings.warn(
            "CAGrad's active-set solver reached its iteration limit; the result may be inexact.",
            stacklevel=5,
        )
    return w.to(device)


def _cagrad_weights(gramian: Tensor, c: float, norm_eps: float) -> Tensor:
    """CAGrad's weights of a Gramian ``[m, m]`` (``m >= 1``), in its dtype and on its device."""
    m = gramian.shape[0]
    # normalize() divides when trace >= eps: never let it divide by a zero trace.
    G_hat = normalize(gramian, max(norm_eps, torch.finfo(gramian.dtype).tiny))
    device, dtype = _solver_device_dtype(gramian.device)
    A = G_hat.to(device=device, dtype=dtype)
    A = 0.5 * (A + A.T)
    p_bar = torch.full((m,), 1.0 / m, dtype=dtype, device=device)
    sqrt_phi = c * (p_bar @ A @ p_bar).clamp(min=0.0).sqrt()
    if m == 1:
        w = torch.ones(1, dtype=dtype, device=device)  # the simplex is a single point
    elif m <= _ENUMERATE_UP_TO:
        w = _minimise_by_enumeration(A, sqrt_phi)
    else:
        w = _minimise_by_active_set(A, sqrt_phi)
    gamma = (w @ A @ w).clamp(min=0.0).sqrt()
    large_enough = gamma >= norm_eps
    safe_gamma = torch.where(large_enough, gamma, 1.0)
    weights = torch.where(large_enough, p_bar + (sqrt_phi / safe_gamma) * w, 0.0)
    return weights.to(dtype=gramian.dtype, device=gramian.device)


def _two_tasks_on_host(gramian: Tensor, c: float, norm_eps: float) -> Tensor | None:
    r""":func:`_cagrad_weights` of one ``2 x 2`` Gramian on the CPU, in closed form with Python
    numbers (in double precision; reading a CPU tensor synchronises with nothing), or None for
    the degenerate case left to the general path (``gamma = 0`` with ``norm_eps = 0``).

    On the segment ``w = (1 - t, t)``, with ``A`` the normalised Gramian,
    ``w^T A w = (x^2 + det A) / alpha`` where ``x = alpha t + beta``, ``alpha = A_00 - 2 A_01 +
    A_11``, ``beta = A_01 - A_00``, and ``w^T A p_bar = a_0 + delta t`` with
    ``delta = (A_11 - A_00) / 2``. The objective is convex in ``t``; its derivative vanishes at
    ``x = -delta sqrt(det A / (s^2 alpha - delta^2))`` when ``s^2 alpha > delta^2`` (``s`` is
    :math:`\sqrt\phi`), and otherwise has the sign of ``delta`` on the whole segment. The minimiser
    is that stationary point clamped to the segment, or its end of lower value."""
    (g_00, g_01), (g_10, g_11) = gramian.tolist()
    if not all(math.isfinite(x) for x in (g_00, g_01, g_10, g_11)):
        return torch.full((2,), math.nan, dtype=gramian.dtype)
    trace = g_00 + g_11
    scale = 1.0 / trace if trace >= max(norm_eps, torch.finfo(gramian.dtype).tiny) else 0.0
    A_00, A_01, A_11 = g_00 * scale, 0.5 * (g_01 + g_10) * scale, g_11 * scale
    s = c * math.sqrt(max(0.25 * (A_00 + 2.0 * A_01 + A_11), 0.0))  # c sqrt(p_bar^T A p_bar)
    alpha, beta, delta = A_00 - 2.0 * A_01 + A_11, A_01 - A_00, 0.5 * (A_11 - A_00)
    determinant = max(A_00 * A_11 - A_01 * A_01, 0.0)
    if alpha > 0.0 and s * s * alpha > delta * delta:
        x = -delta * math.sqrt(determinant / (s * s * alpha - delta * delta))
        t = min(max((x - beta) / alpha, 0.0), 1.0)
    else:
        t = 1.0 if delta < 0.0 else 0.0
    w = (1.0 - t, t)
    gamma = math.sqrt(max(A_00 * w[0] ** 2 + 2.0 * A_01 * w[0] * w[1] + A_11 * w[1] ** 2, 0.0))
    if not gamma >= norm_eps:
        return torch.zeros(2, dtype=gramian.dtype)
    if gamma == 0.0:
        return None
    ratio = s / gamma
    return torch.tensor((0.5 + ratio * w[0], 0.5 + ratio * w[1]), dtype=gramian.dtype)


class CAGradWeighting(NoGrad, Weighting[PSDMatrix]):
    r"""Weighting of :class:`CAGrad`: :math:`\lambda = \bar p + \frac{\sqrt\phi}{\gamma} w^*`.

    With :math:`\hat G` the Gramian divided by its trace (the zero matrix when the trace is below
    ``norm_eps``), :math:`\bar p = \frac1m \mathbf 1` and
    :math:`\sqrt\phi = c \sqrt{\bar p^\top \hat G \bar p}`,

    .. math:: w^* \in \arg\min_{w \in \Delta_m} w^\top \hat G \bar p
        + \sqrt\phi \sqrt{w^\top \hat G w},
        \qquad \gamma = \sqrt{w^{*\top} \hat G w^*},

    and the weights are all zero when :math:`\gamma <` ``norm_eps``.

    **Solver.** TorchJD solves the convex problem with cvxpy (CLARABEL). Here it is solved exactly
    (up to round-off) in torch, in float64, with no optional dependency: for ``m <= 8``, the
    stationarity conditions are solved on every face of the simplex at once (a batch of
    ``2^m - 1`` bordered linear systems), on the Gramian's device and without host
    synchronisation; for larger ``m``, by a primal active-set method on the CPU, which reads
    numbers on the host at each step (it first sets the round-off negative eigenvalues of the
    normalised Gramian to 0, and tries the stationary point of the whole simplex, which is the
    minimiser when all its weights are positive, as for many similar tasks). One ``2 x 2`` Gramian
    on the CPU has a closed form (a convex problem in one variable on the segment of the
    simplex), evaluated with Python numbers in double precision. All agree with an
    accurate convex solver to its tolerance (the tests check them against scipy, and against cvxpy
    when it is installed). When the minimiser is not unique (degenerate inputs such as duplicated
    rows), the weights may differ from TorchJD's but the aggregation :math:`J^\top \lambda` does
    not, except where ties make the problem itself ambiguous. The weights are cast back to the
    Gramian's dtype. Not differentiable: runs under :func:`torch.no_grad`.

    :param c: the radius :math:`c \ge 0` of the ball around the mean gradient (required).
    :param norm_eps: threshold ``>= 0`` on the trace of the Gramian and on :math:`\gamma`
        (default ``0.0001``).
    """

    def __init__(self, c: float, norm_eps: float = 0.0001) -> None:
        super().__init__()
        self.c = c
        self.norm_eps = norm_eps

    @property
    def c(self) -> float:
        return self._c

    @c.setter
    def c(self, value: float) -> None:
        self._c = _check_non_negative("c", value)

    @property
    def norm_eps(self) -> float:
        return self._norm_eps

    @norm_eps.setter
    def norm_eps(self, value: float) -> None:
        self._norm_eps = _check_non_negative("norm_eps", value)

    def forward(self, stat: Tensor, /) -> Tensor:
        if stat.shape[0] == 0:
            raise ValueError(
                f"CAGrad needs at least one objective: got a Gramian of shape {tuple(stat.shape)}."
            )
        if stat.shape[0] == 2 and stat.device.type == "cpu":
            weights = _two_tasks_on_host(stat, float(self.c), float(self.norm_eps))
            if weights is not None:
                return weights
        # The thresholds on the trace and on gamma would turn a NaN into zeros: NaN weights instead.
        gramian, nan_where_non_finite = finite_part(stat)
        weights = _cagrad_weights(gramian, float(self.c), float(self.norm_eps))
        return poison(weights, nan_where_non_finite)


class CAGrad(NoGrad, GramianWeightedAggregator):
    r"""Conflict-averse gradient descent, from `Conflict-Averse Gradient Descent for Multi-task
    Learning <https://arxiv.org/abs/2110.14048>`_ (Liu et al., NeurIPS 2021), Algorithm 1.

    Among the directions :math:`d` with :math:`\|d - g_0\| \le c \|g_0\|`, where :math:`g_0`
    is the mean of the rows, CAGrad maximises the smallest improvement :math:`\min_i g_i^\top d`.
    Through its dual, the result is :math:`J^\top \lambda` with
    :math:`\lambda = \bar p + \frac{\sqrt\phi}{\gamma} w^*` computed on the Gramian normalised
    by its trace (see :class:`CAGradWeighting`), without the paper's final rescaling by
    :math:`1 / (1 + c^2)`. The result does not conflict with any row when :math:`c \ge 1`.

    The weights are all zero, hence the result is zero, when :math:`\|J\|_F^2 <` ``norm_eps``
    (the normalised Gramian is then taken to be zero) or when :math:`\gamma <` ``norm_eps``
    (e.g. when a row is zero: the minimiser puts all its mass on it). Solved exactly in torch, with
    no optional dependency (TorchJD needs cvxpy; see :class:`CAGradWeighting`). Not
    differentiable.

    :param c: the radius :math:`c \ge 0` of the ball around the mean gradient, relative to its
        norm (required); ``c = 0`` gives the mean (when :math:`\gamma \ge` ``norm_eps``).
    :param norm_eps: threshold ``>= 0`` on :math:`\|J\|_F^2` and on :math:`\gamma`
        (default ``0.0001``).

    >>> import torch
    >>> from torchjd.aggregation import CAGrad
    >>> CAGrad(c=0.5)(torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]))
    tensor([0.1835, 1.2041, 1.2041])
    """

    def __init__(self, c: float, norm_eps: float = 0.0001) -> None:
        super().__init__(CAGradWeighting(c, norm_eps))

    c = Forwarded[float]()
    norm_eps = Forwarded[float]()

    def __str__(self) -> str:
        return f"CAGrad{str(self.c).removesuffix('.0')}"
