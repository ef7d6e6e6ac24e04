"""The messages users meet most, each naming what went wrong and how to fix it."""

import pytest
import torch
from torch import nn

from torchjd.aggregation import Constant, Mean, UPGrad
from torchjd.autojac import jac_to_grad, mtl_backward
from torchjd.grouping import GroupedAggregator, per_layer, per_network


def _mtl_step() -> tuple[nn.Module, list[nn.Module]]:
    torch.manual_seed(0)
    trunk, heads = nn.Linear(3, 4), [nn.Linear(4, 1), nn.Linear(4, 1)]
    features = trunk(torch.randn(5, 3))
    mtl_backward([h(features).sum() for h in heads], features=features)
    return trunk, heads


def test_heads_have_a_grad_and_no_jac() -> None:
    trunk, heads = _mtl_step()
    with pytest.raises(ValueError, match=r"has a `\.grad`.*pass only the shared parameters"):
        jac_to_grad([*trunk.parameters(), *heads[0].parameters()], UPGrad())
    assert all(hasattr(p, "jac") for p in trunk.parameters())  # nothing consumed


def test_a_consumed_jac_points_to_retain_jac() -> None:
    trunk, _ = _mtl_step()
    jac_to_grad(trunk.parameters(), UPGrad())
    with pytest.raises(ValueError, match=r"an earlier `jac_to_grad` consumed it.*retain_jac=True"):
        jac_to_grad(trunk.parameters(), UPGrad())


def test_an_exhausted_generator_is_explained() -> None:
    trunk, _ = _mtl_step()
    parameters = trunk.parameters()
    jac_to_grad(parameters, Mean())
    with pytest.raises(
        ValueError, match=r"empty.*iterated only once.*list\(model.parameters\(\)\)"
    ):
        jac_to_grad(parameters, Mean())


@pytest.mark.parametrize("aggregator", [lambda J: J.sum(0), "mean", Mean])
def test_anything_but_an_aggregator_is_a_type_error(aggregator: object) -> None:
    trunk, _ = _mtl_step()
    with pytest.raises(TypeError, match="`aggregator` must be an Aggregator"):
        jac_to_grad(trunk.parameters(), aggregator)  # type: ignore[arg-type]
    assert all(hasattr(p, "jac") and p.grad is None for p in trunk.parameters())


@pytest.mark.parametrize(
    ("make", "name"),
    [
        (lambda: UPGrad(pref_vector=[1.0, 2.0]), "pref_vector"),
        (lambda: Constant([1.0, 2.0]), "weights"),
    ],
)
def test_a_vector_hyper_parameter_must_be_a_tensor(make: object, name: str) -> None:
    with pytest.raises(
        TypeError, match=rf"`{name}` must be a vector.*torch\.tensor\(\[1\.0, 2\.0\]\)"
    ):
        make()  # type: ignore[operator]


@pytest.mark.parametrize("retain_graph", [False, True])
def test_features_that_no_task_reads_are_refused(retain_graph: bool) -> None:
    trunk, head = nn.Linear(3, 4), nn.Linear(4, 1)
    x = torch.randn(5, 3)
    unused, used = trunk(x), trunk(x)
    losses = [head(used).sum(), head(used).mean()]
    with pytest.raises(ValueError, match="No task tensor depends on `features`"):
        mtl_backward(losses, features=unused, retain_graph=retain_graph)
    assert all(p.grad is None and not hasattr(p, "jac") for p in trunk.parameters())


def test_a_feature_read_by_some_tasks_only_is_fine() -> None:
    trunk, head = nn.Linear(3, 4), nn.Linear(4, 1)
    x = torch.randn(5, 3)
    f1, f2 = trunk(x), trunk(x)
    mtl_backward([head(f1).sum(), head(f1).mean()], features=[f1, f2])
    assert trunk.weight.jac.shape == (2, 4, 3)


def test_per_network_skips_children_without_parameters() -> None:
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(2, 1)
    )
    groups = per_network(*model.children())
    assert [[tuple(p.shape) for p in g] for g in groups] == [[(2, 1, 3, 3), (2,)], [(1, 2), (1,)]]
    GroupedAggregator(groups, UPGrad)  # usable as is


def test_per_network_still_refuses_frozen_or_owned_networks() -> None:
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match=r"Network 1 .* no trainable"):
        per_network(nn.Linear(2, 2), frozen)
    shared = nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"Network 1 .* already own"):
        per_network(shared, nn.Sequential(shared))
    with pytest.raises(ValueError, match=r"None of `networks` \(ReLU, Dropout\) has any parameter"):
        per_network(nn.ReLU(), nn.Dropout())


@pytest.mark.parametrize("strategy", [per_network, per_layer])
def test_a_forgotten_star_is_spotted(strategy: object) -> None:
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    name = strategy.__name__  # type: ignore[attr-defined]
    with pytest.raises(TypeError, match=rf"`{name}\(\*model\.children\(\)\)` \(note the `\*`\)"):
        strategy(model.children())  # type: ignore[operator]
