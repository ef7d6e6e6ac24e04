"""The registry of scalarizers: one line per configuration, with the properties it claims.

The shared property tests (``test_registry.py``) are parametrised over ``SCALARIZERS``. Each
``make`` builds an instance for values of a given shape (scalarizers holding a parameter or a
tensor hyper-parameter are bound to that shape). Adding a scalarizer means adding an ``Entry``
here; its own test file then only holds the values worked out by hand.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from torchjd.scalarization import (
    COSMOS,
    DWA,
    FAMO,
    IMTLL,
    PBI,
    STCH,
    UW,
    Constant,
    GeometricMean,
    Mean,
    Random,
    Scalarizer,
    Sum,
)

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Entry:
    """One scalarizer configuration and the guarantees it claims."""

    id: str
    make: Callable[[Shape], Scalarizer]  # an instance accepting values of this shape
    shape_bound: bool = False  # rejects values of another shape than the one it was built for
    stateful: bool = False  # a torchjd.Stateful: reset() and state_dict() round trip
    randomised: bool = False  # draws from the global RNG: seed before comparing outputs
    permutation_invariant: bool = False  # shuffling the values does not change the result
    takes_log: bool = False  # negative values are rejected (a logarithm is taken)
    allows_empty: bool = True  # an empty tensor of values gives a finite result
    # What a training step does besides the forward pass (``step()``, ``update()``...), given the
    # index of the step and the values of the forward pass.
    advance: Callable[[Scalarizer, int, Tensor], None] | None = None


def _ramp(shape: Shape) -> Tensor:
    """Distinct positive entries of the given shape: 0.5, 0.75, 1., ..."""
    n = torch.Size(shape).numel()
    return (0.5 + 0.25 * torch.arange(n, dtype=torch.float32)).reshape(shape)


def _uniform(shape: Shape) -> Tensor:
    return torch.ones(shape)


def _dwa_advance(scalarizer: Scalarizer, i: int, _: Tensor) -> None:
    assert isinstance(scalarizer, DWA)
    if i % 2 == 1:  # two batches per epoch
        scalarizer.step()


def _famo_advance(scalarizer: Scalarizer, _: int, values: Tensor) -> None:
    assert isinstance(scalarizer, FAMO)
    decrease = torch.linspace(0.5, 1.0, values.numel(), dtype=values.dtype, device=values.device)
    decrease = decrease.reshape(values.shape)
    scalarizer.update(values.detach() * decrease)


SCALARIZERS: list[Entry] = [
    Entry("Mean", lambda _: Mean(), permutation_invariant=True, allows_empty=False),
    Entry("Sum", lambda _: Sum(), permutation_invariant=True),
    Entry(
        "GeometricMean",
        lambda _: GeometricMean(),
        permutation_invariant=True,
        takes_log=True,
        allows_empty=False,
    ),
    Entry("Random", lambda _: Random(), randomised=True),
    Entry("Constant", lambda s: Constant(_ramp(s)), shape_bound=True),
    Entry(
        "Constant-ones",
        lambda s: Constant(_uniform(s)),
        shape_bound=True,
        permutation_invariant=True,
    ),
    Entry(
        "COSMOS-uniform",
        lambda s: COSMOS(1.0, _uniform(s)),
        shape_bound=True,
        permutation_invariant=True,
    ),
    Entry("COSMOS-ramp", lambda s: COSMOS(0.5, _ramp(s)), shape_bound=True),
    Entry(
        "PBI-uniform",
        lambda s: PBI(5.0, _uniform(s)),
        shape_bound=True,
        permutation_invariant=True,
        allows_empty=False,
    ),
    Entry(
        "PBI-reference",
        lambda s: PBI(2.0, _ramp(s), reference=torch.full(s, 0.25)),
        shape_bound=True,
        allows_empty=False,
    ),
    Entry("STCH", lambda _: STCH(1.0), permutation_invariant=True, allows_empty=False),
    Entry(
        "STCH-weights-reference",
        lambda s: STCH(0.5, weights=_ramp(s), reference=torch.full(s, 0.1)),
        shape_bound=True,
        allows_empty=False,
    ),
    Entry("UW", lambda s: UW(s), shape_bound=True, stateful=True),
    Entry("IMTLL", lambda s: IMTLL(s), shape_bound=True, stateful=True),
    Entry("DWA", lambda _: DWA(), stateful=True, advance=_dwa_advance),
    Entry("DWA-T1.5", lambda _: DWA(temperature=1.5), stateful=True, advance=_dwa_advance),
    Entry(
        "FAMO",
        lambda s: FAMO(s),
        shape_bound=True,
        stateful=True,
        takes_log=True,
        allows_empty=False,
        advance=_famo_advance,
    ),
    Entry(
        "FAMO-min-losses",
        lambda s: FAMO(s, min_losses=torch.full(s, 0.1), lr=0.1, weight_decay=0.0),
        shape_bound=True,
        stateful=True,
        takes_log=True,
        allows_empty=False,
        advance=_famo_advance,
    ),
]
