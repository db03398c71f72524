"""Checkpoints are data: no file given to ``tsm-lightning`` (or its loaders) runs code without ``--trust-checkpoint``.

Each hostile file here is first shown to be a real threat (a full unpickle, done by the test itself, creates the
marker), then given to every command and loader, which must refuse it with one line naming the opt-in and leave no
marker. Ordinary checkpoints -- saved by ``lightning.pytorch`` and ``pytorch_lightning`` Trainers with
hyper-parameters, a datamodule and callbacks (``SaliencyMonitor`` among them), and by the package's own example --
load without it, with exactly the weights the file holds (compared with a full unpickle of the file the test wrote).
"""

from __future__ import annotations

import builtins
import importlib
import os
import pathlib
import struct
import sys
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

from tests.helpers import import_source
from tsm_lightning.cli.errors import CLIError

EXAMPLES = Path(__file__).parents[1] / "examples"
TRUST_FLAG = "--trust-checkpoint"  # spelled out (not imported), so that the marker tests also run on older loaders
SIZE = 32

SECMOD = """
from dataclasses import dataclass
from pathlib import Path

import torch
from lightning.pytorch import LightningDataModule, LightningModule
from torch import nn


@dataclass
class Config:
    width: int = 4


class Net(LightningModule):
    def __init__(self, config: Config = Config(), lr: float = 0.1):
        super().__init__()
        self.save_hyperparameters()
        w = config.width
        self.backbone = nn.Sequential(nn.Conv2d(3, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU())

    def forward(self, x):
        return self.backbone(x).mean((2, 3))


class Small(LightningModule):
    def __init__(self, width: int = 4, root: Path = Path("data"), cfg: dict | None = None):
        super().__init__()
        self.save_hyperparameters()
        self.backbone = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())

    def forward(self, x):
        return self.backbone(x).mean((2, 3))

    def training_step(self, batch, batch_idx):
        loss = self(batch[0]).pow(2).mean()
        self.log("loss", loss)
        return loss

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=0.1)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=10)
        return [optimizer], [{"scheduler": scheduler, "interval": "step"}]


def mark(cls, kwargs):
    Path(kwargs["root"]).joinpath("instantiated").touch()
    return cls(**kwargs)


class Data(LightningDataModule):
    def __init__(self, batch_size: int = 4, images: Path = Path("images")):
        super().__init__()
        self.save_hyperparameters()

    def train_dataloader(self):
        x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=self.hparams.batch_size)
"""


class _Shell:
    """Unpickled, runs a shell command that creates ``marker`` (the issue's ``os.system`` payload)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.system, (f"touch '{self.marker}'",)


class _Exec:
    """Unpickled, runs Python code that creates ``marker`` (no shell needed)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return builtins.exec, (f"open({str(self.marker)!r}, 'w').close()",)


def _bomb_png(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims ``width x height`` pixels, with one row of data: tiny on disk, huge decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    row = zlib.compress(b"\x00" * (1 + 3 * width))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", row) + chunk(b"IEND", b""))


def _train(module: Any, pl: Any, root: Path, name: str, monitor: bool, data: Any) -> Path:
    """Fit ``module`` two steps on ``data`` (a datamodule or a loader) with the usual callbacks; ``last.ckpt``."""
    callbacks = [
        pl.callbacks.ModelCheckpoint(dirpath=root / name, monitor="loss", save_last=True),
        pl.callbacks.EarlyStopping("loss", patience=5),
        pl.callbacks.LearningRateMonitor(),
    ]
    if monitor:
        from tsm_lightning.callbacks import SaliencyMonitor

        probe = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
        callbacks.append(SaliencyMonitor(probe, layer="backbone.2", every_n_steps=1))
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", logger=pl.loggers.CSVLogger(root / f"logs_{name}"),
                         callbacks=callbacks, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    if isinstance(data, torch.utils.data.DataLoader):
        trainer.fit(module, data)
    else:
        trainer.fit(module, datamodule=data)
    return root / name / "last.ckpt"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("security")
    secmod = import_source(root, "secmod", SECMOD)
    from lightning.fabric.utilities.data import AttributeDict

    torch.manual_seed(0)
    paths = {"root": root}
    net = secmod.Net(secmod.Config(width=5))
    paths["config_ckpt"] = root / "config.ckpt"  # a benign checkpoint that needs the opt-in: a class in its hparams
    torch.save({"state_dict": net.state_dict(), "hyper_parameters": dict(net.hparams)}, paths["config_ckpt"])
    small = secmod.Small(width=3, cfg=AttributeDict(depth=1))
    paths["attrdict_ckpt"] = root / "attrdict.ckpt"  # a nested AttributeDict: plain data, but not a plain dict
    torch.save({"state_dict": small.state_dict(), "hyper_parameters": dict(small.hparams)}, paths["attrdict_ckpt"])

    import lightning.pytorch as lpl

    small = secmod.Small(width=6, root=root / "data", cfg={"depth": 2})
    paths["lightning_ckpt"] = _train(small, lpl, root, "lightning", True, secmod.Data(images=root / "images"))
    image = (np.random.default_rng(0).random((40, 48, 3)) * 255).astype(np.uint8)
    image[8:24, 10:26] = 255
    Image.fromarray(image).save(root / "a.png")
    paths["image"] = root / "a.png"
    return paths


def _one_line_error(code: int, err: str) -> str:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, err)
    return lines[0]


def _hostile(tmp_path: Path, payload: type, legacy: bool = False) -> tuple[Path, Path]:
    """A Lightning-shaped checkpoint whose hyper-parameters run ``payload`` when unpickled, and its marker path.

    The file is first proven hostile: a full unpickle creates the marker (then removed).
    """
    marker = tmp_path / f"marker_{payload.__name__}"
    ckpt = tmp_path / f"hostile_{payload.__name__}{'_legacy' if legacy else ''}.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"x": payload(marker)}}, ckpt,
               _use_new_zipfile_serialization=not legacy)  # fmt: skip
    torch.load(ckpt, weights_only=False)
    assert marker.exists(), "the test's payload does not work: the test would prove nothing"
    marker.unlink()
    return ckpt, marker


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy_format"])
@pytest.mark.parametrize("payload", [_Shell, _Exec])
def test_hostile_checkpoint_runs_nothing(env, inproc, tmp_path: Path, payload: type, legacy: bool) -> None:
    ckpt, marker = _hostile(tmp_path, payload, legacy)
    base = ["--images", env["image"], "--out", tmp_path / "o", "--image-size", SIZE, "--methods", "tsm"]
    for argv in (
        ["explain", ckpt, *base],
        ["explain", ckpt, "--model", "secmod:Net", *base],
        ["compare", ckpt, ckpt, "--model", "secmod:Net", *base],
        ["layers", ckpt, "--model", "secmod:Net", "--image-size", SIZE],
        ["explain", "--arch", "resnet18", "--weights", ckpt, *base],
    ):
        line = _one_line_error(*inproc(*argv)[::2])
        assert not marker.exists(), f"{argv[0]} ran the file's code"
        assert TRUST_FLAG in line and "could run code" in line, line
        expected = "exec" if payload is _Exec else ("posix.system" if os.name == "posix" else "nt.system")
        assert expected in line, line
        assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("payload", [_Shell, _Exec])
def test_hostile_checkpoint_library_loaders(env, tmp_path: Path, monkeypatch, payload: type) -> None:
    """The library functions refuse it the same way (benchmarks load through them)."""
    from tsm_lightning.cli.loading import TRUST_FLAG as flag
    from tsm_lightning.cli.loading import load_lightning, read_checkpoint

    assert flag == TRUST_FLAG
    monkeypatch.syspath_prepend(str(env["root"]))
    ckpt, marker = _hostile(tmp_path, payload)
    for call in (lambda: load_lightning(ckpt, "secmod:Net", "cpu"), lambda: read_checkpoint(ckpt),
                 lambda: read_checkpoint(ckpt, what="weights file")):  # fmt: skip
        with pytest.raises(CLIError, match=TRUST_FLAG):
            call()
        assert not marker.exists()


def test_hostile_checkpoint_in_a_subprocess(env, tmp_path: Path) -> None:
    """The console entry point as a user runs it: exit status 2, one line, no traceback, no marker."""
    import subprocess

    ckpt, marker = _hostile(tmp_path, _Shell)
    argv = ["explain", ckpt, "--images", env["image"], "--out", tmp_path / "o", "--image-size", SIZE]
    res = subprocess.run(
        [sys.executable, "-m", "tsm_lightning.cli", *map(str, argv)],
        capture_output=True,
        text=True,
        env={
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(env["root"]), *filter(None, [os.environ.get("PYTHONPATH")])]),
            "TSM_LIGHTNING_DEBUG": "",
        },
        timeout=120,
    )
    assert not marker.exists(), f"the command ran the file's code, then said: {res.stderr.strip()}"
    assert res.returncode == 2, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and TRUST_FLAG in res.stderr, res.stderr


def test_lightning_cli_entries_are_ignored_without_the_flag(env, tmp_path: Path) -> None:
    """LightningCLI's _class_path / _instantiator name code in the file: ignored without the opt-in (the class is
    --model's, built directly), and with it only Lightning's own instantiators are called."""
    from tsm_lightning.cli.loading import load_lightning

    sys.path.insert(0, str(env["root"]))
    try:
        small = importlib.import_module("secmod").Small(width=3)
    finally:
        sys.path.remove(str(env["root"]))
    hparams = {"width": 3, "root": tmp_path, "_class_path": "secmod.Net", "_instantiator": "secmod.mark"}
    ckpt = tmp_path / "cli.ckpt"
    torch.save({"state_dict": small.state_dict(), "hyper_parameters": hparams}, ckpt)
    loaded = load_lightning(ckpt, "secmod:Small", "cpu")
    assert type(loaded.model).__name__ == "Small" and loaded.model.hparams["width"] == 3
    _assert_same_weights(loaded.model, small.state_dict())
    assert not (tmp_path / "instantiated").exists()
    with pytest.raises(CLIError, match="not one of Lightning's"):
        load_lightning(ckpt, "secmod:Small", "cpu", trust=True)
    assert not (tmp_path / "instantiated").exists()


def test_state_dict_is_loaded_strictly(env, tmp_path: Path) -> None:
    """A state_dict with a key missing or one too many is an error, not a half-loaded model."""
    from tsm_lightning.cli.loading import load_lightning

    sys.path.insert(0, str(env["root"]))
    try:
        state = importlib.import_module("secmod").Small(width=3).state_dict()
    finally:
        sys.path.remove(str(env["root"]))
    for name, broken, expected in (
        ("missing", {k: v for k, v in state.items() if k != "backbone.1.running_mean"}, "Missing key"),
        ("unexpected", {**state, "head.weight": torch.zeros(2, 3)}, "Unexpected key"),
    ):
        torch.save({"state_dict": broken, "hyper_parameters": {"width": 3}}, tmp_path / f"{name}.ckpt")
        with pytest.raises(CLIError, match=expected):
            load_lightning(tmp_path / f"{name}.ckpt", "secmod:Small", "cpu")


def test_allow_list_is_scoped(tmp_path: Path) -> None:
    """The allowed types are allowed during a read only: torch's global allow-list is left as it was."""
    import pickle

    from tsm_lightning.cli.loading import allowed_globals, read_checkpoint

    before = list(torch.serialization.get_safe_globals())
    path = tmp_path / "with_path.pt"
    torch.save({"w": torch.ones(2), "root": pathlib.Path("x")}, path)
    assert read_checkpoint(path)["root"] == pathlib.Path("x")
    after = torch.serialization.get_safe_globals()
    # torch registers some of its own types lazily (DTensor's, when torch.distributed.tensor is first imported), so
    # the list may grow during the read; none of what the package allows may stay in it.
    assert all(entry in after for entry in before)
    assert not {repr(g) for g in after if g not in before} & {repr(g) for g in allowed_globals()}
    with pytest.raises(pickle.UnpicklingError, match=r"PosixPath|WindowsPath"):
        torch.load(path, weights_only=True)


@pytest.mark.parametrize(
    ("name", "cls", "needs"),
    [
        ("config_ckpt", "Net", "secmod.Config"),
        ("attrdict_ckpt", "Small", "lightning.fabric.utilities.data.AttributeDict"),
    ],
)
def test_benign_checkpoint_needs_the_opt_in(env, inproc, tmp_path: Path, name: str, cls: str, needs: str) -> None:
    """A class of the training code (or a dict subclass) in the hyper-parameters: refused by default, with the
    type named; loaded with --trust-checkpoint, with the saved weights and hyper-parameters."""
    from tsm_lightning.cli.loading import load_lightning

    ckpt = env[name]
    base = ["--images", env["image"], "--out", tmp_path / "o", "--image-size", SIZE, "--methods", "tsm"]
    line = _one_line_error(*inproc("explain", ckpt, "--model", f"secmod:{cls}", *base)[::2])
    assert needs in line and TRUST_FLAG in line, line
    code, out, err = inproc("explain", ckpt, "--model", f"secmod:{cls}", *base, TRUST_FLAG)
    assert code == 0, err
    assert "explained 1 image(s)" in out
    loaded = load_lightning(ckpt, f"secmod:{cls}", "cpu", trust=True)
    saved = torch.load(ckpt, weights_only=False)
    assert dict(loaded.model.hparams) == dict(saved["hyper_parameters"]) and not loaded.model.training
    _assert_same_weights(loaded.model, saved["state_dict"])


def _assert_same_weights(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    got = model.state_dict()
    assert set(got) == set(state)
    for key, value in state.items():
        assert torch.equal(got[key], value), key


def test_lightning_trainer_checkpoint_loads_without_the_flag(env, inproc) -> None:
    """hparams with a path and a dict, a datamodule's hparams with a path, ModelCheckpoint / EarlyStopping /
    SaliencyMonitor state, optimizer and scheduler state: all plain data."""
    from tsm_lightning.cli.loading import load_lightning

    ckpt = env["lightning_ckpt"]
    saved = torch.load(ckpt, weights_only=False)  # the reference: a full unpickle of a file this test wrote
    assert any(k.startswith("SaliencyMonitor") for k in saved["callbacks"])
    assert isinstance(saved["datamodule_hyper_parameters"]["images"], pathlib.Path)
    loaded = load_lightning(ckpt, "secmod:Small", "cpu")
    _assert_same_weights(loaded.model, saved["state_dict"])
    assert loaded.model.hparams["width"] == 6 and loaded.model.hparams["root"] == env["root"] / "data"
    assert loaded.model.hparams["cfg"] == {"depth": 2}
    code, out, err = inproc("layers", ckpt, "--model", "secmod:Small", "--image-size", SIZE)
    assert code == 0, err
    assert "backbone.2" in out


def test_pytorch_lightning_trainer_checkpoint_loads_without_the_flag(env, tmp_path: Path) -> None:
    from tsm_lightning.cli.loading import load_lightning

    pl = pytest.importorskip("pytorch_lightning")

    sys.path.insert(0, str(env["root"]))
    try:
        secmod = importlib.import_module("secmod")

        class PLSmall(pl.LightningModule):  # the same module on the pytorch_lightning package
            def __init__(self, width: int = 4, root: Path = Path("data"), cfg: dict | None = None) -> None:
                super().__init__()
                self.save_hyperparameters()
                self.backbone = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())

            forward = secmod.Small.forward
            training_step = secmod.Small.training_step
            configure_optimizers = secmod.Small.configure_optimizers

        module = PLSmall(width=3, root=tmp_path, cfg={"a": 1})
        ckpt = _train(module, pl, tmp_path, "pl", False, secmod.Data().train_dataloader())
        saved = torch.load(ckpt, weights_only=False)
        loaded = load_lightning(ckpt, PLSmall, "cpu")
    finally:
        sys.path.remove(str(env["root"]))
    _assert_same_weights(loaded.model, saved["state_dict"])
    assert loaded.model.hparams["width"] == 3 and loaded.model.hparams["root"] == tmp_path


def test_example_checkpoint_loads_without_the_flag(env, inproc, tmp_path: Path, monkeypatch) -> None:
    """The checkpoint the SimCLR example saves (SaliencyMonitor with probe masks, ModelCheckpoint, OneCycleLR)."""
    from tsm_lightning.cli.loading import load_lightning

    monkeypatch.syspath_prepend(str(EXAMPLES))
    simclr = importlib.import_module("simclr")
    tiny = ["--max-steps", "1", "--image-size", "32", "--batch-size", "4", "--num-samples", "8", "--probe-size", "2"]
    simclr.main([*tiny, "--every-n-steps", "1", "--accelerator", "cpu", "--output", str(tmp_path)])
    (ckpt,) = tmp_path.glob("simclr/version_0/checkpoints/last.ckpt")
    saved = torch.load(ckpt, weights_only=False)
    assert any(k.startswith("SaliencyMonitor") for k in saved["callbacks"])
    loaded = load_lightning(ckpt, "simclr:SimCLR", "cpu")
    _assert_same_weights(loaded.model, saved["state_dict"])
    code, _, err = inproc("explain", ckpt, "--model", "simclr:SimCLR", "--images", env["image"],
                          "--out", tmp_path / "o", "--image-size", SIZE, "--methods", "tsm")  # fmt: skip
    assert code == 0, err


def test_safetensors_round_trip(env, inproc, tmp_path: Path) -> None:
    """The same weights as .pth and .safetensors give the same maps and metrics; other weights do not."""
    from safetensors.torch import save_file

    from tsm_lightning.cli.loading import read_checkpoint

    torch.manual_seed(3)
    state = torchvision.models.resnet18().state_dict()
    torch.save(state, tmp_path / "r18.pth")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "r18.safetensors"))
    base = ["--images", env["image"], "--image-size", SIZE, "--methods", "tsm", "mtsm"]
    runs = {}
    for name, extra in (("pth", ["--weights", tmp_path / "r18.pth"]),
                        ("st", ["--weights", tmp_path / "r18.safetensors"]), ("random", [])):  # fmt: skip
        code, _, err = inproc("explain", "--arch", "resnet18", *extra, *base, "--out", tmp_path / name)
        assert code == 0, err
        with Image.open(tmp_path / name / "a.png") as img:
            runs[name] = (np.asarray(img).copy(), (tmp_path / name / "metrics.csv").read_text())
    assert np.array_equal(runs["pth"][0], runs["st"][0]) and runs["pth"][1] == runs["st"][1]
    assert not np.array_equal(runs["pth"][0], runs["random"][0])  # the weights were used
    read = read_checkpoint(tmp_path / "r18.safetensors")
    assert set(read) == set(state) and all(torch.equal(read[k], v) for k, v in state.items())


def test_safetensors_lightning_weights_and_missing_package(env, inproc, tmp_path: Path, monkeypatch) -> None:
    from safetensors.torch import save_file

    from tsm_lightning.cli.loading import load_lightning

    sys.path.insert(0, str(env["root"]))
    try:
        net = importlib.import_module("secmod").Small(width=4)
    finally:
        sys.path.remove(str(env["root"]))
    with torch.no_grad():
        for p in net.parameters():
            p.normal_()
    save_file(net.state_dict(), str(tmp_path / "small.safetensors"))
    loaded = load_lightning(tmp_path / "small.safetensors", "secmod:Small", "cpu")
    _assert_same_weights(loaded.model, net.state_dict())
    line = _one_line_error(*inproc("layers", tmp_path / "small.safetensors")[::2])
    assert "--model" in line and "weights only" in line
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)  # as if the extra were not installed
    line = _one_line_error(*inproc("layers", "--arch", "resnet18", "--weights", tmp_path / "small.safetensors")[::2])
    assert "tsm-lightning[safetensors]" in line


def test_corrupt_safetensors_is_one_line(inproc, tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\xff" * 64)
    line = _one_line_error(*inproc("layers", "--arch", "resnet18", "--weights", bad)[::2])
    assert "cannot read weights file" in line and "safetensors" in line


@pytest.mark.parametrize("side", [10_000, 20_000], ids=["over_the_limit", "over_twice_the_limit"])
def test_decompression_bomb_is_one_line(env, inproc, tmp_path: Path, side: int) -> None:
    """PIL's limit is kept (never raised): over it an image is an error before decoding, not a skipped file."""
    limit = Image.MAX_IMAGE_PIXELS
    assert limit is not None and side * side > limit
    folder = tmp_path / "images"
    folder.mkdir()
    _bomb_png(folder / "bomb.png", side, side)
    (folder / "ok.png").write_bytes(env["image"].read_bytes())
    line = _one_line_error(*inproc("explain", "--arch", "resnet18", "--images", folder, "--out", tmp_path / "o",
                                   "--image-size", SIZE)[::2])  # fmt: skip
    assert f"has {side * side} pixels" in line and "decompression-bomb" in line and str(limit) in line, line
    assert limit == Image.MAX_IMAGE_PIXELS  # never raised
    assert not (tmp_path / "o").exists()


def test_image_folder_leaves_out_a_decompression_bomb(env, tmp_path: Path) -> None:
    """The training-side dataset applies the same limit: the bomb is left out (named), the other image kept."""
    from tsm_lightning.data import ImageFolder

    _bomb_png(tmp_path / "bomb.png", 10_000, 10_000)
    (tmp_path / "ok.png").write_bytes(env["image"].read_bytes())
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        folder = ImageFolder(tmp_path, image_size=SIZE)
    assert folder.files == [tmp_path / "ok.png"]
    ((path, reason),) = folder.skipped
    assert path == tmp_path / "bomb.png" and "decompression-bomb" in reason
