"""Small helpers shared by several aggregators."""

from collections.abc import Sequence

import torch
from torch import Tensor

from torchjd._hyperparameters import check_vector
from torchjd._hyperparameters import (
    format_vector as format_vector,  # re-exported for the aggregators
)
from torchjd.aggregation._bases import Weighting
from torchjd.linalg._block_pivoting import BlockPivotingProjector


def check_pref_vector(pref_vector: Tensor | None) -> None:
    check_vector(pref_vector, "pref_vector", optional=True)


def pref_vector_to_weighting(pref_vector: Tensor | None, default: Weighting) -> Weighting:
    """The weighting that produces the preference weights: ``default`` or the constant vector."""
    from torchjd.aggregation._constant import ConstantWeighting

    check_pref_vector(pref_vector)
    if pref_vector is None:
        return default
    return ConstantWeighting(pref_vector)


def pref_vector_str(name: str, pref_vector: Tensor | None) -> str:
    return name if pref_vector is None else f"{name}({format_vector(pref_vector)})"


def check_one_weighting_per_gramian(weightings: Sequence[Weighting], gramians: Tensor) -> None:
    if len(weightings) != gramians.shape[0]:
        raise ValueError(
            f"Got {len(weightings)} weightings for {gramians.shape[0]} Gramians: give one "
            "weighting per Gramian."
        )


def stacked_preferences(weightings: Sequence[Weighting], gramians: Tensor) -> Tensor:
    """The preference weights ``[b, m]`` of a batch of Gramians ``[b, m, m]``, the ``k``-th from
    the preference weighting (child ``weighting``) of ``weightings[k]``; computed once when every
    weighting uses the default preference."""
    b, m = gramians.shape[0], gramians.shape[-1]
    dtype, device = gramians.dtype, gramians.device
    if all(w.pref_vector is None for w in weightings):
        return weightings[0].weighting(gramians[0]).to(dtype=dtype, device=device).expand(b, m)
    return torch.stack(
        [w.weighting(G).to(dtype=dtype, device=device) for w, G in zip(weightings, gramians)]
    )


def indices_by_projector(weightings: Sequence[Weighting]) -> list[list[int]]:
    """Indices of the weightings whose projectors compute the same thing (equal
    :class:`~torchjd.linalg.BlockPivotingProjector` settings, or the same projector object)."""
    groups: dict[object, list[int]] = {}
    for k, w in enumerate(weightings):
        projector = w.projector
        key: object = (
            ("block_pivoting", projector.norm_eps, projector.reg_eps)
            if type(projector) is BlockPivotingProjector
            else id(projector)
        )
        groups.setdefault(key, []).append(k)
    return list(groups.values())
