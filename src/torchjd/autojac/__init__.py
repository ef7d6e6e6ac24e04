"""Jacobians of several objectives stored in ``.jac`` fields, and their aggregation into ``.grad``.

- :func:`backward` and :func:`mtl_backward` compute Jacobians (one row per objective) and
  accumulate them into the ``.jac`` field of tensors;
- :func:`jac` returns Jacobians without side effects;
- :func:`jac_to_grad` aggregates the ``.jac`` fields into ``.grad`` with an aggregator of
  :mod:`torchjd.aggregation`.
"""

from torchjd.autojac._backward import backward
from torchjd.autojac._jac import jac
from torchjd.autojac._jac_to_grad import jac_to_grad
from torchjd.autojac._mtl_backward import mtl_backward

__all__ = ["backward", "jac", "jac_to_grad", "mtl_backward"]
