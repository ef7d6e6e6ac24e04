"""GroupedAggregator: construction, validation, state, monitoring and errors at call time."""

import copy
import functools

import pytest
import torch
from torch import Tensor, nn

from tests.grouping._helpers import STRATEGIES, Model, fill_jacobians, make_model
from torchjd import Stateful
from torchjd.aggregation import (
    GradVac,
    GradVacWeighting,
    GramianWeightedAggregator,
    Mean,
    PCGrad,
    UPGrad,
)
from torchjd.grouping import GroupedAggregator, per_tensor


def _params(n: int) -> list[Tensor]:
    return [torch.zeros(2, requires_grad=True) for _ in range(n)]


# Construction


def test_a_template_is_copied_for_every_group() -> None:
    template = GradVac(beta=0.3)
    grouped = GroupedAggregator([_params(1), _params(2), _params(1)], template)
    aggregators = list(grouped.aggregators)
    assert len(aggregators) == 3
    assert all(type(a) is GradVac and a.beta == 0.3 for a in aggregators)
    assert len({id(a) for a in [template, *aggregators]}) == 4
    weightings = [template.gramian_weighting, *(a.gramian_weighting for a in aggregators)]
    assert len({id(w) for w in weightings}) == 4


def test_a_template_brings_its_state_to_every_copy() -> None:
    template = GradVac()
    template(torch.tensor([[1.0, 0.0], [-1.0, 1.0]]))
    grouped = GroupedAggregator([_params(1), _params(1)], template)
    for aggregator in grouped.aggregators:
        assert torch.equal(aggregator.gramian_weighting.phi_hat, template.gramian_weighting.phi_hat)
        assert aggregator.gramian_weighting.phi_hat is not template.gramian_weighting.phi_hat


@pytest.mark.parametrize(
    "factory",
    [UPGrad, lambda: UPGrad(), functools.partial(UPGrad, pref_vector=None)],
    ids=["class", "lambda", "partial"],
)
def test_a_factory_is_called_once_per_group(factory: object) -> None:
    calls = []

    def counting() -> nn.Module:
        calls.append(1)
        return factory()  # type: ignore[operator]

    grouped = GroupedAggregator([_params(1), _params(1), _params(3)], counting)
    assert len(calls) == 3
    assert all(type(a) is UPGrad for a in grouped.aggregators)


def test_a_sequence_gives_one_aggregator_per_group_as_is() -> None:
    aggregators = [UPGrad(), GradVac()]
    grouped = GroupedAggregator((_params(1), _params(2)), aggregators)
    assert [id(a) for a in grouped.aggregators] == [id(a) for a in aggregators]
    grouped = GroupedAggregator((_params(1), _params(2)), nn.ModuleList([Mean(), PCGrad()]))
    assert [type(a) for a in grouped.aggregators] == [Mean, PCGrad]


def test_groups_accept_iterables_and_are_kept_in_order() -> None:
    model = make_model(2)
    grouped = GroupedAggregator(
        (g for g in [model.encoder.parameters(), model.decoder.parameters()]), Mean
    )
    assert len(grouped) == 2
    assert [[id(p) for p in g] for g in grouped.groups] == [
        [id(p) for p in model.encoder.parameters()],
        [id(p) for p in model.decoder.parameters()],
    ]
    grouped.groups[0].clear()  # a copy: the groups themselves cannot be changed this way
    assert len(grouped.groups[0]) == 4


def test_the_groups_are_not_part_of_the_module() -> None:
    model = make_model(2)
    grouped = GroupedAggregator(per_tensor(model.encoder, model.decoder), UPGrad)
    assert list(grouped.parameters()) == []
    assert list(grouped.state_dict()) == []  # UPGrad has no state


def test_moves_and_casts_like_a_module() -> None:
    """`.to()` reaches the aggregators' state (as when a LightningModule holding it is moved)."""
    grouped = GroupedAggregator([_params(1), _params(1)], GradVac)
    assert grouped.to(torch.float64) is grouped
    assert grouped.to("cpu") is grouped


def test_repr_shows_the_groups_and_the_aggregators() -> None:
    grouped = GroupedAggregator([_params(1), _params(2)], UPGrad)
    text = repr(grouped)
    assert "groups=2 (tensors per group: 1, 2)" in text
    assert "2 x UPGrad(pref_vector=None" in text


# Validation


def test_a_tensor_in_two_groups_is_refused() -> None:
    a, b, c = _params(3)
    with pytest.raises(ValueError, match=r"element 0 of groups\[1\] .* element 1 in groups\[0\]"):
        GroupedAggregator([[a, b], [b, c]], Mean)
    with pytest.raises(ValueError, match="earlier in the same group"):
        GroupedAggregator([[a, b, a]], Mean)


def test_sets_are_refused() -> None:
    a, b = _params(2)
    with pytest.raises(ValueError, match=r"groups\[1\] is a set"):
        GroupedAggregator([[a], {b}], Mean)
    with pytest.raises(ValueError, match="`groups` must be ordered"):
        GroupedAggregator({(a,), (b,)}, Mean)


def test_an_aggregator_shared_by_two_groups_is_refused() -> None:
    shared = GradVac()
    with pytest.raises(ValueError, match="Groups 0 and 2 share the same aggregator"):
        GroupedAggregator([_params(1), _params(1), _params(1)], [shared, GradVac(), shared])
    with pytest.raises(ValueError, match="Groups 0 and 1 share the same aggregator"):
        GroupedAggregator([_params(1), _params(1)], lambda: shared)


def test_a_weighting_shared_by_two_groups_is_refused() -> None:
    weighting = GradVacWeighting()
    aggregators = [GramianWeightedAggregator(weighting), GramianWeightedAggregator(weighting)]
    with pytest.raises(ValueError, match="Groups 0 and 1 share the module GradVacWeighting"):
        GroupedAggregator([_params(1), _params(1)], aggregators)


def test_malformed_groups_are_refused() -> None:
    a, b = _params(2)
    with pytest.raises(ValueError, match="at least one group"):
        GroupedAggregator([], Mean)
    with pytest.raises(ValueError, match=r"groups\[1\] is empty"):
        GroupedAggregator([[a], []], Mean)
    with pytest.raises(TypeError, match=r"groups\[0\] is a single tensor"):
        GroupedAggregator([a, b], Mean)
    with pytest.raises(TypeError, match=r"groups\[0\] must contain only tensors"):
        GroupedAggregator([[a, "b"]], Mean)
    with pytest.raises(TypeError, match=r"groups\[0\] is of type dict"):
        GroupedAggregator([{"params": [a]}], Mean)
    with pytest.raises(TypeError, match="`groups` must be an iterable"):
        GroupedAggregator(a, Mean)
    with pytest.raises(TypeError, match=r"groups\[1\] is a module \(Sequential\)"):
        GroupedAggregator([[a], nn.Sequential(nn.Linear(2, 2))], Mean)


def test_malformed_aggregators_are_refused() -> None:
    groups = [_params(1), _params(1)]
    with pytest.raises(ValueError, match="got 1 aggregators for 2 groups"):
        GroupedAggregator(groups, [Mean()])
    with pytest.raises(TypeError, match="type int for group 0"):
        GroupedAggregator(groups, lambda: 3)
    with pytest.raises(TypeError, match="`aggregator` must be an aggregator"):
        GroupedAggregator(groups, 3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`compute_gramians` must be a bool"):
        GroupedAggregator(groups, Mean, compute_gramians=1)  # type: ignore[arg-type]


def test_calling_it_like_an_aggregator_says_what_to_do() -> None:
    grouped = GroupedAggregator([_params(1)], Mean)
    with pytest.raises(TypeError, match=r"call its `jac_to_grad\(\)` method"):
        grouped(torch.ones(2, 2))


# Errors at call time


def test_a_missing_jac_names_the_group_and_nothing_is_modified() -> None:
    a, b, c = _params(3)
    grouped = GroupedAggregator([[a], [b, c]], UPGrad)
    a.jac, b.jac = torch.ones(2, 2), torch.ones(2, 2)
    with pytest.raises(ValueError, match=r"Group 1: Element 1 of `groups\[1\]` .* has no `\.jac`"):
        grouped.jac_to_grad()
    assert hasattr(a, "jac") and hasattr(b, "jac")
    assert a.grad is None and b.grad is None


def test_a_tensor_without_grad_names_the_group() -> None:
    a = torch.zeros(2, requires_grad=True)
    b = torch.zeros(2)
    grouped = GroupedAggregator([[a], [b]], Mean)
    a.jac, b.jac = torch.ones(2, 2), torch.ones(2, 2)
    with pytest.raises(ValueError, match=r"Group 1: Element 0 of `groups\[1\]` .* require grad"):
        grouped.jac_to_grad()
    assert a.grad is None


def test_a_wrong_number_of_rows_within_a_group_names_the_group() -> None:
    a, b, c = _params(3)
    grouped = GroupedAggregator([[a], [b, c]], Mean)
    a.jac, b.jac, c.jac = torch.ones(3, 2), torch.ones(2, 2), torch.ones(3, 2)
    with pytest.raises(ValueError, match=r"Group 1: .* same number of rows .* \[2, 3\]"):
        grouped.jac_to_grad()


def test_retain_jac_keeps_the_jacobians() -> None:
    a, b = _params(2)
    grouped = GroupedAggregator([[a], [b]], Mean)
    a.jac, b.jac = torch.ones(2, 2), torch.full((2, 2), 3.0)
    grouped.jac_to_grad(retain_jac=True)
    assert torch.equal(a.jac, torch.ones(2, 2)) and torch.equal(b.grad, torch.full((2,), 3.0))
    grouped.jac_to_grad()  # accumulates into .grad, then deletes .jac
    assert not hasattr(a, "jac") and not hasattr(b, "jac")
    assert torch.equal(a.grad, torch.full((2,), 2.0))


# State: one per group, saved and restored together, reset together


def _run_steps(model: Model, grouped: GroupedAggregator, steps: range) -> list[Tensor]:
    """Aggregate the Jacobians of the given steps (same seed per step), without updating the
    model; return the concatenated gradients of each step."""
    outputs = []
    for step in steps:
        fill_jacobians(model, step)
        torch.manual_seed(step)
        grouped.jac_to_grad()
        outputs.append(torch.cat([p.grad.reshape(-1) for p in model.shared]))
        for p in model.all_parameters():
            p.grad = None
    return outputs


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_state_dict_round_trip_into_a_fresh_instance(strategy: str) -> None:
    model = make_model(3)
    groups = STRATEGIES[strategy](model)
    used = GroupedAggregator(groups, GradVac)
    _run_steps(model, used, range(3))
    state = used.state_dict()
    assert sorted(k for k in state if not k.endswith("._extra_state")) == sorted(
        f"aggregators.{k}.weighting.weighting.phi_hat" for k in range(len(groups))
    )
    restored = GroupedAggregator(groups, GradVac)
    restored.load_state_dict(copy.deepcopy(state), strict=True)
    fresh = GroupedAggregator(groups, GradVac)
    future = range(3, 6)
    expected = _run_steps(model, used, future)
    assert all(torch.equal(a, b) for a, b in zip(_run_steps(model, restored, future), expected))
    # The state matters: a fresh instance does something else on the same steps.
    assert not all(torch.equal(a, b) for a, b in zip(_run_steps(model, fresh, future), expected))


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_reset_restores_fresh_behaviour(strategy: str) -> None:
    model = make_model(3)
    groups = STRATEGIES[strategy](model)
    used = GroupedAggregator(groups, GradVac)
    _run_steps(model, used, range(3))
    assert isinstance(used, Stateful)
    used.reset()
    assert used.last_weights == [] and used.last_gramians == []
    fresh = GroupedAggregator(groups, GradVac)
    expected = _run_steps(model, fresh, range(3, 5))
    assert all(torch.equal(a, b) for a, b in zip(_run_steps(model, used, range(3, 5)), expected))


def test_reset_skips_stateless_aggregators() -> None:
    grouped = GroupedAggregator([_params(1), _params(1)], [UPGrad(), GradVac()])
    grouped.aggregators[1](torch.tensor([[1.0, 0.0], [-1.0, 1.0]]))
    grouped.reset()
    assert grouped.aggregators[1].gramian_weighting.phi_hat.numel() == 0


def test_each_group_keeps_its_own_state() -> None:
    """The check of the spec's grouping section, through a GroupedAggregator: a group that saw a
    conflicting Jacobian reacts differently from a fresh one; resetting restores it."""
    a, b = _params(2)
    grouped = GroupedAggregator([[a], [b]], GradVac)
    conflicting = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    a.jac = conflicting.clone()
    b.jac = torch.eye(2)
    grouped.jac_to_grad()
    a.grad = b.grad = None
    a.jac, b.jac = conflicting.clone(), conflicting.clone()
    grouped.jac_to_grad()
    torch.testing.assert_close(a.grad, torch.tensor([0.311, 1.311]), atol=1e-3, rtol=0)
    torch.testing.assert_close(b.grad, torch.tensor([0.5, 1.5]))


# Monitoring


def test_last_weights_and_cosine_similarities_per_group() -> None:
    model = make_model(3)
    groups = per_tensor(model.encoder, model.decoder)
    grouped = GroupedAggregator(groups, UPGrad)
    fill_jacobians(model, 0)
    matrices = [p.jac.reshape(3, -1) for (p,) in groups]
    weights = grouped.jac_to_grad()
    assert grouped.last_weights == weights and len(weights) == len(groups)
    cosines = grouped.cosine_similarities()
    for matrix, gramian, cosine in zip(matrices, grouped.last_gramians, cosines):
        torch.testing.assert_close(gramian, matrix @ matrix.T)
        unit = matrix / matrix.norm(dim=1, keepdim=True)
        torch.testing.assert_close(cosine, unit @ unit.T)
    # Different tensors see different conflicts.
    assert not torch.allclose(cosines[0], cosines[1])


def test_gramians_of_row_count_aggregators_only_on_request() -> None:
    a, b = _params(2)
    grouped = GroupedAggregator([[a], [b]], Mean)
    a.jac, b.jac = torch.tensor([[1.0, 0.0], [-1.0, 0.0]]), torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    grouped.jac_to_grad()
    assert grouped.last_gramians == [None, None]
    assert grouped.cosine_similarities() == [None, None]
    grouped.compute_gramians = True
    a.jac, b.jac = torch.tensor([[1.0, 0.0], [-1.0, 0.0]]), torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    grouped.jac_to_grad()
    cosines = grouped.cosine_similarities()
    torch.testing.assert_close(cosines[0], torch.tensor([[1.0, -1.0], [-1.0, 1.0]]))
    # A zero gradient has cosine 0 with everything, itself included.
    torch.testing.assert_close(cosines[1], torch.tensor([[1.0, 0.0], [0.0, 0.0]]))


def test_cosine_similarities_before_the_first_call_are_empty() -> None:
    assert GroupedAggregator([_params(1)], UPGrad).cosine_similarities() == []


# Loss values


def test_update_losses_reaches_every_group() -> None:
    from torchjd.aggregation import GradNorm

    a, b = _params(2)
    grouped = GroupedAggregator([[a], [b]], GradNorm)
    grouped.update_losses(torch.tensor([2.0, 1.0]))
    a.jac, b.jac = torch.eye(2), torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    weights = grouped.jac_to_grad()
    assert all(w is not None and w.shape == (2,) for w in weights)
    a.jac, b.jac = torch.eye(2), torch.eye(2)
    with pytest.raises(ValueError, match="loss"):  # used by one step only
        grouped.jac_to_grad()


def test_update_losses_needs_an_aggregator_that_uses_them() -> None:
    grouped = GroupedAggregator([_params(1)], UPGrad)
    with pytest.raises(TypeError, match="uses loss values"):
        grouped.update_losses(torch.ones(2))
