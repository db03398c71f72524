import io
import warnings
from pathlib import Path

import pytest
import torch
from helpers import tiny_cnn
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning_helpers import TinySimSiam, TwoViewNoise, loader, trainer_kwargs
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tsm_lightning import METHODS, DisplayOptions, MapOptions, MetricOptions, Probe, SaliencyMonitor, Tracker

LAYER = "backbone.5"  # (B, 16, 8, 8) at 16x16 inputs


def _events(log_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(log_dir), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc


def _fit(tmp_path, monitor=None, seed=0, **overrides):
    seed_everything(seed, workers=True)
    model = TinySimSiam()
    callbacks = [monitor] if monitor is not None else []
    trainer = Trainer(callbacks=callbacks, **trainer_kwargs(tmp_path, **overrides))
    trainer.fit(model, loader(num_workers=overrides.pop("num_workers", 0)))
    return trainer, model


def test_logs_images_and_scalars_to_tensorboard(tmp_path):
    probe = torch.randn(4, 3, 16, 16)
    monitor = SaliencyMonitor(probe, layer=LAYER, every_n_steps=2, num_images=4, display=DisplayOptions(tile_size=32))
    logger = TensorBoardLogger(tmp_path, name="tb")
    trainer, _ = _fit(tmp_path, monitor, logger=logger)
    acc = _events(logger.log_dir)
    tags = acc.Tags()["images"]
    for name in METHODS:
        tag = f"saliency/{name}"
        assert tag in tags
        steps = [event.step for event in acc.Images(tag)]
        assert steps == [0, 2, 4, 6]
        picture = Image.open(io.BytesIO(acc.Images(tag)[-1].encoded_image_string))
        # Two rows (inputs, overlays) of four 32-px tiles with 2-px padding, and a band naming the rows.
        assert picture.size[1] == 2 * 34 + 2 and picture.size[0] > 4 * 34 + 2 + 20
    compare = Image.open(io.BytesIO(acc.Images("saliency/all")[0].encoded_image_string))
    # One row per probe image, input + four methods, under a header row naming the columns.
    assert compare.size == (5 * 34 + 2, 4 * 34 + 2 + 15)
    scalars = acc.Tags()["scalars"]
    for tag in ("tsm/stability_prev", "mtsm/stability_first", "tsm/entropy", "eigencam/agreement_tsm"):
        assert f"saliency/{tag}" in scalars, tag
    assert "saliency/features/spectral_concentration" in scalars
    assert [e.step for e in acc.Scalars("saliency/tsm/stability_first")] == [2, 4, 6]
    assert monitor.logged_steps == [0, 2, 4, 6]
    assert trainer.global_step == 6


def test_training_is_bit_identical_with_and_without_monitor(tmp_path):
    _, plain = _fit(tmp_path / "a")
    monitor = SaliencyMonitor(
        layer=LAYER, every_n_steps=1, num_images=4, metrics=MetricOptions(faithfulness_every_n_runs=2)
    )
    _, watched = _fit(tmp_path / "b", monitor, logger=TensorBoardLogger(tmp_path / "b"))
    assert monitor.logged_steps == [0, 1, 2, 3, 4, 5, 6]
    assert plain.losses == watched.losses
    for key, value in plain.state_dict().items():
        assert torch.equal(value, watched.state_dict()[key]), key


def test_model_left_untouched_by_a_run(tmp_path):
    model = TinySimSiam()
    model.train()
    model.backbone[1].eval()  # a frozen BatchNorm stays frozen
    model(torch.randn(4, 3, 16, 16)).sum().backward()
    modes = {n: m.training for n, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    tracker, probe = Tracker(LAYER), Probe(torch.randn(3, 3, 16, 16))
    rng = torch.random.get_rng_state()
    tracker.prepare(model, probe)
    features, maps = tracker.compute(model)
    assert features.shape == (3, 16, 8, 8) and set(maps) == set(METHODS)
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert all(not m._forward_hooks for m in model.modules())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(p.grad, grads[k]) for k, p in model.named_parameters() if p.grad is not None)
    assert torch.equal(torch.random.get_rng_state(), rng)


def test_probe_from_train_dataloader_unwraps_views_and_is_fixed(tmp_path):
    monitor = SaliencyMonitor(layer=LAYER, every_n_steps=3, num_images=4)
    _fit(tmp_path, monitor, logger=False)
    # First view of the first four samples, in dataset order (not the shuffled training order).
    expected_base = TwoViewNoise().images[:4]
    assert monitor.probe.images.shape == (4, 3, 16, 16)
    assert (monitor.probe.images - expected_base).abs().max() < 0.6
    first = monitor.probe.images.clone()
    monitor2 = SaliencyMonitor(layer=LAYER, every_n_steps=3, num_images=4)
    _fit(tmp_path / "again", monitor2, logger=False, seed=123)
    assert torch.equal(first, monitor2.probe.images)


def test_without_logger_writes_pngs(tmp_path):
    monitor = SaliencyMonitor(torch.randn(2, 3, 16, 16), layer=LAYER, every_n_steps=3, num_images=2, methods=["tsm"])
    _fit(tmp_path, monitor, logger=False)
    files = sorted(p.name for p in (tmp_path / "saliency").glob("*.png"))
    assert files == [
        "saliency_all_step0000000.png",
        "saliency_all_step0000003.png",
        "saliency_all_step0000006.png",
        "saliency_tsm_step0000000.png",
        "saliency_tsm_step0000003.png",
        "saliency_tsm_step0000006.png",
    ]


def test_csv_logger_gets_pngs_and_metrics(tmp_path):
    monitor = SaliencyMonitor(torch.randn(2, 3, 16, 16), layer=LAYER, every_n_steps=3, num_images=2)
    logger = CSVLogger(tmp_path, name="csv")
    _fit(tmp_path, monitor, logger=logger)
    assert len(list((Path(logger.log_dir) / "saliency").glob("saliency_mtsm_step*.png"))) == 3
    text = (Path(logger.log_dir) / "metrics.csv").read_text()
    assert "saliency/eigencam/stability_first" in text and "saliency/tsm/gini" in text


def test_every_n_epochs_and_fit_end(tmp_path):
    monitor = SaliencyMonitor(torch.randn(2, 3, 16, 16), layer=LAYER, every_n_epochs=2, num_images=2)
    _fit(tmp_path, monitor, logger=False, max_steps=-1, max_epochs=3)  # 4 steps per epoch
    assert monitor.logged_steps == [0, 8, 12]


def test_automatic_layer_discovery_warns_once(tmp_path):
    monitor = SaliencyMonitor(torch.randn(2, 3, 16, 16), every_n_steps=3, num_images=2)
    with pytest.warns(UserWarning, match=r"monitoring 'backbone.5', a 8x8 grid") as record:
        _fit(tmp_path, monitor, logger=False)
    assert sum("monitoring" in str(w.message) for w in record) == 1


def test_resume_keeps_probe_baseline_and_steps(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=4)
    monitor = SaliencyMonitor(layer=LAYER, every_n_steps=2, num_images=4)
    logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    seed_everything(0)
    trainer = Trainer(
        callbacks=[monitor, ckpt], logger=logger, **trainer_kwargs(tmp_path, max_steps=4, enable_checkpointing=True)
    )
    trainer.fit(TinySimSiam(), loader())
    assert monitor.logged_steps == [0, 2, 4]

    resumed = SaliencyMonitor(layer=LAYER, every_n_steps=2, num_images=4)
    logger2 = TensorBoardLogger(tmp_path, name="tb", version=0)
    trainer2 = Trainer(
        callbacks=[resumed, ckpt], logger=logger2, **trainer_kwargs(tmp_path, max_steps=8, enable_checkpointing=True)
    )
    # A different training loader: the probe must come from the checkpoint, not be drawn again.
    trainer2.fit(TinySimSiam(), loader(seed=5), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert torch.equal(resumed.probe.images, monitor.probe.images)
    assert resumed.logged_steps == [0, 2, 4, 6, 8]
    for name in METHODS:
        torch.testing.assert_close(resumed.tracker.first_maps[name], monitor.tracker.first_maps[name])
    steps = [e.step for e in _events(logger2.log_dir).Images("saliency/tsm")]
    assert sorted(set(steps)) == steps == [0, 2, 4, 6, 8]


def test_nan_features_warn_and_skip(tmp_path):
    monitor = SaliencyMonitor(torch.full((2, 3, 16, 16), float("nan")), layer=LAYER, every_n_steps=3, num_images=2)
    with pytest.warns(RuntimeWarning, match="skipped step [036]: FloatingPointError") as record:
        _fit(tmp_path, monitor, logger=False)
    skipped = [str(w.message).split(":")[0] for w in record if w.category is RuntimeWarning]
    assert skipped == [f"SaliencyMonitor skipped step {s}" for s in (0, 3, 6)]
    assert monitor.logged_steps == []


def test_strict_mode_raises(tmp_path):
    def broken(module, images):
        raise KeyError("user code failed")

    monitor = SaliencyMonitor(torch.randn(2, 3, 16, 16), layer=LAYER, num_images=2, forward_fn=broken, strict=True)
    with pytest.raises(KeyError, match="user code failed"):
        _fit(tmp_path, monitor, logger=False)


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: SaliencyMonitor(every_n_steps=5, every_n_epochs=1), ValueError, "either every_n_steps"),
        (lambda: SaliencyMonitor(every_n_steps=0), ValueError, "positive integer"),
        (lambda: SaliencyMonitor(every_n_epochs=True), ValueError, "every_n_epochs must be a positive integer"),
        (lambda: SaliencyMonitor(methods=["tsm", "gradcam"]), ValueError, "valid methods"),
        (lambda: SaliencyMonitor(num_images=0), ValueError, "num_images"),
        (lambda: SaliencyMonitor(probe=[1, 2, 3]), TypeError, "probe must be"),
        (lambda: SaliencyMonitor(log_on_fit=["begin"]), ValueError, "subset of"),
        (lambda: SaliencyMonitor(log_on_fit="start"), ValueError, "subset of"),
        (lambda: SaliencyMonitor(display={"images": 3}), TypeError, "DisplayOptions"),
        (lambda: SaliencyMonitor(metrics="yes"), TypeError, "MetricOptions"),
        (lambda: SaliencyMonitor(sinks=[object()]), TypeError, "write"),
        (lambda: SaliencyMonitor(seed=1.5), ValueError, "seed"),
        (lambda: DisplayOptions(colormap="rainbow"), ValueError, "valid colormaps"),
        (lambda: DisplayOptions(alpha=2.0), ValueError, "alpha"),
        (lambda: DisplayOptions(mean=(0.5, 0.5)), ValueError, "3 values"),
        (lambda: DisplayOptions(images=0), ValueError, "DisplayOptions.images"),
        (lambda: DisplayOptions(tile_size=4), ValueError, "tile_size"),
        (lambda: MapOptions(num_components=0), ValueError, "num_components"),
        (lambda: MapOptions(num_components=True), ValueError, "num_components"),
        (lambda: MapOptions(weighting="log"), ValueError, "valid weightings"),
        (lambda: MapOptions(attention="yes"), ValueError, "attention"),
        (lambda: MetricOptions(faithfulness_every_n_runs=0), ValueError, "faithfulness_every_n_runs"),
        (lambda: MetricOptions(faithfulness_steps=1), ValueError, "faithfulness_steps"),
        (lambda: MetricOptions(enabled=1), ValueError, "enabled"),
    ],
)
def test_bad_arguments_fail_at_construction(make, error, match):
    with pytest.raises(error, match=match):
        make()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"probe": torch.randn(4, 3, 16, 16), "layer": "backbone.55"}, r"No layer named 'backbone.55'.*backbone.5"),
        ({"probe": torch.randn(4, 1, 16, 16), "layer": LAYER}, r"RGB images of shape \(B, 3, H, W\)"),
        ({"probe": torch.randn(2, 3, 16, 16), "layer": LAYER}, "holds 2 images but num_images=4"),
        ({"probe": TwoViewNoise(n=0), "layer": LAYER}, "empty"),
    ],
)
def test_bad_setup_fails_before_the_first_step(tmp_path, kwargs, match):
    model = TinySimSiam()
    monitor = SaliencyMonitor(num_images=4, **kwargs)
    trainer = Trainer(callbacks=[monitor], **trainer_kwargs(tmp_path, logger=False))
    with pytest.raises(ValueError, match=match):
        trainer.fit(model, loader())
    assert model.losses == []


def test_state_key_distinguishes_layers():
    a = SaliencyMonitor(layer="backbone.2")
    b = SaliencyMonitor(layer="backbone.5")
    assert a.state_key != b.state_key


def test_pytorch_lightning_trainer(tmp_path):
    pl = pytest.importorskip("pytorch_lightning")
    from tsm_lightning.callbacks.pl import SaliencyMonitor as PLSaliencyMonitor

    class PLTiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.backbone = tiny_cnn()

        def training_step(self, batch, batch_idx):
            (x0, x1), _ = batch
            return torch.nn.functional.mse_loss(self.backbone(x0), self.backbone(x1))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    monitor = PLSaliencyMonitor(torch.randn(2, 3, 16, 16), layer=LAYER, every_n_steps=2, num_images=2)
    logger = pl.loggers.TensorBoardLogger(tmp_path, name="pl")
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=4,
        callbacks=[monitor],
        logger=logger,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(PLTiny(), loader())
    assert monitor.logged_steps == [0, 2, 4]
    assert "saliency/tsm" in _events(logger.log_dir).Tags()["images"]


def test_masks_faithfulness_and_custom_scalars_layout(tmp_path):
    probe = torch.randn(2, 3, 16, 16)
    masks = torch.zeros(2, 16, 16, dtype=torch.bool)
    masks[:, 4:12, 4:12] = True
    monitor = SaliencyMonitor(
        Probe(probe, masks),
        layer=LAYER,
        every_n_steps=3,
        num_images=2,
        methods=["tsm", "eigencam"],
        metrics=MetricOptions(faithfulness_every_n_runs=2, faithfulness_steps=4),
    )
    logger = TensorBoardLogger(tmp_path, name="tb")
    _fit(tmp_path, monitor, logger=logger)
    acc = _events(logger.log_dir)
    scalars = acc.Tags()["scalars"]
    for tag in ("tsm/pointing_game", "tsm/energy_in_mask", "eigencam/mask_iou"):
        assert [e.step for e in acc.Scalars(f"saliency/{tag}")] == [0, 3, 6], tag
    # Faithfulness on every second run only (run 2 is step 3), beside the random-map baseline.
    assert [e.step for e in acc.Scalars("saliency/tsm/deletion_auc")] == [3]
    assert [e.step for e in acc.Scalars("saliency/random/insertion_auc")] == [3]
    energy = acc.Scalars("saliency/tsm/energy_in_mask")[0].value
    assert 0.0 <= energy <= 1.0
    assert "saliency/tsm/embedding_drop" in scalars
    assert "custom_scalars__config__" in acc.Tags()["tensors"]
    layout = b"".join(acc.Tensors("custom_scalars__config__")[0].tensor_proto.string_val)
    assert b"saliency/tsm/energy_in_mask" in layout and b"saliency/eigencam/energy_in_mask" in layout
    # The headline label-free signal shares its chart with its fresh-init reference line.
    from tensorboard.plugins.custom_scalar import layout_pb2

    parsed = layout_pb2.Layout.FromString(layout)
    charts = {c.title: list(c.multiline.tag) for category in parsed.category for c in category.chart}
    lines = {t.strip("^$") for t in charts["mass_spread"]}
    assert {"saliency/tsm/mass_spread", "saliency/fresh_init_tsm/mass_spread"} <= lines
    assert not any("embedding" in t for t in lines)  # the embedding's spread is another chart


def test_metrics_off_logs_no_scalars(tmp_path):
    monitor = SaliencyMonitor(torch.randn(2, 3, 16, 16), layer=LAYER, every_n_steps=3, num_images=2, metrics=False)
    logger = TensorBoardLogger(tmp_path, name="tb")
    _fit(tmp_path, monitor, logger=logger)
    assert not [t for t in _events(logger.log_dir).Tags()["scalars"] if t.startswith("saliency/")]
