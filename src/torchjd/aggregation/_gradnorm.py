"""GradNorm: loss weights trained so that the weighted gradient norms follow the training rates."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor

from torchjd._stateful import Stateful
from torchjd.aggregation._bases import Forwarded, GramianWeightedAggregator, NoGrad, Weighting
from torchjd.aggregation._lazy_state import LazyStateMixin, warn_reinitialised
from torchjd.aggregation._losses import LossesInputMixin
from torchjd.linalg._matrix import PSDMatrix

_STATE = ("_weights", "_initial_losses")


def _check_alpha(value: float) -> float:
    if not value >= 0.0:
        raise ValueError(f"`alpha` must be a number >= 0, got {value!r}.")
    return value


def _check_lr(value: float) -> float:
    if not value > 0.0:
        raise ValueError(f"`lr` must be a number > 0, got {value!r}.")
    return value


def gradnorm_step(
    weights: Tensor,
    norms: Tensor,
    losses: Tensor,
    initial_losses: Tensor,
    alpha: float | Tensor,
    lr: float | Tensor,
) -> Tensor:
    r"""GradNorm's next loss weights (Chen et al., 2018, Eq. 2 and Algorithm 1), for vectors
    ``[..., m]`` (``alpha`` and ``lr`` floats or of shape ``[..., 1]``).

    :math:`G_i = w_i \|\nabla L_i\|`, :math:`\bar G = \frac1m \sum_i G_i`,
    :math:`\tilde L_i = L_i / L_i(0)`, :math:`r_i = \tilde L_i / \frac1m \sum_j \tilde L_j`; the
    gradient of :math:`L_{grad} = \sum_i |G_i - \bar G r_i^\alpha|` with respect to :math:`w_i`,
    the target :math:`\bar G r_i^\alpha` held constant as in the paper, is
    :math:`\mathrm{sign}(G_i - \bar G r_i^\alpha) \|\nabla L_i\|`. One gradient step of size
    ``lr``, then the weights are clamped at 0 and renormalised to sum to ``m`` (back to ones if
    they all reach 0). A task whose initial loss is 0 counts as training at rate 1 (and all do if
    the mean rate is 0), so the result stays finite.
    """
    m = weights.shape[-1]
    ratios = torch.where(initial_losses > 0, losses / initial_losses, 1.0)  # L~_i
    mean_ratio = ratios.mean(dim=-1, keepdim=True)
    rates = torch.where(mean_ratio > 0, ratios / mean_ratio, 1.0)  # r_i
    weighted_norms = weights * norms  # G_i
    targets = weighted_norms.mean(dim=-1, keepdim=True) * rates.pow(alpha)  # G_bar r_i^alpha
    gradient = torch.sign(weighted_norms - targets) * norms
    stepped = (weights - lr * gradient).clamp(min=0.0)
    total = stepped.sum(dim=-1, keepdim=True)
    scale = m / total.clamp(min=torch.finfo(total.dtype).tiny)
    return torch.where(total > 0, stepped * scale, 1.0)


class GradNormWeighting(NoGrad, LossesInputMixin, LazyStateMixin, Weighting[PSDMatrix], Stateful):
    r"""Weighting of :class:`GradNorm`: the current loss weights :math:`w` (ones at first), read
    from the Gramian :math:`G = J J^\top` and the loss values, then trained one step.

    The task gradient norms are :math:`\|\nabla L_i\| = \sqrt{G_{ii}}`, so the weighting needs the
    Gramian only and no extra backward pass: it works through
    :func:`~torchjd.autojac.jac_to_grad`, with grouping and on the Gramian-first path
    (``torchjd.autogram``). The norms are those of the parameters whose Gramian it receives: the
    shared parameters given to ``jac_to_grad``, or, as the paper does, the last shared layer
    (weigh the Gramian of that layer, and apply the weights to the whole Jacobian).

    Each call: returns the current weights :math:`w(t)`, then takes one gradient step on
    :math:`L_{grad} = \sum_i |w_i \|\nabla L_i\| - \bar G\, r_i^\alpha|` (targets held constant),
    with :math:`\bar G` the mean weighted norm and :math:`r_i` the relative inverse training rate
    :math:`\frac{L_i(t)/L_i(0)}{\frac1m\sum_j L_j(t)/L_j(0)}`, and renormalises the weights to sum
    to :math:`m`. The first call's losses are the initial losses :math:`L_i(0)`.

    **Deviation from the paper.** The paper trains the weights with the model's optimiser; here
    they are trained inside the weighting, by plain gradient descent with its own step size
    ``lr``, and clamped at 0 before the renormalisation (so a large step cannot make a weight
    negative).

    **Losses.** Give the current loss values (one per row, in the order of the rows) with
    :meth:`update_losses` before each call; a call without them, or with a wrong number of them,
    raises ``ValueError``.

    State: the weights and the initial losses (``[m]``, in the input's dtype, float32 for a
    half-precision input, following its device), and the pending losses. They are re-initialised
    (with a warning) when ``m`` or the dtype changes; :meth:`reset` forgets them. ``state_dict()``
    of a used instance loads into a fresh one. Not differentiable (runs under
    :func:`torch.no_grad`).

    :param alpha: the asymmetry :math:`\alpha \ge 0` (default ``1.5``); ``0`` pulls every weighted
        norm to the mean, whatever the training rates.
    :param lr: the step size ``> 0`` of the weights' gradient descent (default ``0.025``).
    """

    _task_state = (("_weights", 1, 1.0), ("_initial_losses", 1, "mean"), ("_losses", 1, 0.0))

    def __init__(self, alpha: float = 1.5, lr: float = 0.025) -> None:
        super().__init__()
        self.alpha = alpha
        self.lr = lr
        for name in _STATE:
            self.register_buffer(name, torch.empty(0), persistent=True)
        self._register_losses_buffer()

    @property
    def alpha(self) -> float:
        return self._alpha

    @alpha.setter
    def alpha(self, value: float) -> None:
        self._alpha = _check_alpha(value)

    @property
    def lr(self) -> float:
        return self._lr

    @lr.setter
    def lr(self, value: float) -> None:
        self._lr = _check_lr(value)

    def update_losses(self, losses: Tensor | Sequence[Tensor]) -> None:
        """Give the loss values of the current step, one per objective (row of the Jacobian), in
        the order of the rows. Call it before each aggregation: the values are used by the next
        call only."""
        super().update_losses(losses)

    def reset(self) -> None:
        """Forget the weights, the initial losses and any pending losses."""
        for name in (*_STATE, "_losses"):
            setattr(self, name, torch.empty(0))

    def forward(self, stat: Tensor, /) -> Tensor:
        m = stat.shape[0]
        losses = self._take_losses(m, stat)
        self._prepare_state(m, stat, losses)
        weights = self._weights
        # The m-vector update in float64 (float32 on MPS), where its divisions stay accurate in
        # any input dtype; the state keeps the input's dtype (float32 for half precision).
        solver = torch.float32 if stat.device.type == "mps" else torch.float64
        norms = stat.diagonal().to(solver).clamp(min=0.0).sqrt()
        self._weights = gradnorm_step(
            weights.to(solver),
            norms,
            losses.to(solver),
            self._initial_losses.to(solver),
            self.alpha,
            self.lr,
        ).to(stat.dtype)
        return weights

    @classmethod
    @torch.no_grad()
    def _forward_grouped(cls, weightings: Sequence[GradNormWeighting], gramians: Tensor) -> Tensor:
        """Weights ``[b, m]`` of Gramians ``[b, m, m]``, the ``k``-th one weighted by
        ``weightings[k]`` with its own state and pending losses, as ``b`` successive calls would;
        each instance's state is updated. The instances must be distinct."""
        b, m = gramians.shape[0], gramians.shape[-1]
        if len(weightings) != b:
            raise ValueError(
                f"Got {len(weightings)} weightings for {b} Gramians: give one weighting per "
                "Gramian."
            )
        if b == 0:
            return gramians.new_zeros(0, m)
        like = gramians[0]
        for weighting in weightings:  # all checked before any state changes
            weighting._check_pending_losses(m)
        losses = [w._take_losses(m, like) for w in weightings]
        for weighting, values in zip(weightings, losses):
            weighting._prepare_state(m, like, values)
        weights = torch.stack([w._weights for w in weightings])
        solver = torch.float32 if gramians.device.type == "mps" else torch.float64
        per_group = {"dtype": solver, "device": gramians.device}
        new_weights = gradnorm_step(
            weights.to(solver),
            gramians.diagonal(dim1=-2, dim2=-1).to(solver).clamp(min=0.0).sqrt(),
            torch.stack(losses).to(solver),
            torch.stack([w._initial_losses for w in weightings]).to(solver),
            torch.tensor([[w.alpha] for w in weightings], **per_group),
            torch.tensor([[w.lr] for w in weightings], **per_group),
        ).to(gramians.dtype)
        for weighting, row in zip(weightings, new_weights):
            weighting._weights = row.clone()
        return weights

    def _prepare_state(self, m: int, stat: Tensor, losses: Tensor) -> None:
        if self._weights.numel() > 0:
            old = (self._weights.shape[0], self._weights.dtype)
            if old == (m, stat.dtype):
                self._weights = self._weights.to(stat.device)
                self._initial_losses = self._initial_losses.to(stat.device)
                return
            warn_reinitialised(
                type(self).__name__, f"{old[0]} rows in {old[1]}", f"{m} rows in {stat.dtype}"
            )
        self._weights = torch.ones(m, dtype=stat.dtype, device=stat.device)
        self._initial_losses = losses.clone()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(alpha={self.alpha!r}, lr={self.lr!r})"


class GradNorm(NoGrad, GramianWeightedAggregator, Stateful):
    r"""GradNorm, from `GradNorm: Gradient Normalization for Adaptive Loss Balancing in Deep
    Multitask Networks <https://arxiv.org/abs/1711.02257>`_ (Chen et al., ICML 2018).

    Returns :math:`\sum_i w_i g_i` with loss weights :math:`w` trained across calls so that the
    weighted gradient norms :math:`w_i \|g_i\|` follow the tasks' relative training rates
    :math:`r_i^\alpha`, :math:`r_i \propto L_i(t) / L_i(0)`: a task that trains slowly gets a
    larger weight. The weights start at 1 and always sum to :math:`m`. Computed from the Gramian
    by :class:`GradNormWeighting` (see there for the update, the deviation from the paper and the
    state); stateful and not differentiable.

    Needs the loss values: call :meth:`update_losses` with the current losses (one per row)
    before each aggregation, e.g. before :func:`~torchjd.autojac.jac_to_grad`.

    :param alpha: the asymmetry :math:`\alpha \ge 0` (default ``1.5``).
    :param lr: the step size ``> 0`` of the weights' gradient descent (default ``0.025``).

    >>> import torch
    >>> from torchjd.aggregation import GradNorm
    >>> aggregator = GradNorm()
    >>> aggregator.update_losses(torch.tensor([1.0, 2.0]))
    >>> aggregator(torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]))
    tensor([2., 2., 2.])
    """

    requires_losses: ClassVar[bool] = True

    def __init__(self, alpha: float = 1.5, lr: float = 0.025) -> None:
        super().__init__(GradNormWeighting(alpha=alpha, lr=lr))

    alpha = Forwarded[float]()
    lr = Forwarded[float]()

    def update_losses(self, losses: Tensor | Sequence[Tensor]) -> None:
        """Give the loss values of the current step (one per row, in the order of the rows) to
        the weighting; call it before each aggregation."""
        self.gramian_weighting.update_losses(losses)

    def reset(self) -> None:
        """Forget the weights, the initial losses and any pending losses."""
        self.gramian_weighting.reset()
