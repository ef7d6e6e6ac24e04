"""Time the Lightning step of Jacobian descent on the 1.08M-parameter trunk.

Model: the trunk of ``bench_training_step.py``, one ``Linear(256, 1)`` head per task, batch 64,
MSE losses, SGD. For m = 2 and 8 tasks it reports, single-threaded, the median CPU time of the
process over one training step (forward, backward, optimizer step; the data loading excluded;
CPU time rather than wall time, as the machines are shared) of:

- ``JacobianDescentModule`` with UPGrad, in a Lightning ``Trainer`` (the JD step);
- the same LightningModule trained on the summed loss (the floor of the framework);
- the same Gramian-first step written by hand without the framework (heads on views of detached
  features, ``MTLEngine.gradients``, one backward pass through the heads, the update written into
  ``.grad``): the ratio JD-in-Lightning / JD-by-hand is Lightning's overhead;
- for reference, ``MTLEngine.backward`` by hand (its ungrouped step ends in a full backward pass
  through the trunk) and the summed-loss step by hand;
- the JD step in Lightning with per-layer UPGrad (a ``GroupedAggregator``);
- the JD step in Lightning with a ``torch.compile``d trunk (inductor), against the eager one.

The variants run interleaved: each round fits every variant for a few steps, and the medians are
taken over all the rounds' steps (the first step of each fit is left out as warm-up).

Usage: ``python benchmarks/bench_lightning.py [--rounds N] [--steps K] [--no-compile]``.
"""

import argparse
import functools
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from _timing import single_thread
from bench_training_step import make_trunk
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor, nn
from torch.nn.functional import mse_loss
from torch.utils.data import DataLoader, TensorDataset

from torchjd.aggregation import UPGrad
from torchjd.autogram import MTLEngine
from torchjd.grouping import GroupedAggregator, per_layer
from torchjd.integrations.lightning import JacobianDescentModule

BATCH = 64


def _networks(m: int) -> tuple[nn.Module, nn.ModuleList]:
    torch.manual_seed(0)
    return make_trunk(), nn.ModuleList(nn.Linear(256, 1) for _ in range(m))


class _Summed(LightningModule):
    def __init__(self, m: int) -> None:
        super().__init__()
        self.trunk, self.heads = _networks(m)

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        features = self.trunk(x)
        return sum(mse_loss(h(features), y[:, [i]]) for i, h in enumerate(self.heads))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-3)


class _Descent(JacobianDescentModule):
    def __init__(self, m: int, compiled: bool = False, grouped: bool = False) -> None:
        trunk, heads = _networks(m)
        aggregator = GroupedAggregator(per_layer(trunk), UPGrad) if grouped else UPGrad()
        super().__init__(aggregator=aggregator)
        self.trunk, self.heads = trunk, heads
        self.forward_trunk = torch.compile(self.trunk) if compiled else self.trunk

    def shared_modules(self) -> list[nn.Module]:
        return [self.trunk]

    def training_step(self, batch: list[Tensor], batch_idx: int) -> list[Tensor]:
        x, y = batch
        views = self.task_views(self.forward_trunk(x), len(self.heads))
        return [mse_loss(h(v), y[:, [i]]) for i, (h, v) in enumerate(zip(self.heads, views))]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-3)


class _StepTimes(Callback):
    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, *args: object) -> None:
        self._start = time.process_time()

    def on_train_batch_end(self, *args: object) -> None:
        self.times.append(time.process_time() - self._start)


def _data(m: int, steps: int) -> DataLoader:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(steps * BATCH, 256, generator=gen)
    y = torch.randn(steps * BATCH, m, generator=gen)
    return DataLoader(TensorDataset(x, y), batch_size=BATCH)


def _lightning_run(module: LightningModule, loader: DataLoader, steps: int) -> list[float]:
    timer = _StepTimes()
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        callbacks=[timer],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, loader)
    return timer.times[1:]


@dataclass
class _Net:
    trunk: nn.Module
    heads: nn.ModuleList
    engine: MTLEngine | None  # hooks the trunk (recording its calls) only where the step uses it
    aggregator: UPGrad


def _by_hand(
    m: int, step: Callable[[_Net, Tensor, Tensor], None], engine: bool = True
) -> Callable[[DataLoader, int], list[float]]:
    trunk, heads = _networks(m)
    net = _Net(trunk, heads, MTLEngine(trunk) if engine else None, UPGrad())
    optimizer = torch.optim.SGD([*trunk.parameters(), *heads.parameters()], lr=1e-3)

    def run(loader: DataLoader, steps: int) -> list[float]:
        times = []
        for x, y in list(loader)[:steps]:
            start = time.process_time()
            step(net, x, y)
            optimizer.step()
            optimizer.zero_grad()
            times.append(time.process_time() - start)
        return times[1:]

    return run


def _gramian_first_step(net: _Net, x: Tensor, y: Tensor) -> None:
    """The integrations' step without a framework."""
    assert net.engine is not None
    features = net.trunk(x)
    detached = features.detach().requires_grad_()
    views = [detached.view_as(detached) for _ in net.heads]
    total = sum(mse_loss(h(v), y[:, [i]]) for i, (h, v) in enumerate(zip(net.heads, views)))
    feature_grads = torch.stack(torch.autograd.grad(total, views, retain_graph=True))
    _, _, update = net.engine.gradients(feature_grads, features, net.aggregator)
    total.backward()
    for p, u in zip(update.parameters, update()):
        p.grad = u


def _engine_backward_step(net: _Net, x: Tensor, y: Tensor) -> None:
    assert net.engine is not None
    features = net.trunk(x)
    losses = [mse_loss(h(features), y[:, [i]]) for i, h in enumerate(net.heads)]
    net.engine.backward(losses, features, net.aggregator)


def _summed_step(net: _Net, x: Tensor, y: Tensor) -> None:
    features = net.trunk(x)
    sum(mse_loss(h(features), y[:, [i]]) for i, h in enumerate(net.heads)).backward()


SUMMED = "Lightning, summed loss"
JD = "Lightning, JD (UPGrad)"
HAND = "by hand, same JD step"
COMPILED = "Lightning, JD, compiled trunk"


def bench(m: int, rounds: int, steps: int, compiled: bool) -> dict[str, float]:
    loader = _data(m, steps)
    summed, descent, grouped = _Summed(m), _Descent(m), _Descent(m, grouped=True)
    variants: dict[str, Callable[[], list[float]]] = {
        SUMMED: lambda: _lightning_run(summed, loader, steps),
        JD: lambda: _lightning_run(descent, loader, steps),
        HAND: functools.partial(_by_hand(m, _gramian_first_step), loader, steps),
        "by hand, MTLEngine.backward": functools.partial(
            _by_hand(m, _engine_backward_step), loader, steps
        ),
        "by hand, summed loss": functools.partial(
            _by_hand(m, _summed_step, engine=False), loader, steps
        ),
        "Lightning, JD (per-layer UPGrad)": lambda: _lightning_run(grouped, loader, steps),
    }
    if compiled:
        descent_compiled = _Descent(m, compiled=True)
        _lightning_run(descent_compiled, loader, 2)  # compiles (not timed)
        variants[COMPILED] = lambda: _lightning_run(descent_compiled, loader, steps)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, run in variants.items():
            times[name].extend(run())
    return {name: 1000 * statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()
    single_thread()
    warnings.filterwarnings("ignore")
    n = sum(p.numel() for p in make_trunk().parameters())
    print(f"Trunk: {n:,} parameters, batch {BATCH}, single thread, median CPU time of a step (ms)")
    for m in (2, 8):
        results = bench(m, args.rounds, args.steps, not args.no_compile)
        jd = results[JD]
        print(f"\nm = {m}")
        for name, ms in results.items():
            print(f"  {name:<34} {ms:9.2f}")
        print(f"  JD / summed in Lightning           {jd / results[SUMMED]:9.2f}x")
        print(f"  Lightning JD / same step by hand   {jd / results[HAND]:9.2f}x")
        if COMPILED in results:
            print(f"  compiled / eager JD in Lightning   {results[COMPILED] / jd:9.2f}x")


if __name__ == "__main__":
    main()
