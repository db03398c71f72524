"""Each promise the README makes about the monitor, guarded by a test that fails when the guarding code is removed.

Every monitor here runs under ``strict=True`` (and ``pyproject.toml`` turns any "SaliencyMonitor skipped step"
warning into an error), so a test cannot pass because the monitor failed and only warned.
"""

import random
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback, LightningDataModule, Trainer, seed_everything
from lightning.pytorch.loggers import TensorBoardLogger
from lightning_helpers import TinySimSiam, TwoViewNoise, loader, trainer_kwargs
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader, Dataset

from tsm_lightning import METHODS, DisplayOptions, MetricOptions, Probe, SaliencyMonitor, Tracker
from tsm_lightning.data import ImageFolder, SyntheticShapes

LAYER = "backbone.5"  # (B, 16, 8, 8) at 16x16 inputs


def _fit(tmp_path, monitor, *, model=None, datamodule=None, seed=0, callbacks=(), **overrides):
    seed_everything(seed, workers=True)
    model = model or TinySimSiam()
    trainer = Trainer(callbacks=[monitor, *callbacks], **trainer_kwargs(tmp_path, **overrides))
    if datamodule is not None:
        trainer.fit(model, datamodule=datamodule)
    else:
        trainer.fit(model, loader())
    return trainer, model


def _scalar_tags(log_dir) -> set[str]:
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return set(acc.Tags()["scalars"])


# ------------------------------------------------------------------------------------------------ probe size
def test_small_tensor_probe_is_used_whole(tmp_path):
    # The README's own example: a probe of 4 images and no num_images. It used to fail with "num_images=8".
    monitor = SaliencyMonitor(probe=torch.rand(4, 3, 16, 16), layer=LAYER, every_n_steps=3, strict=True)
    _fit(tmp_path, monitor, logger=False)
    assert monitor.probe.images.shape[0] == 4 and monitor.logged_steps == [0, 3, 6]


def test_large_probe_is_analysed_whole_and_displayed_in_part(tmp_path):
    masks = torch.zeros(12, 16, 16, dtype=torch.bool)
    masks[:, 2:9, 3:10] = True
    monitor = SaliencyMonitor(
        Probe(torch.randn(12, 3, 16, 16), masks),
        layer=LAYER,
        every_n_steps=3,
        strict=True,
        display=DisplayOptions(images=3),
    )
    _fit(tmp_path, monitor, logger=False)
    assert all(m.shape == (12, 8, 8) for m in monitor.tracker.previous_maps.values())
    with Image.open(tmp_path / "saliency" / "saliency_all_step0000000.png") as picture:
        assert picture.size[1] == 3 * 18 + 2 + 15  # three rows of 16-px tiles under the header


# ------------------------------------------------------------------------------------------------ references
def test_reference_series_are_logged_beside_the_curves(tmp_path):
    masks = torch.zeros(6, 16, 16, dtype=torch.bool)
    masks[:3, 2:8, 2:8] = True
    masks[3:, 8:16, 4:12] = True
    logger = TensorBoardLogger(tmp_path, name="tb")
    monitor = SaliencyMonitor(Probe(torch.randn(6, 3, 16, 16), masks), layer=LAYER, every_n_steps=3, strict=True)
    _fit(tmp_path, monitor, logger=logger)
    tags = _scalar_tags(logger.log_dir)
    area = float(masks.flatten(1).float().mean(1).mean())
    assert monitor.tracker.references["saliency/chance/pointing_game"] == pytest.approx(area)
    for metric in ("pointing_game", "energy_in_mask", "mask_iou"):
        assert f"saliency/random/{metric}" in tags
    for name in METHODS:
        value = monitor.tracker.references[f"saliency/fresh_init_{name}/stability_first"]
        assert -1.0 <= value <= 1.0
        assert f"saliency/fresh_init_{name}/stability_first" in tags
    for tag in ("embedding/spread", "embedding/effective_rank", "isotropic/spread", "isotropic/effective_rank"):
        assert f"saliency/{tag}" in tags


def test_fresh_init_reference_uses_a_copy_with_new_weights(tmp_path):
    # A copy that kept the model's weights would correlate perfectly with the first maps.
    monitor = SaliencyMonitor(torch.randn(8, 3, 16, 16), layer=LAYER, every_n_steps=3, strict=True)
    model = TinySimSiam()
    _fit(tmp_path, monitor, model=model, logger=False, max_steps=1)
    values = [monitor.tracker.references[f"saliency/fresh_init_{name}/stability_first"] for name in METHODS]
    assert max(values) < 0.99


@pytest.mark.parametrize("enabled", [True, False])
def test_end_of_training_warns_when_the_maps_end_more_spread_than_a_fresh_network(tmp_path, monkeypatch, enabled):
    import tsm_lightning.tracking as tracking

    real = tracking.fresh_init_scalars

    # A fresh-init reference below any real spread: the last run's maps are "more spread out" than it.
    def low_reference(fresh, first):
        return {**real(fresh, first), "saliency/fresh_init_tsm/mass_spread": 0.0}

    monkeypatch.setattr(tracking, "fresh_init_scalars", low_reference)
    monitor = SaliencyMonitor(
        torch.randn(8, 3, 16, 16),
        layer=LAYER,
        every_n_steps=3,
        metrics=MetricOptions(spread_warning=enabled),
        strict=True,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(tmp_path, monitor, logger=False, max_steps=3)
    messages = [str(w.message) for w in caught if "more spread out" in str(w.message)]
    assert len(messages) == (1 if enabled else 0)  # once, at the end of training
    if enabled:
        assert "the tsm maps" in messages[0] and "> reference 0.000" in messages[0]


# ------------------------------------------------------------------------------------------------ RNG and autocast
class _RngRecorder(Callback):
    """Records every global RNG stream at ``on_train_batch_end``/``on_train_start``; placed around the monitor."""

    def __init__(self) -> None:
        self.states: list[tuple] = []

    def _record(self) -> None:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
        self.states.append((torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate(), cuda))

    def on_train_start(self, trainer, pl_module) -> None:
        self._record()

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self._record()


def _greedy_forward(module, images):
    # User code that draws from every global stream, as augmenting or sampling code does.
    torch.rand(3)
    np.random.rand(3)
    random.random()
    if torch.cuda.is_available():
        torch.rand(3, device="cuda")
    return module.backbone(images)


def _greedy_embed(pl_module):
    def embed(images):
        torch.rand(3)
        np.random.rand(3)
        random.random()
        return pl_module.backbone(images)

    return embed


@pytest.mark.parametrize("drawer", ["forward_fn", "embed_fn"])
def test_every_rng_stream_is_left_as_it_was(tmp_path, drawer):
    before, after = _RngRecorder(), _RngRecorder()
    model = TinySimSiam()
    forward_fn = _greedy_forward if drawer == "forward_fn" else None
    embed_fn = _greedy_embed(model) if drawer == "embed_fn" else None
    monitor = SaliencyMonitor(
        torch.randn(4, 3, 16, 16),
        layer=LAYER,
        every_n_steps=1,
        forward_fn=forward_fn,
        metrics=MetricOptions(faithfulness_every_n_runs=1, faithfulness_steps=2, embed_fn=embed_fn),
        strict=True,
    )
    seed_everything(0, workers=True)
    trainer = Trainer(callbacks=[before, monitor, after], **trainer_kwargs(tmp_path, logger=False, max_steps=3))
    trainer.fit(model, loader())
    assert monitor.logged_steps == [0, 1, 2, 3]
    assert len(before.states) == len(after.states) == 4
    for (t0, n0, p0, c0), (t1, n1, p1, c1) in zip(before.states, after.states, strict=True):
        assert torch.equal(t0, t1)
        assert np.array_equal(n0, n1)
        assert p0 == p1
        assert all(torch.equal(a, b) for a, b in zip(c0, c1, strict=True))


def test_probe_forward_runs_outside_autocast():
    model = TinySimSiam()
    seen = []

    def forward(module, images):
        seen.append(torch.is_autocast_enabled("cpu"))
        return module.backbone(images)

    tracker = Tracker(LAYER, forward_fn=forward)
    tracker.prepare(model, Probe(torch.randn(4, 3, 16, 16)))
    _, plain = tracker.compute(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        features, mixed = tracker.compute(model)
    assert seen == [False, False]
    assert features.dtype == torch.float32
    assert all(torch.equal(plain[name], mixed[name]) for name in plain)


# ------------------------------------------------------------------------------------------------ probe sources
class _ValData(LightningDataModule):
    def train_dataloader(self):
        return loader()

    def val_dataloader(self):
        return DataLoader(TwoViewNoise(n=6, seed=7), batch_size=3)


def test_probe_from_the_datamodules_validation_data(tmp_path):
    monitor = SaliencyMonitor(layer=LAYER, every_n_steps=3, strict=True)
    _fit(tmp_path, monitor, datamodule=_ValData(), logger=False, limit_val_batches=0)
    # All six validation samples (fewer than the default eight), first view, in dataset order.
    first_views = torch.stack([TwoViewNoise(n=6, seed=7).images[i] for i in range(6)])
    assert monitor.probe.images.shape == (6, 3, 16, 16)
    assert (monitor.probe.images - first_views).abs().max() < 0.6
    assert not torch.equal(monitor.probe.images[:4], TwoViewNoise().images[:4])


def test_probe_from_an_image_folder(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(3):
        pixels = (torch.rand(20, 24, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"img{i}.png")
    monitor = SaliencyMonitor(ImageFolder(folder, image_size=16), layer=LAYER, every_n_steps=3, strict=True)
    _fit(tmp_path / "run", monitor, logger=False)
    assert monitor.probe.images.shape == (3, 3, 16, 16) and monitor.logged_steps == [0, 3, 6]


class _FlipViews(Dataset):
    """(view, mask) pairs whose view is randomly flipped: the mask does not describe it."""

    def __init__(self, plain: bool = False) -> None:
        self.shapes = SyntheticShapes(8, image_size=16, seed=0)
        self.plain = plain

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int):
        image, mask = self.shapes[i]
        if not self.plain and torch.rand(()) < 0.5:
            image = image.flip(-1)
        return image, mask


class _FlipViewsWithPlainTwin(_FlipViews):
    def without_augmentation(self) -> Dataset:
        return _FlipViews(plain=True)


def test_masks_of_augmented_views_are_never_used(tmp_path):
    with pytest.warns(UserWarning, match="localization metrics are skipped"):
        monitor = SaliencyMonitor(_FlipViews(), layer=LAYER, every_n_steps=3, strict=True)
        logger = TensorBoardLogger(tmp_path, name="tb")
        _fit(tmp_path, monitor, logger=logger)
    assert monitor.probe.masks is None
    assert not any("pointing_game" in tag for tag in _scalar_tags(logger.log_dir))


def test_augmented_dataset_with_a_plain_twin_gives_aligned_masks(tmp_path):
    monitor = SaliencyMonitor(_FlipViewsWithPlainTwin(), layer=LAYER, every_n_steps=3, strict=True)
    _fit(tmp_path, monitor, logger=False)
    images, masks = SyntheticShapes(8, image_size=16, seed=0).probe(8)
    assert torch.equal(monitor.probe.images, images) and torch.equal(monitor.probe.masks, masks)


# ------------------------------------------------------------------------------------------------ options
@pytest.mark.parametrize(("start", "end", "steps"), [(False, True, [3, 6]), (True, False, [0, 3]), (False, False, [3])])
def test_fit_start_and_end_runs_can_be_turned_off(tmp_path, start, end, steps):
    monitor = SaliencyMonitor(
        torch.randn(2, 3, 16, 16),
        layer=LAYER,
        every_n_steps=3,
        strict=True,
        log_on_fit=(("start",) if start else ()) + (("end",) if end else ()),
    )
    _fit(tmp_path, monitor, logger=False, max_steps=5 if not end else 6)
    assert monitor.logged_steps == steps


def test_embed_fn_is_what_faithfulness_uses(tmp_path):
    calls = []

    def embed(images):
        calls.append(images.shape[0])
        return images.mean(dim=(2, 3))

    monitor = SaliencyMonitor(
        torch.randn(2, 3, 16, 16),
        layer=LAYER,
        every_n_steps=3,
        strict=True,
        metrics=MetricOptions(faithfulness_every_n_runs=1, faithfulness_steps=2, embed_fn=embed),
    )
    logger = TensorBoardLogger(tmp_path, name="tb")
    _fit(tmp_path, monitor, logger=logger)
    assert calls and sum(calls) >= 3 * 2  # every run embedded the probe and its perturbations
    assert "saliency/tsm/deletion_auc" in _scalar_tags(logger.log_dir)


def test_bf16_true_precision(tmp_path):
    monitor = SaliencyMonitor(torch.randn(2, 3, 16, 16), layer=LAYER, every_n_steps=3, strict=True)
    _, model = _fit(tmp_path, monitor, logger=False, precision="bf16-true")
    assert next(model.parameters()).dtype == torch.bfloat16
    assert monitor.logged_steps == [0, 3, 6]
    assert all(m.dtype == torch.float32 and torch.isfinite(m).all() for m in monitor.tracker.previous_maps.values())


def test_log_image_loggers_get_images_and_scalars(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="tsm-test")
    logged: list[dict] = []
    log_metrics = logger.log_metrics

    def recording_log_metrics(metrics, step=None):  # records, then logs for real
        logged.append(dict(metrics))
        log_metrics(metrics, step)

    logger.log_metrics = recording_log_metrics
    monitor = SaliencyMonitor(torch.randn(2, 3, 16, 16), layer=LAYER, every_n_steps=3, methods=["tsm"], strict=True)
    _fit(tmp_path, monitor, logger=logger)
    run_dir = Path(logger.experiment.dir)
    logger.experiment.finish()
    media = sorted(p.name for p in (run_dir / "media" / "images" / "saliency").glob("*.png"))
    assert len([m for m in media if m.startswith("tsm_")]) == 3 and len([m for m in media if m.startswith("all_")]) == 3
    entropies = [m["saliency/tsm/entropy"] for m in logged if "saliency/tsm/entropy" in m]
    assert len(entropies) == 3 and all(0.0 <= e <= 1.0 for e in entropies)
    assert wandb.run is None
