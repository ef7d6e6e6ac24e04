"""The collectives used by :mod:`torchjd.distributed`, and the sharing of the random generator.

Every collective goes through :mod:`torch.distributed` at call time (``dist.all_reduce``...), on
flat buffers: one call moves all the tensors of a step, never one call per tensor.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

# torch >= 2.12 names the single-tensor variants "*_single"; older versions have the "*_tensor" and
# "*_into_tensor" names only.
_REDUCE_SCATTER_NAMES = ("reduce_scatter_single", "reduce_scatter_tensor")
_ALL_GATHER_NAMES = ("all_gather_single", "all_gather_into_tensor")


def group_rank_and_size(group: Any) -> tuple[int, int]:
    """The rank of this process in ``group`` (``None``: the default group) and its size."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "torchjd.distributed needs an initialised process group: call "
            "`torch.distributed.init_process_group` first (torchrun sets up the environment for "
            "it), or use `torchjd.autojac.jac_to_grad` in a single process."
        )
    return dist.get_rank(group), dist.get_world_size(group)


def backend(group: Any) -> str:
    """The name of the backend of ``group`` (``"gloo"``, ``"nccl"``...), in lower case."""
    return str(dist.get_backend(group)).lower()


def _first_available(names: Sequence[str]) -> Any:
    for name in names:
        function = getattr(dist, name, None)
        if function is not None:
            return function
    raise RuntimeError(f"torch.distributed has none of {list(names)}.")  # pragma: no cover


def all_reduce(buffer: Tensor, group: Any) -> None:
    """Sum ``buffer`` over the processes of ``group``, in place."""
    dist.all_reduce(buffer, group=group)


def reduce_scatter(output: Tensor, input: Tensor, group: Any) -> None:
    """``output`` of process ``r`` = sum over processes of the ``r``-th chunk of ``input``."""
    _first_available(_REDUCE_SCATTER_NAMES)(output, input, group=group)


def all_gather(output: Tensor, input: Tensor, group: Any) -> None:
    """``output`` = the ``input`` of every process, concatenated in rank order."""
    _first_available(_ALL_GATHER_NAMES)(output, input, group=group)


def all_to_all(output: Tensor, input: Tensor, group: Any) -> None:
    """Chunk ``s`` of ``input`` goes to process ``s``; chunk ``r`` of ``output`` is from ``r``."""
    dist.all_to_all_single(output, input, group=group)


def rng_state_size() -> int:
    return torch.get_rng_state().numel()


def rng_slot(rank: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The contribution of this process to a summed slot that carries the CPU generator's state
    of the group's first process: that state, as numbers, on rank 0, and zeros elsewhere.

    The state is a vector of bytes: integers from 0 to 255, exact in every floating dtype with at
    least 8 bits of precision (bfloat16 included), and adding zeros to them is exact.
    """
    if rank == 0:
        return torch.get_rng_state().to(dtype=dtype, device=device)
    return torch.zeros(rng_state_size(), dtype=dtype, device=device)


def rng_state_from_slot(slot: Tensor) -> Tensor:
    """The generator state carried by a summed slot (a copy to the host if it is on a device)."""
    return slot.round().to(device="cpu", dtype=torch.uint8)


class RngScope:
    """Makes this process draw random numbers from the first process's CPU generator.

    On construction, a process other than the group's first one saves its own state of the global
    CPU generator and takes ``state`` (the first process's). :meth:`restore` (or leaving a
    ``with`` block) gives it its own state back. The first process keeps its generator throughout,
    so it draws exactly the numbers a single process would, and the others draw the same ones.
    """

    def __init__(self, state: Tensor | None, rank: int) -> None:
        #: The tasks present in the synchronised Jacobian when label counts were given (else None).
        self.present: Tensor | None = None
        self._saved: Tensor | None = None
        if state is not None and rank != 0:
            self._saved = torch.get_rng_state()
            torch.set_rng_state(state)

    def restore(self) -> None:
        """Give this process its own generator state back (once; later calls do nothing)."""
        if self._saved is not None:
            torch.set_rng_state(self._saved)
            self._saved = None

    def __enter__(self) -> RngScope:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.restore()


def shard_size(n: int, world_size: int) -> int:
    """Length of each of the ``world_size`` equal chunks covering ``n`` entries (zero-padded)."""
    return max(1, math.ceil(n / world_size))
