"""The ``tsm-lightning`` command line: explain / compare / layers, and one-line errors for user mistakes."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from tests.helpers import import_source
from tsm_lightning import cli
from tsm_lightning.constants import METHODS

TINYMOD = """
import torch
from lightning.pytorch import LightningModule
from torch import nn


class Tiny(LightningModule):
    def __init__(self, width: int = 8, lr: float = 0.1):
        super().__init__()
        self.save_hyperparameters()
        self.backbone = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        )
        self.head = nn.Linear(width, 4)

    def forward(self, x):
        return self.head(self.backbone(x).flatten(1))

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return self(x).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


class Other(LightningModule):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 5, 3))


class TinyViT(Tiny):
    # A lightly ViT wrapper as the backbone: 32 px images, 8 px patches, a 4x4 token grid.

    def __init__(self, lr: float = 0.1):
        super().__init__(width=16, lr=lr)
        import torchvision
        from lightly.models.modules import MaskedVisionTransformerTorchvision

        vit = torchvision.models.VisionTransformer(32, 8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32)
        self.backbone = MaskedVisionTransformerTorchvision(vit=vit)
"""

TILE = 32
SHOWN = 128  # pictures enlarge tiles under 128 px by a whole factor, so that their labels fit: 32 px -> 4x
PAD = 2  # render.grid default


def _grid_size(rows: int, cols: int, tile: int = SHOWN) -> tuple[int, int]:
    """(width, height) of a render.grid picture."""
    return cols * (tile + PAD) + PAD, rows * (tile + PAD) + PAD


def _assert_labelled(
    path: Path, column_labels: list[str], row_labels: list[str] | None = None, tile: int = SHOWN
) -> None:
    """``path`` is a labelled grid of ``tile`` px tiles whose header row and left band carry exactly these labels.

    The bands are compared pixel for pixel with :func:`labelled_grid` drawn over blank tiles: they depend only on the
    texts and the layout, not on what the tiles show.
    """
    from tsm_lightning.render import labelled_grid

    rows = len(row_labels) if row_labels is not None else 1
    blank = torch.zeros(len(column_labels), 3, tile, tile, dtype=torch.uint8)
    expected = labelled_grid([blank] * rows, column_labels, row_labels)
    with Image.open(path) as img:
        got = torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1)
    assert got.shape == expected.shape
    width, height = _grid_size(rows, len(column_labels), tile)
    top, left = got.shape[1] - height, got.shape[2] - width
    assert top > 0 and (got[:, :top] < 128).any()  # a header row with text in it
    assert torch.equal(got[:, :top], expected[:, :top])
    assert (left > 0) == (row_labels is not None)
    if row_labels is not None:
        assert torch.equal(got[:, :, :left], expected[:, :, :left])


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from lightning.pytorch import Trainer

    root = tmp_path_factory.mktemp("cli")
    tinymod = import_source(root, "tinymod", TINYMOD)
    torch.manual_seed(0)
    model = tinymod.Tiny()
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 3, TILE, TILE)), batch_size=4)
    paths = {"root": root}
    for k, steps in enumerate((1, 2), start=1):
        trainer = Trainer(
            max_steps=steps,
            accelerator="cpu",
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(model, data)
        paths[f"ckpt{k}"] = root / f"step{k}.ckpt"
        trainer.save_checkpoint(paths[f"ckpt{k}"])
    vit_trainer = Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    vit_trainer.fit(tinymod.TinyViT(), data)
    paths["ckpt_vit"] = root / "vit.ckpt"
    vit_trainer.save_checkpoint(paths["ckpt_vit"])
    # A checkpoint naming its class as LightningCLI does, so that --model is not needed.
    ckpt = torch.load(paths["ckpt1"], map_location="cpu", weights_only=False)
    ckpt["hyper_parameters"]["_class_path"] = "tinymod.Tiny"
    paths["ckpt_named"] = root / "named.ckpt"
    torch.save(ckpt, paths["ckpt_named"])

    images = root / "images"
    (images / "sub").mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for i, (name, size) in enumerate([("a.png", (40, 48)), ("b.png", (48, 40)), ("sub/c.jpg", (64, 64))]):
        pixels = (torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy()
        pixels[5 + i : 20 + i, 5:15] = 255  # a bright square, somewhere
        Image.fromarray(pixels).save(images / name)
    (images / "broken.png").write_bytes(b"not a png at all")
    paths["images"] = images
    (root / "empty").mkdir()
    (root / "corrupt.ckpt").write_bytes(b"\x00garbage" * 10)

    state = torchvision.models.resnet18().state_dict()
    paths["weights"] = root / "r18.pt"
    torch.save({f"module.{k}": v for k, v in state.items()}, paths["weights"])  # DataParallel-style prefix
    return paths


def run_cli(env: dict[str, Path], *args: object) -> subprocess.CompletedProcess[str]:
    pythonpath = os.pathsep.join([str(env["root"]), *filter(None, [os.environ.get("PYTHONPATH")])])
    return subprocess.run(
        [sys.executable, "-m", "tsm_lightning.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": pythonpath, "TSM_LIGHTNING_DEBUG": ""},
        timeout=120,
    )


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_explain_lightning_checkpoint(env: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "maps"
    res = run_cli(env, "explain", env["ckpt1"], "--model", "tinymod:Tiny", "--images", env["images"], "--out", out,
                  "--image-size", TILE)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    stems = ["a", "b", "c"]
    for stem in stems:
        _assert_labelled(out / f"{stem}.png", ["input", "EigenCAM", "TSM", "MV-EigenCAM", "MTSM"])
    rows = _rows(out / "metrics.csv")
    assert len(rows) == len(stems) * len(METHODS)
    assert {(r["image"], r["method"]) for r in rows} == {(s, m) for s in stems for m in METHODS}
    for row in rows:
        for key in ("entropy", "gini", "spectral_concentration"):
            assert 0.0 <= float(row[key]) <= 1.0 + 1e-6
        others = [m for m in METHODS if m != row["method"]]
        assert all(-1.0 <= float(row[f"agreement_{m}"]) <= 1.0 for m in others)
    meta = json.loads((out / "metrics.json").read_text())
    assert len(meta["rows"]) == len(stems) * len(METHODS)
    assert meta["layer"] == "backbone.4"  # the last spatial map, inside the backbone
    assert [Path(s["path"]).name for s in meta["skipped"]] == ["broken.png"]
    assert "broken.png" in res.stderr and "batch 1/1" in res.stderr
    for method in METHODS:
        assert method in res.stdout


def test_explain_a_saved_lightly_vit(env: dict[str, Path], tmp_path: Path, inproc) -> None:
    out = tmp_path / "vit"
    args = ["explain", env["ckpt_vit"], "--model", "tinymod:TinyViT", "--images", env["images"], "--image-size", TILE]
    code, stdout, err = inproc(*args, "--out", out)
    assert code == 0, err
    layer = "backbone.vit.encoder.layers.encoder_layer_1"
    assert f"layer: '{layer}' (the last transformer block), tokens (1, 17, 16) as a 4x4 grid" in err
    meta = json.loads((out / "metrics.json").read_text())
    assert meta["layer"] == layer and meta["attention"] is True and meta["methods"] == list(METHODS)
    labels = ["input", "EigenCAM", "TSM", "MV-EigenCAM", "MTSM", "CLS attention"]
    _assert_labelled(out / "a.png", labels)
    rows = _rows(out / "metrics.csv")
    assert {r["method"] for r in rows} == {*METHODS, "attention"}
    assert all(-1.0 <= float(r["agreement_attention"]) <= 1.0 for r in rows if r["method"] != "attention")
    assert "attention" in stdout

    code, _, err = inproc(*args, "--out", tmp_path / "plain", "--no-attention")
    assert code == 0, err
    assert {r["method"] for r in _rows(tmp_path / "plain" / "metrics.csv")} == set(METHODS)
    code, _, err = inproc(*args, "--out", tmp_path / "bad", "--token-grid", "5x5")
    assert code == 2 and "tokens (1, 17, 16), which fit no patch grid" in err and "--token-grid HxW" in err
    code, _, err = inproc(*args, "--out", tmp_path / "bad", "--token-grid", "5x5", "--layer", layer)
    assert code == 2 and "17 tokens do not fit a 5x5 patch grid" in err and "Traceback" not in err

    code, stdout, err = inproc("layers", env["ckpt_vit"], "--model", "tinymod:TinyViT", "--image-size", TILE)
    assert code == 0, err
    starred = [line for line in stdout.splitlines() if line.startswith("*")]
    assert len(starred) == 1 and layer in starred[0] and "tokens 4x4" in starred[0]
    assert "backbone.vit.conv_proj" in stdout  # listed, but not chosen


def test_explain_torchvision_vit_arch(env: dict[str, Path], tmp_path: Path, inproc) -> None:
    code, _, err = inproc(
        "explain", "--arch", "vit_b_16", "--images", env["images"] / "a.png", "--out", tmp_path, "--methods", "tsm"
    )
    assert code == 0, err
    assert "'encoder.layers.encoder_layer_11' (the last transformer block), tokens (1, 197, 768) as a 14x14" in err
    assert "random weights" in err
    _assert_labelled(tmp_path / "a.png", ["input", "TSM", "CLS attention"], tile=224)


def test_output_folder_protection(env: dict[str, Path], tmp_path: Path, inproc) -> None:
    out = tmp_path / "maps"
    args = ["explain", env["ckpt1"], "--model", "tinymod:Tiny", "--images", env["images"] / "a.png", "--out", out,
            "--image-size", TILE, "--methods", "tsm,mtsm", "--layer", "backbone.2"]  # fmt: skip
    assert inproc(*args)[0] == 0
    assert inproc(*args)[0] == 0  # its own files: overwritten without --force
    (out / "notes.txt").write_text("mine")
    code, _, err = inproc(*args)
    assert code == 2 and "notes.txt" in err and "--force" in err
    assert inproc(*args, "--force")[0] == 0
    assert (out / "notes.txt").read_text() == "mine"
    rows = _rows(out / "metrics.csv")
    assert [r["method"] for r in rows] == ["tsm", "mtsm"]


def test_rerun_removes_previous_outputs(env: dict[str, Path], tmp_path: Path, inproc) -> None:
    """A rerun into a folder the tool owns leaves only its own outputs there, never a file it did not write."""
    out = tmp_path / "maps"
    a, b = env["images"] / "a.png", env["images"] / "b.png"
    opts = ["--model", "tinymod:Tiny", "--image-size", TILE, "--methods", "tsm", "--layer", "backbone.2", "--out", out]
    code, _, err = inproc("explain", env["ckpt1"], *opts, "--images", a, b, "--tensorboard")
    assert code == 0, err
    assert {p.name for p in out.glob("*.png")} == {"a.png", "b.png"} and list(out.glob("events.out.tfevents.*"))

    def listing() -> tuple[set[str], set[str]]:
        manifest = json.loads((out / cli.MANIFEST).read_text())["files"]
        return {p.name for p in out.iterdir()} - {cli.MANIFEST}, set(manifest)

    code, _, err = inproc("explain", env["ckpt1"], *opts, "--images", a)
    assert code == 0, err
    assert listing() == ({"a.png", "metrics.csv", "metrics.json"},) * 2
    assert [r["image"] for r in _rows(out / "metrics.csv")] == ["a"]
    assert "removed 2 file(s)" in err  # b.png and the event file
    # compare into the folder explain wrote, with a file of the user's: explain's outputs go, the user's stays.
    (out / "notes.txt").write_text("mine")
    code, _, err = inproc("compare", env["ckpt1"], env["ckpt2"], *opts, "--images", a, "--force")
    assert code == 0, err
    files, listed = listing()
    assert files == {"a.png", "stability.csv", "notes.txt"} and listed == {"a.png", "stability.csv"}
    assert (out / "notes.txt").read_text() == "mine"
    # A manifest naming files outside the folder (edited by hand, say) removes nothing there.
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    (out / cli.MANIFEST).write_text(json.dumps({"tool": "tsm-lightning", "files": ["a.png", "../victim.txt"]}))
    assert inproc("compare", env["ckpt1"], env["ckpt2"], *opts, "--images", a, "--force")[0] == 0
    assert victim.read_text() == "keep" and listing()[1] == {"a.png", "stability.csv"}


def test_failed_run_leaves_no_unlisted_files(
    env: dict[str, Path], tmp_path: Path, inproc, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Files are listed in the manifest before they are written: after a failure, a rerun needs no --force."""
    out = tmp_path / "maps"
    args = ["explain", env["ckpt1"], "--model", "tinymod:Tiny", "--images", env["images"] / "a.png", "--out", out,
            "--image-size", TILE, "--methods", "tsm"]  # fmt: skip

    def disk_full(*_: object) -> None:
        raise OSError("No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr("tsm_lightning.sinks.write_csv", disk_full)
        code, _, err = inproc(*args)
    assert code == 2 and "No space left" in err
    assert (out / "a.png").is_file()
    code, _, err = inproc(*args)
    assert code == 0, err


def test_class_from_hyperparameters(env: dict[str, Path], tmp_path: Path, inproc) -> None:
    """The class a checkpoint names (LightningCLI's _class_path) is imported only with --trust-checkpoint."""
    args = ["explain", env["ckpt_named"], "--images", env["images"] / "sub", "--out", tmp_path / "o",
            "--image-size", TILE, "--methods", "eigencam"]  # fmt: skip
    code, _, err = inproc(*args)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "'tinymod.Tiny'" in err and "--model tinymod:Tiny" in err and "--trust-checkpoint" in err
    assert not (tmp_path / "o").exists()
    code, _, err = inproc(*args, "--trust-checkpoint")
    assert code == 0, err
    assert len(_rows(tmp_path / "o" / "metrics.csv")) == 1


def test_tensorboard_event_file(env: dict[str, Path], tmp_path: Path, inproc) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    args = ["explain", env["ckpt1"], "--model", "tinymod:Tiny", "--images", env["images"] / "a.png", "--out", out,
            "--image-size", TILE, "--methods", "tsm", "--tensorboard"]  # fmt: skip
    code, _, err = inproc(*args)
    assert code == 0, err
    acc = EventAccumulator(str(out), size_guidance={"images": 0})
    acc.Reload()
    assert acc.Tags()["images"] == ["explain/a"]
    assert "saliency/tsm/entropy" in acc.Tags()["scalars"]
    assert inproc(*args)[0] == 0  # the event file is its own: a rerun needs no --force


def test_compare(env: dict[str, Path], tmp_path: Path) -> None:
    # Two runs whose checkpoints have the same file name, as ModelCheckpoint's last.ckpt does.
    ckpts = [tmp_path / run / "version_0" / "checkpoints" / "last.ckpt" for run in ("runA", "runB")]
    for ckpt, source in zip(ckpts, (env["ckpt1"], env["ckpt2"]), strict=True):
        ckpt.parent.mkdir(parents=True)
        shutil.copyfile(source, ckpt)
    labels = ["runA/…/last.ckpt", "runB/…/last.ckpt"]
    out = tmp_path / "cmp"
    res = run_cli(env, "compare", *ckpts, "--model", "tinymod:Tiny", "--images", env["images"],
                  "--out", out, "--image-size", TILE, "--methods", "tsm", "mtsm")  # fmt: skip
    assert res.returncode == 0, res.stderr
    for stem in ("a", "b", "c"):  # rows = methods; input + one column per checkpoint
        _assert_labelled(out / f"{stem}.png", ["input", *labels], ["TSM", "MTSM"])
    rows = _rows(out / "stability.csv")
    assert len(rows) == 3 * 2
    assert all(-1.0 <= float(r["pearson"]) <= 1.0 for r in rows)
    assert {(r["from"], r["to"]) for r in rows} == {tuple(labels)}
    assert {(r["from_path"], r["to_path"]) for r in rows} == {(str(ckpts[0]), str(ckpts[1]))}
    assert f"pearson {labels[0]}->{labels[1]}" in res.stdout
    assert "broken.png" in res.stderr


def test_checkpoint_labels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    labels = cli.checkpoint_labels
    assert labels(["runs/epoch=0.ckpt", "runs/epoch=9.ckpt"]) == ["epoch=0.ckpt", "epoch=9.ckpt"]
    same_name = ["runA/version_0/checkpoints/last.ckpt", "runB/version_0/checkpoints/last.ckpt"]
    assert labels(same_name) == ["runA/…/last.ckpt", "runB/…/last.ckpt"]
    # Each checkpoint gets its own shortest suffix.
    mixed = ["lightning_logs/version_0/last.ckpt", "lightning_logs/version_1/last.ckpt", "x/epoch=3.ckpt"]
    assert labels(mixed) == ["version_0/last.ckpt", "version_1/last.ckpt", "epoch=3.ckpt"]
    # "…" only where it shortens the label, and never where two checkpoints would share the shortened label.
    assert labels(["A/m/f", "B/m/f"]) == ["A/m/f", "B/m/f"]
    assert labels(["A/mm/f", "A/nn/f", "B/mm/f", "C/nn/f"]) == ["A/mm/f", "A/nn/f", "B/…/f", "C/…/f"]
    # The same file however spelled gets one label; relative and absolute spellings compare as absolute paths.
    monkeypatch.chdir(tmp_path)
    assert labels(["x/last.ckpt", "./x/../x/last.ckpt", "y/last.ckpt"]) == ["x/last.ckpt"] * 2 + ["y/last.ckpt"]
    nested = labels([tmp_path / "run" / "last.ckpt", "../z/run/last.ckpt"])
    assert nested == [f"{tmp_path.name}/…/last.ckpt", "z/…/last.ckpt"]
    assert labels(["only.ckpt"]) == ["only.ckpt"]


def test_layers(env: dict[str, Path], inproc) -> None:
    code, out, err = inproc("layers", env["ckpt1"], "--model", "tinymod:Tiny", "--image-size", TILE)
    assert code == 0, err
    marked = [line for line in out.splitlines() if line.startswith("*")]
    assert len(marked) == 1 and "backbone.4" in marked[0] and "1x8x16x16" in marked[0]
    assert "backbone.0" in out and "backbone.5" not in out  # the pooled 1x1 output is no candidate
    code, out, _ = inproc("layers", "--arch", "resnet18", "--image-size", 64)
    assert code == 0
    # layer4 is 2x2 and layer3 4x4 at 64 px: the automatic choice is the deepest map of at least 7x7.
    assert [line.split()[1] for line in out.splitlines() if line.startswith("*")] == ["layer2"]


def test_arch_and_weights(env: dict[str, Path], tmp_path: Path, inproc) -> None:
    out = tmp_path / "r18"
    code, _, err = inproc("explain", "--arch", "resnet18", "--weights", env["weights"], "--images", env["images"],
                  "--out", out, "--image-size", 64, "--methods", "tsm", "eigencam", "--batch-size", 2)  # fmt: skip
    assert code == 0, err
    assert "batch 2/2" in err and "ignored" not in err
    _assert_labelled(out / "a.png", ["input", "TSM", "EigenCAM"])  # 64 px inputs shown at 128 px
    meta = json.loads((out / "metrics.json").read_text())
    assert meta["layer"] == "layer2" and len(meta["rows"]) == 3 * 2
    assert meta["random_weights"] is False


def test_explain_random_weights(env: dict[str, Path], tmp_path: Path, inproc) -> None:
    """--arch without --weights explains the randomly initialised network, and says so everywhere."""
    args = ["explain", "--arch", "resnet18", "--images", env["images"] / "a.png", "--image-size", TILE,
            "--methods", "tsm"]  # fmt: skip
    code, out, err = inproc(*args, "--out", tmp_path / "r1")
    assert code == 0, err
    warnings_ = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings_) == 1 and "random" in warnings_[0] and "--weights" in warnings_[0], err
    assert "random weights" in out.splitlines()[0]
    meta = json.loads((tmp_path / "r1" / "metrics.json").read_text())
    assert meta["random_weights"] is True and "random weights" in meta["model"]
    assert meta["layer"] == "layer1"  # 8x8 at 32 px
    # The initialisation is seeded: two runs give the same numbers.
    assert inproc(*args, "--out", tmp_path / "r2")[0] == 0
    assert _rows(tmp_path / "r1" / "metrics.csv") == _rows(tmp_path / "r2" / "metrics.csv")
    # The same for a LightningModule class without a checkpoint.
    code, out, err = inproc("explain", "--model", "tinymod:Tiny", "--images", env["images"] / "a.png",
                            "--out", tmp_path / "r3", "--image-size", TILE, "--methods", "tsm")  # fmt: skip
    assert code == 0, err
    assert "warning: no weights given" in err and "a CHECKPOINT" in err
    assert json.loads((tmp_path / "r3" / "metrics.json").read_text())["random_weights"] is True


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("missing_ckpt", "does not exist"),
        ("corrupt_ckpt", "cannot read checkpoint"),
        ("wrong_class", "check that --model names the class"),
        ("bad_model_string", "PKG.MODULE:CLASS"),
        ("unimportable", "cannot import module 'no_such_module_xyz'"),
        ("missing_attr", "has no attribute 'Nope'"),
        ("no_class", "pass --model PKG.MODULE:CLASS"),
        ("unknown_arch", "unknown --arch 'resnet181'"),
        ("compare_without_checkpoints", "CHECKPOINT"),
        ("random_weights_bad_layer", "--layer"),
        ("wrong_weights", "does not fit --arch resnet50"),
        ("no_images", "no such file or folder"),
        ("empty_folder", "no readable image files"),
        ("bad_glob", "matches no image file"),
        ("bad_layer", "Close matches: ['backbone.4'"),
        ("unknown_method", "Unknown saliency method(s) ['tsmm']"),
        ("one_checkpoint", "at least two checkpoints"),
        ("compare_missing_second", "nope.ckpt' does not exist"),
        ("bad_batch_size", "positive integer"),
    ],
)
def test_user_errors(env: dict[str, Path], tmp_path: Path, inproc, case: str, expected: str) -> None:
    img = env["images"] / "a.png"
    base = ["--images", img, "--out", tmp_path / "o", "--image-size", TILE]
    tiny = [env["ckpt1"], "--model", "tinymod:Tiny"]
    argv = {
        "missing_ckpt": ["explain", tmp_path / "nope.ckpt", "--model", "tinymod:Tiny", *base],
        "corrupt_ckpt": ["explain", env["root"] / "corrupt.ckpt", "--model", "tinymod:Tiny", *base],
        "wrong_class": ["explain", env["ckpt1"], "--model", "tinymod:Other", *base],
        "bad_model_string": ["explain", env["ckpt1"], "--model", "tinymod/Tiny", *base],
        "unimportable": ["explain", env["ckpt1"], "--model", "no_such_module_xyz:Tiny", *base],
        "missing_attr": ["explain", env["ckpt1"], "--model", "tinymod:Nope", *base],
        "no_class": ["explain", env["ckpt1"], *base],
        "unknown_arch": ["explain", "--arch", "resnet181", "--weights", env["weights"], *base],
        "compare_without_checkpoints": ["compare", "--arch", "resnet18", *base],
        "random_weights_bad_layer": ["explain", "--arch", "resnet18", *base, "--layer", "layer9"],
        "wrong_weights": ["explain", "--arch", "resnet50", "--weights", env["weights"], *base],
        "no_images": ["explain", *tiny, "--images", tmp_path / "missing", "--out", tmp_path / "o"],
        "empty_folder": ["explain", *tiny, "--images", env["root"] / "empty", "--out", tmp_path / "o"],
        "bad_glob": ["explain", *tiny, "--images", env["images"] / "*.bmp", "--out", tmp_path / "o"],
        "bad_layer": ["explain", *tiny, *base, "--layer", "backbone.44"],
        "unknown_method": ["explain", *tiny, *base, "--methods", "tsmm"],
        "one_checkpoint": ["compare", *tiny, *base],
        "compare_missing_second": ["compare", env["ckpt1"], tmp_path / "nope.ckpt", "--model", "tinymod:Tiny", *base],
        "bad_batch_size": ["explain", *tiny, *base, "--batch-size", "0"],
    }[case]
    code, out, err = inproc(*argv)
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert expected in lines[0], lines[0]
    assert not (tmp_path / "o").exists()


def test_error_subprocess_has_no_traceback(env: dict[str, Path], tmp_path: Path) -> None:
    res = run_cli(env, "explain", env["ckpt1"], "--model", "tinymod:Other", "--images", env["images"],
                  "--out", tmp_path / "o", "--image-size", TILE)  # fmt: skip
    assert res.returncode == 2
    assert res.stderr.strip().startswith("error: ") and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("command", ["explain", "compare", "layers"])
def test_help(command: str, inproc, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.build_parser().parse_args([command, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "example" in text and "tsm-lightning " + command in text
