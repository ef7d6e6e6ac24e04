"""Every scalarizer of the registry equals itself, built by hand for the present tasks, on the
sub-vector of the present values; an absent value (NaN here) is never read."""

import pytest
import torch
from torch import Tensor
from torch.testing import assert_close

from torchjd.scalarization import COSMOS, DWA, FAMO, IMTLL, PBI, STCH, UW, Constant

from ._registry import SCALARIZERS, Entry, _ramp

M = 4
PRESENT = [True, False, True, True]
KEPT = [0, 2, 3]
K = len(KEPT)
_ONES = torch.ones(K)
_RAMP = _ramp((M,))[KEPT]

# The scalarizers of the registry built by hand for the tasks KEPT (restricted hyper-parameters).
RESTRICTED = {
    "Constant": lambda: Constant(_RAMP),
    "Constant-ones": lambda: Constant(_ONES),
    "COSMOS-uniform": lambda: COSMOS(1.0, _ONES),
    "COSMOS-ramp": lambda: COSMOS(0.5, _RAMP),
    "PBI-uniform": lambda: PBI(5.0, _ONES),
    "PBI-reference": lambda: PBI(2.0, _RAMP, reference=torch.full((K,), 0.25)),
    "STCH-weights-reference": lambda: STCH(0.5, weights=_RAMP, reference=torch.full((K,), 0.1)),
    "FAMO-min-losses": lambda: FAMO(K, min_losses=torch.full((K,), 0.1), lr=0.1, weight_decay=0.0),
}


def _restricted(entry: Entry):
    maker = RESTRICTED.get(entry.id)
    return maker() if maker is not None else entry.make((K,))


def _values() -> Tensor:
    values = 1.0 + torch.arange(M, dtype=torch.float32)
    values[1] = float("nan")
    return values


def _with_state(scalarizer) -> None:
    """Give the per-task parameters distinct values, so that an index mix-up shows."""
    for name in ("log_var", "log_scale", "_w"):
        if hasattr(scalarizer, name):
            with torch.no_grad():
                getattr(scalarizer, name).copy_(torch.linspace(-0.3, 0.4, M))


def _cut_state(full, reference) -> None:
    for name in ("log_var", "log_scale", "_w"):
        if hasattr(full, name):
            with torch.no_grad():
                getattr(reference, name).copy_(getattr(full, name)[KEPT])


@pytest.mark.parametrize("entry", SCALARIZERS, ids=lambda e: e.id)
def test_scalarizer_on_present_values_is_itself_on_the_sub_vector(entry: Entry) -> None:
    scalarizer = entry.make((M,))
    _with_state(scalarizer)
    reference = _restricted(entry)
    _cut_state(scalarizer, reference)
    values = _values().requires_grad_()
    torch.manual_seed(0)
    result = scalarizer(values, present=PRESENT)
    torch.manual_seed(0)
    expected = reference(_values()[KEPT])
    assert_close(result, expected)
    result.backward()
    assert values.grad[1] == 0.0 and torch.isfinite(values.grad).all()


@pytest.mark.parametrize("entry", SCALARIZERS, ids=lambda e: e.id)
def test_all_present_is_bit_identical(entry: Entry) -> None:
    values = 1.0 + torch.arange(M, dtype=torch.float32)
    results = []
    for present in [None, [True] * M]:
        scalarizer = entry.make((M,))
        torch.manual_seed(0)
        results.append(scalarizer(values, present=present))
    assert torch.equal(*results)


def test_parameters_of_absent_tasks_get_no_gradient() -> None:
    uw = UW(M)
    uw(_values(), present=PRESENT).backward()
    # d/ds (e^-s L / 2 + s / 2) = (1 - L e^-s) / 2 at s = 0, for L = 1, 3, 4; 0 for the absent.
    assert_close(uw.log_var.grad, torch.tensor([0.0, 0.0, -1.0, -1.5]))
    assert isinstance(uw.log_var, torch.nn.Parameter)  # still the optimizer's parameter


def test_imtll_parameters_are_restored() -> None:
    imtll = IMTLL(M)
    parameter = imtll.log_scale
    imtll(_values(), present=PRESENT)
    assert imtll.log_scale is parameter


def test_famo_update_moves_only_the_present_logits() -> None:
    famo = FAMO(M, lr=0.1)
    values = _values()
    famo(values, present=PRESENT)
    famo.update(values * 0.5, present=PRESENT)
    logits = famo._w.detach()
    assert logits[1] == 0.0
    # By hand: a three-task FAMO on the present values takes the same step.
    reference = FAMO(K, lr=0.1)
    reference(values[KEPT])
    reference.update(values[KEPT] * 0.5)
    assert_close(logits[KEPT], reference._w.detach())


def test_dwa_keeps_the_history_of_an_absent_task() -> None:
    dwa = DWA()
    for values in ([1.0, 2.0, 4.0], [2.0, 2.0, 2.0]):
        dwa(torch.tensor(values))
        dwa.step()
    # Averages: older (1, 2, 4), newer (2, 2, 2): rates (2, 1, 0.5).
    result = dwa(torch.tensor([3.0, float("nan"), 5.0]), present=[True, False, True])
    # On tasks {0, 2}: lambda = 2 softmax((2, 0.5) / 2).
    weights = 2 * torch.softmax(torch.tensor([1.0, 0.25]), dim=0)
    assert_close(result, weights @ torch.tensor([3.0, 5.0]))
    dwa.step()
    # Task 1 was absent for the whole epoch: it keeps its last average (2).
    assert_close(dwa._newer, torch.tensor([3.0, 2.0, 5.0]))


def test_no_present_value_warns_and_gives_zero() -> None:
    values = _values().requires_grad_()
    with pytest.warns(UserWarning, match="No task is present"):
        result = UW(M)(values, present=[False] * M)
    assert result == 0.0
    result.backward()
    assert torch.equal(values.grad, torch.zeros(M))


def test_present_needs_a_vector_of_values() -> None:
    with pytest.raises(ValueError, match="vector of values"):
        Constant(torch.ones(2, 2))(torch.ones(2, 2), present=[True, False])
