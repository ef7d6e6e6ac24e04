"""MGDA: the spec's values, Frank–Wolfe by hand, and the min-norm point from quadprog."""

import numpy as np
import pytest
import quadprog
import torch
from torch import Tensor
from torch.testing import assert_close

from torchjd.aggregation import MGDA, MGDAWeighting
from torchjd.aggregation import _mgda as mgda_module
from torchjd.aggregation._mgda import _mgda_weights

from ._matrices import J_A, J_B, ONE, ZERO, ZR


def _sequential_mgda(gramian: Tensor, epsilon: float, max_iters: int) -> Tensor:
    """The definition: one problem, a Python branch per step, stop as soon as gamma < epsilon."""
    m = gramian.shape[0]
    alpha = torch.full((m,), 1.0 / m, dtype=gramian.dtype)
    for _ in range(max_iters):
        products = gramian @ alpha
        t = int(torch.argmin(products))
        a, b, c = products[t], alpha @ products, gramian[t, t]
        if c <= a:
            gamma = 1.0
        elif b <= a:
            gamma = 0.0
        else:
            gamma = float((b - a) / (b + c - 2 * a))
        alpha = (1 - gamma) * alpha
        alpha[t] += gamma
        if gamma < epsilon:
            break
    return alpha


def _min_norm_weights(gramian: Tensor) -> Tensor:
    """argmin of a^T G a over the simplex, by quadprog (G slightly regularised to be definite)."""
    m = gramian.shape[0]
    regularised = gramian.numpy() + 1e-12 * np.eye(m)
    constraints = np.concatenate([np.ones((m, 1)), np.eye(m)], axis=1)
    bounds = np.concatenate([[1.0], np.zeros(m)])
    solution = quadprog.solve_qp(regularised, np.zeros(m), constraints, bounds, meq=1)[0]
    return torch.from_numpy(solution)


def _random_matrix(m: int, n: int, seed: int) -> Tensor:
    return torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# --- the spec's worked examples -------------------------------------------------------------


def test_spec_values() -> None:
    assert_close(MGDA()(J_A), torch.tensor([0.0, 1.0, 1.0]), rtol=0, atol=1e-4)
    assert_close(MGDAWeighting()(J_A @ J_A.T), torch.tensor([0.6, 0.4]), rtol=0, atol=1e-4)
    assert_close(MGDA()(J_B), torch.tensor([0.6275, 0.4725, 0.5638, 0.5998]), rtol=0, atol=1e-4)
    assert_close(
        MGDAWeighting()(J_B @ J_B.T), torch.tensor([0.4729, 0.4545, 0.0726]), rtol=0, atol=1e-4
    )
    assert_close(
        MGDA(max_iters=1)(J_B), torch.tensor([0.2718, 0.3107, 0.8350, 0.8738]), rtol=0, atol=1e-4
    )
    assert_close(
        MGDAWeighting(max_iters=1)(J_B @ J_B.T),
        torch.tensor([0.4175, 0.2913, 0.2913]),
        rtol=0,
        atol=1e-4,
    )


# --- Frank–Wolfe by hand --------------------------------------------------------------------


def test_j_a_by_hand() -> None:
    # G = [[18, -22], [-22, 38]], alpha = [1/2, 1/2]: G alpha = [-2, 8], t = 0, a = -2, b = 3,
    # c = 18, gamma = (3 + 2) / (3 + 18 + 4) = 1/5, alpha = [0.6, 0.4]. Then G alpha = [2, 2]:
    # t = 0 (first of the tie), a = b = 2 -> gamma = 0 < epsilon: stop.
    gramian = (J_A @ J_A.T).double()
    assert_close(MGDAWeighting()(gramian), torch.tensor([0.6, 0.4], dtype=torch.float64))


def test_max_iters_one_by_hand() -> None:
    # G_B = [[6, -3.5, 0.5], [-3.5, 6.25, 1.5], [0.5, 1.5, 6.25]], alpha = 1/3: G alpha =
    # [3, 4.25, 8.25] / 3, t = 0, a = 1, b = 15.5 / 9 = 31/18, c = 6,
    # gamma = (31/18 - 1) / (31/18 + 6 - 2) = 13/103, alpha = (90/103) / 3 + (13/103) e_0.
    gramian = (J_B @ J_B.T).double()
    expected = torch.tensor([43 / 103, 30 / 103, 30 / 103], dtype=torch.float64)
    assert_close(MGDAWeighting(max_iters=1)(gramian), expected)


def test_ties_take_the_first_index() -> None:
    # Two equal rows: G alpha = [1, 1], t = 0, c = a -> gamma = 1, alpha = e_0.
    assert torch.equal(MGDAWeighting()(torch.ones(2, 2)), torch.tensor([1.0, 0.0]))


def test_edge_cases() -> None:
    assert torch.equal(MGDAWeighting()(torch.zeros(2, 2)), torch.tensor([1.0, 0.0]))
    assert torch.equal(MGDA()(ZERO), torch.zeros(3))
    assert torch.equal(MGDA()(ONE), ONE[0])
    assert torch.equal(MGDA()(ZR), torch.zeros(3))
    with pytest.raises(ValueError, match="at least one objective"):
        MGDA()(torch.zeros(0, 3))
    assert MGDA()(torch.zeros(2, 0)).shape == (0,)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 12])
def test_matches_sequential_definition(m: int, dtype: torch.dtype) -> None:
    tolerance = 1e-4 if dtype == torch.float32 else 1e-9
    for seed in range(3):
        matrix = _random_matrix(m, 1 + (seed * 5 + m) % 9, seed)
        gramian = (matrix @ matrix.T).to(dtype)
        for epsilon, max_iters in [(1e-3, 100), (1e-2, 7)]:
            expected = _sequential_mgda(gramian, epsilon, max_iters)
            actual = _mgda_weights(gramian, epsilon, max_iters)
            assert_close(actual, expected, rtol=tolerance, atol=tolerance)


def test_checking_every_iteration_gives_identical_results(monkeypatch: pytest.MonkeyPatch) -> None:
    # Converged problems are frozen exactly, so how often the host checks does not matter.
    gramians = torch.stack([(lambda x: x @ x.T)(_random_matrix(6, 4, seed)) for seed in range(5)])
    default = _mgda_weights(gramians, 1e-3, 300)
    for check_every in (1, 3, 1000):
        monkeypatch.setattr(mgda_module, "_CHECK_EVERY", check_every)
        assert torch.equal(_mgda_weights(gramians, 1e-3, 300), default)


def _definition_in_dtype(gramian: Tensor, epsilon: float, max_iters: int) -> Tensor:
    """The definition with every scalar a tensor of the Gramian's dtype (plain tensor arithmetic
    in the input's dtype), ``b + c - 2a`` written ``(b - a) + (c - a)``."""
    m = gramian.shape[0]
    alpha = torch.full((m,), 1.0 / m, dtype=gramian.dtype)
    for _ in range(max_iters):
        products = gramian @ alpha
        t = int(torch.argmin(products))
        a, b, c = products[t], torch.linalg.vecdot(alpha, products), gramian[t, t]
        if c <= a:
            gamma = torch.ones((), dtype=gramian.dtype)
        elif b <= a:
            gamma = torch.zeros((), dtype=gramian.dtype)
        else:
            gamma = (b - a) / ((b - a) + (c - a))
        alpha = alpha * (1 - gamma)
        alpha[t] += gamma
        if gamma < epsilon:
            break
    return alpha


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-4), (torch.float64, 1e-6)])
def test_cpu_steps_are_rounded_to_the_dtype(dtype: torch.dtype, tolerance: float) -> None:
    # One problem on the CPU takes its scalar steps with Python numbers. Rank-deficient rows of
    # norms 1e-6 to 1e6 make Frank–Wolfe's path hang on the last place of gamma (1 - gamma is 0
    # in float32 where it is 3e-8 in float64, next to a row of squared norm 1e12): steps in
    # double precision, or in another order, ended elsewhere on about 6% of these in float32
    # (0.3% in float64), by up to 0.02 in a weight.
    generator = torch.Generator().manual_seed(0)
    for k in range(1000):
        m = 3 + k % 6
        rank = 1 + k % (m - 1)
        factor = torch.randn(m, rank, generator=generator, dtype=torch.float64)
        matrix = factor @ torch.randn(rank, 5, generator=generator, dtype=torch.float64)
        scales = 10.0 ** (12 * torch.rand(m, 1, generator=generator, dtype=torch.float64) - 6)
        gramian = ((matrix * scales) @ (matrix * scales).T).to(dtype)
        expected = _definition_in_dtype(gramian, 1e-3, 100)
        assert_close(_mgda_weights(gramian, 1e-3, 100), expected, rtol=tolerance, atol=tolerance)


# --- the min-norm point ---------------------------------------------------------------------


@pytest.mark.parametrize(("m", "n"), [(2, 5), (3, 5), (5, 7), (6, 3), (4, 2), (10, 4)])
def test_approaches_the_min_norm_point_of_the_hull(m: int, n: int) -> None:
    # For d = J^T alpha in the hull and d* its min-norm point: ||d - d*||^2 <= ||d||^2 - ||d*||^2
    # (d* is a projection onto a convex set) and ||d||^2 - ||d*||^2 <= 2 (b - a), the Frank-Wolfe
    # gap at alpha. So the distance to quadprog's point is certified by alpha alone.
    matrix = _random_matrix(m, n, m * 100 + n)
    gramian = matrix @ matrix.T
    d_star = matrix.T @ _min_norm_weights(gramian)
    for epsilon, max_iters in [(1e-3, 100), (1e-6, 2000)]:
        alpha = MGDAWeighting(epsilon=epsilon, max_iters=max_iters)(gramian)
        assert (alpha >= 0).all() and torch.isclose(alpha.sum(), torch.tensor(1.0).double())
        d = matrix.T @ alpha
        products = gramian @ alpha
        fw_gap = float(alpha @ products - products.min())
        excess = float(d @ d - d_star @ d_star)
        assert -1e-10 <= excess <= 2 * fw_gap + 1e-10
        assert float((d - d_star).norm() ** 2) <= excess + 1e-10


def test_two_rows_reach_the_min_norm_point() -> None:
    # On a segment the exact line search lands on the min-norm point in one step.
    for seed in range(5):
        matrix = _random_matrix(2, 4, seed)
        gramian = matrix @ matrix.T
        d_star = matrix.T @ _min_norm_weights(gramian)
        assert_close(MGDA()(matrix), d_star, rtol=0, atol=1e-9)


@pytest.mark.parametrize(("m", "n"), [(5, 7), (10, 20), (20, 10), (50, 100)])
def test_kkt_conditions_of_the_spec(m: int, n: int) -> None:
    # The spec's property: with epsilon = 1e-5 and max_iters = 1000, alpha >= 0, sum(alpha) = 1 and
    # G alpha + lambda 1 >= 0 for lambda = -alpha^T G alpha, to 1e-2; here relatively to the
    # scale max_k ||g_k||^2 of G, since the Frank-Wolfe gap after k steps is O(max_k ||g_k||^2 / k).
    matrix = _random_matrix(m, n, m + n)
    gramian = matrix @ matrix.T
    alpha = MGDAWeighting(epsilon=1e-5, max_iters=1000)(gramian)
    assert (alpha >= 0).all()
    assert_close(alpha.sum(), torch.tensor(1.0, dtype=torch.float64))
    products = gramian @ alpha
    scale = float(gramian.diagonal().max())
    assert (products - alpha @ products >= -1e-2 * scale).all()


def test_conflict_is_bounded_by_epsilon() -> None:
    # When Frank-Wolfe stops with gamma < epsilon at alpha, min_k g_k . d >= -epsilon ||d - g_t||^2
    # for the previous d, and one more step of size gamma < epsilon moves each g_k . d by at most
    # epsilon max_k ||g_k||^2 more: J d >= -5 epsilon max_k ||g_k||^2. (MGDA with a finite
    # tolerance is not non-conflicting relatively to ||d||, e.g. when d* = 0.)
    epsilon = 1e-3
    for seed in range(20):
        generator = torch.Generator().manual_seed(seed)
        m, n = (
            int(torch.randint(2, 7, (1,), generator=generator)),
            int(torch.randint(1, 9, (1,), generator=generator)),
        )
        matrix = torch.randn(m, n, generator=generator, dtype=torch.float64)
        d = MGDA(epsilon=epsilon, max_iters=100_000)(matrix)
        bound = 5 * epsilon * float((matrix**2).sum(dim=1).max())
        assert (matrix @ d >= -bound).all()


# --- gradients, dtype, validation, repr -----------------------------------------------------


def test_differentiable() -> None:
    matrix = J_B.clone().requires_grad_()
    out = MGDA()(matrix)
    assert out.requires_grad
    gramian = (J_B @ J_B.T).requires_grad_()
    assert MGDAWeighting()(gramian).requires_grad


def test_gradients_are_finite_on_degenerate_inputs() -> None:
    # The quotient (b - a) / (b + c - 2a) is evaluated on a safe denominator where it is unused.
    for matrix in (ZERO, ZR, ONE, torch.ones(3, 2), J_A):
        leaf = matrix.clone().double().requires_grad_()
        MGDA()(leaf).sum().backward()
        assert torch.isfinite(leaf.grad).all()


def test_gradient_matches_finite_differences() -> None:
    # J_A converges in 2 iterations through the line-search branch, a smooth function of G.
    gramian = (J_A @ J_A.T).double().requires_grad_()
    assert torch.autograd.gradcheck(lambda g: MGDAWeighting()(g), (gramian,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_preserves_dtype(dtype: torch.dtype) -> None:
    assert MGDA()(J_B.to(dtype)).dtype == dtype


def test_repr_and_str() -> None:
    assert repr(MGDA()) == "MGDA(epsilon=0.001, max_iters=100)"
    assert repr(MGDA(epsilon=0.001, max_iters=100)) == "MGDA(epsilon=0.001, max_iters=100)"
    assert str(MGDA()) == "MGDA"
    assert repr(MGDAWeighting()) == "MGDAWeighting()"


@pytest.mark.parametrize("cls", [MGDA, MGDAWeighting])
def test_validation(cls: type) -> None:
    for epsilon in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="`epsilon`"):
            cls(epsilon=epsilon)
    for max_iters in (0, -3):
        with pytest.raises(ValueError, match="`max_iters`"):
            cls(max_iters=max_iters)
    with pytest.raises(TypeError, match="`max_iters`"):
        cls(max_iters=2.5)
    instance = cls(epsilon=1e-9, max_iters=1)
    with pytest.raises(ValueError, match="`epsilon`"):
        instance.epsilon = 0.0
    with pytest.raises(ValueError, match="`max_iters`"):
        instance.max_iters = 0
    instance.epsilon, instance.max_iters = 0.5, 7
    assert (instance.epsilon, instance.max_iters) == (0.5, 7)


def test_aggregator_properties_delegate_to_the_weighting() -> None:
    aggregator = MGDA()
    aggregator.epsilon = 0.01
    aggregator.max_iters = 3
    assert aggregator.gramian_weighting.epsilon == 0.01
    assert aggregator.gramian_weighting.max_iters == 3
    assert repr(aggregator) == "MGDA(epsilon=0.01, max_iters=3)"


# --- batched entry points -------------------------------------------------------------------


def test_batched_equals_a_loop() -> None:
    # Problems that stop after different numbers of iterations (zero matrix: never).
    matrices = [_random_matrix(4, n, n) for n in (1, 2, 3, 6)] + [torch.zeros(4, 3).double()]
    gramians = torch.stack([x @ x.T for x in matrices])
    expected = torch.stack([MGDAWeighting()(g) for g in gramians])
    assert_close(MGDAWeighting()._forward_batched(gramians), expected, rtol=1e-12, atol=1e-12)
    nested = MGDAWeighting()._forward_batched(torch.stack([gramians[:4]] * 2).view(2, 4, 4, 4))
    assert_close(nested, torch.stack([expected[:4]] * 2), rtol=1e-12, atol=1e-12)


def test_grouped_uses_each_weighting_parameters() -> None:
    weightings = [MGDAWeighting(), MGDAWeighting(max_iters=1), MGDAWeighting(epsilon=0.05)]
    gramians = torch.stack([(lambda x: x @ x.T)(_random_matrix(5, 8, seed)) for seed in range(3)])
    expected = torch.stack([w(g) for w, g in zip(weightings, gramians)])
    actual = MGDAWeighting._forward_grouped(weightings, gramians)
    assert_close(actual, expected, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="one weighting per Gramian"):
        MGDAWeighting._forward_grouped(weightings[:2], gramians)


def test_conflict_bound_at_mixed_scales() -> None:
    # Rows of norms 1e-6 and 1e6: the documented bound J d >= -5 epsilon max_k ||g_k||^2 holds
    # (it is absolute: the short rows may conflict with d, as the docstring says).
    epsilon = 1e-3
    for seed in range(30):
        generator = torch.Generator().manual_seed(seed)
        m = int(torch.randint(3, 6, (1,), generator=generator))
        matrix = torch.randn(m, 5, generator=generator, dtype=torch.float64)
        scales = torch.tensor([1e6] + [1e-6] * (m - 1), dtype=torch.float64)
        matrix = matrix * scales[:, None]
        d = MGDA(epsilon=epsilon)(matrix)
        bound = 5 * epsilon * float((matrix**2).sum(dim=1).max())
        assert (matrix @ d >= -bound).all()


@pytest.mark.parametrize("scale", [1e-6, 1.0, 1e6])
def test_two_rows_at_mixed_scales_do_not_conflict(scale: float) -> None:
    # With two rows the result is the min-norm point itself: non-conflicting relatively.
    for seed in range(10):
        matrix = _random_matrix(2, 5, seed)
        matrix[0] *= scale * 1e6
        matrix[1] *= scale * 1e-6
        d = MGDA()(matrix)
        # The spec's relative tolerance of non-conflict.
        assert (matrix @ d >= -1e-6 * matrix.norm(dim=1) * d.norm()).all()


def test_nan_gramian_gives_nan_weights() -> None:
    for m in (2, 3, 6):
        gramian = torch.eye(m, dtype=torch.float64)
        gramian[0, 1] = gramian[1, 0] = torch.nan
        assert MGDAWeighting()(gramian).isnan().any()


# --- non-conflict, always (per row, whatever the row norms) ------------------------------------

_TAU = {torch.float64: 1e-6, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def _assert_no_conflict(matrix: Tensor, d: Tensor, weights: Tensor) -> None:
    """J_i . d >= -tau ||J_i|| ||d|| per row, in float64, plus what the rounding of the Gramian
    and of d in their dtype allows (it dominates where d is 0 up to rounding)."""
    tau = _TAU[d.dtype]
    J, d = matrix.double(), d.double()
    row_norms = J.norm(dim=1)
    rounding = 64 * torch.finfo(matrix.dtype).eps * row_norms * (weights.double() @ row_norms)
    products = J @ d
    assert bool((products >= -tau * row_norms * d.norm() - rounding).all()), products


def _mixed_scales(seed: int) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-6, 6, 8, dtype=torch.float64)[torch.randperm(8, generator=generator)]
    return torch.randn(8, 6, generator=generator, dtype=torch.float64) * scales.unsqueeze(1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("seed", range(6))
def test_no_conflict_at_mixed_row_scales(seed: int, dtype: torch.dtype) -> None:
    # Rows of norms 1e-6 to 1e6: Frank-Wolfe stops far from the min-norm point (cosines with the
    # short rows down to -0.7); the result must still conflict with none of them.
    matrix = _mixed_scales(seed).to(dtype)
    weights = MGDAWeighting()(matrix @ matrix.T)
    _assert_no_conflict(matrix, weights @ matrix, weights)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_no_conflict_with_many_rows(dtype: torch.dtype) -> None:
    matrix = _random_matrix(128, 64, 0).to(dtype)
    weights = MGDAWeighting()(matrix @ matrix.T)
    assert weights.dtype == dtype
    _assert_no_conflict(matrix, weights @ matrix, weights)


def test_pareto_stationary_rows_give_zero() -> None:
    # 0 is in the convex hull of the rows: the min-norm point is 0.
    matrix = torch.tensor([[1000.0, 3], [1, -1000], [-100, 100], [2, 2]], dtype=torch.float64)
    d = MGDA()(matrix)
    assert float(d.norm()) <= 1e-12 * float(matrix.norm())
    opposite = torch.cat([_random_matrix(4, 5, 1), -_random_matrix(4, 5, 1)])
    assert float(MGDA()(opposite).norm()) <= 1e-12 * float(opposite.norm())


def test_exact_finish_is_the_min_norm_point_and_is_differentiable() -> None:
    # The optimality conditions of min ||J^T a||^2 over the simplex: J_i . d >= ||d||^2 for
    # every row, with equality where a_i > 0 (relative to ||J_i|| ||d||).
    matrix = _mixed_scales(0)
    gramian = (matrix @ matrix.T).requires_grad_()
    weights = MGDAWeighting()(gramian)
    d = weights.detach() @ matrix
    slack = (matrix @ d - d @ d) / (matrix.norm(dim=1) * d.norm())
    assert bool((slack >= -1e-9).all()), slack
    assert bool((slack[weights.detach() > 0].abs() <= 1e-9).all()), slack
    assert_close(weights.detach().sum(), torch.tensor(1.0, dtype=torch.float64))
    weights.sum().backward()
    assert gramian.grad is not None and bool(torch.isfinite(gramian.grad).all())


def test_grouped_problems_are_finished_one_by_one() -> None:
    # A batch of Gramians: the mixed-scale ones are finished exactly, the easy one is untouched.
    easy = _random_matrix(8, 6, 3)
    matrices = [_mixed_scales(0), easy, _mixed_scales(1)]
    gramians = torch.stack([matrix @ matrix.T for matrix in matrices])
    weights = MGDAWeighting._forward_grouped([MGDAWeighting()] * 3, gramians)
    for k, matrix in enumerate(matrices):
        _assert_no_conflict(matrix, weights[k] @ matrix, weights[k])
    assert_close(weights[1], MGDAWeighting()(easy @ easy.T))
