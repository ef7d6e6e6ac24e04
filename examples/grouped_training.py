"""Grouped Jacobian descent on a small multi-task regression problem.

Trains the same encoder-decoder model with two task heads under the four parameter-grouping
strategies of the Gradient Vaccine paper (Wang et al., ICLR 2021), one GradVac instance per group,
and prints the per-step losses of both tasks.

Run it with ``bash scripts/demo.sh`` (or ``python examples/grouped_training.py --steps 30``).
"""

import argparse

import torch
from torch import nn
from torch.nn.functional import mse_loss

from torchjd.aggregation import GradVac
from torchjd.autojac import jac_to_grad, mtl_backward


def make_model() -> tuple[nn.Module, nn.Module, nn.Module, nn.Module]:
    encoder = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU())
    decoder = nn.Sequential(nn.Linear(32, 16), nn.ReLU())
    return encoder, decoder, nn.Linear(16, 1), nn.Linear(16, 1)


def groups_for(strategy: str, encoder: nn.Module, decoder: nn.Module) -> list[list[nn.Parameter]]:
    shared = [*encoder.parameters(), *decoder.parameters()]
    if strategy == "together":
        return [shared]
    if strategy == "per_network":
        return [list(encoder.parameters()), list(decoder.parameters())]
    if strategy == "per_layer":
        leaves = [m for m in (*encoder.modules(), *decoder.modules()) if not list(m.children())]
        return [list(m.parameters()) for m in leaves if list(m.parameters())]
    if strategy == "per_tensor":
        return [[p] for p in shared]
    raise ValueError(f"Unknown strategy {strategy!r}.")


def make_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=generator)
    direction = torch.randn(16, generator=generator)
    # Two partly conflicting targets: both depend on the same direction with opposite signs.
    y_a = torch.sin(x @ direction).unsqueeze(1)
    y_b = (-(x @ direction) + 0.5 * x[:, 0] ** 2).unsqueeze(1)
    return x, y_a, y_b


def train(strategy: str, steps: int, seed: int, print_every: int) -> tuple[float, float]:
    torch.manual_seed(seed)
    encoder, decoder, head_a, head_b = make_model()
    groups = groups_for(strategy, encoder, decoder)
    aggregators = [GradVac() for _ in groups]  # one instance, hence one EMA state, per group
    modules = (encoder, decoder, head_a, head_b)
    optimizer = torch.optim.SGD([p for m in modules for p in m.parameters()], lr=0.05)
    x, y_a, y_b = make_data(256, seed)

    for step in range(1, steps + 1):
        batch = torch.randint(0, x.shape[0], (32,))
        features = decoder(encoder(x[batch]))
        loss_a = mse_loss(head_a(features), y_a[batch])
        loss_b = mse_loss(head_b(features), y_b[batch])
        mtl_backward([loss_a, loss_b], features=features)
        for group, aggregator in zip(groups, aggregators):
            jac_to_grad(group, aggregator)
        optimizer.step()
        optimizer.zero_grad()
        if step % print_every == 0 or step == steps:
            print(f"  [{strategy:>11}] step {step:3d}  loss_a={loss_a:.4f}  loss_b={loss_b:.4f}")

    with torch.no_grad():
        features = decoder(encoder(x))
        return mse_loss(head_a(features), y_a).item(), mse_loss(head_b(features), y_b).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="training steps per strategy")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--print-every", type=int, default=10, help="print losses every N steps")
    args = parser.parse_args()

    results = {}
    for strategy in ("together", "per_network", "per_layer", "per_tensor"):
        print(f"GradVac, grouping '{strategy}':")
        results[strategy] = train(strategy, args.steps, args.seed, args.print_every)
    print("\nFinal full-data losses:")
    for strategy, (loss_a, loss_b) in results.items():
        print(f"  {strategy:>11}: task A {loss_a:.4f}   task B {loss_b:.4f}")


if __name__ == "__main__":
    main()
