"""A small multi-task model, the four strategies on it, and a training loop that records every
step, to compare :class:`~torchjd.grouping.GroupedAggregator` with one ``jac_to_grad`` per group."""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.functional import mse_loss

from torchjd.autojac import mtl_backward
from torchjd.grouping import per_layer, per_network, per_tensor, together


@dataclass
class Model:
    encoder: nn.Module
    decoder: nn.Module
    heads: nn.ModuleList

    @property
    def shared(self) -> list[nn.Parameter]:
        return [*self.encoder.parameters(), *self.decoder.parameters()]

    def all_parameters(self) -> list[nn.Parameter]:
        return [*self.shared, *self.heads.parameters()]


def make_model(n_tasks: int, dtype: torch.dtype = torch.float64, device: str = "cpu") -> Model:
    """Encoder ``6 -> 5 -> 5``, decoder ``5 -> 4`` with a LayerNorm, one linear head per task:
    4 groups per layer, 8 per tensor. The same numbers for the same ``n_tasks``."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 5), nn.Tanh())
    decoder = nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4), nn.ReLU())
    heads = nn.ModuleList(nn.Linear(4, 1) for _ in range(n_tasks))
    torch.random.set_rng_state(generator_state)
    for module in (encoder, decoder, heads):
        module.to(dtype=dtype, device=device)
    return Model(encoder, decoder, heads)


STRATEGIES: dict[str, Callable[[Model], list[list[nn.Parameter]]]] = {
    "together": lambda model: together(model.encoder, model.decoder),
    "per_network": lambda model: per_network(model.encoder, model.decoder),
    "per_layer": lambda model: per_layer(model.encoder, model.decoder),
    "per_tensor": lambda model: per_tensor(model.encoder, model.decoder),
}


def fill_jacobians(model: Model, step: int) -> None:
    """One ``mtl_backward`` on a batch that depends on ``step`` only (not on the global RNG)."""
    like = model.shared[0]
    data = torch.Generator().manual_seed(100 + step)
    n_tasks = len(model.heads)
    x = torch.randn(8, 6, generator=data).to(like)
    targets = torch.randn(n_tasks, 8, 1, generator=data).to(like)
    features = model.decoder(model.encoder(x))
    losses = [mse_loss(head(features), t) for head, t in zip(model.heads, targets)]
    mtl_backward(losses, features=features)


@dataclass
class Step:
    weights: list[Tensor | None]
    grads: list[Tensor]


def train(model: Model, aggregate: Callable[[], list[Tensor | None]], steps: int) -> list[Step]:
    """Run ``steps`` steps of SGD (lr 0.1), with ``aggregate()`` turning the ``.jac`` fields of the
    shared parameters into ``.grad``; record the weights and the shared gradients."""
    record = []
    for step in range(steps):
        fill_jacobians(model, step)
        weights = aggregate()
        for p in model.shared:
            assert not hasattr(p, "jac")
        grads = [p.grad.clone() for p in model.shared]
        record.append(Step([None if w is None else w.clone() for w in weights], grads))
        with torch.no_grad():
            for p in model.all_parameters():
                p -= 0.1 * p.grad
                p.grad = None
    return record


def assert_same_steps(actual: list[Step], expected: list[Step], rtol: float, atol: float) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert len(a.weights) == len(e.weights)
        for wa, we in zip(a.weights, e.weights):
            assert (wa is None) == (we is None)
            if wa is not None:
                torch.testing.assert_close(wa, we, rtol=rtol, atol=atol)
        for ga, ge in zip(a.grads, e.grads):
            torch.testing.assert_close(ga, ge, rtol=rtol, atol=atol)
