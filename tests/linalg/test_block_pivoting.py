"""BlockPivotingProjector against quadprog (an independent solver), and its own guarantees."""

import warnings

import pytest
import torch

import torchjd.linalg._block_pivoting as block_pivoting
from torchjd.linalg import BlockPivotingProjector, QuadprogProjector

_KINDS = ["random", "rank_deficient", "duplicated", "opposite", "zero", "tiny", "huge"]


def _jacobian(kind: str, m: int, generator: torch.Generator) -> torch.Tensor:
    n = max(1, m // 2) if kind == "rank_deficient" else 2 * m + 3
    J = torch.randn(m, n, generator=generator, dtype=torch.float64)
    if kind == "duplicated" and m > 1:
        J[1] = J[0]
    if kind == "opposite" and m > 1:
        J[1] = -J[0]
    scale = {"zero": 0.0, "tiny": 1e-5, "huge": 1e6}.get(kind, 1.0)
    return scale * J


def _vectors(m: int, generator: torch.Generator) -> torch.Tensor:
    """Random vectors and UPGrad's ``diag(p)`` rows."""
    p = torch.rand(m, generator=generator, dtype=torch.float64)
    return torch.cat([torch.randn(3, m, generator=generator, dtype=torch.float64), torch.diag(p)])


@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 16, 33, 64])
def test_matches_quadprog_on_bank(m: int) -> None:
    generator = torch.Generator().manual_seed(m)
    ours, reference = BlockPivotingProjector(), QuadprogProjector()
    for kind in _KINDS:
        G = (J := _jacobian(kind, m, generator)) @ J.T
        U = _vectors(m, generator)
        torch.testing.assert_close(ours(U, G), reference(U, G), rtol=1e-6, atol=1e-6, msg=kind)


@pytest.mark.parametrize("m", [2, 7, 20, 50])
def test_matches_quadprog_without_epsilons(m: int) -> None:
    generator = torch.Generator().manual_seed(100 + m)
    J = torch.randn(m, m + 5, generator=generator, dtype=torch.float64)
    G = J @ J.T
    U = _vectors(m, generator)
    ours = BlockPivotingProjector(norm_eps=0.0, reg_eps=0.0)(U, G)
    reference = QuadprogProjector(norm_eps=0.0, reg_eps=0.0)(U, G)
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-6)


def _assert_kkt(U: torch.Tensor, W: torch.Tensor, A: torch.Tensor, tol: float) -> None:
    """w >= u, A w >= 0 and (w - u)^T A w = 0, relative to the size of the problem."""
    scale = U.abs().amax(dim=-1, keepdim=True) + W.abs().amax(dim=-1, keepdim=True)
    AW = W @ A
    assert (-tol * scale <= W - U).all()
    assert (-tol * scale <= AW).all()
    assert (torch.minimum(W - U, AW).abs() <= tol * scale).all()


@pytest.mark.parametrize("m", [2, 4, 9, 30, 60])
def test_kkt_conditions_on_bank(m: int) -> None:
    generator = torch.Generator().manual_seed(200 + m)
    for kind in _KINDS:
        G = (J := _jacobian(kind, m, generator)) @ J.T
        U = _vectors(m, generator)
        W = BlockPivotingProjector()(U, G)
        trace = G.trace()
        G_hat = G / trace if trace >= 1e-4 else torch.zeros_like(G)
        _assert_kkt(U, W, G_hat + 1e-4 * torch.eye(m, dtype=G.dtype), tol=1e-10)


def test_scale_invariance_is_exact_with_zero_epsilons() -> None:
    generator = torch.Generator().manual_seed(4)
    for m in (3, 12, 55):
        G = (J := torch.randn(m, m + 1, generator=generator, dtype=torch.float64)) @ J.T
        U = _vectors(m, generator)
        projector = BlockPivotingProjector(norm_eps=0.0, reg_eps=0.0)
        reference = projector(U, G)
        for c in (1e-12, 2.0**-4, 2.0**4, 1e12):
            torch.testing.assert_close(projector(U, c * G), reference, rtol=1e-9, atol=1e-12)


def test_tiny_gramian_gives_positive_part() -> None:
    generator = torch.Generator().manual_seed(5)
    for m in (1, 4, 50):
        G = (J := 1e-4 * torch.randn(m, 3, generator=generator, dtype=torch.float64)) @ J.T
        U = torch.randn(7, m, generator=generator, dtype=torch.float64)
        W = BlockPivotingProjector()(U, G)
        torch.testing.assert_close(W, U.clamp(min=0.0), rtol=0, atol=1e-14)


def test_zero_gramian_without_epsilons_is_finite() -> None:
    # The reference divides 0 by the zero trace here; the zero matrix is used instead.
    U = torch.tensor([[1.0, -2.0, 0.5], [-1.0, 0.0, 3.0]])
    W = BlockPivotingProjector(norm_eps=0.0, reg_eps=0.0)(U, torch.zeros(3, 3))
    torch.testing.assert_close(W, U.clamp(min=0.0))


def test_batched_entry_point_equals_a_loop() -> None:
    generator = torch.Generator().manual_seed(6)
    projector = BlockPivotingProjector()
    for m in (1, 2, 8, 50):
        G = torch.stack(
            [(J := torch.randn(m, m + 3, generator=generator)) @ J.T for _ in range(3)]
            + [torch.zeros(m, m)]
        )
        U = torch.randn(4, 5, m, generator=generator)
        batched = projector.solve_batched(U, G)
        looped = torch.stack([projector(U_k, G_k) for U_k, G_k in zip(U, G)])
        assert batched.shape == U.shape and batched.dtype == torch.float32
        torch.testing.assert_close(batched, looped, rtol=1e-6, atol=1e-7)


def test_batched_entry_point_in_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    # Large batches of Gramians are solved a few Gramians at a time: same results.
    generator = torch.Generator().manual_seed(11)
    G = torch.stack([(J := torch.randn(6, 8, generator=generator)) @ J.T for _ in range(7)])
    U = torch.randn(7, 6, 6, generator=generator)
    whole = BlockPivotingProjector().solve_batched(U, G)
    monkeypatch.setattr(block_pivoting, "_MAX_CHUNK_ENTRIES", 2 * 6 * 6 * 6)
    torch.testing.assert_close(BlockPivotingProjector().solve_batched(U, G), whole)


def test_batched_entry_point_rejects_bad_shapes() -> None:
    projector = BlockPivotingProjector()
    with pytest.raises(ValueError, match="`G`"):
        projector.solve_batched(torch.ones(1, 2, 2), torch.ones(2, 2))
    with pytest.raises(ValueError, match="`U`"):
        projector.solve_batched(torch.ones(2, 2, 2), torch.ones(3, 2, 2))
    with pytest.raises(ValueError, match="`U`"):
        projector.solve_batched(torch.ones(3, 2, 4), torch.ones(3, 2, 2))


def test_float32_matches_the_float64_solve() -> None:
    # The normalisation runs in G's dtype, then both projectors solve in float64: on the same
    # float32 Gramian they agree to float32 rounding, and the float64 Gramian gives the same
    # weights up to the float32 rounding of G.
    generator = torch.Generator().manual_seed(7)
    for m in (3, 10, 50):
        G = (J := torch.randn(m, 2 * m, generator=generator)) @ J.T
        U = torch.rand(m, m, generator=generator)
        W = BlockPivotingProjector()(U, G)
        assert W.dtype == torch.float32
        torch.testing.assert_close(W, QuadprogProjector()(U, G), rtol=1e-6, atol=1e-6)
        W64 = BlockPivotingProjector()(U.double(), G.double())
        torch.testing.assert_close(W, W64.float(), rtol=1e-4, atol=1e-4)


def test_output_dtype_follows_g() -> None:
    G = torch.tensor([[2.0, -1.0], [-1.0, 2.0]])
    U = torch.eye(2, dtype=torch.float64)
    assert BlockPivotingProjector()(U, G).dtype == torch.float32
    assert BlockPivotingProjector()(U.float(), G.double()).dtype == torch.float64
    assert BlockPivotingProjector()(U.half(), G.half()).dtype == torch.float16


def test_empty_inputs() -> None:
    projector = BlockPivotingProjector()
    G = torch.eye(3)
    assert projector(torch.zeros(0, 3), G).shape == (0, 3)
    assert projector(torch.zeros(2, 0), torch.zeros(0, 0)).shape == (2, 0)


def test_not_differentiable() -> None:
    J = torch.randn(3, 4, generator=torch.Generator().manual_seed(8), requires_grad=True)
    W = BlockPivotingProjector()(torch.eye(3), J @ J.T)
    assert not W.requires_grad


def test_nan_gives_nan_without_warning() -> None:
    G = torch.tensor([[1.0, float("nan")], [float("nan"), 1.0]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        W = BlockPivotingProjector()(torch.eye(2), G)
    assert W.isnan().all()


def test_not_positive_definite_is_rescued() -> None:
    # A Gramian with a negative eigenvalue of relative size 1e-8 (e.g. rounding errors) and no
    # regularisation: some factorisations fail; the solution for a small added ridge is returned.
    generator = torch.Generator().manual_seed(9)
    m = 6
    Q, _ = torch.linalg.qr(torch.randn(m, m, generator=generator, dtype=torch.float64))
    eigenvalues = torch.tensor([-1e-8, 0.1, 0.3, 0.5, 0.8, 1.0], dtype=torch.float64)
    G = Q @ torch.diag(eigenvalues) @ Q.T
    U = _vectors(m, generator)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        W = BlockPivotingProjector(norm_eps=0.0, reg_eps=0.0)(U, G)
    A = G / G.trace() + 1e-6 * torch.eye(m, dtype=G.dtype)
    _assert_kkt(U, W, A, tol=1e-6)


def test_far_from_positive_semi_definite_warns() -> None:
    G = torch.tensor([[1.0, 0.0], [0.0, -0.9]])
    with pytest.warns(UserWarning, match="positive semi-definite"):
        BlockPivotingProjector(norm_eps=0.0, reg_eps=0.0)(torch.tensor([0.0, 1.0]), G)


def test_failures_in_a_batch_stay_in_their_gramian() -> None:
    # A NaN Gramian, one far from positive semi-definite and a normal one, solved together.
    G_good = torch.tensor([[2.0, -1.0], [-1.0, 2.0]])
    G_nan = torch.tensor([[1.0, torch.nan], [torch.nan, 1.0]])
    G = torch.stack([G_nan, torch.diag(torch.tensor([1.0, -0.9])), G_good])
    U = torch.tensor([[0.0, 1.0], [1.0, 0.0]]).expand(3, 2, 2)
    projector = BlockPivotingProjector(norm_eps=0.0, reg_eps=0.0)
    with pytest.warns(UserWarning, match="1 problems"):
        W = projector.solve_batched(U, G)
    assert W[0].isnan().all()
    torch.testing.assert_close(W[2], projector(U[2], G_good))


def test_single_pivot_rule_still_solves(monkeypatch: pytest.MonkeyPatch) -> None:
    # Without patience, Murty's single-pivot rule takes over as soon as the number of infeasible
    # indices stalls; the answers must not change.
    monkeypatch.setattr(block_pivoting, "_PATIENCE", 0)
    generator = torch.Generator().manual_seed(10)
    for m in (5, 12, 40):
        for kind in _KINDS:
            G = (J := _jacobian(kind, m, generator)) @ J.T
            U = _vectors(m, generator)
            torch.testing.assert_close(
                BlockPivotingProjector()(U, G), QuadprogProjector()(U, G), rtol=1e-6, atol=1e-6
            )


def test_float32_solver_path() -> None:
    # What runs on a device without float64: the solver itself in float32.
    generator = torch.Generator().manual_seed(12)
    for m in (3, 8, 40):
        for kind in ("random", "rank_deficient", "duplicated"):
            G = (J := _jacobian(kind, m, generator)) @ J.T
            U = _vectors(m, generator)
            A = G / G.trace() + 1e-4 * torch.eye(m, dtype=G.dtype)
            W = block_pivoting._solve(A.float().unsqueeze(0), U.float().unsqueeze(0))[0]
            reference = QuadprogProjector()(U, G)
            torch.testing.assert_close(W.double(), reference, rtol=1e-3, atol=1e-3, msg=kind)


def test_without_float64_falls_back_to_float32() -> None:
    with pytest.warns(UserWarning, match="float32"):
        dtype = block_pivoting._solver_dtype(torch.device("mps"))
    assert dtype == torch.float32
    assert block_pivoting._solver_dtype(torch.device("cpu")) == torch.float64


def test_closed_form_for_two_matches_quadprog_on_random_problems() -> None:
    # Every sign pattern of u and of the off-diagonal entry, at several conditionings.
    generator = torch.Generator().manual_seed(13)
    ours, reference = BlockPivotingProjector(), QuadprogProjector()
    for _ in range(40):
        J = torch.randn(2, 3, generator=generator, dtype=torch.float64)
        J[1] = J[1] + torch.rand(1, generator=generator, dtype=torch.float64) * 5 * J[0]
        G = J @ J.T
        U = torch.randn(6, 2, generator=generator, dtype=torch.float64)
        torch.testing.assert_close(ours(U, G), reference(U, G), rtol=1e-6, atol=1e-6)
        # In float32 the closed form runs in float32 (no float64 solve); quadprog solves the same
        # float32-normalised problem in float64.
        W32 = ours(U.float(), G.float())
        assert W32.dtype == torch.float32
        torch.testing.assert_close(W32, reference(U.float(), G.float()), rtol=1e-5, atol=1e-5)


def _without_host_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Take the accelerator path on the CPU and make any read of a tensor value on the host (what
    synchronises with a device) raise."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a tensor value was read on the host")

    monkeypatch.setattr(block_pivoting, "_reads_on_host", lambda device: False)
    for name in ("__bool__", "item", "tolist", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)


@pytest.mark.parametrize("m", [2, 3, 5, 8])
def test_accelerator_path_matches_quadprog_without_host_reads(
    m: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    generator = torch.Generator().manual_seed(300 + m)
    problems = []
    for kind in _KINDS:
        G = (J := _jacobian(kind, m, generator)) @ J.T
        problems.append((G, _vectors(m, generator)))
    expected = [QuadprogProjector()(U, G) for G, U in problems]
    batch_G = torch.stack([G for G, _ in problems])
    batch_U = torch.stack([U for _, U in problems])
    projector = BlockPivotingProjector()
    _without_host_reads(monkeypatch)
    singles = [projector(U, G) for G, U in problems]
    batched = projector.solve_batched(batch_U, batch_G)
    monkeypatch.undo()
    for kind, single, batch_row, reference in zip(_KINDS, singles, batched, expected):
        torch.testing.assert_close(single, reference, rtol=1e-6, atol=1e-6, msg=kind)
        torch.testing.assert_close(batch_row, reference, rtol=1e-6, atol=1e-6, msg=kind)


def test_accelerator_path_keeps_nan(monkeypatch: pytest.MonkeyPatch) -> None:
    G = torch.eye(4, dtype=torch.float64)
    G[1, 2] = G[2, 1] = torch.nan
    _without_host_reads(monkeypatch)
    results = [
        BlockPivotingProjector()(torch.eye(m, dtype=torch.float64), G[-m:, -m:]) for m in (3, 4)
    ]
    results.append(BlockPivotingProjector()(torch.eye(2, dtype=torch.float64), G[1:3, 1:3]))
    monkeypatch.undo()
    # Every problem reads the NaN entry (a NaN times a zero weight is still NaN).
    for W in results:
        assert W.isnan().any(dim=-1).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_gramian_whose_trace_overflows(dtype: torch.dtype) -> None:
    # Entries fit in float16, their sum on the diagonal does not: normalising in float16 would
    # divide by an infinite trace. The result must be the float64 answer, in the input's dtype.
    generator = torch.Generator().manual_seed(14)
    J = torch.randn(16, 64, generator=generator, dtype=torch.float64) * 12.0
    G = J @ J.T
    assert G.abs().max() < 6e4 < G.trace()
    U = _vectors(16, generator)
    W = BlockPivotingProjector()(U.to(dtype), G.to(dtype))
    assert W.dtype == dtype
    reference = QuadprogProjector()(U.to(dtype).double(), G.to(dtype).double())
    torch.testing.assert_close(W.double(), reference, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("m", [40, 128])
def test_fixed_set_systems_match_quadprog(m: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # UPGrad's problems on a Gramian of conflicting rows (centred, as per-sample gradients at a
    # minimum of the mean loss are): the fixed sets are small, so the solver goes through A^{-1}
    # and systems of their size.
    generator = torch.Generator().manual_seed(400 + m)
    J = torch.randn(m, m, generator=generator, dtype=torch.float64)
    J = J - J.mean(dim=0, keepdim=True)
    G = J @ J.T
    U = torch.diag(torch.rand(m, generator=generator, dtype=torch.float64) + 0.5)
    A = G / G.trace() + 1e-4 * torch.eye(m, dtype=G.dtype)
    matrices = []
    original = block_pivoting._solve_ordered
    monkeypatch.setattr(
        block_pivoting,
        "_solve_ordered",
        lambda M, *args, **kwargs: matrices.append(M) or original(M, *args, **kwargs),
    )
    W = BlockPivotingProjector()(U, G)
    # Some systems were gathered from A^{-1} (with a zero row and column appended).
    eye = torch.eye(m, dtype=G.dtype)
    assert any(M.ndim == 2 and torch.allclose(M[:m, :m] @ A, eye, atol=1e-8) for M in matrices)
    torch.testing.assert_close(W, QuadprogProjector()(U, G), rtol=1e-6, atol=1e-6)
    _assert_kkt(U, W, A, tol=1e-9)
    # Without regularisation the conditioning is not bounded: the fixed-set route is not taken.
    A = block_pivoting.BlockPivotingProjector(norm_eps=0.0, reg_eps=0.0)._regularised_gramian(
        (J[:, : m // 2] @ J[:, : m // 2].T).unsqueeze(0)
    )[0]
    assert block_pivoting._inverse_if_well_conditioned(A) is None


@pytest.mark.parametrize("complement", [False, True])
def test_gathered_systems_solve_principal_submatrices(complement: bool) -> None:
    # Each row solves M_SS x_S = rhs_S (S the set or its complement, 0 outside), compared with
    # torch.linalg.solve on the explicit submatrices; one batch holds sets of different sizes,
    # the empty set and the full set, padded to a larger common size.
    generator = torch.Generator().manual_seed(21)
    m = 9
    X = torch.randn(m, m + 3, generator=generator, dtype=torch.float64)
    M = X @ X.T
    F = torch.rand(6, m, generator=generator) < 0.5
    F[0], F[1] = True, False
    rhs = torch.randn(6, m, generator=generator, dtype=torch.float64)
    S = ~F if complement else F
    size = int(S.sum(dim=-1).max()) + 2
    x, failed = block_pivoting._solve_gathered(
        block_pivoting._zero_padded(M), rhs, F, size, complement=complement
    )
    assert not failed.any()
    for p in range(6):
        index = S[p].nonzero().squeeze(-1)
        expected = torch.zeros(m, dtype=torch.float64)
        if index.numel() > 0:
            expected[index] = torch.linalg.solve(M[index][:, index], rhs[p, index])
        torch.testing.assert_close(x[p], expected, rtol=1e-10, atol=1e-12)


def _iwrm_gramian(m: int, generator: torch.Generator) -> torch.Tensor:
    """The Gramian of the per-sample gradients of the cross-entropy of a linear classifier with
    ten classes on non-negative features (as after a ReLU): the structure of an IWRM step, where
    samples of a class agree and most of the others conflict."""
    d, classes = 20, 10
    x = torch.randn(m, d, generator=generator, dtype=torch.float64).abs()
    W = 0.1 * torch.randn(d, classes, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, classes, (m,), generator=generator)
    delta = torch.softmax(x @ W, dim=-1) - torch.nn.functional.one_hot(labels, classes)
    J = (delta.unsqueeze(-1) * x.unsqueeze(-2)).reshape(m, -1)  # d loss_b / d W, flattened
    return J @ J.T


def _count_tolist(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A list that receives one entry per call of ``Tensor.tolist`` (the solver's per-iteration
    host read)."""
    reads: list[int] = []
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: reads.append(1) or tolist(self))
    return reads


def _record_systems(monkeypatch: pytest.MonkeyPatch) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A list that receives the padded matrix and the slots of every batch of gathered systems."""
    systems: list[tuple[torch.Tensor, torch.Tensor]] = []
    solve_ordered = block_pivoting._solve_ordered
    monkeypatch.setattr(
        block_pivoting,
        "_solve_ordered",
        lambda M, rhs, order: systems.append((M, order)) or solve_ordered(M, rhs, order),
    )
    return systems


@pytest.mark.parametrize("m", [64, 128])
def test_iwrm_gramian_matches_quadprog_with_one_read_per_iteration(
    m: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    generator = torch.Generator().manual_seed(500 + m)
    G = _iwrm_gramian(m, generator)
    U = torch.diag(torch.full((m,), 1.0 / m, dtype=torch.float64))
    A = G / G.trace() + 1e-4 * torch.eye(m, dtype=G.dtype)
    reference = QuadprogProjector()(U, G)
    systems = _record_systems(monkeypatch)
    reads = _count_tolist(monkeypatch)
    W = BlockPivotingProjector()(U, G)
    torch.testing.assert_close(W, reference, rtol=1e-6, atol=1e-6)
    _assert_kkt(U, W, A, tol=1e-9)
    # Some systems are those of the fixed sets, gathered from A^{-1} (the smaller ones).
    eye = torch.eye(m, dtype=G.dtype)
    assert any(torch.allclose(M[:m, :m] @ A, eye, atol=1e-8) for M, _ in systems)
    # Starting from the empty free set, every solve is preceded by one read, and one more read
    # finds that all the problems are solved.
    assert len(reads) == len(systems) + 1


def test_upgrad_shortcut_equals_the_general_path() -> None:
    # UPGrad's weights skip the product A diag(p): the same numbers as the sum of the solutions of
    # solve_batched on diag(p), and as quadprog's.
    generator = torch.Generator().manual_seed(510)
    m = 96
    G = _iwrm_gramian(m, generator)
    prefs = torch.rand(m, generator=generator, dtype=torch.float64) + 0.1
    projector = BlockPivotingProjector()
    weights = block_pivoting.summed_diagonal_projections(projector, prefs[None], G[None])[0]
    general = projector.solve_batched(torch.diag(prefs)[None], G[None])[0].sum(dim=0)
    torch.testing.assert_close(weights, general, rtol=1e-12, atol=1e-15)
    reference = QuadprogProjector()(torch.diag(prefs), G).sum(dim=0)
    torch.testing.assert_close(weights, reference, rtol=1e-6, atol=1e-7)


def _projected_like_quadprog(
    U: torch.Tensor, G: torch.Tensor, A: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> list:
    """Project with the default projector, check it against quadprog and the optimality
    conditions of ``A``, and return the systems it gathered."""
    reference = QuadprogProjector()(U, G)
    systems = _record_systems(monkeypatch)
    W = BlockPivotingProjector()(U, G)
    torch.testing.assert_close(W, reference, rtol=1e-6, atol=1e-6)
    _assert_kkt(U, W, A, tol=1e-9)
    return systems


def test_inverse_route_with_small_free_sets(monkeypatch: pytest.MonkeyPatch) -> None:
    # Rows that mostly agree (a common component): few constraints are free, so after the first
    # exchange the free sets are the smaller ones and the systems A_FF are gathered from A.
    generator = torch.Generator().manual_seed(520)
    m = 48
    J = torch.randn(m, 60, generator=generator, dtype=torch.float64)
    J = J + 3.0 * torch.randn(1, 60, generator=generator, dtype=torch.float64)
    J[:4] *= -1.0  # a few rows conflict with the others
    G = J @ J.T
    U = torch.diag(torch.rand(m, generator=generator, dtype=torch.float64))
    A = G / G.trace() + 1e-4 * torch.eye(m, dtype=G.dtype)
    systems = _projected_like_quadprog(U, G, A, monkeypatch)
    assert any(torch.allclose(M[:m, :m], A, atol=1e-12) for M, _ in systems)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_inverse_route_when_sets_change_by_several_indices(
    seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Per-sample gradients with less structure than a classifier's (fixed sets of a third of m):
    # several indices enter and leave the fixed sets at each exchange, and problems leave the
    # batch at different iterations. Random vectors and UPGrad's rows together.
    generator = torch.Generator().manual_seed(530 + seed)
    m = 64
    J = torch.randn(m, 24, generator=generator, dtype=torch.float64)
    J = J - 0.7 * J.mean(dim=0, keepdim=True)
    G = J @ J.T
    U = _vectors(m, generator)
    A = G / G.trace() + 1e-4 * torch.eye(m, dtype=G.dtype)
    systems = _projected_like_quadprog(U, G, A, monkeypatch)
    # Several iterations, some of them on fewer problems than the whole batch.
    assert len(systems) >= 3
    assert any(order.shape[0] < U.shape[0] for _, order in systems)


def test_many_small_gramians_drop_their_solved_problems() -> None:
    # Enough small Gramians (one matrix per problem group, not one shared) that the solved problems
    # leave the batch while it is still solved without gathered systems.
    generator = torch.Generator().manual_seed(21)
    m, c = 8, 40
    J = torch.randn(c, m, 3, generator=generator, dtype=torch.float64)
    G = J @ J.transpose(1, 2)
    U = torch.eye(m, dtype=torch.float64).expand(c, m, m)
    assert c * m * m * m >= block_pivoting._COMPACT_FROM  # the batch is compacted
    assert not block_pivoting._is_large(c * m, m)
    batched = BlockPivotingProjector().solve_batched(U, G)
    reference = torch.stack([QuadprogProjector()(U_k, G_k) for U_k, G_k in zip(U, G)])
    torch.testing.assert_close(batched, reference, rtol=1e-6, atol=1e-7)
