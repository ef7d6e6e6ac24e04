"""Checks shared by the tests of stateful weightings and aggregators."""

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn


def assert_reset_restores_fresh_behaviour(
    make: Callable[[], nn.Module], history: Sequence[Tensor], probes: Sequence[Tensor]
) -> None:
    """After some calls and ``reset()``, the outputs on ``probes`` are a fresh instance's."""
    used = make()
    for stat in history:
        used(stat)
    used.reset()
    fresh = make()
    for stat in probes:
        torch.testing.assert_close(used(stat), fresh(stat), rtol=0, atol=0)


def assert_state_dict_round_trip(
    make: Callable[[], nn.Module], history: Sequence[Tensor], future: Sequence[Tensor]
) -> None:
    """The ``state_dict`` of a used instance loads (strict) into a fresh one, after which both
    give identical outputs."""
    used = make()
    for stat in history:
        used(stat)
    restored = make()
    restored.load_state_dict(used.state_dict(), strict=True)
    for stat in future:
        torch.testing.assert_close(restored(stat), used(stat), rtol=0, atol=0)


def assert_state_differs_from_fresh(
    make: Callable[[], nn.Module], history: Sequence[Tensor], probe: Tensor
) -> None:
    """The object really is stateful on these inputs (so that the checks above can fail)."""
    used = make()
    for stat in history:
        used(stat)
    assert not torch.equal(used(probe), make()(probe))


def assert_outputs_do_not_alias_the_state(
    make: Callable[[], nn.Module], history: Sequence[Tensor], probe: Tensor
) -> None:
    """Writing into a returned tensor does not change the object's later outputs."""
    touched, untouched = make(), make()
    for stat in history:
        touched(stat).mul_(-3.0)
        untouched(stat)
    torch.testing.assert_close(touched(probe), untouched(probe), rtol=0, atol=0)
