"""JacobianDescentModule with the real Lightning package (skipped where it is not installed)."""

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("lightning")

from lightning.pytorch import Trainer
from lightning.pytorch.plugins import MixedPrecision
from torch.nn.functional import mse_loss

from torchjd.aggregation import PCD, ConFIG, UPGrad
from torchjd.autojac import mtl_backward
from torchjd.grouping import GroupedAggregator, per_layer

from ._lightning_models import PerLayerTwoTasks, TwoTasks, data, hand_written_step, loader, networks


def _trainer(**kwargs: object) -> Trainer:
    options = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    options.update(kwargs)
    return Trainer(**options)


@pytest.fixture(autouse=True)
def _quiet() -> None:
    warnings.filterwarnings("ignore", module="lightning")


def _assert_trained_by_hand(
    module: TwoTasks, batches: list[list[torch.Tensor]], tol: float, bf16: bool = False
) -> None:
    """The module's parameters equal those of the same SGD steps written by hand (under the same
    bfloat16 autocast if ``bf16``) on the same networks and batches."""
    trunk, heads = networks()
    params = [*trunk.parameters(), *heads.parameters()]
    optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    for x, y in batches:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            grads, _ = hand_written_step(trunk, heads, x, y)
        for p, g in zip(params, grads):
            p.grad = g.float()
        optimizer.step()
    expected = torch.cat([p.detach().flatten() for p in params])
    actual = torch.cat(
        [p.detach().flatten() for p in [*module.trunk.parameters(), *module.heads.parameters()]]
    )
    assert torch.allclose(actual, expected, rtol=tol, atol=tol)


def test_steps_match_the_hand_written_step() -> None:
    dataset = data()
    module = TwoTasks(UPGrad())
    _trainer(max_steps=3).fit(module, loader(dataset))

    _assert_trained_by_hand(module, list(loader(dataset))[:3], tol=1e-5)


def test_logged_metrics_and_weights() -> None:
    dataset = data(8)
    module = TwoTasks(UPGrad())
    trainer = _trainer(max_steps=1, log_every_n_steps=1)
    trunk, heads = networks()
    x, y = dataset.tensors
    _, weights = hand_written_step(trunk, heads, x, y)
    trainer.fit(module, loader(dataset))

    logged = trainer.logged_metrics
    assert torch.allclose(logged["weight/a"], weights[0], rtol=1e-5)
    assert torch.allclose(logged["weight/b"], weights[1], rtol=1e-5)
    features = trunk(x)
    losses = [mse_loss(h(features), y[:, [i]]) for i, h in enumerate(heads)]
    assert torch.allclose(logged["loss/a"], losses[0], rtol=1e-6)
    shared = list(trunk.parameters())
    rows = [torch.autograd.grad(loss, shared, retain_graph=True) for loss in losses]
    grads = [torch.cat([g.flatten() for g in row]) for row in rows]
    cosine = torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0)
    assert torch.allclose(logged["cosine/a-b"], cosine, rtol=1e-5, atol=1e-6)


def test_accumulation_clipping_and_checkpoint(tmp_path: Path) -> None:
    dataset = data()
    module = TwoTasks(PCD())
    trainer = _trainer(max_steps=2, accumulate_grad_batches=2, gradient_clip_val=0.5)
    trainer.fit(module, loader(dataset))
    state = module.aggregator.state_dict()
    assert state and any(v.abs().sum() > 0 for v in state.values() if torch.is_tensor(v))

    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    restored = TwoTasks.load_from_checkpoint(path, aggregator=PCD())
    for key, value in state.items():
        if torch.is_tensor(value):
            assert torch.equal(restored.aggregator.state_dict()[key], value)


def test_bf16_mixed_precision() -> None:
    dataset = data()
    module = TwoTasks(UPGrad())
    trainer = _trainer(max_steps=2, precision="bf16-mixed", log_every_n_steps=1)
    trainer.fit(module, loader(dataset))
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in module.parameters())
    assert trainer.logged_metrics["weight/a"].dtype == torch.float32

    # The same steps by hand under the same autocast: equal up to bfloat16 rounding.
    _assert_trained_by_hand(module, list(loader(dataset))[:2], tol=2e-2, bf16=True)


@pytest.mark.parametrize(
    ("precision", "tol"), [("32-true", 1e-5), ("bf16-mixed", 2e-2)], ids=["float32", "bf16"]
)
def test_grouped_steps_with_accumulation_and_clipping(precision: str, tol: float) -> None:
    """Per-layer UPGrad under Lightning, two micro-batches per step and gradient clipping: the
    steps of `mtl_backward` then `GroupedAggregator.jac_to_grad`, averaged, clipped by hand."""
    dataset = data()
    module = PerLayerTwoTasks()
    trainer = _trainer(
        max_steps=2,
        accumulate_grad_batches=2,
        gradient_clip_val=0.5,
        precision=precision,
        log_every_n_steps=1,
    )
    trainer.fit(module, loader(dataset))

    trunk, heads = networks()
    grouped = GroupedAggregator(per_layer(trunk), UPGrad)
    params = [*trunk.parameters(), *heads.parameters()]
    optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    batches = list(loader(dataset))[:4]
    for step in range(2):
        total = [torch.zeros_like(p) for p in params]
        for x, y in batches[2 * step : 2 * step + 2]:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision != "32-true"):
                features = trunk(x)
                losses = [mse_loss(h(features), y[:, [i]]) for i, h in enumerate(heads)]
            mtl_backward(losses, features=features)
            weights = grouped.jac_to_grad()
            for t, p in zip(total, params):
                t += p.grad.float() / 2
                p.grad = None
        for t, p in zip(total, params):
            p.grad = t
        torch.nn.utils.clip_grad_norm_(params, 0.5)
        optimizer.step()
        optimizer.zero_grad()

    expected = torch.cat([p.detach().flatten() for p in params])
    actual = torch.cat(
        [p.detach().flatten() for p in [*module.trunk.parameters(), *module.heads.parameters()]]
    )
    assert torch.allclose(actual, expected, rtol=tol, atol=tol)
    logged = trainer.logged_metrics  # the last micro-batch's weights, one vector per layer
    for k, layer_weights in enumerate(weights):
        assert torch.allclose(logged[f"weight/{k}/a"], layer_weights[0], rtol=tol, atol=tol)
        assert torch.allclose(logged[f"weight/{k}/b"], layer_weights[1], rtol=tol, atol=tol)


def test_grouped_aggregation_needs_task_views() -> None:
    module = PerLayerTwoTasks()
    x, y = data(8).tensors
    # The heads read the features themselves: no weighted sum of the losses is the update.
    module.task_views = lambda features, m: [features] * m  # type: ignore[method-assign]
    with pytest.raises(ValueError, match="task_views"):
        module.training_step([x, y], 0)


def _float16_trainer(scaler: torch.amp.GradScaler, steps: int) -> Trainer:
    """float16 autocast with loss scaling ("16-mixed"), on the CPU: the plugin with a CPU scaler."""
    return _trainer(max_steps=steps, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])


def test_float16_with_a_grad_scaler_gives_the_unscaled_steps() -> None:
    """The scale reaches the gradients propagated through the trunk and is undone on the
    Gramian and the update: the steps are those of float32, up to float16 rounding."""
    dataset = data()
    module = TwoTasks(UPGrad())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    _float16_trainer(scaler, 3).fit(module, loader(dataset))
    assert scaler.get_scale() == 2.0**12  # no step was skipped

    _assert_trained_by_hand(module, list(loader(dataset))[:3], tol=1e-3)


def test_float16_overflow_skips_the_step() -> None:
    module = TwoTasks(UPGrad())
    before = [p.detach().clone() for p in module.parameters()]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)  # overflows float16
    _float16_trainer(scaler, 1).fit(module, loader(data()))
    assert scaler.get_scale() == 2.0**39
    assert all(torch.equal(p, b) for p, b in zip(module.parameters(), before))


class _SkipsSecondBatch(TwoTasks):
    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> list[torch.Tensor] | None:
        x, y = batch
        views = self.task_views(self.trunk(x), 2)
        if batch_idx == 1:
            return None  # Lightning skips the batch, after the forward pass
        return [mse_loss(head(v), y[:, [i]]) for i, (head, v) in enumerate(zip(self.heads, views))]


def test_a_skipped_batch_does_not_disturb_the_next_step() -> None:
    dataset = data()
    module = _SkipsSecondBatch(UPGrad())
    # The skipped batch counts as a step of Lightning's (its optimizer step has no gradient).
    _trainer(max_steps=3).fit(module, loader(dataset))

    batches = list(loader(dataset))
    _assert_trained_by_hand(module, [batches[0], batches[2]], tol=1e-5)


class _ViewsTwice(TwoTasks):
    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> list[torch.Tensor]:
        x, y = batch
        features = self.trunk(x)
        self.task_views(features, 2)
        views = self.task_views(features, 2)
        return [mse_loss(head(v), y[:, [i]]) for i, (head, v) in enumerate(zip(self.heads, views))]


def test_task_views_once_per_step() -> None:
    x, y = data(8).tensors
    with pytest.raises(ValueError, match="called 2 times"):
        _ViewsTwice(UPGrad()).training_step([x, y], 0)


def test_refuses_an_aggregator_that_needs_the_matrix() -> None:
    with pytest.raises(ValueError, match="mtl_backward"):
        TwoTasks(ConFIG())


def test_refuses_manual_optimisation() -> None:
    module = TwoTasks(UPGrad())
    module.automatic_optimization = False
    with pytest.raises(RuntimeError, match="automatic_optimization"):
        _trainer(max_steps=1).fit(module, loader(data(8)))


@pytest.mark.slow
@pytest.mark.parametrize("grouped", [False, True], ids=["whole_trunk", "per_layer"])
def test_ddp_two_processes_agree_with_the_documented_rule(tmp_path: Path, grouped: bool) -> None:
    """Both ranks end with the same parameters and aggregator state, those of a single-process
    simulation of the rule: for each group (the whole trunk, or each layer), weights from the
    mean of the ranks' Gramians, gradients averaged."""
    script = Path(__file__).with_name("_ddp_lightning.py")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    run = subprocess.run(
        [sys.executable, str(script), str(tmp_path), "3", "grouped" if grouped else "whole"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    for a, b in zip(ranks[0]["params"], ranks[1]["params"]):
        assert torch.equal(a, b)
    assert ranks[0]["state"].keys() == ranks[1]["state"].keys()
    for key, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][key])

    # The simulation, on the batches that each rank recorded (its sampler shuffles).
    trunk, heads = networks()
    shared, params = list(trunk.parameters()), [*trunk.parameters(), *heads.parameters()]
    groups = per_layer(trunk) if grouped else [shared]
    aggregators = [PCD() for _ in groups]
    optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    for step in range(3):
        head_grads = []
        rows: list[list[torch.Tensor]] = [[] for _ in groups]  # per group, per rank
        for rank in ranks:
            xb, yb = rank["batches"][step]
            features = trunk(xb)
            losses = [mse_loss(h(features), yb[:, [i]]) for i, h in enumerate(heads)]
            for group, group_rows in zip(groups, rows):
                grads = [torch.autograd.grad(loss, group, retain_graph=True) for loss in losses]
                group_rows.append(torch.stack([torch.cat([g.flatten() for g in r]) for r in grads]))
            head_grads.append(
                [
                    g
                    for i, h in enumerate(heads)
                    for g in torch.autograd.grad(losses[i], list(h.parameters()), retain_graph=True)
                ]
            )
        for group, group_rows, aggregator in zip(groups, rows, aggregators):
            weights = aggregator.gramian_weighting(sum(j @ j.T for j in group_rows) / 2)
            update = sum(weights @ j for j in group_rows) / 2
            offset = 0
            for p in group:
                p.grad = update[offset : offset + p.numel()].view_as(p).clone()
                offset += p.numel()
        head_params = list(heads.parameters())
        for k, p in enumerate(head_params):
            p.grad = (head_grads[0][k] + head_grads[1][k]) / 2
        optimizer.step()

    for actual, expected in zip(ranks[0]["params"], params):
        assert torch.allclose(actual, expected.detach(), rtol=1e-5, atol=1e-6)
    expected_state = {
        (f"aggregators.{k}." if grouped else "") + key: value
        for k, aggregator in enumerate(aggregators)
        for key, value in aggregator.state_dict().items()
        if torch.is_tensor(value)
    }
    assert expected_state.keys() == ranks[0]["state"].keys()
    for key, value in expected_state.items():
        assert torch.allclose(ranks[0]["state"][key], value, rtol=1e-5, atol=1e-7)


class _CompiledTrunk(TwoTasks):
    def __init__(self) -> None:
        super().__init__(UPGrad())
        self.compiled_trunk = torch.compile(self.trunk, backend="inductor")

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> list[torch.Tensor]:
        x, y = batch
        views = self.task_views(self.compiled_trunk(x), 2)
        return [mse_loss(head(v), y[:, [i]]) for i, (head, v) in enumerate(zip(self.heads, views))]


@pytest.mark.slow
def test_inductor_compiled_trunk_with_torch_defaults() -> None:
    """One backward pass through the compiled trunk: works with donated buffers (the default)."""
    torch._dynamo.reset()
    dataset = data()
    module = _CompiledTrunk()
    _trainer(max_steps=2).fit(module, loader(dataset))
    torch._dynamo.reset()

    _assert_trained_by_hand(module, list(loader(dataset))[:2], tol=1e-5)


def test_a_step_called_outside_a_trainer_returns_the_summed_losses() -> None:
    module = TwoTasks(UPGrad())
    x, y = data(8).tensors
    loss = module.training_step([x, y], 0)
    loss.backward()
    trunk, heads = networks()
    grads, _ = hand_written_step(trunk, heads, x, y)
    actual = [p.grad for p in [*module.trunk.parameters(), *module.heads.parameters()]]
    for a, e in zip(actual, grads):
        assert torch.allclose(a, e, rtol=1e-5, atol=1e-6)
