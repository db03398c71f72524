"""MLflow receives the pictures (stepped images) and the scalars; CSV and TensorBoard record the same values.

Real ``MLFlowLogger`` on a local SQLite store, read back with MLflow's own client; the reference for every picture is
the PNG TensorBoard records at the same step in the same run, and for every scalar TensorBoard's and the CSV file's
value.
"""

from __future__ import annotations

import csv
import io
import os
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning_helpers import TinySimSiam, loader, trainer_kwargs
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import tsm_lightning
from tsm_lightning import SaliencyMonitor
from tsm_lightning.sinks import (
    MetricsSink,
    MlflowSink,
    PngSink,
    mlflow_artifact_path,
    mlflow_image_key,
    sinks_for_loggers,
)

mlflow = pytest.importorskip("mlflow")
from lightning.pytorch.loggers import MLFlowLogger  # noqa: E402  (needs mlflow)
from mlflow import MlflowClient  # noqa: E402

LAYER = "backbone.5"  # (B, 16, 8, 8) at 16x16 inputs
STEP_FILE = re.compile(r"^(?P<key>.+)\+step\+(?P<step>\d+)\+timestamp\+\d+\+[0-9a-f-]+\.png$")


def _mlflow_logger(tmp_path: Path, name: str = "run") -> MLFlowLogger:
    return MLFlowLogger(
        experiment_name=name,
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        artifact_location=(tmp_path / "artifacts").as_uri(),
    )


def _stepped_images(client: MlflowClient, run_id: str, into: Path) -> dict[tuple[str, int], list[np.ndarray]]:
    """Every full-size image ``log_image(key=..., step=...)`` stored in the run, by (tag, step), as (H, W, 3) arrays."""
    found: dict[tuple[str, int], list[np.ndarray]] = defaultdict(list)
    for info in client.list_artifacts(run_id, "images"):
        match = STEP_FILE.match(Path(info.path).name)
        if match is None:  # the "+compressed.webp" thumbnails
            assert info.path.endswith("+compressed.webp"), info.path
            continue
        local = client.download_artifacts(run_id, info.path, str(into))
        tag = match["key"].replace("~", "/")
        found[tag, int(match["step"])].append(np.asarray(Image.open(local).convert("RGB")))
    return found


def test_mlflow_gets_the_pictures_tensorboard_gets_and_the_same_scalars(tmp_path, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # nothing may land in the working directory (PNG files did, before the MLflow sink)
    seed_everything(0, workers=True)
    monitor = SaliencyMonitor(torch.randn(2, 3, 16, 16), layer=LAYER, every_n_steps=3, num_images=2)
    tb = TensorBoardLogger(tmp_path, name="tb")
    ml = _mlflow_logger(tmp_path)
    csv_logger = CSVLogger(tmp_path, name="csv")
    trainer = Trainer(callbacks=[monitor], **trainer_kwargs(tmp_path, logger=[tb, ml, csv_logger]))
    trainer.fit(TinySimSiam(), loader())
    assert monitor.logged_steps == [0, 3, 6]
    assert list(cwd.iterdir()) == []

    events = EventAccumulator(tb.log_dir, size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    image_tags = events.Tags()["images"]
    assert {"saliency/tsm", "saliency/mtsm", "saliency/eigencam", "saliency/all"} <= set(image_tags)

    client = MlflowClient(ml._tracking_uri)
    run = client.get_run(ml.run_id)
    assert run.info.status == "FINISHED"
    images = _stepped_images(client, ml.run_id, tmp_path / "download")
    # One image per tag and step, exactly the steps TensorBoard has, pixel for pixel the same picture.
    assert sorted(images) == sorted((tag, step) for tag in image_tags for step in (0, 3, 6))
    csv_root = Path(csv_logger.log_dir) / "saliency"
    for tag in image_tags:
        for event in events.Images(tag):
            expected = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))
            (got,) = images[tag, event.step]
            assert got.shape == expected.shape and got.dtype == np.uint8
            assert np.array_equal(got, expected), (tag, event.step)
            # The CSV logger's pictures are PNG files under its log_dir, the same pixels again.
            png = csv_root / f"{tag.replace('/', '_')}_step{event.step:07d}.png"
            assert np.array_equal(np.asarray(Image.open(png).convert("RGB")), expected), png

    # Scalars: MLflow's history and the CSV file hold TensorBoard's values at TensorBoard's steps.
    saliency_scalars = [tag for tag in events.Tags()["scalars"] if tag.startswith("saliency/")]
    assert "saliency/tsm/entropy" in saliency_scalars and "saliency/tsm/stability_first" in saliency_scalars
    with open(Path(csv_logger.log_dir) / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for tag in saliency_scalars:
        expected = {e.step: e.value for e in events.Scalars(tag)}
        history = {m.step: m.value for m in client.get_metric_history(ml.run_id, tag)}
        assert history.keys() == expected.keys(), tag
        for step, value in expected.items():
            assert history[step] == pytest.approx(value, rel=1e-6, abs=1e-7), (tag, step)
        from_csv = {int(r["step"]): float(r[tag]) for r in rows if r.get(tag)}
        assert from_csv.keys() == expected.keys(), tag
        for step, value in expected.items():
            assert from_csv[step] == pytest.approx(value, rel=1e-6, abs=1e-7), (tag, step)
    # A value read back is the value that was computed: entropy of a normalised map lies in [0, 1].
    assert all(0.0 < m.value <= 1.0 for m in client.get_metric_history(ml.run_id, "saliency/tsm/entropy"))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    logger = _mlflow_logger(root, name="unit")
    return logger, MlflowClient(logger._tracking_uri), root


def test_sink_logs_known_pixels_at_their_steps_with_safe_keys(store):
    logger, client, root = store
    g = torch.Generator().manual_seed(0)
    first = torch.randint(0, 256, (3, 10, 14), generator=g, dtype=torch.uint8)
    second = torch.randint(0, 256, (3, 6, 8), generator=g, dtype=torch.uint8)
    sink = MlflowSink(logger)
    sink.write({"saliency/tsm": first, "saliency/a:b": second}, {"saliency/tsm/gini": 0.25}, step=7)
    sink.write({"saliency/tsm": second}, {"saliency/tsm/gini": 0.5}, step=9)
    images = _stepped_images(client, logger.run_id, root / "download")
    assert sorted(images) == [("saliency/a_b", 7), ("saliency/tsm", 7), ("saliency/tsm", 9)]
    assert np.array_equal(images["saliency/tsm", 7][0], first.permute(1, 2, 0).numpy())
    assert np.array_equal(images["saliency/a_b", 7][0], second.permute(1, 2, 0).numpy())
    assert np.array_equal(images["saliency/tsm", 9][0], second.permute(1, 2, 0).numpy())
    history = [(m.step, m.value) for m in client.get_metric_history(logger.run_id, "saliency/tsm/gini")]
    assert sorted(history) == [(7, 0.25), (9, 0.5)]


class _OldClient:
    """An MLflow client from before stepped images (< 2.12): ``log_image(run_id, image, artifact_file)`` only."""

    def __init__(self, client: MlflowClient) -> None:
        self._client = client

    def log_image(self, run_id, image, artifact_file):  # pragma: no cover - never called by the sink
        raise AssertionError("the sink must not call an old log_image with key/step")

    def log_artifact(self, run_id, local_path, artifact_path=None):
        self._client.log_artifact(run_id, local_path, artifact_path)


class _OldLogger:
    def __init__(self, logger: MLFlowLogger) -> None:
        self.run_id = logger.run_id
        self.experiment = _OldClient(logger.experiment)
        self.metrics: list[tuple[dict, int]] = []

    def log_metrics(self, metrics, step=None):
        self.metrics.append((dict(metrics), step))


def test_without_stepped_log_image_pictures_are_artifacts_per_tag_and_step(store):
    logger, client, root = store
    picture = torch.randint(0, 256, (3, 5, 9), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    old = _OldLogger(logger)
    MlflowSink(old).write({"saliency/mtsm": picture}, {"saliency/mtsm/gini": 0.125}, step=12)
    assert mlflow_artifact_path("saliency/mtsm", 12) == "saliency/mtsm/step_000012.png"
    assert [a.path for a in client.list_artifacts(logger.run_id, "saliency/mtsm")] == ["saliency/mtsm/step_000012.png"]
    local = client.download_artifacts(logger.run_id, "saliency/mtsm/step_000012.png", str(root / "old"))
    assert np.array_equal(np.asarray(Image.open(local).convert("RGB")), picture.permute(1, 2, 0).numpy())
    assert old.metrics == [({"saliency/mtsm/gini": 0.125}, 12)]


def test_image_keys_keep_allowed_characters_only():
    assert mlflow_image_key("saliency/tsm") == "saliency/tsm"
    assert mlflow_image_key("saliency/layer 4.0-x_y") == "saliency/layer 4.0-x_y"
    assert mlflow_image_key("saliency/a:b[0]") == "saliency/a_b_0_"


def test_dispatch_by_logger_kind(tmp_path):
    ml = _mlflow_logger(tmp_path)
    csv_logger = CSVLogger(tmp_path, name="csv")

    class NoFolder:  # a logger that names no directory (as MLflow on SQLite did before its own sink)
        save_dir = None

        def log_metrics(self, metrics, step=None):
            pass

    sinks = sinks_for_loggers([ml, csv_logger, NoFolder()], tmp_path / "default" / "saliency")
    assert [type(s) for s in sinks] == [MlflowSink, PngSink, MetricsSink, PngSink, MetricsSink]
    assert sinks[1].root == Path(csv_logger.log_dir) / "saliency"
    assert sinks[3].root == tmp_path / "default" / "saliency"  # never the working directory
    pl_loggers = pytest.importorskip("pytorch_lightning.loggers")  # lightly's examples use pytorch_lightning
    standalone = pl_loggers.MLFlowLogger(tracking_uri=ml._tracking_uri, artifact_location=ml._artifact_location)
    assert [type(s) for s in sinks_for_loggers([standalone], tmp_path)] == [MlflowSink]


def test_the_package_does_not_import_mlflow():
    root = Path(tsm_lightning.__file__).resolve().parents[1]
    code = (
        "import sys, tsm_lightning.sinks, tsm_lightning.callbacks\n"
        "from tsm_lightning import SaliencyMonitor\n"
        "print('mlflow' in sys.modules)"
    )
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "False"
