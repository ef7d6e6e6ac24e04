"""Steps where only some tasks are present: the ``present`` argument and the restriction of a
module (aggregator, weighting, scalarizer) to the present tasks.

A module declares, on its class, what depends on the task index:

- ``_task_vectors``: names of hyper-parameters holding one value per task (a tensor of length
  ``m``, or ``None``), e.g. ``pref_vector``;
- ``_task_counts``: names of ``int`` hyper-parameters equal to the number of tasks (``n_tasks``);
- ``_task_state``: ``(name, n_axes, fill)`` triples for state tensors (buffers or parameters) whose
  first ``n_axes`` dimensions index the tasks. ``fill`` (a float, or ``"mean"`` for the mean of
  the present tasks' values) gives the never-seen tasks a value when the state is created during
  a step where some tasks are absent.

Inside :func:`restricted`, every submodule sees its restriction to the present tasks (the sub-
vectors, ``k`` for the counts, the gathered state); on exit the hyper-parameters are restored and
the state of the present tasks is written back into the full state, whose absent entries are
untouched. Parameters are not written back: they are read through an indexing of the full
parameter, so the gradient reaches its present entries.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn


def validated_present(present: object, m: int, name: str = "present") -> Tensor | None:
    """The indices (on the CPU) of the present tasks among ``m``; ``None`` when all are present.

    Reading a tensor on a device costs one synchronisation (its values decide the shapes)."""
    if isinstance(present, Tensor):
        if present.dtype != torch.bool:
            raise TypeError(
                f"`{name}` must be a boolean tensor (one entry per task, True where the task is "
                f"present), got a tensor of dtype {present.dtype}. Use e.g. `counts > 0`."
            )
        mask = present.detach().cpu()
    elif isinstance(present, Sequence) and not isinstance(present, str):
        values = list(present)
        if not all(isinstance(v, bool) for v in values):
            wrong = next(v for v in values if not isinstance(v, bool))
            raise TypeError(
                f"`{name}` must hold booleans (True where the task is present), got an element "
                f"{wrong!r} of type {type(wrong).__name__}."
            )
        mask = torch.tensor(values, dtype=torch.bool)
    else:
        raise TypeError(
            f"`{name}` must be a boolean tensor or a sequence of booleans of length {m} (one per "
            f"task), got an object of type {type(present).__name__}."
        )
    if mask.shape != (m,):
        raise ValueError(
            f"`{name}` must have one entry per task ({m}), got shape {tuple(mask.shape)}."
        )
    if bool(mask.all()):
        return None
    return mask.nonzero().view(-1)


def warn_no_task_present(what: str, stacklevel: int) -> None:
    warnings.warn(
        f"No task is present in this step (`present` is all False): {what}.",
        stacklevel=stacklevel + 1,
    )


def _index(value: Tensor, indices: Tensor, n_axes: int) -> Tensor:
    indices = indices.to(value.device)
    for axis in range(n_axes):
        value = value.index_select(axis, indices)
    return value


def _scatter(full: Tensor, sub: Tensor, indices: Tensor, n_axes: int) -> None:
    """Write ``sub`` into the entries of the present tasks of ``full``, in place."""
    indices = indices.to(sub.device)
    if n_axes == 1:
        full[indices] = sub
    else:
        full[indices[:, None], indices] = sub


def _created(sub: Tensor, indices: Tensor, m: int, n_axes: int, fill: Any) -> Tensor:
    """A full state for ``m`` tasks from the state ``sub`` just created for the present ones."""
    shape = (m,) * n_axes + tuple(sub.shape[n_axes:])
    if fill == "mean":
        value = sub.mean(dim=tuple(range(n_axes)), keepdim=True).expand(shape)
        full = value.clone()
    else:
        full = torch.full(shape, float(fill), dtype=sub.dtype, device=sub.device)
    _scatter(full, sub, indices, n_axes)
    return full


@contextmanager
def restricted(module: nn.Module, indices: Tensor | None, m: int) -> Iterator[None]:
    """Within the block, ``module`` and its submodules act on the tasks ``indices`` of ``m``."""
    if indices is None:
        yield
        return
    k = len(indices)
    undo: list[tuple[nn.Module, str, Any]] = []
    states: list[tuple[nn.Module, str, Tensor, int, Any]] = []
    parameters: list[tuple[nn.Module, str, nn.Parameter]] = []
    try:
        for sub in module.modules():
            for name in getattr(type(sub), "_task_vectors", ()):
                value = getattr(sub, name)
                if isinstance(value, Tensor) and value.ndim == 1 and len(value) == m:
                    undo.append((sub, name, value))
                    setattr(sub, name, value.index_select(0, indices.to(value.device)))
            for name in getattr(type(sub), "_task_counts", ()):
                undo.append((sub, name, getattr(sub, name)))
                setattr(sub, name, k)
            for name, n_axes, fill in getattr(type(sub), "_task_state", ()):
                value = getattr(sub, name)
                if not isinstance(value, Tensor):  # not created yet (e.g. None)
                    states.append((sub, name, torch.empty(0), n_axes, fill))
                    continue
                sized = value.numel() > 0 and value.shape[:n_axes] == (m,) * n_axes
                if name in sub._parameters:
                    if sized:  # else the module's own check reports the mismatch
                        parameters.append((sub, name, value))
                        sub._parameters[name] = _index(value, indices, n_axes)  # type: ignore[assignment]
                    continue
                states.append((sub, name, value if sized else value.new_empty(0), n_axes, fill))
                if sized:
                    setattr(sub, name, _index(value, indices, n_axes))
        yield
    finally:
        for sub, name, value in reversed(undo):
            setattr(sub, name, value)
        for sub, name, param in parameters:
            sub._parameters[name] = param
        for sub, name, full, n_axes, fill in states:
            new = getattr(sub, name)
            if not isinstance(new, Tensor) or new.shape[:n_axes] != (k,) * n_axes or k == 0:
                continue  # consumed (e.g. pending losses) or re-created: keep what the call left
            if full.numel() == 0:
                setattr(sub, name, _created(new, indices, m, n_axes, fill))
            else:
                # A copy: the full state may be shared (e.g. by a state_dict taken earlier).
                updated = full.to(device=new.device, dtype=new.dtype, copy=True)
                _scatter(updated, new, indices, n_axes)
                setattr(sub, name, updated)
