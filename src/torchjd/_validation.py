"""Checks of the arguments of the public functions of :mod:`torchjd.autojac`.

Every function here either returns a normalised version of its argument or raises an error that
names the argument, shows what was received and says what is allowed.
"""

from collections.abc import Iterable, Sequence

from torch import Tensor

from torchjd.aggregation import Aggregator


def check_chunk_size(parallel_chunk_size: object) -> None:
    """``parallel_chunk_size`` must be ``None`` or an ``int >= 1`` (a ``bool`` is refused)."""
    if parallel_chunk_size is None:
        return
    if isinstance(parallel_chunk_size, bool) or not isinstance(parallel_chunk_size, int):
        raise TypeError(
            "`parallel_chunk_size` must be None or a positive int, got "
            f"{parallel_chunk_size!r} of type {type(parallel_chunk_size).__name__}."
        )
    if parallel_chunk_size <= 0:
        raise ValueError(
            f"`parallel_chunk_size` must be None or a positive int, got {parallel_chunk_size}. "
            "Use None to differentiate all the rows in one vectorised call."
        )


def as_tensor_list(tensors: object, name: str) -> list[Tensor]:
    """A single tensor becomes a one-element list; a sized sequence of tensors becomes a list."""
    if isinstance(tensors, Tensor):
        return [tensors]
    if not isinstance(tensors, Sequence) or isinstance(tensors, str):
        raise TypeError(
            f"`{name}` must be a tensor or a sequence (list or tuple) of tensors, got an object "
            f"of type {type(tensors).__name__}. Materialise an iterator with `list(...)`."
        )
    result = list(tensors)
    _check_all_tensors(result, name)
    return result


def materialise(tensors: Iterable[Tensor], name: str) -> list[Tensor]:
    """Iterate ``tensors`` exactly once into a list (generators such as ``parameters()`` work)."""
    if isinstance(tensors, Tensor):
        # A ValueError, as TorchJD's (which iterates over the slices of the tensor, then fails).
        raise ValueError(
            f"`{name}` must be an iterable of tensors, got a single tensor of shape "
            f"{tuple(tensors.shape)}: wrap it in a list, e.g. `[t]`."
        )
    try:
        result = list(tensors)
    except TypeError:
        raise TypeError(
            f"`{name}` must be an iterable of tensors, got an object of type "
            f"{type(tensors).__name__}."
        ) from None
    _check_all_tensors(result, name)
    return result


def _check_all_tensors(tensors: list[object], name: str) -> None:
    for i, t in enumerate(tensors):
        if not isinstance(t, Tensor):
            raise TypeError(
                f"`{name}` must contain only tensors, but element {i} is of type "
                f"{type(t).__name__}."
            )


def check_unique(tensors: list[Tensor], name: str) -> None:
    """The same tensor object must not appear twice (tensors are compared by identity)."""
    seen: set[int] = set()
    for i, t in enumerate(tensors):
        if id(t) in seen:
            raise ValueError(
                f"`{name}` must not contain the same tensor twice, but element {i} (shape "
                f"{tuple(t.shape)}) already appears before it."
            )
        seen.add(id(t))


def check_non_empty(tensors: list[Tensor], name: str) -> None:
    if len(tensors) == 0:
        raise ValueError(f"`{name}` must contain at least one tensor, got an empty collection.")


def deduplicate(tensors: list[Tensor]) -> list[Tensor]:
    """Remove repeated tensor objects, keeping the order of first occurrence."""
    seen: set[int] = set()
    result = []
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            result.append(t)
    return result


def rows_shape(shape: Sequence[int]) -> str:
    """``"[m, 2, 3]"`` for ``shape == (2, 3)``: how a Jacobian w.r.t. a tensor is shaped."""
    return "[" + ", ".join(["m", *(str(s) for s in shape)]) + "]"


def check_has_grad_fn(tensors: list[Tensor], name: str, purpose: str) -> None:
    """Inferring leaves starts from ``grad_fn``: a leaf or a tensor not requiring grad has none."""
    for i, t in enumerate(tensors):
        if t.grad_fn is None:
            kind = "a leaf tensor" if t.requires_grad else "a tensor that does not require grad"
            raise ValueError(
                f"Element {i} of `{name}` (shape {tuple(t.shape)}) is {kind}, so it has no "
                f"`grad_fn` from which to {purpose}. Pass the tensors to differentiate with "
                "respect to explicitly, or give a tensor computed from them."
            )


def check_initial_jacobians(
    jacobians: object, tensors: list[Tensor], jac_name: str, tensors_name: str
) -> list[Tensor]:
    """Validate the user's initial Jacobians and return them as a list.

    One per tensor, ``jacobians[i].shape == (m, *tensors[i].shape)`` with one common ``m >= 1``.
    """
    jacs = as_tensor_list(jacobians, jac_name)
    if len(jacs) != len(tensors):
        raise ValueError(
            f"`{jac_name}` must contain one Jacobian per tensor of `{tensors_name}`: got "
            f"{len(jacs)} Jacobian(s) for {len(tensors)} tensor(s)."
        )
    for i, (j, t) in enumerate(zip(jacs, tensors)):
        if j.ndim != t.ndim + 1 or j.shape[1:] != t.shape:
            raise ValueError(
                f"`{jac_name}[{i}]` must have shape [m, *{tensors_name}[{i}].shape] = "
                f"{rows_shape(t.shape)} (one row per objective), got shape {tuple(j.shape)}."
            )
    rows = [j.shape[0] for j in jacs]
    if any(r != rows[0] for r in rows):
        raise ValueError(
            f"All the Jacobians of `{jac_name}` must have the same number of rows (their first "
            f"dimension), got {rows}."
        )
    if rows[0] == 0:
        raise ValueError(
            f"The Jacobians of `{jac_name}` have 0 rows: give at least one row (objective)."
        )
    return jacs


def check_aggregator(aggregator: object, name: str = "aggregator") -> None:
    if not isinstance(aggregator, Aggregator):
        hint = " (a string names no aggregator)" if isinstance(aggregator, str) else ""
        raise TypeError(
            f"`{name}` must be an Aggregator of torchjd.aggregation (e.g. `UPGrad()`), got an "
            f"object of type {type(aggregator).__name__}{hint}. To use a function `J -> vector`, "
            "subclass `torchjd.aggregation.Aggregator` and implement `forward`."
        )


def validated_jacobians(tensors: list[Tensor], name: str = "tensors") -> list[Tensor]:
    """The ``.jac`` fields of ``tensors``, after every check; nothing is mutated."""
    if not tensors:
        raise ValueError(
            f"`{name}` must contain at least one tensor, got an empty collection. A generator "
            "such as `model.parameters()` can be iterated only once: if it was already consumed "
            "(e.g. at an earlier step), pass a list, e.g. `list(model.parameters())`."
        )
    for i, t in enumerate(tensors):
        if not hasattr(t, "jac"):
            raise ValueError(f"Element {i} of `{name}` {_missing_jac_reason(t)}")
    jacobians = [t.jac for t in tensors]
    for i, j in enumerate(jacobians):
        if not isinstance(j, Tensor) or j.ndim == 0:
            what = f"shape {tuple(j.shape)}" if isinstance(j, Tensor) else type(j).__name__
            raise ValueError(
                f"The `.jac` of element {i} of `{name}` must be a tensor of shape "
                f"{rows_shape(tensors[i].shape)}, got {what}."
            )
    rows = [j.shape[0] for j in jacobians]
    if any(r != rows[0] for r in rows):
        raise ValueError(
            f"The `.jac` fields of `{name}` must all have the same number of rows (one per "
            f"objective), got {rows}. Each must come from the same objectives."
        )
    check_unique(tensors, name)
    for i, (t, j) in enumerate(zip(tensors, jacobians)):
        if j.shape[1:] != t.shape:
            raise ValueError(
                f"The `.jac` of element {i} of `{name}` must have shape {rows_shape(t.shape)} "
                f"for a tensor of shape {tuple(t.shape)}, got {tuple(j.shape)}."
            )
    if rows[0] == 0:
        raise ValueError(
            f"The `.jac` fields of `{name}` have 0 rows: there is no objective to aggregate."
        )
    return jacobians


def _missing_jac_reason(t: Tensor) -> str:
    shape = tuple(t.shape)
    if was_consumed(t):
        return (
            f"(shape {shape}) has no `.jac`: an earlier `jac_to_grad` consumed it. Pass "
            "`retain_jac=True` to that call to keep it, or compute the Jacobian again."
        )
    if t.grad is not None:
        return (
            f"(shape {shape}) has no `.jac` but has a `.grad`: `mtl_backward` gives the task "
            "heads ordinary gradients and the shared parameters a `.jac`, so pass only the "
            "shared parameters (e.g. `trunk.parameters()`)."
        )
    return (
        f"(shape {shape}) has no `.jac` field. Fill it with `backward` or `mtl_backward` first "
        "(or leave that tensor out)."
    )


# Set on a tensor whose `.jac` an aggregation consumed, to explain a missing `.jac` later.
_CONSUMED = "_torchjd_jac_consumed"


def mark_consumed(t: Tensor) -> None:
    setattr(t, _CONSUMED, True)


def was_consumed(t: Tensor) -> bool:
    return getattr(t, _CONSUMED, False)
