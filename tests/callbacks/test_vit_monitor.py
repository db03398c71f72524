"""SaliencyMonitor on a vision transformer in a real Trainer: token grids, the attention map, no side effects.

Every monitor runs under ``strict=True``, so a test cannot pass because the monitor failed and only warned.
"""

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.loggers import TensorBoardLogger
from lightning_helpers import TinyViTSimSiam, loader, trainer_kwargs
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tsm_lightning import METHODS, MapOptions, MetricOptions, Probe, SaliencyMonitor

LAST_BLOCK = "backbone.encoder.layers.encoder_layer_1"


def _fit(tmp_path, monitor=None, **overrides):
    seed_everything(0, workers=True)
    model = TinyViTSimSiam()
    callbacks = [monitor] if monitor is not None else []
    trainer = Trainer(callbacks=callbacks, **trainer_kwargs(tmp_path, **overrides))
    trainer.fit(model, loader())
    return trainer, model


def _events(log_dir) -> EventAccumulator:
    acc = EventAccumulator(str(log_dir), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc


def test_vit_training_is_bit_identical_with_and_without_the_monitor(tmp_path):
    _, plain = _fit(tmp_path / "a")
    masks = torch.zeros(4, 16, 16, dtype=torch.bool)
    masks[:, 4:12, 4:12] = True
    monitor = SaliencyMonitor(
        Probe(torch.randn(4, 3, 16, 16), masks),
        every_n_steps=2,
        strict=True,
        maps=MapOptions(attention_heads=True),
        metrics=MetricOptions(faithfulness_every_n_runs=2),
    )
    with pytest.warns(UserWarning, match=r"monitoring 'backbone\.encoder\.layers\.encoder_layer_1' \(the last transfo"):
        _, watched = _fit(tmp_path / "b", monitor, logger=TensorBoardLogger(tmp_path / "b"))
    assert monitor.layer == LAST_BLOCK  # never the patch embedding conv_proj
    assert monitor.logged_steps == [0, 2, 4, 6]
    assert plain.losses == watched.losses
    for key, value in plain.state_dict().items():
        assert torch.equal(value, watched.state_dict()[key]), key

    acc = _events(tmp_path / "b" / "lightning_logs" / "version_0")
    images = acc.Tags()["images"]
    assert {"saliency/attention", "saliency/attention_heads", "saliency/all"} <= set(images)
    assert [e.step for e in acc.Images("saliency/attention")] == [0, 2, 4, 6]
    scalars = set(acc.Tags()["scalars"])
    for tag in (
        "attention/entropy",
        "attention/pointing_game",
        "attention/stability_first",
        "attention/deletion_auc",
        "tsm/agreement_attention",
        "attention/agreement_mtsm",
        "fresh_init_attention/stability_first",
        "random/pointing_game",
    ):
        assert f"saliency/{tag}" in scalars, tag
    assert set(monitor.tracker.first_maps) == {*METHODS, "attention"}
    assert monitor.tracker.first_maps["tsm"].shape == (4, 4, 4)  # the 4x4 token grid


def test_attention_can_be_turned_off_and_is_an_error_without_attention(tmp_path):
    monitor = SaliencyMonitor(
        torch.randn(2, 3, 16, 16), layer=LAST_BLOCK, every_n_steps=3, strict=True, maps=MapOptions(attention=False)
    )
    _fit(tmp_path, monitor, logger=False, max_steps=3)
    assert set(monitor.tracker.first_maps) == set(METHODS)
    with pytest.raises(ValueError, match="attention must be None"):
        SaliencyMonitor(layer=LAST_BLOCK, maps=MapOptions(attention="yes"))
    with pytest.raises(ValueError, match="token_grid must be"):
        SaliencyMonitor(layer=LAST_BLOCK, maps=MapOptions(token_grid=(4, 4)))
