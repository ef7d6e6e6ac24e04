"""Dual-cone projection in torch by block principal pivoting (the default projector)."""

import math
import warnings

import torch
from torch import Tensor

from torchjd._precision import working_dtype
from torchjd.linalg import _small_dual_cone as small_dual_cone
from torchjd.linalg._matrix import PSDMatrix
from torchjd.linalg._projector import NormalizingProjector, check_projection_shapes

# Extra full exchanges allowed while the number of infeasible indices does not decrease, before
# switching to single pivots (the ``p`` of Júdice and Pires).
_PATIENCE = 3
# An index is infeasible when its value is below ``-_REL_TOL`` times the scale of its problem
# (``_REL_TOL_FLOAT32`` when the solver runs in float32, on devices without float64).
_REL_TOL = 1e-12
_REL_TOL_FLOAT32 = 1e-5
# Ridges tried, in order, on the problems whose factorisation failed or that did not converge (only
# reachable when the regularised Gramian is not numerically positive definite).
_RESCUE_RIDGES = (1e-9, 1e-6, 1e-3, 1.0)
# Below m = 32, solved problems leave the batch only when the batch holds this many entries.
_COMPACT_FROM = 16384
# Large batches (m >= _LARGE_M with several problems, or P * m^3 >= _LARGE_BATCH for P problems):
# the first free set is guessed by a few projected Jacobi iterations, and the linear systems are
# gathered down to the largest free set of the batch instead of being padded to m x m.
_LARGE_M = 32
_LARGE_BATCH = 2**22
_POWER_ITERATIONS = 4
# Batches of several Gramians are solved in chunks of at most this many matrix entries.
_MAX_CHUNK_ENTRIES = 2**24
_JACOBI_ITERATIONS = 8
# A shared float64 matrix whose condition number is provably below this is inverted once, and the
# problems whose fixed sets are the smaller ones solve systems of the fixed sets' size instead.
_MAX_CONDITION_FOR_INVERSE = 1e8
# On accelerators, problems with m up to this are solved by enumerating their 2^m free sets:
# branch-free, so no device synchronisation (block pivoting reads its stopping test on the host).
_ENUMERATE_MAX_M = 8


class BlockPivotingProjector(NormalizingProjector):
    r"""Projects onto the dual cone by solving its quadratic programs in torch.

    For every vector :math:`u` along the last axis of ``U``, returns

    .. math:: w = \arg\min_{v \succeq u} v^\top \hat G v,
        \qquad \hat G = \mathrm{normalize}(G) + \varepsilon_{\text{reg}} I,

    where :math:`\mathrm{normalize}(G) = G / \operatorname{tr}(G)`, or the zero matrix when
    :math:`\operatorname{tr}(G) <` ``norm_eps``. These are the steps of
    :class:`~torchjd.linalg.QuadprogProjector`, done in ``G``'s dtype, so both projectors give the
    same weights up to solver round-off; this one needs no optional dependency, runs on ``G``'s
    device, and solves all the vectors of ``U`` at once. By Proposition 1 of `Jacobian Descent for
    Multi-Objective Optimization <https://arxiv.org/abs/2406.16232>`_, :math:`J^\top w` is the
    projection of :math:`J^\top u` onto the dual cone :math:`\{x : J x \succeq 0\}` when
    :math:`G = J J^\top` (exactly so with both epsilons at 0).

    **Algorithm.** With :math:`z = v - u`, the optimality conditions form the linear
    complementarity problem :math:`y = \hat G z + \hat G u \succeq 0`, :math:`z \succeq 0`,
    :math:`z^\top y = 0`, whose matrix is positive definite. It is solved by the block principal
    pivoting method of Júdice and Pires (`A block principal pivoting algorithm for large-scale
    strictly monotone linear complementarity problems
    <https://doi.org/10.1016/0305-0548(94)90024-8>`_, Computers & Operations Research, 1994): guess
    the set :math:`F` of constraints that are not tight (:math:`y_F = 0`, :math:`z_{\bar F} = 0`),
    solve :math:`\hat G_{FF} z_F = -(\hat G u)_F`, and move every index whose :math:`z` or
    :math:`y` is negative to the other set. When the number of such indices has not reached a new
    minimum for four exchanges, only the largest of them is moved (Murty's single-pivot rule),
    which makes the method terminate. All the problems (every vector of ``U``, for every Gramian of
    the batch) are solved together, with one batched Cholesky factorisation per iteration, in
    float64: the normalised, regularised Gramian (computed in ``G``'s dtype) and ``U`` are cast to
    float64 and the result is cast back to ``G``'s dtype (on a device without float64, such as MPS,
    float32 is used and a warning is issued). Solved problems leave the batch.

    For small batches, the systems are padded with the identity to ``m x m`` and the first guess
    is :math:`F = \{i : (\hat G u)_i < 0\}`. For large ones (``m >= 32`` with several problems,
    or many problems), the first guess comes from a few projected Jacobi iterations (a handful of
    matrix products), and the systems are gathered to the size of the largest free set. When all
    the problems share one float64 matrix whose condition number is provably below ``1e8`` (as
    with UPGrad's default ``reg_eps``), the inverse :math:`H = \hat G^{-1}` is computed once, the
    first guess is the empty free set, and each iteration solves the batch through the smaller of
    the free sets and the fixed sets :math:`B` (the complements of :math:`F`): the minimiser with
    :math:`v_B = u_B` is :math:`v = H_{:B} \lambda` with :math:`H_{BB} \lambda = u_B`, and then
    :math:`\hat G v` is :math:`\lambda` on :math:`B` and 0 elsewhere, so checking the optimality
    conditions needs no product with :math:`\hat G`. With many conflicting rows (e.g. the
    per-sample gradients of an IWRM step) the fixed sets are a small fraction of ``m``. For
    UPGrad's problems (:math:`u = p_i e_i`), :math:`\hat G u` is row :math:`i` of :math:`\hat G`
    times :math:`p_i`, not a matrix product.

    **Synchronisation.** Block pivoting is iterative: each iteration reads on the host, in one
    transfer, the number of unsolved problems and (for large batches) the size of the largest free
    set, or, through the inverse, the sizes of the largest free and fixed sets, which set the size
    of the next gathered systems. In a batch from which the
    solved problems leave (``m >= 32``, or many problems), finding the remaining ones
    (``nonzero``) is another synchronisation. The condition bound of the inverse is read once, and
    after the iterations, whether a problem needs the rescue below. Random Gramians take one to
    three iterations; ill-conditioned ones (rank-deficient Jacobians) can take tens.

    **Small problems, no synchronisation.** With ``m = 2`` the solution has a closed form (the
    optimality conditions of the four free sets, evaluated branch-free), computed in ``G``'s dtype
    (float32 for half precision) rather than float64: a few divisions, as accurate there as the
    tolerances against quadprog require. On a device other than
    the CPU, problems with ``3 <= m <= 8`` are solved by trying all :math:`2^m` free sets at once
    (one batched factorisation each) and keeping the one that satisfies the optimality conditions
    (the least violating, up to rounding): nothing is read on the host, so a GPU does not wait for
    the host. On the CPU, where reading a value costs no synchronisation, block pivoting is faster
    and is used from ``m = 3``; the ``m = 2`` closed form there first checks on the host that
    :math:`\hat G` is positive definite (otherwise block pivoting and its rescue below run). On a
    device, an indefinite :math:`\hat G` of size ``m <= 8`` is not detected: the least violating
    candidate is returned without a warning.
    On the CPU, a few problems (at most 16) with ``m <= 8`` are normalised and solved by the same
    method with Python numbers in double precision (``torchjd.linalg._small_dual_cone``): a few
    hundred multiplications, cheaper than the fixed cost of the tensor operations; inputs it does
    not handle (non-finite values, ``reg_eps`` below the floor below) take the paths above.

    **Numerical safeguards** (none of them changes the result of a well-posed problem):

    * a Gramian of trace 0 is mapped to the zero matrix even when ``norm_eps`` is 0 (instead of
      dividing by zero);
    * the diagonal of :math:`\hat G` is raised by at least ``min(16 eps, 1e-6)`` times its largest
      entry, with ``eps`` the machine epsilon of ``G``'s dtype (when ``reg_eps`` is smaller):
      about the rounding error of the normalised entries, so that a rank-deficient Gramian with
      ``reg_eps=0`` still has a unique answer;
    * a problem whose last factorisation failed or that did not converge (only possible when
      :math:`\hat G` is not numerically positive definite, e.g. a float32 Gramian with large
      rounding errors and ``reg_eps=0``) is solved again with a growing ridge :math:`\tau I`
      added, :math:`\tau \in \{10^{-9}, 10^{-6}, 10^{-3}, 1\}`; a warning is issued if that
      fails too.

    ``G`` is assumed symmetric (only its lower triangle is factorised). Non-finite values are not
    checked (that would need a synchronisation): NaN or infinity in ``U`` or ``G`` gives NaN in the
    result, never a silently finite answer.

    **Half precision.** A float16 or bfloat16 Gramian is normalised in float32 (its trace can
    overflow float16 even when every entry is finite); the result is returned in ``G``'s dtype.

    :param norm_eps: non-negative threshold on :math:`\operatorname{tr}(G)` below which the
        normalised Gramian is the zero matrix (and the result is :math:`\max(u, 0)`). Default
        ``0.0001``.
    :param reg_eps: non-negative multiple of the identity added to the normalised Gramian. Default
        ``0.0001``.

    Besides the public call on ``G`` of shape ``[m, m]``, :meth:`solve_batched` projects for a batch
    of Gramians ``[b, m, m]`` at once.
    """

    def __call__(self, U: Tensor, G: PSDMatrix) -> Tensor:
        """Return ``W`` of ``U``'s shape, in ``G``'s dtype and on its device, with ``W[..., :]``
        the solution of the dual-cone problem for ``U[..., :]``.

        :param U: tensor of shape ``[..., m]``.
        :param G: symmetric positive semi-definite matrix of shape ``[m, m]``.
        """
        check_projection_shapes(U, G)
        m = G.shape[-1]
        W = self.solve_batched(U.reshape(1, math.prod(U.shape[:-1]), m), G.unsqueeze(0))
        return W.reshape(U.shape)

    def solve_batched(self, U: Tensor, G: Tensor) -> Tensor:
        """Project for a batch of Gramians at once.

        :param U: tensor of shape ``[b, k, m]``: ``k`` vectors for each Gramian.
        :param G: batch of symmetric positive semi-definite matrices, shape ``[b, m, m]``.
        :return: tensor of shape ``[b, k, m]``, in ``G``'s dtype and on its device, where
            ``out[i]`` equals ``self(U[i], G[i])``.
        """
        _check_batch(U, G)
        return self._project(U, G)

    def _project(self, U: Tensor, G: Tensor, diagonal: bool = False) -> Tensor:
        """:meth:`solve_batched` on checked inputs; ``diagonal`` says that every ``U[i]`` is a
        diagonal matrix (UPGrad's problems), which saves a matrix product."""
        with torch.no_grad():
            if U.numel() == 0:
                return torch.zeros(U.shape, dtype=G.dtype, device=G.device)
            b, k, m = U.shape
            if _reads_on_host(G.device) and small_dual_cone.fits(b * k, m):
                V = small_dual_cone.solve_on_host(G, U, self.norm_eps, self.reg_eps)
                if V is not None:
                    return V
            A = self._regularised_gramian(G)
            V = _solve(A, U.to(dtype=A.dtype, device=A.device), diagonal)
            return V.to(dtype=G.dtype)

    def _regularised_gramian(self, G: Tensor) -> Tensor:
        """The matrix of the quadratic programs, in the solver's dtype.

        ``G / trace`` (the zero matrix when the trace is below ``norm_eps``, or zero) plus
        ``reg_eps * I``, in ``G``'s dtype (float32 for half-precision Gramians, whose trace may
        overflow), then cast to the solver's dtype (the working dtype itself for ``m <= 2``,
        whose closed forms are as accurate in it); branch-free on the values."""
        G = G.to(dtype=working_dtype(G.dtype))
        info = torch.finfo(G.dtype)
        trace = G.diagonal(dim1=-2, dim2=-1).sum(dim=-1)[..., None, None]
        # Dividing by +inf gives the zero matrix below the threshold (a NaN trace stays NaN).
        too_small = trace < max(self.norm_eps, info.tiny)
        A = G / torch.where(too_small, torch.inf, trace)
        A.diagonal(dim1=-2, dim2=-1).add_(self.reg_eps)
        if G.shape[-1] > 2:
            A = A.to(dtype=_solver_dtype(G.device))
        floor = min(16.0 * info.eps, 1e-6)
        if self.reg_eps < floor:
            # Relative to the largest diagonal entry, which bounds the rounding error of every
            # entry (the diagonal sums to 1: with many rows, a fixed floor would dominate it).
            diagonal = A.diagonal(dim1=-2, dim2=-1)
            largest = (diagonal - self.reg_eps).amax(dim=-1, keepdim=True)
            scale = torch.where(largest > 0.0, largest, 1.0)
            diagonal.add_((floor * scale - self.reg_eps).clamp(min=0.0))
        return A


def summed_diagonal_projection(
    projector: BlockPivotingProjector, prefs: Tensor | None, G: Tensor
) -> Tensor:
    """:func:`summed_diagonal_projections` of one Gramian ``G`` (``[m, m]``) and its preference
    weights ``prefs`` (``[m]``; None for the mean, ``1 / m`` each, in ``G``'s dtype): shape
    ``[m]``, in ``G``'s dtype. A float32 or float64 Gramian of at most ``small_dual_cone.MAX_M``
    rows on the CPU is solved with Python numbers, without the tensors of the batched path around
    it (see :func:`~torchjd.linalg._small_dual_cone.summed_diagonal_solutions`)."""
    m = G.shape[-1]
    if (
        _reads_on_host(G.device)
        and G.dtype in (torch.float32, torch.float64)
        and (prefs is None or prefs.device == G.device)
        and small_dual_cone.fits(m, m)
    ):
        weights = small_dual_cone.summed_diagonal_solutions(
            G,
            [1.0 / m] * m if prefs is None else prefs.tolist(),
            projector.norm_eps,
            projector.reg_eps,
        )
        if weights is not None:
            return weights
    if prefs is None:
        prefs = torch.full((m,), 1.0 / m, dtype=G.dtype, device=G.device)
    prefs = prefs.to(dtype=G.dtype, device=G.device)
    return summed_diagonal_projections(projector, prefs[None], G[None])[0]


def summed_diagonal_projections(
    projector: BlockPivotingProjector, prefs: Tensor, G: Tensor
) -> Tensor:
    """``projector.solve_batched(torch.diag_embed(prefs), G).sum(dim=-2)``: for each Gramian
    ``G[k]`` (``[b, m, m]``), the sum over ``i`` of the solutions for ``u = prefs[k, i] e_i``
    (UPGrad's weights), shape ``[b, m]``, in ``G``'s dtype.

    For ``m <= 2`` it is a closed form in ``G``'s working dtype, with a handful of operations. With
    ``A = [[a, c], [c, d]]`` and ``u = p_1 e_1``, ``y = A u = p_1 (a, c)``: index 1 is never freed,
    so (:func:`_solve_two`) the solution is ``p_1^+ (1, max(0, -c / d))``, and symmetrically for
    ``u = p_2 e_2``. The ratios are those of ``s A = G + s r I`` (``s`` the trace, or infinity
    below ``norm_eps``, ``r`` the ridge), so ``A`` is never built. A matrix that is not
    numerically positive definite takes the general path where that can be checked without
    synchronisation (on the CPU). On the CPU, a few problems go to
    :meth:`BlockPivotingProjector.solve_batched` (solved with Python numbers) instead."""
    m = G.shape[-1]
    if m > 2 or (_reads_on_host(G.device) and small_dual_cone.fits(prefs.numel(), m)):
        U = torch.diag_embed(prefs)
        _check_batch(U, G)
        return projector._project(U, G, diagonal=True).sum(dim=-2)
    Gw = G.to(dtype=working_dtype(G.dtype))
    p = prefs.to(dtype=Gw.dtype, device=Gw.device).clamp(min=0.0)
    if m == 1:
        return (p + 0.0 * Gw[..., 0]).to(dtype=G.dtype)  # the product keeps a NaN or inf of G
    info = torch.finfo(Gw.dtype)
    diag = Gw.diagonal(dim1=-2, dim2=-1)
    trace = diag.sum(dim=-1, keepdim=True)
    scale = torch.where(trace < max(projector.norm_eps, info.tiny), torch.inf, trace)
    den = diag.add(scale, alpha=_ridge(projector.reg_eps, info.eps))  # s (a, d)
    off = Gw[..., 0, 1:]  # s c
    # Positive definite: s a > 0 and s^2 (a d - c^2) > 0 (a NaN passes and stays in the result).
    if _reads_on_host(G.device) and bool(
        ((den.prod(dim=-1, keepdim=True) - off.square()).minimum(den) <= 0.0).any()
    ):
        return projector.solve_batched(torch.diag_embed(prefs), G).sum(dim=-2)
    # (max(0, -c / a), max(0, -c / d)); adding 0 * (trace + s c) turns an infinite entry into
    # NaN, as the normalisation does.
    t = off.div(den).neg_().clamp_(min=0.0).add_(trace + off, alpha=0.0)
    return p.flip(-1).mul_(t).add_(p).to(dtype=G.dtype)


def _ridge(reg_eps: float, eps: float) -> float:
    """What the diagonal of the normalised Gramian receives: ``reg_eps``, raised to
    ``min(16 eps, 1e-6)`` (``eps`` of the normalisation's dtype)."""
    return max(reg_eps, min(16.0 * eps, 1e-6))


def _check_batch(U: Tensor, G: Tensor) -> None:
    """Check the shapes of :meth:`BlockPivotingProjector.solve_batched`'s arguments."""
    if G.ndim != 3 or G.shape[1] != G.shape[2]:
        raise ValueError(
            f"`G` must be a batch of square matrices [b, m, m], got shape {tuple(G.shape)}."
        )
    if U.ndim != 3 or U.shape[0] != G.shape[0]:
        raise ValueError(
            f"`U` must have shape [b, k, m] with b = {G.shape[0]} (the batch size of `G`), "
            f"got shape {tuple(U.shape)}."
        )
    _check_last_dim(U, G.shape[-1])


def _check_last_dim(U: Tensor, m: int) -> None:
    if U.ndim == 0 or U.shape[-1] != m:
        raise ValueError(
            f"The last dimension of `U` must be m = {m} (the size of `G`), got shape "
            f"{tuple(U.shape)}."
        )


def _solver_dtype(device: torch.device) -> torch.dtype:
    if device.type == "mps":
        warnings.warn(
            "BlockPivotingProjector solves in float32 on MPS, which does not support float64.",
            stacklevel=4,
        )
        return torch.float32
    return torch.float64


def _solve(A: Tensor, U: Tensor, diagonal: bool = False) -> Tensor:
    """Solve ``min_v v^T A[i] v`` subject to ``v >= U[i, j]`` for all ``i, j``.

    ``A`` is ``[b, m, m]`` positive definite, ``U`` is ``[b, k, m]``, both in the solver's dtype
    (``diagonal``: every ``U[i]`` is diagonal, ``k = m``).
    ``m <= 2`` has a closed form; on an accelerator, ``m <= _ENUMERATE_MAX_M`` is solved by
    enumerating the free sets (no synchronisation); otherwise block principal pivoting.
    """
    b, k, m = U.shape
    if m == 1:
        # min a v^2 subject to v >= u, with a > 0 (the product keeps a NaN of A).
        return U.clamp(min=0.0) + 0.0 * A
    host = _reads_on_host(A.device)
    if m == 2 and not (host and _has_indefinite_two(A)):
        # Indefinite matrices (no minimum) go to block pivoting, whose rescue warns about them
        # (tested only where reading a flag synchronises with no device).
        return _solve_two(A, U)
    enumerate_ = not host and m <= _ENUMERATE_MAX_M
    # In chunks of Gramians, to bound the memory of the per-problem linear systems.
    entries = k * m * m * (2**m if enumerate_ else 1)
    chunk = max(1, _MAX_CHUNK_ENTRIES // entries)
    if enumerate_:
        return torch.cat(
            [_enumerate(A_part, U_part) for A_part, U_part in zip(A.split(chunk), U.split(chunk))]
        )
    if chunk >= b:
        return _solve_problems(A, U.reshape(b * k, m), diagonal).reshape(b, k, m)
    parts = [
        _solve_problems(A_part, U_part.reshape(-1, m), diagonal)
        for A_part, U_part in zip(A.split(chunk), U.split(chunk))
    ]
    return torch.cat(parts).reshape(b, k, m)


def _reads_on_host(device: torch.device) -> bool:
    """Whether the solver may read values on the host: on the CPU it costs no synchronisation
    (block pivoting is then faster than enumerating free sets); on accelerators, small problems
    are solved without it."""
    return device.type == "cpu"


def _solve_two(A: Tensor, U: Tensor) -> Tensor:
    """The closed form for ``m = 2`` (``A`` positive definite, ``y = A u``).

    Freeing only index ``i`` gives ``v = u - (y_i / A_ii) e_i``, optimal when ``y_i < 0`` (so that
    ``v_i > u_i``) and ``u_j >= 0`` for the other index ``j`` (then ``(A v)_j = u_j det(A) / A_ii
    >= 0``); freeing both gives ``v = 0``, optimal when ``u <= 0``; freeing none gives ``u``,
    optimal when ``y >= 0``. Exactly one of these holds when ``A`` is positive definite (two
    single frees at once would give ``u^T A u < 0``), hence
    ``v = [u > 0 somewhere] (u - r * [y < 0 and u_j >= 0])`` with ``r = y / diag(A)``. Products,
    not selections, so that a NaN of ``A`` or ``U`` reaches the result."""
    y = U @ A  # A symmetric: the rows of y are A u
    r = y / A.diagonal(dim1=-2, dim2=-1).unsqueeze(-2)
    single = (y < 0.0) & (U >= 0.0).flip(-1)
    return (U - r * single) * (U > 0.0).any(dim=-1, keepdim=True)


def _has_indefinite_two(A: Tensor) -> bool:
    """Whether a ``2 x 2`` matrix of the batch ``A`` is not numerically positive definite."""
    return bool(torch.linalg.cholesky_ex(A).info.any())


def _free_sets(m: int, device: torch.device) -> Tensor:
    """All ``2^m`` subsets of ``range(m)`` as a boolean ``[2^m, m]`` (made once per device)."""
    key = (m, device)
    if key not in _FREE_SETS:
        # Built on the device: a copy from host memory would synchronise.
        codes = torch.arange(2**m, device=device)
        _FREE_SETS[key] = ((codes[:, None] >> torch.arange(m, device=device)) & 1).bool()
    return _FREE_SETS[key]


_FREE_SETS: dict[tuple[int, torch.device], Tensor] = {}


def _enumerate(A: Tensor, U: Tensor) -> Tensor:
    """Solve ``[b, k]`` problems of size ``m`` by trying every free set ``F`` at once.

    For each ``F``, ``z_F = -A_FF^{-1} (A u)_F`` and ``z = 0`` off ``F`` (the padded system is
    factorised once per Gramian and free set); the solution is the candidate that violates
    ``z >= 0`` on ``F`` and ``y = A (u + z) >= 0`` off ``F`` the least (relative to the scales of
    ``u`` and ``A``), which is the unique optimum (violation 0) when ``A`` is positive definite.
    Branch-free: no synchronisation with the device, whatever the values."""
    b, k, m = U.shape
    F = _free_sets(m, A.device)  # [S, m]
    eye = torch.eye(m, dtype=A.dtype, device=A.device)
    M = torch.where(F[:, :, None] & F[:, None, :], A[:, None], eye)  # [b, S, m, m]
    L = torch.linalg.cholesky_ex(M).L
    q = U @ A  # A u, [b, k, m]
    rhs = (q[:, None] * F[:, None, :]).neg_().mT  # [b, S, m, k]
    # Two triangular solves (cholesky_solve checks an error code on the host on CUDA).
    w = torch.linalg.solve_triangular(L, rhs, upper=False)
    z = torch.linalg.solve_triangular(L.mT, w, upper=True).mT  # [b, S, k, m]
    y = q[:, None] + z @ A[:, None]
    u_scale = U.abs().amax(dim=-1)[:, None, :, None]  # [b, 1, k, 1]
    a_scale = A.diagonal(dim1=-2, dim2=-1).amax(dim=-1)[:, None, None, None]  # [b, 1, 1, 1]
    violation = torch.where(F[:, None, :], -z, -y / a_scale).amax(dim=-1, keepdim=True)
    best = (violation / u_scale).argmin(dim=1, keepdim=True)  # [b, 1, k, 1]
    z_best = z.gather(1, best.expand(b, 1, k, m)).squeeze(1)
    y_sum = y.gather(1, best.expand(b, 1, k, m)).squeeze(1).sum(dim=-1, keepdim=True)
    return (U + z_best).add_(y_sum, alpha=0.0)  # a NaN of A or U stays


def _solve_problems(A: Tensor, u: Tensor, diagonal: bool = False) -> Tensor:
    """Solve ``min_v v^T A[p // g] v s.t. v >= u[p]`` for every row ``p`` of ``u`` (``[P, m]``),
    where ``A`` is ``[c, m, m]`` and ``g = P / c``, and rescue the problems that failed
    (``diagonal``: ``u`` is made of ``c`` diagonal ``m x m`` blocks)."""
    c = A.shape[0]
    if c == 1:
        A = A[0]  # shared by all problems
    V, suspicious = _block_pivoting(A, u, diagonal)
    if bool(suspicious.any()):  # host synchronisation: did a problem fail?
        failed = suspicious.nonzero().squeeze(-1)
        # The shared matrix, or the matrices of the failed problems.
        A_failed = A if c == 1 else A[failed // (u.shape[0] // c)]
        V[failed] = _rescue(A_failed, u[failed])
    return V


def _rescue(A: Tensor, u: Tensor) -> Tensor:
    """Solve again problems flagged by :func:`_block_pivoting` (failed factorisation or no
    convergence), ``A`` being ``[m, m]`` (shared) or ``[P, m, m]``: NaN when the problem holds
    non-finite values, else with a growing ridge added to ``A``; warn if even that fails."""
    V = torch.full_like(u, torch.nan)
    finite = torch.isfinite(u).all(dim=-1) & torch.isfinite(A).all(dim=-1).all(dim=-1)
    todo = finite.nonzero().squeeze(-1)
    shared = A.ndim == 2
    if not shared:
        A = A[todo]
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    for ridge in _RESCUE_RIDGES:
        if todo.numel() == 0:
            return V
        V_todo, still_failed = _block_pivoting(A + ridge * eye, u[todo])
        V[todo] = V_todo
        todo = todo[still_failed]
        if not shared:
            A = A[still_failed]
    if todo.numel() > 0:
        warnings.warn(
            f"BlockPivotingProjector did not solve {todo.numel()} problems accurately: the "
            "Gramian is probably far from positive semi-definite.",
            stacklevel=6,
        )
    return V


def _add_product(y: Tensor, z: Tensor, A: Tensor, alpha: float = 1.0) -> Tensor:
    """``y + alpha * z @ A[p // g]`` for each row ``p`` of ``y`` and ``z`` (``[P, m]``), with
    ``A`` of shape ``[c, m, m]`` and ``g = P / c``, or ``[m, m]`` shared (``A`` is symmetric:
    this is ``A z``)."""
    if A.ndim == 2:
        return torch.addmm(y, z, A, alpha=alpha)
    c, m = A.shape[0], A.shape[-1]
    P = y.shape[0]
    return torch.baddbmm(y.view(c, P // c, m), z.view(c, P // c, m), A, alpha=alpha).view(P, m)


def _is_large(P: int, m: int) -> bool:
    """Whether a batch is large enough for the guess of the free set and the gathered systems
    (a single problem, such as DualProj's, is solved faster without them up to m ~ 150)."""
    return (m >= _LARGE_M and P > 1) or P * m**3 >= _LARGE_BATCH


def _block_pivoting(A: Tensor, u: Tensor, diagonal: bool = False) -> tuple[Tensor, Tensor]:
    """Solve ``min_v v^T A[p // g] v s.t. v >= u_p`` for each row ``u_p`` of ``u`` (``[P, m]``),
    with ``A`` of shape ``[c, m, m]`` and ``g = P / c`` problems per matrix, or ``[m, m]`` shared
    by all problems. ``diagonal`` says that ``u`` is ``diag(p)`` (``P = m``) when ``A`` is shared
    (UPGrad's problems), so that ``A u`` is ``p_i`` times row ``i`` of ``A``.

    Returns the solutions ``[P, m]`` and a boolean ``[P]`` marking the suspicious ones: not
    converged, or whose last factorisation failed (``A_FF`` not numerically positive definite, or
    NaN in it). A factorisation that succeeds solves its system accurately (Cholesky is backward
    stable), so the others satisfy the optimality conditions up to the tolerances. A NaN in ``A``
    that no factorisation sees gives NaN in the solution.
    """
    P, m = u.shape
    shared = A.ndim == 2
    large = _is_large(P, m)
    eye = None if large else torch.eye(m, dtype=u.dtype, device=u.device)
    H = _inverse_if_well_conditioned(A) if large and shared else None
    # z = v - u is infeasible on F below neg_tol_z, y = A v off F below neg_tol_y (the diagonal
    # bounds |A_ij|).
    rel_tol = _REL_TOL if u.dtype == torch.float64 else _REL_TOL_FLOAT32
    neg_tol_z = -rel_tol * _largest_magnitudes(u, diagonal)
    a_scale = A.diagonal(dim1=-2, dim2=-1).amax(dim=-1, keepdim=True)  # [1] or [c, 1]
    if shared:
        neg_tol_y = neg_tol_z * a_scale
    else:
        neg_tol_y = (neg_tol_z.view(A.shape[0], -1) * a_scale).view(P, 1)
    if H is not None:
        # UPGrad's diag(p): A u is p_i times row i of A (A symmetric), without a product.
        q = u.diagonal().unsqueeze(-1) * A if diagonal and m == P else u @ A
        return _pivot_through_inverse(A, H, u, q, neg_tol_z, neg_tol_y)

    # Large batches gather their systems from a copy of A with a row and a column of zeros
    # appended (the padding of the gathered systems); A is a view of its copy.
    A_padded = None
    if large:
        A_padded = _zero_padded(A)
        A = A_padded[..., :m, :m]
    q = u @ A if shared else _add_product(torch.zeros_like(u), u, A)  # A u

    # F: the free set (z_F may be positive, y_F = 0); z = 0 off F.
    if large:
        F = _guess_free_set(A, -q)
        largest_free = _read_sizes(F.new_ones(P), F, large)[1]  # host synchronisation
        z, y, failed = _solve_free_set(A, q, F, eye, A_padded, largest_free)
        infeasible = torch.where(F, z < neg_tol_z, y < neg_tol_y)
    else:
        F, z, y, failed = None, None, q, None  # F empty, z = 0
        infeasible = y < neg_tol_y
    # The solutions of the problems that left the batch, whether they are suspicious, and the
    # indices of the problems still in the batch (None: all of them).
    V = suspicious = active = None
    # The infeasible indices at each iteration (their numbers are counted only from the first
    # iteration where the rule below needs them), and the running minimum of those numbers.
    history: list[Tensor] = []
    best: list[Tensor] = []
    converged = False

    for _ in range(50 + 10 * m):
        exchange, history, best = _exchange(infeasible, history, best)
        F_next = exchange if F is None else F ^ exchange

        # The iteration's one host synchronisation: are we done and, for large batches, how
        # large are the next systems?
        unsolved = infeasible.any(dim=-1)
        n_unsolved, largest_free = _read_sizes(unsolved, F_next, large)
        if n_unsolved == 0:
            converged = True
            break
        if n_unsolved <= _compact_below(unsolved.shape[0], m):
            # The solved problems leave the batch; the solutions of all the problems in it are
            # stored (those of the unsolved ones are overwritten later).
            if F is None:
                z = torch.zeros_like(u)
                failed = torch.zeros(u.shape[0], dtype=torch.bool, device=u.device)
            if active is None:
                V, suspicious = _solution(u, z, y), failed
            else:
                V.index_copy_(0, active, _solution(u, z, y))
                suspicious.index_copy_(0, active, failed)
            keep = unsolved.nonzero().squeeze(-1)
            if not shared:
                # One matrix per remaining problem from now on.
                owner = keep // (u.shape[0] // A.shape[0])
                if A_padded is None:
                    A = A.index_select(0, owner)
                else:
                    A_padded = A_padded.index_select(0, owner)
                    A = A_padded[..., :m, :m]
            active = keep if active is None else active.index_select(0, keep)
            u, q, F_next, infeasible, neg_tol_z, neg_tol_y = (
                t.index_select(0, keep) for t in (u, q, F_next, infeasible, neg_tol_z, neg_tol_y)
            )
            history = [t.index_select(0, keep) for t in history]
            best = [t.index_select(0, keep) for t in best]

        F = F_next
        z, y, failed = _solve_free_set(A, q, F, eye, A_padded, largest_free)
        infeasible = torch.where(F, z < neg_tol_z, y < neg_tol_y)

    if F is None:  # solved without any factorisation: v = u
        z = torch.zeros_like(u)
        failed = torch.zeros(u.shape[0], dtype=torch.bool, device=u.device)
    if not converged:
        failed = failed | infeasible.any(dim=-1)
    if active is None:
        return _solution(u, z, y), failed
    V[active] = _solution(u, z, y)
    suspicious[active] = failed
    return V, suspicious


def _exchange(
    infeasible: Tensor, history: list[Tensor], best: list[Tensor]
) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """The indices to move to the other set, given the infeasible ones (``[P, m]``), and the
    updated ``history`` (the infeasible indices of the last iterations) and ``best`` (the running
    minimum of their numbers, counted only from the first iteration that needs them).

    Júdice-Pires: exchange every infeasible index as long as their number reaches new minima; after
    ``_PATIENCE + 1`` exchanges without a new minimum, exchange only the largest infeasible index
    (Murty's rule, which terminates)."""
    history = [*history, infeasible]
    if len(history) < _PATIENCE + 2:
        return infeasible, history, best
    if not best:
        counts = torch.stack(history).sum(dim=-1)
        best = list(counts.cummin(dim=0).values.unbind(0))
    else:
        best = [*best, torch.minimum(best[-1], infeasible.sum(dim=-1))]
    stalled = best[-1] == best[-_PATIENCE - 2]
    m = infeasible.shape[-1]
    position = torch.arange(1, m + 1, dtype=torch.int32, device=infeasible.device)
    largest = (infeasible * position).argmax(dim=-1, keepdim=True)
    # "& infeasible" leaves the solved problems (no infeasible index) unchanged.
    single = torch.zeros_like(infeasible).scatter_(-1, largest, True) & infeasible
    exchange = torch.where(stalled.unsqueeze(-1), single, infeasible)
    return exchange, history[-_PATIENCE - 1 :], best[-_PATIENCE - 1 :]


def _largest_magnitudes(u: Tensor, diagonal: bool) -> Tensor:
    """``u.abs().amax(dim=-1, keepdim=True)`` (``[P, 1]``), read from the diagonals when ``u`` is
    made of diagonal ``m x m`` blocks (``diagonal``): the off-diagonal zeros cannot be larger."""
    P, m = u.shape
    if diagonal:
        return u.view(-1, m, m).diagonal(dim1=-2, dim2=-1).reshape(P, 1).abs()
    return u.abs().amax(dim=-1, keepdim=True)


def _pivot_through_inverse(
    A: Tensor, H: Tensor, u: Tensor, q: Tensor, neg_tol_z: Tensor, neg_tol_y: Tensor
) -> tuple[Tensor, Tensor]:
    """:func:`_block_pivoting` for problems sharing ``A`` (``[m, m]``) whose inverse ``H`` is
    known, from the empty free set, given ``q = A u`` and the tolerances.

    The state is the fixed set ``B`` (the complement of the free set ``F``). Each iteration solves
    the systems of the smaller sets of the batch: ``H_BB lam = u_B``, after which
    ``v = H_{:B} lam`` and ``A v`` is ``lam`` on ``B`` and 0 on ``F``; or ``A_FF z_F = -q_F``,
    after which ``v = u + z`` and ``A v = q + A z``. Either way ``v`` is checked against ``u`` on
    ``F`` and ``A v`` against 0 on ``B``. Solved problems leave the batch at once, taking with them
    only the rows that the next iterations read (``q`` is gathered when a system needs it).
    """
    P, m = u.shape
    H_padded = _zero_padded(H)
    H_tall = H_padded[:, :m].contiguous()  # H with a zero row appended: lam_padded @ H_tall
    A_padded = None  # made when a batch has free sets smaller than its fixed sets
    u_padded = _zero_padded_rows(u)  # the right-hand sides, 0 in the padding slot
    low = u + neg_tol_z  # the lower bound of v on F
    tol_y = neg_tol_y

    B = torch.ones_like(u, dtype=torch.bool)  # F empty: v = u and A v = q
    v, y = u, q
    infeasible = y < tol_y
    failed = torch.zeros(P, dtype=torch.bool, device=u.device)
    # The solutions of the problems that left the batch, whether they are suspicious, and the
    # indices of the problems still in the batch (None: all of them).
    V = suspicious = active = None
    history: list[Tensor] = []
    best: list[Tensor] = []
    converged = False
    for _ in range(50 + 10 * m):
        exchange, history, best = _exchange(infeasible, history, best)
        B_next = B ^ exchange
        # The iteration's one host synchronisation: are we done, and how large are the next
        # systems?
        unsolved = _rows_with_any(infeasible)
        smallest_fixed, largest_fixed = B_next.sum(dim=-1, dtype=torch.int32).aminmax()
        n_unsolved, smallest_fixed, largest_fixed = torch.stack(
            [unsolved.sum(), smallest_fixed, largest_fixed]
        ).tolist()
        if n_unsolved == 0:
            converged = True
            break
        if n_unsolved < unsolved.shape[0]:
            # The solved problems leave the batch (the stored solutions of the others are
            # overwritten later).
            solution = _fixed_set_solution(B, u_padded[:, :m], v, y)
            if active is None:
                V, suspicious = solution, failed
            else:
                V.index_copy_(0, active, solution)
                suspicious.index_copy_(0, active, failed)
            keep = unsolved.nonzero().squeeze(-1)
            active = keep if active is None else active.index_select(0, keep)
            u_padded, low, tol_y, B_next = (
                t.index_select(0, keep) for t in (u_padded, low, tol_y, B_next)
            )
            history = [t.index_select(0, keep) for t in history]
            best = [t.index_select(0, keep) for t in best]
        B = B_next
        largest_free = m - smallest_fixed
        if largest_fixed <= largest_free:
            lam, failed = _solve_ordered(H_padded, u_padded, _ordered(B, largest_fixed))
            v = lam @ H_tall
            y = lam[:, :m]
            # y is 0 on F and tol_y <= 0: only on B can y be below it.
            infeasible = (y < tol_y) | ((v < low) & ~B)
        else:
            if A_padded is None:
                A_padded = _zero_padded(A)
            q_padded = _zero_padded_rows(q if active is None else q.index_select(0, active))
            minus_z, failed = _solve_ordered(A_padded, q_padded, _ordered(~B, largest_free))
            v = u_padded[:, :m] - minus_z[:, :m]
            y = torch.addmm(q_padded[:, :m], minus_z, A_padded[:, :m], alpha=-1.0)
            infeasible = torch.where(B, y < tol_y, v < low)

    if not converged:
        failed = failed | infeasible.any(dim=-1)
    solution = _fixed_set_solution(B, u_padded[:, :m], v, y)
    if active is None:
        return solution, failed
    V[active] = solution
    suspicious[active] = failed
    return V, suspicious


def _rows_with_any(mask: Tensor) -> Tensor:
    """Whether each row of the boolean ``mask`` (``[P, m]``) holds a True, as 0 or 1 (uint8): the
    maximum of its bytes, several times faster than ``any`` on the CPU."""
    return mask.view(torch.uint8).amax(dim=-1)


def _fixed_set_solution(B: Tensor, u: Tensor, v: Tensor, y: Tensor) -> Tensor:
    """``v`` with ``u`` on the fixed set ``B`` (where it equals ``u`` up to rounding), made NaN
    where ``y = A v`` holds a NaN."""
    return torch.where(B, u, v).add_(y.sum(dim=-1, keepdim=True), alpha=0.0)


def _zero_padded_rows(x: Tensor) -> Tensor:
    """``x`` (``[P, m]``) with a column of zeros appended."""
    return torch.nn.functional.pad(x, (0, 1))


def _ordered(S: Tensor, size: int) -> Tensor:
    """For each row of ``S`` (``[P, m]``, boolean), ``size`` slots (at least the size of the
    largest set of ``S``) holding the indices of the set and, in the other slots, the padding index
    ``m``, in no particular order (any order gives the same solutions)."""
    m = S.shape[-1]
    keys = torch.where(S, torch.arange(m, device=S.device), m)
    if size > m:
        keys = torch.nn.functional.pad(keys, (0, size - m), value=m)
    return keys.topk(size, dim=-1, largest=False, sorted=False).values


def _solve_ordered(M_padded: Tensor, rhs_padded: Tensor, order: Tensor) -> tuple[Tensor, Tensor]:
    """Solve ``M_SS x_S = rhs_S`` for each row ``p`` of ``order`` (``[P, size]``, from
    :func:`_ordered`), ``S`` the set of its indices other than the padding index ``m``, where ``M``
    is ``[m, m]`` (shared) or ``[c, m, m]`` (``P / c`` problems each), given as ``M_padded`` (a zero
    row and column appended), and ``rhs_padded`` is ``[P, m + 1]`` with zeros in its last column.
    Return ``x`` (``[P, m + 1]``, 0 off ``S``) and whether each factorisation failed; each system
    is ``size x size``, its padding slots decoupled with a unit diagonal."""
    P, size = order.shape
    if size == 0:
        return torch.zeros_like(rhs_padded), torch.zeros(P, dtype=torch.bool, device=order.device)
    # M_SS = R^T R: the upper factor is faster to compute than the lower one on the CPU (LAPACK).
    # M_SS is freed as soon as it is factorised (the peak memory of large batches).
    R, info = torch.linalg.cholesky_ex(_gathered_systems(M_padded, order), upper=True)
    # Two triangular solves: faster than cholesky_solve on large CPU batches.
    w = torch.linalg.solve_triangular(R.mT, rhs_padded.gather(-1, order).unsqueeze(-1), upper=False)
    x_S = torch.linalg.solve_triangular(R, w, upper=True).squeeze(-1)
    # The padding slots (all sent to index m) hold zeros.
    return torch.zeros_like(rhs_padded).scatter_(-1, order, x_S), info > 0


def _gathered_systems(M_padded: Tensor, order: Tensor) -> Tensor:
    """The ``[P, size, size]`` systems of :func:`_solve_ordered`: ``M_SS`` for the slots of each
    row of ``order``, with a unit diagonal in its padding slots (index ``n - 1`` of ``M_padded``,
    whose row and column are zeros)."""
    P, size = order.shape
    n = M_padded.shape[-1]
    c = 1 if M_padded.ndim == 2 else M_padded.shape[0]
    # Flat indices into M_padded: int32 when they fit (faster to build and to gather with).
    index = order.to(torch.int32 if c * n * n < 2**31 else torch.int64)
    # The column term first: the sum is then written in order (faster on the CPU).
    flat_index = index.unsqueeze(-2) + (index * n).unsqueeze(-1)
    if c > 1:
        owner = torch.arange(P, device=order.device, dtype=index.dtype) // (P // c)
        flat_index += (owner * (n * n)).view(P, 1, 1)
    M_SS = M_padded.flatten().index_select(0, flat_index.flatten()).view(P, size, size)
    M_SS.diagonal(dim1=-2, dim2=-1).add_(order == n - 1)
    return M_SS


def _read_sizes(unsolved: Tensor, F: Tensor, large: bool) -> list[int]:
    """Read on the host, in one synchronisation, the number of unsolved problems and, for large
    batches, the size of the largest free set of ``F`` (else 0)."""
    n_unsolved = unsolved.sum()
    if not large:
        return [int(n_unsolved), 0]
    return torch.stack([n_unsolved, F.sum(dim=-1).amax()]).tolist()


def _solution(u: Tensor, z: Tensor, y: Tensor) -> Tensor:
    """``v = u + z``, made NaN where ``y = A v`` holds a NaN."""
    return (u + z).add_(y.sum(dim=-1, keepdim=True), alpha=0.0)


def _guess_free_set(A: Tensor, neg_q: Tensor) -> Tensor:
    """Guess the free set of large problems from a few cheap iterations (one matrix product each)
    of projected Jacobi, ``z <- max(0, z - omega D^-1 (q + A z))`` with ``D = diag(A)`` and
    ``omega = 1 / lambda_max(D^-1 A)`` (estimated by power iteration), which decreases the
    objective. Any guess is valid: a good one saves factorisations."""
    m = A.shape[-1]
    P = neg_q.shape[0]
    d = A.diagonal(dim1=-2, dim2=-1)
    if A.ndim == 2:
        d = d.unsqueeze(0)  # [c, m], c = 1: one row per matrix
    c = d.shape[0]
    inv_sqrt_d = d.rsqrt()
    # Power iteration on D^-1/2 A D^-1/2 (same eigenvalues as D^-1 A), from the all-ones vector,
    # for each matrix.
    x = torch.ones_like(d)
    zeros = torch.zeros_like(d)
    for _ in range(_POWER_ITERATIONS):
        x = _add_product(zeros, x * inv_sqrt_d, A) * inv_sqrt_d
        x = x / torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    x = _add_product(zeros, x * inv_sqrt_d, A) * inv_sqrt_d
    step = 1.0 / (torch.linalg.vector_norm(x, dim=-1, keepdim=True) * d)  # [c, m]
    if c > 1:
        step = step.unsqueeze(1).expand(c, P // c, m).reshape(P, m)
    z = torch.zeros_like(neg_q)
    for _ in range(_JACOBI_ITERATIONS):
        z = (z + step * _add_product(neg_q, z, A, alpha=-1.0)).clamp_(min=0.0)
    return z > 0


def _compact_below(n_active: int, m: int) -> int:
    """Drop the solved problems when at most this many are unsolved.

    Dropping costs a dozen gathers: worth it for large systems as soon as one problem is solved,
    for many small ones when half of them are, never for a few small ones.
    """
    if m >= 32:
        return n_active - 1
    if n_active * m * m >= _COMPACT_FROM:
        return n_active // 2
    return -1


def _solve_free_set(
    A: Tensor, q: Tensor, F: Tensor, eye: Tensor | None, A_padded: Tensor | None, largest_free: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Solve ``A_FF z_F = -q_F`` with ``z = 0`` off ``F``, for each row of ``F`` at once; return
    ``z``, ``y = q + A z`` and whether each factorisation failed.

    For small batches (``eye`` is the identity), ``A_FF`` is padded with the identity to ``m x m``.
    For large ones, the systems are gathered from ``A_padded`` (``A`` with a zero row and column
    appended) to the size ``largest_free`` of the largest free set: gathering costs less than
    factorising ``m x m`` systems then.
    """
    if A_padded is None:  # a small batch: eye is the identity
        free_pairs = F.unsqueeze(-1) & F.unsqueeze(-2)
        if A.ndim == 2:
            M = torch.where(free_pairs, A, eye)
        else:
            c, m = A.shape[0], A.shape[-1]
            P = F.shape[0]
            M = torch.where(free_pairs.view(c, P // c, m, m), A.unsqueeze(1), eye).view(P, m, m)
        L, info = torch.linalg.cholesky_ex(M)
        z = torch.cholesky_solve((q * F).unsqueeze(-1), L).squeeze(-1).neg_()
        return z, _add_product(q, z, A), info > 0
    z, failed = _solve_gathered(A_padded, q, F, largest_free)
    z.neg_()  # A_FF z_F = -q_F
    return z, _add_product(q, z, A), failed


def _inverse_if_well_conditioned(A: Tensor) -> Tensor | None:
    """``A^{-1}`` for a shared float64 matrix whose condition number is below
    ``_MAX_CONDITION_FOR_INVERSE`` (bounded by ``tr(A) tr(A^{-1})``, one host read), else None."""
    if A.dtype != torch.float64:
        return None
    L, info = torch.linalg.cholesky_ex(A)
    H = torch.cholesky_inverse(L)
    bound = A.diagonal().sum() * H.diagonal().sum()
    # One host read (NaN, failing the test, when the factorisation failed).
    if not float(torch.where(info == 0, bound, torch.nan)) < _MAX_CONDITION_FOR_INVERSE:
        return None
    return H


def _zero_padded(M: Tensor) -> Tensor:
    """``M`` (``[..., m, m]``) with a row and a column of zeros appended."""
    return torch.nn.functional.pad(M, (0, 1, 0, 1))


def _solve_gathered(
    M_padded: Tensor, rhs: Tensor, F: Tensor, size: int, complement: bool = False
) -> tuple[Tensor, Tensor]:
    """Solve ``M_SS x_S = rhs_S`` with ``x = 0`` off ``S`` for each row of ``S`` (``[P, m]``),
    where ``S`` is ``F``, or its complement if ``complement``, and ``M`` is ``[m, m]`` (shared)
    or ``[c, m, m]`` (``P / c`` problems each), given as ``M_padded`` (a zero row and column
    appended); return ``x`` and whether each factorisation failed. Each system is gathered to
    ``size x size`` (``size`` at least the largest set ``S``), padded with the identity."""
    m = rhs.shape[-1]
    order = _ordered(~F if complement else F, size)
    x, failed = _solve_ordered(M_padded, _zero_padded_rows(rhs), order)
    return x[:, :m], failed
