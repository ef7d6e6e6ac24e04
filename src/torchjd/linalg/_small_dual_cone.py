r"""Small dual-cone problems on the CPU, solved with Python numbers.

For a few problems with ``m <= 8`` on the CPU, a call of
:class:`~torchjd.linalg.BlockPivotingProjector` is dominated by the fixed cost of its tensor
operations (a few microseconds each, a few dozen of them), not by arithmetic: the whole problem
is a few hundred multiplications. Here the values are read once (on the CPU that synchronises
with nothing), normalised, regularised and solved exactly with Python floats (IEEE double
precision, the precision of the projector's float64 solve), and the result is written back once.

The method is the projector's: block principal pivoting (Júdice and Pires) on the linear
complementarity problem of :math:`\min_{v \succeq u} v^\top A v`, with Murty's single-pivot
rule once the number of infeasible indices stalls, and the same tolerances. Anything unusual
(a non-finite value, a regularisation below the projector's floor, a failed factorisation, no
convergence) is left to the tensor path, which handles it (NaN propagation, rescue ridges,
warnings).
"""

import math
from collections.abc import Callable, Iterable
from functools import cache, lru_cache
from operator import getitem, itemgetter, mul

import torch
from torch import Tensor

from torchjd._host_values import float32_values, host_tensor
from torchjd._precision import working_dtype

# A subset of the indices, as :func:`_subsets` describes it.
_Subset = tuple[
    list[int],
    list[int],
    Callable[[list[float]], list[float]] | None,
    Callable[[list[list[float]], list[int], list[float]], list[float] | None] | None,
    Callable[[list[list[float]], list[float], list[int], list[int], list[float]], list[float]]
    | None,
]

# Problems up to this size, and batches of up to this many problems, are solved here.
MAX_M = 8
MAX_PROBLEMS = 16
# As in the tensor path: an index is infeasible below -_REL_TOL times the scale of its problem,
# and full exchanges continue while the number of infeasible indices reaches a new minimum within
# _PATIENCE + 1 exchanges.
_REL_TOL = 1e-12
_PATIENCE = 3


def fits(n_problems: int, m: int) -> bool:
    """Whether ``n_problems`` problems of size ``m`` are small and few enough to be solved here."""
    return m <= MAX_M and n_problems <= MAX_PROBLEMS


def solve_on_host(G: Tensor, U: Tensor, norm_eps: float, reg_eps: float) -> Tensor | None:
    r"""``V`` (``[b, k, m]``, in ``G``'s dtype) with ``V[i, j]`` the solution of
    :math:`\min_{v \succeq u} v^\top \hat G v` for ``u = U[i, j]`` and
    :math:`\hat G = G[i] / \operatorname{tr}(G[i]) + \text{reg\_eps}\, I` (the zero matrix plus
    ``reg_eps I`` when the trace is below ``norm_eps``), or None when the tensor path must solve
    them (see the module's docstring). ``G`` and ``U`` are on the CPU."""
    dtype = working_dtype(G.dtype)
    info = torch.finfo(dtype)
    if reg_eps < min(16.0 * info.eps, 1e-6):
        return None  # the tensor path raises the diagonal to its floor
    threshold = max(norm_eps, info.tiny)
    # In float32, the normalisation is rounded as the tensor path rounds it, with its traces (the
    # order of a float32 sum changes its rounding): the solution of a badly conditioned problem is
    # sensitive to one unit in the last place of an entry.
    values = G.to(dtype)
    if dtype == torch.float32:
        traces = values.diagonal(dim1=-2, dim2=-1).sum(dim=-1).tolist()
        rounded = float32_values
    else:
        traces, rounded = [None] * G.shape[0], None
    solutions = []
    for g, trace, problems in zip(values.tolist(), traces, U.tolist()):
        A = _regularised(g, trace, threshold, reg_eps, rounded)
        if A is None:
            return None
        diagonal_max = max(A[i][i] for i in range(len(A)))
        for u in problems:
            v = _solve(A, diagonal_max, u)
            if v is None:
                return None
            solutions.append(v)
    return torch.tensor(solutions, dtype=G.dtype).view(U.shape)


def _regularised(
    g: list[list[float]],
    trace: float | None,
    threshold: float,
    reg_eps: float,
    rounded: Callable[[list[float]], list[float]] | None,
) -> list[list[float]] | None:
    """``g / trace + reg_eps I`` (``reg_eps I`` when the trace is below ``threshold``), each
    operation rounded by ``rounded`` when given, or None when a value is not finite. The trace is
    summed here when not given."""
    m = len(g)
    if not _all_finite(sum(row) for row in g):
        return None
    if trace is None:
        trace = sum(g[i][i] for i in range(m))
    if rounded is None:
        A = [[x / trace for x in row] if trace >= threshold else [0.0] * m for row in g]
        for i in range(m):
            A[i][i] += reg_eps
        return A
    (reg_eps,) = rounded([reg_eps])
    flat = [x / trace for row in g for x in row] if trace >= threshold else [0.0] * (m * m)
    flat = rounded(flat)
    diagonal = rounded([flat[i * (m + 1)] + reg_eps for i in range(m)])
    for i, value in enumerate(diagonal):
        flat[i * (m + 1)] = value
    if not _all_finite(flat):
        return None
    return [flat[i * m : (i + 1) * m] for i in range(m)]


def _all_finite(values: Iterable[float]) -> bool:
    """Whether the sum of ``values`` is finite: True when they all are, unless the sum overflows
    (a false negative only sends the problem to the tensor path)."""
    return math.isfinite(sum(values))


def _rows_combination(coefficients: list[tuple[int, float]], A: list[list[float]]) -> list[float]:
    """``sum_i c_i A[i]`` over the pairs ``(i, c_i)`` (``A`` is symmetric: this is ``A c``), with
    the terms added in the order of the pairs."""
    result = [0.0] * len(A)
    for i, c in coefficients:
        result = [r + c * a for r, a in zip(result, A[i])]
    return result


def _solve(
    A: list[list[float]], diagonal_max: float, u: list[float], q: list[float] | None = None
) -> list[float] | None:
    r"""The solution of :math:`\min_{v \succeq u} v^\top A v` by block principal pivoting, or
    None (non-finite ``u``, failed factorisation, no convergence); ``diagonal_max`` is the
    largest diagonal entry of ``A``, the scale of its tolerance; ``q`` (``A u``) when the caller
    has it."""
    m = len(u)
    if not _all_finite(u):
        return None
    rows = range(m)
    if q is None:
        q = _rows_combination([(i, x) for i, x in enumerate(u) if x != 0.0], A)  # A u
    tol_z = -_REL_TOL * max(map(abs, u))
    tol_y = tol_z * diagonal_max
    free = [False] * m
    z = [0.0] * m
    y = q
    best, stalled = m + 1, 0
    for _ in range(50 + 10 * m):
        infeasible = [i for i in rows if (z[i] < tol_z if free[i] else y[i] < tol_y)]
        if not infeasible:
            return [u[i] + z[i] for i in rows]
        infeasible, best, stalled = _exchanged(infeasible, best, stalled)
        for i in infeasible:
            free[i] = not free[i]
        F = [i for i in rows if free[i]]
        z_F = _subsystem_solve(A, F, [-q[i] for i in F])
        if z_F is None:
            return None
        z = [0.0] * m
        y = q
        for i, value in zip(F, z_F):  # y = A (u + z)
            z[i] = value
            y = [a + value * b for a, b in zip(y, A[i])]
    return None


def _exchanged(infeasible: list[int], best: int, stalled: int) -> tuple[list[int], int, int]:
    """The indices to exchange among the ``infeasible`` ones (increasing), with the updated
    smallest number of infeasible indices ``best`` and number of exchanges ``stalled`` since it
    was reached (see :func:`_exchanges_all`)."""
    every, best, stalled = _exchanges_all(len(infeasible), best, stalled)
    return (infeasible if every else infeasible[-1:]), best, stalled


def _exchanges_all(n_infeasible: int, best: int, stalled: int) -> tuple[bool, int, int]:
    """Whether all ``n_infeasible`` infeasible indices are exchanged, or only the largest
    (Murty's rule, once their number has not reached a new minimum ``best`` for more than
    ``_PATIENCE`` exchanges), with the updated ``best`` and number of exchanges ``stalled``
    since it was reached."""
    if n_infeasible < best:
        return True, n_infeasible, 0
    stalled += 1
    return stalled <= _PATIENCE, best, stalled


def _add_unit_solution(
    A: list[list[float]],
    i: int,
    p: float,
    tol_y: float,
    weights: list[float],
    subsets: list[_Subset],
) -> bool:
    r""":func:`_solve` for ``u = e_i`` (with ``tol_y``, the tolerance of ``y``, for this ``u``),
    written for UPGrad's problems: ``p`` times the solution ``e_i + z`` is added to ``weights``;
    False (and ``weights`` unusable) where :func:`_solve` would give None. ``subsets`` is
    :func:`_subsets` of ``len(A)``.

    The same exchanges as :func:`_solve`, with less interpretation around them: most of these
    problems end after one or two systems of a few rows. The free indices are a bit mask, whose
    indices, complement, entry getter, solver and residuals are looked up (building them cost a
    fifth of the time).
    The system is solved for ``-z_F`` (``A_FF (-z_F) = q_F``, ``q = A e_i``), and
    ``y = A (e_i + z)`` is formed on the constrained indices only, where it is checked, as
    ``y_C = q_C - A_CF (-z_F)``."""
    q = A[i]
    m = len(q)
    # The indices infeasible at z = 0, where y = q; a loop, cheaper than a comprehension on Python
    # 3.11 (which gives a comprehension its own frame).
    free, bit = 0, 1
    for value in q:
        if value < tol_y:
            free |= bit
        bit <<= 1
    if not free:  # y = q is feasible: the solution is e_i
        weights[i] += p
        return True
    infeasible_at_zero = free
    best, stalled = free.bit_count(), 0
    for _ in range(50 + 10 * m):
        if free:
            F, C, pick, solve, residuals = subsets[free]
            minus_z = solve(A, F, pick(q))
            if minus_z is None:
                return False
            y_C = residuals(A, q, F, C, minus_z)
            if max(minus_z) <= _REL_TOL and (not y_C or min(y_C) >= tol_y):
                weights[i] += p
                for j, value in zip(F, minus_z):
                    weights[j] -= p * value
                return True
            infeasible = _infeasible_mask(F, minus_z, C, y_C, tol_y)
        else:  # exchanges emptied the free set: back at z = 0, infeasible as at the start
            infeasible = infeasible_at_zero
        # _exchanges_all, written out (the call and its tuple cost more than its few operations).
        n_infeasible = infeasible.bit_count()
        if n_infeasible < best:
            best, stalled = n_infeasible, 0
        else:
            stalled += 1
            if stalled > _PATIENCE:  # Murty: only the largest
                infeasible = 1 << (infeasible.bit_length() - 1)
        free ^= infeasible
    return False


def _infeasible_mask(
    F: list[int], minus_z: list[float], C: list[int], y_C: list[float], tol_y: float
) -> int:
    """The bit mask of the infeasible indices: the free ones with ``-z_j > _REL_TOL`` and the
    constrained ones with ``y_j < tol_y``. Loops, as in :func:`_add_unit_solution`: on Python 3.11
    a comprehension's own frame costs more than its few items."""
    mask = 0
    for j, value in zip(F, minus_z):
        if value > _REL_TOL:
            mask |= 1 << j
    for j, y_j in zip(C, y_C):
        if y_j < tol_y:
            mask |= 1 << j
    return mask


def _residuals(
    A: list[list[float]], q: list[float], F: list[int], C: list[int], x: list[float]
) -> list[float]:
    """``q_C - A_CF x``, each product ``A_jF x`` summed in the order of ``F``, reading the rows
    ``C`` of ``A``. :func:`_residuals_1` to :func:`_residuals_6` give the same values for one to
    six indices ``F``, written out (the sum's calls cost more than its few terms), with loops
    (cheaper than comprehensions on Python 3.11)."""
    pick = _picker(F)
    return [q[j] - sum(map(mul, pick(A[j]), x)) for j in C]


def _residuals_1(
    A: list[list[float]], q: list[float], F: list[int], C: list[int], x: list[float]
) -> list[float]:
    (f_1,), (x_1,) = F, x
    y_C = []
    for j in C:
        A_j = A[j]
        y_C.append(q[j] - (A_j[f_1] * x_1))
    return y_C


def _residuals_2(
    A: list[list[float]], q: list[float], F: list[int], C: list[int], x: list[float]
) -> list[float]:
    (f_1, f_2), (x_1, x_2) = F, x
    y_C = []
    for j in C:
        A_j = A[j]
        y_C.append(q[j] - (A_j[f_1] * x_1 + A_j[f_2] * x_2))
    return y_C


def _residuals_3(
    A: list[list[float]], q: list[float], F: list[int], C: list[int], x: list[float]
) -> list[float]:
    (f_1, f_2, f_3), (x_1, x_2, x_3) = F, x
    y_C = []
    for j in C:
        A_j = A[j]
        y_C.append(q[j] - (A_j[f_1] * x_1 + A_j[f_2] * x_2 + A_j[f_3] * x_3))
    return y_C


def _residuals_4(
    A: list[list[float]], q: list[float], F: list[int], C: list[int], x: list[float]
) -> list[float]:
    (f_1, f_2, f_3, f_4), (x_1, x_2, x_3, x_4) = F, x
    y_C = []
    for j in C:
        A_j = A[j]
        y_C.append(q[j] - (A_j[f_1] * x_1 + A_j[f_2] * x_2 + A_j[f_3] * x_3 + A_j[f_4] * x_4))
    return y_C


def _residuals_5(
    A: list[list[float]], q: list[float], F: list[int], C: list[int], x: list[float]
) -> list[float]:
    (f_1, f_2, f_3, f_4, f_5), (x_1, x_2, x_3, x_4, x_5) = F, x
    y_C = []
    for j in C:
        A_j = A[j]
        y_C.append(
            q[j]
            - (A_j[f_1] * x_1 + A_j[f_2] * x_2 + A_j[f_3] * x_3 + A_j[f_4] * x_4 + A_j[f_5] * x_5)
        )
    return y_C


def _residuals_6(
    A: list[list[float]], q: list[float], F: list[int], C: list[int], x: list[float]
) -> list[float]:
    (f_1, f_2, f_3, f_4, f_5, f_6), (x_1, x_2, x_3, x_4, x_5, x_6) = F, x
    y_C = []
    for j in C:
        A_j = A[j]
        y_C.append(
            q[j]
            - (
                A_j[f_1] * x_1
                + A_j[f_2] * x_2
                + A_j[f_3] * x_3
                + A_j[f_4] * x_4
                + A_j[f_5] * x_5
                + A_j[f_6] * x_6
            )
        )
    return y_C


# The residuals of each number of free indices (index 0 unused).
_RESIDUALS = (
    None,
    _residuals_1,
    _residuals_2,
    _residuals_3,
    _residuals_4,
    _residuals_5,
    _residuals_6,
) + (_residuals,) * 2


@cache
def _subsets(m: int) -> list[_Subset]:
    """For each subset of ``range(m)`` by its bit mask: its indices ``F`` (increasing), the
    others, a getter of the entries ``F`` of a list, and the solver and residuals of its size
    (:data:`_SOLVERS`, :data:`_RESIDUALS`; all three None for the empty set)."""
    table = []
    for mask in range(1 << m):
        F = [j for j in range(m) if mask >> j & 1]
        others = [j for j in range(m) if not mask >> j & 1]
        table.append((F, others, _picker(F), _SOLVERS[len(F)], _RESIDUALS[len(F)]))
    return table


def _picker(F: list[int]) -> Callable[[list[float]], list[float]] | None:
    """The entries ``F`` of a list, as a sequence (``itemgetter`` alone gives a number for one
    index), or None for no index."""
    if len(F) > 1:
        return itemgetter(*F)
    return itemgetter(slice(F[0], F[0] + 1)) if F else None


def _subsystem_solve(A: list[list[float]], F: list[int], b: list[float]) -> list[float] | None:
    """``x`` with ``A[F, F] x = b``, reading only the lower triangle of ``A[F, F]`` (``F`` is
    increasing; a float32 product ``J Jᵀ`` may differ from its transpose in the last place), or
    None when a pivot is not positive: ``A[F, F]`` is not numerically positive definite.

    Symmetric Gaussian elimination (``L D Lᵀ`` without pivoting, as stable as Cholesky's on a
    positive definite matrix), on the lower triangle only, with scalar operations: on at most 8
    rows the interpreter's cost per operation outweighs the arithmetic. No row (exchanges can
    empty the free set): no unknown."""
    return _SOLVERS[len(F)](A, F, b) if F else []


def _looped_solve(A: list[list[float]], F: list[int], b: list[float]) -> list[float] | None:
    """:func:`_subsystem_solve` by loops, for the systems of seven or eight rows (rare: at most one
    constrained index)."""
    n = len(F)
    pick = itemgetter(*F)
    L = [list(pick(A[f])) for f in F]
    x = list(b)
    for k in range(n):
        d = L[k][k]
        if not d > 0.0:
            return None
        x_k = x[k]
        for i in range(k + 1, n):
            L_i = L[i]
            factor = L_i[k] / d
            if factor != 0.0:
                for j in range(k + 1, i + 1):
                    L_i[j] -= factor * L[j][k]
                x[i] -= factor * x_k
    for k in range(n - 1, -1, -1):  # the reduced matrix is symmetric: its row k is its column k
        s = x[k]
        for j in range(k + 1, n):
            s -= L[j][k] * x[j]
        x[k] = s / L[k][k]
    return x


def _solve_1(A: list[list[float]], F: list[int], b: list[float]) -> list[float] | None:
    """:func:`_subsystem_solve` of one row. Systems of one to six rows are written out (the same
    operations as the loop of :func:`_looped_solve`, with ``a_ij`` the lower triangle of
    ``A[F, F]``): most systems of a nearly diagonal matrix are this small, and a loop costs several
    times its arithmetic."""
    d = A[F[0]][F[0]]
    return [b[0] / d] if d > 0.0 else None


def _solve_2(A: list[list[float]], F: list[int], b: list[float]) -> list[float] | None:
    f_1, f_2 = F
    a_11 = A[f_1][f_1]
    a_21, a_22 = A[f_2][f_1], A[f_2][f_2]
    b_1, b_2 = b
    if not a_11 > 0.0:
        return None
    l_21 = a_21 / a_11
    a_22 -= l_21 * a_21
    b_2 -= l_21 * b_1
    if not a_22 > 0.0:
        return None
    x_2 = b_2 / a_22
    return [(b_1 - a_21 * x_2) / a_11, x_2]


def _solve_3(A: list[list[float]], F: list[int], b: list[float]) -> list[float] | None:
    f_1, f_2, f_3 = F
    A_2, A_3 = A[f_2], A[f_3]
    a_11 = A[f_1][f_1]
    a_21, a_22 = A_2[f_1], A_2[f_2]
    a_31, a_32, a_33 = A_3[f_1], A_3[f_2], A_3[f_3]
    b_1, b_2, b_3 = b
    if not a_11 > 0.0:
        return None
    l_21, l_31 = a_21 / a_11, a_31 / a_11
    a_22 -= l_21 * a_21
    a_32 -= l_31 * a_21
    a_33 -= l_31 * a_31
    b_2 -= l_21 * b_1
    b_3 -= l_31 * b_1
    if not a_22 > 0.0:
        return None
    l_32 = a_32 / a_22
    a_33 -= l_32 * a_32
    b_3 -= l_32 * b_2
    if not a_33 > 0.0:
        return None
    x_3 = b_3 / a_33
    x_2 = (b_2 - a_32 * x_3) / a_22
    return [(b_1 - a_21 * x_2 - a_31 * x_3) / a_11, x_2, x_3]


def _solve_4(A: list[list[float]], F: list[int], b: list[float]) -> list[float] | None:
    f_1, f_2, f_3, f_4 = F
    A_2, A_3, A_4 = A[f_2], A[f_3], A[f_4]
    a_11 = A[f_1][f_1]
    a_21, a_22 = A_2[f_1], A_2[f_2]
    a_31, a_32, a_33 = A_3[f_1], A_3[f_2], A_3[f_3]
    a_41, a_42, a_43, a_44 = A_4[f_1], A_4[f_2], A_4[f_3], A_4[f_4]
    b_1, b_2, b_3, b_4 = b
    if not a_11 > 0.0:
        return None
    l_21, l_31, l_41 = a_21 / a_11, a_31 / a_11, a_41 / a_11
    a_22 -= l_21 * a_21
    a_32 -= l_31 * a_21
    a_33 -= l_31 * a_31
    a_42 -= l_41 * a_21
    a_43 -= l_41 * a_31
    a_44 -= l_41 * a_41
    b_2 -= l_21 * b_1
    b_3 -= l_31 * b_1
    b_4 -= l_41 * b_1
    if not a_22 > 0.0:
        return None
    l_32, l_42 = a_32 / a_22, a_42 / a_22
    a_33 -= l_32 * a_32
    a_43 -= l_42 * a_32
    a_44 -= l_42 * a_42
    b_3 -= l_32 * b_2
    b_4 -= l_42 * b_2
    if not a_33 > 0.0:
        return None
    l_43 = a_43 / a_33
    a_44 -= l_43 * a_43
    b_4 -= l_43 * b_3
    if not a_44 > 0.0:
        return None
    x_4 = b_4 / a_44
    x_3 = (b_3 - a_43 * x_4) / a_33
    x_2 = (b_2 - a_32 * x_3 - a_42 * x_4) / a_22
    return [(b_1 - a_21 * x_2 - a_31 * x_3 - a_41 * x_4) / a_11, x_2, x_3, x_4]


def _solve_5(A: list[list[float]], F: list[int], b: list[float]) -> list[float] | None:
    f_1, f_2, f_3, f_4, f_5 = F
    A_2, A_3, A_4, A_5 = A[f_2], A[f_3], A[f_4], A[f_5]
    a_11 = A[f_1][f_1]
    a_21, a_22 = A_2[f_1], A_2[f_2]
    a_31, a_32, a_33 = A_3[f_1], A_3[f_2], A_3[f_3]
    a_41, a_42, a_43, a_44 = A_4[f_1], A_4[f_2], A_4[f_3], A_4[f_4]
    a_51, a_52, a_53, a_54, a_55 = A_5[f_1], A_5[f_2], A_5[f_3], A_5[f_4], A_5[f_5]
    b_1, b_2, b_3, b_4, b_5 = b
    if not a_11 > 0.0:
        return None
    l_21, l_31, l_41, l_51 = a_21 / a_11, a_31 / a_11, a_41 / a_11, a_51 / a_11
    a_22 = a_22 - l_21 * a_21
    a_32, a_33 = a_32 - l_31 * a_21, a_33 - l_31 * a_31
    a_42, a_43, a_44 = a_42 - l_41 * a_21, a_43 - l_41 * a_31, a_44 - l_41 * a_41
    a_52, a_53, a_54, a_55 = (
        a_52 - l_51 * a_21,
        a_53 - l_51 * a_31,
        a_54 - l_51 * a_41,
        a_55 - l_51 * a_51,
    )
    b_2, b_3, b_4, b_5 = b_2 - l_21 * b_1, b_3 - l_31 * b_1, b_4 - l_41 * b_1, b_5 - l_51 * b_1
    if not a_22 > 0.0:
        return None
    l_32, l_42, l_52 = a_32 / a_22, a_42 / a_22, a_52 / a_22
    a_33 = a_33 - l_32 * a_32
    a_43, a_44 = a_43 - l_42 * a_32, a_44 - l_42 * a_42
    a_53, a_54, a_55 = a_53 - l_52 * a_32, a_54 - l_52 * a_42, a_55 - l_52 * a_52
    b_3, b_4, b_5 = b_3 - l_32 * b_2, b_4 - l_42 * b_2, b_5 - l_52 * b_2
    if not a_33 > 0.0:
        return None
    l_43, l_53 = a_43 / a_33, a_53 / a_33
    a_44 = a_44 - l_43 * a_43
    a_54, a_55 = a_54 - l_53 * a_43, a_55 - l_53 * a_53
    b_4, b_5 = b_4 - l_43 * b_3, b_5 - l_53 * b_3
    if not a_44 > 0.0:
        return None
    l_54 = a_54 / a_44
    a_55 = a_55 - l_54 * a_54
    b_5 = b_5 - l_54 * b_4
    if not a_55 > 0.0:
        return None
    x_5 = b_5 / a_55
    x_4 = (b_4 - a_54 * x_5) / a_44
    x_3 = (b_3 - a_43 * x_4 - a_53 * x_5) / a_33
    x_2 = (b_2 - a_32 * x_3 - a_42 * x_4 - a_52 * x_5) / a_22
    x_1 = (b_1 - a_21 * x_2 - a_31 * x_3 - a_41 * x_4 - a_51 * x_5) / a_11
    return [x_1, x_2, x_3, x_4, x_5]


def _solve_6(A: list[list[float]], F: list[int], b: list[float]) -> list[float] | None:
    f_1, f_2, f_3, f_4, f_5, f_6 = F
    A_2, A_3, A_4, A_5, A_6 = A[f_2], A[f_3], A[f_4], A[f_5], A[f_6]
    a_11 = A[f_1][f_1]
    a_21, a_22 = A_2[f_1], A_2[f_2]
    a_31, a_32, a_33 = A_3[f_1], A_3[f_2], A_3[f_3]
    a_41, a_42, a_43, a_44 = A_4[f_1], A_4[f_2], A_4[f_3], A_4[f_4]
    a_51, a_52, a_53, a_54, a_55 = A_5[f_1], A_5[f_2], A_5[f_3], A_5[f_4], A_5[f_5]
    a_61, a_62, a_63, a_64, a_65, a_66 = A_6[f_1], A_6[f_2], A_6[f_3], A_6[f_4], A_6[f_5], A_6[f_6]
    b_1, b_2, b_3, b_4, b_5, b_6 = b
    if not a_11 > 0.0:
        return None
    l_21, l_31, l_41, l_51, l_61 = a_21 / a_11, a_31 / a_11, a_41 / a_11, a_51 / a_11, a_61 / a_11
    a_22 = a_22 - l_21 * a_21
    a_32, a_33 = a_32 - l_31 * a_21, a_33 - l_31 * a_31
    a_42, a_43, a_44 = a_42 - l_41 * a_21, a_43 - l_41 * a_31, a_44 - l_41 * a_41
    a_52, a_53, a_54, a_55 = (
        a_52 - l_51 * a_21,
        a_53 - l_51 * a_31,
        a_54 - l_51 * a_41,
        a_55 - l_51 * a_51,
    )
    a_62, a_63, a_64, a_65, a_66 = (
        a_62 - l_61 * a_21,
        a_63 - l_61 * a_31,
        a_64 - l_61 * a_41,
        a_65 - l_61 * a_51,
        a_66 - l_61 * a_61,
    )
    b_2, b_3, b_4, b_5, b_6 = (
        b_2 - l_21 * b_1,
        b_3 - l_31 * b_1,
        b_4 - l_41 * b_1,
        b_5 - l_51 * b_1,
        b_6 - l_61 * b_1,
    )
    if not a_22 > 0.0:
        return None
    l_32, l_42, l_52, l_62 = a_32 / a_22, a_42 / a_22, a_52 / a_22, a_62 / a_22
    a_33 = a_33 - l_32 * a_32
    a_43, a_44 = a_43 - l_42 * a_32, a_44 - l_42 * a_42
    a_53, a_54, a_55 = a_53 - l_52 * a_32, a_54 - l_52 * a_42, a_55 - l_52 * a_52
    a_63, a_64, a_65, a_66 = (
        a_63 - l_62 * a_32,
        a_64 - l_62 * a_42,
        a_65 - l_62 * a_52,
        a_66 - l_62 * a_62,
    )
    b_3, b_4, b_5, b_6 = b_3 - l_32 * b_2, b_4 - l_42 * b_2, b_5 - l_52 * b_2, b_6 - l_62 * b_2
    if not a_33 > 0.0:
        return None
    l_43, l_53, l_63 = a_43 / a_33, a_53 / a_33, a_63 / a_33
    a_44 = a_44 - l_43 * a_43
    a_54, a_55 = a_54 - l_53 * a_43, a_55 - l_53 * a_53
    a_64, a_65, a_66 = a_64 - l_63 * a_43, a_65 - l_63 * a_53, a_66 - l_63 * a_63
    b_4, b_5, b_6 = b_4 - l_43 * b_3, b_5 - l_53 * b_3, b_6 - l_63 * b_3
    if not a_44 > 0.0:
        return None
    l_54, l_64 = a_54 / a_44, a_64 / a_44
    a_55 = a_55 - l_54 * a_54
    a_65, a_66 = a_65 - l_64 * a_54, a_66 - l_64 * a_64
    b_5, b_6 = b_5 - l_54 * b_4, b_6 - l_64 * b_4
    if not a_55 > 0.0:
        return None
    l_65 = a_65 / a_55
    a_66 = a_66 - l_65 * a_65
    b_6 = b_6 - l_65 * b_5
    if not a_66 > 0.0:
        return None
    x_6 = b_6 / a_66
    x_5 = (b_5 - a_65 * x_6) / a_55
    x_4 = (b_4 - a_54 * x_5 - a_64 * x_6) / a_44
    x_3 = (b_3 - a_43 * x_4 - a_53 * x_5 - a_63 * x_6) / a_33
    x_2 = (b_2 - a_32 * x_3 - a_42 * x_4 - a_52 * x_5 - a_62 * x_6) / a_22
    x_1 = (b_1 - a_21 * x_2 - a_31 * x_3 - a_41 * x_4 - a_51 * x_5 - a_61 * x_6) / a_11
    return [x_1, x_2, x_3, x_4, x_5, x_6]


# The solver of each size of system (index 0 unused).
_SOLVERS = (None, _solve_1, _solve_2, _solve_3, _solve_4, _solve_5, _solve_6) + (_looped_solve,) * 2


def summed_diagonal_solutions(
    G: Tensor, prefs: list[float], norm_eps: float, reg_eps: float
) -> Tensor | None:
    r"""UPGrad's weights for one Gramian ``G`` (``[m, m]``, float32 or float64, on the CPU):
    :math:`\sum_i v^{(i)}` with :math:`v^{(i)}` the solution for ``u = prefs[i] e_i`` (what
    :func:`solve_on_host` gives for the ``m`` rows of ``diag(prefs)``, summed), in ``G``'s dtype,
    or None when the tensor path must solve them.

    One Gramian read once and one tensor written: in a loop of one small aggregation per
    parameter, the tensors that :func:`solve_on_host` builds around the problems cost more than
    the problems. For ``m = 2`` with ``A = [[a, b], [c, d]]`` (positive definite) and
    ``prefs >= 0``, block pivoting stops after at most one exchange:
    ``v^{(1)} = p_1 (1, max(0, -b / d))`` and ``v^{(2)} = p_2 (max(0, -c / a), 1)``."""
    m = G.shape[0]
    dtype = G.dtype
    info = torch.finfo(dtype)
    if reg_eps < min(16.0 * info.eps, 1e-6) or len(prefs) != m:
        return None
    threshold = max(norm_eps, info.tiny)
    if dtype == torch.float32:
        prefs = float32_values(prefs)
        A = _float32_regularised(G, threshold, reg_eps)
    else:
        A = _regularised(G.tolist(), None, threshold, reg_eps, None)
    if A is None or not _all_finite(prefs):
        return None
    weights = _two_summed(A, prefs) if m == 2 else _summed(A, prefs)
    if weights is None:
        return None
    return host_tensor(weights, dtype)


def _float32_regularised(G: Tensor, threshold: float, reg_eps: float) -> list[list[float]] | None:
    """:func:`_regularised` of a float32 Gramian, rounded as the tensor path rounds it: the
    division by the trace is the tensor path's own operation (one operation on the values is
    cheaper than dividing them one by one), the diagonal shift is rounded here."""
    m = G.shape[0]
    if m == 2:  # the trace as the tensor path sums it: with two terms, any order rounds alike
        g = G.tolist()
        return _regularised(
            g, float32_values([g[0][0] + g[1][1]])[0], threshold, reg_eps, float32_values
        )
    trace = G.diagonal().sum()
    if not trace.item() >= threshold:  # a small, or not finite, trace
        return _regularised(G.tolist(), trace.item(), threshold, reg_eps, float32_values)
    A = G.div(trace).tolist()
    reg_eps = _float32(reg_eps)
    diagonal = []
    for i, row in enumerate(A):  # a loop: cheaper than a comprehension on Python 3.11
        diagonal.append(row[i] + reg_eps)
    for i, value in enumerate(float32_values(diagonal)):
        A[i][i] = value
    return A if _all_finite(map(sum, A)) else None


@lru_cache(maxsize=16)
def _float32(value: float) -> float:
    """The float32 value nearest to ``value``, remembered: the same ``reg_eps`` on every call
    (bounded: NaN keys never match)."""
    return float32_values([value])[0]


def _two_summed(A: list[list[float]], prefs: list[float]) -> list[float] | None:
    """:func:`summed_diagonal_solutions` of a 2 x 2 matrix in closed form, or None outside the
    closed form's conditions (a negative preference, a matrix that is not numerically positive
    definite)."""
    (a, b), (c, d) = A
    p_1, p_2 = prefs
    if not (p_1 >= 0.0 and p_2 >= 0.0 and a > 0.0 and d > 0.0 and a * d - b * c > 0.0):
        return None
    diagonal_max = max(a, d)
    # As block pivoting: index 2 is freed when y_2 = p_1 b is below its tolerance.
    z_2 = -p_1 * b / d if p_1 * b < -_REL_TOL * p_1 * diagonal_max else 0.0
    z_1 = -p_2 * c / a if p_2 * c < -_REL_TOL * p_2 * diagonal_max else 0.0
    return [p_1 + z_1, p_2 + z_2]


def _summed(A: list[list[float]], prefs: list[float]) -> list[float] | None:
    """:func:`summed_diagonal_solutions` by block pivoting, one problem per preference: the
    solution for ``u = p e_i`` with ``p > 0`` is ``p`` times the solution for ``e_i``."""
    m = len(A)
    diagonal_max = max(map(getitem, A, range(m)))
    tol_y = -_REL_TOL * diagonal_max
    weights = [0.0] * m
    subsets = _subsets(m)
    for i, p in enumerate(prefs):
        if p > 0.0:
            if not _add_unit_solution(A, i, p, tol_y, weights, subsets):
                return None
        elif p < 0.0:
            u = [0.0] * m
            u[i] = p
            v = _solve(A, diagonal_max, u, [p * a for a in A[i]])
            if v is None:
                return None
            weights = [w + x for w, x in zip(weights, v)]
    return weights
