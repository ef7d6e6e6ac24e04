"""One line of the registry of aggregators: a configuration and the guarantees it claims."""

from collections.abc import Callable
from dataclasses import dataclass

from torchjd.aggregation import Aggregator


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
