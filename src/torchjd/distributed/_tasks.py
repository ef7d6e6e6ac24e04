"""Missing tasks across processes: per-task label counts weigh each process's rows."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from torchjd.distributed._comm import all_reduce


def local_counts(present: object, counts: object, m: int, rows: str) -> Tensor | None:
    """This process's label count of each of the ``m`` tasks (float64, CPU); ``None`` when
    neither ``present`` nor ``counts`` is given."""
    if present is None and counts is None:
        return None
    if rows != "mean":
        raise ValueError(
            "`present` and `counts` need `rows='mean'` (the same tasks on every process); with "
            "`rows='stack'` each process's rows are objectives of their own."
        )
    if present is not None and counts is not None:
        raise ValueError("Give `present` or `counts`, not both: a count of 0 marks an absent task.")
    if counts is None:
        if isinstance(present, Tensor):
            if present.dtype != torch.bool:
                raise TypeError(
                    f"`present` must be a boolean tensor, got dtype {present.dtype}. Per-task "
                    "label counts go in `counts`."
                )
            values = present.detach().cpu().to(torch.float64)
        elif isinstance(present, Sequence) and all(isinstance(v, bool) for v in present):
            values = torch.tensor([float(v) for v in present], dtype=torch.float64)
        else:
            raise TypeError(
                f"`present` must be a boolean tensor or a sequence of booleans, got {present!r}."
            )
        name = "present"
    else:
        if isinstance(counts, Tensor):
            values = counts.detach().cpu().to(torch.float64)
        elif isinstance(counts, Sequence) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in counts
        ):
            values = torch.tensor([float(v) for v in counts], dtype=torch.float64)
        else:
            raise TypeError(
                f"`counts` must be a tensor or a sequence of numbers (one label count per task), "
                f"got {counts!r}."
            )
        name = "counts"
        if not bool(torch.isfinite(values).all()) or bool((values < 0).any()):
            raise ValueError(f"`counts` must be finite and non-negative, got {values.tolist()}.")
    if values.shape != (m,):
        raise ValueError(
            f"`{name}` must have one entry per task ({m}), got shape {tuple(values.shape)}."
        )
    return values


def global_weights(
    counts: Tensor, device: torch.device, world_size: int, group: Any
) -> tuple[Tensor, Tensor]:
    """The factor ``R n_{i,r} / Σ_r n_{i,r}`` of each local row (0 where no process has a label),
    so that the mean over processes of the scaled rows is ``Σ_r n_{i,r} J_{i,r} / Σ_r n_{i,r}``,
    and the global presence of each task (on the CPU). One all-reduce of ``m`` numbers."""
    totals = counts.to(device, copy=True)
    all_reduce(totals, group)
    positive = totals > 0
    factors = torch.where(
        positive, world_size * counts.to(device) / torch.where(positive, totals, 1.0), 0.0
    )
    return factors, positive.cpu()


def scaled(jacobian: Tensor, factors: Tensor) -> Tensor:
    """``jacobian`` with row ``i`` multiplied by ``factors[i]``; a row of factor 0 is never read."""
    shape = (-1,) + (1,) * (jacobian.ndim - 1)
    f = factors.to(jacobian.dtype).view(shape)
    return torch.where(
        f > 0, jacobian * f, torch.zeros((), dtype=jacobian.dtype, device=jacobian.device)
    )
