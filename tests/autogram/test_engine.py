"""Construction, protocol and errors of the autogram Engine."""

import copy
import gc

import pytest
import torch
from torch import Tensor, nn

from torchjd.aggregation import MeanWeighting
from torchjd.autogram import Engine

from ._utils import assert_gramian_close, autograd_gramian, autograd_jacobian, mlp, trainable

PROTOCOL_ERRORS = (RuntimeError, ValueError)


def _data(batch: int = 6) -> tuple[Tensor, Tensor]:
    torch.manual_seed(0)
    return torch.randn(batch, 5), torch.randn(batch, 3)


def _losses(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return (model(x) - y).pow(2).mean(dim=1)


# ------------------------------------------------------------------------------------------------
# Construction


def test_batch_dim_is_required_and_keyword_only() -> None:
    model = mlp()
    with pytest.raises(TypeError):
        Engine(model)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        Engine(model, 0)  # type: ignore[arg-type]
    assert Engine(model, batch_dim=0).batch_dim == 0
    assert Engine(model, batch_dim=None).batch_dim is None


def test_invalid_arguments() -> None:
    with pytest.raises(TypeError, match="batch_dim"):
        Engine(mlp(), batch_dim=1.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="batch_dim"):
        Engine(mlp(), batch_dim=True)
    with pytest.raises(TypeError, match="modules"):
        Engine(torch.randn(2), batch_dim=0)  # type: ignore[arg-type]


def test_no_module_is_accepted_but_cannot_compute() -> None:
    engine = Engine(batch_dim=0)
    with pytest.raises(PROTOCOL_ERRORS):
        engine.compute_gramian(mlp()(torch.randn(2, 5)).sum(dim=1))


@pytest.mark.parametrize(
    "module",
    [
        nn.BatchNorm1d(3),
        nn.BatchNorm2d(3, affine=True, track_running_stats=False),
        nn.SyncBatchNorm(3),
        nn.LazyBatchNorm2d(),
        nn.InstanceNorm2d(3, affine=True, track_running_stats=True),
        nn.RNN(3, 4),
        nn.LSTM(3, 4, batch_first=True),
        nn.GRU(3, 4),
        nn.MultiheadAttention(4, 2),
        nn.TransformerEncoderLayer(4, 2, dropout=0.0),
    ],
    ids=lambda m: type(m).__name__,
)
def test_incompatible_modules_are_rejected_with_a_batch_dim(module: nn.Module) -> None:
    model = nn.Sequential(nn.Linear(3, 3), module)
    with pytest.raises(ValueError, match="batch_dim") as info:
        Engine(model, batch_dim=0)
    assert "use `batch_dim=none`" in str(info.value).lower()  # says what to do
    Engine(model, batch_dim=None)  # accepted without batch


def test_incompatible_module_inside_a_unit_is_rejected() -> None:
    class Unit(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(3))
            self.norm = nn.BatchNorm1d(3)

        def forward(self, x: Tensor) -> Tensor:
            return self.norm(x) * self.scale

    with pytest.raises(ValueError, match="BatchNorm1d"):
        Engine(Unit(), batch_dim=0)


def test_compatible_norms_are_accepted() -> None:
    for module in (
        nn.InstanceNorm2d(3, affine=True, track_running_stats=False),
        nn.GroupNorm(1, 3),
        nn.LayerNorm(3),
        nn.BatchNorm1d(3, affine=False),  # no trainable parameter: not hooked, not checked
        nn.MultiheadAttention(4, 2, batch_first=True),
    ):
        Engine(module, batch_dim=0)


def test_frozen_batch_norm_is_not_hooked() -> None:
    norm = nn.BatchNorm1d(3).requires_grad_(False)
    lin = nn.Linear(3, 1)
    model = nn.Sequential(norm, lin)
    engine = Engine(model, batch_dim=0)  # norm has no trainable parameter: not rejected
    model.eval()
    x = torch.randn(4, 3)
    out = model(x).squeeze(1)
    assert_gramian_close(engine.compute_gramian(out), autograd_gramian(out, trainable(lin)))


def test_nested_or_repeated_modules_are_rejected() -> None:
    model = mlp()
    with pytest.raises(ValueError, match="nested"):
        Engine(model, model[0], batch_dim=0)
    with pytest.raises(ValueError, match="nested"):
        Engine(model[0], model[0], batch_dim=0)

    class Parent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.ones(2))
            self.child = nn.Linear(2, 2)

    parent = Parent()
    with pytest.raises(ValueError, match="nested"):
        Engine(parent, parent.child, batch_dim=0)


def test_hooks_are_removed_when_the_engine_is_collected() -> None:
    model = mlp()
    engine = Engine(model, batch_dim=0)
    assert all(len(model[i]._forward_hooks) == 1 for i in (0, 2, 4))
    del engine
    gc.collect()
    assert all(len(m._forward_hooks) == 0 for m in model.modules())


def test_plain_backward_is_unchanged_by_the_hooks() -> None:
    x, y = _data()
    model = mlp()
    twin = copy.deepcopy(model)
    engine = Engine(model, batch_dim=0)
    _losses(model, x, y).mean().backward()
    _losses(twin, x, y).mean().backward()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p.grad, q.grad)
    assert engine is not None


# ------------------------------------------------------------------------------------------------
# compute_gramian: results


def test_hand_checks() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(3, 1)
    x = torch.randn(4, 3)
    engine = Engine(lin, batch_dim=0)
    gramian = engine.compute_gramian(lin(x).squeeze(1))
    torch.testing.assert_close(gramian, x @ x.T + 1)

    lin = nn.Linear(18, 25)
    x = torch.randn(18)
    engine = Engine(lin, batch_dim=None)
    gramian = engine.compute_gramian(lin(x))
    torch.testing.assert_close(gramian, (x @ x + 1) * torch.eye(25))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_properties_of_the_result(dtype: torch.dtype) -> None:
    x, y = _data()
    model = mlp().to(dtype)
    engine = Engine(model, batch_dim=0)
    gramian = engine.compute_gramian(_losses(model, x.to(dtype), y.to(dtype)))
    assert gramian.shape == (6, 6)
    assert gramian.dtype == dtype
    assert not gramian.requires_grad and gramian.grad_fn is None
    torch.testing.assert_close(gramian, gramian.T)
    assert torch.linalg.eigvalsh(gramian).min() >= -1e-5 * gramian.abs().max()
    assert all(p.grad is None for p in model.parameters())


def test_weighted_backward_after_compute_gramian() -> None:
    """The graph is kept: backward(w) gives J^T w in .grad."""
    x, y = _data()
    model = mlp().double()
    engine = Engine(model, batch_dim=0)
    losses = _losses(model, x.double(), y.double())
    gramian = engine.compute_gramian(losses)
    weights = MeanWeighting()(gramian) + torch.linspace(0, 1, 6, dtype=torch.float64)
    expected = autograd_jacobian(losses, trainable(model)).T @ weights
    losses.backward(weights)
    actual = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(actual, expected)


def test_loss_matrix_weighted_backward() -> None:
    x, y = _data()
    model = mlp().double()
    engine = Engine(model, batch_dim=0)
    losses = (model(x.double()) - y.double()).pow(2)  # [6, 3]
    gramian = engine.compute_gramian(losses)
    assert gramian.shape == (18, 18)
    assert_gramian_close(gramian, autograd_gramian(losses, trainable(model)))
    weights = torch.rand(18, dtype=torch.float64)
    expected = autograd_jacobian(losses, trainable(model)).T @ weights
    losses.backward(weights.reshape(losses.shape))
    torch.testing.assert_close(
        torch.cat([p.grad.reshape(-1) for p in model.parameters()]), expected
    )


def test_several_steps() -> None:
    x, y = _data()
    model = mlp()
    engine = Engine(model, batch_dim=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        losses = _losses(model, x, y)
        gramian = engine.compute_gramian(losses)
        assert_gramian_close(gramian, autograd_gramian(losses, trainable(model)))
        losses.backward(MeanWeighting()(gramian))
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():  # evaluation forwards are not recorded
            model(x)


# ------------------------------------------------------------------------------------------------
# compute_gramian: protocol errors


def test_second_call_on_the_same_forward_fails_then_a_new_forward_works() -> None:
    x, y = _data()
    model = mlp()
    engine = Engine(model, batch_dim=0)
    losses = _losses(model, x, y)
    engine.compute_gramian(losses)
    with pytest.raises(PROTOCOL_ERRORS):
        engine.compute_gramian(losses)
    engine.compute_gramian(_losses(model, x, y))


def test_forward_before_the_engine_existed() -> None:
    x, y = _data()
    model = mlp()
    losses = _losses(model, x, y)
    engine = Engine(model, batch_dim=0)
    with pytest.raises(PROTOCOL_ERRORS):
        engine.compute_gramian(losses)


def test_output_independent_of_the_hooked_modules() -> None:
    x, y = _data()
    model, other = mlp(), mlp()
    engine = Engine(model, batch_dim=0)
    model(x)
    with pytest.raises(PROTOCOL_ERRORS):
        engine.compute_gramian(_losses(other, x, y))


def test_detached_output() -> None:
    x, y = _data()
    model = mlp()
    engine = Engine(model, batch_dim=0)
    with pytest.raises(PROTOCOL_ERRORS):
        engine.compute_gramian(_losses(model, x, y).detach())


def test_parameters_read_without_calling_the_module() -> None:
    lin = nn.Linear(3, 2)
    engine = Engine(lin, batch_dim=0)
    out = (torch.randn(4, 3) @ lin.weight.T).sum(dim=1)
    with pytest.raises(PROTOCOL_ERRORS):
        engine.compute_gramian(out)


def test_extra_grad_enabled_forward_raises_then_next_call_works() -> None:
    x, y = _data()
    model = mlp()
    engine = Engine(model, batch_dim=0)
    model(x)  # e.g. an evaluation forward without no_grad
    losses = _losses(model, x, y)
    with pytest.raises(ValueError, match=r"torch\.no_grad"):
        engine.compute_gramian(losses)
    losses = _losses(model, x, y)
    assert_gramian_close(engine.compute_gramian(losses), autograd_gramian(losses, trainable(model)))


def test_plain_training_step_in_between_raises_then_next_call_works() -> None:
    x, y = _data()
    model = mlp()
    engine = Engine(model, batch_dim=0)
    engine.compute_gramian(_losses(model, x, y))
    _losses(model, x, y).mean().backward()
    with pytest.raises(ValueError):
        engine.compute_gramian(_losses(model, x, y))
    engine.compute_gramian(_losses(model, x, y))


def test_module_whose_only_call_is_unused_contributes_nothing() -> None:
    torch.manual_seed(0)
    used, unused = nn.Linear(3, 1), nn.Linear(3, 1)
    engine = Engine(used, unused, batch_dim=0)
    x = torch.randn(4, 3)
    unused(x)
    out = used(x).squeeze(1)
    assert_gramian_close(engine.compute_gramian(out), autograd_gramian(out, trainable(used)))


def test_output_shape_errors() -> None:
    x, y = _data()
    model = mlp()
    engine = Engine(model, batch_dim=0)
    with pytest.raises(ValueError, match="batch"):
        engine.compute_gramian(_losses(model, x, y).sum())
    engine = Engine(model, batch_dim=2)
    with pytest.raises(IndexError, match="batch_dim"):
        engine.compute_gramian(model(x))
    with pytest.raises(TypeError, match="output"):
        engine.compute_gramian([model(x)])  # type: ignore[arg-type]


def test_state_is_reset_after_an_error() -> None:
    x, y = _data()
    model = mlp()
    engine = Engine(model, batch_dim=0)
    with pytest.raises(ValueError):
        engine.compute_gramian(_losses(model, x, y).sum())
    losses = _losses(model, x, y)
    assert_gramian_close(engine.compute_gramian(losses), autograd_gramian(losses, trainable(model)))


def test_wrong_batch_size_inside_the_model() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(3, 2)
    engine = Engine(lin, batch_dim=0)
    out = lin(torch.randn(8, 3)).reshape(4, 4).sum(dim=1)  # the layer saw 8 rows, output has 4
    with pytest.raises(ValueError, match="batched on dim 0"):
        engine.compute_gramian(out)


def test_input_modified_in_place_after_the_call() -> None:
    class AddInPlace(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return x.add_(1)

    lin = nn.Linear(3, 3)
    engine = Engine(lin, batch_dim=0)
    h = torch.randn(4, 3).exp()
    out = lin(h)
    AddInPlace()(h)  # the engine still needs the value h had when lin was called
    with pytest.raises(RuntimeError, match="in place"):
        engine.compute_gramian(out.sum(dim=1))


def test_no_grad_forwards_are_ignored() -> None:
    x, y = _data()
    model = mlp()
    engine = Engine(model, batch_dim=0)
    with torch.no_grad():
        model(x)
    losses = _losses(model, x, y)
    assert_gramian_close(engine.compute_gramian(losses), autograd_gramian(losses, trainable(model)))


def test_activation_checkpointing_recomputations_are_not_recorded() -> None:
    from torch.utils.checkpoint import checkpoint

    x, y = _data()
    model = mlp()
    engine = Engine(model, batch_dim=0)
    for _ in range(2):
        losses = (checkpoint(model, x, use_reentrant=False) - y).pow(2).mean(dim=1)
        gramian = engine.compute_gramian(losses)
        assert_gramian_close(gramian, autograd_gramian(losses, trainable(model)))
        losses.backward(MeanWeighting()(gramian))


def test_partial_hooking_with_a_frozen_parameter_as_constant() -> None:
    torch.manual_seed(0)
    model = mlp()
    model[2].bias.requires_grad_(False)
    engine = Engine(model[2:], batch_dim=0)
    out = model(torch.randn(5, 5)).sum(dim=1)
    params = trainable(model[2:])
    assert len(params) == 3
    assert_gramian_close(engine.compute_gramian(out), autograd_gramian(out, params))


def test_randomness_inside_a_hooked_module_is_reported() -> None:
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(4, 2, dropout=0.5, batch_first=True)
    engine = Engine(attention, batch_dim=0)
    x = torch.randn(3, 5, 4)
    out = attention(x, x, x, need_weights=False)[0].sum(dim=(1, 2))
    with pytest.raises(RuntimeError, match="deterministically"):
        engine.compute_gramian(out)
