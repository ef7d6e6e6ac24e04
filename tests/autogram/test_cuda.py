"""The engine on a CUDA device: same Gramian as autograd, on the device of the output."""

import pytest
import torch
from torch import nn

from torchjd.autogram import Engine

from ._utils import TransformerBlockModel, assert_gramian_close, autograd_gramian, cnn, trainable

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("batch_dim", [0, None])
def test_cnn_on_cuda(batch_dim: int | None) -> None:
    torch.manual_seed(0)
    model = cnn().double().cuda()
    engine = Engine(model, batch_dim=batch_dim)
    out = model(torch.randn(4, 3, 8, 8, dtype=torch.float64, device="cuda"))
    gramian = engine.compute_gramian(out)
    assert gramian.device == out.device
    assert_gramian_close(gramian, autograd_gramian(out, trainable(model)))


def test_transformer_and_embedding_on_cuda() -> None:
    torch.manual_seed(0)
    model = TransformerBlockModel().double().cuda()
    engine = Engine(model, batch_dim=0)
    out = model(torch.randint(0, 11, (3, 5), device="cuda")).pow(2).mean(dim=(1, 2))
    assert_gramian_close(engine.compute_gramian(out), autograd_gramian(out, trainable(model)))


def test_grouped_convolution_route_on_cuda() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1, groups=2).double().cuda()
    engine = Engine(conv, batch_dim=0)
    out = conv(torch.randn(3, 4, 9, 9, dtype=torch.float64, device="cuda")).sum(dim=(1, 2, 3))
    assert_gramian_close(engine.compute_gramian(out), autograd_gramian(out, trainable(conv)))
