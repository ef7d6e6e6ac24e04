"""Linear-algebra building blocks: matrix type markers and dual-cone projectors."""

from torchjd.linalg._block_pivoting import BlockPivotingProjector
from torchjd.linalg._matrix import Matrix, PSDMatrix
from torchjd.linalg._projector import DualConeProjector
from torchjd.linalg._quadprog import QuadprogProjector

__all__ = [
    "BlockPivotingProjector",
    "DualConeProjector",
    "Matrix",
    "PSDMatrix",
    "QuadprogProjector",
]
