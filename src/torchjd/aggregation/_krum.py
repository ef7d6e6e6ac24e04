"""Krum: average of the rows that are closest to their nearest neighbours."""

import operator
from collections.abc import Sequence

import torch
from torch import Tensor

from torchjd.aggregation._bases import Forwarded, GramianWeightedAggregator, Weighting
from torchjd.linalg._matrix import PSDMatrix


def _check_int(name: str, value: int, minimum: int) -> int:
    try:
        operator.index(value)
    except TypeError:
        raise TypeError(f"`{name}` must be an int, got {value!r}.") from None
    if value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}, got {value!r}.")
    return value


def _krum_weights(gramians: Tensor, n_byzantine: int, n_selected: int) -> Tensor:
    """Krum's weights of a batch of Gramians ``[..., m, m]`` (with ``m >= n_byzantine + 3`` and
    ``m >= n_selected``). The weights are constants: they never require grad."""
    m = gramians.shape[-1]
    gramians = gramians.detach()
    squared_norms = gramians.diagonal(dim1=-2, dim2=-1)
    # ||g_i - g_j||^2 = G_ii + G_jj - 2 G_ij, clamped at 0 against round-off.
    squared = squared_norms.unsqueeze(-1) + squared_norms.unsqueeze(-2) - 2.0 * gramians
    distances = squared.clamp(min=0.0).sqrt()
    k = m - n_byzantine - 2
    # The k + 1 smallest distances of row i start with the distance 0 of g_i to itself.
    nearest = torch.topk(distances, k + 1, dim=-1, largest=False).values
    scores = nearest[..., 1:].sum(dim=-1)
    selected = torch.topk(scores, n_selected, dim=-1, largest=False).indices
    weights = torch.zeros_like(scores)
    return weights.scatter(-1, selected, 1.0 / n_selected)


class KrumWeighting(Weighting[PSDMatrix]):
    r"""Weighting of :class:`Krum`: :math:`1/s` on each of the :math:`s` selected rows, 0
    elsewhere.

    With :math:`f` = ``n_byzantine``, :math:`s` = ``n_selected``, :math:`k = m - f - 2` and the
    distances :math:`D_{ij} = \sqrt{\max(G_{ii} + G_{jj} - 2 G_{ij}, 0)}` between rows, the score
    of row :math:`i` is the sum of its :math:`k` smallest distances to the other rows; the
    :math:`s` rows of smallest scores are selected (ties are broken as :func:`torch.topk` breaks
    them). The weights do not depend differentiably on the Gramian: they never require grad.

    :param n_byzantine: the number :math:`f \ge 0` of rows that may be adversarial.
    :param n_selected: the number :math:`s \ge 1` of rows averaged (default ``1``).

    At call time, the Gramian must have :math:`m \ge f + 3` and :math:`m \ge s` rows.
    """

    def __init__(self, n_byzantine: int, n_selected: int = 1) -> None:
        super().__init__()
        self.n_byzantine = n_byzantine
        self.n_selected = n_selected

    @property
    def n_byzantine(self) -> int:
        return self._n_byzantine

    @n_byzantine.setter
    def n_byzantine(self, value: int) -> None:
        self._n_byzantine = _check_int("n_byzantine", value, 0)

    @property
    def n_selected(self) -> int:
        return self._n_selected

    @n_selected.setter
    def n_selected(self, value: int) -> None:
        self._n_selected = _check_int("n_selected", value, 1)

    def _check_rows(self, m: int, shape: tuple[int, ...]) -> None:
        if m < self.n_byzantine + 3:
            raise ValueError(
                f"Krum with n_byzantine={self.n_byzantine} needs at least "
                f"n_byzantine + 3 = {self.n_byzantine + 3} rows, got a Gramian of shape {shape}."
            )
        if m < self.n_selected:
            raise ValueError(
                f"Krum with n_selected={self.n_selected} cannot select more rows than there are: "
                f"got a Gramian of shape {shape}."
            )

    def forward(self, stat: Tensor, /) -> Tensor:
        self._check_rows(stat.shape[0], tuple(stat.shape))
        return _krum_weights(stat, self.n_byzantine, self.n_selected)

    @classmethod
    def _forward_grouped(cls, weightings: Sequence[Weighting], gramians: Tensor) -> Tensor:
        """Weights ``[b, m]`` of Gramians ``[b, m, m]``, the ``k``-th one weighed by
        ``weightings[k]``: one vectorised call when they share their hyper-parameters."""
        settings = {(w.n_byzantine, w.n_selected) for w in weightings}  # type: ignore[attr-defined]
        if len(settings) != 1:
            return super()._forward_grouped(weightings, gramians)
        (n_byzantine, n_selected), first = settings.pop(), weightings[0]
        first._check_rows(gramians.shape[-1], tuple(gramians.shape))  # type: ignore[attr-defined]
        return _krum_weights(gramians, n_byzantine, n_selected)


class Krum(GramianWeightedAggregator):
    r"""Krum, from `Machine Learning with Adversaries: Byzantine Tolerant Gradient Descent
    <https://proceedings.neurips.cc/paper/2017/hash/f4b9ec30ad9f68f89b29639786cb62ef-Abstract.html>`_
    (Blanchard et al., NeurIPS 2017), with its multi-Krum variant.

    Each row :math:`g_i` is scored by the sum of its Euclidean distances (not squared, unlike the
    paper) to its :math:`m - f - 2` nearest other rows; the result is the average of the :math:`s`
    rows of smallest scores. Distances come from the Gramian:
    :math:`\|g_i - g_j\|^2 = G_{ii} + G_{jj} - 2G_{ij}`, clamped at 0. The selection is constant,
    but the average is differentiable with respect to the selected rows.

    :param n_byzantine: the number :math:`f \ge 0` of rows that may be adversarial; the matrix
        must have at least :math:`f + 3` rows.
    :param n_selected: the number :math:`s \ge 1` of rows averaged, at most :math:`m`
        (default ``1``).

    >>> import torch
    >>> from torchjd.aggregation import Krum
    >>> J = torch.tensor([[1.0, 1, 1], [1, 0, 1], [75, -666, 23], [1, 2, 3], [2, 0, 1]])
    >>> Krum(n_byzantine=1, n_selected=4)(J)
    tensor([1.2500, 0.7500, 1.5000])
    """

    def __init__(self, n_byzantine: int, n_selected: int = 1) -> None:
        super().__init__(KrumWeighting(n_byzantine, n_selected))

    n_byzantine = Forwarded[int]()
    n_selected = Forwarded[int]()

    def __str__(self) -> str:
        return f"Krum{self.n_byzantine}-{self.n_selected}"
