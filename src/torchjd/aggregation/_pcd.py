import math
import numbers

import torch
from torch import Tensor

from torchjd._stateful import Stateful
from torchjd.aggregation._bases import Forwarded, GramianWeightedAggregator, NoGrad, Weighting
from torchjd.aggregation._lazy_state import LazyStateMixin, warn_reinitialised
from torchjd.linalg._matrix import PSDMatrix

_QP_TOL = 1e-9


def _solve_priority_qp(g_hat: Tensor, tau: Tensor, dependence_tol: float) -> Tensor:
    r"""Multipliers ``[1, mu_2, ..., mu_m]`` of :math:`\min_d \frac12 \|d - \tilde g_1\|^2` s.t.
    :math:`\tilde g_j^\top d \ge \tau_j \|\tilde g_j\|^2`, from the Gramian of the
    :math:`\tilde g_i`.

    Dual active-set method (D. Goldfarb and A. Idnani, *A numerically stable dual method for
    solving strictly convex quadratic programs*, Math. Programming 27, 1983) with identity Hessian,
    written on the dual :math:`\min_{\mu \ge 0} \frac12 \mu^\top G_s \mu - b^\top \mu`, where
    :math:`G_s` is the Gramian of the secondary rows and :math:`b_j = \tau_j G_{s,jj} - \hat
    G_{j0}`: constraints are added one at a time (the most violated first), dropping active ones
    whose multiplier would become negative. Sequential, on CPU float64. Returns ``[1, 0, ..., 0]``
    when ``m = 1`` or the constraints are infeasible.
    """
    m = g_hat.shape[0]
    result = torch.zeros(m, dtype=torch.float64)
    result[0] = 1.0
    if m == 1:
        return result
    gs = g_hat[1:, 1:]
    b = tau * gs.diagonal() - g_hat[1:, 0]
    mu = torch.zeros(m - 1, dtype=torch.float64)
    active: list[int] = []
    atol = _QP_TOL * max(float(g_hat.diagonal().max()), torch.finfo(torch.float64).tiny)
    budget = 10 * m
    iterations = 0

    while iterations < budget:
        slack = gs @ mu - b
        if active:
            slack[active] = 0.0
        p = int(torch.argmin(slack))
        violation = float(slack[p])
        if violation >= -atol:
            break
        while iterations < budget:  # try to add constraint p, dropping blocking ones
            iterations += 1
            gs_pp = float(gs[p, p])
            if active:
                r = torch.linalg.solve(gs[active][:, active], gs[active, p])
                z2 = gs_pp - float(gs[p, active] @ r)
                ratios = torch.where(r > 0, mu[active] / r, torch.full_like(r, math.inf))
                k = int(torch.argmin(ratios))
                partial = float(ratios[k])
            else:
                r = torch.zeros(0, dtype=torch.float64)
                z2 = gs_pp
                k, partial = -1, math.inf
            full = -violation / z2 if z2 > dependence_tol * gs_pp else math.inf
            step = min(partial, full)
            if math.isinf(step):  # the constraints are infeasible
                return result
            if active:
                mu[active] -= step * r
            mu[p] += step
            if full <= partial:
                active.append(p)
                break
            mu[active[k]] = 0.0
            active.pop(k)
            violation = float(gs[p] @ mu - b[p])

    result[1:] = mu.clamp(min=0.0)
    return result


def _check_tau(tau: float | Tensor) -> None:
    if isinstance(tau, Tensor):
        if tau.ndim != 1:
            raise ValueError(
                "`tau` must be a number or a vector (a tensor of dimension 1), got a tensor of "
                f"shape {tuple(tau.shape)}."
            )
        if not bool(((tau >= 0) & (tau <= 1)).all()):
            raise ValueError(f"Every entry of `tau` must be in [0, 1], got {tau!r}.")
    elif isinstance(tau, bool) or not isinstance(tau, numbers.Real) or not 0 <= tau <= 1:
        raise ValueError(f"`tau` must be in [0, 1] (or a vector of such values), got {tau!r}.")


class PCDWeighting(LazyStateMixin, Weighting[PSDMatrix], Stateful):
    r"""Weights of Priority-Constrained Descent (PCD): improve the primary objective (row 0) as
    much as possible while guaranteeing some progress on each secondary objective.

    From `Not All Objectives Are Born Equal: Priority-Constrained Descent for Hierarchical
    Multi-Objective Optimization <https://arxiv.org/abs/2606.29521>`_ (TMLR 2026; reference code
    `github.com/DaraVaram/priority-constrained-descent
    <https://github.com/DaraVaram/priority-constrained-descent>`_). Not symmetric in the rows:
    row 0 is the primary objective, rows 1 to m-1 are secondary.

    With normalised rows :math:`\tilde g_i = s_i g_i`, where :math:`s_i = 1/\sqrt{\hat v_i +
    \mathrm{eps}}` and :math:`\hat v` is a bias-corrected exponential moving average (factor
    ``beta``) of the squared row norms :math:`q = \mathrm{diag}(G)`, PCD solves

    .. math::

        \tilde d = \arg\min_d \tfrac12 \|d - \tilde g_1\|^2 \quad \text{s.t.} \quad
        \tilde g_j^\top d \ge \tau_j \|\tilde g_j\|^2, \ j = 2, \dots, m

    and returns :math:`\tilde d \, \|g_1\| / \|\tilde d\|`. By the KKT conditions
    :math:`\tilde d = \tilde g_1 + \sum_j \mu_j \tilde g_j` with :math:`\mu \ge 0`, so the weights
    are :math:`w = [1, \mu_2, \dots, \mu_m] \odot s \cdot \|g_1\| / \|\tilde d\|`, computed from the
    Gramian only. The QP is solved exactly by a dual active-set method (Goldfarb and Idnani, 1983).

    Special cases: :math:`g_1 = 0` gives zero weights; infeasible constraints (e.g. two opposite
    secondary rows) give :math:`[1, 0, \dots, 0] \odot s \cdot \|g_1\|/\|\tilde g_1\|`, i.e. the
    output :math:`g_1`; :math:`\tilde d = 0` up to rounding (relative ``10 * eps`` of the input
    dtype) gives zero weights; a Gramian containing NaN or infinity gives NaN weights and leaves the
    state untouched; ``m = 0`` gives an empty vector.

    :param tau: the required relative progress :math:`\tau_j` of each secondary objective: a number
        in ``[0, 1]`` or a vector of ``m - 1`` such numbers (default ``0.02``).
    :param beta: the factor of the moving average of the squared norms, in ``[0, 1)`` (default
        ``0.999``).
    :param eps: added to :math:`\hat v` before the square root, ``>= 0`` (default ``1e-8``).

    State: the moving average :math:`v` (float64, on the input's device) and the step count,
    re-initialised (with a warning) when the number of rows changes; :meth:`reset` clears them.
    Runs under :func:`torch.no_grad`. The active-set solver is sequential: the Gramian is copied
    to the CPU in float64 once per call (a host synchronisation), and the weights are cast back to
    the input's dtype and device.
    """

    _task_vectors = ("tau",)
    _task_state = (("_ema", 1, 0.0),)

    _extra_state_names = ("_step",)

    def __init__(self, tau: float | Tensor = 0.02, beta: float = 0.999, eps: float = 1e-8) -> None:
        super().__init__()
        self.tau = tau
        self.beta = beta
        self.eps = eps
        self.register_buffer("_ema", torch.empty(0, dtype=torch.float64), persistent=True)
        self._step = 0

    @property
    def tau(self) -> float | Tensor:
        return self._tau

    @tau.setter
    def tau(self, value: float | Tensor) -> None:
        _check_tau(value)
        self._tau = value

    @property
    def beta(self) -> float:
        return self._beta

    @beta.setter
    def beta(self, value: float) -> None:
        if not 0 <= value < 1:
            raise ValueError(f"`beta` must be in [0, 1), got {value!r}.")
        self._beta = value

    @property
    def eps(self) -> float:
        return self._eps

    @eps.setter
    def eps(self, value: float) -> None:
        if not value >= 0:
            raise ValueError(f"`eps` must be >= 0, got {value!r}.")
        self._eps = value

    def reset(self) -> None:
        self._ema = torch.empty(0, dtype=torch.float64)
        self._step = 0

    def _resolve_tau(self, m: int) -> Tensor:
        if isinstance(self.tau, Tensor):
            if self.tau.shape[0] != m - 1:
                raise ValueError(
                    f"`tau` has {self.tau.shape[0]} entries but the input has {m} rows: give one "
                    f"value per secondary objective ({m - 1})."
                )
            return self.tau.detach().to(device="cpu", dtype=torch.float64)
        return torch.full((m - 1,), float(self.tau), dtype=torch.float64)

    @torch.no_grad()
    def forward(self, stat: Tensor, /) -> Tensor:
        m = stat.shape[0]
        if m == 0:
            return torch.zeros(0, dtype=stat.dtype, device=stat.device)
        tau = self._resolve_tau(m)
        if not bool(torch.isfinite(stat).all()):
            return torch.full((m,), math.nan, dtype=stat.dtype, device=stat.device)

        gramian = stat.to(dtype=torch.float64)
        squared_norms = gramian.diagonal()
        if self._ema.numel() != m:
            if self._ema.numel() > 0:
                warn_reinitialised(type(self).__name__, f"{self._ema.numel()} rows", f"{m} rows")
            self._ema = torch.zeros(m, dtype=torch.float64, device=stat.device)
            self._step = 0
        self._step += 1
        ema = self.beta * self._ema.to(stat.device) + (1 - self.beta) * squared_norms
        self._ema = ema
        denominator = torch.sqrt(ema / (1 - self.beta**self._step) + self.eps)
        safe = torch.where(denominator > 0, denominator, torch.ones_like(denominator))
        s = torch.where(denominator > 0, 1.0 / safe, torch.zeros_like(denominator))

        gramian, s = gramian.cpu(), s.cpu()
        weights = torch.zeros(m, dtype=torch.float64)
        primary = float(gramian[0, 0])
        if primary > 0:
            precision = 10 * torch.finfo(stat.dtype).eps
            g_hat = gramian * torch.outer(s, s)
            u = _solve_priority_qp(g_hat, tau, max(_QP_TOL, precision))
            norm2 = float(u @ g_hat @ u)
            magnitude = float((u.abs() * g_hat.diagonal().clamp(min=0).sqrt()).sum()) ** 2
            if norm2 > precision * magnitude:
                weights = u * s * math.sqrt(primary / norm2)
        return weights.to(dtype=stat.dtype, device=stat.device)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(tau={self.tau!r}, beta={self.beta!r}, eps={self.eps!r})"


class PCD(NoGrad, GramianWeightedAggregator, Stateful):
    r"""Priority-Constrained Descent: the update closest to the primary gradient (row 0) that
    still makes some progress on every secondary objective (rows 1 to m-1), rescaled to the norm
    of the primary gradient. See :class:`PCDWeighting` for the definition.

    From `Not All Objectives Are Born Equal: Priority-Constrained Descent for Hierarchical
    Multi-Objective Optimization <https://arxiv.org/abs/2606.29521>`_ (TMLR 2026).

    :param tau: the required relative progress of each secondary objective: a number in ``[0, 1]``
        or a vector of ``m - 1`` such numbers (default ``0.02``).
    :param beta: the factor of the moving average of the squared norms, in ``[0, 1)`` (default
        ``0.999``).
    :param eps: added under the square root of the normalisation, ``>= 0`` (default ``1e-8``).

    Stateful (moving average of the squared row norms); not differentiable.

    >>> import torch
    >>> from torchjd.aggregation import PCD
    >>> PCD()(torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]))
    tensor([-0.8200,  2.9434,  2.9434])
    """

    def __init__(self, tau: float | Tensor = 0.02, beta: float = 0.999, eps: float = 1e-8) -> None:
        super().__init__(PCDWeighting(tau, beta, eps))

    tau = Forwarded[float | Tensor]()
    beta = Forwarded[float]()
    eps = Forwarded[float]()

    def reset(self) -> None:
        self.gramian_weighting.reset()
