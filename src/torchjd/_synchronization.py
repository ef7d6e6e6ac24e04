"""Detection of ``.jac`` fields aggregated without synchronisation across data-parallel processes.

Under data-parallel training (for example with ``DistributedDataParallel``), every process holds
the Jacobian of its own shard of the batch. ``DistributedDataParallel`` averages gradients in hooks
that run when ``.grad`` is accumulated; computing Jacobians never runs them. Aggregating the local
``.jac`` fields therefore gives a different update in every process and the replicas drift apart.

:mod:`torchjd.distributed` marks the Jacobians it synchronises; :func:`warn_if_unsynchronized`
warns when Jacobians without that mark are aggregated while a process group of more than one
process is initialised. The check costs two calls into ``torch.distributed`` and one attribute
lookup per tensor, and nothing at all outside of a process group.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch.distributed as dist
from torch import Tensor

_MARK = "_torchjd_synchronized_version"


class UnsynchronizedJacobianWarning(UserWarning):
    """Jacobians are aggregated in a process group without having been synchronised first."""


def mark_synchronized(jacobian: Tensor) -> None:
    """Record that ``jacobian`` holds the Jacobian of the whole process group, as it is now.

    The mark stores the tensor's version counter, so an in-place change made afterwards (for
    example a ``backward`` call accumulating a local Jacobian into it) removes it.
    """
    setattr(jacobian, _MARK, jacobian._version)


def is_marked(jacobian: Tensor) -> bool:
    return getattr(jacobian, _MARK, None) == jacobian._version


def warn_if_unsynchronized(jacobians: Sequence[Tensor], stacklevel: int) -> None:
    """Warn if a process group of several processes exists and a Jacobian is not marked."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    world_size = dist.get_world_size()
    if world_size <= 1 or all(is_marked(j) for j in jacobians):
        return
    warnings.warn(
        f"Aggregating `.jac` fields that were not synchronised across the {world_size} processes "
        "of the default process group: each process aggregates the Jacobian of its own data, so "
        "data-parallel replicas get different updates and drift apart (DistributedDataParallel "
        "does not synchronise Jacobians). Use `torchjd.distributed.jac_to_grad` instead, or call "
        "`torchjd.distributed.sync_jac` on the tensors first. If the processes train separate "
        "models on purpose, silence this warning with `warnings.filterwarnings('ignore', "
        "category=torchjd.distributed.UnsynchronizedJacobianWarning)`.",
        UnsynchronizedJacobianWarning,
        stacklevel=stacklevel + 1,
    )
