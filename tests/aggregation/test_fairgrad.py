import importlib.util

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torchjd.aggregation import FairGrad, FairGradWeighting, Mean

from ._matrices import J_A, J_B, ONE, ZERO, ZR

_ATOL = {"atol": 1e-4, "rtol": 0}
G_A = J_A @ J_A.T
G_B = J_B @ J_B.T


@pytest.mark.parametrize(
    ("alpha", "matrix", "output", "weights"),
    [
        (1.0, J_A, [0.0766, 0.9985, 0.9985], [0.5915, 0.4071]),
        (1.0, J_B, [0.5271, 0.6665, 0.9352, 1.1847], [0.5777, 0.5417, 0.3215]),
        (2.0, J_B, [0.5163, 0.5342, 0.7232, 0.8695], [0.4900, 0.4610, 0.2042]),
        (0, J_B, [0.1667, 0.5, 0.6667, 1.0], [1 / 3, 1 / 3, 1 / 3]),
    ],
)
def test_spec_examples(alpha: float, matrix: torch.Tensor, output: list, weights: list) -> None:
    torch.testing.assert_close(FairGrad(alpha)(matrix), torch.tensor(output), **_ATOL)
    gramian = matrix @ matrix.T
    torch.testing.assert_close(FairGradWeighting(alpha)(gramian), torch.tensor(weights), **_ATOL)


@pytest.mark.parametrize("alpha", [0.1, 0.5, 1.0, 2.0, 7.0])
def test_one_row_closed_form(alpha: float) -> None:
    # m = 1: G w = w^(-1/alpha) gives w = G^(-alpha / (alpha + 1)).
    gramian = torch.tensor([[26.0]], dtype=torch.float64)
    expected = torch.tensor([26.0 ** (-alpha / (alpha + 1))], dtype=torch.float64)
    torch.testing.assert_close(FairGradWeighting(alpha)(gramian), expected)


def test_edge_cases() -> None:
    torch.testing.assert_close(FairGrad(1.0)(ONE), torch.tensor([0.5883, -0.7845, 0.1961]), **_ATOL)
    torch.testing.assert_close(FairGrad(2.0)(ONE), torch.tensor([0.3418, -0.4558, 0.1139]), **_ATOL)
    # ZR: the zero row's equation has no root; the other gives w = 1/sqrt(6): the row / sqrt(6).
    torch.testing.assert_close(FairGrad(1.0)(ZR), ZR[1] / 6**0.5)
    assert torch.equal(FairGrad(1.0)(ZERO), torch.zeros(3))
    # Every row stationary (all zero): the limit of the aggregate is 0, given by zero weights.
    assert torch.equal(FairGradWeighting(1.0)(torch.zeros(3, 3)), torch.zeros(3))
    assert torch.equal(FairGrad(1.0)(torch.zeros(0, 3)), torch.zeros(3))
    assert FairGradWeighting(1.0)(torch.zeros(0, 0)).shape == (0,)


def test_alpha_zero_is_the_mean() -> None:
    generator = torch.Generator().manual_seed(0)
    for matrix in (J_A, J_B, ZR, ONE, torch.randn(5, 3, generator=generator)):
        torch.testing.assert_close(FairGrad(0.0)(matrix), Mean()(matrix))


def _residual(gramian: torch.Tensor, weights: torch.Tensor, alpha: float) -> torch.Tensor:
    target = weights ** (-1.0 / alpha)
    return ((gramian @ weights - target) / target).abs().max()


@settings(max_examples=20, deadline=None)
@given(
    m=st.integers(1, 6),
    extra_columns=st.integers(0, 5),
    seed=st.integers(0, 2**16),
    alpha=st.sampled_from([0.1, 0.5, 1.0, 2.0, 5.0]),
    scale=st.sampled_from([1e-3, 1.0, 1e3]),
)
def test_solves_the_system_and_conflicts_with_no_row(
    m: int, extra_columns: int, seed: int, alpha: float, scale: float
) -> None:
    # Full row rank (m <= n): the system has a root, and J (J^T w) = w^(-1/alpha) > 0.
    generator = torch.Generator().manual_seed(seed)
    matrix = scale * torch.randn(m, m + extra_columns, generator=generator, dtype=torch.float64)
    gramian = matrix @ matrix.T
    weights = FairGradWeighting(alpha)(gramian)
    assert (weights > 0).all()
    # Exact up to the solver's regularisation, which perturbs each equation by a relative
    # (y_i / 1e7)^(1 + 1/alpha) (y_i: the weight relative to the typical one).
    assert _residual(gramian, weights, alpha) < 1e-6
    products = matrix @ FairGrad(alpha)(matrix)
    assert (products > 0).all()


def test_scaling_relation() -> None:
    # G -> c G multiplies the root by c^(-alpha / (alpha + 1)).
    for alpha in (0.5, 1.0, 3.0):
        weights = FairGradWeighting(alpha)(G_B.double())
        scaled = FairGradWeighting(alpha)(1e6 * G_B.double())
        torch.testing.assert_close(scaled, weights * 1e6 ** (-alpha / (alpha + 1)))


def test_against_scipy_least_squares() -> None:
    """The reference's own method: scipy's bounded least squares from x0 = 1/m."""
    np = pytest.importorskip("numpy")
    optimize = pytest.importorskip("scipy.optimize")
    generator = torch.Generator().manual_seed(3)
    for m, n, alpha in [(2, 3, 1.0), (3, 5, 0.1), (4, 6, 2.0), (5, 10, 0.5), (6, 8, 10.0)]:
        matrix = torch.randn(m, n, generator=generator, dtype=torch.float64)
        gramian = (matrix @ matrix.T).numpy()
        result = optimize.least_squares(
            lambda x, g=gramian, a=alpha: g @ x - x ** (-1.0 / a),
            np.full(m, 1.0 / m),
            bounds=(0, np.inf),
        )
        expected = torch.from_numpy(result.x)
        torch.testing.assert_close(
            FairGradWeighting(alpha)(torch.from_numpy(gramian)), expected, rtol=1e-6, atol=0
        )


def test_permutation_equivariant_weights() -> None:
    permutation = torch.tensor([2, 0, 1])
    weights = FairGradWeighting(1.5)(G_B.double())
    permuted = FairGradWeighting(1.5)(G_B.double()[permutation][:, permutation])
    torch.testing.assert_close(permuted, weights[permutation])


def test_degenerate_inputs_are_finite() -> None:
    generator = torch.Generator().manual_seed(4)
    row = torch.randn(1, 4, generator=generator)
    other = torch.randn(2, 4, generator=generator)
    cases = {
        "opposite rows": torch.cat([row, -row, other]),
        "duplicated rows": torch.cat([row, row, other]),
        "rank one": torch.randn(5, 1, generator=generator) @ row,
        "more rows than columns": torch.randn(8, 3, generator=generator),
        "tiny": 1e-10 * torch.cat([row, other]),
        "huge": 1e10 * torch.cat([row, other]),
    }
    for name, matrix in cases.items():
        for dtype in (torch.float32, torch.float64):
            for alpha in (0.1, 1.0, 10.0):
                out = FairGrad(alpha)(matrix.to(dtype))
                assert torch.isfinite(out).all(), (name, dtype, alpha)
    # Two equal rows share their weight.
    weights = FairGradWeighting(1.0)(
        cases["duplicated rows"].double() @ cases["duplicated rows"].double().T
    )
    torch.testing.assert_close(weights[0], weights[1])


def test_budget_of_one_step_is_finite() -> None:
    generator = torch.Generator().manual_seed(5)
    for shape in ((1, 1), (4, 3), (9, 11)):
        matrix = torch.randn(*shape, generator=generator)
        assert torch.isfinite(FairGrad(1.0, max_iters=1)(matrix)).all()
        assert torch.equal(FairGrad(1.0, max_iters=1)(torch.zeros(*shape)), torch.zeros(shape[1]))


def test_validation_happens_at_call() -> None:
    aggregator = FairGrad(alpha=-3.0)  # accepted at construction, as in TorchJD
    with pytest.raises(ValueError, match="`alpha`"):
        aggregator(J_A)
    for alpha in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="`alpha`"):
            FairGradWeighting(alpha)(G_A)
    for max_iters in (0, -1, 2.5):
        with pytest.raises(ValueError, match="`max_iters`"):
            FairGrad(1.0, max_iters=max_iters)(J_A)
    aggregator.alpha = 1.0
    assert aggregator.gramian_weighting.alpha == 1.0
    aggregator.max_iters = 50
    assert aggregator.gramian_weighting.max_iters == 50
    torch.testing.assert_close(aggregator(J_A), torch.tensor([0.0766, 0.9985, 0.9985]), **_ATOL)


def test_repr_and_str() -> None:
    assert repr(FairGrad(alpha=0.1, max_iters=None)) == "FairGrad(alpha=0.1, max_iters=None)"
    assert repr(FairGrad(alpha=1.0, max_iters=5)) == "FairGrad(alpha=1.0, max_iters=5)"
    assert str(FairGrad(alpha=0.1)) == "0.1-FairGrad"
    assert str(FairGrad(1.0)) == "1.0-FairGrad"
    assert str(FairGrad(2)) == "2-FairGrad"
    assert repr(FairGradWeighting(1.0)) == "FairGradWeighting()"
    assert str(FairGradWeighting(1.0)) == "FairGradWeighting()"


def test_no_grad_and_dtype() -> None:
    matrix = J_B.clone().requires_grad_()
    assert not FairGrad(1.0)(matrix).requires_grad
    assert not FairGradWeighting(1.0)(matrix @ matrix.T).requires_grad
    assert FairGrad(1.0)(J_B.double()).dtype == torch.float64
    assert FairGradWeighting(1.0)(G_B).dtype == torch.float32


def test_needs_no_optional_dependency(monkeypatch: pytest.MonkeyPatch) -> None:
    original = importlib.util.find_spec

    def without_scipy(name: str, *args: object) -> object:
        return None if name.split(".")[0] in {"scipy", "numpy"} else original(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", without_scipy)
    torch.testing.assert_close(FairGrad(1.0)(J_A), torch.tensor([0.0766, 0.9985, 0.9985]), **_ATOL)


# --- Pareto-stationary inputs: no root; the limit of the aggregate conflicts with no row ---------


def _stationary_3d(seed: int) -> torch.Tensor:
    """Four rows in R^3 with 0 in their convex hull: three independent rows and a negative
    combination of them, rotated."""
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=generator, dtype=torch.float64))
    rows = torch.diag(0.5 + torch.rand(3, generator=generator, dtype=torch.float64))
    return torch.cat([rows, -0.7 * rows.sum(dim=0, keepdim=True)]) @ q


@pytest.mark.parametrize("alpha", [0.1, 1.0, 10.0])
@pytest.mark.parametrize("max_iters", [None, 1000])
def test_pareto_stationary_rows_give_zero(alpha: float, max_iters: int | None) -> None:
    # 0 = a (1000, 3) + b (1, -1000) + c (-100, 100) + e (2, 2) with a, b, c, e > 0: no d has
    # J d > 0, so the only update that conflicts with no row is 0.
    matrix = torch.tensor([[1000.0, 3], [1, -1000], [-100, 100], [2, 2]], dtype=torch.float64)
    d = FairGrad(alpha, max_iters)(matrix)
    assert float(d.norm()) <= 1e-12 * float(matrix.norm()), d


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("alpha", [0.1, 1.0, 10.0])
@pytest.mark.parametrize("seed", range(4))
def test_pareto_stationary_in_float32(seed: int, alpha: float, dtype: torch.dtype) -> None:
    # The float32 Gramian's rounding (eigenvalues about -1e-8) is far above the regularisation of
    # the Newton solve: the stationarity must be detected, not left to the solver.
    matrix = _stationary_3d(seed)
    d = FairGrad(alpha)(matrix.to(dtype)).double()
    assert float(d.norm()) <= 10 * torch.finfo(dtype).eps * float(matrix.norm()), d


@pytest.mark.parametrize("alpha", [0.1, 1.0, 10.0])
def test_partly_stationary_rows_leave_the_others_their_fair_share(alpha: float) -> None:
    # Rows 0 and 1 are opposite (stationary); row 2 projected off their span is q = (0, 1, 0),
    # whose equation w ||q||^2 = w^(-1/alpha) gives w = 1: the limit of the aggregate is q, and
    # it conflicts with no row (J d = (0, 0, 1)).
    matrix = torch.tensor([[1.0, 0, 0], [-2, 0, 0], [0.3, 1, 0]], dtype=torch.float64)
    d = FairGrad(alpha)(matrix)
    torch.testing.assert_close(d, torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64))
    weights = FairGradWeighting(alpha)(matrix @ matrix.T)
    torch.testing.assert_close(weights @ matrix, d)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_zero_row_in_half_precision(dtype: torch.dtype) -> None:
    # The zero row's weight would be unbounded (it overflowed to inf, and 0 * inf = NaN).
    matrix = torch.tensor([[0.0, 0.0], [0.0, 1.0]], dtype=dtype)
    out = FairGrad(1.0)(matrix)
    assert out.dtype == dtype
    torch.testing.assert_close(out, torch.tensor([0.0, 1.0], dtype=dtype))


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_many_rows_in_half_precision_are_not_taken_for_stationary(
    dtype: torch.dtype, tolerance: float
) -> None:
    # 128 rows in 4096 dimensions: the min-norm point is far from 0 (squared norm ~ 32 for
    # squared row norms ~ 4096), above what the rounding of a half-precision Gramian can fake.
    matrix = torch.randn(128, 4096, generator=torch.Generator().manual_seed(0)).to(dtype)
    expected = FairGrad(1.0)(matrix.double())
    out = FairGrad(1.0)(matrix)
    assert out.dtype == dtype
    error = (out.double() - expected).norm() / expected.norm()
    assert float(error) <= tolerance


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_gramian_gives_non_finite_weights_without_raising(value: float) -> None:
    scales = torch.tensor([[1e-6], [1.0], [1e3]], dtype=torch.float64)
    matrix = scales * torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    gramian = matrix @ matrix.T
    gramian[0, 1] = gramian[1, 0] = value
    assert not torch.isfinite(FairGradWeighting(1.0)(gramian)).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("alpha", [0.1, 1.0, 10.0])
@pytest.mark.parametrize("offset", [1e-9, 1e-7, 1e-5, 1e-3, 1e-1])
def test_near_pareto_stationary_rows_conflict_with_none(
    offset: float, alpha: float, dtype: torch.dtype
) -> None:
    # The stationary rows above lifted by a third coordinate offset * ||row||: a root exists (all
    # the rows have a positive third coordinate) but needs very large weights; whatever is
    # returned must conflict with no row: J_i . d >= -tau ||J_i|| ||d||, plus rounding.
    planar = torch.tensor([[1000.0, 3], [1, -1000], [-100, 100], [2, 2]], dtype=torch.float64)
    matrix = torch.cat([planar, offset * planar.norm(dim=1, keepdim=True)], dim=1)
    cast = matrix.to(dtype)
    d = FairGrad(alpha)(cast).double()
    tau = 1e-6 if dtype == torch.float64 else 1e-4
    row_norms = matrix.norm(dim=1)
    products = matrix @ d
    # d = J^T w is rounded in the dtype: up to about eps ||J_i|| sum_j |w_j| ||J_j|| in J_i . d.
    weights = FairGradWeighting(alpha)(cast @ cast.T).double().abs()
    rounding = 8 * torch.finfo(dtype).eps * row_norms * (weights @ row_norms)
    assert bool((products >= -tau * row_norms * d.norm() - rounding).all()), products
