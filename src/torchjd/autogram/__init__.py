"""Gramians of Jacobians without the Jacobians: the :class:`Engine` of autogram.

The engine hooks modules and, after a forward pass, returns the Gramian ``J J^T`` of the Jacobian
of an output (e.g. the vector of per-sample losses) w.r.t. their parameters, from which a
``Weighting[PSDMatrix]`` computes weights for an ordinary weighted ``backward``.
"""

from torchjd.autogram._engine import Engine

__all__ = ["Engine"]
