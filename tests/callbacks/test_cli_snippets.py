from pathlib import Path

import pytest
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.demos.boring_classes import BoringDataModule, BoringModel

from tsm_lightning.callbacks import SaliencyMonitor

SNIPPETS = sorted((Path(__file__).parents[2] / "callbacks").glob("*.yaml"))


def test_there_are_snippets():
    assert len(SNIPPETS) >= 3


@pytest.mark.parametrize("path", SNIPPETS, ids=lambda p: p.name)
def test_snippet_instantiates_the_monitor(path, tmp_path):
    cli = LightningCLI(
        BoringModel,
        BoringDataModule,
        run=False,
        args=["--config", str(path), f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false"],
        save_config_callback=None,
    )
    monitors = [cb for cb in cli.trainer.callbacks if isinstance(cb, SaliencyMonitor)]
    assert len(monitors) == 1
    monitor = monitors[0]
    assert monitor.methods and (monitor.every_n_steps or monitor.every_n_epochs)
    if path.name == "ssl_resnet_backbone.yaml":
        assert monitor.layer == "backbone.7" and monitor.every_n_steps == 200 and len(monitor.methods) == 4
    if path.name == "vit_last_block.yaml":
        assert monitor.layer == "backbone.encoder.layers.encoder_layer_11"
        assert monitor.attention is True and monitor.attention_heads and monitor.num_images == 64
