import inspect
from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.testing import assert_close

import torchjd.aggregation as aggregation
from torchjd import _pipeline
from torchjd._pipeline import choose_route as _choose_route
from torchjd._protocol import Need as _Route
from torchjd.aggregation import (
    Aggregator,
    Constant,
    GramianWeightedAggregator,
    Mean,
    MeanWeighting,
    Random,
    Sum,
    UPGrad,
    Weighting,
)
from torchjd.autojac import backward, jac_to_grad, mtl_backward
from torchjd.linalg import PSDMatrix


class InverseNormWeighting(Weighting[PSDMatrix]):
    """``w_i = 1 / (m * ||g_i||)``: depends on the Gramian through its diagonal only."""

    def forward(self, gramian: Tensor, /) -> Tensor:
        return gramian.diagonal().sqrt().reciprocal() / gramian.shape[0]


class FirstRowProjectionWeighting(Weighting[PSDMatrix]):
    """``w = (1, <g_1, g_2> / ||g_1||², ...)``: uses off-diagonal entries of the Gramian."""

    def forward(self, gramian: Tensor, /) -> Tensor:
        weights = gramian[0] / gramian[0, 0]
        return torch.cat([torch.ones_like(weights[:1]), weights[1:]])


class ColumnMax(Aggregator):
    """A non-weighted aggregator: the largest entry of each column."""

    def forward(self, matrix: Tensor, /) -> Tensor:
        return matrix.max(dim=0).values


def _concatenate(jacobians: list[Tensor]) -> Tensor:
    m = jacobians[0].shape[0]
    return torch.cat([j.reshape(m, -1) for j in jacobians], dim=1)


def _params_with_jacs(
    shapes: list[tuple[int, ...]], m: int, seed: int, dtype: torch.dtype = torch.float32
) -> tuple[list[Tensor], list[Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=generator, dtype=dtype).requires_grad_() for s in shapes]
    jacobians = [torch.randn((m, *s), generator=generator, dtype=dtype) for s in shapes]
    for p, j in zip(params, jacobians):
        p.jac = j
    return params, jacobians


def _no_op_hook(_module: nn.Module, _args: object, _output: Tensor) -> None:
    return None


# ---------------------------------------------------------------------------------------------
# Hand-checkable values, signature


def test_hand_example_mean() -> None:
    p = torch.tensor([1.0, 2.0], requires_grad=True)
    p.jac = torch.tensor([[2.0, -1.0], [-1.0, 3.0]])
    weights = jac_to_grad([p], Mean())
    assert_close(weights, torch.tensor([0.5, 0.5]))
    assert_close(p.grad, torch.tensor([0.5, 1.0]))
    assert not hasattr(p, "jac")


def test_hand_example_gramian_weighting() -> None:
    p = torch.tensor([1.0, 2.0], requires_grad=True)
    p.jac = torch.tensor([[3.0, 4.0], [0.0, 1.0]])
    weights = jac_to_grad([p], GramianWeightedAggregator(InverseNormWeighting()))
    assert_close(weights, torch.tensor([0.1, 0.5]))
    assert_close(p.grad, torch.tensor([0.3, 0.9]))


def test_hand_example_two_tensors() -> None:
    t1 = torch.tensor(1.0, requires_grad=True)
    t2 = torch.tensor([1.0, 2.0], requires_grad=True)
    t1.jac = torch.tensor([-4.0, 6.0])
    t2.jac = torch.tensor([[1.0, 1.0], [1.0, 1.0]])
    weights = jac_to_grad([t1, t2], Mean())
    assert_close(weights, torch.tensor([0.5, 0.5]))
    assert t1.grad.shape == () and t2.grad.shape == (2,)
    assert_close(t1.grad, torch.tensor(1.0))
    assert_close(t2.grad, torch.tensor([1.0, 1.0]))


def test_signature() -> None:
    parameters = inspect.signature(jac_to_grad).parameters
    assert list(parameters) == [
        "tensors",
        "aggregator",
        "retain_jac",
        "optimize_gramian_computation",
        "present",  # beyond the spec: steps with missing tasks
    ]
    assert parameters["tensors"].kind is inspect.Parameter.POSITIONAL_ONLY
    assert parameters["aggregator"].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    for name in ["retain_jac", "optimize_gramian_computation"]:
        assert parameters[name].kind is inspect.Parameter.KEYWORD_ONLY
        assert parameters[name].default is False


def test_call_conventions() -> None:
    p = torch.tensor([1.0, 2.0], requires_grad=True)
    p.jac = torch.ones(2, 2)
    with pytest.raises(TypeError):
        jac_to_grad(tensors=[p], aggregator=Mean())  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        jac_to_grad([p], Mean(), True)  # type: ignore[misc]
    assert hasattr(p, "jac") and p.grad is None
    jac_to_grad([p], aggregator=Mean())
    assert_close(p.grad, torch.ones(2))


# ---------------------------------------------------------------------------------------------
# Validation: every error is raised before anything is mutated


def _assert_untouched(params: list[Tensor], jacobians: list[Tensor]) -> None:
    for p, j in zip(params, jacobians):
        assert p.jac is j and p.grad is None


def test_missing_jac() -> None:
    params, jacobians = _params_with_jacs([(2,), (3,)], m=2, seed=0)
    other = torch.ones(2, requires_grad=True)
    with pytest.raises(ValueError, match=r"Element 2 of `tensors` \(shape \(2,\)\) has no `\.jac`"):
        jac_to_grad([*params, other], Mean())
    _assert_untouched(params, jacobians)


def test_empty_tensors() -> None:
    with pytest.raises(ValueError, match="at least one"):
        jac_to_grad([], Mean())
    with pytest.raises(ValueError, match="at least one"):
        jac_to_grad(iter([]), Mean())


def test_row_mismatch() -> None:
    p1, p2 = torch.ones(2, requires_grad=True), torch.ones(3, requires_grad=True)
    p1.jac, p2.jac = torch.ones(2, 2), torch.ones(3, 3)
    with pytest.raises(ValueError, match="same number of rows"):
        jac_to_grad([p1, p2], Mean())
    with pytest.raises(ValueError, match="same number of rows"):
        jac_to_grad([p1, p2], GramianWeightedAggregator(MeanWeighting()))
    _assert_untouched([p1, p2], [p1.jac, p2.jac])


def test_does_not_require_grad() -> None:
    params, jacobians = _params_with_jacs([(2,)], m=2, seed=0)
    frozen = torch.ones(3)
    frozen.jac = torch.ones(2, 3)
    with pytest.raises(ValueError, match="does not require grad"):
        jac_to_grad([*params, frozen], Mean())
    _assert_untouched(params, jacobians)
    assert hasattr(frozen, "jac")


def test_non_leaf() -> None:
    params, jacobians = _params_with_jacs([(2,)], m=2, seed=0)
    non_leaf = params[0] * 2
    non_leaf.jac = torch.ones(2, 2)
    with pytest.raises(ValueError, match="retain_grad"):
        jac_to_grad([*params, non_leaf], Mean())
    _assert_untouched(params, jacobians)
    non_leaf.retain_grad()
    jac_to_grad([*params, non_leaf], Mean())
    assert_close(non_leaf.grad, torch.ones(2))


def test_duplicates() -> None:
    params, jacobians = _params_with_jacs([(2,), (3,)], m=2, seed=0)
    for retain_jac in [False, True]:
        with pytest.raises(ValueError, match="twice"):
            jac_to_grad([*params, params[0]], Mean(), retain_jac=retain_jac)
        _assert_untouched(params, jacobians)


@pytest.mark.parametrize(
    ("param_shape", "jac_shape"),
    [((2, 3), (4, 3, 2)), ((2, 3), (4, 6)), ((), (4, 1)), ((3,), (4, 3, 1)), ((2,), ())],
)
def test_wrong_trailing_shape(param_shape: tuple[int, ...], jac_shape: tuple[int, ...]) -> None:
    params, jacobians = _params_with_jacs([(5,)], m=4, seed=0)
    bad = torch.ones(param_shape, requires_grad=True)
    bad.jac = torch.ones(jac_shape)
    with pytest.raises(ValueError, match="shape"):
        jac_to_grad([*params, bad], Mean())
    _assert_untouched(params, jacobians)


def test_zero_rows() -> None:
    p = torch.ones(2, requires_grad=True)
    p.jac = torch.ones(0, 2)
    with pytest.raises(ValueError, match="0 rows"):
        jac_to_grad([p], Mean())
    assert hasattr(p, "jac")


def test_jac_that_is_not_a_tensor() -> None:
    p = torch.ones(2, requires_grad=True)
    p.jac = [[1.0, 2.0]]
    with pytest.raises(ValueError, match="must be a tensor"):
        jac_to_grad([p], Mean())


def test_aggregator_error_propagates_after_deletion() -> None:
    params, _ = _params_with_jacs([(2,), (3,)], m=2, seed=0)
    with pytest.raises(ValueError, match="3 weights"):
        jac_to_grad(params, Constant(torch.ones(3)))
    assert not any(hasattr(p, "jac") for p in params)
    assert all(p.grad is None for p in params)


# ---------------------------------------------------------------------------------------------
# retain_jac, .grad accumulation, kinds of input


def test_retain_jac() -> None:
    params, jacobians = _params_with_jacs([(2,), (3, 2)], m=3, seed=0)
    jac_to_grad(params, Mean(), retain_jac=True)
    assert all(p.jac is j for p, j in zip(params, jacobians))
    jac_to_grad(params, Mean())
    assert not any(hasattr(p, "jac") for p in params)
    for p, j in zip(params, jacobians):
        assert_close(p.grad, 2 * j.mean(dim=0))


def test_existing_grad_is_added_to() -> None:
    p = torch.tensor([1.0, 2.0], requires_grad=True)
    p.grad = torch.full((2,), 10.0)
    existing = p.grad
    p.jac = torch.ones(3, 2)
    jac_to_grad([p], Mean())
    assert_close(p.grad, torch.full((2,), 11.0))
    assert p.grad is existing


@pytest.mark.parametrize(
    "make", [Mean, lambda: GramianWeightedAggregator(InverseNormWeighting()), ColumnMax]
)
def test_non_contiguous_jac(make: Callable[[], Aggregator]) -> None:
    p = torch.ones(3, 2, requires_grad=True)
    base = torch.arange(24.0).reshape(4, 2, 3) + 1
    p.jac = base.transpose(1, 2)
    assert not p.jac.is_contiguous()
    aggregator = make()
    jac_to_grad([p], aggregator)
    expected = aggregator(base.transpose(1, 2).reshape(4, 6)).reshape(3, 2)
    assert_close(p.grad, expected)


def test_generator_of_parameters() -> None:
    model = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 1))
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    backward(model(x).squeeze(1))
    jacobians = [p.jac for p in model.parameters()]
    weights = jac_to_grad(model.parameters(), Mean())
    assert_close(weights, torch.full((4,), 0.25))
    for p, j in zip(model.parameters(), jacobians):
        assert_close(p.grad, j.mean(dim=0))


# ---------------------------------------------------------------------------------------------
# The result is aggregator(J) for the concatenated J, whatever the route


def _make_aggregators() -> dict[str, Callable[[], Aggregator]]:
    makers: dict[str, Callable[[], Aggregator]] = {
        "Mean": Mean,
        "Sum": Sum,
        "Constant": lambda: Constant(torch.tensor([0.5, -1.0, 2.0])),
        "Random": Random,
        "Gramian(Mean)": lambda: GramianWeightedAggregator(MeanWeighting()),
        "Gramian(InverseNorm)": lambda: GramianWeightedAggregator(InverseNormWeighting()),
        "Gramian(FirstRowProjection)": lambda: GramianWeightedAggregator(
            FirstRowProjectionWeighting()
        ),
        "ColumnMax": ColumnMax,
    }
    # The built-in aggregators that can be built without arguments (and without a missing
    # optional dependency).
    for name in aggregation.__all__:
        cls = getattr(aggregation, name)
        if not isinstance(cls, type) or not issubclass(cls, Aggregator) or name in _BASES:
            continue
        if getattr(cls, "requires_losses", False):  # needs update_losses before each call
            continue
        try:
            cls()
        except (TypeError, ImportError):
            continue
        makers[name] = cls
    return makers


_BASES = {"Aggregator", "WeightedAggregator", "GramianWeightedAggregator"}


AGGREGATORS = _make_aggregators()
SHAPES = [(3, 2), (), (4,), (2, 1, 2)]


@pytest.mark.parametrize("name", list(AGGREGATORS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_aggregator_on_concatenation(name: str, dtype: torch.dtype) -> None:
    params, jacobians = _params_with_jacs(SHAPES, m=3, seed=1, dtype=dtype)
    matrix = _concatenate(jacobians)
    # Fresh instances for each computation (some aggregators are stateful or random).
    torch.manual_seed(0)
    expected = AGGREGATORS[name]()(matrix)
    expected_weights = None
    aggregator = AGGREGATORS[name]()
    if isinstance(aggregator, aggregation.WeightedAggregator):
        torch.manual_seed(0)
        expected_weights = AGGREGATORS[name]().weighting(matrix)

    torch.manual_seed(0)
    weights = jac_to_grad(params, aggregator)

    if expected_weights is None:
        assert weights is None
    else:
        assert weights.shape == (3,)
        assert_close(weights, expected_weights)
    offset = 0
    for p in params:
        assert p.grad.dtype == dtype
        assert_close(p.grad, expected[offset : offset + p.numel()].reshape(p.shape))
        offset += p.numel()


@pytest.mark.parametrize("name", [n for n in AGGREGATORS if n != "ColumnMax"])
def test_route_without_concatenation_equals_concatenated_route(name: str) -> None:
    """A no-op hook on the aggregator forces concatenation; both give the same numbers."""
    results = []
    for force_concatenation in [False, True]:
        params, _ = _params_with_jacs(SHAPES, m=3, seed=2)
        aggregator = AGGREGATORS[name]()
        if force_concatenation:
            aggregator.register_forward_hook(_no_op_hook)
        torch.manual_seed(0)
        weights = jac_to_grad(params, aggregator)
        results.append((weights, [p.grad for p in params]))
    assert_close(results[0], results[1])


@pytest.mark.parametrize("name", [n for n in AGGREGATORS if n != "ColumnMax"])
@pytest.mark.parametrize(
    "dtypes",
    [[torch.float32], [torch.float64, torch.float32], [torch.float16], [torch.bfloat16]],
)
@pytest.mark.parametrize("shapes", [SHAPES, [(5,)], [(2, 3)]])
def test_short_path_is_the_pipeline_step(
    name: str, dtypes: list[torch.dtype], shapes: list[tuple[int, ...]]
) -> None:
    """One group whose every task is present skips the many-group machinery of the pipeline;
    the step must be bit for bit the one of that machinery (prepare + run)."""
    results = []
    for short in [True, False]:
        params, _ = _params_with_jacs(shapes, m=3, seed=3)
        for i, p in enumerate(params):  # cycle through the dtypes, parameter and `.jac` alike
            dtype = dtypes[i % len(dtypes)]
            p.data, p.jac = p.data.to(dtype), p.jac.to(dtype)
        params[0].grad = torch.ones_like(params[0])  # accumulated into, not replaced
        aggregator = AGGREGATORS[name]()
        torch.manual_seed(0)
        if short:
            weights = jac_to_grad(params, aggregator)
        else:
            (group,) = _pipeline.prepare([params], [aggregator], ["tensors"])
            _pipeline.run([group], _pipeline.Steps(), retain_jac=False, stacklevel=1)
            weights = group.weights
        assert not any(hasattr(p, "jac") for p in params)
        results.append((weights, [p.grad for p in params]))
    (weights, grads), (expected_weights, expected_grads) = results
    if expected_weights is None:  # not a weighted aggregator
        assert weights is None
    else:
        assert weights.dtype == expected_weights.dtype and torch.equal(weights, expected_weights)
    for grad, expected in zip(grads, expected_grads):
        assert grad.dtype == expected.dtype and torch.equal(grad, expected)


def test_short_path_checks_every_tensor() -> None:
    """The one-pass check of the short path lets nothing through that the full checks refuse."""
    p, q = torch.ones(2, requires_grad=True), torch.ones(2, requires_grad=True)
    scalar = torch.tensor(1.0, requires_grad=True)
    cases: list[tuple[list[Tensor], str]] = [
        ([p, q, p], "twice"),
        ([p, q.detach()], "does not require grad"),
        ([p, q * 2], "retain_grad"),
        ([p, scalar], "shape"),
    ]
    p.jac, q.jac, scalar.jac = torch.ones(3, 2), torch.ones(3, 2), torch.ones(3, 2)
    for tensors, message in cases:
        for t in tensors:
            if not hasattr(t, "jac"):
                t.jac = torch.ones(3, 2)
        with pytest.raises(ValueError, match=message):
            jac_to_grad(tensors, UPGrad(), retain_jac=True)
        assert p.grad is None and q.grad is None


def test_routes() -> None:
    assert _choose_route(Mean(), False) is _Route.ROW_COUNT
    assert _choose_route(Sum(), False) is _Route.ROW_COUNT
    assert _choose_route(Random(), False) is _Route.ROW_COUNT
    assert _choose_route(Constant(torch.ones(2)), False) is _Route.ROW_COUNT
    gramian_based = GramianWeightedAggregator(InverseNormWeighting())
    assert _choose_route(gramian_based, False) is _Route.GRAMIAN
    assert _choose_route(gramian_based, True) is _Route.GRAMIAN
    assert _choose_route(ColumnMax(), False) is _Route.MATRIX

    class Doubled(GramianWeightedAggregator):
        def forward(self, matrix: Tensor, /) -> Tensor:
            return 2 * super().forward(matrix)

    assert _choose_route(Doubled(MeanWeighting()), False) is _Route.MATRIX
    assert _choose_route(Doubled(MeanWeighting()), True) is _Route.GRAMIAN

    class NoGrad(GramianWeightedAggregator):  # wrapping __call__ does not change the maths
        @torch.no_grad()
        def __call__(self, matrix: Tensor, /) -> Tensor:
            return super().__call__(matrix)

    assert _choose_route(NoGrad(MeanWeighting()), False) is _Route.GRAMIAN

    class Uniform(MeanWeighting):  # a subclass keeps the declarations of the class it extends
        pass

    assert _choose_route(aggregation.WeightedAggregator(Uniform()), False) is _Route.ROW_COUNT

    class Halved(MeanWeighting):  # overriding forward drops them: it may read the values
        def forward(self, stat: Tensor, /) -> Tensor:
            return super().forward(stat) / 2

    assert _choose_route(aggregation.WeightedAggregator(Halved()), False) is _Route.MATRIX

    hooked_weighting = GramianWeightedAggregator(InverseNormWeighting())
    hooked_weighting.weighting.register_forward_pre_hook(lambda _m, _a: None)
    assert _choose_route(hooked_weighting, False) is _Route.MATRIX
    hooked_gramian_weighting = GramianWeightedAggregator(InverseNormWeighting())
    hooked_gramian_weighting.gramian_weighting.register_forward_hook(_no_op_hook)
    assert _choose_route(hooked_gramian_weighting, False) is _Route.GRAMIAN
    hooked_mean = Mean()
    hooked_mean.register_forward_pre_hook(lambda _m, _a: None)
    assert _choose_route(hooked_mean, False) is _Route.MATRIX


def test_user_subclass_overriding_forward_is_called() -> None:
    class Doubled(GramianWeightedAggregator):
        def forward(self, matrix: Tensor, /) -> Tensor:
            return 2 * super().forward(matrix)

    p = torch.tensor([1.0, 2.0], requires_grad=True)
    p.jac = torch.tensor([[2.0, -1.0], [-1.0, 3.0]])
    weights = jac_to_grad([p], Doubled(MeanWeighting()))
    assert_close(weights, torch.tensor([0.5, 0.5]))
    assert_close(p.grad, torch.tensor([1.0, 2.0]))


def test_global_hook_sees_the_concatenated_matrix() -> None:
    params, jacobians = _params_with_jacs([(2,), (3,)], m=2, seed=0)
    seen: list[Tensor] = []

    def hook(module: nn.Module, args: tuple[Tensor, ...], _output: Tensor) -> None:
        if isinstance(module, Aggregator):
            seen.append(args[0])

    handle = nn.modules.module.register_module_forward_hook(hook)
    try:
        jac_to_grad(params, GramianWeightedAggregator(MeanWeighting()))
    finally:
        handle.remove()
    assert len(seen) == 1
    assert_close(seen[0], _concatenate(jacobians))


@settings(max_examples=15, deadline=None)
@given(
    shapes=st.lists(
        st.lists(st.integers(1, 3), min_size=0, max_size=3).map(tuple), min_size=1, max_size=4
    ),
    m=st.integers(1, 5),
    seed=st.integers(0, 2**16),
)
def test_gramian_route_property(shapes: list[tuple[int, ...]], m: int, seed: int) -> None:
    """For any shapes, the Gramian route gives aggregator(J) on the concatenated matrix."""
    params, jacobians = _params_with_jacs(shapes, m=m, seed=seed, dtype=torch.float64)
    aggregator = GramianWeightedAggregator(FirstRowProjectionWeighting())
    matrix = _concatenate(jacobians)
    weights = jac_to_grad(params, aggregator)
    assert_close(weights, aggregator.weighting(matrix))
    assert_close(torch.cat([p.grad.reshape(-1) for p in params]), aggregator(matrix))


# ---------------------------------------------------------------------------------------------
# Random draws, dtypes


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_random_draws_as_the_concatenated_route(dtype: torch.dtype) -> None:
    params, jacobians = _params_with_jacs([(3,), (2, 2)], m=4, seed=3, dtype=dtype)
    matrix = _concatenate(jacobians)
    torch.manual_seed(7)
    expected_weights = torch.softmax(torch.randn(4, dtype=dtype), dim=0)
    torch.manual_seed(7)
    weights = jac_to_grad(params, Random())
    assert weights.dtype == dtype
    assert_close(weights, expected_weights)
    assert_close(torch.cat([p.grad.reshape(-1) for p in params]), expected_weights @ matrix)


def _hooked_gramian_aggregator() -> Aggregator:
    """A Gramian-based aggregator with a hook: it takes the concatenated route."""
    aggregator = GramianWeightedAggregator(InverseNormWeighting())
    aggregator.register_forward_hook(_no_op_hook)
    return aggregator


@pytest.mark.parametrize(
    "make",
    [
        Mean,
        lambda: GramianWeightedAggregator(InverseNormWeighting()),
        _hooked_gramian_aggregator,
        ColumnMax,
    ],
)
def test_mixed_precision_params(make: Callable[[], Aggregator]) -> None:
    aggregator = make()
    half = torch.ones(2, dtype=torch.float16, requires_grad=True)
    single = torch.ones(3, requires_grad=True)
    half.jac = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float16)
    single.jac = torch.tensor([[1.0, 0.0, 2.0], [0.5, 1.0, 0.0]])
    matrix = _concatenate([half.jac.float(), single.jac])
    expected = aggregator(matrix)
    jac_to_grad([half, single], aggregator)
    assert half.grad.dtype == torch.float16 and single.grad.dtype == torch.float32
    assert_close(half.grad, expected[:2].half(), atol=1e-2, rtol=1e-2)
    assert_close(single.grad, expected[2:], atol=1e-3, rtol=1e-3)


def test_mixed_precision_with_optimized_gramian() -> None:
    half = torch.ones(2, dtype=torch.float16, requires_grad=True)
    single = torch.ones(3, requires_grad=True)
    half.jac = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float16)
    single.jac = torch.tensor([[1.0, 0.0, 2.0], [0.5, 1.0, 0.0]])
    aggregator = GramianWeightedAggregator(InverseNormWeighting())
    jac_to_grad([half, single], aggregator, optimize_gramian_computation=True)
    assert half.grad.dtype == torch.float16 and single.grad.dtype == torch.float32


@pytest.mark.parametrize(
    ("jac_dtypes", "gramian_dtype"),
    [
        ([torch.float16], torch.float32),
        ([torch.bfloat16, torch.float16], torch.float32),
        ([torch.float32], torch.float32),
        ([torch.float16, torch.float64], torch.float64),
    ],
)
def test_gramian_accumulated_in_float32_at_least(
    jac_dtypes: list[torch.dtype], gramian_dtype: torch.dtype
) -> None:
    seen: list[Tensor] = []
    aggregator = GramianWeightedAggregator(InverseNormWeighting())
    aggregator.gramian_weighting.register_forward_hook(lambda _m, args, _o: seen.append(args[0]))
    params = []
    for i, dtype in enumerate(jac_dtypes):
        p = torch.ones(2, dtype=dtype, requires_grad=True)
        p.jac = torch.tensor([[1.0, 2.0], [0.0, 3.0]], dtype=dtype) * (i + 1)
        params.append(p)
    weights = jac_to_grad(params, aggregator)
    assert seen[0].dtype == gramian_dtype
    n = len(jac_dtypes)
    scale = sum((i + 1) ** 2 for i in range(n))
    assert_close(seen[0], scale * torch.tensor([[5.0, 6.0], [6.0, 9.0]], dtype=gramian_dtype))
    assert weights.dtype == torch.promote_types(jac_dtypes[0], jac_dtypes[-1])
    for p in params:
        assert p.grad.dtype == p.dtype


@pytest.mark.parametrize(
    "make", [Mean, lambda: GramianWeightedAggregator(InverseNormWeighting()), ColumnMax]
)
def test_float64_stays_float64(make: Callable[[], Aggregator]) -> None:
    p = torch.ones(3, dtype=torch.float64, requires_grad=True)
    p.jac = torch.rand(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    weights = jac_to_grad([p], make())
    assert p.grad.dtype == torch.float64
    assert weights is None or weights.dtype == torch.float64


# ---------------------------------------------------------------------------------------------
# optimize_gramian_computation and hooks


@pytest.mark.parametrize(
    "make",
    [
        lambda: GramianWeightedAggregator(InverseNormWeighting()),
        lambda: GramianWeightedAggregator(FirstRowProjectionWeighting()),
        *[AGGREGATORS[n] for n in ["UPGrad", "MGDA", "IMTLG", "DualProj"] if n in AGGREGATORS],
    ],
)
def test_optimize_gramian_computation_same_as_default(make: Callable[[], Aggregator]) -> None:
    results = []
    for optimize in [False, True]:
        params, _ = _params_with_jacs(SHAPES, m=3, seed=4, dtype=torch.float64)
        weights = jac_to_grad(params, make(), optimize_gramian_computation=optimize)
        results.append((weights, [p.grad for p in params]))
    assert_close(results[0], results[1], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("make", [Mean, ColumnMax, lambda: Constant(torch.ones(2))])
def test_optimize_gramian_computation_needs_gramian_aggregator(
    make: Callable[[], Aggregator],
) -> None:
    params, _ = _params_with_jacs([(2,)], m=2, seed=0)
    with pytest.raises(ValueError, match="Gramian"):
        jac_to_grad(params, make(), optimize_gramian_computation=True)


@pytest.mark.parametrize("on_weighting", [False, True])
@pytest.mark.parametrize("pre", [False, True])
def test_optimize_gramian_computation_refuses_hooks(on_weighting: bool, pre: bool) -> None:
    aggregator = GramianWeightedAggregator(InverseNormWeighting())
    module = aggregator.weighting if on_weighting else aggregator
    if pre:
        module.register_forward_pre_hook(lambda _m, _a: None)
    else:
        module.register_forward_hook(_no_op_hook)
    params, _ = _params_with_jacs([(2,)], m=2, seed=0)
    with pytest.raises(ValueError, match="hooks"):
        jac_to_grad(params, aggregator, optimize_gramian_computation=True)
    jac_to_grad(params, aggregator)  # allowed without the option: the hooks run
    assert params[0].grad is not None


@pytest.mark.parametrize("optimize", [False, True])
def test_hook_on_gramian_weighting_is_reflected(optimize: bool) -> None:
    aggregator = GramianWeightedAggregator(InverseNormWeighting())
    aggregator.gramian_weighting.register_forward_hook(lambda _m, _a, output: 3 * output)
    p = torch.tensor([1.0, 2.0], requires_grad=True)
    p.jac = torch.tensor([[3.0, 4.0], [0.0, 1.0]])
    weights = jac_to_grad([p], aggregator, optimize_gramian_computation=optimize)
    assert_close(weights, torch.tensor([0.3, 1.5]))
    assert_close(p.grad, torch.tensor([0.9, 2.7]))


def _multiplying_hook(factor: float) -> Callable[[nn.Module, object, Tensor], Tensor]:
    return lambda _module, _args, output: factor * output


@pytest.mark.parametrize("make", [lambda: GramianWeightedAggregator(InverseNormWeighting())])
def test_hooks_on_weighting_and_gramian_weighting(make: Callable[[], Aggregator]) -> None:
    aggregator = make()
    raw_weights = make().weighting
    for _ in range(3):
        aggregator.weighting.register_forward_hook(_multiplying_hook(2.0))
    for _ in range(5):
        aggregator.gramian_weighting.register_forward_hook(_multiplying_hook(3.0))
    params, jacobians = _params_with_jacs(SHAPES, m=3, seed=5, dtype=torch.float64)
    matrix = _concatenate(jacobians)
    expected_weights = aggregator.weighting(matrix)
    assert_close(expected_weights, 2.0**3 * 3.0**5 * raw_weights(matrix))
    weights = jac_to_grad(params, aggregator)
    assert_close(weights, expected_weights)
    assert_close(torch.cat([p.grad.reshape(-1) for p in params]), expected_weights @ matrix)
    assert len(aggregator.weighting._forward_hooks) == 3  # the temporary hook was removed


def test_aggregator_hook_runs_once_and_modifies_grad_not_weights() -> None:
    aggregator = GramianWeightedAggregator(InverseNormWeighting())
    calls: list[Tensor] = []

    def doubling(_module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> Tensor:
        calls.append(args[0])
        return 2 * output

    aggregator.register_forward_hook(doubling)
    params, jacobians = _params_with_jacs(SHAPES, m=3, seed=6, dtype=torch.float64)
    matrix = _concatenate(jacobians)
    weights = jac_to_grad(params, aggregator)
    assert len(calls) == 1
    assert_close(calls[0], matrix)
    raw_weights = aggregator.weighting(matrix)
    assert_close(weights, raw_weights)
    assert_close(torch.cat([p.grad.reshape(-1) for p in params]), 2 * raw_weights @ matrix)


def test_temporary_hook_removed_on_error() -> None:
    class Failing(aggregation.WeightedAggregator):
        def forward(self, matrix: Tensor, /) -> Tensor:
            self.weighting(matrix)
            raise RuntimeError("failure inside the aggregator")

    aggregator = Failing(MeanWeighting())
    params, _ = _params_with_jacs([(2,)], m=2, seed=0)
    with pytest.raises(RuntimeError, match="failure inside"):
        jac_to_grad(params, aggregator)
    assert len(aggregator.weighting._forward_hooks) == 0


def test_aggregator_returning_wrong_shape() -> None:
    class Wrong(Aggregator):
        def forward(self, matrix: Tensor, /) -> Tensor:
            return matrix.sum()

    params, _ = _params_with_jacs([(2,)], m=2, seed=0)
    with pytest.raises(ValueError, match="length 2"):
        jac_to_grad(params, Wrong())


# ---------------------------------------------------------------------------------------------
# With the Jacobian producers


def test_after_mtl_backward() -> None:
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(3, 4), nn.Tanh())
    heads = [nn.Linear(4, 1) for _ in range(3)]
    x = torch.randn(6, 3)
    features = trunk(x)
    losses = [head(features).pow(2).mean() for head in heads]
    expected = [
        torch.autograd.grad(loss, list(trunk.parameters()), retain_graph=True) for loss in losses
    ]
    mtl_backward(losses, features=features)
    weights = jac_to_grad(trunk.parameters(), Sum())
    assert_close(weights, torch.ones(3))
    for i, p in enumerate(trunk.parameters()):
        assert_close(p.grad, sum(g[i] for g in expected))


def test_bare_tensor_as_tensors_is_rejected() -> None:
    p = torch.ones(2, requires_grad=True)
    p.jac = torch.ones(3, 2)
    with pytest.raises(ValueError, match="wrap it in a list"):
        jac_to_grad(p, Mean())  # type: ignore[arg-type]
    assert hasattr(p, "jac")


@pytest.mark.parametrize(
    "name",
    [
        n
        for n in aggregation.__all__
        if n not in _BASES
        and isinstance(getattr(aggregation, n), type)
        and issubclass(getattr(aggregation, n), GramianWeightedAggregator)
    ],
)
def test_builtin_gramian_aggregators_take_the_gramian_route(name: str) -> None:
    """No built-in Gramian-based aggregator forces the concatenation of the Jacobians."""
    cls = getattr(aggregation, name)
    assert cls.forward is GramianWeightedAggregator.forward
