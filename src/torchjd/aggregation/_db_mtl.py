"""DB-MTL: logarithm of the losses, then every task's smoothed gradient scaled to the largest."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from torchjd._stateful import Stateful
from torchjd.aggregation._bases import Aggregator, NoGrad
from torchjd.aggregation._lazy_state import LazyStateMixin, warn_reinitialised
from torchjd.aggregation._losses import LossesInputMixin
from torchjd.linalg._matrix import Matrix


def _check_beta(value: float) -> float:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"`beta` must be in [0, 1], got {value!r}.")
    return value


def _check_non_negative(name: str, value: float) -> float:
    if not value >= 0.0:
        raise ValueError(f"`{name}` must be a number >= 0, got {value!r}.")
    return value


def balance_to_largest_norm(rows: Tensor) -> Tensor:
    r"""The weights :math:`\max_j \|\hat g_j\| / \|\hat g_i\|` (0 for a zero row), so that each
    row of ``weights[:, None] * rows`` has the largest row norm."""
    # At least float32: the norm of a half-precision row can overflow its dtype.
    wide = torch.promote_types(rows.dtype, torch.float32)
    norms = torch.linalg.vector_norm(rows, dim=1, dtype=wide)
    largest = norms.max()
    weights = torch.where(norms > 0, largest / torch.where(norms > 0, norms, 1.0), 0.0)
    return weights.to(rows.dtype)


class DBMTL(NoGrad, LossesInputMixin, LazyStateMixin, Aggregator, Stateful):
    r"""Dual-Balancing Multi-Task Learning, from `Dual-Balancing for Multi-Task Learning
    <https://arxiv.org/abs/2308.12029>`_ (Lin et al., 2023).

    Two balancings. **Loss scale:** each loss :math:`L_i` is replaced by :math:`\log(L_i +
    \epsilon)`, whose gradient is :math:`g_i / (L_i + \epsilon)` (row :math:`g_i` of the Jacobian
    of the raw losses), so the method does not depend on the losses' scales. **Gradient
    magnitude:** these gradients are smoothed by an exponential moving average **of the gradients**
    across calls, as in the paper,

    .. math:: \hat g_i \leftarrow \beta_k \hat g_i + (1 - \beta_k) \frac{g_i}{L_i + \epsilon},
        \qquad \beta_k = \beta\, k^{-\sigma}

    at the ``k``-th call (the first call sets :math:`\hat g_i` to its gradient, instead of
    averaging it with zeros), and every smoothed gradient is scaled to the largest norm:

    .. math:: \mathcal A(J) = \sum_i \frac{\max_j \|\hat g_j\|}{\|\hat g_i\|}\, \hat g_i

    (a zero :math:`\hat g_i` contributes nothing).

    **Losses.** Give the current loss values (one per row, in the order of the rows) with
    :meth:`update_losses` before each call; a call without them, or with a wrong number of them,
    raises ``ValueError``. They should be positive (the logarithm's domain): a loss of 0 is only
    saved by :math:`\epsilon`.

    **A matrix aggregator.** Its state :math:`\hat G` has the shape ``[m, n]`` of the Jacobian:
    it needs the Jacobian itself, so it cannot run from the Gramian alone (the Gramian-first path
    refuses it), and it keeps a state as large as the Jacobian. State: :math:`\hat G`, the call
    count and the pending losses, in the input's dtype, following its device; re-initialised
    (with a warning) when the shape or the dtype changes; :meth:`reset` forgets them.
    ``state_dict()`` of a used instance loads into a fresh one. Not differentiable (runs under
    :func:`torch.no_grad`).

    :param beta: the EMA rate :math:`\beta \in [0, 1]`, the weight of the past (default ``0.9``);
        ``0`` uses the current gradients only.
    :param beta_sigma: the decay :math:`\sigma \ge 0` of the rate with the call count (default
        ``0.5``); ``0`` keeps the rate constant.
    :param eps: :math:`\epsilon \ge 0` added to the losses inside the logarithm (default
        ``1e-8``).

    >>> import torch
    >>> from torchjd.aggregation import DBMTL
    >>> aggregator = DBMTL()
    >>> aggregator.update_losses(torch.tensor([2.0, 1.0]))
    >>> aggregator(torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]))
    tensor([0.1881, 2.4530, 2.4530])
    """

    _task_state = (("_gradients", 1, 0.0), ("_losses", 1, 0.0))

    _extra_state_names = ("_step",)

    def __init__(self, beta: float = 0.9, beta_sigma: float = 0.5, eps: float = 1e-8) -> None:
        super().__init__()
        self.beta = beta
        self.beta_sigma = beta_sigma
        self.eps = eps
        self.register_buffer("_gradients", torch.empty(0), persistent=True)
        self._register_losses_buffer()
        self._step = 0

    @property
    def beta(self) -> float:
        return self._beta

    @beta.setter
    def beta(self, value: float) -> None:
        self._beta = _check_beta(value)

    @property
    def beta_sigma(self) -> float:
        return self._beta_sigma

    @beta_sigma.setter
    def beta_sigma(self, value: float) -> None:
        self._beta_sigma = _check_non_negative("beta_sigma", value)

    @property
    def eps(self) -> float:
        return self._eps

    @eps.setter
    def eps(self, value: float) -> None:
        self._eps = _check_non_negative("eps", value)

    def update_losses(self, losses: Tensor | Sequence[Tensor]) -> None:
        """Give the loss values of the current step, one per objective (row of the Jacobian), in
        the order of the rows. Call it before each aggregation: the values are used by the next
        call only."""
        super().update_losses(losses)

    def reset(self) -> None:
        """Forget the smoothed gradients, the call count and any pending losses."""
        self._gradients = torch.empty(0)
        self._losses = torch.empty(0)
        self._step = 0

    def forward(self, matrix: Matrix, /) -> Tensor:
        m, n = matrix.shape
        losses = self._take_losses(m, matrix)
        if m == 0:
            return matrix.new_zeros(n)
        inverse_losses = (losses + self.eps).reciprocal().unsqueeze(1)  # d log(L + eps) / dL
        self._prepare_state(matrix)
        self._step += 1
        if self._step == 1:
            self._gradients = matrix * inverse_losses
        else:
            rate = self.beta * self._step ** (-self.beta_sigma)  # beta_k
            # In place and without an [m, n] temporary: the state is as large as the Jacobian.
            self._gradients.mul_(rate).addcmul_(matrix, inverse_losses, value=1.0 - rate)
        return balance_to_largest_norm(self._gradients) @ self._gradients

    def _prepare_state(self, matrix: Tensor) -> None:
        if self._gradients.numel() == 0 and self._step == 0:
            return
        old = (tuple(self._gradients.shape), self._gradients.dtype)
        if old == (tuple(matrix.shape), matrix.dtype):
            self._gradients = self._gradients.to(matrix.device)
            return
        warn_reinitialised(
            type(self).__name__,
            f"shape {old[0]} in {old[1]}",
            f"shape {tuple(matrix.shape)} in {matrix.dtype}",
        )
        self._gradients = torch.empty(0)
        self._step = 0

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(beta={self.beta!r}, beta_sigma={self.beta_sigma!r}, "
            f"eps={self.eps!r})"
        )
