"""The host solver of small dual-cone problems against quadprog, and its hand-offs to the tensor
path of BlockPivotingProjector."""

import math

import pytest
import torch

import torchjd.linalg._block_pivoting as block_pivoting
import torchjd.linalg._small_dual_cone as small_dual_cone
from torchjd.aggregation import UPGradWeighting
from torchjd.linalg import BlockPivotingProjector, QuadprogProjector

from .test_block_pivoting import _KINDS, _jacobian, _vectors


def _problems(m: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [((J := _jacobian(kind, m, generator)) @ J.T, _vectors(m, generator)) for kind in _KINDS]


@pytest.mark.parametrize("m", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("patience", [3, 0])
def test_matches_quadprog(m: int, patience: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # patience 0: Murty's single-pivot rule as soon as the number of infeasible indices stalls.
    monkeypatch.setattr(small_dual_cone, "_PATIENCE", patience)
    for kind, (G, U) in zip(_KINDS, _problems(m, 400 + m)):
        V = small_dual_cone.solve_on_host(G[None], U[None], 1e-4, 1e-4)
        assert V is not None
        torch.testing.assert_close(V[0], QuadprogProjector()(U, G), rtol=1e-6, atol=1e-6, msg=kind)


@pytest.mark.parametrize("m", [2, 3, 8])
def test_the_projector_uses_it_and_agrees_with_the_tensor_path(
    m: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    problems = _problems(m, 500 + m)
    projector = BlockPivotingProjector()
    on_host = [projector(U, G) for G, U in problems]
    monkeypatch.setattr(small_dual_cone, "MAX_M", 0)  # every problem to the tensor path
    for (G, U), V in zip(problems, on_host):
        torch.testing.assert_close(V, projector(U, G), rtol=1e-9, atol=1e-12)
    monkeypatch.undo()

    def refuse(*args: object) -> None:
        raise AssertionError("the tensor path was taken")

    monkeypatch.setattr(block_pivoting, "_solve", refuse)
    for (G, U), V in zip(problems, on_host):
        assert torch.equal(projector(U, G), V)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_gramians(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    # Normalised as the tensor path normalises (in float32), solved in double precision,
    # returned in G's dtype.
    problems = [(G.to(dtype), U.to(dtype)) for G, U in _problems(5, 600)]
    problems = [(G, U) for G, U in problems if G.isfinite().all()]  # float16 overflows on "huge"
    on_host = [BlockPivotingProjector()(U, G) for G, U in problems]
    monkeypatch.setattr(small_dual_cone, "MAX_M", 0)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for (G, U), V in zip(problems, on_host):
        assert V.dtype == dtype
        expected = BlockPivotingProjector()(U, G)
        torch.testing.assert_close(V.double(), expected.double(), rtol=tol, atol=tol)
        if dtype == torch.float32:
            # quadprog also normalises in float32 (the spec's tolerance in float32).
            reference = QuadprogProjector()(U, G)
            torch.testing.assert_close(V, reference, rtol=1e-4, atol=1e-6)


def test_hands_over_what_it_does_not_solve() -> None:
    G = torch.eye(3, dtype=torch.float64)[None]
    U = torch.ones(1, 1, 3, dtype=torch.float64)
    assert small_dual_cone.solve_on_host(G, U, 1e-4, 0.0) is None  # below the diagonal's floor
    assert small_dual_cone.solve_on_host(G * torch.nan, U, 1e-4, 1e-4) is None
    assert small_dual_cone.solve_on_host(G, U * torch.inf, 1e-4, 1e-4) is None
    assert small_dual_cone.fits(16, 8)
    assert not small_dual_cone.fits(1, 9)
    assert not small_dual_cone.fits(20, 3)
    # A non-finite input reaches the tensor path, whose result is NaN.
    assert BlockPivotingProjector()(U[0] * torch.nan, G[0]).isnan().all()


@pytest.mark.parametrize("m", [1, 2, 3, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("patience", [3, 0])
def test_summed_diagonal_solutions_match_quadprog_and_the_batched_path(
    m: int, dtype: torch.dtype, patience: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # UPGrad's weights of one Gramian: the sum of the projections of p_i e_i, here with Python
    # numbers (a closed form at m = 2), against quadprog and the batched tensor path; patience 0:
    # Murty's rule as soon as the number of infeasible indices stalls.
    monkeypatch.setattr(small_dual_cone, "_PATIENCE", patience)
    generator = torch.Generator().manual_seed(700 + m)
    projector = BlockPivotingProjector()
    cases = []
    for kind in _KINDS:
        J = _jacobian(kind, m, generator)
        for prefs in (torch.full((m,), 1.0 / m), torch.rand(m, generator=generator)):
            prefs = prefs.clone()
            if m > 1:
                prefs[0] = 0.0 if kind == _KINDS[0] else prefs[0]
            cases.append((kind, (J @ J.T).to(dtype), prefs.to(dtype)))
    fast = [block_pivoting.summed_diagonal_projection(projector, p, G) for _, G, p in cases]
    monkeypatch.setattr(small_dual_cone, "MAX_M", 0)  # the tensor path
    for (kind, G, prefs), weights in zip(cases, fast):
        assert weights.dtype == dtype and weights.shape == (m,)
        expected = QuadprogProjector()(torch.diag(prefs), G).sum(dim=0)
        torch.testing.assert_close(weights, expected, rtol=1e-5, atol=1e-6, msg=kind)
        batched = block_pivoting.summed_diagonal_projections(projector, prefs[None], G[None])[0]
        tol = 1e-12 if dtype == torch.float64 else 2e-6
        torch.testing.assert_close(weights, batched, rtol=tol, atol=tol, msg=kind)


def test_summed_diagonal_solutions_hand_offs() -> None:
    G = torch.tensor([[1.0, -0.5], [-0.5, 2.0]])
    assert small_dual_cone.summed_diagonal_solutions(G, [0.5, 0.5], 1e-4, 0.0) is None
    assert small_dual_cone.summed_diagonal_solutions(G, [0.5, -0.5], 1e-4, 1e-4) is None
    assert small_dual_cone.summed_diagonal_solutions(G * torch.nan, [0.5, 0.5], 1e-4, 1e-4) is None
    # By hand: A = G / 3 + 1e-4 I; v1 = 0.5 (1, 0.5 / 2.0003), v2 = 0.5 (0.5 / 1.0003, 1).
    weights = small_dual_cone.summed_diagonal_solutions(G.double(), [0.5, 0.5], 1e-4, 1e-4)
    expected = torch.tensor([0.5 + 0.25 / 1.0003, 0.5 + 0.25 / 2.0003], dtype=torch.float64)
    torch.testing.assert_close(weights, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n", range(1, 9))
def test_subsystem_solve_reads_the_lower_triangle(n: int) -> None:
    # The written-out systems (up to 4 rows) and the loop (more) against a dense solve of the
    # symmetric matrix of the lower triangle; the upper triangle holds values that must be ignored.
    generator = torch.Generator().manual_seed(800 + n)
    B = torch.randn(8, 8, generator=generator, dtype=torch.float64)
    S = B @ B.T + 0.1 * torch.eye(8, dtype=torch.float64)
    A = torch.tril(S) + torch.triu(torch.full((8, 8), 7.0, dtype=torch.float64), diagonal=1)
    F = sorted(torch.randperm(8, generator=generator)[:n].tolist())
    b = torch.randn(n, generator=generator, dtype=torch.float64)
    x = small_dual_cone._subsystem_solve(A.tolist(), F, b.tolist())
    assert x is not None
    expected = torch.linalg.solve(S[F][:, F], b)
    torch.testing.assert_close(
        torch.tensor(x, dtype=torch.float64), expected, rtol=1e-10, atol=1e-12
    )


@pytest.mark.parametrize("n", range(1, 9))
def test_subsystem_solve_refuses_an_indefinite_matrix(n: int) -> None:
    # The last pivot of diag(1, ..., 1, -1) is negative, as is every pivot of -I.
    F = list(range(n))
    for diagonal in ([1.0] * (n - 1) + [-1.0], [-1.0] * n):
        A = torch.diag(torch.tensor(diagonal, dtype=torch.float64)).tolist()
        assert small_dual_cone._subsystem_solve(A, F, [1.0] * n) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_summed_diagonal_solutions_with_negative_preferences(dtype: torch.dtype) -> None:
    # u = p e_i with p < 0: v = 0 is feasible, so the projection is 0 (quadprog agrees).
    generator = torch.Generator().manual_seed(900)
    J = torch.randn(6, 10, generator=generator, dtype=torch.float64)
    G = (J @ J.T).to(dtype)
    prefs = torch.tensor([0.3, -0.2, 0.5, -1.0, 0.0, 0.25], dtype=dtype)
    weights = small_dual_cone.summed_diagonal_solutions(G, prefs.tolist(), 1e-4, 1e-4)
    assert weights is not None and weights.dtype == dtype
    expected = QuadprogProjector()(torch.diag(prefs), G).sum(dim=0)
    torch.testing.assert_close(weights, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n", range(2, 7))
def test_written_out_systems_match_the_loop_bit_for_bit(n: int) -> None:
    # The written-out solvers do the loop's operations in its order: the same float64 values, on
    # nearly singular matrices too (where a different order would show in the last places).
    generator = torch.Generator().manual_seed(1000 + n)
    for scale in (1.0, 1e-6):
        B = torch.randn(8, 3, generator=generator, dtype=torch.float64)
        S = B @ B.T + scale * torch.eye(8, dtype=torch.float64)
        A = (
            torch.tril(S) + torch.triu(torch.randn(8, 8, generator=generator), diagonal=1)
        ).tolist()
        for _ in range(20):
            F = sorted(torch.randperm(8, generator=generator)[:n].tolist())
            b = torch.randn(n, generator=generator, dtype=torch.float64).tolist()
            expected = small_dual_cone._looped_solve(A, F, b)
            assert expected is not None
            assert small_dual_cone._subsystem_solve(A, F, b) == expected


@pytest.mark.parametrize("n", range(1, 7))
def test_written_out_residuals_match_the_sum_bit_for_bit(n: int) -> None:
    # y_C decides the exchanges: the written-out residuals must give the values of the sum.
    generator = torch.Generator().manual_seed(1100 + n)
    A = torch.randn(8, 8, generator=generator, dtype=torch.float64).tolist()
    for _ in range(20):
        F = sorted(torch.randperm(8, generator=generator)[:n].tolist())
        C = [j for j in range(8) if j not in F]
        q = torch.randn(8, generator=generator, dtype=torch.float64).tolist()
        x = torch.randn(n, generator=generator, dtype=torch.float64).tolist()
        expected = small_dual_cone._residuals(A, q, F, C, x)
        assert small_dual_cone._RESIDUALS[n](A, q, F, C, x) == expected


def test_infeasible_mask_matches_its_definition() -> None:
    # The mask decides the exchanges: compare the loops with the comprehensions they replace,
    # with values on both sides of the tolerances.
    generator = torch.Generator().manual_seed(1200)
    tol = -1e-12
    for _ in range(200):
        values = (torch.randn(8, generator=generator, dtype=torch.float64) * 1e-12).tolist()
        # Exactly on a tolerance, and NaN: never below nor above.
        for value in (math.nan, tol, small_dual_cone._REL_TOL):
            values[int(torch.randint(0, 8, (1,), generator=generator))] = value
        F = sorted(torch.randperm(8, generator=generator)[:4].tolist())
        C = [j for j in range(8) if j not in F]
        minus_z, y_C = values[:4], values[4:]
        expected = sum([1 << j for j, v in zip(F, minus_z) if v > small_dual_cone._REL_TOL])
        expected += sum([1 << j for j, y in zip(C, y_C) if y < tol])
        assert small_dual_cone._infeasible_mask(F, minus_z, C, y_C, tol) == expected


def test_subsets_hold_the_solver_and_residuals_of_their_size() -> None:
    for mask, (F, C, _, solve, residuals) in enumerate(small_dual_cone._subsets(8)):
        assert [j for j in range(8) if mask >> j & 1] == F
        assert [j for j in range(8) if not mask >> j & 1] == C
        assert solve is small_dual_cone._SOLVERS[len(F)]
        assert residuals is small_dual_cone._RESIDUALS[len(F)]


@pytest.mark.parametrize("patience", [0, 1, 3])
def test_unit_solutions_make_the_exchanges_of_solve(
    patience: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # _add_unit_solution is _solve for u = e_i with less interpretation: on symmetric matrices
    # (where both read the same entries), the same exchanges give the same solution, bit for bit.
    monkeypatch.setattr(small_dual_cone, "_PATIENCE", patience)
    generator = torch.Generator().manual_seed(1400 + patience)
    for m in (3, 5, 8):
        subsets = small_dual_cone._subsets(m)
        for _ in range(40):
            J = torch.randn(m, 4, generator=generator, dtype=torch.float64)  # conflicting rows
            G = J @ J.T
            G = (G + G.T) / 2.0
            A = (G / G.trace() + 1e-4 * torch.eye(m, dtype=torch.float64)).tolist()
            diagonal_max = max(A[i][i] for i in range(m))
            for i in range(m):
                weights = [0.0] * m
                tol_y = -small_dual_cone._REL_TOL * diagonal_max
                assert small_dual_cone._add_unit_solution(A, i, 1.0, tol_y, weights, subsets)
                u = [0.0] * m
                u[i] = 1.0
                assert weights == small_dual_cone._solve(A, diagonal_max, u)


def test_float32_normalisation_is_the_tensor_paths_bit_for_bit() -> None:
    # A badly conditioned problem is sensitive to one unit in the last place of an entry. (Traces
    # above the threshold: the tensor path's zero matrix below it keeps the signs of the zeros.)
    generator = torch.Generator().manual_seed(1500)
    for m in range(3, 9):
        for scale in (0.1, 1.0, 1e3):
            for reg_eps in (1e-4, 3e-5):
                J = torch.randn(m, 7, generator=generator) * scale
                G = J @ J.T
                A = small_dual_cone._float32_regularised(G, 1e-4, reg_eps)
                projector = BlockPivotingProjector(norm_eps=1e-4, reg_eps=reg_eps)
                # float32 values, in the float64 of the solver (and of A's Python floats).
                expected = projector._regularised_gramian(G[None])[0]
                assert expected.dtype == torch.float64
                assert torch.tensor(A, dtype=torch.float64).tolist() == expected.tolist()


# Jacobians whose problems pass through an empty free set: with u = e_1 / 4 (UPGrad, 4 x 3 rows),
# the first exchange frees and fixes indices until none is free, where y = A u is infeasible again.
_EMPTIED_UNIT = [
    [
        [0.115, 1.375, -0.658],
        [0.293, -1.008, -0.428],
        [-0.162, 0.707, -1.436],
        [-1.011, -2.673, 0.48],
    ],
    [[1.276, 0.155, -0.432], [-1.242, 0.6, 0.606], [-0.916, 0.976, 0.614], [0.506, 0.158, -0.055]],
]
# With u of mixed signs (a general projection).
_EMPTIED_GENERAL = [
    (
        [
            [-0.339, 0.293, 1.089],
            [-1.639, 1.536, -0.852],
            [1.003, -1.226, 2.135],
            [-1.005, 0.981, -0.77],
        ],
        [-0.29, 0.8, 0.21, -1.08],
    ),
    (
        [
            [-0.018, -0.229, 0.143],
            [0.46, 0.565, -0.046],
            [0.384, 1.114, 0.872],
            [-0.269, -1.264, 0.513],
        ],
        [-0.28, 0.63, 1.4, 0.55],
    ),
]


def _spied_empty_free_sets(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the exchanges that empty the free set (a solve of no row, or a unit problem back at
    its infeasible start)."""
    seen: list[int] = []
    solve, mask = small_dual_cone._subsystem_solve, small_dual_cone._infeasible_mask

    def spied_solve(A: list[list[float]], F: list[int], b: list[float]) -> list[float] | None:
        seen.extend([] if F else [1])
        return solve(A, F, b)

    def spied_mask(F: list[int], z: list[float], C: list[int], y: list[float], tol: float) -> int:
        result = mask(F, z, C, y, tol)
        seen.extend([1] if result == sum(1 << j for j in F) and F else [])
        return result

    monkeypatch.setattr(small_dual_cone, "_subsystem_solve", spied_solve)
    monkeypatch.setattr(small_dual_cone, "_infeasible_mask", spied_mask)
    return seen


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("rows", _EMPTIED_UNIT)
def test_upgrad_through_an_empty_free_set(
    rows: list[list[float]], dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Back at z = 0 the problem is infeasible as at the start: pivoting goes on from there.
    G = (lambda J: J @ J.T)(torch.tensor(rows, dtype=torch.float64)).to(dtype)
    seen = _spied_empty_free_sets(monkeypatch)
    weights = UPGradWeighting()(G)
    assert seen, "the case no longer empties the free set"
    expected = QuadprogProjector()(torch.eye(4, dtype=dtype) / 4, G).sum(dim=0)
    tol = 1e-9 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(weights, expected, rtol=tol, atol=tol)


@pytest.mark.parametrize(("rows", "u"), _EMPTIED_GENERAL)
def test_projection_through_an_empty_free_set(
    rows: list[list[float]], u: list[float], monkeypatch: pytest.MonkeyPatch
) -> None:
    J = torch.tensor(rows, dtype=torch.float64)
    U = torch.tensor(u, dtype=torch.float64)
    seen = _spied_empty_free_sets(monkeypatch)
    V = BlockPivotingProjector()(U, J @ J.T)
    assert seen, "the case no longer empties the free set"
    torch.testing.assert_close(V, QuadprogProjector()(U, J @ J.T), rtol=1e-9, atol=1e-12)
