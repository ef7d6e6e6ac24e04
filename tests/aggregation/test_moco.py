import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.functional import mse_loss

from torchjd import Stateful
from torchjd.aggregation import MoCo
from torchjd.autojac import jac_to_grad, mtl_backward

from ._matrices import J_A
from ._state_checks import (
    assert_outputs_do_not_alias_the_state,
    assert_reset_restores_fresh_behaviour,
    assert_state_dict_round_trip,
    assert_state_differs_from_fresh,
)


def _project_by_bisection(y: np.ndarray) -> np.ndarray:
    """Projection onto the simplex: max(y - tau, 0) with tau found by bisection on its sum."""
    low, high = y.min() - 1.0, y.max()
    for _ in range(200):
        tau = (low + high) / 2
        if np.maximum(y - tau, 0.0).sum() > 1.0:
            low = tau
        else:
            high = tau
    return np.maximum(y - (low + high) / 2, 0.0)


def _reference(matrices: list[np.ndarray], beta, beta_sigma, gamma, gamma_sigma, rho):
    """MoCo's Algorithm 1 written out with numpy, call by call."""
    tracked, weights, outputs = None, None, []
    for k, matrix in enumerate(matrices, start=1):
        if tracked is None:
            tracked = matrix.copy()
            weights = np.full(matrix.shape[0], 1.0 / matrix.shape[0])
        else:
            tracked = tracked - beta / k**beta_sigma * (tracked - matrix)
        gradient = (tracked @ tracked.T + rho * np.eye(len(weights))) @ weights
        weights = _project_by_bisection(weights - gamma / k**gamma_sigma * gradient)
        outputs.append(weights @ tracked)
    return outputs


def test_first_call_by_hand() -> None:
    # Y = J_A, G = [[18, -22], [-22, 38]], lambda = [0.5, 0.5]: G lambda = [-2, 8];
    # lambda - 0.1 [-2, 8] = [0.7, -0.3], whose projection is [1, 0]: the result is row 0.
    torch.testing.assert_close(MoCo()(J_A), J_A[0])


def test_two_calls_by_hand() -> None:
    # J = diag(1, 2) twice, so Y = J. Call 1: G lambda = [0.5, 2], lambda - 0.1 G lambda =
    # [0.45, 0.3], projected by adding 0.125: [0.575, 0.425]. Call 2 (gamma_2 = 0.1 / sqrt(2)):
    # [0.575, 0.425] - gamma_2 [0.575, 1.7], projected by adding half of the missing mass.
    aggregator = MoCo()
    matrix = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    torch.testing.assert_close(aggregator(matrix), torch.tensor([0.575, 0.85], dtype=torch.float64))
    gamma_2 = 0.1 / math.sqrt(2)
    stepped = [0.575 - gamma_2 * 0.575, 0.425 - gamma_2 * 1.7]
    shift = (1.0 - sum(stepped)) / 2
    expected = torch.tensor([stepped[0] + shift, 2 * (stepped[1] + shift)], dtype=torch.float64)
    torch.testing.assert_close(aggregator(matrix), expected)


@pytest.mark.parametrize(
    "params",
    [
        {"beta": 0.5, "beta_sigma": 0.5, "gamma": 0.1, "gamma_sigma": 0.5, "rho": 0.0},
        {"beta": 0.9, "beta_sigma": 0.0, "gamma": 0.3, "gamma_sigma": 0.0, "rho": 0.2},
        {"beta": 1.0, "beta_sigma": 0.3, "gamma": 2.0, "gamma_sigma": 1.0, "rho": 1.0},
    ],
)
def test_matches_the_written_out_algorithm(params: dict[str, float]) -> None:
    generator = torch.Generator().manual_seed(0)
    matrices = [torch.randn(4, 6, generator=generator, dtype=torch.float64) for _ in range(6)]
    expected = _reference([m.numpy() for m in matrices], **params)
    aggregator = MoCo(**params)
    for matrix, wanted in zip(matrices, expected):
        torch.testing.assert_close(aggregator(matrix), torch.from_numpy(wanted))


def test_tracking_rate_one_follows_the_current_gradients() -> None:
    # With beta = 1 and no decay, Y is the current J at every call.
    aggregator = MoCo(beta=1.0, beta_sigma=0.0, gamma=1e-12)
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        matrix = torch.randn(3, 4, generator=generator, dtype=torch.float64)
        torch.testing.assert_close(aggregator(matrix), matrix.mean(dim=0))


def test_permutation_of_the_tasks_over_calls() -> None:
    generator = torch.Generator().manual_seed(2)
    permutation = torch.tensor([2, 0, 1])
    plain, permuted = MoCo(rho=0.1), MoCo(rho=0.1)
    for _ in range(4):
        matrix = torch.randn(3, 5, generator=generator, dtype=torch.float64)
        torch.testing.assert_close(permuted(matrix[permutation]), plain(matrix))


def test_float32_state_and_output() -> None:
    aggregator = MoCo()
    out = aggregator(J_A)
    assert out.dtype == torch.float32
    assert aggregator._weights.dtype == torch.float32


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"beta": 0.0}, "beta"),
        ({"beta": 1.5}, "beta"),
        ({"beta_sigma": -0.1}, "beta_sigma"),
        ({"gamma": 0.0}, "gamma"),
        ({"gamma_sigma": -1.0}, "gamma_sigma"),
        ({"rho": -0.5}, "rho"),
    ],
)
def test_rejects_bad_hyper_parameters(kwargs: dict[str, float], name: str) -> None:
    with pytest.raises(ValueError, match=f"`{name}`"):
        MoCo(**kwargs)


def test_repr() -> None:
    assert repr(MoCo()) == "MoCo(beta=0.5, beta_sigma=0.5, gamma=0.1, gamma_sigma=0.5, rho=0.0)"
    assert isinstance(MoCo(), Stateful)


def test_state_checks() -> None:
    generator = torch.Generator().manual_seed(3)
    history = [torch.randn(3, 4, generator=generator) for _ in range(3)]
    probes = [torch.randn(3, 4, generator=generator) for _ in range(2)]
    assert_state_differs_from_fresh(MoCo, history, probes[0])
    assert_reset_restores_fresh_behaviour(MoCo, history, probes)
    assert_state_dict_round_trip(MoCo, history, probes)
    assert_outputs_do_not_alias_the_state(MoCo, history, probes[0])


def test_warns_and_restarts_when_the_shape_changes() -> None:
    aggregator = MoCo()
    aggregator(torch.ones(3, 3))
    with pytest.warns(UserWarning, match="re-initialises"):
        out = aggregator(J_A)
    torch.testing.assert_close(out, MoCo()(J_A))


def test_training_loop_with_jac_to_grad() -> None:
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(5, 16), nn.Tanh())
    heads = nn.ModuleList(nn.Linear(16, 1) for _ in range(3))
    x = torch.randn(64, 5)
    targets = [x[:, :1], x[:, 1:2].sin(), x[:, 2:3] * x[:, 3:4]]
    optimizer = torch.optim.SGD([*trunk.parameters(), *heads.parameters()], lr=0.05)
    aggregator = MoCo()

    def losses(features: torch.Tensor) -> list[torch.Tensor]:
        return [mse_loss(head(features), t) for head, t in zip(heads, targets)]

    with torch.no_grad():
        before = torch.stack(losses(trunk(x)))
    for _ in range(25):
        features = trunk(x)
        mtl_backward(losses(features), features=features)
        jac_to_grad(trunk.parameters(), aggregator)
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        after = torch.stack(losses(trunk(x)))
    assert (after < before).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_same_outputs_and_state_on_cuda() -> None:
    on_cpu, on_cuda = MoCo(), MoCo()
    generator = torch.Generator().manual_seed(7)
    for _ in range(3):
        matrix = torch.randn(3, 4, generator=generator, dtype=torch.float64)
        out = on_cuda(matrix.cuda())
        assert out.device.type == "cuda"
        torch.testing.assert_close(out.cpu(), on_cpu(matrix))
    assert all(
        value.device.type == "cuda"
        for value in on_cuda.state_dict().values()
        if isinstance(value, torch.Tensor)
    )


def test_half_precision_gramian_in_float32() -> None:
    # The Gramian of rows of norm 1e3 (1e6) overflows float16: it is computed in float32.
    matrix = torch.tensor([[1000.0, 0.0], [0.0, 500.0]])
    out = MoCo()(matrix.half())
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), MoCo()(matrix), rtol=1e-3, atol=0.0)
