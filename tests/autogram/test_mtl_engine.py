"""MTLEngine: the two-phase form, the checks of its arguments, and what it refuses."""

import pytest
import torch
from torch import Tensor, nn

from tests.autogram._mtl_models import Model, forward, make_model
from torchjd.aggregation import ConFIG, GradDrop, Mean, UPGrad
from torchjd.autogram import MTLEngine
from torchjd.autojac import jac_to_grad, mtl_backward
from torchjd.grouping import GroupedAggregator, per_layer, together


def test_two_phase_form_composes_with_a_scaled_backward() -> None:
    expected_model = make_model("mlp", 3)
    losses, features = forward(expected_model, 0)
    mtl_backward(losses, features=features)
    expected_weights = jac_to_grad(expected_model.trunk.parameters(), UPGrad())

    model = make_model("mlp", 3)
    engine = MTLEngine(model.trunk)
    losses, _ = forward(model, 0, views=lambda f: engine.task_views(f, 3))
    weights = engine.weigh(losses, UPGrad())
    (3.0 * sum(losses)).backward()  # as a gradient scaler would
    torch.testing.assert_close(weights, expected_weights)
    for p, e in zip(model.all_parameters(), expected_model.all_parameters()):
        torch.testing.assert_close(p.grad / 3.0, e.grad)


def _two_tasks(model: Model, x: Tensor) -> tuple[list[Tensor], list[Tensor]]:
    """Two features (halves of the trunk's output): task 0 reads the first, task 1 both."""
    first, second = model.trunk(x).split(2, dim=1)
    loss_0 = model.heads[0](torch.cat([first, first], dim=1)).mean()
    loss_1 = model.heads[1](torch.cat([first, second], dim=1)).pow(2).sum()
    return [loss_0, loss_1], [first, second]


def test_several_features() -> None:
    model = make_model("mlp", 2)
    engine = MTLEngine(model.trunk)
    x = torch.randn(4, 5, dtype=torch.float64)
    losses, features = _two_tasks(model, x)
    engine.backward(losses, features, UPGrad())
    actual = [p.grad.clone() for p in model.all_parameters()]

    for p in model.all_parameters():
        p.grad = None
    losses, features = _two_tasks(model, x)
    mtl_backward(losses, features=features)
    jac_to_grad(model.trunk.parameters(), UPGrad())
    for a, p in zip(actual, model.all_parameters()):
        torch.testing.assert_close(a, p.grad)


@pytest.mark.parametrize("aggregator", [GradDrop(), ConFIG()], ids=lambda a: type(a).__name__)
def test_aggregators_that_need_the_matrix_are_refused(aggregator: nn.Module) -> None:
    model = make_model("mlp", 3)
    engine = MTLEngine(model.trunk)
    losses, features = forward(model, 0)
    with pytest.raises(ValueError, match=r"needs the whole Jacobian.*mtl_backward"):
        engine.backward(losses, features, aggregator)
    grouped = GroupedAggregator(together(model.trunk), aggregator)
    with pytest.raises(ValueError, match="mtl_backward"):
        engine.backward(losses, features, grouped)


def test_hooks_on_the_aggregator_are_refused() -> None:
    model = make_model("mlp", 3)
    engine = MTLEngine(model.trunk)
    losses, features = forward(model, 0)
    aggregator = UPGrad()
    aggregator.register_forward_hook(lambda *args: None)
    with pytest.raises(ValueError, match="whole Jacobian"):
        engine.backward(losses, features, aggregator)


def test_not_an_aggregator() -> None:
    model = make_model("mlp", 2)
    engine = MTLEngine(model.trunk)
    losses, features = forward(model, 0)
    with pytest.raises(TypeError, match="Aggregator"):
        engine.backward(losses, features, "upgrad")  # type: ignore[arg-type]


def test_groups_must_be_the_trunk_parameters() -> None:
    model = make_model("mlp", 2)
    engine = MTLEngine(model.trunk)
    losses, features = forward(model, 0)
    missing = GroupedAggregator([list(model.trunk[0].parameters())], UPGrad)
    with pytest.raises(ValueError, match=r"`weight` of the hooked module `Linear` is in no group"):
        engine.backward(losses, features, missing)
    losses, features = forward(model, 0)
    with_head = GroupedAggregator(
        [list(model.trunk.parameters()), list(model.heads[0].parameters())], UPGrad
    )
    with pytest.raises(ValueError, match=r"groups\[1\].*not a trainable parameter"):
        engine.backward(losses, features, with_head)


def test_losses_must_be_scalars() -> None:
    model = make_model("mlp", 2)
    engine = MTLEngine(model.trunk)
    features = model.trunk(torch.randn(4, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="scalar"):
        engine.backward([model.heads[0](features)], features, UPGrad())


def test_weigh_needs_task_views_and_no_groups() -> None:
    model = make_model("mlp", 2)
    engine = MTLEngine(model.trunk)
    losses, _ = forward(model, 0)
    with pytest.raises(ValueError, match="task_views"):
        engine.weigh(losses, UPGrad())
    with pytest.raises(TypeError, match="GroupedAggregator"):
        engine.weigh(losses, GroupedAggregator(together(model.trunk), UPGrad))  # type: ignore[arg-type]


def test_per_layer_splits_the_attention_unit_across_groups() -> None:
    # What makes the transformer cases of the equivalence tests cover per-parameter blocks.
    model = make_model("transformer", 2)
    attention = model.trunk[1].self_attn
    groups = per_layer(model.trunk)
    owner = {id(p): k for k, group in enumerate(groups) for p in group}
    assert owner[id(attention.in_proj_weight)] != owner[id(attention.out_proj.weight)]


def test_grouped_records_the_weights_and_gramians_of_every_group() -> None:
    expected_model = make_model("mlp", 3)
    expected = GroupedAggregator(per_layer(expected_model.trunk), Mean, compute_gramians=True)
    losses, features = forward(expected_model, 0)
    mtl_backward(losses, features=features)
    expected.jac_to_grad()

    model = make_model("mlp", 3)
    engine = MTLEngine(model.trunk)
    grouped = GroupedAggregator(per_layer(model.trunk), Mean, compute_gramians=True)
    losses, features = forward(model, 0)
    engine.backward(losses, features, grouped)
    for actual_gramian, expected_gramian in zip(
        grouped.last_gramians, expected.last_gramians, strict=True
    ):
        torch.testing.assert_close(actual_gramian, expected_gramian)
    for actual_weights, expected_weights in zip(grouped.last_weights, expected.last_weights):
        torch.testing.assert_close(actual_weights, expected_weights)


def test_data_parallel_needs_a_process_group() -> None:
    model = make_model("mlp", 2)
    with pytest.raises(TypeError, match="data_parallel"):
        MTLEngine(model.trunk, data_parallel=1)  # type: ignore[arg-type]
    engine = MTLEngine(model.trunk, data_parallel=True)
    losses, features = forward(model, 0)
    with pytest.raises(RuntimeError, match="process group"):
        engine.backward(losses, features, UPGrad())


def _feature_grads(losses: list[Tensor], features: Tensor) -> Tensor:
    """Row i: the gradient of loss i w.r.t. the features (one backward pass per loss)."""
    rows = [torch.autograd.grad(loss, features, retain_graph=True)[0] for loss in losses]
    return torch.stack(rows)


@pytest.mark.parametrize("kind", ["mlp", "cnn", "reused", "transformer"])
@pytest.mark.parametrize("grouped", [False, True], ids=["together", "per_layer"])
def test_gradients_are_the_trunk_part_of_the_step(kind: str, grouped: bool) -> None:
    """The weights and the trunk's update that `gradients` returns are those of `mtl_backward`
    then `jac_to_grad`; no `.grad` is written."""
    expected_model = make_model(kind, 3)
    losses, features = forward(expected_model, 0)
    mtl_backward(losses, features=features)
    if grouped:
        expected = GroupedAggregator(per_layer(expected_model.trunk), UPGrad).jac_to_grad()
    else:
        expected = jac_to_grad(expected_model.trunk.parameters(), UPGrad())

    model = make_model(kind, 3)
    engine = MTLEngine(model.trunk)
    losses, features = forward(model, 0)
    aggregator = GroupedAggregator(per_layer(model.trunk), UPGrad) if grouped else UPGrad()
    weights, gramians, update = engine.gradients(
        _feature_grads(losses, features), features, aggregator
    )
    torch.testing.assert_close(weights, expected)
    assert (len(gramians) == len(expected)) if grouped else gramians.shape == (3, 3)
    factor = torch.tensor(0.25, dtype=torch.float64)  # e.g. 1 / (micro-batches per step)
    by_id = {id(p): u for p, u in zip(update.parameters, update(factor))}
    assert all(p.grad is None for p in model.all_parameters())
    for p, e in zip(model.trunk.parameters(), expected_model.trunk.parameters()):
        torch.testing.assert_close(by_id[id(p)], factor * e.grad)
    with pytest.raises(RuntimeError, match="called once"):
        update()


def test_gradients_checks_the_shape_of_the_feature_gradients() -> None:
    model = make_model("mlp", 2)
    engine = MTLEngine(model.trunk)
    _, features = forward(model, 0)
    with pytest.raises(ValueError, match=r"\[m, \*features.shape\]"):
        engine.gradients(torch.zeros(2, 3), features, UPGrad())


@pytest.mark.parametrize("grouped", [False, True], ids=["together", "per_layer"])
def test_gradients_undo_a_loss_scale(grouped: bool) -> None:
    """Scaled feature gradients with their `scale`: the Gramians, weights and update of the
    unscaled ones (exactly, for a power of two)."""
    results = []
    for scale in [None, torch.tensor(2.0**10)]:
        model = make_model("mlp", 3)
        engine = MTLEngine(model.trunk)
        losses, features = forward(model, 0)
        aggregator = GroupedAggregator(per_layer(model.trunk), UPGrad) if grouped else UPGrad()
        grads = _feature_grads(losses, features) * (1.0 if scale is None else scale)
        results.append(engine.gradients(grads, features, aggregator, scale=scale))
    (weights, gramians, update), (s_weights, s_gramians, s_update) = results
    torch.testing.assert_close(s_weights, weights, rtol=0, atol=0)
    torch.testing.assert_close(s_gramians, gramians, rtol=0, atol=0)
    factor = torch.tensor(0.25, dtype=torch.float64)
    for u, s_u in zip(update(factor), s_update(factor)):
        torch.testing.assert_close(s_u, u, rtol=0, atol=0)
