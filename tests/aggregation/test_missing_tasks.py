"""Every aggregator of the registry on steps where some tasks are absent.

A step on the present tasks must equal the step of the same aggregator built by hand for these
tasks only (per-task hyper-parameters restricted below), on the sub-Jacobian; the absent rows
hold NaN, so reading them would show. A stateful aggregator must leave the absent tasks' state
as it was, and its step must equal the step of a copy whose state is cut down by hand to the
present tasks.
"""

import copy

import pytest
import torch
from torch import Tensor
from torch.testing import assert_close

from torchjd.aggregation import (
    ConFIG,
    Constant,
    DualProj,
    GradDrop,
    MConFIGBackward,
    NashMTL,
    UPGrad,
)
from torchjd.autojac import jac_to_grad

from ._entry import Entry
from ._registry import AGGREGATORS

N_COLUMNS = 7  # differs from every number of rows used, so that task axes are recognisable
ABSENT = 1

# The aggregators built by hand for the tasks {0, 2} of the three-task configurations.
_PREF = torch.tensor([1.0, 0.5])
RESTRICTED = {
    "Constant": lambda: Constant(torch.tensor([1.0, 0.5])),
    "NashMTL": lambda: NashMTL(n_tasks=2),
    "UPGrad(pref)": lambda: UPGrad(pref_vector=_PREF),
    "ConFIG(pref)": lambda: ConFIG(pref_vector=_PREF),
    "DualProj(pref)": lambda: DualProj(pref_vector=_PREF),
    "GradDrop(leak)": lambda: GradDrop(leak=torch.tensor([0.5, 1.0])),
}


def _m(entry: Entry) -> int:
    return entry.needs_fixed_m or max(entry.min_rows + 1, 4)


def _present(m: int) -> list[bool]:
    return [i != ABSENT for i in range(m)]


def _jacobian(m: int, seed: int) -> Tensor:
    return torch.randn(m, N_COLUMNS, generator=torch.Generator().manual_seed(seed))


def _step(aggregator, jacobian: Tensor, present: list[bool] | None) -> Tensor:
    p = torch.zeros(N_COLUMNS, requires_grad=True)
    p.jac = jacobian.clone()
    if present is not None:
        p.jac[[i for i, keep in enumerate(present) if not keep]] = float("nan")
    torch.manual_seed(0)
    jac_to_grad([p], aggregator, present=present)
    return p.grad


def _reference_call(aggregator, jacobian: Tensor) -> Tensor:
    torch.manual_seed(0)
    with torch.no_grad():
        return aggregator(jacobian)


def _restricted_maker(entry: Entry):
    return RESTRICTED.get(entry.id, entry.make)


def _state(aggregator) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in aggregator.state_dict().items() if isinstance(v, Tensor)}


def _task_axes(value: Tensor, m: int) -> int:
    """The number of leading dimensions of length ``m`` (the task axes, by shape)."""
    n = 0
    while n < value.ndim and value.shape[n] == m:
        n += 1
    return n


def _cut(value: Tensor, indices: list[int], n_axes: int) -> Tensor:
    for axis in range(n_axes):
        value = value.index_select(axis, torch.tensor(indices))
    return value


@pytest.mark.parametrize("entry", AGGREGATORS, ids=lambda e: e.id)
def test_step_on_a_subset_is_the_step_on_the_sub_jacobian(entry: Entry) -> None:
    m = _m(entry)
    jacobian = _jacobian(m, seed=1)
    present = _present(m)
    kept = [i for i in range(m) if present[i]]
    result = _step(entry.make(), jacobian, present)
    expected = _reference_call(_restricted_maker(entry)(), jacobian[kept])
    assert_close(result, expected, rtol=1e-4, atol=1e-5)


STATEFUL = [e for e in AGGREGATORS if e.stateful]


@pytest.mark.parametrize("entry", STATEFUL, ids=lambda e: e.id)
def test_state_follows_the_present_tasks(entry: Entry) -> None:
    m = _m(entry)
    present = _present(m)
    kept = [i for i in range(m) if present[i]]
    aggregator = entry.make()
    _step(aggregator, _jacobian(m, seed=11), None)
    before = _state(aggregator)

    # By hand: a copy for the present tasks (restricted hyper-parameters), whose state tensors
    # are cut down to these tasks along their task axes.
    reference = _restricted_maker(entry)()
    reference.load_state_dict(copy.deepcopy(aggregator.state_dict()))
    cut = {
        key: _cut(value, kept, _task_axes(value, m)) if _task_axes(value, m) else value
        for key, value in aggregator.state_dict().items()
        if isinstance(value, Tensor)
    }
    reference.load_state_dict({**reference.state_dict(), **cut})

    second = _jacobian(m, seed=12)
    result = _step(aggregator, second, present)
    expected = _step(reference, second[kept], None)
    assert_close(result, expected, rtol=1e-4, atol=1e-5)

    after = _state(aggregator)
    changed = False
    for key, value in before.items():
        n_axes = _task_axes(value, m)
        if n_axes == 0:
            continue
        new = after[key]
        # The absent task's entries are visibly unchanged...
        assert torch.equal(new[ABSENT], value[ABSENT]), key
        if n_axes == 2:
            assert torch.equal(new[:, ABSENT], value[:, ABSENT]), key
        # ... and the present tasks' ones are those of the hand-built step.
        expected_state = reference.state_dict()[key]
        assert_close(_cut(new, kept, n_axes), expected_state.to(new.dtype), rtol=1e-5, atol=1e-6)
        changed = changed or not torch.equal(new, value)
    assert changed, "no per-task state moved: the test would not see a wrong update"


@pytest.mark.parametrize("entry", STATEFUL, ids=lambda e: e.id)
def test_state_dict_round_trips_after_a_partial_step(entry: Entry) -> None:
    m = _m(entry)
    present = _present(m)
    aggregator = entry.make()
    _step(aggregator, _jacobian(m, seed=1), present)
    fresh = entry.make()
    fresh.load_state_dict(copy.deepcopy(aggregator.state_dict()))
    for seed, mask in [(2, present), (3, None)]:
        jacobian = _jacobian(m, seed=seed)
        assert torch.equal(_step(aggregator, jacobian, mask), _step(fresh, jacobian, mask))


def test_mconfig_backward_never_differentiates_an_absent_loss() -> None:
    a = torch.tensor([1.0, 2.0])
    w = torch.tensor([0.5, -1.0], requires_grad=True)
    step = MConFIGBackward([w], beta=0.5)
    nan_loss = (w * 0.0).sum() / torch.tensor(0.0)
    assert step.backward([w @ a, nan_loss], present=[True, False]) == -1
    # By hand: the same first step where loss 1 has a zero gradient.
    w_ref = w.detach().clone().requires_grad_()
    reference = MConFIGBackward([w_ref], beta=0.5)
    reference.backward([w_ref @ a, (w_ref * 0.0).sum()])
    assert torch.isfinite(w.grad).all()
    assert_close(w.grad, w_ref.grad)
    momenta = step.aggregator._momenta.clone()
    assert torch.equal(momenta[1], torch.zeros(2))

    # Loss 0's turn passes to loss 1, the only present one; loss 0's momentum stays.
    b = torch.tensor([-1.0, 1.0])
    assert step.backward([(w * 0.0).sum() / torch.tensor(0.0), w @ b], present=[False, True]) == 1
    assert torch.equal(step.aggregator._momenta[0], momenta[0])
    assert_close(step.aggregator._momenta[1], 0.5 * b)
