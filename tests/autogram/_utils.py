"""Reference Gramians computed row by row with torch.autograd, and small models for the tests."""

from collections.abc import Sequence

import torch
from torch import Tensor, nn


def autograd_jacobian(output: Tensor, params: Sequence[Tensor]) -> Tensor:
    """The Jacobian of ``output.reshape(-1)`` w.r.t. ``params``, one ``autograd.grad`` per row."""
    flat = output.reshape(-1)
    rows = []
    for i in range(flat.numel()):
        grads = torch.autograd.grad(flat[i], params, retain_graph=True, allow_unused=True)
        rows.append(
            torch.cat(
                [
                    (torch.zeros_like(p) if g is None else g).reshape(-1)
                    for g, p in zip(grads, params)
                ]
            )
        )
    return torch.stack(rows)


def autograd_gramian(output: Tensor, params: Sequence[Tensor]) -> Tensor:
    jacobian = autograd_jacobian(output, params)
    return jacobian @ jacobian.T


def assert_gramian_close(actual: Tensor, expected: Tensor) -> None:
    """1e-5 (float32) or 1e-10 (float64), relative to the largest entry of the expected Gramian."""
    tol = 1e-10 if expected.dtype == torch.float64 else 1e-5
    scale = max(expected.abs().max().item(), 1.0)
    assert actual.shape == expected.shape
    assert actual.dtype == expected.dtype
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * scale)


def trainable(*modules: nn.Module) -> list[Tensor]:
    return [p for m in modules for p in m.parameters() if p.requires_grad]


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))


def cnn() -> nn.Sequential:
    """For inputs [B, 3, 8, 8]."""
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(6, 2),
    )


class TransformerBlockModel(nn.Module):
    """Embedding, one pre-norm Transformer encoder layer (attention, LayerNorm, Linear), head."""

    def __init__(self, vocab: int = 11, dim: int = 8) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, dim)
        self.block = nn.TransformerEncoderLayer(
            d_model=dim, nhead=2, dim_feedforward=16, dropout=0.0, batch_first=True, norm_first=True
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.norm(self.block(self.embedding(tokens))))


class Branched(nn.Module):
    """Five Linear layers with a branch and a merge."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(6, 5)
        self.c = nn.Linear(6, 5)
        self.d = nn.Linear(5, 3)
        self.e = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.a(x))
        return self.d(torch.tanh(self.b(h))) + self.e(torch.sigmoid(self.c(h)))
