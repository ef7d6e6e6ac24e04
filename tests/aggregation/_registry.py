"""The registry of aggregators: one line per class, with the properties it claims.

The shared property tests (``test_registry.py``) are parametrised over ``AGGREGATORS``. Adding an
aggregator to the library means adding one ``Entry`` here; its own test file then only holds the
values worked out by hand and the checks against an independent solver.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch

from torchjd.aggregation import (
    MGDA,
    Aggregator,
    Constant,
    GradVac,
    Mean,
    PCGrad,
    Random,
    Sum,
    UPGrad,
)
from torchjd.linalg import BlockPivotingProjector, QuadprogProjector


@dataclass(frozen=True)
class Entry:
    """One aggregator configuration and the guarantees it claims."""

    id: str
    make: Callable[[], Aggregator]
    non_conflicting: bool = False  # J @ aggregate >= -conflict_tol * ||J|| * ||aggregate||
    conflict_tol: float = 1e-6
    permutation_invariant: bool = False  # row order does not matter
    stateful: bool = False  # a torchjd.Stateful: reset() and state_dict() round trip
    randomised: bool = False  # draws from the global RNG: seed before comparing outputs
    differentiable: bool = False  # output requires grad when the input does
    min_rows: int = 1  # smallest m it accepts
    needs_fixed_m: int | None = None  # only works with exactly this many rows (e.g. Constant)


def _constant3() -> Aggregator:
    return Constant(torch.tensor([1.0, 2.0, 0.5]))


def _upgrad_pref3() -> Aggregator:
    return UPGrad(pref_vector=torch.tensor([1.0, 2.0, 0.5]))


def _upgrad_exact() -> Aggregator:
    return UPGrad(projector=BlockPivotingProjector(norm_eps=0.0, reg_eps=0.0))


def _upgrad_quadprog() -> Aggregator:
    return UPGrad(projector=QuadprogProjector())


AGGREGATORS: list[Entry] = [
    Entry("Mean", Mean, permutation_invariant=True, differentiable=True),
    Entry("Sum", Sum, permutation_invariant=True, differentiable=True),
    Entry("Constant", _constant3, differentiable=True, needs_fixed_m=3),
    Entry("Random", Random, randomised=True, differentiable=True),
    # MGDA's Frank-Wolfe stops at an approximate min-norm point: its conflict is bounded by
    # epsilon * max_k ||g_k||^2 (tested in test_mgda.py), not relatively to the output's norm.
    Entry("MGDA", MGDA, permutation_invariant=True, differentiable=True),
    Entry("PCGrad", PCGrad, randomised=True),
    Entry("GradVac", GradVac, randomised=True, stateful=True),
    # UPGrad conflicts with no row, but the relative check above is meaningless when the exact
    # output is 0 (rows spanning opposite directions, n < m): the output is then rounding noise.
    # Its non-conflict is tested in test_upgrad.py on full-row-rank matrices.
    Entry("UPGrad", UPGrad, permutation_invariant=True),
    Entry("UPGrad(pref)", _upgrad_pref3, needs_fixed_m=3),
    Entry("UPGrad(exact)", _upgrad_exact, permutation_invariant=True),
    Entry("UPGrad(quadprog)", _upgrad_quadprog, permutation_invariant=True),
]
