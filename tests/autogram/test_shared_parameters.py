"""A parameter used by two hooked units (weight tying) is refused: each block of the Gramian is
formed from one unit's calls, so the terms that cross the two units would be missing."""

import pytest
import torch
from torch import nn

from torchjd.autogram import Engine


def _tied() -> nn.Sequential:
    first, second = nn.Linear(3, 3), nn.Linear(3, 3)
    second.weight = first.weight
    return nn.Sequential(first, nn.Tanh(), second)


@pytest.mark.parametrize("batch_dim", [0, None])
def test_tied_weights_are_refused(batch_dim: int | None) -> None:
    with pytest.raises(ValueError, match=r"tied weights.*Untie"):
        Engine(_tied(), batch_dim=batch_dim)


def test_a_frozen_tied_parameter_is_accepted_and_exact() -> None:
    torch.manual_seed(0)
    model = _tied()
    model[0].weight.requires_grad_(False)
    engine = Engine(model, batch_dim=0)
    x = torch.randn(4, 3)
    losses = model(x).pow(2).sum(dim=1)
    gramian = engine.compute_gramian(losses)
    # Reference: the Jacobian w.r.t. the trainable parameters (the two biases), row by row.
    params = [model[0].bias, model[2].bias]
    rows = []
    for loss in losses:
        grads = torch.autograd.grad(loss, params, retain_graph=True)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    jacobian = torch.stack(rows)
    torch.testing.assert_close(gramian, jacobian @ jacobian.T)
