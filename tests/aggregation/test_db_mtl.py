import math

import pytest
import torch
from torch import nn
from torch.nn.functional import mse_loss

from torchjd import Stateful
from torchjd.aggregation import DBMTL, GramianWeightedAggregator
from torchjd.autojac import jac_to_grad, mtl_backward

from ._state_checks import (
    assert_outputs_do_not_alias_the_state,
    assert_reset_restores_fresh_behaviour,
    assert_state_dict_round_trip,
    assert_state_differs_from_fresh,
)


def _reference(
    matrices: list[list[list[float]]], losses: list[list[float]], beta: float, sigma: float
) -> list[list[float]]:
    """DB-MTL written out with Python floats, call by call."""
    smoothed: list[list[float]] = []
    outputs = []
    for k, (matrix, values) in enumerate(zip(matrices, losses), start=1):
        log_grads = [[x / value for x in row] for row, value in zip(matrix, values)]
        if k == 1:
            smoothed = log_grads
        else:
            rate = beta / k**sigma
            smoothed = [
                [rate * old + (1 - rate) * new for old, new in zip(old_row, new_row)]
                for old_row, new_row in zip(smoothed, log_grads)
            ]
        norms = [math.sqrt(sum(x * x for x in row)) for row in smoothed]
        largest = max(norms)
        scales = [largest / norm if norm > 0 else 0.0 for norm in norms]
        outputs.append([sum(s * row[j] for s, row in zip(scales, smoothed)) for j in range(2)])
    return outputs


def test_first_call_by_hand() -> None:
    # log-gradients [3, 0] / 3 = [1, 0] and [0, 4] / 2 = [0, 2]; scaled to the largest norm 2:
    # 2 * [1, 0] + 1 * [0, 2] = [2, 2].
    aggregator = DBMTL(eps=0.0)
    aggregator.update_losses(torch.tensor([3.0, 2.0]))
    torch.testing.assert_close(
        aggregator(torch.tensor([[3.0, 0.0], [0.0, 4.0]])), torch.tensor([2.0, 2.0])
    )


def test_second_call_by_hand() -> None:
    # Call 2: log-gradients [[0, 2], [2, 0]]; beta_2 = 0.9 / sqrt(2) = b; smoothed rows
    # [b, 2(1 - b)] and [2(1 - b), 2b]; both have the norm sqrt(b^2 + 4(1 - b)^2) times 1 and
    # sqrt(4(1 - b)^2 + 4b^2): the first is scaled by their ratio.
    aggregator = DBMTL(eps=0.0)
    aggregator.update_losses(torch.tensor([3.0, 2.0]))
    aggregator(torch.tensor([[3.0, 0.0], [0.0, 4.0]], dtype=torch.float64))
    aggregator.update_losses(torch.tensor([3.0, 1.0]))
    out = aggregator(torch.tensor([[0.0, 6.0], [2.0, 0.0]], dtype=torch.float64))
    b = 0.9 / math.sqrt(2)
    first = [b, 2 * (1 - b)]
    second = [2 * (1 - b), 2 * b]
    ratio = math.hypot(*second) / math.hypot(*first)
    expected = torch.tensor([ratio * first[0] + second[0], ratio * first[1] + second[1]])
    torch.testing.assert_close(out, expected.double())


def test_matches_the_written_out_definition_over_calls() -> None:
    generator = torch.Generator().manual_seed(0)
    matrices = [torch.randn(3, 2, generator=generator, dtype=torch.float64) for _ in range(5)]
    losses = [torch.rand(3, generator=generator, dtype=torch.float64) + 0.2 for _ in range(5)]
    expected = _reference(
        [m.tolist() for m in matrices], [v.tolist() for v in losses], beta=0.8, sigma=0.3
    )
    aggregator = DBMTL(beta=0.8, beta_sigma=0.3, eps=0.0)
    for matrix, values, wanted in zip(matrices, losses, expected):
        aggregator.update_losses(values)
        torch.testing.assert_close(aggregator(matrix), torch.tensor(wanted, dtype=torch.float64))


def test_every_smoothed_gradient_reaches_the_largest_norm() -> None:
    # Orthogonal rows: the output's component along each row is that row scaled to the largest
    # norm, so every component has the same length.
    aggregator = DBMTL()
    aggregator.update_losses(torch.tensor([1.0, 1.0, 1.0]))
    out = aggregator(torch.diag(torch.tensor([0.5, 3.0, 7.0])))
    torch.testing.assert_close(out, torch.full((3,), 7.0))


def test_invariant_to_the_scale_of_each_loss() -> None:
    # log(c L) has the gradient of log(L): scaling a loss (and so its gradient) changes nothing.
    generator = torch.Generator().manual_seed(1)
    scales = torch.tensor([1e-4, 1.0, 300.0], dtype=torch.float64)
    plain, scaled = DBMTL(eps=0.0), DBMTL(eps=0.0)
    for _ in range(4):
        matrix = torch.randn(3, 5, generator=generator, dtype=torch.float64)
        values = torch.rand(3, generator=generator, dtype=torch.float64) + 0.1
        plain.update_losses(values)
        scaled.update_losses(values * scales)
        torch.testing.assert_close(scaled(matrix * scales[:, None]), plain(matrix))


def test_permutation_of_the_tasks_over_calls() -> None:
    generator = torch.Generator().manual_seed(2)
    permutation = torch.tensor([1, 3, 0, 2])
    plain, permuted = DBMTL(), DBMTL()
    for _ in range(4):
        matrix = torch.randn(4, 5, generator=generator, dtype=torch.float64)
        values = torch.rand(4, generator=generator, dtype=torch.float64) + 0.1
        plain.update_losses(values)
        permuted.update_losses(values[permutation])
        torch.testing.assert_close(permuted(matrix[permutation]), plain(matrix))


def test_a_zero_row_contributes_nothing() -> None:
    aggregator = DBMTL()
    aggregator.update_losses(torch.tensor([1.0, 2.0]))
    out = aggregator(torch.tensor([[0.0, 0.0, 0.0], [2.0, 0.0, 0.0]]))
    torch.testing.assert_close(out, torch.tensor([1.0, 0.0, 0.0]))


def test_needs_the_losses_at_every_call() -> None:
    aggregator = DBMTL()
    matrix = torch.ones(2, 3)
    with pytest.raises(ValueError, match="update_losses"):
        aggregator(matrix)
    aggregator.update_losses(torch.ones(3))
    with pytest.raises(ValueError, match="3 loss values for 2 objectives"):
        aggregator(matrix)
    aggregator.update_losses(torch.ones(2))
    aggregator(matrix)
    with pytest.raises(ValueError, match="update_losses"):
        aggregator(matrix)


def test_is_a_matrix_aggregator() -> None:
    # Its state has the Jacobian's shape: it is not computed from the Gramian.
    assert not isinstance(DBMTL(), GramianWeightedAggregator)
    assert DBMTL.requires_losses


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"beta": 1.5}, "beta"), ({"beta_sigma": -1.0}, "beta_sigma"), ({"eps": -1e-9}, "eps")],
)
def test_rejects_bad_hyper_parameters(kwargs: dict[str, float], name: str) -> None:
    with pytest.raises(ValueError, match=f"`{name}`"):
        DBMTL(**kwargs)


def test_repr() -> None:
    assert repr(DBMTL()) == "DBMTL(beta=0.9, beta_sigma=0.5, eps=1e-08)"
    assert isinstance(DBMTL(), Stateful)


class _Fed(nn.Module):
    """DB-MTL fed with losses made from the matrix, to reuse the generic state checks."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = DBMTL()

    def forward(self, matrix: torch.Tensor) -> torch.Tensor:
        self.inner.update_losses(matrix.abs().sum(dim=1) + 1.0)
        return self.inner(matrix)

    def reset(self) -> None:
        self.inner.reset()


def test_state_checks() -> None:
    generator = torch.Generator().manual_seed(3)
    history = [torch.randn(3, 4, generator=generator) for _ in range(3)]
    probes = [torch.randn(3, 4, generator=generator) for _ in range(2)]
    assert_state_differs_from_fresh(_Fed, history, probes[0])
    assert_reset_restores_fresh_behaviour(_Fed, history, probes)
    assert_state_dict_round_trip(_Fed, history, probes)
    assert_outputs_do_not_alias_the_state(_Fed, history, probes[0])


def test_warns_and_restarts_when_the_shape_changes() -> None:
    aggregator = _Fed()
    aggregator(torch.ones(2, 3))
    with pytest.warns(UserWarning, match="re-initialises"):
        out = aggregator(torch.eye(3))
    torch.testing.assert_close(out, torch.full((3,), 0.5))  # rows e_i / 2, all of norm 1/2


def test_training_loop_with_jac_to_grad() -> None:
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(5, 16), nn.Tanh())
    heads = nn.ModuleList(nn.Linear(16, 1) for _ in range(2))
    x = torch.randn(64, 5)
    targets = [x[:, :1] * 0.1, 30.0 * x[:, 1:2].sin()]  # losses of very different scales
    optimizer = torch.optim.SGD([*trunk.parameters(), *heads.parameters()], lr=0.01)
    aggregator = DBMTL()

    def losses(features: torch.Tensor) -> list[torch.Tensor]:
        return [mse_loss(head(features), t) for head, t in zip(heads, targets)]

    with torch.no_grad():
        before = torch.stack(losses(trunk(x)))
    for _ in range(25):
        features = trunk(x)
        task_losses = losses(features)
        mtl_backward(task_losses, features=features)
        aggregator.update_losses(task_losses)
        jac_to_grad(trunk.parameters(), aggregator)
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        after = torch.stack(losses(trunk(x)))
    assert (after < before).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_same_outputs_and_state_on_cuda() -> None:
    on_cpu, on_cuda = DBMTL(), DBMTL()
    generator = torch.Generator().manual_seed(7)
    for _ in range(3):
        matrix = torch.randn(3, 4, generator=generator, dtype=torch.float64)
        losses = torch.rand(3, generator=generator, dtype=torch.float64) + 0.1
        on_cpu.update_losses(losses)
        on_cuda.update_losses(losses)  # moved to the matrix's device at the call
        out = on_cuda(matrix.cuda())
        assert out.device.type == "cuda"
        torch.testing.assert_close(out.cpu(), on_cpu(matrix))
    assert on_cuda.state_dict()["_gradients"].device.type == "cuda"


def test_half_precision_matches_float32() -> None:
    matrix = torch.tensor([[300.0, 300.0, 0.0], [1.0, 0.0, 2.0]])
    half, full = DBMTL(), DBMTL()
    for scale in (1.0, 0.5):
        half.update_losses(torch.tensor([2.0, 0.1]))
        full.update_losses(torch.tensor([2.0, 0.1]))
        out = half((scale * matrix).half())
        expected = full(scale * matrix)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), expected, rtol=1e-2, atol=1e-2)
