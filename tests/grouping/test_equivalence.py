"""GroupedAggregator.jac_to_grad gives what one jac_to_grad call per group gives (weights,
gradients, random draws, state updates), for every strategy and every aggregator."""

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from tests.aggregation._registry import AGGREGATORS, Entry
from tests.grouping._helpers import (
    STRATEGIES,
    Model,
    Step,
    assert_same_steps,
    fill_jacobians,
    make_model,
    train,
)
from torchjd.aggregation import (
    IMTLG,
    MGDA,
    AlignedMTL,
    Constant,
    DualProj,
    GradDrop,
    GradVac,
    GradVacWeighting,
    Mean,
    PCGrad,
    Random,
    Sum,
    UPGrad,
)
from torchjd.autojac import jac_to_grad
from torchjd.grouping import GroupedAggregator, per_tensor

STEPS = 3


def _n_tasks(entry: Entry) -> int:
    return entry.needs_fixed_m or max(3, entry.min_rows)


def _loop(
    model: Model, groups: list, aggregators: list, seed: int, steps: int = STEPS
) -> list[Step]:
    torch.manual_seed(seed)
    return train(
        model, lambda: [jac_to_grad(g, a) for g, a in zip(groups, aggregators)], steps=steps
    )


def _grouped(model: Model, grouped: GroupedAggregator, seed: int, steps: int = STEPS) -> list[Step]:
    torch.manual_seed(seed)
    return train(model, grouped.jac_to_grad, steps=steps)


def _compare(
    make: Callable[[], nn.Module],
    strategy: str,
    n_tasks: int,
    dtype: torch.dtype = torch.float64,
    steps: int = STEPS,
    device: str = "cpu",
) -> None:
    loop_model = make_model(n_tasks, dtype, device)
    grouped_model = make_model(n_tasks, dtype, device)
    loop_groups = STRATEGIES[strategy](loop_model)
    expected = _loop(loop_model, loop_groups, [make() for _ in loop_groups], 7, steps)
    grouped = GroupedAggregator(STRATEGIES[strategy](grouped_model), make)
    actual = _grouped(grouped_model, grouped, 7, steps)
    # The spec's tolerances for one call: relative 1e-6 in float64, 1e-4 in float32.
    tolerance = 1e-6 if dtype == torch.float64 else 1e-4
    assert_same_steps(actual, expected, rtol=tolerance, atol=tolerance * 1e-2)


@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("entry", AGGREGATORS, ids=lambda e: e.id)
def test_every_registered_aggregator_matches_the_loop(entry: Entry, strategy: str) -> None:
    _compare(entry.make, strategy, _n_tasks(entry))


def _is_batched(entry: Entry) -> bool:
    """Whether the groups of this aggregator are weighted in one batched call, as its weighting
    class declares."""
    aggregator = entry.make()
    if aggregator.need.value == "gramian":
        return type(aggregator.gramian_weighting).batched()
    return aggregator.need.value == "row count" and type(aggregator.weighting).batched()


# The aggregators whose groups are weighted in one batched call, from their declarations (the
# configurations for any number of tasks).
BATCHED_ENTRIES = [e for e in AGGREGATORS if _is_batched(e) and e.needs_fixed_m is None]
BATCHED = [entry.make for entry in BATCHED_ENTRIES]


def test_the_declarations_cover_the_known_batched_aggregators() -> None:
    names = {type(entry.make()).__name__ for entry in BATCHED_ENTRIES}
    expected = {"UPGrad", "DualProj", "MGDA", "PCGrad", "GradVac", "IMTLG", "AlignedMTL"}
    assert expected | {"Mean", "Sum"} <= names


@pytest.mark.parametrize(
    ("make", "n_tasks"),
    [(e.make, n) for e in BATCHED_ENTRIES for n in (2, 4) if n >= e.min_rows],
    ids=[f"{e.id}-{n}" for e in BATCHED_ENTRIES for n in (2, 4) if n >= e.min_rows],
)
def test_batched_aggregators_match_the_loop_in_float32(make: type, n_tasks: int) -> None:
    # At most 4 tasks, so that every tensor (4 entries or more) has a non-singular Gramian: on a
    # singular one, IMTL-G and Aligned-MTL turn float32 rounding into large changes (a pseudo-
    # inverse keeps or drops a singular value at the threshold), in the loop as well. One step:
    # the spec's float32 tolerance is for one call, and over several training steps the two runs'
    # float32 roundings (batched and single products round differently on some CPUs) drift apart
    # on IMTL-G and Aligned-MTL; the float64 tests compare several steps and the states.
    _compare(make, "per_tensor", n_tasks, dtype=torch.float32, steps=1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("make", BATCHED, ids=[e.id for e in BATCHED_ENTRIES])
def test_batched_aggregators_match_the_loop_on_cuda(make: type, dtype: torch.dtype) -> None:
    _compare(make, "per_tensor", 3, dtype=dtype, device="cuda")


def _count_grouped_calls(monkeypatch: pytest.MonkeyPatch, cls: type) -> list[int]:
    """Record the batch size of every call of ``cls._forward_grouped``."""
    original = cls.__dict__["_forward_grouped"].__func__
    sizes: list[int] = []

    def counting(klass: type, weightings: list, gramians: Tensor) -> Tensor:
        sizes.append(gramians.shape[0])
        return original(klass, weightings, gramians)

    monkeypatch.setattr(cls, "_forward_grouped", classmethod(counting))
    return sizes


@pytest.mark.parametrize(
    "make", [UPGrad, DualProj, MGDA, PCGrad, GradVac, IMTLG, AlignedMTL], ids=lambda c: c.__name__
)
def test_gramian_weightings_run_once_for_all_groups(
    make: type, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = make_model(3)
    grouped = GroupedAggregator(per_tensor(model.encoder, model.decoder), make)
    weighting_class = type(grouped.aggregators[0].gramian_weighting)
    sizes = _count_grouped_calls(monkeypatch, weighting_class)
    forward_calls = []
    monkeypatch.setattr(
        weighting_class, "forward", lambda self, stat: forward_calls.append(stat) or None
    )
    fill_jacobians(model, 0)
    grouped.jac_to_grad()
    assert sizes == [len(grouped)]
    assert forward_calls == []  # no group was weighted on its own


@pytest.mark.parametrize("make", [Mean, Sum], ids=lambda c: c.__name__)
def test_row_count_weightings_run_once_for_all_groups(
    make: type, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = make_model(3)
    grouped = GroupedAggregator(per_tensor(model.encoder, model.decoder), make)
    weighting_class = type(grouped.aggregators[0].weighting)
    calls = []
    original = weighting_class.forward
    monkeypatch.setattr(
        weighting_class, "forward", lambda self, stat: calls.append(1) or original(self, stat)
    )
    fill_jacobians(model, 0)
    weights = grouped.jac_to_grad()
    assert len(calls) == 1
    expected = torch.full((3,), 1 / 3 if make is Mean else 1.0, dtype=torch.float64)
    for w in weights:
        torch.testing.assert_close(w, expected, rtol=0, atol=0)
    # Each group has a weight vector of its own: writing into one leaves the others unchanged.
    weights[0].mul_(0.0)
    assert torch.equal(weights[1], expected)


def _mixed_aggregators() -> list[nn.Module]:
    """Interleaved kinds: batched runs of two or three groups broken by others, randomised ones
    on both sides of each break, a hooked aggregator and a non-weighted one."""
    hooked = PCGrad()
    hooked.register_forward_hook(lambda _module, _inputs, _output: None)
    return [
        GradVac(),
        GradVac(beta=0.2),
        PCGrad(),
        Random(),
        hooked,
        GradDrop(),
        PCGrad(),
        UPGrad(),
    ]


def test_mixed_aggregators_keep_the_order_of_the_random_draws() -> None:
    loop_model, grouped_model = make_model(3), make_model(3)
    loop_groups = per_tensor(loop_model.encoder, loop_model.decoder)
    assert len(loop_groups) == len(_mixed_aggregators())
    expected = _loop(loop_model, loop_groups, _mixed_aggregators(), seed=3)
    grouped = GroupedAggregator(
        per_tensor(grouped_model.encoder, grouped_model.decoder), _mixed_aggregators()
    )
    actual = _grouped(grouped_model, grouped, seed=3)
    assert_same_steps(actual, expected, rtol=1e-6, atol=1e-8)
    # The draws really matter: another seed gives other gradients.
    other_model = make_model(3)
    other_groups = per_tensor(other_model.encoder, other_model.decoder)
    other = _grouped(other_model, GroupedAggregator(other_groups, _mixed_aggregators()), seed=4)
    assert not all(torch.equal(a, b) for a, b in zip(other[0].grads, actual[0].grads))


def test_groups_with_different_m_are_each_aggregated_with_their_own_m() -> None:
    p = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    q = torch.zeros(2, 2, dtype=torch.float64, requires_grad=True)
    r = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    generator = torch.Generator().manual_seed(0)
    jacobians = {
        "p": torch.randn(2, 3, generator=generator, dtype=torch.float64),
        "q": torch.randn(3, 2, 2, generator=generator, dtype=torch.float64),
        "r": torch.randn(3, 4, generator=generator, dtype=torch.float64),
    }

    def run(aggregate: Callable[[list, list], list]) -> tuple[list, list]:
        for name, t in zip("pqr", (p, q, r)):
            t.jac = jacobians[name]
            t.grad = None
        torch.manual_seed(0)
        weights = aggregate([[p], [q], [r]], [GradVac(), GradVac(), GradVac()])
        return weights, [t.grad.clone() for t in (p, q, r)]

    expected = run(lambda groups, aggs: [jac_to_grad(g, a) for g, a in zip(groups, aggs)])
    actual = run(lambda groups, aggs: GroupedAggregator(groups, aggs).jac_to_grad())
    assert [w.shape[0] for w in actual[0]] == [2, 3, 3]
    for a, e in zip([*actual[0], *actual[1]], [*expected[0], *expected[1]]):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-14)


def test_gradvac_states_evolve_as_in_the_loop() -> None:
    loop_model, grouped_model = make_model(3), make_model(3)
    loop_groups = per_tensor(loop_model.encoder, loop_model.decoder)
    loop_aggregators = [GradVac() for _ in loop_groups]
    _loop(loop_model, loop_groups, loop_aggregators, seed=1)
    grouped = GroupedAggregator(per_tensor(grouped_model.encoder, grouped_model.decoder), GradVac)
    _grouped(grouped_model, grouped, seed=1)
    for loop_aggregator, aggregator in zip(loop_aggregators, grouped.aggregators):
        loop_state = loop_aggregator.gramian_weighting.phi_hat
        state = aggregator.gramian_weighting.phi_hat
        assert state.shape == (3, 3)
        torch.testing.assert_close(state, loop_state, rtol=1e-6, atol=1e-9)
    # One state per group: the groups saw different Jacobians, so their targets differ.
    states = [a.gramian_weighting.phi_hat for a in grouped.aggregators]
    assert not torch.equal(states[0], states[1])


def test_hooks_on_a_group_see_that_group_and_the_result_matches_the_loop() -> None:
    model = make_model(2)
    groups = per_tensor(model.encoder, model.decoder)
    grouped = GroupedAggregator(groups, UPGrad)
    seen: dict[str, Tensor] = {}

    def record(_module: nn.Module, inputs: tuple[Tensor], weights: Tensor) -> None:
        seen["gramian"], seen["weights"] = inputs[0], weights

    grouped.aggregators[3].gramian_weighting.register_forward_hook(record)
    fill_jacobians(model, 0)
    jacobian = groups[3][0].jac.reshape(2, -1)
    expected_weights = UPGrad().gramian_weighting(jacobian @ jacobian.T)
    weights = grouped.jac_to_grad()
    torch.testing.assert_close(seen["gramian"], jacobian @ jacobian.T)
    assert torch.equal(weights[3], seen["weights"])
    torch.testing.assert_close(weights[3], expected_weights)


def test_a_hook_on_a_nested_submodule_of_a_weighting_sees_its_own_group() -> None:
    """A hook deep inside one group's weighting (UPGrad's preference weighting) takes that group
    out of the batch: the hook runs once, on that group's Gramian."""
    model = make_model(2)
    groups = per_tensor(model.encoder, model.decoder)
    grouped = GroupedAggregator(groups, UPGrad)
    calls: list[Tensor] = []
    nested = grouped.aggregators[3].gramian_weighting.weighting
    nested.register_forward_hook(lambda _module, inputs, _output: calls.append(inputs[0]))
    fill_jacobians(model, 0)
    jacobian = groups[3][0].jac.reshape(2, -1)
    grouped.jac_to_grad()
    assert len(calls) == 1
    torch.testing.assert_close(calls[0], jacobian @ jacobian.T)


def test_constant_groups_use_their_own_weights() -> None:
    p, q = (torch.zeros(2, requires_grad=True) for _ in range(2))
    p.jac = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    q.jac = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    aggregators = [Constant(torch.tensor([1.0, 0.0])), Constant(torch.tensor([0.0, 2.0]))]
    weights = GroupedAggregator([[p], [q]], aggregators).jac_to_grad()
    assert torch.equal(p.grad, torch.tensor([1.0, 2.0]))
    assert torch.equal(q.grad, torch.tensor([0.0, 2.0]))
    assert [w.tolist() for w in weights] == [[1.0, 0.0], [0.0, 2.0]]


def test_a_subclass_overriding_forward_is_not_batched() -> None:
    class Doubled(GradVacWeighting):
        def forward(self, stat: Tensor, /) -> Tensor:
            return 2.0 * super().forward(stat)

    from torchjd.aggregation import GramianWeightedAggregator

    p, q = (torch.zeros(2, requires_grad=True) for _ in range(2))
    p.jac = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    q.jac = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    grouped = GroupedAggregator([[p], [q]], lambda: GramianWeightedAggregator(Doubled()))
    grouped.jac_to_grad()
    # GradVac's first call on this matrix gives [0.5, 1.5] (spec example), doubled here.
    for t in (p, q):
        torch.testing.assert_close(t.grad, torch.tensor([1.0, 3.0]))


def _varied(kind: str) -> list[nn.Module]:
    """Eight aggregators of one class with different hyper-parameters, for the 8 tensors."""
    prefs = [None, torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)]
    if kind == "UPGrad":
        return [UPGrad(pref_vector=prefs[k % 2]) for k in range(8)]
    if kind == "DualProj":
        return [DualProj(pref_vector=prefs[k % 2]) for k in range(8)]
    if kind == "MGDA":
        return [MGDA(epsilon=[1e-3, 1e-1][k % 2], max_iters=[100, 3][k % 3 == 0]) for k in range(8)]
    if kind == "GradVac":
        return [GradVac(beta=[0.5, 0.1, 1.0][k % 3], eps=[1e-8, 1e-3][k % 2]) for k in range(8)]
    modes = ["min", "median", "rmse"]
    return [AlignedMTL(pref_vector=prefs[k % 2], scale_mode=modes[k % 3]) for k in range(8)]


@pytest.mark.parametrize("kind", ["UPGrad", "DualProj", "MGDA", "GradVac", "AlignedMTL"])
def test_different_hyper_parameters_within_one_batch(kind: str) -> None:
    loop_model, grouped_model = make_model(3), make_model(3)
    loop_groups = per_tensor(loop_model.encoder, loop_model.decoder)
    expected = _loop(loop_model, loop_groups, _varied(kind), seed=5)
    groups = per_tensor(grouped_model.encoder, grouped_model.decoder)
    actual = _grouped(grouped_model, GroupedAggregator(groups, _varied(kind)), seed=5)
    assert_same_steps(actual, expected, rtol=1e-6, atol=1e-8)
    # The hyper-parameters are not all ignored: the uniform configuration differs.
    uniform_model = make_model(3)
    uniform_groups = per_tensor(uniform_model.encoder, uniform_model.decoder)
    uniform = _grouped(uniform_model, GroupedAggregator(uniform_groups, _varied(kind)[0]), seed=5)
    assert not all(torch.allclose(a, b) for a, b in zip(uniform[-1].grads, actual[-1].grads))
