"""UPGrad and UPGradWeighting: the spec's numbers with both projectors, hand-worked values, the
non-conflict guarantee, validation and string forms."""

from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import torchjd._optional
from torchjd.aggregation import (
    GramianWeightedAggregator,
    UPGrad,
    UPGradWeighting,
)
from torchjd.linalg import BlockPivotingProjector, DualConeProjector, QuadprogProjector

from ._matrices import J_A, J_B, ONE, ZERO, ZR

G_A = J_A @ J_A.T
G_B = J_B @ J_B.T

_MakeProjector = Callable[[], DualConeProjector | None]
_PROJECTORS: dict[str, _MakeProjector] = {"default": lambda: None, "quadprog": QuadprogProjector}


@pytest.fixture(params=list(_PROJECTORS), ids=list(_PROJECTORS))
def make_projector(request: pytest.FixtureRequest) -> _MakeProjector:
    return _PROJECTORS[request.param]


def _close(actual: torch.Tensor, expected: list[float]) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected), rtol=0, atol=1e-4)


def test_worked_examples(make_projector: _MakeProjector) -> None:
    _close(UPGrad(projector=make_projector())(J_A), [0.2929, 1.9004, 1.9004])
    _close(UPGradWeighting(projector=make_projector())(G_A), [1.1109, 0.7894])
    _close(UPGrad(projector=make_projector())(J_B), [0.4544, 0.6788, 0.8688, 1.1866])
    _close(UPGradWeighting(projector=make_projector())(G_B), [0.5277, 0.5199, 0.3333])
    prefs = torch.tensor([1.0, 2.0, 3.0])
    _close(UPGrad(prefs, make_projector())(J_B), [0.4462, 4.4534, 4.7728, 8.5598])
    _close(UPGrad(torch.tensor([1.0, 2.0]), make_projector())(J_A), [1.6984, 6.0225, 6.0225])
    aggregator = GramianWeightedAggregator(UPGradWeighting(projector=make_projector()))
    _close(aggregator(J_A), [0.2929, 1.9004, 1.9004])


def test_worked_example_without_epsilons() -> None:
    for projector_class in (QuadprogProjector, BlockPivotingProjector):
        projector = projector_class(norm_eps=0.0, reg_eps=0.0)
        _close(UPGrad(projector=projector)(J_A), [0.2924, 1.9006, 1.9006])


def test_edge_cases(make_projector: _MakeProjector) -> None:
    _close(UPGrad(projector=make_projector())(ZERO), [0.0, 0.0, 0.0])
    _close(UPGrad(projector=make_projector())(ONE), [3.0, -4.0, 1.0])
    _close(UPGrad(projector=make_projector())(ZR), [0.5, 1.0, -0.5])
    # ||J||_F^2 < norm_eps: the mean.
    _close(UPGrad(projector=make_projector())(1e-3 * J_A), [0.001, 0.001, 0.001])
    assert UPGrad(projector=make_projector())(torch.zeros(2, 0)).shape == (0,)
    out = UPGrad(projector=make_projector())(1e3 * J_A)
    torch.testing.assert_close(
        out, torch.tensor([292.9019, 1900.3522, 1900.3522]), rtol=1e-5, atol=0
    )


def test_projectors_agree_on_random_matrices() -> None:
    generator = torch.Generator().manual_seed(0)
    for m, n in [(2, 3), (5, 4), (10, 30), (40, 60)]:
        J = torch.randn(m, n, generator=generator, dtype=torch.float64)
        torch.testing.assert_close(
            UPGrad()(J), UPGrad(projector=QuadprogProjector())(J), rtol=1e-6, atol=1e-9
        )


def test_m_equal_2_is_pcgrad() -> None:
    # For two rows, the projection of g_1 onto the dual cone is g_1 itself when g_1 . g_2 >= 0,
    # else g_1 - (g_1 . g_2 / ||g_2||^2) g_2 (PCGrad's projection): weights worked out by hand.
    generator = torch.Generator().manual_seed(1)
    for _ in range(20):
        G = (J := torch.randn(2, 5, generator=generator, dtype=torch.float64)) @ J.T
        g11, g12, g22 = G[0, 0], G[0, 1], G[1, 1]
        if g12 >= 0:
            expected = torch.ones(2, dtype=torch.float64)
        else:
            expected = torch.stack([1 - g12 / g11, 1 - g12 / g22])
        ones = torch.ones(2, dtype=torch.float64)
        for projector_class in (QuadprogProjector, BlockPivotingProjector):
            projector = projector_class(norm_eps=0.0, reg_eps=0.0)
            weights = UPGradWeighting(pref_vector=ones, projector=projector)(G)
            torch.testing.assert_close(weights, expected, rtol=1e-9, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(
    m=st.integers(1, 8),
    extra_columns=st.integers(0, 6),
    seed=st.integers(0, 2**16),
    scale=st.sampled_from([1e-2, 1.0, 1e3]),
)
def test_non_conflicting(m: int, extra_columns: int, seed: int, scale: float) -> None:
    # Full row rank (n >= m): the output is not 0 and the relative check is meaningful.
    generator = torch.Generator().manual_seed(seed)
    J = scale * torch.randn(m, m + extra_columns, generator=generator, dtype=torch.float64)
    exact = UPGrad(projector=BlockPivotingProjector(norm_eps=0.0, reg_eps=0.0))(J)
    assert (J @ exact >= -1e-6 * J.norm() * exact.norm()).all()
    # With the default epsilons, the KKT conditions of (G/tr(G) + reg_eps I) give
    # G w >= -reg_eps tr(G) w: that much conflict is allowed. Below norm_eps, it is the mean.
    G = J @ J.T
    weights = UPGradWeighting()(G)
    if G.trace() < 1e-4:
        torch.testing.assert_close(weights, torch.full_like(weights, 1 / m))
    else:
        allowed = 1e-4 * G.trace() * weights.abs() + 1e-9 * G.abs().max() * weights.abs().max()
        assert (G @ weights >= -allowed).all()


def test_permutation_equivariant_weights() -> None:
    generator = torch.Generator().manual_seed(2)
    J = torch.randn(6, 9, generator=generator, dtype=torch.float64)
    permutation = torch.randperm(6, generator=generator)
    weights = UPGradWeighting()(J @ J.T)
    permuted = UPGradWeighting()(J[permutation] @ J[permutation].T)
    torch.testing.assert_close(permuted, weights[permutation], rtol=1e-9, atol=1e-12)


def test_pref_vector_validation_and_identity() -> None:
    for cls in (UPGrad, UPGradWeighting):
        with pytest.raises(ValueError, match="pref_vector"):
            cls(torch.ones(2, 2))
        obj = cls()
        with pytest.raises(ValueError, match="pref_vector"):
            obj.pref_vector = torch.ones(())
        prefs = torch.tensor([1.0, 2.0])
        obj.pref_vector = prefs
        assert obj.pref_vector is prefs
        obj.pref_vector = None
        assert obj.pref_vector is None
    prefs = torch.tensor([1.0, 2.0, 3.0])
    aggregator = UPGrad(prefs)
    assert aggregator.pref_vector is prefs
    assert aggregator.gramian_weighting.weighting.weights is prefs
    with pytest.raises(ValueError):
        aggregator(J_A)  # 3 preferences for 2 rows


def test_projector_property() -> None:
    aggregator = UPGrad()
    assert type(aggregator.projector) is BlockPivotingProjector
    projector = QuadprogProjector(reg_eps=0.01)
    aggregator.projector = projector
    assert aggregator.projector is projector and aggregator.gramian_weighting.projector is projector
    aggregator.projector = None
    assert type(aggregator.projector) is BlockPivotingProjector
    assert aggregator.projector.reg_eps == 0.0001


class _PositivePart(DualConeProjector):
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, U: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return U.clamp(min=0.0)


def test_custom_projector_is_used() -> None:
    projector = _PositivePart()
    aggregator = UPGrad(projector=projector)
    # diag(p) clamped is diag(p): the weights are p, the output is the mean.
    torch.testing.assert_close(aggregator(J_A), J_A.mean(dim=0))
    assert projector.calls == 1
    assert aggregator.projector is projector


def test_works_without_quadprog(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torchjd._optional, "find_spec", lambda name, *args: None)
    _close(UPGrad()(J_A), [0.2929, 1.9004, 1.9004])
    _close(UPGradWeighting()(G_A), [1.1109, 0.7894])
    with pytest.raises(ImportError):
        UPGrad(projector=QuadprogProjector())


def test_repr_and_str() -> None:
    assert repr(UPGrad()) == (
        "UPGrad(pref_vector=None, projector=BlockPivotingProjector(norm_eps=0.0001, "
        "reg_eps=0.0001))"
    )
    aggregator = UPGrad(
        pref_vector=torch.tensor([1.0, 2.0, 3.0]),
        projector=QuadprogProjector(norm_eps=0.001, reg_eps=0.01),
    )
    assert repr(aggregator) == (
        "UPGrad(pref_vector=tensor([1., 2., 3.]), "
        "projector=QuadprogProjector(norm_eps=0.001, reg_eps=0.01))"
    )
    assert str(UPGrad()) == "UPGrad"
    assert str(aggregator) == "UPGrad([1., 2., 3.])"
    assert repr(UPGradWeighting()) == "UPGradWeighting(\n  (weighting): MeanWeighting()\n)"
    assert str(UPGradWeighting()) == repr(UPGradWeighting())


def test_structure_and_positional_only() -> None:
    aggregator = UPGrad()
    assert aggregator.weighting.weighting is aggregator.gramian_weighting
    assert isinstance(aggregator.gramian_weighting, UPGradWeighting)
    with pytest.raises(TypeError):
        aggregator(matrix=J_A)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        UPGradWeighting()(stat=G_A)  # type: ignore[call-arg]


def test_not_differentiable() -> None:
    J = J_B.clone().requires_grad_()
    assert not UPGrad()(J).requires_grad
    assert not UPGradWeighting()(J @ J.T).requires_grad


def test_dtype_is_kept() -> None:
    out = UPGrad()(J_B.double())
    assert out.dtype == torch.float64
    torch.testing.assert_close(
        out, torch.tensor([0.4544, 0.6788, 0.8688, 1.1866]).double(), atol=1e-4, rtol=0
    )
    # A float32 preference vector with a float64 matrix.
    out = UPGrad(torch.tensor([1.0, 2.0, 3.0]))(J_B.double())
    assert out.dtype == torch.float64


def test_batched_equals_a_loop() -> None:
    generator = torch.Generator().manual_seed(3)
    for m in (1, 3, 50):
        gramians = torch.stack(
            [(J := torch.randn(m, m + 2, generator=generator)) @ J.T for _ in range(4)]
        )
        weightings = [
            UPGradWeighting(),
            UPGradWeighting(torch.rand(m, generator=generator)),
            UPGradWeighting(projector=_PositivePart()),
        ]
        if m <= 3:
            weightings.append(UPGradWeighting(projector=QuadprogProjector()))
        for weighting in weightings:
            batched = type(weighting)._forward_grouped([weighting] * len(gramians), gramians)
            looped = torch.stack([weighting(G) for G in gramians])
            torch.testing.assert_close(batched, looped, rtol=1e-6, atol=1e-7)
    assert UPGradWeighting._forward_grouped([], torch.zeros(0, 3, 3)).shape == (0, 3)


def test_grouped_equals_a_loop() -> None:
    generator = torch.Generator().manual_seed(4)
    m = 4
    gramians = torch.stack([(J := torch.randn(m, 7, generator=generator)) @ J.T for _ in range(5)])
    weightings = [
        UPGradWeighting(),
        UPGradWeighting(torch.tensor([1.0, 2.0, 3.0, 4.0])),
        UPGradWeighting(projector=BlockPivotingProjector(reg_eps=0.1)),
        UPGradWeighting(projector=QuadprogProjector()),
        UPGradWeighting(),
    ]
    grouped = UPGradWeighting._forward_grouped(weightings, gramians)
    looped = torch.stack([w(G) for w, G in zip(weightings, gramians)])
    torch.testing.assert_close(grouped, looped, rtol=1e-6, atol=1e-7)
    same = [UPGradWeighting() for _ in range(5)]
    torch.testing.assert_close(
        UPGradWeighting._forward_grouped(same, gramians),
        torch.stack([w(G) for w, G in zip(same, gramians)]),
        rtol=1e-6,
        atol=1e-7,
    )
    with pytest.raises(ValueError, match="weightings"):
        UPGradWeighting._forward_grouped(weightings[:2], gramians)
    assert UPGradWeighting._forward_grouped([], torch.zeros(0, 2, 2)).shape == (0, 2)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("m", [2, 3, 6])
def test_non_finite_gramian_gives_non_finite_weights(bad: float, m: int) -> None:
    # Non-finite in, non-finite out: never the uniform weights of a "too small" trace.
    G = torch.eye(m)
    G[0, 0] = bad
    assert not UPGradWeighting()(G).isfinite().all()


def test_float16_gramian_whose_trace_overflows() -> None:
    torch.manual_seed(0)
    J = torch.randn(128, 4096).half()
    G = J @ J.T  # finite entries (about 4096 on the diagonal), trace above float16's maximum
    assert G.isfinite().all() and not G.float().trace() < 65504
    weights = UPGradWeighting()(G)
    assert weights.dtype == torch.float16
    expected = UPGradWeighting()(G.double())
    mean = torch.full_like(expected, 1 / 128)
    torch.testing.assert_close(weights.double(), expected, rtol=1e-2, atol=1e-4)
    assert (expected - mean).abs().max() > 1e-3  # the answer is not the mean


def _small_gramians(m: int, dtype: torch.dtype, generator: torch.Generator) -> list[torch.Tensor]:
    """Random, correlated, anti-correlated, duplicated, opposite, zero, tiny and huge Gramians."""
    gramians = []
    for kind in ("random", "correlated", "anti", "duplicated", "opposite", "zero", "tiny", "huge"):
        J = torch.randn(m, 4, generator=generator, dtype=torch.float64)
        if m == 2 and kind in ("correlated", "anti"):
            J[1] = J[1] + (3.0 if kind == "correlated" else -3.0) * J[0]
        if m == 2 and kind in ("duplicated", "opposite"):
            J[1] = J[0] if kind == "duplicated" else -J[0]
        J = J * {"zero": 0.0, "tiny": 1e-5, "huge": 1e6}.get(kind, 1.0)
        gramians.append((J @ J.T).to(dtype))
    return gramians


@pytest.mark.parametrize("m", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_closed_form_for_small_m_matches_quadprog(m: int, dtype: torch.dtype) -> None:
    # The closed form skips the float64 solve: it must meet the spec's tolerance against quadprog
    # (1e-6 in float64; in float32, quadprog solves the same float32-normalised problem).
    generator = torch.Generator().manual_seed(20 + m)
    prefs = [None, torch.rand(m, generator=generator) + 0.1, torch.tensor([0.7, -0.4])[:m]]
    rtol = 1e-6 if dtype == torch.float64 else 1e-5
    for G in _small_gramians(m, dtype, generator):
        for pref in prefs:
            for eps in (dict(), dict(norm_eps=1e-12, reg_eps=1e-3), dict(reg_eps=0.1)):
                ours = UPGradWeighting(pref, BlockPivotingProjector(**eps))(G)
                reference = UPGradWeighting(pref, QuadprogProjector(**eps))(G)
                assert ours.dtype == dtype
                torch.testing.assert_close(ours, reference, rtol=rtol, atol=rtol, msg=str(G))
                grouped = UPGradWeighting._forward_grouped(
                    [UPGradWeighting(pref, BlockPivotingProjector(**eps))], G[None]
                )
                torch.testing.assert_close(grouped[0], ours)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_off_diagonal_gives_non_finite_weights(bad: float) -> None:
    G = torch.eye(2)
    G[0, 1] = G[1, 0] = bad
    assert not UPGradWeighting()(G).isfinite().all()


def test_closed_form_refers_indefinite_gramians_to_the_solver() -> None:
    # Not a Gramian (no minimum without the ridge): the general solver warns, as for m >= 3.
    G = torch.diag(torch.tensor([1.0, -0.9]))
    with pytest.warns(UserWarning, match="positive semi-definite"):
        UPGradWeighting(projector=BlockPivotingProjector(norm_eps=0.0, reg_eps=0.0))(G)


def test_a_hook_on_the_mean_preferences_runs() -> None:
    # With the default (mean) preferences the weights are computed without calling the mean's
    # weighting, unless a hook watches it.
    aggregator = UPGrad()
    calls: list[torch.Tensor] = []
    aggregator.gramian_weighting.weighting.register_forward_hook(
        lambda _module, inputs, output: calls.append(output)
    )
    J = torch.tensor([[1.0, 0.0], [-1.0, 2.0], [0.5, 0.5]])
    aggregator(J)
    assert len(calls) == 1
    torch.testing.assert_close(calls[0], torch.full((3,), 1.0 / 3.0))


@pytest.mark.parametrize(("m", "rank"), [(4, 3), (5, 3), (5, 4), (8, 5)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_non_conflicting_on_many_small_gramians(m: int, rank: int, dtype: torch.dtype) -> None:
    # Thousands of small problems, on the CPU where they are solved with Python numbers:
    # rank-deficient Gramians give the longest exchanges (some go through an empty free set).
    # The bound of test_non_conflicting, with the float32 rounding of the normalisation.
    generator = torch.Generator().manual_seed(100 * m + rank)
    J = torch.randn(1500, m, rank, generator=generator, dtype=torch.float64)
    G = (J @ J.mT).to(dtype)
    weighting = UPGradWeighting()
    weights = torch.stack([weighting(G_k) for G_k in G]).double()
    G = G.double()
    trace = G.diagonal(dim1=1, dim2=2).sum(dim=-1, keepdim=True)
    rounding = 1e-9 if dtype == torch.float64 else 1e-5
    largest = weights.abs().amax(dim=-1, keepdim=True)
    allowed = (1e-4 * weights.abs() + rounding * largest) * trace
    assert ((G @ weights[..., None])[..., 0] >= -allowed).all()
