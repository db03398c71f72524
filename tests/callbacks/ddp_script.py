"""Run by test_ddp.py: a 2-process CPU DDP (gloo) fit with SaliencyMonitor; each rank writes what it logged."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))

import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.loggers import TensorBoardLogger
from lightning_helpers import TinySimSiam, loader

from tsm_lightning import SaliencyMonitor


def main(out: Path) -> None:
    seed_everything(0)
    monitor = SaliencyMonitor(torch.randn(4, 3, 16, 16), layer="backbone.5", every_n_steps=2, num_images=4)
    trainer = Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=4,
        callbacks=[monitor],
        logger=TensorBoardLogger(out, name="tb", version=0),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(TinySimSiam(), loader())
    rank = trainer.global_rank
    (out / f"rank{rank}.json").write_text(
        json.dumps({"logged_steps": monitor.logged_steps, "step": trainer.global_step})
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
