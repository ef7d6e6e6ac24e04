import importlib.util
import warnings

import pytest
import torch

from torchjd import Stateful
from torchjd.aggregation import FairGrad, FairGradWeighting, GramianWeightedAggregator, NashMTL

from ._matrices import J_A, J_B, J_B2, ONE, ZERO, ZR
from ._state_checks import (
    assert_outputs_do_not_alias_the_state,
    assert_reset_restores_fresh_behaviour,
    assert_state_dict_round_trip,
    assert_state_differs_from_fresh,
)

_ATOL = {"atol": 1e-4, "rtol": 0}


def test_spec_examples() -> None:
    torch.testing.assert_close(
        NashMTL(n_tasks=2)(J_A), torch.tensor([0.0542, 0.7061, 0.7061]), **_ATOL
    )
    torch.testing.assert_close(
        NashMTL(n_tasks=2, max_norm=0)(J_A), torch.tensor([0.0766, 0.9985, 0.9985]), **_ATOL
    )
    aggregator = NashMTL(n_tasks=3)
    for _ in range(3):
        torch.testing.assert_close(
            aggregator(J_B), torch.tensor([0.3043, 0.3848, 0.5399, 0.6840]), **_ATOL
        )
    unclipped = NashMTL(n_tasks=3, max_norm=0)
    torch.testing.assert_close(
        unclipped(J_B), torch.tensor([0.5271, 0.6665, 0.9352, 1.1847]), **_ATOL
    )
    torch.testing.assert_close(
        unclipped.gramian_weighting(J_B @ J_B.T), torch.tensor([0.5777, 0.5417, 0.3215]), **_ATOL
    )

    aggregator = NashMTL(3, update_weights_every=2)
    torch.testing.assert_close(
        aggregator(J_B), torch.tensor([0.3043, 0.3848, 0.5399, 0.6840]), **_ATOL
    )
    torch.testing.assert_close(
        aggregator(J_B2), torch.tensor([0.7211, 0.5835, 0.3735, 0.0089]), **_ATOL
    )
    torch.testing.assert_close(
        aggregator(J_B2), torch.tensor([0.7933, 0.5173, 0.3105, 0.0813]), **_ATOL
    )


def test_bargaining_condition_and_clipping() -> None:
    generator = torch.Generator().manual_seed(0)
    for m, n in [(2, 3), (3, 5), (4, 6), (5, 10), (8, 20)]:
        matrix = torch.randn(m, n, generator=generator, dtype=torch.float64)
        gramian = matrix @ matrix.T
        alpha = NashMTL(m, max_norm=0).gramian_weighting(gramian)
        # alpha_i (G alpha)_i = 1: every task gets the same "utility" from the update.
        torch.testing.assert_close(alpha * (gramian @ alpha), torch.ones(m, dtype=torch.float64))
        torch.testing.assert_close(alpha, FairGradWeighting(1.0)(gramian))
        unclipped = NashMTL(m, max_norm=0)(matrix)
        for max_norm in (0.1, 1.0, 1e6):
            out = NashMTL(m, max_norm=max_norm)(matrix)
            if unclipped.norm() > max_norm:
                torch.testing.assert_close(out, unclipped * max_norm / unclipped.norm())
            else:
                torch.testing.assert_close(out, unclipped)


def test_reuses_the_weights_between_updates() -> None:
    generator = torch.Generator().manual_seed(1)
    matrices = [torch.randn(3, 5, generator=generator, dtype=torch.float64) for _ in range(5)]
    aggregator = NashMTL(3, max_norm=0, update_weights_every=3)
    weights = None
    for step, matrix in enumerate(matrices):
        out = aggregator(matrix)
        if step % 3 == 0:
            weights = FairGradWeighting(1.0)(matrix @ matrix.T)
        torch.testing.assert_close(out, weights @ matrix)


def _sequential_convex_reference(gramian, n_iter: int = 20):
    """TorchJD's procedure as the spec describes it, written with cvxpy and ECOS."""
    cp = pytest.importorskip("cvxpy")
    np = pytest.importorskip("numpy")
    pytest.importorskip("ecos")
    m = gramian.shape[0]
    nu = np.linalg.norm(gramian)
    g_tilde = gramian / nu
    alpha_t = np.ones(m)
    for _ in range(n_iter):
        alpha = cp.Variable(m, nonneg=True)
        psi = 1 / alpha_t + g_tilde @ (1 / (g_tilde @ alpha_t))
        objective = cp.Minimize(cp.sum(g_tilde @ alpha) + (1 / nu) * psi @ (alpha - alpha_t))
        constraints = [-cp.log(nu * alpha) - cp.log(g_tilde @ alpha) <= 0]
        problem = cp.Problem(objective, constraints)
        try:
            problem.solve(solver=cp.ECOS, warm_start=True, max_iters=100)
        except (cp.error.SolverError, ValueError):
            break
        new = alpha.value
        if new is None or np.linalg.norm(g_tilde @ alpha_t - 1 / (alpha_t + 1e-10)) < 1e-3:
            break
        if np.linalg.norm(new - alpha_t) < 1e-6:
            break
        alpha_t = new
    return alpha_t


def _convex_program_reference(gramian):
    """The bargaining solution as a convex program: min 1/2 a^T G a - sum(log a) (its optimality
    condition is G a = 1 / a), solved by cvxpy's default conic solver."""
    cp = pytest.importorskip("cvxpy")
    pytest.importorskip("clarabel")
    m = gramian.shape[0]
    alpha = cp.Variable(m)
    objective = cp.Minimize(0.5 * cp.quad_form(alpha, cp.psd_wrap(gramian)) - cp.sum(cp.log(alpha)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "solution may be inaccurate" at these tight tolerances
        cp.Problem(objective).solve(
            solver=cp.CLARABEL, tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12
        )
    return alpha.value


def test_against_cvxpy() -> None:
    generator = torch.Generator().manual_seed(2)
    for m, n in [(2, 3), (3, 5), (4, 6), (5, 10)]:
        matrix = torch.randn(m, n, generator=generator, dtype=torch.float64)
        gramian = (matrix @ matrix.T).numpy()
        ours = NashMTL(m, max_norm=0).gramian_weighting(torch.from_numpy(gramian))
        convex = torch.from_numpy(_convex_program_reference(gramian))
        torch.testing.assert_close(ours, convex, rtol=1e-5, atol=0)
        sequential = torch.from_numpy(_sequential_convex_reference(gramian))
        torch.testing.assert_close(ours, sequential, rtol=1e-6, atol=0)


def test_edge_cases() -> None:
    torch.testing.assert_close(
        NashMTL(2)(torch.tensor([[0.0, 0.0], [0.0, 1.0]])), torch.tensor([0.0, 1.0])
    )
    torch.testing.assert_close(NashMTL(2)(ZR), torch.tensor([0.4082, 0.8165, -0.4082]), **_ATOL)
    assert torch.equal(NashMTL(2)(ZERO), torch.zeros(3))
    # One row: alpha = 1 / ||g||, so the output is the unit vector along g (already of norm 1).
    torch.testing.assert_close(NashMTL(1)(ONE), ONE[0] / ONE[0].norm())
    with pytest.raises(ValueError, match="`n_tasks`"):
        NashMTL(3)(J_A)
    for scale in (1e-8, 1e8):
        for dtype in (torch.float32, torch.float64):
            out = NashMTL(3, max_norm=0)((scale * J_B).to(dtype))
            torch.testing.assert_close(out, FairGrad(1.0)((scale * J_B).to(dtype)))


def test_validation() -> None:
    bad = [
        {"n_tasks": 0},
        {"n_tasks": 2, "max_norm": -1e-9},
        {"n_tasks": 2, "update_weights_every": 0},
        {"n_tasks": 2, "optim_niter": 0},
        {"n_tasks": 2.5},
    ]
    for kwargs in bad:
        name = next(key for key in kwargs if kwargs[key] != 2)
        with pytest.raises(ValueError, match=f"`{name}`"):
            NashMTL(**kwargs)
    aggregator = NashMTL(2)
    for name, value in [("max_norm", -1.0), ("n_tasks", -1), ("optim_niter", 0)]:
        with pytest.raises(ValueError, match=f"`{name}`"):
            setattr(aggregator, name, value)
    aggregator.update_weights_every = 4
    assert aggregator.gramian_weighting.update_weights_every == 4


def test_repr_and_str() -> None:
    aggregator = NashMTL(n_tasks=2, max_norm=1.5, update_weights_every=2, optim_niter=5)
    assert (
        repr(aggregator)
        == "NashMTL(n_tasks=2, max_norm=1.5, update_weights_every=2, optim_niter=5)"
    )
    assert str(aggregator) == "NashMTL"
    assert (
        repr(NashMTL(2))
        == "NashMTL(n_tasks=2, max_norm=1.0, update_weights_every=1, optim_niter=20)"
    )


def test_no_grad_and_structure() -> None:
    assert not NashMTL(3)(J_B.clone().requires_grad_()).requires_grad
    assert isinstance(NashMTL(3), GramianWeightedAggregator)
    assert isinstance(NashMTL(3), Stateful)


def test_needs_no_optional_dependency(monkeypatch: pytest.MonkeyPatch) -> None:
    original = importlib.util.find_spec

    def without(name: str, *args: object) -> object:
        missing = {"cvxpy", "ecos", "numpy"}
        return None if name.split(".")[0] in missing else original(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", without)
    torch.testing.assert_close(NashMTL(2)(J_A), torch.tensor([0.0542, 0.7061, 0.7061]), **_ATOL)


def test_reset_over_four_calls() -> None:
    generator = torch.Generator().manual_seed(3)
    matrices = [torch.randn(3, 5, generator=generator) for _ in range(4)]
    aggregator = NashMTL(n_tasks=3, update_weights_every=3)
    first = [aggregator(matrix) for matrix in matrices]
    aggregator.reset()
    second = [aggregator(matrix) for matrix in matrices]
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_state() -> None:
    def make() -> NashMTL:
        return NashMTL(n_tasks=3, update_weights_every=2)

    history = [J_B, J_B2, J_B]
    probes = [J_B2, J_B, J_B2]
    assert_state_differs_from_fresh(make, history, J_B2)
    for n_history in range(4):
        assert_reset_restores_fresh_behaviour(make, history[:n_history], probes)
        assert_state_dict_round_trip(make, history[:n_history], probes)

    def make_weighting() -> torch.nn.Module:
        return NashMTL(n_tasks=3, max_norm=0.0, update_weights_every=2).gramian_weighting

    gramians = [(m @ m.T).double() for m in history]
    assert_outputs_do_not_alias_the_state(make_weighting, gramians, gramians[1])


def test_changing_n_tasks_without_reset_reinitialises() -> None:
    aggregator = NashMTL(n_tasks=3, update_weights_every=2)
    aggregator(J_B)
    aggregator.n_tasks = 2
    with pytest.warns(UserWarning, match="re-initialises"):
        out = aggregator(J_A)
    torch.testing.assert_close(out, NashMTL(2)(J_A))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        aggregator(J_A.double())  # a dtype change needs no re-initialisation


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_zero_row_in_half_precision_gives_the_other_row(dtype: torch.dtype) -> None:
    # As in float32: the zero row's weight does not matter, the other's is 1 / ||g||^2 = 1.
    out = NashMTL(n_tasks=2)(torch.tensor([[0.0, 0.0], [0.0, 1.0]], dtype=dtype))
    assert out.dtype == dtype
    torch.testing.assert_close(out, torch.tensor([0.0, 1.0], dtype=dtype))


def test_pareto_stationary_rows_give_zero() -> None:
    # 0 is in the convex hull of the rows: no root of alpha * (G alpha) = 1; the non-conflicting
    # limit is 0 (the solver used to drift to an update conflicting with the second row).
    matrix = torch.tensor([[1000.0, 3], [1, -1000], [-100, 100], [2, 2]], dtype=torch.float64)
    d = NashMTL(n_tasks=4, max_norm=0)(matrix)
    assert float(d.norm()) <= 1e-12 * float(matrix.norm()), d
