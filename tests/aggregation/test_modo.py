import warnings

import pytest
import torch

from torchjd import Stateful
from torchjd.aggregation import GramianWeightedAggregator, MoDoWeighting
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


def test_cross_matrix_is_the_spec_one() -> None:
    expected = torch.tensor([[3.0, -2.0, 2.5], [-1.0, 4.0, 1.0], [0.5, -0.5, -0.25]])
    torch.testing.assert_close(M_AB, expected)


def test_spec_examples() -> None:
    weighting = MoDoWeighting()
    torch.testing.assert_close(
        weighting(M_AB), torch.tensor([0.2972, 0.2806, 0.4222]), atol=1e-4, rtol=0
    )
    torch.testing.assert_close(
        weighting(M_AB), torch.tensor([0.2435, 0.2409, 0.5156]), atol=1e-4, rtol=0
    )
    torch.testing.assert_close(
        MoDoWeighting(gamma=1.0, rho=0.0)(M_AB), torch.tensor([0.0, 0.0, 1.0])
    )
    torch.testing.assert_close(
        MoDoWeighting()(G_B), torch.tensor([0.4056, 0.3639, 0.2306]), atol=1e-4, rtol=0
    )
    torch.testing.assert_close(MoDoWeighting()(torch.zeros(3, 3)), torch.full((3,), 1 / 3))


def test_first_step_by_hand() -> None:
    # lambda = 1/3: M lambda = row sums / 3 = [3.5, 4, -0.25] / 3; gradient = that + 0.1 / 3;
    # y = 1/3 - 0.1 * gradient = [0.2133, 0.1967, 0.3450]; its sum is 0.755, so the projection
    # adds (1 - 0.755) / 3 to each entry (all stay positive).
    gradient = torch.tensor([3.5, 4.0, -0.25], dtype=torch.float64) / 3 + 0.1 / 3
    y = 1 / 3 - 0.1 * gradient
    expected = y + (1 - y.sum()) / 3
    torch.testing.assert_close(MoDoWeighting()(M_AB.double()), expected)
    torch.testing.assert_close(
        expected, torch.tensor([0.2972, 0.2806, 0.4222], dtype=torch.float64), atol=1e-4, rtol=0
    )


def test_second_step_uses_the_stored_weights() -> None:
    weighting = MoDoWeighting(gamma=0.05, rho=0.2)
    first = weighting(M_AB.double())
    second = weighting(G_B.double())
    expected = project_onto_simplex(first - 0.05 * (G_B.double() @ first + 0.2 * first))
    torch.testing.assert_close(second, expected)


def test_outputs_lie_on_the_simplex() -> None:
    weighting = MoDoWeighting(gamma=0.5)
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        w = weighting(torch.randn(4, 4, generator=generator))
        assert (w >= 0).all()
        torch.testing.assert_close(w.sum(), torch.tensor(1.0))


def test_validation() -> None:
    for kwargs in ({"gamma": 0.0}, {"gamma": -1.0}, {"rho": -0.1}, {"gamma": float("nan")}):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            MoDoWeighting(**kwargs)
    MoDoWeighting(rho=0.0)
    weighting = MoDoWeighting()
    with pytest.raises(ValueError, match="`gamma`"):
        weighting.gamma = 0.0
    with pytest.raises(ValueError, match="`rho`"):
        weighting.rho = -1.0
    with pytest.raises(ValueError, match="at least one objective"):
        weighting(torch.zeros(0, 0))


def test_repr_and_str() -> None:
    assert repr(MoDoWeighting(gamma=0.1, rho=0.05)) == "MoDoWeighting(gamma=0.1, rho=0.05)"
    assert str(MoDoWeighting()) == "MoDoWeighting(gamma=0.1, rho=0.1)"


def test_no_grad() -> None:
    stat = M_AB.clone().requires_grad_()
    assert not MoDoWeighting()(stat).requires_grad


def test_state() -> None:
    assert isinstance(MoDoWeighting(), Stateful)
    history = [M_AB, G_B, M_AB]
    probes = [G_B, M_AB]
    assert_state_differs_from_fresh(MoDoWeighting, history, G_B)
    assert_reset_restores_fresh_behaviour(MoDoWeighting, history, probes)
    assert_state_dict_round_trip(MoDoWeighting, history, probes)
    assert_state_dict_round_trip(MoDoWeighting, [M_AB.double()], [G_B.double()])
    assert_state_dict_round_trip(MoDoWeighting, [], [M_AB])
    assert_outputs_do_not_alias_the_state(MoDoWeighting, history, G_B)


def test_reinitialises_when_m_or_dtype_changes() -> None:
    weighting = MoDoWeighting()
    weighting(M_AB)
    weighting(M_AB)
    with pytest.warns(UserWarning, match="re-initialises"):
        out = weighting(torch.eye(2))
    torch.testing.assert_close(out, MoDoWeighting()(torch.eye(2)))
    with pytest.warns(UserWarning, match="re-initialises"):
        out = weighting(M_AB.double())
    torch.testing.assert_close(out, MoDoWeighting()(M_AB.double()))
    assert out.dtype == torch.float64
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MoDoWeighting()(M_AB.double())  # no warning at the first call


def test_gramian_aggregator_wrapping() -> None:
    aggregator = GramianWeightedAggregator(MoDoWeighting())
    torch.testing.assert_close(aggregator(J_B), MoDoWeighting()(G_B) @ J_B)


def test_huge_inputs_stay_on_the_simplex() -> None:
    # All entries of lambda - gamma * gradient equal: the projection is uniform.
    torch.testing.assert_close(MoDoWeighting()(1e8 * torch.ones(4, 4)), torch.full((4,), 0.25))
    # Entries about 1e16 apart: the projection is the vertex of the largest one.
    torch.manual_seed(3)
    J = 1e8 * torch.randn(4, 10)
    matrix = J @ J.T
    y = 0.25 - 0.1 * (matrix.double() @ torch.full((4,), 0.25, dtype=torch.float64) + 0.025)
    expected = torch.nn.functional.one_hot(y.argmax(), 4).float()
    torch.testing.assert_close(MoDoWeighting()(matrix), expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_follows_float32(dtype: torch.dtype) -> None:
    weighting, reference = MoDoWeighting(), MoDoWeighting()
    for matrix in [M_AB, G_B, M_AB]:
        out = weighting(matrix.to(dtype))
        assert out.dtype == dtype
        torch.testing.assert_close(out, reference(matrix.to(dtype).float()).to(dtype))
