"""The autogram usage patterns of the documentation (IWRM, IWMTL, partial JD), run unchanged."""

import copy

import torch
from torch import nn

from torchjd.aggregation import UPGrad, UPGradWeighting
from torchjd.autogram import Engine
from torchjd.autojac import backward, jac_to_grad


def test_instance_wise_risk_minimisation() -> None:
    torch.manual_seed(0)
    model_jac = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 1))
    model_gram = copy.deepcopy(model_jac)
    loss_fn = nn.MSELoss(reduction="none")  # one loss per sample
    x, y = torch.randn(9, 5), torch.randn(9)

    # autojac route
    losses = loss_fn(model_jac(x).squeeze(1), y)  # shape [9]
    backward(losses)
    jac_to_grad(model_jac.parameters(), UPGrad())

    # autogram route (engine created before the forward pass)
    engine = Engine(model_gram, batch_dim=0)
    losses = loss_fn(model_gram(x).squeeze(1), y)
    gramian = engine.compute_gramian(losses)  # shape [9, 9]
    assert gramian.shape == (9, 9)
    weights = UPGradWeighting()(gramian)  # shape [9]
    losses.backward(weights)

    for p, q in zip(model_jac.parameters(), model_gram.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-5)


def test_instance_wise_multi_task_learning() -> None:
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(6, 4), nn.ReLU())
    head_a, head_b = nn.Linear(4, 1), nn.Linear(4, 1)
    params = [*trunk.parameters(), *head_a.parameters(), *head_b.parameters()]
    opt = torch.optim.SGD(params, lr=0.05)
    sq = nn.MSELoss(reduction="none")
    engine = Engine(trunk, batch_dim=0)
    weighting = UPGradWeighting()

    x, t_a, t_b = torch.randn(8, 6), torch.randn(8), torch.randn(8)
    feats = trunk(x)
    loss_a = sq(head_a(feats).squeeze(1), t_a)  # [8]
    loss_b = sq(head_b(feats).squeeze(1), t_b)  # [8]
    losses = torch.stack([loss_a, loss_b], dim=1)  # [8, 2]: one loss per (sample, task)

    gramian = engine.compute_gramian(losses)  # [16, 16], row-major order of losses
    assert gramian.shape == (16, 16)
    flat = losses.reshape(-1)
    rows = [
        torch.cat(
            [
                g.reshape(-1)
                for g in torch.autograd.grad(flat[i], list(trunk.parameters()), retain_graph=True)
            ]
        )
        for i in range(16)
    ]
    J = torch.stack(rows)
    assert torch.allclose(gramian, J @ J.T, rtol=1e-4, atol=1e-5)
    weights = weighting(gramian)  # [16]
    losses.backward(weights.reshape(losses.shape))
    opt.step()
    opt.zero_grad()


def test_partial_jacobian_descent() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3), nn.ReLU(), nn.Linear(3, 1))
    engine = Engine(model[2:], batch_dim=0)  # only the last two Linear layers
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(7, 5), torch.randn(7)

    losses = nn.functional.mse_loss(model(x).squeeze(1), y, reduction="none")
    gramian = engine.compute_gramian(losses)
    sub = list(model[2:].parameters())
    J = torch.stack(
        [
            torch.cat(
                [g.reshape(-1) for g in torch.autograd.grad(losses[i], sub, retain_graph=True)]
            )
            for i in range(7)
        ]
    )
    assert torch.allclose(gramian, J @ J.T, rtol=1e-4, atol=1e-5)
    losses.backward(UPGradWeighting()(gramian))  # every parameter (incl. model[0]) gets a .grad
    assert model[0].weight.grad is not None
    opt.step()
    opt.zero_grad()


def test_iwrm_training_loop_matches_the_autojac_route() -> None:
    """A few IWRM steps on a small CNN: both routes keep the same parameters."""
    torch.manual_seed(0)
    model_jac = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(12, 1)
    )
    model_gram = copy.deepcopy(model_jac)
    opt_jac = torch.optim.SGD(model_jac.parameters(), lr=0.1)
    opt_gram = torch.optim.SGD(model_gram.parameters(), lr=0.1)
    engine = Engine(model_gram, batch_dim=0)
    aggregator, weighting = UPGrad(), UPGradWeighting()
    for _ in range(3):
        x, y = torch.randn(6, 2, 4, 4), torch.randn(6)
        losses = (model_jac(x).squeeze(1) - y) ** 2
        backward(losses)
        jac_to_grad(model_jac.parameters(), aggregator)
        opt_jac.step()
        opt_jac.zero_grad()

        losses = (model_gram(x).squeeze(1) - y) ** 2
        losses.backward(weighting(engine.compute_gramian(losses)))
        opt_gram.step()
        opt_gram.zero_grad()
    for p, q in zip(model_jac.parameters(), model_gram.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5)
