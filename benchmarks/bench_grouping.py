"""Time a multi-task training step under the four grouping strategies of Gradient Vaccine.

Model (see the spec README): the 12-block MLP, ``Linear(256, 128)`` then 12 residual blocks
``x + fc2(relu(fc1(LayerNorm(x))))`` with ``fc1, fc2 = Linear(128, 128)``, then ``LayerNorm(128)``
(76 parameter tensors); encoder = stem + 6 blocks, decoder = 6 blocks + final norm. One
``Linear(128, 1)`` head per task, batch 64, inputs 256-d, MSE losses, SGD.

For GradVac and UPGrad, m = 2 and 8 tasks, and each strategy (together: 1 group, per network: 2,
per layer: 38, per tensor: 76), it reports the median time of one step (forward, ``mtl_backward``,
aggregation, ``optimizer.step()``) single-threaded, with the aggregation done

- by the loop ``for group, aggregator in zip(groups, aggregators): jac_to_grad(group,
  aggregator)`` (one aggregator instance per group), and
- by ``GroupedAggregator(groups, aggregator).jac_to_grad()``,

and the ratio of each to the whole-model step (one ``jac_to_grad`` on all the parameters). The
floor (``mtl_backward`` with no aggregation) is reported for reference.

Usage: ``python benchmarks/bench_grouping.py [--repeats N] [--m 2 8]``.
"""

import argparse
import random
import statistics
import time
from collections.abc import Callable

import torch
from _timing import single_thread
from torch import Tensor, nn
from torch.nn.functional import mse_loss

from torchjd.aggregation import Aggregator, GradVac, UPGrad
from torchjd.autojac import jac_to_grad, mtl_backward
from torchjd.grouping import GroupedAggregator, per_layer, per_network, per_tensor, together


class Block(nn.Module):
    def __init__(self, width: int = 128) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fc2(torch.relu(self.fc1(self.norm(x))))


def make_trunk() -> tuple[nn.Module, nn.Module, nn.Module]:
    encoder = nn.Sequential(nn.Linear(256, 128), *(Block() for _ in range(6)))
    decoder = nn.Sequential(*(Block() for _ in range(6)), nn.LayerNorm(128))
    return nn.Sequential(encoder, decoder), encoder, decoder


STRATEGIES = ("together", "per network", "per layer", "per tensor")


def make_groups(strategy: str, trunk: nn.Module, encoder: nn.Module, decoder: nn.Module) -> list:
    if strategy == "together":
        return together(trunk)
    if strategy == "per network":
        return per_network(encoder, decoder)
    if strategy == "per layer":
        return per_layer(trunk)
    return per_tensor(trunk)


def interleaved_median_ms(
    variants: dict[str, Callable[[], None]], repeats: int, warmup: int = 3
) -> dict[str, float]:
    """Median wall time of each variant in milliseconds, timed round by round (one call of each
    variant per round, in a new random order each round), so that a slower period of a shared
    machine, or the state of the caches left by the previous variant, affects all of them."""
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    order = list(variants)
    shuffler = random.Random(0)
    for _ in range(repeats):
        shuffler.shuffle(order)
        for name in order:
            fn = variants[name]
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: 1000 * statistics.median(t) for name, t in times.items()}


def bench(m: int, make_aggregator: Callable[[], Aggregator], repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    trunk, encoder, decoder = make_trunk()
    heads = nn.ModuleList(nn.Linear(128, 1) for _ in range(m))
    optimizer = torch.optim.SGD([*trunk.parameters(), *heads.parameters()], lr=1e-4)
    x = torch.randn(64, 256)
    targets = torch.randn(m, 64, 1)

    def backward() -> None:
        features = trunk(x)
        losses = [mse_loss(head(features), t) for head, t in zip(heads, targets)]
        mtl_backward(losses, features=features)

    def floor() -> None:
        backward()
        for p in trunk.parameters():
            del p.jac
        optimizer.zero_grad()

    variants: dict[str, Callable[[], None]] = {"floor (mtl_backward, no aggregation)": floor}
    for strategy in STRATEGIES:
        groups = make_groups(strategy, trunk, encoder, decoder)
        aggregators = [make_aggregator() for _ in groups]
        grouped = GroupedAggregator(groups, make_aggregator)

        def loop_step(groups: list = groups, aggregators: list = aggregators) -> None:
            backward()
            for group, aggregator in zip(groups, aggregators):
                jac_to_grad(group, aggregator)
            optimizer.step()
            optimizer.zero_grad()

        def grouped_step(grouped: GroupedAggregator = grouped) -> None:
            backward()
            grouped.jac_to_grad()
            optimizer.step()
            optimizer.zero_grad()

        variants[f"{strategy} ({len(groups)}) loop"] = loop_step
        variants[f"{strategy} ({len(groups)}) grouped"] = grouped_step
    return interleaved_median_ms(variants, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--m", type=int, nargs="+", default=[2, 8])
    args = parser.parse_args()
    single_thread()
    print("Median step time in ms; ratios to the whole-model step (one jac_to_grad call).")
    print("| aggregator | m | strategy (groups) | loop | grouped | loop ratio | grouped ratio |")
    print("|---|---|---|---|---|---|---|")
    for name, make in (("GradVac", GradVac), ("UPGrad", UPGrad)):
        for m in args.m:
            results = bench(m, make, args.repeats)
            floor = results.pop("floor (mtl_backward, no aggregation)")
            whole = results["together (1) loop"]
            ratio = floor / whole
            print(f"| {name} | {m} | floor: mtl_backward only | {floor:.2f} | | {ratio:.2f} | |")
            for label in results:
                if not label.endswith(" loop"):
                    continue
                strategy = label.removesuffix(" loop")
                loop, grouped = results[label], results[f"{strategy} grouped"]
                print(
                    f"| {name} | {m} | {strategy} | {loop:.2f} | {grouped:.2f} | "
                    f"{loop / whole:.2f} | {grouped / whole:.2f} |"
                )


if __name__ == "__main__":
    main()
