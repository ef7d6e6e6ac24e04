"""MTLEngine.backward gives what mtl_backward + jac_to_grad (or GroupedAggregator.jac_to_grad)
gives: weights, every ``.grad`` (trunk and heads), the random draws and, over two steps, the
state of stateful aggregators.

Every aggregator that declares it needs only the Gramian or the row count, ungrouped and with the
four strategies of torchjd.grouping, on an MLP; the CNN, the model with a reused module and the
transformer block (which exercise the layer rules and the units split across groups) with one
aggregator per kind of weighting, under the same five ways of grouping."""

from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from tests.aggregation._registry import AGGREGATORS, Entry
from tests.autogram._mtl_models import KINDS, STRATEGIES, Model, Step, make_model, train
from torchjd._protocol import Need
from torchjd.aggregation import Aggregator
from torchjd.autogram import MTLEngine
from torchjd.autojac import jac_to_grad, mtl_backward
from torchjd.grouping import GroupedAggregator

# The aggregators the engine accepts, from their declarations.
ENTRIES = [e for e in AGGREGATORS if e.make().need in (Need.GRAMIAN, Need.ROW_COUNT)]

# Weights in closed form or after a fixed number of operations: the two routes differ only by the
# rounding of the Gramian. The others (iterative solvers with a stopping rule) get the spec's
# tolerances for one call.
_CLOSED_FORM = ("Mean", "Sum", "Constant", "Random", "PCGrad", "GradVac", "IMTLG", "AlignedMTL")


def _tolerance(entry: Entry, dtype: torch.dtype) -> float:
    if dtype == torch.float32:
        return 1e-4
    return 1e-10 if entry.id.startswith(_CLOSED_FORM) else 1e-6


def _n_tasks(entry: Entry) -> int:
    return entry.needs_fixed_m or max(3, entry.min_rows)


def _run(
    kind: str,
    n_tasks: int,
    dtype: torch.dtype,
    step_for: Callable[[Model], Callable[[list[Tensor], Tensor], object]],
    steps: int,
) -> list[Step]:
    model = make_model(kind, n_tasks, dtype)
    torch.manual_seed(7)
    return train(model, step_for(model), steps)


def _autojac(make: Callable[[], Aggregator], strategy: str) -> Callable:
    def step_for(model: Model) -> Callable[[list[Tensor], Tensor], object]:
        if strategy == "ungrouped":
            aggregator = make()

            def step(losses: list[Tensor], features: Tensor) -> object:
                mtl_backward(losses, features=features)
                return jac_to_grad(model.trunk.parameters(), aggregator)

            return step
        grouped = GroupedAggregator(STRATEGIES[strategy](model.trunk), make)

        def grouped_step(losses: list[Tensor], features: Tensor) -> object:
            mtl_backward(losses, features=features)
            return grouped.jac_to_grad()

        return grouped_step

    return step_for


def _engine(make: Callable[[], Aggregator], strategy: str) -> Callable:
    def step_for(model: Model) -> Callable[[list[Tensor], Tensor], object]:
        engine = MTLEngine(model.trunk)
        if strategy == "ungrouped":
            aggregator: Aggregator | GroupedAggregator = make()
        else:
            aggregator = GroupedAggregator(STRATEGIES[strategy](model.trunk), make)
        return lambda losses, features: engine.backward(losses, features, aggregator)

    return step_for


def _compare(entry: Entry, kind: str, strategy: str, dtype: torch.dtype) -> None:
    n_tasks = _n_tasks(entry)
    steps = 2 if entry.stateful else 1  # a second step checks the state kept by each group
    expected = _run(kind, n_tasks, dtype, _autojac(entry.make, strategy), steps)
    actual = _run(kind, n_tasks, dtype, _engine(entry.make, strategy), steps)
    tol = _tolerance(entry, dtype)
    for a, e in zip(actual, expected):
        for wa, we in zip(a.weights, e.weights, strict=True):
            torch.testing.assert_close(wa, we, rtol=tol, atol=tol)
        for ga, ge in zip(a.grads, e.grads, strict=True):
            torch.testing.assert_close(ga, ge, rtol=tol, atol=tol)


def test_the_declarations_cover_the_known_gramian_aggregators() -> None:
    names = {type(entry.make()).__name__ for entry in ENTRIES}
    expected = {"UPGrad", "DualProj", "MGDA", "PCGrad", "GradVac", "IMTLG", "AlignedMTL"}
    assert expected | {"Mean", "Sum", "Constant", "Random"} <= names
    assert "GradDrop" not in names  # it reads the matrix


GROUPINGS = ["ungrouped", *STRATEGIES]

# Row count, random row count, quadratic programme, Frank-Wolfe, stateful, closed form.
_REPRESENTATIVES = ["Mean", "Random", "UPGrad", "MGDA", "GradVac", "AlignedMTL"]


@pytest.mark.parametrize("strategy", GROUPINGS)
@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e.id)
def test_every_gramian_aggregator_matches_autojac(entry: Entry, strategy: str) -> None:
    _compare(entry, "mlp", strategy, torch.float64)


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "mlp"])
@pytest.mark.parametrize("strategy", GROUPINGS)
@pytest.mark.parametrize("name", _REPRESENTATIVES)
def test_other_models_match_autojac(name: str, strategy: str, kind: str) -> None:
    entry = next(e for e in ENTRIES if e.id == name)
    _compare(entry, kind, strategy, torch.float64)


@pytest.mark.parametrize("strategy", ["ungrouped", "per_tensor"])
@pytest.mark.parametrize("name", ["UPGrad", "Mean", "GradVac"])
def test_float32(name: str, strategy: str) -> None:
    entry = next(e for e in ENTRIES if e.id == name)
    _compare(entry, "mlp", strategy, torch.float32)
