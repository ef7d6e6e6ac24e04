"""Linear-algebra building blocks: matrix type markers and dual-cone projectors."""

from torchjd.linalg._matrix import Matrix, PSDMatrix
from torchjd.linalg._projector import DualConeProjector

__all__ = ["DualConeProjector", "Matrix", "PSDMatrix"]
