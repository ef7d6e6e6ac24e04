"""Small multi-task training loops with the scalarizers, as a user would write them."""

import torch
from torch import Tensor, nn

from torchjd.scalarization import FAMO, UW


def _problem() -> tuple[nn.Module, nn.ModuleList, Tensor, Tensor, Tensor]:
    """A shared trunk with two regression heads; the second task has 100x noisier targets."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=generator)
    y1 = x @ torch.randn(8, 1, generator=generator) + 0.1 * torch.randn(64, 1, generator=generator)
    y2 = x @ torch.randn(8, 1, generator=generator) + 10.0 * torch.randn(64, 1, generator=generator)
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(8, 32), nn.ReLU())
    heads = nn.ModuleList([nn.Linear(32, 1), nn.Linear(32, 1)])
    return trunk, heads, x, y1, y2


def _losses(trunk: nn.Module, heads: nn.ModuleList, x: Tensor, y1: Tensor, y2: Tensor) -> Tensor:
    features = trunk(x)
    mse = nn.functional.mse_loss
    return torch.stack([mse(heads[0](features), y1), mse(heads[1](features), y2)])


def test_famo_training_loop() -> None:
    trunk, heads, x, y1, y2 = _problem()
    params = [*trunk.parameters(), *heads.parameters()]
    optimizer = torch.optim.SGD(params, lr=0.05)
    famo = FAMO(2)

    initial = _losses(trunk, heads, x, y1, y2).detach()
    for _ in range(80):
        losses = _losses(trunk, heads, x, y1, y2)
        loss = famo(losses)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        # FAMO learns its task weights from how much each loss decreased after the step.
        with torch.no_grad():
            new_losses = _losses(trunk, heads, x, y1, y2)
        famo.update(new_losses)

    final = _losses(trunk, heads, x, y1, y2).detach()
    assert (final < initial).all()
    assert final[0] < 0.2 * initial[0]  # the clean task is learned well despite the noisy one
    assert torch.isfinite(famo._w).all()
    assert famo._w.grad is None
    assert not torch.equal(famo._w.detach(), torch.zeros(2))


def test_uw_training_loop() -> None:
    trunk, heads, x, y1, y2 = _problem()
    uw = UW(2)
    # The log-variances of UW are trained by the same optimizer as the model.
    params = [*trunk.parameters(), *heads.parameters(), *uw.parameters()]
    optimizer = torch.optim.Adam(params, lr=0.01)

    initial = _losses(trunk, heads, x, y1, y2).detach()
    for _ in range(120):
        losses = _losses(trunk, heads, x, y1, y2)
        loss = uw(losses)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    final = _losses(trunk, heads, x, y1, y2).detach()
    assert (final < initial).all()
    # The noisy task ends with the larger uncertainty, hence the smaller weight exp(-log_var) / 2.
    log_var = uw.log_var.detach()
    assert log_var[1] > log_var[0]
    assert log_var[1] > 0.0 > log_var[0]
