import sys
from pathlib import Path

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning_helpers import TinySimSiam, loader, trainer_kwargs
from PIL import Image

sys.path.insert(0, str(Path(__file__).parents[2] / "examples"))

from export_pictures import export

from tsm_lightning import SaliencyMonitor


def test_export_writes_the_logged_pngs_of_the_first_and_last_step(tmp_path):
    monitor = SaliencyMonitor(torch.randn(2, 3, 16, 16), layer="backbone.5", every_n_steps=2, strict=True)
    logger = TensorBoardLogger(tmp_path, name="tb")
    Trainer(callbacks=[monitor], **trainer_kwargs(tmp_path, logger=logger, max_steps=4)).fit(TinySimSiam(), loader())
    paths = export(logger.log_dir, "saliency/all", ["first", "last", "2"], tmp_path / "out")
    assert [p.name for p in paths] == ["saliency_all_step0.png", "saliency_all_step4.png", "saliency_all_step2.png"]
    with Image.open(paths[0]) as first:
        assert first.size[1] == 2 * 18 + 2 + 15  # two probe rows under the header
