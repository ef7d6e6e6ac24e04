"""Time the parts of :mod:`torchjd.autojac` on the 1.08M-parameter trunk, single-threaded.

Model (see the spec README): ``Sequential(Sequential(Linear(256,1024), ReLU, Linear(1024,640),
ReLU), Sequential(Linear(640,256), ReLU))``, one ``Linear(256, 1)`` head per task, batch 64, MSE
losses. For m = 2, 8, 40 tasks it reports the median time of:

- ``mtl_backward`` alone, and followed by ``jac_to_grad`` with a Gramian-based aggregator;
- ``jac_to_grad`` alone on prepared ``.jac`` fields, for each of its routes: ``Mean`` (weights from
  the row count only), ``GramianWeightedAggregator(MeanWeighting())`` (weights from the summed
  per-tensor Gramians), and both again with a no-op forward hook, which forces the concatenation
  of the Jacobians and a call of the aggregator on the ``[m, N]`` matrix;
- the floors: one pass over the Jacobians (``w @ J``) and ``J @ J.T`` on the concatenated matrix.

Usage: ``python benchmarks/bench_autojac.py [--repeats N]``.
"""

import argparse

import torch
from _timing import median_ms, single_thread
from torch import nn
from torch.nn.functional import mse_loss

from torchjd.aggregation import Aggregator, GramianWeightedAggregator, Mean, MeanWeighting
from torchjd.autojac import jac_to_grad, mtl_backward


def make_trunk() -> nn.Module:
    encoder = nn.Sequential(nn.Linear(256, 1024), nn.ReLU(), nn.Linear(1024, 640), nn.ReLU())
    decoder = nn.Sequential(nn.Linear(640, 256), nn.ReLU())
    return nn.Sequential(encoder, decoder)


def hooked(aggregator: Aggregator) -> Aggregator:
    aggregator.register_forward_hook(lambda _module, _args, _output: None)
    return aggregator


def bench(m: int, repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    trunk = make_trunk()
    params = list(trunk.parameters())
    heads = nn.ModuleList(nn.Linear(256, 1) for _ in range(m))
    x = torch.randn(64, 256)
    targets = torch.randn(m, 64, 1)

    def backward_step(aggregator: Aggregator | None) -> None:
        features = trunk(x)
        losses = [mse_loss(head(features), t) for head, t in zip(heads, targets)]
        mtl_backward(losses, features=features)
        if aggregator is None:
            for p in params:
                del p.jac
        else:
            jac_to_grad(params, aggregator)
        for p in [*params, *heads.parameters()]:
            p.grad = None

    jacobians = [torch.randn(m, *p.shape) for p in params]

    def aggregation_only(aggregator: Aggregator) -> None:
        for p, jacobian in zip(params, jacobians):
            p.jac = jacobian
        jac_to_grad(params, aggregator)
        for p in params:
            p.grad = None

    matrix = torch.cat([j.reshape(m, -1) for j in jacobians], dim=1)
    weights = torch.full((m,), 1 / m)
    gramian_mean = GramianWeightedAggregator(MeanWeighting())
    return {
        "mtl_backward alone": median_ms(lambda: backward_step(None), repeats),
        "mtl_backward + jac_to_grad(Gramian mean)": median_ms(
            lambda: backward_step(gramian_mean), repeats
        ),
        "jac_to_grad, Mean": median_ms(lambda: aggregation_only(Mean()), repeats),
        "jac_to_grad, Mean concatenated": median_ms(
            lambda: aggregation_only(hooked(Mean())), repeats
        ),
        "jac_to_grad, Gramian mean": median_ms(lambda: aggregation_only(gramian_mean), repeats),
        "jac_to_grad, Gramian mean concatenated": median_ms(
            lambda: aggregation_only(hooked(GramianWeightedAggregator(MeanWeighting()))), repeats
        ),
        "floor: w @ J": median_ms(lambda: weights @ matrix, repeats),
        "floor: J @ J.T": median_ms(lambda: matrix @ matrix.T, repeats),
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
        for name, ms in bench(m, args.repeats).items():
            print(f"  {name:<42} {ms:9.2f}")


if __name__ == "__main__":
    main()
