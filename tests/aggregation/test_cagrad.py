"""CAGrad and CAGradWeighting: worked examples, cases derived by hand, independent solvers."""

import warnings

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from torchjd.aggregation import CAGrad, CAGradWeighting, _cagrad
from torchjd.aggregation._cagrad import (
    _cagrad_weights,
    _minimise_by_active_set,
    _minimise_by_enumeration,
    _objective,
)

from ._matrices import J_A, J_B, ONE, ZERO, ZR


@pytest.mark.parametrize(
    ["c", "matrix", "expected"],
    [
        (0.5, J_A, [0.1835, 1.2041, 1.2041]),
        (0.5, J_B, [0.6045, 0.7075, 1.0261, 1.2581]),
        (1.0, J_B, [1.0383, 0.9842, 1.3253, 1.5423]),
        # TorchJD's solver gives [-0.0001, 1.9999, 1.9999]; the exact minimiser gives
        # lambda = (1.2, 0.8), i.e. [0, 2, 2].
        (1.0, J_A, [0.0, 2.0, 2.0]),
    ],
)
def test_worked_examples(c: float, matrix: torch.Tensor, expected: list) -> None:
    assert_close(CAGrad(c)(matrix), torch.tensor(expected), rtol=0, atol=1e-4)


def test_worked_example_weights() -> None:
    assert_close(CAGradWeighting(0.5)(J_A @ J_A.T), torch.tensor([0.7041, 0.5]), rtol=0, atol=1e-4)
    expected = {0.5: [0.6421, 0.5915, 0.3333], 1.0: [0.9338, 0.8757, 0.3333]}
    for c, weights in expected.items():
        out = CAGradWeighting(c)(J_B @ J_B.T)
        assert_close(out, torch.tensor(weights), rtol=0, atol=1e-4)


@pytest.mark.parametrize("c", [0.0, 0.3, 1.0, 2.5])
def test_orthonormal_rows_by_hand(c: float) -> None:
    # G = I_2: G_hat = I / 2, p_bar = (1/2, 1/2), sqrt(phi) = c * sqrt(1/4) = c / 2. The objective
    # 1/4 + (c/2) sqrt(|w|^2 / 2) is least at w* = (1/2, 1/2), where gamma = 1/2, so
    # lambda = 1/2 + (c/2) / (1/2) * 1/2 = (1 + c) / 2 on each row.
    J = torch.eye(2, dtype=torch.float64)
    assert_close(CAGrad(c)(J), torch.full((2,), (1 + c) / 2, dtype=torch.float64))


def test_opposite_rows_by_hand() -> None:
    # g1 = (1, 0), g2 = (-1, 0): G_hat = [[1, -1], [-1, 1]] / 2, p_bar^T G_hat p_bar = 0, so
    # sqrt(phi) = 0 and the minimiser is any vertex (a = 0): gamma = sqrt(1/2) >= norm_eps and
    # lambda = p_bar: the mean, i.e. 0.
    J = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=torch.float64)
    assert_close(CAGradWeighting(1.0)(J @ J.T), torch.full((2,), 0.5, dtype=torch.float64))


def test_edge_cases() -> None:
    assert torch.equal(CAGrad(0.5)(ZERO), torch.zeros(3))
    assert_close(CAGrad(0.5)(ONE), 1.5 * ONE[0])
    assert_close(CAGrad(1.0)(ONE), 2.0 * ONE[0])
    # One row (w* = 1, no solver): 1 + c when the trace reaches norm_eps, else 0.
    assert_close(CAGradWeighting(3.0)(torch.tensor([[4.0]])), torch.tensor([4.0]))
    assert torch.equal(CAGradWeighting(3.0)(torch.tensor([[1e-5]])), torch.zeros(1))
    for c in (0.0, 0.5, 1.0, 3.0):
        # The minimiser puts all its mass on the zero row: gamma = 0 < norm_eps, all weights 0.
        assert torch.equal(CAGrad(c)(ZR), torch.zeros(3))
    # c = 0 gives the mean when gamma >= norm_eps.
    assert_close(CAGrad(0.0)(J_A), J_A.mean(dim=0))
    assert_close(CAGrad(0.0)(J_B), J_B.mean(dim=0))
    assert CAGrad(0.5)(torch.zeros(2, 0)).shape == (0,)
    with pytest.raises(ValueError, match="at least one objective"):
        CAGrad(0.5)(torch.zeros(0, 3))


def test_tiny_matrix_gives_zero() -> None:
    # ||J||_F^2 < norm_eps: the normalised Gramian is zero, so is gamma, so are the weights.
    assert torch.equal(CAGrad(0.5)(1e-3 * J_A), torch.zeros(3))
    assert_close(CAGrad(0.5, norm_eps=0.0)(1e-3 * J_A), 1e-3 * CAGrad(0.5)(J_A))


def _scipy_minimiser(A: np.ndarray, s: float) -> np.ndarray:
    from scipy.optimize import minimize

    m = A.shape[0]
    a = A.mean(axis=1)

    def objective(w: np.ndarray) -> float:
        return float(a @ w + s * np.sqrt(max(w @ A @ w, 0.0)))

    starts = [np.full(m, 1.0 / m)] + [0.8 * np.eye(m)[i] + 0.2 / m for i in range(m)]
    results = [
        minimize(
            objective,
            start,
            method="SLSQP",
            bounds=[(0.0, 1.0)] * m,
            constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1.0}],
            options={"ftol": 1e-15, "maxiter": 500},
        )
        for start in starts
    ]
    return min(results, key=lambda r: r.fun).x


def _weights_from_minimiser(G: torch.Tensor, c: float, w: np.ndarray) -> torch.Tensor:
    m = G.shape[0]
    A = G / G.trace()
    w = torch.from_numpy(w)
    p_bar = torch.full((m,), 1.0 / m, dtype=torch.float64)
    sqrt_phi = c * (p_bar @ A @ p_bar).sqrt()
    return p_bar + sqrt_phi / (w @ A @ w).sqrt() * w


@pytest.mark.parametrize("m", [2, 3, 5, 8, 12])
def test_matches_scipy(m: int) -> None:
    pytest.importorskip("scipy")
    generator = torch.Generator().manual_seed(m)
    for c in (0.25, 0.5, 1.0, 2.0):
        J = torch.randn(m, m + 4, generator=generator, dtype=torch.float64)
        G = J @ J.T
        A = (G / G.trace()).numpy()
        s = c * float(np.sqrt(A.mean()))
        expected = _weights_from_minimiser(G, c, _scipy_minimiser(A, s))
        assert_close(CAGradWeighting(c)(G) @ J, expected @ J, rtol=1e-5, atol=1e-6)


def test_matches_cvxpy() -> None:
    cp = pytest.importorskip("cvxpy")
    generator = torch.Generator().manual_seed(0)
    for m in (2, 4, 7, 10):
        J = torch.randn(m, 12, generator=generator, dtype=torch.float64)
        G = J @ J.T
        A = (G / G.trace()).numpy()
        s = 0.5 * float(np.sqrt(A.mean()))
        U, S, _ = np.linalg.svd(A)
        R = U * np.sqrt(S)
        w = cp.Variable(m)
        problem = cp.Problem(
            cp.Minimize((A.mean(axis=1)) @ w + s * cp.norm(R.T @ w)), [w >= 0, cp.sum(w) == 1]
        )
        problem.solve()
        # The interior-point solver is accurate to about 1e-8 on the objective, so its minimiser
        # to about 1e-4; the objective of ours is not larger.
        ours = CAGradWeighting(0.5)(G)
        expected = _weights_from_minimiser(G, 0.5, np.asarray(w.value))
        assert_close(ours @ J, expected @ J, rtol=1e-4, atol=1e-4)
        A_t, s_t = torch.from_numpy(A), torch.tensor(s, dtype=torch.float64)
        ours_w = _minimise_by_enumeration(A_t, s_t) if m <= 8 else _minimise_by_active_set(A_t, s_t)
        assert float(_objective(ours_w[None], A_t, A_t.mean(dim=1), s_t)) <= problem.value + 1e-9


def _hard_problems(m: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    full = torch.randn(m, 10, generator=generator, dtype=torch.float64)
    duplicated = torch.cat([full[:1], full[:-1]])
    low_rank = torch.randn(m, 2, generator=generator, dtype=torch.float64) @ torch.randn(
        2, 10, generator=generator, dtype=torch.float64
    )
    wide = torch.randn(m, 3, generator=generator, dtype=torch.float64)
    zero_row = torch.cat([torch.zeros(1, 10, dtype=torch.float64), full[1:]])
    return [full, duplicated, low_rank, wide, zero_row]


@pytest.mark.parametrize("m", [2, 3, 5, 8])
def test_both_solvers_agree(m: int) -> None:
    # The batched enumeration (used up to m = 8) and the active-set method (used above) solve the
    # same problem: equal objectives, and equal aggregations wherever the minimiser is unique.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for seed in range(3):
            for J in _hard_problems(m, seed):
                G = J @ J.T
                A = G / G.trace()
                a = A.mean(dim=1)
                for c in (0.0, 0.3, 1.0, 3.0):
                    s = c * a.mean().clamp(min=0.0).sqrt()
                    by_faces = _minimise_by_enumeration(A, s)
                    by_active_set = _minimise_by_active_set(A, s)
                    values = _objective(torch.stack([by_faces, by_active_set]), A, a, s)
                    assert_close(values[0], values[1], rtol=0, atol=1e-8)


@pytest.mark.parametrize("m", [3, 6, 8])
def test_both_solvers_give_the_same_aggregation_on_full_rank_matrices(
    m: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    generator = torch.Generator().manual_seed(10 + m)
    for c in (0.3, 1.0, 3.0):
        J = torch.randn(m, m + 3, generator=generator, dtype=torch.float64)
        G = J @ J.T
        with monkeypatch.context() as patch:
            patch.setattr("torchjd.aggregation._cagrad._ENUMERATE_UP_TO", 0)
            with_active_set = _cagrad_weights(G, c, 1e-4)
        with_faces = _cagrad_weights(G, c, 1e-4)
        assert_close(with_active_set @ J, with_faces @ J, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("m", [9, 16, 32])
def test_large_m_is_optimal(m: int) -> None:
    # Above the enumeration limit: no vertex improves the linearised objective at the solution,
    # and the weights are a point of the simplex.
    generator = torch.Generator().manual_seed(m)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for J in _hard_problems(m, m)[:4]:
            G = J @ J.T
            A = G / G.trace()
            a = A.mean(dim=1)
            s = 0.7 * a.mean().sqrt()
            w = _minimise_by_active_set(A, s)
            assert (w >= 0).all() and torch.isclose(w.sum(), torch.tensor(1.0, dtype=w.dtype))
            norm = (w @ A @ w).sqrt()
            if norm > 1e-6:
                gradient = a + s * (A @ w) / norm
                assert gradient.min() >= gradient @ w - 1e-9
            # Better than random points of the simplex.
            others = torch.rand(200, m, generator=generator, dtype=torch.float64)
            others = others / others.sum(dim=1, keepdim=True)
            assert _objective(w[None], A, a, s) <= _objective(others, A, a, s).min() + 1e-12


@pytest.mark.parametrize("c", [1.0, 2.0])
def test_non_conflicting_for_c_at_least_one(c: float) -> None:
    generator = torch.Generator().manual_seed(3)
    for m in (2, 4, 7, 11):
        J = torch.randn(m, 9, generator=generator, dtype=torch.float64)
        out = CAGrad(c)(J)
        assert (J @ out >= -1e-9 * J.norm() * out.norm()).all()


def test_dtype_and_no_grad() -> None:
    out = CAGrad(0.5)(J_B.double())
    assert out.dtype == torch.float64
    assert CAGradWeighting(0.5)(J_B @ J_B.T).dtype == torch.float32
    J = J_B.clone().requires_grad_()
    assert not CAGrad(0.5)(J).requires_grad
    assert not CAGradWeighting(0.5)(J @ J.T).requires_grad


def test_needs_no_optional_dependency() -> None:
    # The solver is written in torch: construction never checks for cvxpy or clarabel.
    CAGrad(0.5)
    CAGradWeighting(1.0)


def test_validation() -> None:
    CAGrad(c=0.0)
    with pytest.raises(ValueError, match="`c`"):
        CAGrad(c=-1.0)
    with pytest.raises(ValueError, match="`norm_eps`"):
        CAGrad(0.5, norm_eps=-1e-9)
    aggregator = CAGrad(0.5)
    with pytest.raises(ValueError, match="`norm_eps`"):
        aggregator.norm_eps = -1e-9
    with pytest.raises(ValueError, match="`c`"):
        aggregator.c = float("nan")
    aggregator.c = 2.0
    assert aggregator.gramian_weighting.c == 2.0
    with pytest.raises(ValueError, match="`c`"):
        CAGradWeighting(-0.1)


def test_repr_and_str() -> None:
    assert repr(CAGrad(c=0.5, norm_eps=0.0001)) == "CAGrad(c=0.5, norm_eps=0.0001)"
    assert repr(CAGrad(c=1)) == "CAGrad(c=1, norm_eps=0.0001)"
    assert repr(CAGrad(10.0)) == "CAGrad(c=10.0, norm_eps=0.0001)"
    cases = [(0.5, "CAGrad0.5"), (0.25, "CAGrad0.25"), (1.0, "CAGrad1"), (1, "CAGrad1")]
    for c, text in [*cases, (10.0, "CAGrad10")]:
        assert str(CAGrad(c)) == text
    assert repr(CAGradWeighting(0.5)) == "CAGradWeighting()"


@pytest.mark.parametrize("m", [12, 20])
def test_large_m_hard_matrices_converge(m: int) -> None:
    # Rank-deficient, duplicated, opposite and zero rows with m > n, in both dtypes: the
    # active-set method ends without reaching its iteration limit (which would warn).
    from ._matrices import hard_matrices

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for J in hard_matrices(m).values():
            for dtype in (torch.float32, torch.float64):
                for c in (0.5, 3.0):
                    assert torch.isfinite(CAGrad(c)(J.to(dtype))).all()


@pytest.mark.parametrize("m", [3, 12, 32])
def test_interior_minimiser_of_correlated_rows(m: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # Many more columns than rows, and a shared component: nearly orthogonal rows of similar
    # norms, whose minimiser has every weight positive. It is then the stationary point of the
    # whole simplex's affine hull, found by one linear system; the active-set walk (without that
    # shortcut) and scipy find the same point.
    pytest.importorskip("scipy")
    generator = torch.Generator().manual_seed(20 + m)
    J = torch.randn(m, 1000 * m, generator=generator, dtype=torch.float64)
    J = J + 0.3 * torch.randn(1, 1000 * m, generator=generator, dtype=torch.float64)
    G = J @ J.T
    A = G / G.trace()
    a = A.mean(dim=1)
    for c in (0.3, 1.0):
        s = c * a.mean().sqrt()
        interior = _cagrad._interior_minimiser(A, a, s)
        assert interior is not None and (interior > 0).all()
        with monkeypatch.context() as patch:
            patch.setattr(_cagrad, "_interior_minimiser", lambda *args: None)
            walked = _minimise_by_active_set(A, s)
        assert_close(interior, walked, rtol=1e-9, atol=1e-12)
        expected = torch.from_numpy(_scipy_minimiser(A.numpy(), float(s)))
        assert_close(interior, expected, rtol=1e-4, atol=1e-6)


def test_two_tasks_closed_form_matches_the_enumeration() -> None:
    # One 2 x 2 Gramian on the CPU is solved in closed form with Python numbers; the enumeration
    # of the faces (the general path, in tensors) solves the same problem.
    generator = torch.Generator().manual_seed(7)
    cases = []
    for _ in range(30):
        J = torch.randn(2, 4, generator=generator, dtype=torch.float64)
        J[1] += 3 * torch.rand((), generator=generator, dtype=torch.float64) * J[0]
        cases.append(J)
    g = torch.randn(1, 4, generator=generator, dtype=torch.float64)
    cases += [torch.cat([g, 2 * g]), torch.cat([g, -g]), torch.cat([g, -3 * g]), torch.cat([g, g])]
    cases += [torch.cat([g, 0 * g]), torch.cat([0 * g, g]), 1e-3 * cases[0], 1e5 * cases[1]]
    for k, J in enumerate(cases):
        G = J @ J.T
        for c in (0.0, 0.3, 1.0, 3.0):
            # With norm_eps = 0, gamma may be round-off (a zero combination of dependent rows)
            # and the weights any size: only for independent rows.
            for norm_eps in (1e-4, 0.0) if k < 30 else (1e-4,):
                expected = _cagrad_weights(G, c, norm_eps)
                actual = CAGradWeighting(c, norm_eps)(G)
                assert_close(actual @ J, expected @ J, rtol=1e-7, atol=1e-9 * J.norm())
                actual32 = CAGradWeighting(c, norm_eps)(G.float())
                assert actual32.dtype == torch.float32
                assert_close(actual32.double() @ J, expected @ J, rtol=1e-4, atol=1e-5 * J.norm())
    assert CAGradWeighting(0.5)(torch.tensor([[1.0, torch.nan], [torch.nan, 1.0]])).isnan().all()
