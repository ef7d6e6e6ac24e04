import torch
from torch import Tensor

from torchjd._stateful import Stateful
from torchjd.aggregation._bases import Weighting
from torchjd.aggregation._lazy_state import LazyStateMixin


class CRMOGMWeighting(LazyStateMixin, Weighting[Tensor], Stateful):
    r"""Smooths the weights of another weighting with an exponential moving average (CR-MOGM).

    From `On the Convergence of Stochastic Multi-Objective Gradient Manipulation and Beyond
    <https://proceedings.neurips.cc/paper_files/paper/2022/hash/f91bd64a3620aad8e70a27ad9cb3ca57-Abstract-Conference.html>`_
    (S. Zhou et al., NeurIPS 2022). On each call with statistic :math:`x`, the wrapped weighting
    gives :math:`\hat\lambda = \mathrm{weighting}(x)` (it is always called first), and

    .. math::

        \lambda = \alpha \lambda_{\mathrm{prev}} + (1 - \alpha) \hat\lambda

    is stored and returned. At the first call (after construction or :meth:`reset`),
    :math:`\lambda_{\mathrm{prev}}` is ``initial_weights`` (cast to the dtype and device of
    :math:`\hat\lambda`) if given, else :math:`\hat\lambda` itself. So :math:`\alpha = 0` passes
    the wrapped weights through and :math:`\alpha = 1` freezes the output at its first value. The
    paper's Corollary 1 suggests increasing :math:`\alpha` over training: :attr:`alpha` can be
    updated between calls.

    It is a weighting of whatever the wrapped weighting takes: build an aggregator with
    ``WeightedAggregator(CRMOGMWeighting(w))`` for a matrix weighting or
    ``GramianWeightedAggregator(CRMOGMWeighting(w))`` for a Gramian weighting.

    :param weighting: the wrapped weighting (registered as the child module ``weighting``).
    :param alpha: smoothing factor in ``[0, 1]`` (default ``0.9``).
    :param initial_weights: :math:`\lambda_0`, of shape ``[m]`` (checked at the first call), or
        ``None``.

    State: the previous :math:`\lambda`, following the dtype and device of the wrapped weights.
    The number of objectives cannot change without :meth:`reset` (``ValueError``). :meth:`reset`
    also resets the wrapped weighting if it is :class:`torchjd.Stateful`.

    Differentiability follows the wrapped weighting through :math:`\hat\lambda`; the stored
    :math:`\lambda` is detached, so gradients never flow into the inputs of earlier calls (whose
    graphs would otherwise be kept alive from step to step).
    """

    _task_vectors = ("initial_weights",)
    _task_state = (("_smoothed", 1, "mean"),)

    def __init__(
        self, weighting: Weighting, alpha: float = 0.9, initial_weights: Tensor | None = None
    ) -> None:
        super().__init__()
        self.weighting = weighting
        self.alpha = alpha
        self.initial_weights = initial_weights
        self.register_buffer("_smoothed", torch.empty(0), persistent=True)
        self._has_state = False

    _extra_state_names = ("_has_state",)

    @property
    def alpha(self) -> float:
        return self._alpha

    @alpha.setter
    def alpha(self, value: float) -> None:
        if not 0 <= value <= 1:
            raise ValueError(f"`alpha` must be in [0, 1], got {value!r}.")
        self._alpha = value

    def reset(self) -> None:
        if isinstance(self.weighting, Stateful):
            self.weighting.reset()
        self._smoothed = torch.empty(0)
        self._has_state = False

    def forward(self, stat: Tensor, /) -> Tensor:
        current = self.weighting(stat)
        m = current.shape[0]
        if self._has_state:
            if self._smoothed.shape[0] != m:
                raise ValueError(
                    f"The number of objectives changed from {self._smoothed.shape[0]} to {m}: "
                    "call `reset()` before using the weighting with another number of objectives."
                )
            previous = self._smoothed.to(dtype=current.dtype, device=current.device)
        elif self.initial_weights is not None:
            if tuple(self.initial_weights.shape) != (m,):
                raise ValueError(
                    f"`initial_weights` must have shape ({m},) (one weight per objective), got "
                    f"{tuple(self.initial_weights.shape)}."
                )
            previous = self.initial_weights.to(dtype=current.dtype, device=current.device)
        else:
            previous = torch.full_like(current, torch.nan)
        # A non-finite input (a step that a gradient scaler skips) gives NaN weights and leaves
        # the average untouched; an average that holds no finite weights yet (NaN) starts afresh.
        # Branch-free, so no host synchronisation.
        finite = torch.isfinite(stat).all()
        started = torch.where(torch.isnan(previous), current, previous)
        smoothed = self.alpha * started + (1 - self.alpha) * current
        self._smoothed = torch.where(finite, smoothed, previous).detach().clone()
        self._has_state = True
        return torch.where(finite, smoothed, torch.nan)
