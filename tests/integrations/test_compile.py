"""``torch.compile``d models (inductor): autojac through both chunk settings, and autogram.

Inductor's compiled backward has no batching rules, so the batched vector-Jacobian products fail
through it: autojac falls back, once and with a warning, to one backward pass per row. That needs
the graph to survive several passes, which a compiled backward that donates its buffers (torch's
default) forbids: then one error names the fixes. The autogram engine needs a single backward
pass and works either way. Compiling is slow on small machines: the models are tiny and few.
"""

import os
import re
import subprocess
import sys
import warnings
from collections.abc import Iterator

import pytest
import torch
import torch._dynamo
import torch._functorch.config
from torch import Tensor, nn
from torch.nn.functional import mse_loss

from torchjd.autogram import Engine
from torchjd.autojac import mtl_backward


def _model() -> tuple[nn.Module, nn.ModuleList]:
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3), nn.ReLU())
    heads = nn.ModuleList([nn.Linear(3, 1), nn.Linear(3, 1)])
    return trunk, heads


def _data() -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(6, 4, generator=gen), torch.randn(6, 2, generator=gen)


def _losses(trunk: nn.Module, heads: nn.ModuleList) -> tuple[list[Tensor], Tensor]:
    x, y = _data()
    features = trunk(x)
    return [mse_loss(h(features), y[:, [i]]) for i, h in enumerate(heads)], features


def _eager_jacobian(trunk: nn.Module, heads: nn.ModuleList) -> Tensor:
    losses, _ = _losses(trunk, heads)
    rows = []
    for loss in losses:
        grads = torch.autograd.grad(loss, list(trunk.parameters()), retain_graph=True)
        rows.append(torch.cat([g.flatten() for g in grads]))
    return torch.stack(rows)


@pytest.fixture
def fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(params=[True, False], ids=["donated", "not_donated"])
def donated_buffer(request: pytest.FixtureRequest) -> Iterator[bool]:
    """Whether inductor's backward donates its buffers (torch's default: yes), for the whole test:
    the setting is read when a call compiles, and again when the compiled backward runs."""
    with torch._functorch.config.patch(donated_buffer=request.param):
        yield request.param


def _compiled(trunk: nn.Module) -> nn.Module:
    return torch.compile(trunk, backend="inductor")


@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize("donated_buffer", [False], indirect=True)
def test_autojac_on_an_inductor_trunk_without_donated_buffers(donated_buffer: bool) -> None:
    trunk, heads = _model()
    expected = _eager_jacobian(trunk, heads)
    compiled = _compiled(trunk)
    params = list(trunk.parameters())

    # Batched (the default): the vmap fails inside the compiled backward; one warning, then rows.
    losses, features = _losses(compiled, heads)
    with pytest.warns(UserWarning, match="parallel_chunk_size=1"):
        mtl_backward(losses, features=features)
    batched = torch.cat([p.jac.flatten(1) for p in params], dim=1)
    for p in params:
        del p.jac

    # One row at a time: no failed attempt, no warning.
    losses, features = _losses(compiled, heads)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mtl_backward(losses, features=features, parallel_chunk_size=1)
    sequential = torch.cat([p.jac.flatten(1) for p in params], dim=1)

    assert torch.allclose(batched, expected, rtol=1e-5, atol=1e-6)
    assert torch.allclose(sequential, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize("donated_buffer", [True], indirect=True)
@pytest.mark.parametrize("chunk", [None, 1])
def test_autojac_on_an_inductor_trunk_with_donated_buffers(
    chunk: int | None, donated_buffer: bool, request: pytest.FixtureRequest
) -> None:
    if os.environ.get("CI"):
        # torch reads CI when it is imported (CI-only compiler settings), and the compiled backward
        # then keeps its buffers: the case runs in a child process without that variable.
        _run_without_ci(request)
        return
    trunk, heads = _model()
    expected = _eager_jacobian(trunk, heads)
    compiled = _compiled(trunk)
    losses, features = _losses(compiled, heads)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the batched attempt's fallback warning, if any
            mtl_backward(losses, features=features, parallel_chunk_size=chunk)
    except RuntimeError as error:
        # The compiled backward donated its buffers: the error says what to do instead.
        assert re.search(r"donated_buffer = False.*autogram\.Engine", str(error))
        assert "donated buffers" in str(error.__cause__)  # torch's own error, kept as the cause
        return
    # Whether inductor donates the buffers of a given graph depends on the torch build and the
    # machine; where it kept them, the Jacobians must be right.
    jacobian = torch.cat([p.jac.flatten(1) for p in trunk.parameters()], dim=1)
    assert torch.allclose(jacobian, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize("donated_buffer", [True, False])
def test_autogram_on_an_inductor_trunk(
    donated_buffer: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    trunk, heads = _model()
    jacobian = _eager_jacobian(trunk, heads)
    engine = Engine(trunk, batch_dim=None)
    compiled = _compiled(trunk)
    losses, _ = _losses(compiled, heads)
    stacked = torch.stack(losses)

    gramian = engine.compute_gramian(stacked)
    stacked.backward(torch.tensor([0.25, 0.75]))

    assert torch.allclose(gramian, jacobian @ jacobian.T, rtol=1e-5, atol=1e-6)
    update = torch.cat([p.grad.flatten() for p in trunk.parameters()])
    assert torch.allclose(update, torch.tensor([0.25, 0.75]) @ jacobian, rtol=1e-5, atol=1e-6)


def _run_without_ci(request: pytest.FixtureRequest) -> None:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", request.node.nodeid]
    root = request.config.rootpath
    result = subprocess.run(command, env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
