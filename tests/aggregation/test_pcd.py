import math
import warnings

import pytest
import torch

from torchjd import Stateful
from torchjd.aggregation import PCD, PCDWeighting

from ._matrices import J_A, J_B, J_B2, ONE, ZERO, ZR
from ._state_checks import (
    assert_outputs_do_not_alias_the_state,
    assert_reset_restores_fresh_behaviour,
    assert_state_dict_round_trip,
    assert_state_differs_from_fresh,
)

_ATOL = {"atol": 1e-4, "rtol": 0}


@pytest.mark.parametrize(
    ("kwargs", "matrix", "expected"),
    [
        ({}, J_A, [-0.8200, 2.9434, 2.9434]),
        ({}, J_B, [1.5714, 0.1939, 1.7305, 0.7061]),
        ({"tau": 0.5}, J_B, [1.3204, 1.0892, 1.1433, 1.3278]),
        ({"tau": torch.tensor([0.1, 0.5])}, J_B, [1.1019, 0.3439, 1.7912, 1.2079]),
        ({"tau": 0.0}, J_A, [-0.9733, 2.9200, 2.9200]),
        ({"tau": 1.0}, J_A, [3.1695, 1.9943, 1.9943]),
    ],
)
def test_spec_examples(kwargs: dict, matrix: torch.Tensor, expected: list) -> None:
    torch.testing.assert_close(PCD(**kwargs)(matrix), torch.tensor(expected), **_ATOL)


def test_spec_weights_and_sequences() -> None:
    torch.testing.assert_close(PCDWeighting()(J_A @ J_A.T), torch.tensor([1.8481, 1.0954]), **_ATOL)
    torch.testing.assert_close(
        PCDWeighting()(J_B @ J_B.T), torch.tensor([1.2183, 0.7061, 0.0]), **_ATOL
    )
    aggregator = PCD()
    for _ in range(3):  # repeated identical inputs: the debiased EMA is the current norms
        torch.testing.assert_close(
            aggregator(J_A), torch.tensor([-0.8200, 2.9434, 2.9434]), **_ATOL
        )
    aggregator = PCD()
    torch.testing.assert_close(
        aggregator(J_B), torch.tensor([1.5714, 0.1939, 1.7305, 0.7061]), **_ATOL
    )
    torch.testing.assert_close(
        aggregator(J_B2), torch.tensor([0.7545, 1.3998, 1.7290, -0.6941]), **_ATOL
    )
    out = PCD()(J_A.double())
    assert out.dtype == torch.float64
    torch.testing.assert_close(
        out, torch.tensor([-0.8200, 2.9434, 2.9434], dtype=torch.float64), **_ATOL
    )


def test_hand_check_on_two_rows() -> None:
    # v_hat = q = [18, 38]; G_hat_12 = -22 / sqrt(18 * 38); one active constraint:
    # mu = tau - G_hat_12; ||d||^2 = 1 + mu^2 + 2 mu G_hat_12; w = [1/sqrt(18), mu/sqrt(38)] *
    # sqrt(18 / ||d||^2).
    gramian = (J_A @ J_A.T).double()
    for tau in (0.02, 0.3, 1.0):
        c = -22 / math.sqrt(18 * 38)
        mu = tau - c
        norm2 = 1 + mu**2 + 2 * mu * c
        expected = torch.tensor([1 / math.sqrt(18), mu / math.sqrt(38)], dtype=torch.float64)
        expected = expected * math.sqrt(18 / norm2)
        torch.testing.assert_close(PCDWeighting(tau=tau, eps=0.0)(gramian), expected)


def _primal_reference(
    matrix: torch.Tensor, scales: torch.Tensor, tau: torch.Tensor
) -> torch.Tensor:
    """Solve the primal QP min 1/2 ||d - g~_1||^2 s.t. g~_j^T d >= tau_j ||g~_j||^2 with quadprog,
    then rescale to ||g_1||."""
    quadprog = pytest.importorskip("quadprog")
    np = pytest.importorskip("numpy")
    normalised = (matrix * scales.unsqueeze(1)).numpy()
    n = matrix.shape[1]
    secondary = normalised[1:]
    bounds = tau.numpy() * (secondary**2).sum(axis=1)
    d = quadprog.solve_qp(np.eye(n), normalised[0], secondary.T.copy(), bounds, 0)[0]
    d = torch.from_numpy(d)
    return d * matrix[0].norm() / d.norm()


def test_against_quadprog_over_two_calls() -> None:
    generator = torch.Generator().manual_seed(0)
    beta, eps = 0.9, 1e-8
    for m, n in [(2, 3), (3, 4), (4, 7), (6, 10)]:
        first, second = (
            torch.randn(m, n, generator=generator, dtype=torch.float64) for _ in range(2)
        )
        tau = torch.rand(m - 1, generator=generator, dtype=torch.float64) * 0.5
        aggregator = PCD(tau=tau, beta=beta, eps=eps)
        q1, q2 = (first**2).sum(dim=1), (second**2).sum(dim=1)
        torch.testing.assert_close(
            aggregator(first), _primal_reference(first, 1 / torch.sqrt(q1 + eps), tau)
        )
        v_hat = (beta * (1 - beta) * q1 + (1 - beta) * q2) / (1 - beta**2)
        torch.testing.assert_close(
            aggregator(second), _primal_reference(second, 1 / torch.sqrt(v_hat + eps), tau)
        )


def test_output_keeps_the_primary_norm() -> None:
    generator = torch.Generator().manual_seed(1)
    for m in (2, 3, 5):
        matrix = torch.randn(m, 6, generator=generator, dtype=torch.float64)
        out = PCD()(matrix)
        torch.testing.assert_close(out.norm(), matrix[0].norm())


def test_invariant_to_a_fixed_rescaling_of_secondary_rows() -> None:
    scaled = J_B * torch.tensor([[1.0], [100.0], [0.01]])
    torch.testing.assert_close(PCD()(scaled), PCD()(J_B), **_ATOL)


def test_edge_cases() -> None:
    torch.testing.assert_close(
        PCD()(torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, -1, 0]])), torch.tensor([1.0, 0, 0])
    )
    torch.testing.assert_close(PCD()(torch.tensor([[0.0, 0], [1, 1]])), torch.zeros(2))
    torch.testing.assert_close(PCD(tau=0.0)(torch.tensor([[1.0, 0], [-1, 0]])), torch.zeros(2))
    torch.testing.assert_close(PCD()(torch.tensor([[1.0, 0], [-1, 0]])), torch.tensor([-1.0, 0]))
    torch.testing.assert_close(PCD()(ONE), ONE[0])
    assert torch.equal(PCD()(ZERO), torch.zeros(3))
    assert torch.equal(PCD()(ZR), torch.zeros(3))
    assert PCDWeighting()(torch.zeros(0, 0)).shape == (0,)
    assert torch.equal(PCD()(torch.zeros(0, 3)), torch.zeros(3))
    # Scaling the input scales the output, as long as eps is negligible next to the squared norms.
    torch.testing.assert_close(PCD()(1e8 * J_B), 1e8 * PCD()(J_B), rtol=1e-4, atol=0)
    tiny = PCD()(1e-8 * J_B)
    torch.testing.assert_close(tiny.norm(), 1e-8 * J_B[0].norm())


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_gives_nan_and_keeps_the_state(bad: float) -> None:
    aggregator = PCD()
    aggregator(J_B)
    before = {
        key: value.clone() if isinstance(value, torch.Tensor) else value
        for key, value in aggregator.state_dict().items()
    }
    matrix = J_B2.clone()
    matrix[1, 2] = bad
    assert aggregator(matrix).isnan().all()
    after = aggregator.state_dict()
    assert before.keys() == after.keys()
    for key, value in before.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, after[key])
        else:
            assert value == after[key]
    reference = PCD()
    reference(J_B)
    torch.testing.assert_close(aggregator(J_B2), reference(J_B2), rtol=0, atol=0)


def test_validation() -> None:
    bad = [
        {"tau": -0.1},
        {"tau": 1.5},
        {"tau": float("nan")},
        {"tau": torch.tensor([[0.1]])},
        {"tau": torch.tensor([0.1, 1.2])},
        {"beta": 1.0},
        {"beta": -0.1},
        {"eps": -1.0},
        {"eps": float("nan")},
    ]
    for kwargs in bad:
        with pytest.raises(ValueError, match=f"`{next(iter(kwargs))}`"):
            PCD(**kwargs)
        with pytest.raises(ValueError, match=f"`{next(iter(kwargs))}`"):
            PCDWeighting(**kwargs)
    for kwargs in ({"tau": 0.0}, {"tau": 1.0}, {"tau": 1}, {"beta": 0.0}, {"eps": 0.0}):
        PCD(**kwargs)
    aggregator = PCD()
    with pytest.raises(ValueError, match="`beta`"):
        aggregator.beta = 1.0
    aggregator.tau = torch.tensor([0.1, 0.5])
    assert aggregator.gramian_weighting.tau is aggregator.tau
    with pytest.raises(ValueError, match="`tau`"):
        PCD(tau=torch.tensor([0.1]))(J_B)
    # The length of tau is checked before the input's finiteness.
    with pytest.raises(ValueError, match="`tau`"):
        PCD(tau=torch.tensor([0.1]))(torch.full((3, 2), float("nan")))


def test_repr_and_str() -> None:
    assert repr(PCD()) == "PCD(tau=0.02, beta=0.999, eps=1e-08)"
    assert str(PCD()) == "PCD"
    assert repr(PCD(tau=torch.tensor([0.1, 0.2]))) == (
        "PCD(tau=tensor([0.1000, 0.2000]), beta=0.999, eps=1e-08)"
    )
    assert repr(PCDWeighting()) == "PCDWeighting(tau=0.02, beta=0.999, eps=1e-08)"
    assert str(PCDWeighting()) == repr(PCDWeighting())


def test_no_grad() -> None:
    assert not PCD()(J_B.clone().requires_grad_()).requires_grad


def test_state() -> None:
    assert isinstance(PCD(), Stateful) and isinstance(PCDWeighting(), Stateful)

    def make() -> PCD:
        return PCD(beta=0.5)

    history = [J_B, J_B2, J_B]
    probes = [J_B2, J_B]
    assert_state_differs_from_fresh(make, history, J_B2)
    for n_history in range(4):
        assert_reset_restores_fresh_behaviour(make, history[:n_history], probes)
        assert_state_dict_round_trip(make, history[:n_history], probes)
    assert_outputs_do_not_alias_the_state(
        lambda: PCDWeighting(beta=0.5), [J_B @ J_B.T], J_B2 @ J_B2.T
    )


def test_state_restarts_when_m_changes_only() -> None:
    aggregator = PCD()
    aggregator(J_A)
    with pytest.warns(UserWarning, match="re-initialises"):
        out = aggregator(J_B)
    torch.testing.assert_close(out, PCD()(J_B), rtol=0, atol=0)
    # A dtype change keeps the moving average.
    mixed, plain = PCD(beta=0.5), PCD(beta=0.5)
    mixed(J_B)
    plain(J_B)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(mixed(J_B2.double()), plain(J_B2).double(), rtol=1e-5, atol=1e-6)
