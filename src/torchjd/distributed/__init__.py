"""Jacobian descent under data-parallel training, with ``DistributedDataParallel`` or without.

With ``R`` processes, each holding a shard of the batch, the Jacobian to aggregate is that of the
whole batch: the mean of the local Jacobians (or, for per-sample objectives, their rows stacked).
Aggregators are not linear, so they must be applied to that global Jacobian, by every process,
with the same random draws.

- :func:`jac_to_grad`: the drop-in replacement of :func:`torchjd.autojac.jac_to_grad`, which
  picks the cheapest exchange for the aggregator (the update only, partial Gramians, or the whole
  Jacobian);
- :func:`sync_jac`: replaces the ``.jac`` fields by the global Jacobian in one collective, for
  any aggregation code (several groups, a :class:`torchjd.grouping.GroupedAggregator`...).

``DistributedDataParallel`` can wrap the model as usual (it keeps the replicas' parameters and
buffers in step); its gradient hooks do not run during Jacobian computation, and aggregating
unsynchronised ``.jac`` fields in a process group of several processes raises an
:class:`UnsynchronizedJacobianWarning`.
"""

from torchjd._synchronization import UnsynchronizedJacobianWarning
from torchjd.distributed._jac_to_grad import jac_to_grad
from torchjd.distributed._sync_jac import sync_jac

__all__ = ["UnsynchronizedJacobianWarning", "jac_to_grad", "sync_jac"]
