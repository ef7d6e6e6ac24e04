"""Gramians of Jacobians without the Jacobians: the :class:`Engine` of autogram.

The engine hooks modules and, after a forward pass, returns the Gramian ``J J^T`` of the Jacobian
of an output (e.g. the vector of per-sample losses) w.r.t. their parameters, from which a
``Weighting[PSDMatrix]`` computes weights for an ordinary weighted ``backward``. The
:class:`MTLEngine` runs a whole multi-task step (grouped or not) from the block Gramians of a
shared trunk, without its Jacobian.
"""

from torchjd.autogram._engine import Engine
from torchjd.autogram._mtl_engine import MTLEngine

__all__ = ["Engine", "MTLEngine"]
