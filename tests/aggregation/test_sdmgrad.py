import pytest
import torch

from torchjd import Stateful
from torchjd.aggregation import SDMGradWeighting
from torchjd.linalg._simplex import project_onto_simplex

from ._matrices import J_B, J_B2
from ._state_checks import (
    assert_outputs_do_not_alias_the_state,
    assert_reset_restores_fresh_behaviour,
    assert_state_dict_round_trip,
    assert_state_differs_from_fresh,
)

M_AB = J_B @ J_B2.T
G_B = J_B @ J_B.T
_ATOL = {"atol": 1e-4, "rtol": 0}


def test_spec_examples_with_one_step() -> None:
    # diag(1, 0.25, 0): sigma = (1 + 0.5 + 0) / 3 = 0.5, A_bar = diag(4, 1, 0) (up to 1e-8);
    # w + 0.3 w~ = 1.3 / 3; w - 10 * A_bar (1.3/3) = 1/3 - 13/3 [4, 1, 0]: projection [0, 0, 1];
    # output (w + 0.1) / 1.3 = [1/13, 1/13, 11/13].
    weighting = SDMGradWeighting(n_iter=1)
    torch.testing.assert_close(
        weighting(torch.diag(torch.tensor([1.0, 0.25, 0.0]))), torch.tensor([1, 1, 11]) / 13.0
    )
    torch.testing.assert_close(weighting(torch.eye(3)), torch.tensor([6, 6, 1]) / 13.0)
    torch.testing.assert_close(
        SDMGradWeighting(n_iter=1, pref_vector=torch.tensor([0.0, 0.0, 1.0]))(
            torch.diag(torch.tensor([1.0, 0.25, 0.0]))
        ),
        torch.tensor([0.0, 0.0, 1.0]),
    )


def test_spec_examples() -> None:
    weighting = SDMGradWeighting()
    expected = torch.tensor([0.0769, 0.0769, 0.8462])
    torch.testing.assert_close(weighting(M_AB), expected, **_ATOL)
    torch.testing.assert_close(weighting(M_AB), expected, **_ATOL)
    torch.testing.assert_close(
        SDMGradWeighting()(G_B), torch.tensor([0.0769, 0.8462, 0.0769]), **_ATOL
    )
    torch.testing.assert_close(
        SDMGradWeighting(pref_vector=torch.tensor([1.0, 0.0, 0.0]))(M_AB),
        torch.tensor([0.2308, 0.0, 0.7692]),
        **_ATOL,
    )
    torch.testing.assert_close(SDMGradWeighting(lambda_=0)(M_AB), torch.tensor([0.0, 0.0, 1.0]))


def _by_the_formula(
    a: torch.Tensor,
    w: torch.Tensor,
    pref: torch.Tensor,
    lr: float,
    momentum: float,
    n_iter: int,
    lambda_: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    sigma = torch.sqrt(torch.clamp(torch.diagonal(a), min=0)).mean()
    a_bar = a / (sigma**2 + 1e-8)
    v = None
    for _ in range(n_iter):
        grad = a_bar @ (w + lambda_ * pref)
        v = grad if v is None else momentum * v + grad
        w = project_onto_simplex(w - lr * v)
    return w, (w + lambda_ * pref) / (1 + lambda_)


def test_two_calls_follow_the_formula() -> None:
    generator = torch.Generator().manual_seed(1)
    first, second = (torch.randn(4, 4, generator=generator, dtype=torch.float64) for _ in range(2))
    pref = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    weighting = SDMGradWeighting(lr=0.3, momentum=0.7, n_iter=5, lambda_=0.5, pref_vector=pref)
    w, expected = _by_the_formula(
        first, torch.full((4,), 0.25, dtype=torch.float64), pref, 0.3, 0.7, 5, 0.5
    )
    torch.testing.assert_close(weighting(first), expected)
    _, expected = _by_the_formula(second, w, pref, 0.3, 0.7, 5, 0.5)
    torch.testing.assert_close(weighting(second), expected)


def test_validation() -> None:
    bad = [
        {"lr": 0.0},
        {"momentum": 1.0},
        {"momentum": -0.1},
        {"n_iter": 0},
        {"n_iter": 2.5},
        {"lambda_": -0.1},
        {"pref_vector": torch.ones(2, 2)},
    ]
    for kwargs in bad:
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            SDMGradWeighting(**kwargs)
    SDMGradWeighting(momentum=0.0, lambda_=0.0)
    weighting = SDMGradWeighting()
    with pytest.raises(ValueError, match="`lr`"):
        weighting.lr = -1.0
    with pytest.raises(ValueError, match="pref_vector"):
        weighting.pref_vector = torch.ones(())
    with pytest.raises(ValueError, match="pref_vector"):
        SDMGradWeighting(pref_vector=torch.tensor([0.5, 0.5]))(torch.ones(3, 3))
    with pytest.raises(ValueError, match="at least one objective"):
        weighting(torch.zeros(0, 0))


def test_repr_and_str() -> None:
    weighting = SDMGradWeighting(lr=10.0, momentum=0.5, n_iter=20, lambda_=0.3)
    expected = "SDMGradWeighting(lr=10.0, momentum=0.5, n_iter=20, lambda_=0.3, pref_vector=None)"
    assert repr(weighting) == expected and str(weighting) == expected
    with_pref = SDMGradWeighting(pref_vector=torch.tensor([1.0, 0.0]))
    assert repr(with_pref).endswith("pref_vector=tensor([1., 0.]))")


def test_no_grad_and_degenerate_inputs() -> None:
    assert not SDMGradWeighting()(M_AB.clone().requires_grad_()).requires_grad
    torch.testing.assert_close(SDMGradWeighting()(torch.zeros(3, 3)), torch.full((3,), 1 / 3))
    for scale in (1e-8, 1e8):
        w = SDMGradWeighting()(scale * M_AB)
        assert torch.isfinite(w).all()
        torch.testing.assert_close(w.sum(), torch.tensor(1.0))


def test_state() -> None:
    assert isinstance(SDMGradWeighting(), Stateful)

    def make() -> SDMGradWeighting:
        return SDMGradWeighting(lr=0.1, n_iter=3)

    history = [M_AB, G_B, M_AB]
    probes = [G_B, M_AB]
    assert_state_differs_from_fresh(make, history, G_B)
    assert_reset_restores_fresh_behaviour(make, history, probes)
    assert_state_dict_round_trip(make, history, probes)
    assert_state_dict_round_trip(make, [], probes)
    assert_outputs_do_not_alias_the_state(make, history, G_B)


def test_reinitialises_when_m_or_dtype_changes() -> None:
    def make() -> SDMGradWeighting:
        return SDMGradWeighting(lr=0.1, n_iter=3)

    weighting = make()
    weighting(M_AB)
    with pytest.warns(UserWarning, match="re-initialises"):
        out = weighting(torch.eye(2))
    torch.testing.assert_close(out, make()(torch.eye(2)))
    with pytest.warns(UserWarning, match="re-initialises"):
        out = weighting(torch.eye(2, dtype=torch.float64))
    torch.testing.assert_close(out, make()(torch.eye(2, dtype=torch.float64)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_zeros_give_the_preference(dtype: torch.dtype) -> None:
    # A zero matrix gives a zero gradient: w stays uniform (1e-8 must not underflow to 0 / 0).
    out = SDMGradWeighting()(torch.zeros(3, 3, dtype=dtype))
    assert out.dtype == dtype
    torch.testing.assert_close(out, torch.full((3,), 1 / 3, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_follows_float32(dtype: torch.dtype) -> None:
    weighting, reference = SDMGradWeighting(), SDMGradWeighting()
    for matrix in [M_AB, M_AB.T]:
        out = weighting(matrix.to(dtype))
        assert out.dtype == dtype
        torch.testing.assert_close(out, reference(matrix.to(dtype).float()).to(dtype))
