"""Time the Lightning step of Jacobian descent on the 1.08M-parameter trunk.

Model: the trunk of ``bench_training_step.py``, one ``Linear(256, 1)`` head per task, batch 64,
MSE losses, SGD. For m = 2 and 8 tasks it reports, single-threaded, the median time of one
training step (forward, backward, optimizer step; the data loading excluded) of:

- ``JacobianDescentModule`` with UPGrad, in a Lightning ``Trainer`` (the JD step);
- the same LightningModule trained on the summed loss (the floor of the framework);
- the JD step written by hand without the framework (Gramian from ``autogram.Engine``, task views
  scaled by hooks, one backward): the ratio JD-in-Lightning / JD-by-hand is Lightning's overhead;
- the JD step in Lightning with a ``torch.compile``d trunk (inductor), against the eager one.

The variants run interleaved: each round fits every variant for a few steps, and the medians are
taken over all the rounds' steps (the first step of each fit is left out as warm-up).

Usage: ``python benchmarks/bench_lightning.py [--rounds N] [--steps K] [--no-compile]``.
"""

import argparse
import statistics
import time
import warnings
from collections.abc import Callable

import torch
from _timing import single_thread
from bench_training_step import make_trunk
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor, nn
from torch.nn.functional import mse_loss
from torch.utils.data import DataLoader, TensorDataset

from torchjd.aggregation import UPGrad
from torchjd.autogram import Engine
from torchjd.integrations import task_views
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
    def __init__(self, m: int, compiled: bool = False) -> None:
        super().__init__(aggregator=UPGrad())
        self.trunk, self.heads = _networks(m)
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
        self._start = time.perf_counter()

    def on_train_batch_end(self, *args: object) -> None:
        self.times.append(time.perf_counter() - self._start)


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


def _by_hand(m: int) -> Callable[[DataLoader, int], list[float]]:
    trunk, heads = _networks(m)
    engine = Engine(trunk, batch_dim=None)
    optimizer = torch.optim.SGD([*trunk.parameters(), *heads.parameters()], lr=1e-3)
    weighting = UPGrad().gramian_weighting

    def run(loader: DataLoader, steps: int) -> list[float]:
        times = []
        for x, y in list(loader)[:steps]:
            start = time.perf_counter()
            views = task_views(trunk(x), m)
            losses = torch.stack(
                [mse_loss(h(v), y[:, [i]]) for i, (h, v) in enumerate(zip(heads, views))]
            )
            weights = weighting(engine.compute_gramian(losses))
            for v, w in zip(views, weights):
                v.register_hook(lambda g, w=w: g * w)
            losses.sum().backward()
            optimizer.step()
            optimizer.zero_grad()
            times.append(time.perf_counter() - start)
        return times[1:]

    return run


def bench(m: int, rounds: int, steps: int, compiled: bool) -> dict[str, float]:
    loader = _data(m, steps)
    variants: dict[str, Callable[[], list[float]]] = {}
    summed, descent = _Summed(m), _Descent(m)
    variants["Lightning, summed loss"] = lambda: _lightning_run(summed, loader, steps)
    variants["Lightning, JD (UPGrad)"] = lambda: _lightning_run(descent, loader, steps)
    hand = _by_hand(m)
    variants["by hand, JD (UPGrad)"] = lambda: hand(loader, steps)
    if compiled:
        descent_compiled = _Descent(m, compiled=True)
        _lightning_run(descent_compiled, loader, 2)  # compiles (not timed)
        variants["Lightning, JD, compiled trunk"] = lambda: _lightning_run(
            descent_compiled, loader, steps
        )
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
    print(f"Trunk: {n:,} parameters, batch {BATCH}, single thread, median step time (ms)")
    for m in (2, 8):
        results = bench(m, args.rounds, args.steps, not args.no_compile)
        summed = results["Lightning, summed loss"]
        jd = results["Lightning, JD (UPGrad)"]
        print(f"\nm = {m}")
        for name, ms in results.items():
            print(f"  {name:<32} {ms:9.2f}")
        print(f"  JD / summed in Lightning         {jd / summed:9.2f}x")
        print(f"  Lightning JD / JD by hand        {jd / results['by hand, JD (UPGrad)']:9.2f}x")
        if "Lightning, JD, compiled trunk" in results:
            compiled = results["Lightning, JD, compiled trunk"]
            print(f"  compiled / eager JD              {compiled / jd:9.2f}x")


if __name__ == "__main__":
    main()
