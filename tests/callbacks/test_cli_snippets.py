from pathlib import Path

import pytest
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.demos.boring_classes import BoringDataModule, BoringModel

from tsm_lightning.callbacks import SaliencyMonitor
from tsm_lightning.options import DisplayOptions, MapOptions

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
        assert monitor.tracker.map_options == MapOptions(attention=True, attention_heads=True)
        assert monitor.num_images == 64
    if path.name == "tsm_only_every_epoch.yaml":
        assert monitor.methods == ("tsm", "mtsm") and monitor.every_n_epochs == 1 and monitor.num_images == 16
        assert monitor.tracker.display == DisplayOptions(images=8, tile_size=128, colormap="inferno", alpha=0.6)
