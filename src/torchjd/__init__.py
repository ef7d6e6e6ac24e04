"""Jacobian descent for PyTorch.

The sub-packages are :mod:`torchjd.autojac` (Jacobians stored in ``.jac`` fields and their
aggregation into ``.grad``), :mod:`torchjd.aggregation` (aggregators and weightings) and
:mod:`torchjd.linalg` (projectors and matrix type markers).
"""

import warnings
from typing import Any

from torchjd._stateful import Stateful

from . import aggregation, autogram, autojac, distributed, grouping, linalg, scalarization  # noqa: F401  (make them attributes of the package)

__all__ = ["Stateful"]
__version__ = "0.1.0"

_DEPRECATED_ALIASES = ("backward", "mtl_backward")


def __getattr__(name: str) -> Any:
    if name in _DEPRECATED_ALIASES:
        warnings.warn(
            f"`torchjd.{name}` is deprecated: import it from `torchjd.autojac` instead "
            f"(`from torchjd.autojac import {name}`).",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(autojac, name)
    raise AttributeError(f"module 'torchjd' has no attribute {name!r}")
