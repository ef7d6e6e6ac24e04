"""Two-process (gloo) ``ddp`` training run: ``python _ddp_lightning.py OUT_DIR [STEPS [grouped]]``
(``grouped``: one PCD per layer of the trunk instead of one for the whole trunk).

Lightning starts the second process itself (by running this script again); each process saves
its parameters, its aggregator's state and the batches it trained on to ``OUT_DIR/rank<r>.pt``.
"""

import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lightning.pytorch import Callback, LightningModule, Trainer

from tests.integrations._lightning_models import PerLayerTwoTasks, TwoTasks, data, loader
from torchjd.aggregation import PCD

STEPS = int(sys.argv[2]) if len(sys.argv) > 2 else 3
GROUPED = len(sys.argv) > 3 and sys.argv[3] == "grouped"
BATCH_PER_PROCESS = 4


class _Batches(Callback):
    """Records the batches this process trains on."""

    def __init__(self) -> None:
        self.seen: list[list[torch.Tensor]] = []

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: list, batch_idx: int
    ) -> None:
        self.seen.append([t.clone() for t in batch])


def main(out: Path) -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    module = PerLayerTwoTasks(aggregator=PCD) if GROUPED else TwoTasks(PCD())
    batches = _Batches()
    trainer = Trainer(
        callbacks=[batches],
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=STEPS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, loader(data(), batch_size=BATCH_PER_PROCESS))
    params = [p.detach().clone() for p in module.parameters()]
    state = {k: v for k, v in module.aggregator.state_dict().items() if torch.is_tensor(v)}
    torch.save(
        {"params": params, "state": state, "batches": batches.seen},
        out / f"rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
