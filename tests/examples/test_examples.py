"""Every SSL example trains for two steps on tiny images, so that none of them rots."""

import importlib
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

EXAMPLES = Path(__file__).parents[2] / "examples"
sys.path.insert(0, str(EXAMPLES))

TINY = ["--max-steps", "2", "--image-size", "32", "--batch-size", "4", "--num-samples", "8", "--probe-size", "2"]
TINY += ["--every-n-steps", "1", "--accelerator", "cpu"]


def _images(log_dir: Path) -> dict[str, list[int]]:
    acc = EventAccumulator(str(log_dir), size_guidance={"images": 0})
    acc.Reload()
    return {tag: [e.step for e in acc.Images(tag)] for tag in acc.Tags()["images"]}


@pytest.mark.parametrize("name", ["simclr", "moco_v2", "byol", "swav", "barlow_twins", "vicreg", "dino_vit"])
def test_example_trains_and_logs(name, tmp_path, capsys):
    module = importlib.import_module(name)
    module.main([*TINY, "--output", str(tmp_path)])
    out = capsys.readouterr().out
    log_dir = tmp_path / name / "version_0"
    assert f"--logdir {tmp_path}" in out
    assert (log_dir / "checkpoints" / "last.ckpt").exists()
    images = _images(log_dir)
    assert images["saliency/tsm"] == [0, 1, 2]
    assert images["saliency/all"] == [0, 1, 2]


def test_dino_with_a_resnet_backbone(tmp_path):
    module = importlib.import_module("dino_vit")
    argv = [*TINY, "--backbone", "resnet", "--arch", "small-resnet", "--stem", "cifar", "--output", str(tmp_path)]
    log_dir = module.main(argv)
    assert log_dir == tmp_path / "dino_resnet" / "version_0"
    model = module.DINO.load_from_checkpoint(log_dir / "checkpoints" / "last.ckpt")
    assert model.monitored_layer == "backbone.6"  # 32 px, CIFAR stem: layer3 is 8x8
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 256)
    assert _images(log_dir)["saliency/tsm"] == [0, 1, 2]
    with pytest.raises(ValueError, match="backbone must be 'vit' or 'resnet'"):
        module.DINO(backbone="convnext")


def test_byol_target_network_follows_the_online_one():
    from byol import BYOL

    model = BYOL(arch="small-resnet", stem="cifar")
    assert all(not p.requires_grad for p in model.backbone_momentum.parameters())
    online = dict(model.backbone.named_parameters())
    assert all(torch.equal(p, online[n]) for n, p in model.backbone_momentum.named_parameters())
    x = torch.randn(4, 3, 32, 32)
    assert model(x).shape == model.forward_momentum(x).shape == (4, 128)


def test_default_layer_gives_at_least_7x7_maps():
    from common import default_layer, resnet18_backbone

    for stem, size in [("imagenet", 64), ("imagenet", 224), ("cifar", 64), ("cifar", 32)]:
        layer = default_layer(stem, size)
        backbone = resnet18_backbone(stem).eval()
        x = torch.randn(1, 3, size, size)
        index = int(layer.split(".")[1])
        with torch.no_grad():
            out = backbone[: index + 1](x)
        assert out.shape[-1] >= 7, (stem, size, layer)
    assert default_layer("imagenet", 224) == "backbone.7"
    assert default_layer("cifar", 64) == "backbone.7"


def test_small_resnet_keeps_lightlys_layout():
    from common import SMALL_RESNET_WIDTHS, default_layer, make_backbone

    backbone, width = make_backbone("small-resnet", "cifar")
    assert width == SMALL_RESNET_WIDTHS[-1] == 128 and len(backbone) == 9
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert backbone[:8](x).shape == (2, 128, 8, 8)  # backbone.7 = layer4, 8x8 at 64 px
        assert backbone(x).shape == (2, 128, 1, 1)
    assert default_layer("cifar", 64) == "backbone.7"
    assert sum(p.numel() for p in backbone.parameters()) < 1_000_000
    imagenet_stem, _ = make_backbone("small-resnet", "imagenet")
    with torch.no_grad():
        assert imagenet_stem[:6](x).shape == (2, 32, 8, 8)  # the examples' default layer2 at 64 px
    with pytest.raises(ValueError, match="unknown arch"):
        make_backbone("resnet50")


def test_simclr_without_background_swap(tmp_path):
    module = importlib.import_module("simclr")
    module.main([*TINY, "--no-background-swap", "--output", str(tmp_path)])
    assert _images(tmp_path / "simclr_no_swap" / "version_0")["saliency/tsm"] == [0, 1, 2]


def test_simclr_recipe_arguments_reach_the_loss_and_the_crops(tmp_path, monkeypatch):
    module = importlib.import_module("simclr")
    seen = {}
    real = module.SimCLRTransform

    def spy(**kwargs):
        seen.update(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(module, "SimCLRTransform", spy)
    log_dir = module.main([*TINY, "--temperature", "0.2", "--min-scale", "0.3", "--output", str(tmp_path)])
    model = module.SimCLR.load_from_checkpoint(log_dir / "checkpoints" / "last.ckpt")
    assert model.hparams.temperature == 0.2 and model.criterion.temperature == 0.2
    assert seen["min_scale"] == 0.3


def test_other_example_on_textured_data(tmp_path):
    module = importlib.import_module("moco_v2")
    argv = [*TINY, "--data", "textured", "--arch", "small-resnet", "--stem", "cifar", "--output", str(tmp_path)]
    module.main(argv)
    assert _images(tmp_path / "moco_v2" / "version_0")["saliency/mtsm"] == [0, 1, 2]


def test_example_on_an_image_folder(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(6):
        pixels = (torch.rand(40, 48, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"img{i}.{'png' if i % 2 else 'jpg'}")
    module = importlib.import_module("vicreg")
    module.main([*TINY, "--data", str(folder), "--output", str(tmp_path / "out")])
    assert _images(tmp_path / "out" / "vicreg" / "version_0")["saliency/mtsm"] == [0, 1, 2]


def test_quickstart_runs(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["quickstart.py", "--batch-size", "2", "--image-size", "64"])
    importlib.import_module("quickstart").main()
    out = capsys.readouterr().out
    assert "Explained 2 images of 64px" in out
    for name in ("eigencam", "tsm", "multivec_eigencam", "mtsm"):
        assert f"{name} " in out


def test_vit_conv_stem_keeps_the_token_grid_and_refuses_a_patch_it_cannot_halve_to():
    from dino_vit import GRID, vit_backbone

    vit = vit_backbone(64, conv_stem=True)
    strides = [m.stride for m in vit.conv_proj.modules() if isinstance(m, torch.nn.Conv2d)]
    assert strides == [(2, 2), (2, 2), (2, 2), (1, 1)]  # 64 px -> 8x8 tokens in three halvings, then 1x1
    tokens = []
    handle = vit.encoder.layers[-1].register_forward_hook(lambda m, i, o: tokens.append(o))
    vit(torch.randn(2, 3, 64, 64))
    handle.remove()
    assert tokens[0].shape == (2, 1 + GRID**2, 128)
    with pytest.raises(ValueError, match="power of two"):
        vit_backbone(48, conv_stem=True)  # 6 px patches


ONECYCLE = {"moco_v2": "MoCoV2", "byol": "BYOL", "swav": "SwaV", "barlow_twins": "BarlowTwins", "vicreg": "VICReg"}
ONECYCLE["dino_vit"] = "DINO"


@pytest.mark.parametrize("name", ONECYCLE)
def test_schedule_onecycle_reaches_the_model_from_the_command_line(name, tmp_path, monkeypatch):
    module = importlib.import_module(name)
    built = []
    monkeypatch.setattr(module, "run", lambda model, *args, **kwargs: built.append(model) or tmp_path)
    module.main([*TINY, "--schedule", "onecycle", "--lr", "0.004"])
    module.main(TINY)
    assert [m.hparams.schedule for m in built] == ["onecycle", "own"]


@pytest.mark.parametrize("name", ONECYCLE)
def test_schedule_onecycle_gives_the_demos_optimizer_to_the_trainable_parameters(name):
    module = importlib.import_module(name)
    cls = getattr(module, ONECYCLE[name])
    own = cls(arch="small-resnet", stem="cifar")
    own.trainer = SimpleNamespace(estimated_stepping_batches=150)
    returned = own.configure_optimizers()
    optimizer = returned[0][0] if isinstance(returned, tuple) else returned
    assert "max_lr" not in optimizer.param_groups[0]  # the example's own: no OneCycle

    model = cls(arch="small-resnet", stem="cifar", schedule="onecycle", lr=0.004)
    model.trainer = SimpleNamespace(estimated_stepping_batches=150)
    (optimizer,), (scheduler,) = model.configure_optimizers()
    assert type(optimizer) is torch.optim.AdamW and scheduler["interval"] == "step"
    assert isinstance(scheduler["scheduler"], torch.optim.lr_scheduler.OneCycleLR)
    (group,) = optimizer.param_groups
    assert group["max_lr"] == 0.004 and group["weight_decay"] == 1e-5
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert [id(p) for p in group["params"]] == [id(p) for p in trainable]
    assert len(trainable) < len(list(model.parameters())) or name in ("swav", "barlow_twins", "vicreg")


@pytest.mark.parametrize("total", [2, 9, 10, 11, 150])
def test_onecycle_warm_up_survives_every_step_count(total):
    from simclr import SimCLR

    model = SimCLR(lr=0.004)
    model.trainer = SimpleNamespace(estimated_stepping_batches=total)
    (optimizer,), (scheduler,) = model.configure_optimizers()  # 10 steps: OneCycleLR divided by zero here
    lrs = []
    for _ in range(total):
        optimizer.step()
        scheduler["scheduler"].step()
        lrs.append(optimizer.param_groups[0]["lr"])
    assert all(0 < lr <= 0.004 for lr in lrs)
    assert total < 9 or lrs[-1] < max(lrs) / 10  # warmed up, then annealed


def test_simclr_trains_the_vit_and_monitors_its_last_block(tmp_path):
    module = importlib.import_module("simclr")
    log_dir = module.main([*TINY, "--backbone", "vit", "--conv-stem", "--output", str(tmp_path)])
    assert log_dir == tmp_path / "simclr_vit" / "version_0"
    model = module.SimCLR.load_from_checkpoint(log_dir / "checkpoints" / "last.ckpt")
    assert model.monitored_layer == "backbone.encoder.layers.encoder_layer_3" and model.hparams.conv_stem
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 128)
    images = _images(log_dir)
    assert images["saliency/tsm"] == [0, 1, 2] and images["saliency/attention"] == [0, 1, 2]
    assert module.SimCLR().monitored_layer is None
    with pytest.raises(ValueError, match="backbone must be 'resnet' or 'vit'"):
        module.SimCLR(backbone="convnext")
