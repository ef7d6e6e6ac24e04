"""Multi-task learning with Jacobian descent on several processes, with DistributedDataParallel.

Run it on the CPU with two processes:

    torchrun --nproc_per_node=2 examples/ddp_training.py

Each process trains the same model on its own shard of every batch. The Jacobian of the task
losses w.r.t. the shared trunk is the mean of the processes' Jacobians; UPGrad aggregates that
global Jacobian (not each local one), so that every process ends each step with the same
``.grad``, the one a single process would get on the whole batch.
"""

import argparse
import gc

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.functional import mse_loss
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from torchjd import distributed
from torchjd.aggregation import UPGrad
from torchjd.autojac import mtl_backward

N_TASKS = 3


class MultiTaskNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU())
        self.heads = nn.ModuleList(nn.Linear(32, 1) for _ in range(N_TASKS))

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        features = self.trunk(x)
        return features, [head(features).squeeze(1) for head in self.heads]


def make_dataset(size: int = 512) -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(size, 16, generator=generator)
    y = torch.tanh(x @ torch.randn(16, N_TASKS, generator=generator))
    return TensorDataset(x, y + 0.1 * torch.randn(size, N_TASKS, generator=generator))


def train(epochs: int = 3, batch_size: int = 32) -> list[float]:
    """Train on the process group already initialised; return the mean loss of each epoch."""
    world_size = dist.get_world_size()
    torch.manual_seed(0)  # DistributedDataParallel also copies the first process's parameters
    model = MultiTaskNet()
    ddp_model = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    aggregator = UPGrad()

    dataset = make_dataset()
    sampler = DistributedSampler(dataset, shuffle=True, seed=0, drop_last=True)
    loader = DataLoader(dataset, batch_size=batch_size // world_size, sampler=sampler)

    history = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        total = torch.zeros(())
        for x, y in loader:
            features, outputs = ddp_model(x)  # through DDP: it keeps the buffers in step
            losses = [mse_loss(out, y[:, i]) for i, out in enumerate(outputs)]
            mtl_backward(losses, features=features)  # local .jac (trunk), local .grad (heads)
            # One exchange for the trunk's Jacobians and the heads' gradients, then UPGrad on
            # the Jacobian of the whole batch, with the same result on every process.
            distributed.jac_to_grad(
                model.trunk.parameters(), aggregator, grad_params=model.heads.parameters()
            )
            optimizer.step()
            optimizer.zero_grad()
            total += sum(loss.detach() for loss in losses) / N_TASKS
        dist.all_reduce(total)  # for the log only: the mean over the processes
        history.append(total.item() / (world_size * len(loader)))

    _check_replicas_agree(model)
    return history


def _check_replicas_agree(model: nn.Module) -> None:
    params = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gathered = [torch.empty_like(params) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, params)
    assert all(torch.equal(g, params) for g in gathered), "the replicas drifted apart"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    dist.init_process_group(backend="gloo")  # torchrun sets the rank, size and address
    try:
        history = train(args.epochs)
        if dist.get_rank() == 0:
            for epoch, loss in enumerate(history):
                print(f"epoch {epoch}: mean task loss {loss:.4f}")
            print(f"{dist.get_world_size()} processes ended with identical parameters.")
        # DistributedDataParallel modules can linger in reference cycles: free them on every
        # process before the process group goes, or a process may abort at exit.
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
