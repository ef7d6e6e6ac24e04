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


def check_projection_shapes(U: Tensor, G: Tensor) -> None:
    """Check that ``G`` is ``[m, m]`` and that the last dimension of ``U`` is ``m``."""
    if G.ndim != 2 or G.shape[0] != G.shape[1]:
        raise ValueError(f"`G` must be a square matrix, got shape {tuple(G.shape)}.")
    m = G.shape[0]
    if U.ndim == 0 or U.shape[-1] != m:
        raise ValueError(
            f"The last dimension of `U` must be m = {m} (the size of `G`), got shape "
            f"{tuple(U.shape)}."
        )


def _check_eps(name: str, value: float) -> None:
    if not value >= 0.0:
        raise ValueError(f"`{name}` must be a non-negative float, got {value!r}.")


class NormalizingProjector(DualConeProjector, ABC):
    """A projector that first normalises the Gramian by its trace (zero matrix if the trace is
    below ``norm_eps``) and adds ``reg_eps`` times the identity: the validated ``norm_eps`` and
    ``reg_eps`` properties and the ``repr`` shared by the concrete projectors."""

    def __init__(self, *, norm_eps: float = 0.0001, reg_eps: float = 0.0001) -> None:
        self.norm_eps = norm_eps
        self.reg_eps = reg_eps

    @property
    def norm_eps(self) -> float:
        return self._norm_eps

    @norm_eps.setter
    def norm_eps(self, value: float) -> None:
        _check_eps("norm_eps", value)
        self._norm_eps = value

    @property
    def reg_eps(self) -> float:
        return self._reg_eps

    @reg_eps.setter
    def reg_eps(self, value: float) -> None:
        _check_eps("reg_eps", value)
        self._reg_eps = value

    def __repr__(self) -> str:
        return f"{type(self).__name__}(norm_eps={self.norm_eps}, reg_eps={self.reg_eps})"
