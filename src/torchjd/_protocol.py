"""What an aggregator tells the application pipeline about itself.

:mod:`torchjd.aggregation` declares, on every aggregator, which part of the Jacobian ``J`` its
result depends on; the pipeline (:mod:`torchjd._pipeline`) reads that declaration to decide what
to compute, and never looks at the aggregator's type.
"""

import enum


class Need(enum.Enum):
    """What an aggregator reads of the Jacobian ``J`` (``[m, n]``) it aggregates."""

    #: The weights depend only on ``m`` (and the dtype and device): ``w @ J`` without any Gramian.
    ROW_COUNT = "row count"
    #: The weights are a function of the Gramian ``J Jᵀ`` only: ``J`` itself is never built.
    GRAMIAN = "gramian"
    #: The aggregator is called on the whole matrix ``J`` (the concatenated ``.jac`` fields).
    MATRIX = "matrix"
