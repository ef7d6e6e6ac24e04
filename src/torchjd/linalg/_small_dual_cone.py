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
from array import array
from collections.abc import Callable, Iterable
from operator import itemgetter

import torch
from torch import Tensor

from torchjd._precision import working_dtype

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
        rounded = _to_float32
    else:
        traces, rounded = [None] * G.shape[0], None
    solutions = []
    for g, trace, problems in zip(values.tolist(), traces, U.tolist()):
        A = _regularised(g, trace, threshold, reg_eps, rounded)
        if A is None:
            return None
        diagonal_max = max(A[i][i] for i in range(len(A)))
        symmetric = _lower_symmetric(A)
        for u in problems:
            v = _solve(A, diagonal_max, u, symmetric)
            if v is None:
                return None
            solutions.append(v)
    return torch.tensor(solutions, dtype=G.dtype).view(U.shape)


def _to_float32(values: list[float]) -> list[float]:
    """The float32 values nearest to ``values`` (inf beyond its range)."""
    return array("f", values).tolist()


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
    A: list[list[float]],
    diagonal_max: float,
    u: list[float],
    symmetric: list[list[float]] | None = None,
    q: list[float] | None = None,
) -> list[float] | None:
    r"""The solution of :math:`\min_{v \succeq u} v^\top A v` by block principal pivoting, or
    None (non-finite ``u``, failed factorisation, no convergence); ``diagonal_max`` is the
    largest diagonal entry of ``A``, the scale of its tolerance; ``symmetric`` (
    :func:`_lower_symmetric` of ``A``) and ``q`` (``A u``) when the caller has them."""
    m = len(u)
    if not _all_finite(u):
        return None
    if symmetric is None:
        symmetric = _lower_symmetric(A)
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
        if len(infeasible) < best:
            best, stalled = len(infeasible), 0
        else:
            stalled += 1
            if stalled > _PATIENCE:
                infeasible = infeasible[-1:]  # Murty's rule: the largest infeasible index
        for i in infeasible:
            free[i] = not free[i]
        F = [i for i in rows if free[i]]
        if len(F) == 1:
            (f,) = F
            z_F = _one_solve([symmetric[f][f], -q[f]])
        else:
            pick = itemgetter(*F)  # the columns of F, picked in C
            z_F = _positive_definite_solve([[*pick(symmetric[i]), -q[i]] for i in F])
        if z_F is None:
            return None
        z = [0.0] * m
        y = q
        for i, value in zip(F, z_F):  # y = A (u + z)
            z[i] = value
            y = [a + value * b for a, b in zip(y, A[i])]
    return None


def _lower_symmetric(A: list[list[float]]) -> list[list[float]]:
    """The symmetric matrix of the lower triangle of ``A`` (a float32 product ``J Jᵀ`` may differ
    from its transpose in the last place): the systems of :func:`_solve` read it, as a Cholesky
    factorisation reads one triangle."""
    symmetric = [list(row) for row in A]
    for i in range(1, len(A)):
        A_i = A[i]
        for j in range(i):
            symmetric[j][i] = A_i[j]
    return symmetric


def _positive_definite_solve(rows: list[list[float]]) -> list[float] | None:
    """``M^{-1} b`` for the augmented rows ``[M | b]`` of a symmetric ``M`` (the list is
    modified), by Gaussian elimination without pivoting (on a positive definite ``M`` it is the
    factorisation ``L D Lᵀ``, as stable as Cholesky's), or None when a pivot is not positive:
    ``M`` is not numerically positive definite. Whole-row list operations: on at most 8 rows, the
    interpreter's cost per operation outweighs the arithmetic."""
    n = len(rows)
    if n <= 2:  # written out: most systems of a nearly diagonal matrix are this small
        return _two_solve(rows) if n == 2 else _one_solve(rows[0])
    for k in range(n):
        pivot = rows[k]
        d = pivot[k]
        if not d > 0.0:
            return None
        for i in range(k + 1, n):
            row = rows[i]
            f = row[k] / d
            if f != 0.0:
                rows[i] = [a - f * b for a, b in zip(row, pivot)]
    x = [0.0] * n
    for k in range(n - 1, -1, -1):
        row = rows[k]
        s = row[n]
        for j in range(k + 1, n):
            s -= row[j] * x[j]
        x[k] = s / row[k]
    return x


def _one_solve(row: list[float]) -> list[float] | None:
    d, b = row
    return [b / d] if d > 0.0 else None


def _two_solve(rows: list[list[float]]) -> list[float] | None:
    """The elimination of :func:`_positive_definite_solve` for two rows, written out."""
    (a, c, e), (b, d, f) = rows
    if not a > 0.0:
        return None
    factor = b / a
    d -= factor * c
    if not d > 0.0:
        return None
    x_2 = (f - factor * e) / d
    return [(e - c * x_2) / a, x_2]


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
    g = G.tolist()
    if dtype == torch.float32:
        rounded: Callable[[list[float]], list[float]] | None = _to_float32
        prefs = _to_float32(prefs)
        # The float32 trace as the tensor path sums it: with two terms, any order rounds alike.
        trace = _to_float32([g[0][0] + g[1][1]])[0] if m == 2 else None
        if trace is None:
            trace = G.diagonal().sum().item()
    else:
        rounded, trace = None, None
    A = _regularised(g, trace, max(norm_eps, info.tiny), reg_eps, rounded)
    if A is None or not _all_finite(prefs):
        return None
    weights = _two_summed(A, prefs) if m == 2 else _summed(A, prefs)
    if weights is None:
        return None
    return torch.tensor(weights, dtype=dtype)


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
    """:func:`summed_diagonal_solutions` by block pivoting, one problem per preference."""
    m = len(A)
    diagonal_max = max(A[i][i] for i in range(m))
    symmetric = _lower_symmetric(A)
    weights = [0.0] * m
    for i, p in enumerate(prefs):
        if p == 0.0:
            continue  # u = 0: the solution is 0
        u = [0.0] * m
        u[i] = p
        v = _solve(A, diagonal_max, u, symmetric, [p * a for a in A[i]])
        if v is None:
            return None
        weights = [w + x for w, x in zip(weights, v)]
    return weights
