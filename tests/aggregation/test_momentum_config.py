import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.nn.functional import mse_loss

from torchjd import Stateful
from torchjd.aggregation import ConFIG, MConFIGBackward, MomentumConFIG

from ._matrices import J_A, J_B, J_B2
from ._state_checks import (
    assert_outputs_do_not_alias_the_state,
    assert_reset_restores_fresh_behaviour,
    assert_state_dict_round_trip,
    assert_state_differs_from_fresh,
)


def _config_reference(rows: np.ndarray) -> np.ndarray:
    """ConFIG's Equation 2 with numpy's pseudo-inverse: u = unit(pinv(unit rows) 1), result
    (sum_i g_i . u) u."""
    units = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    direction = np.linalg.pinv(units) @ np.ones(rows.shape[0])
    u = direction / np.linalg.norm(direction)
    return (rows @ u).sum() * u


def test_first_call_is_config() -> None:
    torch.testing.assert_close(MomentumConFIG()(J_A), ConFIG()(J_A))
    expected = _config_reference(J_B.double().numpy())
    torch.testing.assert_close(MomentumConFIG(beta=0.5)(J_B.double()), torch.from_numpy(expected))


def test_two_calls_by_hand() -> None:
    # beta = 0.5: m = 0.5 J1 after call 1, m = 0.25 J1 + 0.5 J2 after call 2, bias-corrected by
    # 1 - 0.25: m_hat = (J1 + 2 J2) / 3.
    aggregator = MomentumConFIG(beta=0.5)
    first, second = J_B.double(), J_B2.double()
    aggregator(first)
    expected = _config_reference(((first + 2 * second) / 3).numpy())
    torch.testing.assert_close(aggregator(second), torch.from_numpy(expected))


def test_beta_zero_is_config_of_the_current_matrix() -> None:
    aggregator = MomentumConFIG(beta=0.0)
    for matrix in (J_B, J_B2, 3 * J_B, -J_B2):
        torch.testing.assert_close(aggregator(matrix), ConFIG()(matrix))


def test_positively_homogeneous() -> None:
    # Scaling every Jacobian by c > 0 scales the momenta and the result by c.
    plain, scaled = MomentumConFIG(), MomentumConFIG()
    for matrix in (J_B.double(), J_B2.double(), -J_B.double()):
        torch.testing.assert_close(scaled(7.5 * matrix), 7.5 * plain(matrix))


def test_conflicts_with_no_momentum() -> None:
    # ConFIG of independent rows is non-conflicting with them: here, with the momenta.
    aggregator = MomentumConFIG(beta=0.5)
    aggregator(J_B.double())
    out = aggregator(J_B2.double())
    momenta = (J_B.double() + 2 * J_B2.double()) / 3
    assert (momenta @ out > 0).all()


def test_rejects_bad_beta() -> None:
    for beta in (-0.1, 1.0):
        with pytest.raises(ValueError, match="`beta`"):
            MomentumConFIG(beta=beta)
    assert repr(MomentumConFIG()) == "MomentumConFIG(beta=0.9)"


def test_state_checks() -> None:
    generator = torch.Generator().manual_seed(3)
    history = [torch.randn(3, 4, generator=generator) for _ in range(3)]
    probes = [torch.randn(3, 4, generator=generator) for _ in range(2)]
    assert_state_differs_from_fresh(MomentumConFIG, history, probes[0])
    assert_reset_restores_fresh_behaviour(MomentumConFIG, history, probes)
    assert_state_dict_round_trip(MomentumConFIG, history, probes)
    assert_outputs_do_not_alias_the_state(MomentumConFIG, history, probes[0])


# --- The training step: one loss back-propagated per call -----------------------------------


class _Problem:
    """Two losses of a linear model, each passing through its own identity node whose hook counts
    the backward passes through that loss."""

    def __init__(self, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.model = nn.Linear(3, 2)
        self.x = torch.randn(5, 3)
        self.targets = torch.randn(5, 2)
        self.passes = [0, 0]

    def losses(self, shift: float = 0.0) -> list[Tensor]:
        out = self.model(self.x + shift)
        losses = []
        for i in range(2):
            tapped = out[:, i] * 1.0
            tapped.register_hook(self._counter(i))
            losses.append(mse_loss(tapped, self.targets[:, i]))
        return losses

    def _counter(self, i: int):
        def hook(grad: Tensor) -> None:
            self.passes[i] += 1

        return hook

    def gradient(self, loss_index: int, shift: float) -> np.ndarray:
        loss = self.losses(shift)[loss_index]
        grads = torch.autograd.grad(loss, list(self.model.parameters()))
        return torch.cat([g.reshape(-1) for g in grads]).double().numpy()

    def grad(self) -> np.ndarray:
        return (
            torch.cat([p.grad.reshape(-1) for p in self.model.parameters()]).double().cpu().numpy()
        )


def test_first_call_back_propagates_every_loss_and_writes_config() -> None:
    problem = _Problem()
    step = MConFIGBackward(problem.model.parameters(), beta=0.9)
    rows = np.stack([problem.gradient(0, 0.0), problem.gradient(1, 0.0)])
    problem.passes = [0, 0]
    assert step.backward(problem.losses()) == -1
    assert problem.passes == [1, 1]
    np.testing.assert_allclose(problem.grad(), _config_reference(rows), rtol=1e-5, atol=1e-6)


def test_later_calls_back_propagate_one_loss_in_turn() -> None:
    beta = 0.8
    problem = _Problem()
    step = MConFIGBackward(problem.model.parameters(), beta=beta)
    g0_1, g1_1 = problem.gradient(0, 0.0), problem.gradient(1, 0.0)
    g0_2 = problem.gradient(0, 0.5)
    g1_3 = problem.gradient(1, -0.3)
    step.backward(problem.losses())
    problem.passes = [0, 0]
    for p in problem.model.parameters():
        p.grad = None

    # Call 2: loss 0 only. m_0 = beta (1 - beta) g0_1 + (1 - beta) g0_2, corrected by 1 - beta^2;
    # m_1 = (1 - beta) g1_1, corrected by 1 - beta: g1_1.
    assert step.backward(problem.losses(0.5)) == 0
    assert problem.passes == [1, 0]
    m0 = (beta * (1 - beta) * g0_1 + (1 - beta) * g0_2) / (1 - beta**2)
    np.testing.assert_allclose(
        problem.grad(), _config_reference(np.stack([m0, g1_1])), rtol=1e-5, atol=1e-6
    )
    for p in problem.model.parameters():
        p.grad = None

    # Call 3: loss 1 only. m_1 = beta (1 - beta) g1_1 + (1 - beta) g1_3, corrected by 1 - beta^2.
    assert step.backward(problem.losses(-0.3)) == 1
    assert problem.passes == [1, 1]
    m1 = (beta * (1 - beta) * g1_1 + (1 - beta) * g1_3) / (1 - beta**2)
    np.testing.assert_allclose(
        problem.grad(), _config_reference(np.stack([m0, m1])), rtol=1e-5, atol=1e-6
    )
    assert step.backward(problem.losses()) == 0


def test_the_gramian_updated_row_by_row_is_that_of_the_momenta() -> None:
    problem = _Problem()
    step = MConFIGBackward(problem.model.parameters())
    for shift in (0.0, 0.1, -0.4, 0.7, 0.2):
        step.backward(problem.losses(shift))
    momenta = step.aggregator._momenta
    torch.testing.assert_close(step.aggregator._gramian, momenta @ momenta.T)


def test_accumulates_into_existing_grad() -> None:
    problem, twin = _Problem(), _Problem()
    step, twin_step = (
        MConFIGBackward(problem.model.parameters()),
        MConFIGBackward(twin.model.parameters()),
    )
    for p in problem.model.parameters():
        p.grad = torch.ones_like(p)
    step.backward(problem.losses())
    twin_step.backward(twin.losses())
    np.testing.assert_allclose(problem.grad(), twin.grad() + 1.0, rtol=1e-6)


def test_state_dict_loads_into_a_fresh_instance_and_continues_identically() -> None:
    problem, twin = _Problem(), _Problem()
    step = MConFIGBackward(problem.model.parameters())
    for shift in (0.0, 0.3, -0.2):
        step.backward(problem.losses(shift))
    restored = MConFIGBackward(twin.model.parameters())
    restored.load_state_dict(step.state_dict())
    for shift in (0.5, -0.1, 0.9):
        for p in [*problem.model.parameters(), *twin.model.parameters()]:
            p.grad = None
        assert restored.backward(twin.losses(shift)) == step.backward(problem.losses(shift))
        np.testing.assert_array_equal(twin.grad(), problem.grad())


def test_reset_back_propagates_every_loss_again() -> None:
    problem = _Problem()
    step = MConFIGBackward(problem.model.parameters())
    step.backward(problem.losses())
    step.backward(problem.losses())
    step.reset()
    problem.passes = [0, 0]
    assert step.backward(problem.losses()) == -1
    assert problem.passes == [1, 1]
    assert isinstance(step, Stateful)


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="`params`"):
        MConFIGBackward([])
    with pytest.raises(ValueError, match="`params`"):
        MConFIGBackward([torch.ones(2)])
    with pytest.raises(ValueError, match="`params`"):
        MConFIGBackward(
            [torch.ones(2, requires_grad=True), torch.ones(2, requires_grad=True).double()]
        )
    with pytest.raises(ValueError, match="`beta`"):
        MConFIGBackward([torch.ones(2, requires_grad=True)], beta=1.0)
    step = MConFIGBackward([torch.ones(2, requires_grad=True)])
    with pytest.raises(ValueError, match="`losses`"):
        step.backward([])
    with pytest.raises(ValueError, match="`losses`"):
        step.backward([torch.ones(2, requires_grad=True)])


def test_training_loop_decreases_every_loss() -> None:
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(5, 16), nn.Tanh())
    heads = nn.ModuleList(nn.Linear(16, 1) for _ in range(3))
    x = torch.randn(64, 5)
    targets = [x[:, :1], x[:, 1:2].sin(), x[:, 2:3] * x[:, 3:4]]
    params = [*trunk.parameters(), *heads.parameters()]
    optimizer = torch.optim.SGD(params, lr=0.05)
    step = MConFIGBackward(params)

    def losses() -> list[Tensor]:
        features = trunk(x)
        return [mse_loss(head(features), t) for head, t in zip(heads, targets)]

    with torch.no_grad():
        before = torch.stack(losses())
    for _ in range(30):
        step.backward(losses())
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        after = torch.stack(losses())
    assert (after < before).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_training_step_on_cuda_matches_the_cpu() -> None:
    on_cpu, on_cuda = _Problem(), _Problem()
    on_cuda.model.cuda()
    on_cuda.x, on_cuda.targets = on_cuda.x.cuda(), on_cuda.targets.cuda()
    step_cpu = MConFIGBackward(on_cpu.model.parameters())
    step_cuda = MConFIGBackward(on_cuda.model.parameters())
    for shift in (0.0, 0.2, -0.1):
        for p in [*on_cpu.model.parameters(), *on_cuda.model.parameters()]:
            p.grad = None
        assert step_cuda.backward(on_cuda.losses(shift)) == step_cpu.backward(on_cpu.losses(shift))
        np.testing.assert_allclose(on_cuda.grad(), on_cpu.grad(), rtol=1e-4, atol=1e-5)
    assert step_cuda.aggregator._momenta.device.type == "cuda"


def test_half_precision_gramian_in_float32() -> None:
    matrix = 300.0 * J_B
    half, full = MomentumConFIG(), MomentumConFIG()
    for scale in (1.0, -0.5):
        out = half((scale * matrix).half())
        expected = full(scale * matrix)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), expected, rtol=1e-2, atol=1e-1)
    assert half._gramian.dtype == torch.float32
