import math

import pytest
import torch
from torch.testing import assert_close

from torchjd.scalarization import FAMO

EPS = 1e-8
L = torch.tensor([1.0, 2.0, 4.0])


def _t(*values: float) -> torch.Tensor:
    return torch.tensor(values)


def _famo_value(z: list[float], values: list[float], b: list[float] | None = None) -> float:
    b = b or [0.0] * len(values)
    u = [v - bb + EPS for v, bb in zip(values, b)]
    c = 1.0 / sum(zz / uu for zz, uu in zip(z, u))
    return c * sum(zz * math.log(uu) for zz, uu in zip(z, u))


def _softmax(w: list[float]) -> list[float]:
    e = [math.exp(x) for x in w]
    return [x / sum(e) for x in e]


class _HandAdam:
    """Adam with L2 weight decay, written from its definition (Kingma and Ba, 2015)."""

    def __init__(self, n: int, lr: float, weight_decay: float) -> None:
        self.lr, self.wd = lr, weight_decay
        self.m, self.v, self.t = [0.0] * n, [0.0] * n, 0

    def step(self, w: list[float], g: list[float]) -> list[float]:
        self.t += 1
        out = []
        for i, (wi, gi) in enumerate(zip(w, g)):
            gi = gi + self.wd * wi
            self.m[i] = 0.9 * self.m[i] + 0.1 * gi
            self.v[i] = 0.999 * self.v[i] + 0.001 * gi * gi
            m_hat = self.m[i] / (1 - 0.9**self.t)
            v_hat = self.v[i] / (1 - 0.999**self.t)
            out.append(wi - self.lr * m_hat / (math.sqrt(v_hat) + 1e-8))
        return out


def _famo_grad(w: list[float], before: list[float], after: list[float]) -> list[float]:
    z = _softmax(w)
    delta = [math.log(p + EPS) - math.log(a + EPS) for p, a in zip(before, after)]
    mean = sum(zz * d for zz, d in zip(z, delta))
    return [zz * (d - mean) for zz, d in zip(z, delta)]


def test_worked_values() -> None:
    assert_close(FAMO(3)(L), torch.tensor(1.1883), rtol=0.0, atol=1e-4)
    assert_close(
        FAMO(3, min_losses=torch.full((3,), 0.5))(L), torch.tensor(0.3269), atol=1e-4, rtol=0
    )
    assert math.isclose(
        float(FAMO(3)(L.double())), _famo_value([1 / 3] * 3, [1, 2, 4]), rel_tol=1e-9
    )


def test_value_and_gradient_with_uniform_logits() -> None:
    values = _t(1.0, 2.0).requires_grad_()
    famo = FAMO(2)
    out = famo(values)
    assert_close(out, torch.tensor(_famo_value([0.5, 0.5], [1.0, 2.0])))
    assert_close(out, torch.tensor(0.4621), rtol=0.0, atol=1e-4)
    out.backward()
    # c z / (v + eps) with c = 1 / (0.5 + 0.25)
    assert_close(values.grad, torch.tensor([2 / 3, 1 / 3]))
    assert famo._w.grad is None


def test_min_losses_shift_the_values() -> None:
    famo = FAMO(2, min_losses=torch.ones(2))
    assert_close(famo(_t(2.0, 3.0)), torch.tensor(_famo_value([0.5, 0.5], [1.0, 2.0])))


def test_sequence_of_forward_and_update() -> None:
    famo = FAMO(2)
    adam = _HandAdam(2, lr=0.025, weight_decay=1e-3)
    w = [0.0, 0.0]

    famo(_t(1.0, 2.0))
    famo.update(_t(0.5, 1.5))
    w = adam.step(w, _famo_grad(w, [1.0, 2.0], [0.5, 1.5]))
    assert_close(famo._w.detach(), torch.tensor([-0.025, 0.025]), rtol=0.0, atol=1e-6)
    assert_close(famo._w.detach(), torch.tensor(w))
    assert famo._w.grad is None

    out = famo(_t(0.5, 1.5))
    assert_close(out, torch.tensor(-0.0988), rtol=0.0, atol=1e-4)
    assert_close(out, torch.tensor(_famo_value(_softmax(w), [0.5, 1.5])))

    famo.update(_t(0.4, 1.4))
    w = adam.step(w, _famo_grad(w, [0.5, 1.5], [0.4, 1.4]))
    assert_close(famo._w.detach(), torch.tensor([-0.047266, 0.047266]), rtol=0.0, atol=1e-6)
    assert_close(famo._w.detach(), torch.tensor(w))


def test_the_loss_that_decreased_more_loses_weight() -> None:
    famo = FAMO(3, lr=0.1, weight_decay=0.0)
    for _ in range(5):
        famo(_t(1.0, 1.0, 1.0))
        famo.update(_t(0.5, 0.9, 0.99))
    z = torch.softmax(famo._w.detach(), dim=0)
    assert z[0] < z[1] < z[2]


def test_no_change_means_no_move() -> None:
    famo = FAMO(2)
    famo(_t(5.0, 5.0))
    famo(_t(1.0, 4.0))
    famo.update(_t(1.0, 4.0))
    assert torch.equal(famo._w.detach(), torch.zeros(2))


def test_update_before_forward() -> None:
    with pytest.raises(ValueError, match="forward"):
        FAMO(2).update(_t(1.0, 2.0))


def test_wrong_shapes() -> None:
    famo = FAMO(2)
    with pytest.raises(ValueError, match="shape"):
        famo(_t(1.0, 2.0, 3.0))
    famo(_t(1.0, 2.0))
    with pytest.raises(ValueError, match="shape"):
        famo.update(_t(1.0, 2.0, 3.0))


def test_values_below_min_losses_are_rejected() -> None:
    with pytest.raises(ValueError, match="`values` must be at least `min_losses`"):
        FAMO(2)(_t(-1.0, 2.0))
    famo = FAMO(2, min_losses=torch.ones(2))
    with pytest.raises(ValueError, match="min_losses"):
        famo(_t(0.5, 2.0))
    famo(_t(1.5, 2.0))
    with pytest.raises(ValueError, match="min_losses"):
        famo.update(_t(0.5, 2.0))
    # A value equal to its bound is accepted: log(eps) is finite.
    assert torch.isfinite(famo(_t(1.0, 2.0)))


def test_shape_argument() -> None:
    assert FAMO(3)._w.shape == (3,)
    assert FAMO((3,))._w.shape == (3,)
    assert FAMO((2, 3))._w.shape == (2, 3)
    assert torch.equal(FAMO(2).min_losses, torch.zeros(2))
    with pytest.raises(ValueError, match="`shape`"):
        FAMO(0)


def test_constructor_validation() -> None:
    with pytest.raises(ValueError, match="`min_losses`"):
        FAMO(2, min_losses=torch.zeros(3))
    with pytest.raises(ValueError, match="`lr`"):
        FAMO(2, lr=-1.0)
    with pytest.raises(ValueError, match="`weight_decay`"):
        FAMO(2, weight_decay=-1.0)
    with pytest.raises(ValueError, match="`min_losses` must be finite"):
        FAMO(2, min_losses=_t(0.0, float("nan")))


def test_parameters_and_buffers() -> None:
    famo = FAMO(2, min_losses=_t(0.1, 0.2))
    assert [name for name, _ in famo.named_parameters()] == ["_w"]
    assert [name for name, _ in famo.named_buffers()] == ["min_losses"]
    assert_close(famo.state_dict()["min_losses"], _t(0.1, 0.2))


def test_min_losses_is_copied() -> None:
    bounds = _t(0.1, 0.2)
    famo = FAMO(2, min_losses=bounds)
    bounds[0] = 5.0
    assert_close(famo.min_losses, _t(0.1, 0.2))


def test_reset() -> None:
    famo = FAMO(2)
    w = famo._w
    famo(_t(1.0, 2.0))
    famo.update(_t(0.5, 1.5))
    famo.reset()
    assert famo._w is w
    assert torch.equal(famo._w.detach(), torch.zeros(2))
    assert famo._optimizer is None
    assert famo._prev_losses is None
    with pytest.raises(ValueError, match="forward"):
        famo.update(_t(1.0, 2.0))


def test_optimizer_uses_lr_and_weight_decay_of_the_first_update() -> None:
    famo = FAMO(2, lr=0.5)
    famo(_t(1.0, 2.0))
    famo.update(_t(0.5, 1.5))
    # Adam's first step moves each logit by lr against the sign of its gradient.
    assert_close(famo._w.detach(), torch.tensor([-0.5, 0.5]), rtol=0.0, atol=1e-6)


def test_repr_str() -> None:
    assert repr(FAMO(3)) == "FAMO(shape=(3,), lr=0.025, weight_decay=0.001)"
    assert repr(FAMO((2, 3))) == "FAMO(shape=(2, 3), lr=0.025, weight_decay=0.001)"
    assert str(FAMO(3)) == "FAMO"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_zeros_are_finite(dtype: torch.dtype) -> None:
    # u = 1e-8 (which underflows in float16): c = 1e-8 and the result is 1e-8 * log(1e-8).
    values = torch.zeros(3, dtype=dtype, requires_grad=True)
    out = FAMO(3)(values)
    assert out.dtype == dtype
    assert_close(out.double(), torch.tensor(EPS * math.log(EPS), dtype=torch.float64))
    out.backward()
    assert values.grad is not None and torch.isfinite(values.grad).all()


def test_equal_log_decreases_do_not_move_the_logits() -> None:
    # Every log-loss falls by the same delta: g_k = z_k (delta - delta * sum(z)) = 0 exactly, so
    # Adam (without weight decay) leaves the logits where they are. A softmax that sums to 1 only
    # up to rounding gives a g of about 1e-8 that Adam would rescale into a step of about lr.
    famo = FAMO(3, weight_decay=0.0)
    logits = torch.tensor([0.3, -1.1, 0.7])
    with torch.no_grad():
        famo._w.copy_(logits)
    before = torch.tensor([1e6, 2e6, 3e6], dtype=torch.float64)
    famo(before)
    famo.update(before / 2)
    assert_close(famo._w.detach(), logits, rtol=0, atol=1e-6)
