"""Automatic mixed precision: autocast (bfloat16 on CPU) and GradScaler with normalisation layers.

``torch.vmap`` of ``autograd.grad`` through BatchNorm/LayerNorm/GroupNorm run under autocast fails
in torch ("expected scalar type BFloat16 but found Float"): the batching rules of their backward
do not handle the mixed dtypes that autocast leaves between activations (16-bit) and
normalisation statistics (float32). The Jacobian engine goes through
``autograd.grad(..., is_grads_batched=True)`` instead, whose batching does handle them; these
tests hold it to that, row for row against one plain backward per loss.
"""

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn
from torch.nn.functional import mse_loss

from torchjd.aggregation import (
    IMTLG,
    MGDA,
    Aggregator,
    AlignedMTL,
    CAGrad,
    ConFIG,
    DualProj,
    Krum,
    Mean,
    PCGrad,
    Sum,
    UPGrad,
)
from torchjd.autogram import Engine
from torchjd.autojac import backward, jac_to_grad, mtl_backward

_NORMS: dict[str, Callable[[], nn.Module]] = {
    "batch_norm": lambda: nn.BatchNorm1d(16),
    "layer_norm": lambda: nn.LayerNorm(16),
    "group_norm": lambda: nn.GroupNorm(4, 16),
}


def _model(norm: str) -> tuple[nn.Module, nn.ModuleList]:
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(6, 16), _NORMS[norm](), nn.ReLU(), nn.Linear(16, 8), nn.ReLU())
    heads = nn.ModuleList([nn.Linear(8, 1), nn.Linear(8, 1), nn.Linear(8, 1)])
    return trunk, heads


def _losses(
    trunk: nn.Module, heads: nn.ModuleList, dtype: torch.dtype
) -> tuple[list[Tensor], Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(10, 6, generator=gen)
    y = torch.randn(10, len(heads), generator=gen)
    with torch.autocast("cpu", dtype=dtype):
        features = trunk(x)
        losses = [mse_loss(h(features), y[:, [i]]) for i, h in enumerate(heads)]
    return losses, features


def _rows_by_hand(losses: list[Tensor], params: list[nn.Parameter]) -> Tensor:
    """The Jacobian, one ordinary backward per loss (no batching involved)."""
    rows = []
    for loss in losses:
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
        rows.append(torch.cat([g.flatten() for g in grads]))
    return torch.stack(rows)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("norm", list(_NORMS))
@pytest.mark.parametrize("chunk", [None, 1])
def test_mtl_backward_under_autocast(norm: str, dtype: torch.dtype, chunk: int | None) -> None:
    trunk, heads = _model(norm)
    params = list(trunk.parameters())
    losses, features = _losses(trunk, heads, dtype)
    expected = _rows_by_hand(losses, params)

    mtl_backward(losses, features=features, parallel_chunk_size=chunk)

    jacobian = torch.cat([p.jac.flatten(1) for p in params], dim=1)
    assert all(p.jac.dtype == torch.float32 for p in params)
    assert torch.equal(jacobian, expected)


@pytest.mark.parametrize("norm", list(_NORMS))
def test_backward_under_autocast(norm: str) -> None:
    trunk, heads = _model(norm)
    params = [*trunk.parameters(), *heads.parameters()]
    losses, _ = _losses(trunk, heads, torch.bfloat16)
    expected = _rows_by_hand(losses, params)

    backward(torch.stack(losses), inputs=params)

    jacobian = torch.cat([p.jac.flatten(1) for p in params], dim=1)
    assert torch.equal(jacobian, expected)


@pytest.mark.parametrize("norm", list(_NORMS))
def test_autogram_under_autocast(norm: str) -> None:
    trunk, heads = _model(norm)
    engine = Engine(trunk, batch_dim=None)
    losses, _ = _losses(trunk, heads, torch.bfloat16)
    jacobian = _rows_by_hand(losses, list(trunk.parameters()))

    gramian = engine.compute_gramian(torch.stack(losses))

    assert gramian.dtype == torch.float32
    # The engine sums the per-module blocks in another order than the flat product: the gap is
    # bfloat16 rounding of the activations' gradients (eps 2^-8), not an error of the method.
    expected = jacobian @ jacobian.T
    assert torch.allclose(gramian, expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())


_SCALE_INVARIANT: dict[str, Callable[[], Aggregator]] = {
    "UPGrad": UPGrad,
    "DualProj": DualProj,
    "MGDA": MGDA,
    "CAGrad": lambda: CAGrad(c=0.5),
    "IMTLG": IMTLG,
    "AlignedMTL": AlignedMTL,
    "ConFIG": ConFIG,
    "PCGrad": PCGrad,
    "Krum": lambda: Krum(n_byzantine=0),
    "Mean": Mean,
    "Sum": Sum,
}


@pytest.mark.parametrize("name", list(_SCALE_INVARIANT))
def test_aggregation_commutes_with_the_loss_scale(name: str) -> None:
    """Scaling the losses by s and unscaling .grad afterwards gives the unscaled update.

    GradScaler relies on this: the aggregator sees s·J, the optimizer sees .grad / s. The
    documented exceptions (FairGrad, NashMTL) are checked on the AMP page.
    """
    gen = torch.Generator().manual_seed(3)
    jacobian = torch.randn(3, 7, generator=gen, dtype=torch.float64)
    jacobian[2] = -0.5 * jacobian[0] + 0.1 * jacobian[2]  # a conflict, so that every method acts
    scale = 2.0**16
    # Seeded before each call: PCGrad projects in a random order.
    torch.manual_seed(0)
    unscaled = _SCALE_INVARIANT[name]()(jacobian)
    torch.manual_seed(0)
    aggregator = _SCALE_INVARIANT[name]()
    assert torch.allclose(aggregator(scale * jacobian) / scale, unscaled, rtol=1e-6, atol=1e-9)


def _step(scaler: torch.amp.GradScaler | None, poison: bool) -> tuple[list[Tensor], nn.Module]:
    trunk, heads = _model("batch_norm")
    params = [*trunk.parameters(), *heads.parameters()]
    optimizer = torch.optim.SGD(params, lr=0.1)
    losses, features = _losses(trunk, heads, torch.bfloat16)
    if poison:
        losses[1] = losses[1] * float("inf")
    if scaler is not None:
        losses = scaler.scale(losses)
    mtl_backward(losses, features=features)
    jac_to_grad(trunk.parameters(), UPGrad())
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)
        scaler.update()
    return [p.detach().clone() for p in params], trunk


def test_grad_scaler_step_equals_the_unscaled_step() -> None:
    # A power-of-two scale is exact in floating point: the scaled Jacobian is exactly s·J, and the
    # unscaled .grad differs from the plain one only through UPGrad's own thresholds.
    expected, _ = _step(None, poison=False)
    actual, _ = _step(torch.amp.GradScaler("cpu", init_scale=2.0**16), poison=False)
    for a, e in zip(actual, expected):
        assert torch.allclose(a, e, rtol=1e-5, atol=1e-7)


def test_grad_scaler_skips_a_non_finite_step() -> None:
    trunk, _ = _model("batch_norm")
    initial = [p.detach().clone() for p in trunk.parameters()]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)

    after, trunk = _step(scaler, poison=True)

    # The infinity reaches .grad (it is not hidden), so the scaler skips the step and backs off.
    assert not all(torch.isfinite(p.grad).all() for p in trunk.parameters())
    assert all(torch.equal(a, b) for a, b in zip(after, initial))
    assert scaler.get_scale() == 2.0**15


def test_gramian_weights_do_not_depend_on_the_loss_scale() -> None:
    """With autogram, weights from the Gramian of the scaled losses (s² G) equal those from G."""
    trunk, heads = _model("layer_norm")
    engine = Engine(trunk, batch_dim=None)
    gramian = engine.compute_gramian(torch.stack(_losses(trunk, heads, torch.bfloat16)[0]))
    scaled = engine.compute_gramian(2.0**16 * torch.stack(_losses(trunk, heads, torch.bfloat16)[0]))
    weighting = UPGrad().weighting
    assert torch.allclose(weighting(scaled), weighting(gramian), rtol=1e-5, atol=1e-7)


def test_grad_scaler_skips_a_non_finite_step_of_the_gramian_route() -> None:
    trunk, heads = _model("layer_norm")
    params = [*trunk.parameters(), *heads.parameters()]
    optimizer = torch.optim.SGD(params, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    engine = Engine(trunk, batch_dim=None)
    losses = torch.stack(_losses(trunk, heads, torch.bfloat16)[0])
    losses = losses * torch.tensor([1.0, float("inf"), 1.0])
    initial = [p.detach().clone() for p in params]

    weights = UPGrad().weighting(engine.compute_gramian(losses))
    scaler.scale(losses @ weights).backward()
    scaler.step(optimizer)
    scaler.update()

    # The non-finite Gramian gives non-finite weights (nothing hides it), so the step is skipped.
    assert not torch.isfinite(weights).all()
    assert all(torch.equal(a, b) for a, b in zip(params, initial))
    assert scaler.get_scale() == 2.0**15
