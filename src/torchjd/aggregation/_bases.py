"""Base classes of the aggregation package.

An :class:`Aggregator` turns a matrix ``J`` of shape ``[m, n]`` (one row per objective) into one
vector of shape ``[n]``. Most aggregators are *weighted*: a :class:`Weighting` computes a weight
vector ``w`` of shape ``[m]`` and the aggregation is ``w @ J``. When the weights depend on ``J``
only through its Gramian ``G = J J^T``, the aggregator is a :class:`GramianWeightedAggregator`;
this is what lets :func:`torchjd.autojac.jac_to_grad` aggregate without ever concatenating the
Jacobians of the individual parameters.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Generic, TypeVar

import torch
from torch import Tensor, nn

from torchjd.linalg._matrix import Matrix, PSDMatrix

_T = TypeVar("_T", bound=Tensor)


class Aggregator(nn.Module, ABC):
    """Abstract base of every aggregator: maps a matrix ``[m, n]`` to a vector ``[n]``.

    Calling an aggregator checks that its input is a matrix, then runs :meth:`forward` through
    :meth:`torch.nn.Module.__call__`, so forward hooks and pre-hooks registered on it run.
    """

    def __init__(self) -> None:
        super().__init__()

    @staticmethod
    def _check_is_matrix(matrix: Tensor) -> None:
        if matrix.ndim != 2:
            raise ValueError(
                "An aggregator expects a matrix (a tensor of dimension 2, one row per objective), "
                f"got a tensor of shape {tuple(matrix.shape)}."
            )

    @abstractmethod
    def forward(self, matrix: Matrix, /) -> Tensor:
        """Aggregate the rows of ``matrix`` into one vector."""

    def __call__(self, matrix: Tensor, /) -> Tensor:
        self._check_is_matrix(matrix)
        return super().__call__(matrix)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def __str__(self) -> str:
        return type(self).__name__


class NoGrad:
    """Mixin for non-differentiable aggregators and weightings: the whole module call, forward
    hooks included, runs under :func:`torch.no_grad`.

    Placed first among the bases. It wraps ``__call__`` rather than ``forward``, so that a
    :class:`GramianWeightedAggregator` keeps its own ``forward`` and
    :func:`~torchjd.autojac.jac_to_grad` can still aggregate it without concatenation.
    """

    @torch.no_grad()
    def __call__(self, input: Tensor, /) -> Tensor:
        return super().__call__(input)  # type: ignore[misc]


class Weighting(nn.Module, ABC, Generic[_T]):
    """Abstract base of every weighting: maps a statistic of the objectives to weights ``[m]``.

    ``Weighting[Matrix]`` takes the matrix ``J`` itself; ``Weighting[PSDMatrix]`` takes its Gramian
    ``J J^T``. Weightings do not validate their input.
    """

    def __init__(self) -> None:
        super().__init__()

    @abstractmethod
    def forward(self, stat: _T, /) -> Tensor:
        """Compute one weight per objective (per row of ``stat``)."""

    def __call__(self, stat: _T, /) -> Tensor:
        return super().__call__(stat)

    def __lshift__(self, fn: Callable[[Tensor], _T]) -> Weighting[Tensor]:
        """Return the weighting ``stat -> self(fn(stat))``."""
        return _Composition(self, fn)


class _Composition(Weighting[Tensor]):
    """The weighting ``stat -> weighting(fn(stat))``, built by ``weighting << fn``."""

    def __init__(self, weighting: Weighting, fn: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.weighting = weighting
        self.fn = fn

    def forward(self, stat: Tensor, /) -> Tensor:
        return self.weighting(self.fn(stat))


def _gramian_of(matrix: Tensor) -> Tensor:
    return matrix @ matrix.T


class WeightedAggregator(Aggregator):
    """Aggregator computing ``w @ J`` with ``w = weighting(J)``.

    :param weighting: the weighting applied to the matrix.
    """

    def __init__(self, weighting: Weighting[Matrix]) -> None:
        super().__init__()
        self.weighting = weighting

    def forward(self, matrix: Tensor, /) -> Tensor:
        weights = self.weighting(matrix)
        # A user-given weight vector (Constant, pref_vector) may differ in dtype or device.
        return weights.to(dtype=matrix.dtype, device=matrix.device) @ matrix


class GramianWeightedAggregator(WeightedAggregator):
    """Aggregator computing ``w @ J`` with ``w = gramian_weighting(J @ J.T)``.

    ``self.weighting`` is ``gramian_weighting << (J -> J @ J.T)``; the Gramian weighting is
    registered once, as ``self.weighting.weighting``, and :attr:`gramian_weighting` is an alias, so
    that :meth:`state_dict` lists each piece of state once.

    :param gramian_weighting: the weighting applied to the Gramian of the matrix.
    """

    def __init__(self, gramian_weighting: Weighting[PSDMatrix]) -> None:
        super().__init__(gramian_weighting << _gramian_of)

    @property
    def gramian_weighting(self) -> Weighting[PSDMatrix]:
        return self.weighting.weighting
