"""Checks of torchjd.distributed that need no process group: arguments, generator state, marks."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import Tensor

import torchjd._synchronization as synchronization
from torchjd import distributed
from torchjd.aggregation import Mean, UPGrad
from torchjd.autojac import jac_to_grad
from torchjd.distributed._comm import RngScope, rng_slot, rng_state_from_slot


def _tensors() -> list[Tensor]:
    p = torch.zeros(2, requires_grad=True)
    q = torch.zeros(3, requires_grad=True)
    p.jac, q.jac = torch.ones(2, 2), torch.ones(2, 3)
    return [p, q]


def _head() -> Tensor:
    h = torch.zeros(2, requires_grad=True)
    h.grad = torch.ones(2)
    return h


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"rows": "sum"}, ValueError, "`rows` must be one of 'mean', 'stack', got 'sum'"),
        ({"strategy": "fast"}, ValueError, "`strategy` must be one of"),
        ({"share_rng_state": 1}, TypeError, "`share_rng_state` must be a bool, got 1"),
        ({"strategy": "update"}, ValueError, "`strategy='update'` needs an aggregator"),
        ({"grad_params": torch.zeros(2)}, ValueError, "`grad_params` must be an iterable"),
    ],
)
def test_jac_to_grad_rejects_bad_arguments(
    kwargs: dict[str, object], error: type, match: str
) -> None:
    tensors = _tensors()
    with pytest.raises(error, match=match):
        distributed.jac_to_grad(tensors, UPGrad(), **kwargs)
    assert all(hasattr(t, "jac") for t in tensors)  # nothing was deleted


def test_gramian_strategy_needs_a_gramian_aggregator() -> None:
    with pytest.raises(ValueError, match="`strategy='gramian'` needs"):
        distributed.jac_to_grad(_tensors(), Mean(), strategy="gramian")


def test_gramian_strategy_refuses_hooks_it_would_not_run() -> None:
    aggregator = UPGrad()
    aggregator.register_forward_hook(lambda *args: None)
    with pytest.raises(ValueError, match="without forward hooks"):
        distributed.jac_to_grad(_tensors(), aggregator, strategy="gramian")


def test_optimize_gramian_computation_is_validated_as_in_autojac() -> None:
    with pytest.raises(ValueError, match="optimize_gramian_computation"):
        distributed.jac_to_grad(_tensors(), Mean(), optimize_gramian_computation=True)


def test_grad_params_must_have_a_grad() -> None:
    h = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match=r"`grad_params` .* has no `\.grad`"):
        distributed.jac_to_grad(_tensors(), UPGrad(), grad_params=[h])


def test_grad_params_must_not_overlap_tensors() -> None:
    tensors = _tensors()
    tensors[0].grad = torch.ones(2)
    with pytest.raises(ValueError, match="also in `tensors`"):
        distributed.sync_jac(tensors, grad_params=[tensors[0]])


def test_grad_params_must_be_unique() -> None:
    h = _head()
    with pytest.raises(ValueError, match="`grad_params` must not contain the same tensor twice"):
        distributed.jac_to_grad(_tensors(), UPGrad(), grad_params=[h, h])


def test_missing_jac_is_reported_before_anything_else() -> None:
    p = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match=r"has no `\.jac` field"):
        distributed.sync_jac([p])


@pytest.mark.parametrize("function", [distributed.jac_to_grad, distributed.sync_jac])
def test_a_process_group_is_required(function: object) -> None:
    tensors = _tensors()
    args = (tensors, UPGrad()) if function is distributed.jac_to_grad else (tensors,)
    with pytest.raises(RuntimeError, match="init_process_group"):
        function(*args)  # type: ignore[operator]
    assert all(hasattr(t, "jac") for t in tensors)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_the_generator_state_travels_exactly_in_every_float_dtype(dtype: torch.dtype) -> None:
    state = torch.get_rng_state()
    # What the first process sends, summed with what the others send (zeros).
    summed = rng_slot(0, dtype, torch.device("cpu")) + rng_slot(1, dtype, torch.device("cpu")) * 3
    assert torch.equal(rng_state_from_slot(summed), state)


def test_rng_scope_lends_the_first_process_state_and_gives_it_back() -> None:
    torch.manual_seed(1)
    first = torch.get_rng_state()
    expected_draw = torch.rand(3)
    torch.manual_seed(2)
    own = torch.get_rng_state()
    own_draw = torch.rand(3)
    torch.set_rng_state(own)

    with RngScope(first, rank=1):
        assert torch.equal(torch.rand(3), expected_draw)
    assert torch.equal(torch.rand(3), own_draw)  # its own state, not advanced

    torch.set_rng_state(own)
    with RngScope(first, rank=0):  # the first process keeps its own generator
        assert torch.equal(torch.rand(3), own_draw)


def test_no_warning_outside_a_process_group() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jac_to_grad(_tensors(), Mean())


class _FakeGroup:
    """Makes ``torch.distributed`` report an initialised default group of two processes."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(synchronization.dist, "is_available", lambda: True)
        monkeypatch.setattr(synchronization.dist, "is_initialized", lambda: True)
        monkeypatch.setattr(synchronization.dist, "get_world_size", lambda group=None: 2)


def test_unsynchronised_jacobians_warn_in_a_process_group(monkeypatch: pytest.MonkeyPatch) -> None:
    _FakeGroup(monkeypatch)
    with pytest.warns(distributed.UnsynchronizedJacobianWarning, match="2 processes"):
        jac_to_grad(_tensors(), Mean())


def test_marked_jacobians_do_not_warn_until_changed(monkeypatch: pytest.MonkeyPatch) -> None:
    _FakeGroup(monkeypatch)
    tensors = _tensors()
    for t in tensors:
        synchronization.mark_synchronized(t.jac)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jac_to_grad(tensors, Mean(), retain_jac=True)

    tensors[1].jac.add_(1.0)  # e.g. a later backward accumulating a local Jacobian
    with pytest.warns(distributed.UnsynchronizedJacobianWarning):
        jac_to_grad(tensors, Mean())


def test_grouped_aggregator_warns_on_unsynchronised_jacobians(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from torchjd.grouping import GroupedAggregator

    _FakeGroup(monkeypatch)
    tensors = _tensors()
    grouped = GroupedAggregator([[t] for t in tensors], Mean())
    with pytest.warns(distributed.UnsynchronizedJacobianWarning, match="2 processes"):
        grouped.jac_to_grad()
