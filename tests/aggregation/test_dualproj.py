"""DualProj and DualProjWeighting: worked examples, optimality conditions, quadprog cross-check."""

import pytest
import torch
from torch import Tensor
from torch.testing import assert_close

from torchjd.aggregation import ConstantWeighting, DualProj, DualProjWeighting, MeanWeighting
from torchjd.linalg import BlockPivotingProjector, DualConeProjector, QuadprogProjector

from ._matrices import J_A, J_B, ONE, ZERO, ZR


@pytest.mark.parametrize(
    ["pref_vector", "matrix", "expected"],
    [
        (None, J_A, [0.5563, 1.1109, 1.1109]),
        (None, J_B, [0.1667, 0.5, 0.6667, 1.0]),
        ([1.0, 2.0, 3.0], J_B, [-1.0, 4.5, 3.0, 8.0]),
        ([1.0, 2.0], J_A, [2.2253, 4.4437, 4.4437]),
    ],
)
def test_worked_examples(pref_vector: list | None, matrix: Tensor, expected: list) -> None:
    p = None if pref_vector is None else torch.tensor(pref_vector)
    assert_close(DualProj(p)(matrix), torch.tensor(expected), rtol=0, atol=1e-4)


def test_worked_example_weights() -> None:
    weighting = DualProjWeighting()
    assert_close(weighting(J_A @ J_A.T), torch.tensor([0.6109, 0.5]), rtol=0, atol=1e-4)
    assert_close(weighting(J_B @ J_B.T), torch.full((3,), 1 / 3), rtol=0, atol=1e-4)


def test_two_rows_by_hand() -> None:
    # Exact projector. g1 = (1, 0), g2 = (-1, 1): the mean (0, 1/2) conflicts with neither
    # (g1 . mean = 0), so it is its own projection. With g2 = (-2, 1): mean (-1/2, 1/2) conflicts
    # with g1; its projection onto {x : x1 >= 0, -2 x1 + x2 >= 0} is (0, 1/2).
    exact = DualProj(projector=BlockPivotingProjector(norm_eps=0.0, reg_eps=0.0))
    J = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    assert_close(exact(J), torch.tensor([0.0, 0.5], dtype=torch.float64))
    J = torch.tensor([[1.0, 0.0], [-2.0, 1.0]], dtype=torch.float64)
    assert_close(exact(J), torch.tensor([0.0, 0.5], dtype=torch.float64))


def _check_optimality(G: Tensor, p: Tensor, w: Tensor, norm_eps: float, reg_eps: float) -> None:
    """KKT conditions of min_v v^T A v subject to v >= p, with A the normalised, regularised G."""
    trace = G.trace()
    A = (G / trace if trace >= norm_eps else torch.zeros_like(G)) + reg_eps * torch.eye(len(G))
    scale = A.abs().max() * w.abs().max()
    tol = 1e-9 * scale
    assert (w >= p - 1e-12).all()
    assert (A @ w >= -tol).all()
    assert abs((w - p) @ (A @ w)) <= tol


@pytest.mark.parametrize("m", [1, 2, 3, 5, 8])
def test_optimality_conditions(m: int) -> None:
    generator = torch.Generator().manual_seed(m)
    for n in (2, m + 3):
        J = torch.randn(m, n, generator=generator, dtype=torch.float64)
        G = J @ J.T
        p = torch.rand(m, generator=generator, dtype=torch.float64)
        w = DualProjWeighting(pref_vector=p)(G)
        _check_optimality(G, p, w, 1e-4, 1e-4)
        w = DualProjWeighting()(G)
        _check_optimality(G, torch.full((m,), 1 / m, dtype=torch.float64), w, 1e-4, 1e-4)


@pytest.mark.parametrize("m", [2, 4, 7])
def test_matches_quadprog(m: int) -> None:
    pytest.importorskip("quadprog")
    generator = torch.Generator().manual_seed(20 + m)
    for _ in range(3):
        J = torch.randn(m, 6, generator=generator, dtype=torch.float64)
        G = J @ J.T
        ours = DualProjWeighting()(G)
        reference = DualProjWeighting(projector=QuadprogProjector())(G)
        assert_close(ours, reference, rtol=0, atol=1e-6)


def test_non_conflicting_up_to_the_regularisation() -> None:
    # With A = G / tr(G) + reg_eps I, the optimality conditions give A w >= 0, i.e.
    # G w >= -reg_eps tr(G) w: the result conflicts with no row up to that.
    generator = torch.Generator().manual_seed(5)
    for m, n in ((2, 3), (4, 4), (6, 10)):
        J = torch.randn(m, n, generator=generator, dtype=torch.float64)
        w = DualProjWeighting()(J @ J.T)
        assert (J @ (w @ J) >= -1e-4 * (J**2).sum() * w - 1e-12).all()


def test_mean_is_kept_when_it_conflicts_with_no_row() -> None:
    assert (J_B @ J_B.T @ torch.full((3,), 1 / 3) >= 0).all()
    assert_close(DualProj()(J_B), J_B.mean(dim=0), rtol=0, atol=1e-4)


def test_edge_cases() -> None:
    assert torch.equal(DualProj()(ZERO), torch.zeros(3))
    assert_close(DualProj()(ONE), ONE[0])
    assert_close(DualProj()(ZR), torch.tensor([0.5, 1.0, -0.5]))
    # ||J||_F^2 < norm_eps: the normalised Gramian is zero and the result is the mean.
    assert_close(DualProj()(1e-3 * J_A), torch.full((3,), 0.001))
    assert DualProj()(torch.zeros(2, 0)).shape == (0,)


def test_projector_property() -> None:
    aggregator = DualProj()
    assert isinstance(aggregator.projector, BlockPivotingProjector)
    projector = QuadprogProjector(norm_eps=0.001, reg_eps=0.01)
    aggregator.projector = projector
    assert aggregator.projector is projector
    assert aggregator.gramian_weighting.projector is projector
    aggregator.projector = None
    assert isinstance(aggregator.projector, BlockPivotingProjector)
    assert aggregator.projector is not projector


class _ClampProjector(DualConeProjector):
    """Ignores the Gramian: returns max(u, 0)."""

    def __call__(self, U: Tensor, G: Tensor) -> Tensor:
        return U.clamp(min=0.0)

    def __repr__(self) -> str:
        return "Clamp()"


def test_custom_projector() -> None:
    aggregator = DualProj(projector=_ClampProjector())
    assert_close(aggregator(J_A), J_A.mean(dim=0))
    assert repr(aggregator) == "DualProj(pref_vector=None, projector=Clamp())"


def test_pref_vector() -> None:
    p = torch.tensor([1.0, 2.0])
    aggregator = DualProj(pref_vector=p)
    assert aggregator.pref_vector is p
    assert isinstance(aggregator.gramian_weighting.weighting, ConstantWeighting)
    assert aggregator.gramian_weighting.weighting.weights is p
    aggregator.pref_vector = None
    assert isinstance(aggregator.gramian_weighting.weighting, MeanWeighting)
    with pytest.raises(ValueError, match="`pref_vector`"):
        DualProj(torch.ones(2, 2))
    with pytest.raises(ValueError):
        DualProj(torch.tensor([1.0, 2.0, 3.0]))(J_A)


def test_batched_and_grouped_match_single_calls() -> None:
    generator = torch.Generator().manual_seed(9)
    J = torch.randn(4, 3, 5, generator=generator, dtype=torch.float64)
    gramians = J @ J.mT
    weighting = DualProjWeighting()
    expected = torch.stack([weighting(G) for G in gramians])
    assert_close(type(weighting)._forward_grouped([weighting] * len(gramians), gramians), expected)
    p = torch.tensor([1.0, 2.0, 0.5])
    weightings = [
        DualProjWeighting(),
        DualProjWeighting(pref_vector=p),
        DualProjWeighting(projector=QuadprogProjector()),
        DualProjWeighting(projector=_ClampProjector()),
    ]
    grouped = DualProjWeighting._forward_grouped(weightings, gramians)
    assert_close(
        grouped, torch.stack([w(G) for w, G in zip(weightings, gramians)]), atol=1e-6, rtol=0
    )
    with pytest.raises(ValueError, match="one weighting per"):
        DualProjWeighting._forward_grouped(weightings[:2], gramians)
    assert DualProjWeighting._forward_grouped([], torch.zeros(0, 3, 3)).shape == (0, 3)


def test_dtype_and_no_grad() -> None:
    assert DualProj()(J_A.double()).dtype == torch.float64
    J = J_B.clone().requires_grad_()
    assert not DualProj()(J).requires_grad
    assert not DualProjWeighting()(J @ J.T).requires_grad


def test_repr_and_str() -> None:
    assert (
        repr(DualProj())
        == "DualProj(pref_vector=None, projector=BlockPivotingProjector(norm_eps=0.0001, "
        "reg_eps=0.0001))"
    )
    aggregator = DualProj(
        pref_vector=None, projector=QuadprogProjector(norm_eps=0.001, reg_eps=0.01)
    )
    assert (
        repr(aggregator)
        == "DualProj(pref_vector=None, projector=QuadprogProjector(norm_eps=0.001, reg_eps=0.01))"
    )
    assert str(aggregator) == "DualProj"
    assert str(DualProj(torch.tensor([1.0, 2.0, 3.0]))) == "DualProj([1., 2., 3.])"
    assert repr(DualProjWeighting()) == "DualProjWeighting(\n  (weighting): MeanWeighting()\n)"


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("m", [2, 3, 6])
def test_non_finite_gramian_gives_non_finite_weights(bad: float, m: int) -> None:
    # Non-finite in, non-finite out: never the mean of a "too small" trace.
    G = torch.eye(m)
    G[0, 0] = bad
    assert not DualProjWeighting()(G).isfinite().all()


@pytest.mark.parametrize(("m", "rank"), [(4, 3), (5, 3), (5, 4), (8, 5)])
def test_non_conflicting_on_many_small_gramians(m: int, rank: int) -> None:
    # Thousands of small problems, on the CPU where they are solved with Python numbers:
    # rank-deficient Gramians give the longest exchanges (some go through an empty free set).
    generator = torch.Generator().manual_seed(200 * m + rank)
    J = torch.randn(1500, m, rank, generator=generator, dtype=torch.float64)
    G = J @ J.mT
    weighting = DualProjWeighting()
    weights = torch.stack([weighting(G_k) for G_k in G])
    trace = G.diagonal(dim1=1, dim2=2).sum(dim=-1, keepdim=True)
    largest = weights.abs().amax(dim=-1, keepdim=True)
    allowed = (1e-4 * weights.abs() + 1e-9 * largest) * trace
    assert ((G @ weights[..., None])[..., 0] >= -allowed).all()
