"""MTLEngine with absent tasks: the step of mtl_backward + jac_to_grad with the same `present`."""

import warnings
from collections.abc import Callable

import pytest
import torch

from tests.autogram._mtl_models import forward, make_model
from torchjd.aggregation import Aggregator, Constant, GradVac, UPGrad
from torchjd.autogram import MTLEngine
from torchjd.autojac import jac_to_grad, mtl_backward
from torchjd.grouping import GroupedAggregator, per_layer

PRESENT = [[True, False, True], [False, True, True], [True, True, True]]


def _weights() -> Aggregator:
    return Constant(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))


def _absent_loss_is_nan(losses: list[torch.Tensor], present: list[bool]) -> list[torch.Tensor]:
    # An absent task's loss is never differentiated: make it NaN to see it is never read.
    return [loss if p else loss * torch.nan for loss, p in zip(losses, present)]


@pytest.mark.parametrize("make", [UPGrad, _weights, GradVac], ids=["UPGrad", "Constant", "GradVac"])
def test_ungrouped_steps_match_the_autojac_steps(make: Callable[[], Aggregator]) -> None:
    expected_model, model = make_model("mlp", 3), make_model("mlp", 3)
    expected_aggregator, aggregator = make(), make()
    engine = MTLEngine(model.trunk)
    for step, present in enumerate(PRESENT):  # stateful aggregators carry their state through
        losses, features = forward(expected_model, step)
        mtl_backward(_absent_loss_is_nan(losses, present), features=features, present=present)
        params = list(expected_model.trunk.parameters())
        expected = jac_to_grad(params, expected_aggregator, present=present)
        losses, features = forward(model, step)
        losses = _absent_loss_is_nan(losses, present)
        weights = engine.backward(losses, features, aggregator, present=present)
        torch.testing.assert_close(weights, expected)
        for p, e in zip(model.all_parameters(), expected_model.all_parameters()):
            if e.grad is None:
                assert p.grad is None
            else:
                torch.testing.assert_close(p.grad, e.grad)
    assert torch.equal(weights[2], expected[2])


def test_grouped_steps_match_the_grouped_autojac_steps() -> None:
    expected_model, model = make_model("mlp", 3), make_model("mlp", 3)
    expected = GroupedAggregator(per_layer(expected_model.trunk), GradVac)
    grouped = GroupedAggregator(per_layer(model.trunk), GradVac)
    engine = MTLEngine(model.trunk)
    for step, present in enumerate(PRESENT):
        losses, features = forward(expected_model, step)
        mtl_backward(_absent_loss_is_nan(losses, present), features=features, present=present)
        expected_weights = expected.jac_to_grad(present=present)
        losses, features = forward(model, step)
        weights = engine.backward(
            _absent_loss_is_nan(losses, present), features, grouped, present=present
        )
        for w, e in zip(weights, expected_weights):
            torch.testing.assert_close(w, e)
        for p, e in zip(model.all_parameters(), expected_model.all_parameters()):
            torch.testing.assert_close(p.grad, e.grad)


def test_no_task_present_leaves_the_grads_untouched() -> None:
    model = make_model("mlp", 2)
    engine = MTLEngine(model.trunk)
    losses, features = forward(model, 0)
    with pytest.warns(UserWarning, match="No task is present"):
        weights = engine.backward(losses, features, UPGrad(), present=[False, False])
    assert torch.equal(weights, torch.zeros(2, dtype=weights.dtype))
    assert all(p.grad is None for p in model.all_parameters())
    # The next step is an ordinary one.
    losses, features = forward(model, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        engine.backward(losses, features, UPGrad())
    assert all(isinstance(p.grad, torch.Tensor) for p in model.trunk.parameters())


def test_present_of_the_wrong_length_is_refused() -> None:
    model = make_model("mlp", 2)
    engine = MTLEngine(model.trunk)
    losses, features = forward(model, 0)
    with pytest.raises(ValueError, match="present"):
        engine.backward(losses, features, UPGrad(), present=[True])
