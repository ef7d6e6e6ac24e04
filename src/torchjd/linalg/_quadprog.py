"""Dual-cone projection with the ``quadprog`` solver (optional dependency)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from torchjd._optional import require
from torchjd._precision import promoted
from torchjd.linalg._gramian import normalize, regularize
from torchjd.linalg._matrix import PSDMatrix
from torchjd.linalg._nonfinite import finite_part
from torchjd.linalg._projector import NormalizingProjector, check_projection_shapes

if TYPE_CHECKING:
    import numpy as np


class QuadprogProjector(NormalizingProjector):
    r"""Projects onto the dual cone by solving one quadratic program per vector with ``quadprog``.

    For every vector :math:`u` along the last axis of ``U``, returns

    .. math:: w = \arg\min_{v \succeq u} \tfrac12 v^\top \hat G v,
        \qquad \hat G = \mathrm{normalize}(G) + \varepsilon_{\text{reg}} I,

    where :math:`\mathrm{normalize}(G) = G / \operatorname{tr}(G)`, or the zero matrix when
    :math:`\operatorname{tr}(G) <` ``norm_eps`` (then :math:`w = \max(u, 0)`). Normalising makes the
    weights invariant to the scale of ``G`` (:math:`\operatorname{tr}(J J^\top) = \|J\|_F^2`);
    regularising makes :math:`\hat G` positive definite, as the solver requires, at the price of an
    :math:`O(\varepsilon_{\text{reg}})` error. By Proposition 1 of `Jacobian Descent for
    Multi-Objective Optimization <https://arxiv.org/abs/2406.16232>`_, :math:`J^\top w` is the
    projection of :math:`J^\top u` onto the dual cone :math:`\{x : J x \succeq 0\}` when
    :math:`G = J J^\top`.

    :math:`\hat G` is computed in ``G``'s dtype, then each problem is solved on the CPU in float64
    by ``qpsolvers.solve_qp(..., solver="quadprog")`` with the constraints written
    :math:`-I v \preceq -u`; the result is returned in ``G``'s dtype and on its device, with
    ``U``'s shape, and is not differentiable. A problem the solver cannot solve (it happens with
    huge unnormalised values) raises a ``ValueError``. A Gramian of trace 0 gives the zero matrix
    even when ``norm_eps`` is 0 (instead of dividing by zero).

    Needs the optional packages ``numpy``, ``qpsolvers`` and ``quadprog``
    (``pip install "torchjd[quadprog_projector]"``); constructing the projector without them
    raises an ``ImportError``. :class:`~torchjd.linalg.BlockPivotingProjector` computes the same
    weights in torch, with no optional dependency.

    :param norm_eps: non-negative threshold on :math:`\operatorname{tr}(G)` below which the
        normalised Gramian is the zero matrix. Default ``0.0001``.
    :param reg_eps: non-negative multiple of the identity added to the normalised Gramian. Default
        ``0.0001``.
    """

    def __init__(self, *, norm_eps: float = 0.0001, reg_eps: float = 0.0001) -> None:
        require("QuadprogProjector", ("numpy", "qpsolvers", "quadprog"), "quadprog_projector")
        super().__init__(norm_eps=norm_eps, reg_eps=reg_eps)

    def __call__(self, U: Tensor, G: PSDMatrix) -> Tensor:
        """Return ``W`` of ``U``'s shape, in ``G``'s dtype and on its device, with ``W[..., :]``
        the solution of the dual-cone problem for ``U[..., :]``.

        :param U: tensor of shape ``[..., m]``.
        :param G: symmetric positive semi-definite matrix of shape ``[m, m]``.
        """
        import numpy as np

        check_projection_shapes(U, G)
        m = G.shape[0]
        with torch.no_grad():
            # Non-finite values would be hidden by the trace threshold (NaN < eps is False) or
            # make quadprog fail: the weights are NaN instead.
            dtype = G.dtype
            # A half-precision Gramian is normalised in float32 (its trace may overflow).
            G, nan_where_non_finite = finite_part(promoted(G))
            eps = max(self.norm_eps, torch.finfo(G.dtype).tiny)  # never divide by a zero trace
            G_hat = regularize(normalize(G, eps), self.reg_eps)
            G_np = G_hat.cpu().to(torch.float64).numpy()
            U_np = U.detach().cpu().to(torch.float64).numpy().reshape(-1, m)
            W_np = np.zeros_like(U_np)
            for i, u in enumerate(U_np):
                W_np[i] = _project_one(G_np, u)
            W = torch.from_numpy(W_np).to(dtype=G.dtype, device=G.device) + nan_where_non_finite
            return W.to(dtype=dtype).reshape(U.shape)


def _project_one(G: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Solve ``min_v 1/2 v^T G v`` subject to ``v >= u`` with quadprog (no normalisation)."""
    import numpy as np
    from qpsolvers import solve_qp
    from qpsolvers.exceptions import QPError

    m = G.shape[0]
    try:
        v = solve_qp(G, np.zeros(m), -np.eye(m), -u, solver="quadprog")
    except (QPError, ValueError) as error:
        raise ValueError(
            f"quadprog could not project onto the dual cone ({error}): `G` must be positive "
            "definite; use a positive `reg_eps`."
        ) from error
    if v is None:
        raise ValueError(
            "quadprog found no solution when projecting onto the dual cone; this happens with "
            "huge unnormalised Gramians: keep `norm_eps` small so that `G` is normalised."
        )
    return v
