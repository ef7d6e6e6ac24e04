"""The Gramian of the engine equals J J^T with J built row by row with torch.autograd."""

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

import torchjd.autogram._layer_gramians as layer_gramians
from torchjd.autogram import Engine

from ._utils import (
    Branched,
    TransformerBlockModel,
    assert_gramian_close,
    autograd_gramian,
    cnn,
    mlp,
    trainable,
)


def _per_sample_losses(model: nn.Module, x: Tensor) -> Tensor:
    out = model(x)
    return out.pow(2).reshape(out.shape[0], -1).mean(dim=1)


def _inputs(name: str, batch: int, dtype: torch.dtype) -> tuple[nn.Module, Tensor]:
    torch.manual_seed(0)
    if name == "mlp":
        return mlp().to(dtype), torch.randn(batch, 5, dtype=dtype)
    if name == "cnn":
        return cnn().to(dtype), torch.randn(batch, 3, 8, 8, dtype=dtype)
    if name == "transformer":
        model = TransformerBlockModel().to(dtype)
        return model, torch.randint(0, 11, (batch, 5))
    if name == "branched":
        return Branched().to(dtype), torch.randn(batch, 4, dtype=dtype)
    raise AssertionError(name)


MODELS = ["mlp", "cnn", "transformer", "branched"]


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_per_sample_losses(name: str, dtype: torch.dtype) -> None:
    model, x = _inputs(name, 6, dtype)
    engine = Engine(model, batch_dim=0)
    losses = _per_sample_losses(model, x)
    gramian = engine.compute_gramian(losses)
    assert_gramian_close(gramian, autograd_gramian(losses, trainable(model)))


@pytest.mark.parametrize("name", MODELS)
def test_without_batch_dim(name: str) -> None:
    model, x = _inputs(name, 3, torch.float64)
    engine = Engine(model, batch_dim=None)
    losses = _per_sample_losses(model, x)
    gramian = engine.compute_gramian(losses)
    assert_gramian_close(gramian, autograd_gramian(losses, trainable(model)))


@pytest.mark.parametrize("name", MODELS)
def test_several_losses_per_sample(name: str) -> None:
    """Output [B, k] with batch_dim=0 and its transpose [k, B] with batch_dim=1."""
    model, x = _inputs(name, 4, torch.float64)
    engine = Engine(model, batch_dim=0)
    out = model(x)
    out = out.reshape(out.shape[0], -1)[:, :3]
    gramian = engine.compute_gramian(out)
    assert gramian.shape == (out.numel(), out.numel())
    assert_gramian_close(gramian, autograd_gramian(out, trainable(model)))

    engine = Engine(model, batch_dim=1)
    out = model(x)
    out = out.reshape(out.shape[0], -1)[:, :3].T
    assert_gramian_close(engine.compute_gramian(out), autograd_gramian(out, trainable(model)))


@pytest.mark.parametrize("name", ["mlp", "cnn"])
@pytest.mark.parametrize("kernel", [True, False])
def test_both_routes_of_linear_layers(
    name: str, kernel: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernel route and the per-row-gradient route give the same (exact) Gramian."""
    monkeypatch.setattr(layer_gramians, "_use_kernel", lambda *_: kernel)
    model, x = _inputs(name, 5, torch.float64)
    for batch_dim in (0, None):
        engine = Engine(model, batch_dim=batch_dim)
        out = model(x)
        out = out.reshape(out.shape[0], -1)[:, :2]
        assert_gramian_close(engine.compute_gramian(out), autograd_gramian(out, trainable(model)))
        del engine


def test_output_with_three_dims_and_batch_last() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 6))
    engine = Engine(model, batch_dim=2)
    x = torch.randn(5, 3, dtype=torch.float64)
    model.double()
    out = model(x).reshape(5, 2, 3).permute(2, 1, 0)  # [3, 2, B=5]
    gramian = engine.compute_gramian(out)
    assert gramian.shape == (30, 30)
    assert_gramian_close(gramian, autograd_gramian(out, trainable(model)))


def test_batch_dim_in_the_middle_and_negative() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 6)).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    for batch_dim in (1, -2):
        engine = Engine(model, batch_dim=batch_dim)
        out = model(x).reshape(5, 2, 3).transpose(0, 1)  # [2, B=5, 3]
        assert_gramian_close(engine.compute_gramian(out), autograd_gramian(out, trainable(model)))
        del engine


def test_scalar_output_without_batch_dim() -> None:
    torch.manual_seed(0)
    model = mlp().double()
    engine = Engine(model, batch_dim=None)
    loss = model(torch.randn(4, 5, dtype=torch.float64)).sum()
    gramian = engine.compute_gramian(loss)
    assert gramian.shape == (1, 1)
    assert_gramian_close(gramian, autograd_gramian(loss, trainable(model)))


@pytest.mark.parametrize("shape", [(7, 3, 2, 5), (27, 6, 7), (3, 2, 1, 1), (1,), (1134,)])
def test_reshape_invariance(shape: tuple[int, ...]) -> None:
    """Gramian of a reshaped output is the Gramian of the output, rows in flatten order."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1134)).double()
    x = torch.randn(1, 2, dtype=torch.float64)
    engine = Engine(model, batch_dim=None)
    out = model(x).reshape(-1)[: int(torch.tensor(shape).prod())]
    reference = engine.compute_gramian(out)
    out = model(x).reshape(-1)[: int(torch.tensor(shape).prod())].reshape(shape)
    torch.testing.assert_close(engine.compute_gramian(out), reference, rtol=1e-10, atol=1e-10)


def test_batch_dim_and_none_agree() -> None:
    torch.manual_seed(0)
    model = cnn().double()
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    results = []
    for batch_dim in (0, None):
        engine = Engine(model, batch_dim=batch_dim)
        results.append(engine.compute_gramian(model(x)))
        del engine
    torch.testing.assert_close(results[0], results[1], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("batch_dim", [0, None])
def test_every_subset_of_layers(batch_dim: int | None) -> None:
    torch.manual_seed(0)
    model = Branched().double()
    layers = [model.a, model.b, model.c, model.d, model.e]
    x = torch.randn(4, 4, dtype=torch.float64)
    for mask in range(1, 2 ** len(layers)):
        subset = [layer for i, layer in enumerate(layers) if mask >> i & 1]
        engine = Engine(*subset, batch_dim=batch_dim)
        out = model(x)
        assert_gramian_close(engine.compute_gramian(out), autograd_gramian(out, trainable(*subset)))
        del engine


# ------------------------------------------------------------------------------------------------
# Parameters used several times


@pytest.mark.parametrize("batch_dim", [0, None])
def test_module_called_twice(batch_dim: int | None) -> None:
    torch.manual_seed(0)
    lin = nn.Linear(4, 4)
    model = nn.Sequential(lin, nn.ReLU(), lin).double()
    engine = Engine(model, batch_dim=batch_dim)
    out = model(torch.randn(5, 4, dtype=torch.float64))
    assert_gramian_close(engine.compute_gramian(out), autograd_gramian(out, trainable(model)))


class _TiedAutoencoder(nn.Module):
    """Direct parameter used twice in one call, plus a child module: hooked as one unit."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 5))
        self.child = nn.Linear(5, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.child(torch.tanh(x @ self.weight.T) @ self.weight)


@pytest.mark.parametrize("batch_dim", [0, None])
def test_parameter_used_twice_in_one_call(batch_dim: int | None) -> None:
    torch.manual_seed(0)
    model = _TiedAutoencoder().double()
    engine = Engine(model, batch_dim=batch_dim)
    out = model(torch.randn(4, 5, dtype=torch.float64))
    assert_gramian_close(engine.compute_gramian(out), autograd_gramian(out, trainable(model)))


@pytest.mark.parametrize("batch_dim", [0, None])
def test_siamese_calls_and_unit_reused(batch_dim: int | None) -> None:
    """A conv net applied to two inputs, and a unit (fallback rule) called twice."""
    torch.manual_seed(0)
    net = cnn().double()
    tied = _TiedAutoencoder().double()
    engine = Engine(net, tied, batch_dim=batch_dim)
    x1, x2 = torch.randn(2, 4, 3, 8, 8, dtype=torch.float64)
    z = torch.randn(4, 5, dtype=torch.float64)
    out = (net(x1) - net(x2)).sum(dim=1) + tied(tied(z)).sum(dim=1)
    params = trainable(net, tied)
    assert_gramian_close(engine.compute_gramian(out), autograd_gramian(out, params))


# ------------------------------------------------------------------------------------------------
# Layers with a dedicated rule, in their variants


def _check(model: nn.Module, x: Tensor, batch_dims: tuple[int | None, ...] = (0, None)) -> None:
    for batch_dim in batch_dims:
        engine = Engine(model, batch_dim=batch_dim)
        out = model(x)
        if batch_dim == 0:
            out = out.reshape(out.shape[0], -1).sum(dim=1)
        else:  # a few random combinations of all the entries, to keep J small
            mixing = torch.randn(
                out.numel(), 4, dtype=out.dtype, generator=torch.Generator().manual_seed(1)
            )
            out = out.reshape(-1) @ mixing
        assert_gramian_close(engine.compute_gramian(out), autograd_gramian(out, trainable(model)))
        del engine


CONV_VARIANTS: dict[str, Callable[[], nn.Module]] = {
    "conv1d": lambda: nn.Conv1d(4, 6, 3),
    "conv1d-groups-dilation-stride": lambda: nn.Conv1d(4, 6, 3, stride=2, dilation=2, groups=2),
    "conv1d-same-circular": lambda: nn.Conv1d(4, 2, 4, padding="same", padding_mode="circular"),
    "conv1d-no-bias": lambda: nn.Conv1d(4, 3, 2, bias=False),
    "conv2d-reflect": lambda: nn.Conv2d(4, 3, 3, padding=1, padding_mode="reflect"),
    "conv2d-same": lambda: nn.Conv2d(4, 3, (2, 3), padding="same", dilation=(2, 1)),
    "conv2d-valid-groups": lambda: nn.Conv2d(4, 8, 2, padding="valid", groups=4),
    "conv2d-replicate-stride": lambda: nn.Conv2d(4, 2, 3, 2, padding=2, padding_mode="replicate"),
}


@pytest.mark.parametrize("variant", list(CONV_VARIANTS))
@pytest.mark.parametrize("route", ["kernel", "unfold", "grouped"])
def test_convolutions(variant: str, route: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(layer_gramians, "_use_kernel", lambda *_: route == "kernel")
    min_positions = 0 if route == "grouped" else 10**9
    monkeypatch.setattr(layer_gramians, "_GROUPED_MIN_POSITIONS", min_positions)
    torch.manual_seed(0)
    conv = CONV_VARIANTS[variant]().double()
    shape = (3, 4, 7) if isinstance(conv, nn.Conv1d) else (3, 4, 6, 5)
    _check(conv, torch.randn(shape, dtype=torch.float64))


@pytest.mark.parametrize("min_positions", [0, 10**9])
def test_unbatched_convolution_input_without_batch_dim(
    min_positions: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(layer_gramians, "_GROUPED_MIN_POSITIONS", min_positions)
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 2).double()
    _check(conv, torch.randn(2, 4, 4, dtype=torch.float64), batch_dims=(None,))


@pytest.mark.parametrize("min_positions", [0, 10**9])
def test_convolution_called_twice_with_several_rows(
    min_positions: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(layer_gramians, "_GROUPED_MIN_POSITIONS", min_positions)
    torch.manual_seed(0)
    conv = nn.Conv1d(3, 3, 2, groups=3).double()
    x = torch.randn(4, 3, 6, dtype=torch.float64)
    for batch_dim in (0, None):
        engine = Engine(conv, batch_dim=batch_dim)
        out = conv(torch.tanh(conv(x))).sum(dim=2)  # [4, 3]: several rows per sample
        assert_gramian_close(engine.compute_gramian(out), autograd_gramian(out, trainable(conv)))
        del engine


def test_linear_on_sequences_and_frozen_parts() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(4, 3).double()
    x = torch.randn(3, 5, 2, 4, dtype=torch.float64)
    _check(lin, x)
    lin.weight.requires_grad_(False)  # only the bias is hooked
    _check(lin, x)
    lin.weight.requires_grad_(True)
    lin.bias.requires_grad_(False)  # direct parameter left: still hooked
    _check(lin, x)


NORM_VARIANTS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "layernorm": (lambda: nn.LayerNorm(4), (3, 5, 4)),
    "layernorm-2d-no-bias": (lambda: nn.LayerNorm((2, 4), bias=False), (3, 2, 4)),
    "groupnorm": (lambda: nn.GroupNorm(2, 4), (3, 4, 3, 2)),
    "groupnorm-flat": (lambda: nn.GroupNorm(1, 4), (3, 4)),
    "instancenorm": (lambda: nn.InstanceNorm1d(4, affine=True), (3, 4, 5)),
}
if hasattr(nn, "RMSNorm"):
    NORM_VARIANTS["rmsnorm"] = (lambda: nn.RMSNorm(4), (3, 2, 4))


@pytest.mark.parametrize("variant", list(NORM_VARIANTS))
def test_normalisations(variant: str) -> None:
    torch.manual_seed(0)
    factory, shape = NORM_VARIANTS[variant]
    norm = factory().double()
    with torch.no_grad():
        for p in norm.parameters():
            p.add_(torch.randn_like(p))  # away from the ones/zeros initialisation
    model = nn.Sequential(nn.Linear(shape[-1], shape[-1]), norm, nn.Tanh()).double()
    _check(model, torch.randn(shape, dtype=torch.float64))


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("track", [True, False])
def test_batch_norm_without_batch_dim(training: bool, track: bool) -> None:
    torch.manual_seed(0)
    norm = nn.BatchNorm2d(3, track_running_stats=track)
    model = nn.Sequential(nn.Conv2d(2, 3, 2), norm, nn.Tanh()).double()
    if track:
        norm.running_mean.normal_()
        norm.running_var.uniform_(0.5, 2.0)
    model.train(training)
    _check(model, torch.randn(4, 2, 4, 4, dtype=torch.float64), batch_dims=(None,))


@pytest.mark.parametrize("kernel", [True, False])
def test_embeddings(kernel: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(layer_gramians, "_use_kernel", lambda *_: kernel)
    torch.manual_seed(0)
    tokens = torch.tensor([[1, 2, 2, 0], [3, 0, 1, 1], [4, 4, 4, 2]])
    for embedding in (
        nn.Embedding(5, 3),
        nn.Embedding(5, 3, padding_idx=0),
        nn.Embedding(5, 3, scale_grad_by_freq=True),
    ):
        model = nn.Sequential(embedding, nn.Tanh(), nn.Linear(3, 2)).double()
        _check(model, tokens)
        _check(embedding.double(), tokens)


# ------------------------------------------------------------------------------------------------
# Modules handled by the general rules


class _TwoOutputs(nn.Module):
    """Returns a tensor and a view of it (the second output is computed from the first)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 3))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        y = x @ self.weight.T
        return y, y[:, :2] * 2


@pytest.mark.parametrize("batch_dim", [0, None])
def test_module_with_an_output_computed_from_another(batch_dim: int | None) -> None:
    torch.manual_seed(0)
    module = _TwoOutputs().double()
    engine = Engine(module, batch_dim=batch_dim)
    y, z = module(torch.randn(5, 3, dtype=torch.float64))
    out = y.pow(2).sum(dim=1) + z.sin().sum(dim=1)
    assert_gramian_close(engine.compute_gramian(out), autograd_gramian(out, trainable(module)))


def test_multihead_attention_with_weights_output() -> None:
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(4, 2, batch_first=True).double()
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    for batch_dim in (0, None):
        engine = Engine(attention, batch_dim=batch_dim)
        values, weights = attention(x, x, x)
        out = values.pow(2).sum(dim=(1, 2)) + weights.pow(2).sum(dim=(1, 2))
        params = trainable(attention)
        assert_gramian_close(engine.compute_gramian(out), autograd_gramian(out, params))
        del engine


@pytest.mark.parametrize("cls", [nn.RNN, nn.LSTM, nn.GRU])
def test_recurrent_modules_without_batch_dim(cls: type[nn.RNNBase]) -> None:
    torch.manual_seed(0)
    rnn = cls(3, 4).double()
    engine = Engine(rnn, batch_dim=None)
    out, _ = rnn(torch.randn(5, 2, 3, dtype=torch.float64))
    losses = out.pow(2).mean(dim=(1, 2))
    assert_gramian_close(engine.compute_gramian(losses), autograd_gramian(losses, trainable(rnn)))


def test_inplace_activation_after_hooked_layer() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(inplace=True), nn.Linear(4, 2)).double()
    _check(model, torch.randn(5, 3, dtype=torch.float64))


class _Rich(nn.Module):
    """Pytree, keyword and string arguments, a buffer, a Dropout child, a dict output."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 3))
        self.register_buffer("shift", torch.randn(3))
        self.dropout = nn.Dropout(0.5)

    def forward(
        self, pair: tuple[Tensor, Tensor], *, scale: Tensor, mode: str = "add", unused=None
    ) -> dict[str, object]:
        a, b = pair
        h = a @ self.weight + self.shift * scale
        h = h + b if mode == "add" else h - b
        return {"out": h, "label": mode, "nothing": None, "constant": torch.ones(1)}


@pytest.mark.parametrize("batch_dim", [0, None])
def test_pytree_kwargs_strings_buffers_and_dropout(batch_dim: int | None) -> None:
    torch.manual_seed(0)
    rich = _Rich().double()
    model = nn.ModuleList([rich, nn.Linear(3, 2).double()])
    engine = Engine(model, batch_dim=batch_dim)
    a, b = torch.randn(2, 4, 3, dtype=torch.float64)
    scale = torch.rand(4, 1, dtype=torch.float64)
    result = rich((a, b), scale=scale, mode="sub")
    assert result["label"] == "sub"
    out = model[1](rich.dropout(result["out"])).sum(dim=1)
    assert_gramian_close(engine.compute_gramian(out), autograd_gramian(out, trainable(model)))


class _NoTensorOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(2))

    def forward(self, x: Tensor) -> str:
        return "nothing"


def test_module_without_tensor_output_is_ignored() -> None:
    torch.manual_seed(0)
    other = _NoTensorOutput()
    lin = nn.Linear(3, 1).double()
    engine = Engine(other, lin, batch_dim=0)
    x = torch.randn(4, 3, dtype=torch.float64)
    assert other(x) == "nothing"
    out = lin(x).squeeze(1)
    assert_gramian_close(engine.compute_gramian(out), autograd_gramian(out, trainable(lin)))


class _ScalarInBackward(torch.autograd.Function):
    """Doubles its input; its backward reads a Python scalar, which cannot be vectorised."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return 2 * x

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        factor = float(grad.new_ones(()).item()) * 2
        return factor * grad


@pytest.mark.parametrize("batch_dim", [0, None])
def test_graph_that_cannot_be_vectorised(batch_dim: int | None) -> None:
    """The backward passes for several rows are then run one after the other."""
    torch.manual_seed(0)
    lin, rnn_like = nn.Linear(3, 4).double(), nn.Linear(4, 2).double()
    engine = Engine(lin, rnn_like, batch_dim=batch_dim)
    x = torch.randn(5, 3, dtype=torch.float64)
    out = rnn_like(_ScalarInBackward.apply(torch.tanh(lin(x))))  # [5, 2]: two rows per sample
    params = trainable(lin, rnn_like)
    assert_gramian_close(engine.compute_gramian(out), autograd_gramian(out, params))
