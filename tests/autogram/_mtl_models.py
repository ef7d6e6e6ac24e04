"""Small multi-task models (a trunk, one head per task) and a training loop that records every
step, to compare :class:`~torchjd.autogram.MTLEngine` with ``mtl_backward`` + ``jac_to_grad``."""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from torchjd.grouping import per_layer, per_network, per_tensor, together


class _Reused(nn.Module):
    """A first layer, then one ``Linear`` applied twice (module reuse)."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(5, 4)
        self.inner = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.tanh(self.first(x))
        x = torch.tanh(self.inner(x))
        return torch.tanh(self.inner(x))


class _MeanOverSequence(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.mean(dim=1)


def _trunk(kind: str) -> nn.Module:
    if kind == "mlp":
        return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4), nn.ReLU())
    if kind == "cnn":
        return nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1),
            nn.GroupNorm(1, 3),
            nn.ReLU(),
            nn.Conv2d(3, 2, 3),
            nn.Flatten(),
        )
    if kind == "reused":
        return _Reused()
    block = nn.TransformerEncoderLayer(
        d_model=4, nhead=2, dim_feedforward=6, dropout=0.0, batch_first=True
    )
    return nn.Sequential(nn.Linear(3, 4), block, _MeanOverSequence())


_INPUT_SHAPES = {"mlp": (5,), "cnn": (2, 4, 4), "reused": (5,), "transformer": (3, 3)}
_FEATURES = {"mlp": 4, "cnn": 8, "reused": 4, "transformer": 4}
KINDS = list(_INPUT_SHAPES)


@dataclass
class Model:
    kind: str
    trunk: nn.Module
    heads: nn.ModuleList

    def all_parameters(self) -> list[nn.Parameter]:
        return [*self.trunk.parameters(), *self.heads.parameters()]


def make_model(kind: str, n_tasks: int, dtype: torch.dtype = torch.float64) -> Model:
    """The same numbers for the same arguments, whatever the global RNG state."""
    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    trunk = _trunk(kind)
    heads = nn.ModuleList(nn.Linear(_FEATURES[kind], 1) for _ in range(n_tasks))
    torch.random.set_rng_state(state)
    trunk.to(dtype)
    heads.to(dtype)
    return Model(kind, trunk, heads)


def _children(trunk: nn.Module) -> list[nn.Module]:
    return list(trunk.children())


STRATEGIES: dict[str, Callable[[nn.Module], list[list[nn.Parameter]]]] = {
    "together": lambda trunk: together(trunk),
    "per_network": lambda trunk: per_network(*_children(trunk)),
    "per_layer": lambda trunk: per_layer(trunk),
    "per_tensor": lambda trunk: per_tensor(trunk),
}


def forward(
    model: Model, step: int, views: Callable[[Tensor], list[Tensor]] | None = None
) -> tuple[list[Tensor], Tensor]:
    """The task losses and the features on a batch that depends on ``step`` only; with
    ``views``, head ``i`` reads ``views(features)[i]``."""
    like = next(model.trunk.parameters())
    data = torch.Generator().manual_seed(100 + step)
    x = torch.randn(6, *_INPUT_SHAPES[model.kind], generator=data).to(like)
    targets = torch.randn(len(model.heads), 6, 1, generator=data).to(like)
    features = model.trunk(x)
    inputs = [features] * len(model.heads) if views is None else views(features)
    losses = [((head(f) - t) ** 2).mean() for head, f, t in zip(model.heads, inputs, targets)]
    return losses, features


@dataclass
class Step:
    weights: list[Tensor]
    grads: list[Tensor]


def train(
    model: Model, step_fn: Callable[[list[Tensor], Tensor], object], steps: int
) -> list[Step]:
    """``steps`` steps of SGD (lr 0.1); ``step_fn(losses, features)`` fills every ``.grad`` and
    returns the weights (a tensor or a list of them)."""
    record = []
    for step in range(steps):
        losses, features = forward(model, step)
        weights = step_fn(losses, features)
        listed = weights if isinstance(weights, list) else [weights]
        grads = [p.grad.clone() for p in model.all_parameters()]
        record.append(Step([w.clone() for w in listed], grads))
        with torch.no_grad():
            for p in model.all_parameters():
                p -= 0.1 * p.grad
                p.grad = None
    return record
