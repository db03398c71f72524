"""The backbone zoo: every torchvision classification family, the timm and Hugging Face models SSL users train.

Each model is built with random weights (nothing downloaded) and explained at 224 px with no ``layer=``: the layer the
automatic choice takes, its grid, whether a class-token attention map comes with it, and the features against the
chosen layer's raw output put on the grid by hand (a channels-last stage permuted, a token sequence stripped of its
class and register tokens and reshaped). The expected values are those of the README's table of supported backbones,
parsed here, so that the table says what the code does.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from tsm_lightning.discovery import choose_monitored
from tsm_lightning.pipeline import attention_module, capture_features, maps_of

README = Path(__file__).resolve().parents[1] / "README.md"
TABLE_TITLE = "Supported backbones"
SIZE = 224


@dataclass(frozen=True)
class Row:
    """One row of the README's table."""

    library: str
    model: str
    layer: str
    grid: tuple[int, int]
    channels: str  # "first", "last" or "tokens"
    attention: bool


def readme_rows() -> dict[tuple[str, str], Row]:
    """The README's table of supported backbones, keyed by ``(library, model)``."""
    text = README.read_text(encoding="utf-8")
    start = text.index(f"**{TABLE_TITLE}**")
    rows = {}
    for line in text[start:].splitlines()[2:]:
        if not line.startswith("|"):
            if rows:
                break
            continue
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if cells[0] in ("library", "---"):
            continue
        library, family, layer, grid, layout, attention = cells
        model = re.search(r"`([^`]+)`", family).group(1)  # type: ignore[union-attr]
        h, w = (int(n) for n in grid.split("×"))
        rows[(library, model)] = Row(library, model, layer.strip("`"), (h, w), layout, attention == "yes")
    return rows


def _torchvision(name: str, **kwargs) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision

        return getattr(torchvision.models, name)(weights=None, **kwargs)

    return build


def _timm(name: str, **kwargs) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, **kwargs)

    return build


def _hugging_face(name: str, **kwargs) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import transformers

        config = getattr(transformers, name.replace("Model", "Config"))(**kwargs)
        return getattr(transformers, name)(config)

    return build


# (library, model as named in the table, builder). Hugging Face: ViT-S-sized configurations (width 384, 6 heads)
# with 4 blocks, to keep the zoo within the suite's time.
_SMALL = {"num_hidden_layers": 4, "hidden_size": 384, "num_attention_heads": 6, "intermediate_size": 1536}
ZOO: list[tuple[str, str, Callable[[], nn.Module]]] = [
    ("torchvision", "alexnet", _torchvision("alexnet")),
    ("torchvision", "convnext_tiny", _torchvision("convnext_tiny")),
    ("torchvision", "densenet121", _torchvision("densenet121")),
    ("torchvision", "efficientnet_b0", _torchvision("efficientnet_b0")),
    ("torchvision", "efficientnet_v2_s", _torchvision("efficientnet_v2_s")),
    ("torchvision", "googlenet", _torchvision("googlenet", aux_logits=False, init_weights=True)),
    ("torchvision", "inception_v3", _torchvision("inception_v3", aux_logits=False, init_weights=True)),
    ("torchvision", "maxvit_t", _torchvision("maxvit_t")),
    ("torchvision", "mnasnet0_5", _torchvision("mnasnet0_5")),
    ("torchvision", "mobilenet_v2", _torchvision("mobilenet_v2")),
    ("torchvision", "mobilenet_v3_small", _torchvision("mobilenet_v3_small")),
    ("torchvision", "regnet_y_400mf", _torchvision("regnet_y_400mf")),
    ("torchvision", "resnet18", _torchvision("resnet18")),
    ("torchvision", "resnext50_32x4d", _torchvision("resnext50_32x4d")),
    ("torchvision", "shufflenet_v2_x0_5", _torchvision("shufflenet_v2_x0_5")),
    ("torchvision", "squeezenet1_0", _torchvision("squeezenet1_0")),
    ("torchvision", "swin_t", _torchvision("swin_t")),
    ("torchvision", "swin_v2_t", _torchvision("swin_v2_t")),
    ("torchvision", "vgg11", _torchvision("vgg11")),
    ("torchvision", "vit_b_16", _torchvision("vit_b_16")),
    ("torchvision", "wide_resnet50_2", _torchvision("wide_resnet50_2")),
    ("timm", "vit_small_patch16_224", _timm("vit_small_patch16_224")),
    ("timm", "vit_small_patch14_reg4_dinov2", _timm("vit_small_patch14_reg4_dinov2", img_size=SIZE)),
    ("timm", "deit_tiny_distilled_patch16_224", _timm("deit_tiny_distilled_patch16_224")),
    ("timm", "eva02_tiny_patch14_224", _timm("eva02_tiny_patch14_224")),
    (
        "timm",
        "vit_small_patch16_224 (class_token=False)",
        _timm("vit_small_patch16_224", class_token=False, global_pool="avg"),
    ),
    ("timm", "resnet18", _timm("resnet18")),
    ("timm", "convnext_atto", _timm("convnext_atto")),
    ("timm", "regnetx_002", _timm("regnetx_002")),
    ("timm", "efficientnet_b0", _timm("efficientnet_b0")),
    ("timm", "swin_tiny_patch4_window7_224", _timm("swin_tiny_patch4_window7_224")),
    ("transformers", "ViTModel", _hugging_face("ViTModel", **_SMALL)),
    ("transformers", "Dinov2Model", _hugging_face("Dinov2Model", **_SMALL)),
    (
        "transformers",
        "Dinov2WithRegistersModel",
        _hugging_face("Dinov2WithRegistersModel", **_SMALL, num_register_tokens=4),
    ),
]


def test_the_readme_table_lists_the_whole_zoo():
    assert sorted(readme_rows()) == sorted((library, model) for library, model, _ in ZOO)


@pytest.mark.parametrize(("library", "model_name", "build"), ZOO, ids=[f"{lib}-{name}" for lib, name, _ in ZOO])
def test_zoo_model_is_read_as_the_readme_says(library, model_name, build):
    row = readme_rows()[(library, model_name)]
    torch.manual_seed(0)
    model = build().eval()
    images = torch.randn(1, 3, SIZE, SIZE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        chosen = choose_monitored(model, images)
    assert chosen.layer == row.layer, chosen.text
    name = attention_module(model, chosen.layer)
    seen: list[torch.Tensor] = []  # the layer's raw output, from a hook of ours in the same forward
    handle = model.get_submodule(chosen.layer).register_forward_hook(lambda m, a, out: seen.append(out))
    try:
        captured = capture_features(model, images, chosen.layer, forward_fn=chosen.forward_fn, attention=name)
    finally:
        handle.remove()
    h, w = row.grid
    assert captured.features.shape[-2:] == (h, w), chosen.text
    assert (captured.attention is not None) == row.attention, name

    raw = seen[0]
    if row.channels == "tokens":  # by hand: drop the leading tokens, patch t -> cell (t // w, t % w)
        assert raw.ndim == 3
        patches = raw[:, raw.shape[1] - h * w :]
        by_hand = torch.stack([patches[:, t] for t in range(h * w)], dim=-1).reshape(1, -1, h, w)
    elif row.channels == "last":
        assert raw.shape[1:3] == (h, w)
        by_hand = raw.permute(0, 3, 1, 2)
    else:
        assert raw.shape[-2:] == (h, w)
        by_hand = raw
    torch.testing.assert_close(captured.features, by_hand.float(), rtol=0, atol=0)
    ours, reference = maps_of(captured.features, ["tsm"])[1], maps_of(by_hand.float(), ["tsm"])[1]
    torch.testing.assert_close(ours["tsm"], reference["tsm"])
    if captured.attention is not None:
        assert captured.attention.shape[-2:] == (h, w)
        share = captured.attention.sum(dim=(-2, -1))  # the patches' share of the class token's attention, per head
        assert bool(((share > 0) & (share <= 1 + 1e-5)).all())


# ---------------------------------------------------------------- lightly's DINOv2 / iBOT layout under the monitor
def _dinov2_module():
    """lightly's DINOv2 / iBOT example shape: student and teacher ViTs in lightly's wrapper, heads, a stub forward."""
    from lightly.loss import DINOLoss
    from lightly.models.modules import DINOv2ProjectionHead, MaskedVisionTransformerTIMM
    from lightly.models.utils import update_momentum
    from lightning.pytorch import LightningModule
    from timm.models.vision_transformer import VisionTransformer

    def vit() -> VisionTransformer:
        return VisionTransformer(
            img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2, dynamic_img_size=True, num_classes=0
        )

    class DINOv2Like(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.teacher_backbone = MaskedVisionTransformerTIMM(vit=vit())  # initialised apart: differs from
            self.student_backbone = MaskedVisionTransformerTIMM(vit=vit())  # the student from the start
            self.teacher_head = DINOv2ProjectionHead(16, 16, 8, 8)
            self.student_head = DINOv2ProjectionHead(16, 16, 8, 8)
            for param in [*self.teacher_backbone.parameters(), *self.teacher_head.parameters()]:
                param.requires_grad = False
            self.criterion = DINOLoss(output_dim=8)

        def forward(self, x):
            pass

        def training_step(self, batch, batch_idx):
            views = batch[0]
            with torch.no_grad():
                teacher = [self.teacher_head(self.teacher_backbone.encode(v)[:, 0]) for v in views]
            student = [self.student_head(self.student_backbone.encode(v)[:, 0]) for v in views]
            return self.criterion(teacher_out=teacher, student_out=student, epoch=self.current_epoch)

        def on_train_batch_end(self, outputs, batch, batch_idx):
            update_momentum(self.student_backbone, self.teacher_backbone, m=0.99)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.student_backbone.parameters(), lr=1e-3)

    return DINOv2Like()


def test_saliency_monitor_alone_watches_the_students_last_block_and_attention(tmp_path):
    from lightning.pytorch import Trainer, seed_everything
    from lightning_helpers import loader, trainer_kwargs

    from tsm_lightning import SaliencyMonitor
    from tsm_lightning.pipeline import attention_map

    seed_everything(0, workers=True)
    model = _dinov2_module()
    probe = torch.randn(4, 3, 32, 32)
    monitor = SaliencyMonitor(probe, every_n_steps=2, strict=True)
    with pytest.warns(UserWarning, match=r"'student_backbone\.vit\.blocks\.1' .*in 'student_backbone', not the copies"):
        Trainer(callbacks=[monitor], **trainer_kwargs(tmp_path, max_steps=4)).fit(model, loader(16, size=32))
    assert monitor.logged_steps == [0, 2, 4]  # every 2 steps and at the end
    assert monitor.layer == "student_backbone.vit.blocks.1"
    assert monitor.tracker.attention_module == "student_backbone.vit.blocks.1.attn"
    _, maps = monitor.compute(model)

    def attention_of(network: nn.Module) -> torch.Tensor:
        captured = capture_features(network, probe, "vit.blocks.1", attention="vit.blocks.1.attn")
        return attention_map(captured.attention)

    torch.testing.assert_close(maps["attention"], attention_of(model.student_backbone))
    assert (maps["attention"] - attention_of(model.teacher_backbone)).abs().max() > 1e-3  # not the teacher's


def test_explaining_a_model_imports_neither_timm_nor_transformers():
    import json
    import os
    import subprocess
    import sys

    code = (
        "import sys, json, torch, torchvision\n"
        "from tsm_lightning import explain\n"
        "from tsm_lightning.discovery import choose_monitored\n"
        "explain(torchvision.models.swin_t(), torch.randn(1, 3, 64, 64), methods=['tsm'])\n"
        "print(json.dumps({m: m in sys.modules for m in ('timm', 'transformers')}))"
    )
    root = str(README.parent)
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    res = subprocess.run([sys.executable, "-W", "ignore", "-c", code], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.strip().splitlines()[-1]) == {"timm": False, "transformers": False}


def test_saliency_monitor_alone_runs_lightlys_aim_vit_through_forward_features(tmp_path):
    from helpers import aim_vit
    from lightning.pytorch import LightningModule, Trainer, seed_everything
    from lightning_helpers import loader, trainer_kwargs

    from tsm_lightning import SaliencyMonitor

    class AIMLike(LightningModule):  # lightly's AIM example: the training step calls forward_features
        def __init__(self) -> None:
            super().__init__()
            self.backbone = aim_vit()
            self.head = nn.Linear(16, 8)

        def training_step(self, batch, batch_idx):
            return self.head(self.backbone.forward_features(batch[0][0])).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    seed_everything(0, workers=True)
    monitor = SaliencyMonitor(torch.randn(4, 3, 32, 32), every_n_steps=2, strict=True)  # fresh-init reference on
    told = r"called as module\.backbone\.forward_features\(images\) because forward fails"
    with pytest.warns(UserWarning, match=told):
        Trainer(callbacks=[monitor], **trainer_kwargs(tmp_path, max_steps=2)).fit(AIMLike(), loader(8, size=32))
    assert monitor.layer == "backbone.blocks.1"
    assert monitor.logged_steps == [0, 2]
    assert monitor.tracker.attention_module == "backbone.blocks.1.attn"  # found; without a class token, no map
