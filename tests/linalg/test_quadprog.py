"""The projector contract (spec: stateful-linalg §2, §6) for both projectors, and what is specific
to ``QuadprogProjector`` (optional dependencies, solver failures)."""

import numpy as np
import pytest
import torch

import torchjd._optional
from torchjd.linalg import BlockPivotingProjector, DualConeProjector, QuadprogProjector
from torchjd.linalg._quadprog import _project_one

PROJECTORS = [QuadprogProjector, BlockPivotingProjector]

G_A = torch.tensor([[18.0, -22.0], [-22.0, 38.0]])  # Gramian of [[-4, 1, 1], [6, 1, 1]]
G_WORKED = torch.tensor([[1.0, -1.0], [-1.0, 2.0]])  # Gramian of [[1, 0], [-1, 1]]


def _exact(projector_class: type) -> DualConeProjector:
    return projector_class(norm_eps=0.0, reg_eps=0.0)


def test_dual_cone_projector_is_abstract() -> None:
    with pytest.raises(TypeError):
        DualConeProjector()  # type: ignore[abstract]


@pytest.mark.parametrize("projector_class", PROJECTORS)
def test_parameters(projector_class: type) -> None:
    projector = projector_class()
    assert isinstance(projector, DualConeProjector)
    assert projector.norm_eps == 0.0001 == projector.reg_eps
    projector.norm_eps = 0.5
    projector.reg_eps = 0.0
    assert projector.norm_eps == 0.5 and projector.reg_eps == 0.0
    for name in ("norm_eps", "reg_eps"):
        with pytest.raises(ValueError, match=name):
            setattr(projector, name, -1e-9)
        with pytest.raises(ValueError, match=name):
            projector_class(**{name: -1.0})
        with pytest.raises(ValueError, match=name):
            projector_class(**{name: float("nan")})
    with pytest.raises(TypeError):
        projector_class(0.1)


@pytest.mark.parametrize("projector_class", PROJECTORS)
def test_repr(projector_class: type) -> None:
    name = projector_class.__name__
    assert repr(projector_class()) == f"{name}(norm_eps=0.0001, reg_eps=0.0001)"
    assert str(projector_class(norm_eps=0.001, reg_eps=0.01)) == (
        f"{name}(norm_eps=0.001, reg_eps=0.01)"
    )

    class Custom(projector_class):
        pass

    assert repr(Custom(reg_eps=0.5)) == "Custom(norm_eps=0.0001, reg_eps=0.5)"


@pytest.mark.parametrize("projector_class", PROJECTORS)
def test_worked_example(projector_class: type) -> None:
    # u = e_1 gives w = [1, 0.5] (G w = [0.5, 0]); u = e_2 gives w = [1, 1] (G w = [0, 1]).
    expected = torch.tensor([[1.0, 0.5], [1.0, 1.0]])
    torch.testing.assert_close(_exact(projector_class)(torch.eye(2), G_WORKED), expected)
    with_eps = projector_class()(torch.eye(2), G_WORKED)
    torch.testing.assert_close(with_eps, expected, rtol=0, atol=1e-3)
    # The reference's numbers with the default epsilons.
    torch.testing.assert_close(
        with_eps, torch.tensor([[1.0, 0.4999], [0.9997, 1.0]]), rtol=0, atol=1e-4
    )


@pytest.mark.parametrize("projector_class", PROJECTORS)
def test_examples_on_g_a(projector_class: type) -> None:
    projector = projector_class()
    out = projector(torch.diag(torch.tensor([0.5, 0.5])), G_A)
    torch.testing.assert_close(out, torch.tensor([[0.5, 0.2894], [0.6109, 0.5]]), atol=1e-4, rtol=0)
    out = projector(torch.tensor([0.5, 0.5]), G_A)
    torch.testing.assert_close(out, torch.tensor([0.6109, 0.5]), atol=1e-4, rtol=0)
    assert projector(torch.rand(4, 5, 2), G_A).shape == (4, 5, 2)


def _check_kkt(u: torch.Tensor, w: torch.Tensor, G: torch.Tensor) -> None:
    Gw = w @ G
    assert (w >= u - 1e-5).all()
    assert (Gw >= -1e-4).all()
    assert ((w - u) * Gw).sum(dim=-1).abs().max() <= 3e-3


@pytest.mark.parametrize("projector_class", PROJECTORS)
@pytest.mark.parametrize("shape", [(5, 7), (9, 37), (2, 14), (32, 114), (50, 100)])
def test_kkt_conditions(projector_class: type, shape: tuple[int, int]) -> None:
    generator = torch.Generator().manual_seed(shape[0] * 1000 + shape[1])
    J = torch.randn(shape, generator=generator, dtype=torch.float64)
    G = J @ J.T
    U = torch.rand(3, shape[0], generator=generator, dtype=torch.float64)
    _check_kkt(U, _exact(projector_class)(U, G), G)


@pytest.mark.parametrize("projector_class", PROJECTORS)
def test_scale_invariance(projector_class: type) -> None:
    generator = torch.Generator().manual_seed(3)
    J = torch.randn(6, 9, generator=generator, dtype=torch.float64)
    G = J @ J.T
    U = torch.randn(4, 6, generator=generator, dtype=torch.float64)
    projector = _exact(projector_class)
    reference = projector(U, G)
    for c in (2.0**-4, 2.0**-2, 2.0**2, 2.0**4):
        torch.testing.assert_close(projector(U, c * G), reference, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("projector_class", PROJECTORS)
@pytest.mark.parametrize("shape", [(5, 2, 3), (1, 3, 6, 9), (2, 1, 1, 5, 8), (3, 1)])
def test_shapes(projector_class: type, shape: tuple[int, ...]) -> None:
    generator = torch.Generator().manual_seed(sum(shape))
    m = shape[-1]
    J = torch.randn(m, m + 2, generator=generator, dtype=torch.float64)
    G = J @ J.T
    U = torch.randn(shape, generator=generator, dtype=torch.float64)
    projector = projector_class()
    out = projector(U, G)
    assert out.shape == U.shape
    flat = projector(U.reshape(-1, m), G)
    torch.testing.assert_close(out, flat.reshape(shape), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("projector_class", PROJECTORS)
def test_dtype_and_device_of_g(projector_class: type) -> None:
    projector = projector_class()
    U = torch.tensor([[0.5, 0.0], [0.0, 0.5]])
    out = projector(U, G_A.double())
    assert out.dtype == torch.float64 and out.device == G_A.device
    out = projector(U.double(), G_A)
    assert out.dtype == torch.float32


@pytest.mark.parametrize("projector_class", PROJECTORS)
def test_tiny_gramian_gives_positive_part(projector_class: type) -> None:
    projector = projector_class()
    G = 1e-6 * G_WORKED  # trace 3e-6 < norm_eps
    torch.testing.assert_close(projector(torch.tensor([1.0, -1.0]), G), torch.tensor([1.0, 0.0]))
    U = torch.randn(5, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = projector(U, G.double())
    torch.testing.assert_close(out, U.clamp(min=0.0), rtol=0, atol=1e-12)


@pytest.mark.parametrize("projector_class", PROJECTORS)
def test_cone_member_is_kept(projector_class: type) -> None:
    # J^T u is in the dual cone when G u >= 0: then w = u.
    u = torch.tensor([1.0, 1.0], dtype=torch.float64)  # G_WORKED u = [0, 1]
    torch.testing.assert_close(_exact(projector_class)(u, G_WORKED.double()), u)


@pytest.mark.parametrize("projector_class", PROJECTORS)
def test_rejects_bad_shapes(projector_class: type) -> None:
    projector = projector_class()
    with pytest.raises(ValueError, match="`G`"):
        projector(torch.ones(2), torch.ones(2, 3))
    with pytest.raises(ValueError, match="`U`"):
        projector(torch.ones(4, 3), G_A)


def test_missing_module_raises_import_error(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = torchjd._optional.find_spec

    def find_spec(name: str, *args: object) -> object:
        return None if name == "quadprog" else real_find_spec(name, *args)

    monkeypatch.setattr(torchjd._optional, "find_spec", find_spec)
    with pytest.raises(ImportError, match=r"QuadprogProjector.*\['quadprog'\].*quadprog_projector"):
        QuadprogProjector()
    # Importing the class, and the torch projector, never need it.
    from torchjd.linalg import QuadprogProjector as Imported

    assert Imported is QuadprogProjector
    BlockPivotingProjector()


def test_solver_failure_is_a_value_error() -> None:
    # Unnormalised huge Gramians make quadprog fail; the public call normalises, so use the
    # per-vector entry point.
    generator = torch.Generator().manual_seed(0)
    J = 1e5 * torch.randn(10, 100, generator=generator, dtype=torch.float64)
    G = (J @ J.T).numpy()
    u = np.random.default_rng(0).random(10)
    with pytest.raises(ValueError, match="no solution"):
        _project_one(G, u)


def test_non_positive_definite_is_a_value_error() -> None:
    # With both epsilons 0, the zero Gramian stays zero (no division by its zero trace), which
    # quadprog rejects.
    G = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="positive definite"):
        QuadprogProjector(norm_eps=0.0, reg_eps=0.0)(torch.tensor([1.0, -1.0]), G)
