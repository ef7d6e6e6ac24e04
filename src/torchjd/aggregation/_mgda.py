"""MGDA: the minimum-norm point of the convex hull of the gradients, by Frank–Wolfe."""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch
from torch import Tensor

from torchjd.aggregation._bases import GramianWeightedAggregator, Weighting
from torchjd.linalg._matrix import PSDMatrix

# Convergence is checked on the host every this many iterations (see ``_mgda_weights``). On one
# CPU thread, checking every iteration or every 8 costs the same (benchmarks/bench_weightings.py:
# about 3.8 ms for the 69 iterations of an 8 x 8 problem, 5 ms for 100 iterations at m = 32),
# while never checking runs all ``max_iters`` (4.9 ms at m = 8); on a GPU, every check is a
# synchronisation, so 8 saves 7 of every 8 of them for at most 7 extra (frozen) iterations.
_CHECK_EVERY = 8


def _mgda_weights(
    gramian: Tensor, epsilon: float | Tensor, max_iters: int | Sequence[int]
) -> Tensor:
    r"""Frank–Wolfe weights of a batch of Gramians ``[..., m, m]`` (``m >= 1``), differentiable.

    Minimises :math:`\alpha^\top G \alpha` over the simplex, from :math:`\alpha = \mathbf 1 / m`.
    Each iteration takes :math:`t = \arg\min_k (G\alpha)_k` (the first index among ties),
    :math:`a = (G\alpha)_t`, :math:`b = \alpha^\top G \alpha`, :math:`c = G_{tt}`, the exact line
    search :math:`\gamma = 1` if :math:`c \le a`, else :math:`0` if :math:`b \le a`, else
    :math:`(b - a) / (b + c - 2a)`, and :math:`\alpha \leftarrow (1 - \gamma)\alpha + \gamma e_t`.
    A problem stops after the iteration whose :math:`\gamma < \epsilon`, or after ``max_iters``.

    A stopped problem is frozen (its later steps use :math:`\gamma = 0`, which leaves
    :math:`\alpha` unchanged exactly), so the batch runs without branching on tensor values; the
    loop ends early when every problem has stopped, which is checked on the host (a
    synchronisation) every ``_CHECK_EVERY`` iterations only.

    :param gramian: the Gramians ``[..., m, m]``.
    :param epsilon: the stopping threshold, a float or one value per Gramian (shape ``[...]``).
    :param max_iters: the iteration budget, an int or one per Gramian (flattened order).
    """
    *batch, m, _ = gramian.shape
    if isinstance(max_iters, int):
        n_iters, budgets = max_iters, None
    else:
        n_iters = max(max_iters)
        budgets = torch.tensor(list(max_iters), device=gramian.device).view(*batch, 1)
    if isinstance(epsilon, Tensor):
        epsilon = epsilon.to(dtype=gramian.dtype, device=gramian.device).view(*batch, 1)
    diagonal = gramian.diagonal(dim1=-2, dim2=-1)
    alpha = torch.full((*batch, m), 1.0 / m, dtype=gramian.dtype, device=gramian.device)
    stopped = torch.zeros(*batch, 1, dtype=torch.bool, device=gramian.device)
    one = torch.ones((), dtype=gramian.dtype, device=gramian.device)
    for iteration in range(n_iters):
        products = (gramian @ alpha.unsqueeze(-1)).squeeze(-1)  # G alpha
        t = products.argmin(dim=-1, keepdim=True)
        a = products.gather(-1, t)
        b = torch.linalg.vecdot(alpha, products).unsqueeze(-1)
        c = diagonal.gather(-1, t)
        gap = b - a
        to_vertex = c <= a
        stay = b <= a
        # b + c - 2a > 0 wherever the quotient is used; elsewhere divide by 1 (finite gradients).
        denominator = torch.where(to_vertex | stay, one, gap + (c - a))
        gamma = torch.where(to_vertex, one, torch.where(stay, 0.0, gap / denominator))
        gamma = torch.where(stopped, 0.0, gamma)
        alpha = (alpha * (1 - gamma)).scatter_add(-1, t, gamma)
        stopped = stopped | (gamma < epsilon)
        if budgets is not None:
            stopped = stopped | (budgets <= iteration + 1)
        if (iteration + 1) % _CHECK_EVERY == 0 and iteration + 1 < n_iters and bool(stopped.all()):
            break
    return alpha


def _check_epsilon(epsilon: float) -> float:
    if not epsilon > 0.0:
        raise ValueError(f"`epsilon` must be a positive number, got {epsilon!r}.")
    return epsilon


def _check_max_iters(max_iters: int) -> int:
    try:
        operator.index(max_iters)
    except TypeError:
        raise TypeError(f"`max_iters` must be an int, got {max_iters!r}.") from None
    if max_iters <= 0:
        raise ValueError(f"`max_iters` must be a positive int, got {max_iters!r}.")
    return max_iters


class MGDAWeighting(Weighting[PSDMatrix]):
    r"""Weighting of :class:`MGDA`: the weights :math:`\alpha` in the simplex minimising
    :math:`\alpha^\top G \alpha = \|J^\top \alpha\|^2`, found by Frank–Wolfe.

    From :math:`\alpha = \mathbf 1 / m`, each iteration picks the vertex
    :math:`t = \arg\min_k (G\alpha)_k` (first index among ties), computes :math:`a = (G\alpha)_t`,
    :math:`b = \alpha^\top G \alpha`, :math:`c = G_{tt}` and the exact line-search step

    .. math::

        \gamma = \begin{cases} 1 & c \le a \\ 0 & b \le a \\ \frac{b - a}{b + c - 2a} &
        \text{otherwise,} \end{cases}
        \qquad \alpha \leftarrow (1 - \gamma) \alpha + \gamma e_t,

    and stops after the first iteration with :math:`\gamma < \epsilon`, or after ``max_iters``.

    Plain tensor arithmetic in the input's dtype and on its device, differentiable with respect to
    the Gramian. Stopping early is a data-dependent decision: whether every problem has converged
    is read on the host (a device synchronisation) once every 8 iterations; in between, converged
    problems are frozen, so the result is exactly that of checking at every iteration.

    :param epsilon: stopping threshold on the step :math:`\gamma`, ``> 0`` (default ``0.001``).
    :param max_iters: maximum number of iterations, ``>= 1`` (default ``100``).
    """

    def __init__(self, epsilon: float = 0.001, max_iters: int = 100) -> None:
        super().__init__()
        self.epsilon = epsilon
        self.max_iters = max_iters

    @property
    def epsilon(self) -> float:
        return self._epsilon

    @epsilon.setter
    def epsilon(self, value: float) -> None:
        self._epsilon = _check_epsilon(value)

    @property
    def max_iters(self) -> int:
        return self._max_iters

    @max_iters.setter
    def max_iters(self, value: int) -> None:
        self._max_iters = _check_max_iters(value)

    def forward(self, stat: Tensor, /) -> Tensor:
        return self._forward_batched(stat)

    def _forward_batched(self, gramians: Tensor) -> Tensor:
        """Weights ``[..., m]`` of Gramians ``[..., m, m]``, each solved independently."""
        if gramians.shape[-1] == 0:
            raise ValueError(
                "MGDA needs at least one objective: got a Gramian of shape "
                f"{tuple(gramians.shape)}."
            )
        return _mgda_weights(gramians, float(self.epsilon), int(self.max_iters))

    @classmethod
    def _forward_grouped(cls, weightings: Sequence[MGDAWeighting], gramians: Tensor) -> Tensor:
        """Weights ``[b, m]`` of Gramians ``[b, m, m]``, the ``k``-th one with the ``epsilon`` and
        ``max_iters`` of ``weightings[k]``."""
        if len(weightings) != gramians.shape[0]:
            raise ValueError(
                f"Got {len(weightings)} weightings for {gramians.shape[0]} Gramians: give one "
                "weighting per Gramian."
            )
        if gramians.shape[-1] == 0 or not weightings:
            return MGDAWeighting()._forward_batched(gramians)
        epsilons = [float(w.epsilon) for w in weightings]
        budgets = [int(w.max_iters) for w in weightings]
        if len(set(epsilons)) == 1 and len(set(budgets)) == 1:
            return _mgda_weights(gramians, epsilons[0], budgets[0])
        return _mgda_weights(gramians, torch.tensor(epsilons, dtype=torch.float64), budgets)


class MGDA(GramianWeightedAggregator):
    r"""Multiple-gradient descent algorithm: the minimum-norm point of the convex hull of the rows,
    from `Multiple-gradient descent algorithm (MGDA) for multiobjective optimization
    <https://doi.org/10.1016/j.crma.2012.03.014>`_ (Désidéri, C. R. Math. 2012), solved by
    Frank–Wolfe as in `Multi-Task Learning as Multi-Objective Optimization
    <https://arxiv.org/abs/1810.04650>`_ (Sener and Koltun, NeurIPS 2018), Algorithm 2.

    Returns :math:`J^\top \alpha` with :math:`\alpha \in \arg\min_{\alpha \in \Delta_m}
    \|J^\top \alpha\|^2` (approximately, see :class:`MGDAWeighting` for the iteration and the
    stopping rule). Differentiable.

    :param epsilon: stopping threshold on the Frank–Wolfe step, ``> 0`` (default ``0.001``).
    :param max_iters: maximum number of iterations, ``>= 1`` (default ``100``).

    >>> import torch
    >>> from torchjd.aggregation import MGDA
    >>> MGDA()(torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]))
    tensor([0., 1., 1.])
    """

    def __init__(self, epsilon: float = 0.001, max_iters: int = 100) -> None:
        super().__init__(MGDAWeighting(epsilon=epsilon, max_iters=max_iters))

    @property
    def epsilon(self) -> float:
        return self.gramian_weighting.epsilon

    @epsilon.setter
    def epsilon(self, value: float) -> None:
        self.gramian_weighting.epsilon = value

    @property
    def max_iters(self) -> int:
        return self.gramian_weighting.max_iters

    @max_iters.setter
    def max_iters(self, value: int) -> None:
        self.gramian_weighting.max_iters = value

    def __repr__(self) -> str:
        return f"{type(self).__name__}(epsilon={self.epsilon}, max_iters={self.max_iters})"
