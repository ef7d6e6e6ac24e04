from abc import ABC, abstractmethod

from torch import Tensor

from torchjd.linalg._matrix import PSDMatrix


class DualConeProjector(ABC):
    r"""Projects onto the dual cone of the rows of a Jacobian, given only its Gramian.

    For a Jacobian :math:`J` with Gramian :math:`G = J J^\top`, the dual cone of its rows is
    :math:`\{x : J x \succeq 0\}`. By Proposition 1 of `Jacobian Descent for Multi-Objective
    Optimization <https://arxiv.org/abs/2406.16232>`_, the projection of :math:`J^\top u` onto it is
    :math:`J^\top w` with :math:`w \in \arg\min_{v \succeq u} v^\top G v`.

    Subclasses implement :meth:`__call__`: given ``U`` of shape ``[..., m]`` and ``G`` of shape
    ``[m, m]``, return ``W`` of the shape of ``U`` holding, along its last axis, the solution ``w``
    for each vector ``u``.
    """

    @abstractmethod
    def __call__(self, U: Tensor, G: PSDMatrix) -> Tensor:
        """Solve :math:`\\min_{v \\succeq u} v^\\top G v` for every vector ``u`` along the last axis
        of ``U``."""
