"""A training script written for TorchJD runs unchanged and ends with the parameters that the
definitions of the algorithms give.

The reference side of each test re-derives every step independently: per-task gradients with plain
``torch.autograd.grad``, UPGrad's weights with the quadprog solver on the normalised and
regularised Gramian (the reference's steps), GradVac's with a literal transcription of its
sequential definition, and SGD by hand.
"""

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.functional import mse_loss

from torchjd.aggregation import GradVac, UPGrad
from torchjd.autojac import jac_to_grad, mtl_backward

qpsolvers = pytest.importorskip("qpsolvers")

_LR = 0.1
_STEPS = 4


def _build(n_tasks: int) -> tuple[nn.Module, list[nn.Module]]:
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 4), nn.Tanh())
    heads = [nn.Linear(4, 1) for _ in range(n_tasks)]
    return trunk, heads


def _data(n_tasks: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    return torch.randn(6, 5), [torch.randn(6, 1) for _ in range(n_tasks)]


def _run_script(aggregator: nn.Module, n_tasks: int) -> list[torch.Tensor]:
    """What a TorchJD user writes."""
    trunk, heads = _build(n_tasks)
    params = [*trunk.parameters(), *(p for h in heads for p in h.parameters())]
    optimizer = torch.optim.SGD(params, lr=_LR)
    torch.manual_seed(1)
    for _ in range(_STEPS):
        x, targets = _data(n_tasks)
        features = trunk(x)
        losses = [mse_loss(head(features), t) for head, t in zip(heads, targets)]
        mtl_backward(losses, features=features)
        jac_to_grad(trunk.parameters(), aggregator)
        optimizer.step()
        optimizer.zero_grad()
    return [p.detach().clone() for p in params]


def _upgrad_weights(gramian: np.ndarray) -> np.ndarray:
    m = gramian.shape[0]
    trace = np.trace(gramian)
    normalised = gramian / trace if trace >= 1e-4 else np.zeros_like(gramian)
    regularised = normalised + 1e-4 * np.eye(m)
    weights = np.zeros(m)
    for i in range(m):
        u = np.zeros(m)
        u[i] = 1.0 / m
        v = qpsolvers.solve_qp(regularised, np.zeros(m), -np.eye(m), -u, solver="quadprog")
        weights += v
    return weights


def _gradvac_weights(gramian: np.ndarray, phi_hat: np.ndarray, beta: float) -> np.ndarray:
    m = gramian.shape[0]
    coefficients = np.eye(m)
    eps = 1e-8
    for i in range(m):
        others = [k for k in range(m) if k != i]
        for position in torch.randperm(m - 1).tolist():
            j = others[position]
            norm_i = math.sqrt(max(coefficients[i] @ gramian @ coefficients[i], 0.0))
            norm_j = math.sqrt(max(gramian[j, j], 0.0))
            phi = (coefficients[i] @ gramian[:, j]) / (norm_i * norm_j + eps)
            target = phi_hat[i, j]
            if phi < target:
                numerator = norm_i * (
                    target * math.sqrt(max(1 - phi**2, 0.0))
                    - phi * math.sqrt(max(1 - target**2, 0.0))
                )
                coefficients[i, j] += numerator / (
                    norm_j * math.sqrt(max(1 - target**2, 0.0)) + eps
                )
            phi_hat[i, j] = (1 - beta) * target + beta * phi
    return coefficients.sum(axis=0)


def _run_reference(weights_of, n_tasks: int) -> list[torch.Tensor]:
    trunk, heads = _build(n_tasks)
    trunk_params = list(trunk.parameters())
    head_params = [list(h.parameters()) for h in heads]
    torch.manual_seed(1)
    for _ in range(_STEPS):
        x, targets = _data(n_tasks)
        features = trunk(x)
        rows, head_grads = [], []
        for head, target, params in zip(heads, targets, head_params):
            loss = mse_loss(head(features), target)
            grads = torch.autograd.grad(loss, trunk_params + params, retain_graph=True)
            rows.append(torch.cat([g.reshape(-1) for g in grads[: len(trunk_params)]]))
            head_grads.append(grads[len(trunk_params) :])
        jacobian = torch.stack(rows).double()
        weights = torch.from_numpy(weights_of((jacobian @ jacobian.T).numpy()))
        update = (weights @ jacobian).float()
        with torch.no_grad():
            offset = 0
            for p in trunk_params:
                p -= _LR * update[offset : offset + p.numel()].reshape(p.shape)
                offset += p.numel()
            for params, grads in zip(head_params, head_grads):
                for p, g in zip(params, grads):
                    p -= _LR * g
    return [p.detach().clone() for p in [*trunk_params, *(p for ps in head_params for p in ps)]]


def test_upgrad_training_script_matches_the_definition() -> None:
    actual = _run_script(UPGrad(), n_tasks=3)
    expected = _run_reference(_upgrad_weights, n_tasks=3)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=0, atol=1e-5)


def test_gradvac_training_script_matches_the_definition() -> None:
    phi_hat = np.zeros((3, 3))
    actual = _run_script(GradVac(beta=0.5), n_tasks=3)
    expected = _run_reference(lambda g: _gradvac_weights(g, phi_hat, 0.5), n_tasks=3)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=0, atol=1e-5)
