"""MoCo: momentum-tracked task gradients, and weights tracked by projected gradient steps."""

from __future__ import annotations

import torch
from torch import Tensor

from torchjd._stateful import Stateful
from torchjd.aggregation._bases import Aggregator, NoGrad
from torchjd.aggregation._lazy_state import LazyStateMixin, warn_reinitialised
from torchjd.linalg._matrix import Matrix
from torchjd.linalg._simplex import project_onto_simplex


def _check_rate(name: str, value: float) -> float:
    if not 0.0 < value <= 1.0:
        raise ValueError(f"`{name}` must be in (0, 1], got {value!r}.")
    return value


def _check_non_negative(name: str, value: float) -> float:
    if not value >= 0.0:
        raise ValueError(f"`{name}` must be a number >= 0, got {value!r}.")
    return value


def _gramian_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half-precision states are multiplied in float32: their inner products overflow easily."""
    return torch.promote_types(dtype, torch.float32)


def _solver_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def _gramian_of(rows: Tensor) -> Tensor:
    wide = rows.to(_gramian_dtype(rows.dtype))
    return wide @ wide.T


def moco_weights_step(gramian: Tensor, weights: Tensor, gamma: float, rho: float) -> Tensor:
    r""":math:`\Pi_\Delta(\lambda - \gamma (Y Y^\top + \rho I) \lambda)`, from the Gramian
    :math:`Y Y^\top` of the tracked gradients and the weights :math:`\lambda`, in the dtype of
    the inputs."""
    step = gramian @ weights + rho * weights
    return project_onto_simplex(weights - gamma * step)


class MoCo(NoGrad, LazyStateMixin, Aggregator, Stateful):
    r"""MoCo, from `Mitigating Gradient Bias in Multi-objective Learning: A Provably Convergent
    Approach <https://openreview.net/forum?id=dLAYGdKTi2>`_ (Fernando et al., ICLR 2023),
    Algorithm 1.

    The stochastic task gradients :math:`g_i` (the rows of :math:`J`) are tracked by moving
    averages :math:`y_i`, stacked in :math:`Y`, and the weights :math:`\lambda` (uniform at
    first) follow one projected gradient step per call on :math:`\frac12 \|Y^\top
    \lambda\|^2 + \frac\rho2 \|\lambda\|^2`:

    .. math::

        y_i &\leftarrow y_i - \beta_k (y_i - g_i), \\
        \lambda &\leftarrow \Pi_\Delta\big(\lambda - \gamma_k (Y Y^\top + \rho I) \lambda\big), \\
        \mathcal A(J) &= Y^\top \lambda,

    at the ``k``-th call, with :math:`\beta_k = \beta k^{-\sigma_\beta}`,
    :math:`\gamma_k = \gamma k^{-\sigma_\gamma}` and :math:`\Pi_\Delta` the Euclidean projection
    onto the probability simplex. The first call sets :math:`y_i = g_i` (instead of averaging with
    an arbitrary :math:`Y_0`). The paper also projects :math:`y_i` onto a ball of radius the
    Lipschitz constant of the task; that bound is not known in practice and is not applied. The
    ``m x m`` step on :math:`\lambda` is computed in float64 (float32 on MPS) and cast back.

    **A matrix aggregator.** Its state :math:`Y` has the shape ``[m, n]`` of the Jacobian: it
    needs the Jacobian itself (the Gramian-first path refuses it) and keeps a state as large as
    the Jacobian. State: :math:`Y`, :math:`\lambda` and the call count, in the input's dtype,
    following its device; re-initialised (with a warning) when the shape or the dtype changes;
    :meth:`reset` forgets them. ``state_dict()`` of a used instance loads into a fresh one. Not
    differentiable (runs under :func:`torch.no_grad`).

    :param beta: the tracking rate :math:`\beta \in (0, 1]` (default ``0.5``); ``1`` tracks the
        current gradients only.
    :param beta_sigma: its decay :math:`\sigma_\beta \ge 0` with the call count (default
        ``0.5``).
    :param gamma: the step size :math:`\gamma > 0` of the weights (default ``0.1``).
    :param gamma_sigma: its decay :math:`\sigma_\gamma \ge 0` with the call count (default
        ``0.5``).
    :param rho: the regularisation :math:`\rho \ge 0` (default ``0.0``).

    >>> import torch
    >>> from torchjd.aggregation import MoCo
    >>> MoCo()(torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]))
    tensor([-4.,  1.,  1.])
    """

    _task_state = (("_tracked", 1, 0.0), ("_weights", 1, "mean"))

    _extra_state_names = ("_step",)

    def __init__(
        self,
        beta: float = 0.5,
        beta_sigma: float = 0.5,
        gamma: float = 0.1,
        gamma_sigma: float = 0.5,
        rho: float = 0.0,
    ) -> None:
        super().__init__()
        self.beta = beta
        self.beta_sigma = beta_sigma
        self.gamma = gamma
        self.gamma_sigma = gamma_sigma
        self.rho = rho
        self.register_buffer("_tracked", torch.empty(0), persistent=True)
        self.register_buffer("_weights", torch.empty(0), persistent=True)
        self._step = 0

    @property
    def beta(self) -> float:
        return self._beta

    @beta.setter
    def beta(self, value: float) -> None:
        self._beta = _check_rate("beta", value)

    @property
    def beta_sigma(self) -> float:
        return self._beta_sigma

    @beta_sigma.setter
    def beta_sigma(self, value: float) -> None:
        self._beta_sigma = _check_non_negative("beta_sigma", value)

    @property
    def gamma(self) -> float:
        return self._gamma

    @gamma.setter
    def gamma(self, value: float) -> None:
        if not value > 0.0:
            raise ValueError(f"`gamma` must be a number > 0, got {value!r}.")
        self._gamma = value

    @property
    def gamma_sigma(self) -> float:
        return self._gamma_sigma

    @gamma_sigma.setter
    def gamma_sigma(self, value: float) -> None:
        self._gamma_sigma = _check_non_negative("gamma_sigma", value)

    @property
    def rho(self) -> float:
        return self._rho

    @rho.setter
    def rho(self, value: float) -> None:
        self._rho = _check_non_negative("rho", value)

    def reset(self) -> None:
        """Forget the tracked gradients, the weights and the call count."""
        self._tracked = torch.empty(0)
        self._weights = torch.empty(0)
        self._step = 0

    def forward(self, matrix: Matrix, /) -> Tensor:
        m, n = matrix.shape
        if m == 0:
            return matrix.new_zeros(n)
        self._prepare_state(matrix)
        self._step += 1
        k = self._step
        if k == 1:
            self._tracked = matrix.clone()
        else:
            beta_k = self.beta * k ** (-self.beta_sigma)
            # y - beta_k (y - g), in place: the state is as large as the Jacobian.
            self._tracked.lerp_(matrix, beta_k)
        tracked = self._tracked
        solver = _solver_dtype(matrix.device)
        gamma_k = self.gamma * k ** (-self.gamma_sigma)
        weights = moco_weights_step(
            _gramian_of(tracked).to(solver), self._weights.to(solver), gamma_k, self.rho
        ).to(matrix.dtype)
        self._weights = weights
        return weights @ tracked

    def _prepare_state(self, matrix: Tensor) -> None:
        m = matrix.shape[0]
        if self._step > 0:
            old = (tuple(self._tracked.shape), self._tracked.dtype)
            if old == (tuple(matrix.shape), matrix.dtype):
                self._tracked = self._tracked.to(matrix.device)
                self._weights = self._weights.to(matrix.device)
                return
            warn_reinitialised(
                type(self).__name__,
                f"shape {old[0]} in {old[1]}",
                f"shape {tuple(matrix.shape)} in {matrix.dtype}",
            )
            self._step = 0
        self._weights = torch.full((m,), 1.0 / m, dtype=matrix.dtype, device=matrix.device)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(beta={self.beta!r}, beta_sigma={self.beta_sigma!r}, "
            f"gamma={self.gamma!r}, gamma_sigma={self.gamma_sigma!r}, rho={self.rho!r})"
        )
