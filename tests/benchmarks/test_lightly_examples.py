"""benchmarks/lightly_examples.py: the patch it applies, and one run over a fake examples folder written here."""

from __future__ import annotations

import csv
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import lightly_examples  # noqa: E402
from lightly_examples import COLUMNS, PatchError, Settings, patch_script  # noqa: E402

# Shaped like lightly's examples/pytorch_lightning/*.py: a module with a backbone, a transform, a torchvision
# dataset (downloads, so it must be patched away), a DataLoader and a pl.Trainer.
GOOD = """
import pytorch_lightning as pl
import torch
import torchvision
from torch import nn


class Tiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.backbone(x))

    def training_step(self, batch, batch_index):
        x = batch[0]
        return self(x).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


model = Tiny()
transform = torchvision.transforms.Compose(
    [torchvision.transforms.Resize(32), torchvision.transforms.ToTensor()]  # a comment with a ) in it
)
dataset = torchvision.datasets.CIFAR10(
    "datasets/cifar10", download=True, transform=transform
)
dataloader = torch.utils.data.DataLoader(
    dataset,
    batch_size=256,
    shuffle=True,
    drop_last=True,
    num_workers=8,
)

accelerator = "gpu" if torch.cuda.is_available() else "cpu"

trainer = pl.Trainer(max_epochs=10, devices=1, accelerator=accelerator)
trainer.fit(model=model, train_dataloaders=dataloader)
"""

BROKEN = GOOD.replace("model = Tiny()", 'raise RuntimeError("the script broke")')  # fails before any training


def test_patch_changes_data_size_and_adds_the_one_line_only():
    patched = patch_script(GOOD, Settings(batch_size=2, steps=3, num_samples=6, source_size=32))
    assert "from tsm_lightning.callbacks.pl import SaliencyMonitor\n" in patched
    assert "CIFAR10" not in patched and "download" not in patched
    assert "dataset = TexturedObjects(num_samples=6, image_size=32, transform=transform)\n" in patched
    assert "batch_size=2," in patched and "num_workers=0," in patched and "batch_size=256" not in patched
    assert 'accelerator = "cpu"\n' in patched
    assert (
        "trainer = pl.Trainer(callbacks=[SaliencyMonitor()], max_steps=3, enable_progress_bar=False, "
        "max_epochs=10, devices=1, accelerator=accelerator)" in patched
    )
    # The model, transform and training step are untouched.
    body = GOOD.split("model = Tiny()")[0]
    assert body in patched
    assert "torchvision.transforms.Resize(32), torchvision.transforms.ToTensor()]  # a comment with a ) in it\n)" in (
        patched
    )
    compile(patched, "patched.py", "exec")
    # Scripts on `lightning` get the lightning flavour of the callback.
    on_lightning = patch_script(
        GOOD.replace("import pytorch_lightning as pl", "import lightning.pytorch as pl"), Settings()
    )
    assert "from tsm_lightning.callbacks import SaliencyMonitor\n" in on_lightning
    # What a script needs beyond the one line goes inside it; the baseline run has no callback at all.
    needs = patch_script(GOOD, Settings(monitor_args='layer="backbone.0"'))
    assert 'pl.Trainer(callbacks=[SaliencyMonitor(layer="backbone.0")], max_steps=2,' in needs
    baseline = patch_script(GOOD, Settings(monitor=False))
    assert (
        "callbacks=" not in baseline and "pl.Trainer(max_steps=2, enable_progress_bar=False, max_epochs=10" in baseline
    )


def test_patch_names_what_it_cannot_find():
    with pytest.raises(PatchError, match="no `dataset = "):
        patch_script(GOOD.replace("dataset = torchvision", "data = torchvision"), Settings())
    with pytest.raises(PatchError, match="no `trainer = Trainer"):
        patch_script(GOOD.replace("trainer = pl.Trainer(", "t = pl.Trainer("), Settings())


def _rows(path: Path) -> dict[tuple[str, str], dict[str, str]]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames or ()) == COLUMNS
        return {(r["script"], r["code"]): r for r in reader}


def test_runs_a_fake_examples_folder_and_writes_the_csv(tmp_path):
    pytest.importorskip("pytorch_lightning")
    examples = tmp_path / "examples"
    examples.mkdir()
    (examples / "good.py").write_text(GOOD)
    (examples / "broken.py").write_text(BROKEN)
    (examples / "stub.py").write_text("# TODO, for now please refer to our pure pytorch example\n")
    out = tmp_path / "results.csv"
    command = [sys.executable, str(ROOT / "benchmarks" / "lightly_examples.py"), "--examples", str(examples)]
    options = ["--out", str(out), "--pythonpath", str(ROOT), "--timeout", "240", "--label", "here"]
    done = subprocess.run(
        [*command, *options, "--source-size", "32"], capture_output=True, text=True, timeout=600, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = _rows(out)
    assert sorted(rows) == [("broken.py", "here"), ("good.py", "here"), ("stub.py", "here")]

    good = rows["good.py", "here"]
    assert good["status"] == "ok", good
    assert good["layer"] in ("backbone.0", "backbone.1")  # the only layers with a 32x32 map
    assert good["attention"] == "no"
    assert int(good["pictures"]) >= 4  # tsm, mtsm, eigencam, all
    assert 0 < float(good["seconds"]) < 240

    broken = rows["broken.py", "here"]
    assert broken["status"] == "error"
    assert broken["error"] == "RuntimeError: the script broke"

    stub = rows["stub.py", "here"]
    assert stub["status"] == "skipped" and "no Trainer" in stub["error"]

    # --append: another checkout's rows join those of the first.
    again = subprocess.run(
        [*command, *options[:-1], "other", "--append", "--only", "stub"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert sorted(_rows(out)) == [
        ("broken.py", "here"),
        ("good.py", "here"),
        ("stub.py", "here"),
        ("stub.py", "other"),
    ]


def test_error_line_is_the_exception_that_stopped_the_script():
    stderr = textwrap.dedent(
        """\
        Traceback (most recent call last):
          File "x.py", line 1, in <module>
        ValueError: first
        During handling of the above exception, another exception occurred:
        RuntimeError: the one that stopped it
        """
    )
    assert lightly_examples._error_line(stderr) == "RuntimeError: the one that stopped it"
