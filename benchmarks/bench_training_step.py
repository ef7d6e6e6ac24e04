"""Time one multi-task training step on the 1.08M-parameter trunk, and the aggregators alone.

Model (see the spec README): ``Sequential(Sequential(Linear(256,1024), ReLU, Linear(1024,640),
ReLU), Sequential(Linear(640,256), ReLU))``, one ``Linear(256, 1)`` head per task, batch 64, MSE
losses, SGD. For m = 2, 8, 40 tasks it reports, single-threaded, the median time of:

- a plain ``sum(losses).backward()`` step (the floor);
- ``mtl_backward`` alone;
- ``mtl_backward`` + ``jac_to_grad(trunk, Mean())`` / ``UPGrad()`` / ``GradVac()``;
- the aggregation part alone (``jac_to_grad`` on prepared ``.jac`` fields) for Mean and UPGrad.

Then ``UPGrad()(J)`` and ``GradVac()(J)`` on a random ``[m, 1.08M]`` matrix for m = 2, 8, 32.

Usage: ``python benchmarks/bench_training_step.py [--repeats N]``.
"""

import argparse

import torch
from _timing import median_ms, single_thread
from torch import nn
from torch.nn.functional import mse_loss

from torchjd.aggregation import GradVac, Mean, UPGrad
from torchjd.autojac import jac_to_grad, mtl_backward


def make_trunk() -> nn.Module:
    encoder = nn.Sequential(nn.Linear(256, 1024), nn.ReLU(), nn.Linear(1024, 640), nn.ReLU())
    decoder = nn.Sequential(nn.Linear(640, 256), nn.ReLU())
    return nn.Sequential(encoder, decoder)


def bench_step(m: int, repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    trunk = make_trunk()
    heads = nn.ModuleList(nn.Linear(256, 1) for _ in range(m))
    optimizer = torch.optim.SGD([*trunk.parameters(), *heads.parameters()], lr=1e-3)
    x = torch.randn(64, 256)
    targets = torch.randn(m, 64, 1)

    def losses() -> tuple[list[torch.Tensor], torch.Tensor]:
        features = trunk(x)
        return [mse_loss(head(features), t) for head, t in zip(heads, targets)], features

    def plain() -> None:
        task_losses, _ = losses()
        sum(task_losses).backward()
        optimizer.step()
        optimizer.zero_grad()

    def backward_only() -> None:
        task_losses, features = losses()
        mtl_backward(task_losses, features=features)
        for p in trunk.parameters():
            del p.jac
        optimizer.zero_grad()

    def jd_step(aggregator: nn.Module) -> None:
        task_losses, features = losses()
        mtl_backward(task_losses, features=features)
        jac_to_grad(trunk.parameters(), aggregator)
        optimizer.step()
        optimizer.zero_grad()

    jacs = [torch.randn(m, *p.shape) for p in trunk.parameters()]

    def aggregation_only(aggregator: nn.Module) -> None:
        for p, jac in zip(trunk.parameters(), jacs):
            p.jac = jac
        jac_to_grad(trunk.parameters(), aggregator)
        optimizer.zero_grad()

    mean, upgrad, gradvac = Mean(), UPGrad(), GradVac()
    return {
        "sum(losses).backward() step": median_ms(plain, repeats),
        "mtl_backward alone": median_ms(backward_only, repeats),
        "step with Mean": median_ms(lambda: jd_step(mean), repeats),
        "step with UPGrad": median_ms(lambda: jd_step(upgrad), repeats),
        "step with GradVac": median_ms(lambda: jd_step(gradvac), repeats),
        "aggregation part, Mean": median_ms(lambda: aggregation_only(mean), repeats),
        "aggregation part, UPGrad": median_ms(lambda: aggregation_only(upgrad), repeats),
    }


def bench_aggregators(m: int, repeats: int) -> dict[str, float]:
    n = sum(p.numel() for p in make_trunk().parameters())
    matrix = torch.randn(m, n, generator=torch.Generator().manual_seed(m))
    upgrad, gradvac = UPGrad(), GradVac()
    weights = torch.ones(m)

    def floor() -> None:
        _ = matrix @ matrix.T
        _ = weights @ matrix

    return {
        "J @ J.T + w @ J (floor)": median_ms(floor, repeats),
        "UPGrad()(J)": median_ms(lambda: upgrad(matrix), repeats),
        "GradVac()(J)": median_ms(lambda: gradvac(matrix), repeats),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=11)
    args = parser.parse_args()
    single_thread()
    n = sum(p.numel() for p in make_trunk().parameters())
    print(f"Trunk: {n:,} parameters, batch 64, single thread, median of {args.repeats} runs (ms)")
    for m in (2, 8, 40):
        print(f"\nm = {m}")
        for name, ms in bench_step(m, args.repeats).items():
            print(f"  {name:<30} {ms:9.2f}")
    for m in (2, 8, 32):
        print(f"\nAggregators on a [{m}, {n:,}] matrix")
        for name, ms in bench_aggregators(m, args.repeats).items():
            print(f"  {name:<30} {ms:9.2f}")


if __name__ == "__main__":
    main()
