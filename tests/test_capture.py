import pytest
import torch
import torchvision
from helpers import SiameseNet, tiny_cnn
from torch import nn

from tsm_lightning import TokenGrid, explain
from tsm_lightning.capture import capture, get_layer
from tsm_lightning.discovery import NetworkCall, choose_layer, choose_monitored, find_layer, layer_shapes
from tsm_lightning.layout import LayoutTracker
from tsm_lightning.pipeline import capture_features, maps_of


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def test_captures_named_layer_in_eval_mode_without_grad():
    model = SiameseNet()
    seen = {}

    def spy(module, args, output):
        seen["training"] = module.training
        seen["grad"] = torch.is_grad_enabled()

    model.backbone[1].register_forward_hook(spy)
    with capture(model, "backbone.4") as cap:
        model(torch.randn(2, 3, 16, 16))
    assert cap.features.shape == (2, 16, 8, 8)
    assert not cap.features.requires_grad
    assert seen == {"training": False, "grad": False}
    assert cap.calls == 1


def test_restores_each_submodule_mode():
    model = SiameseNet()
    model.train()
    model.backbone[1].eval()  # a frozen BatchNorm stays frozen
    before = {name: m.training for name, m in model.named_modules()}
    with capture(model, "backbone.5"):
        model(torch.randn(2, 3, 16, 16))
    assert {name: m.training for name, m in model.named_modules()} == before


def test_hook_removed_and_modes_restored_when_forward_raises():
    model = SiameseNet().train()
    hooks = _hook_count(model)
    with pytest.raises(RuntimeError, match="boom"), capture(model, "backbone.2"):
        model(torch.randn(1, 3, 8, 8))
        raise RuntimeError("boom")
    assert _hook_count(model) == hooks
    assert all(m.training for m in model.modules())


def test_parameters_grads_and_buffers_untouched():
    model = SiameseNet().train()
    model(torch.randn(4, 3, 16, 16)).sum().backward()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    with capture(model, "backbone.5"):
        model(torch.randn(4, 3, 16, 16) * 5)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k  # BatchNorm running stats included
    for k, p in model.named_parameters():
        assert torch.equal(p.grad, grads[k]), k


def test_wrong_layer_name_lists_close_matches():
    model = SiameseNet()
    with pytest.raises(ValueError, match=r"No layer named 'backbone.77'.*Close matches: \['backbone.7'") as err:
        get_layer(model, "backbone.77")
    assert "named_modules" in str(err.value)
    with pytest.raises(ValueError, match="non-empty"):
        get_layer(model, "")


def test_non_map_and_one_by_one_layers_are_rejected():
    model = SiameseNet()
    with pytest.raises(ValueError, match=r"returned shape \(2, 16\).*4-D"), capture(model, "backbone.7"):
        model(torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match="1x1 map has no spatial extent"), capture(model, "backbone.6"):
        model(torch.randn(2, 3, 8, 8))


def test_layer_that_never_runs_is_reported():
    model = SiameseNet()
    with capture(model, "head") as cap:
        pass
    with pytest.raises(RuntimeError, match="did not run"):
        _ = cap.features


def test_find_layer_on_lightly_style_backbone_and_torchvision():
    model = SiameseNet()
    with pytest.warns(UserWarning, match=r"using 'backbone.5'"):
        assert find_layer(model, torch.randn(1, 3, 16, 16)) == "backbone.5"
    resnet = nn.Sequential(*list(torchvision.models.resnet18().children())[:-1])
    # At 224 px layer4 ('7') is 7x7: the deepest stage, and large enough.
    with pytest.warns(UserWarning, match=r"'7', a 7x7 grid"):
        assert find_layer(resnet, torch.randn(1, 3, 224, 224)) == "7"
    # At 64 px layer4 is 2x2 and layer3 4x4: the deepest map of at least 7x7 is layer2 ('5', 8x8).
    with pytest.warns(UserWarning, match=r"'5', a 8x8 grid") as record:
        assert find_layer(resnet, torch.randn(1, 3, 64, 64)) == "5"
    assert "CIFAR" not in str(record[0].message)  # a large enough grid needs no advice
    # At 32 px: layer1 (8x8) beats the 1x1 layer4 and the 2x2 layer3.
    assert find_layer(torchvision.models.resnet18(), torch.randn(1, 3, 32, 32), warn=False) == "layer1"


def test_find_layer_without_spatial_maps_raises():
    with pytest.raises(ValueError, match=r"No layer .* larger than 1x1"):
        find_layer(nn.Sequential(nn.Flatten(), nn.Linear(12, 2)), torch.randn(1, 3, 2, 2))


def test_layer_shapes_lists_modules_in_forward_order():
    infos = layer_shapes(tiny_cnn(), torch.randn(1, 3, 8, 8))
    assert [i.name for i in infos][:3] == ["0", "1", "2"]
    assert infos[3].shape == (1, 16, 4, 4) and infos[3].is_map
    assert infos[-1].shape == (1, 16) and not infos[-1].is_map


def test_compiled_model_names_are_looked_through():
    model = SiameseNet()
    compiled = torch.compile(model)
    assert get_layer(compiled, "backbone.3") is model.backbone[3]


def test_forward_target_and_search_root():
    from tsm_lightning.capture import forward_target
    from tsm_lightning.discovery import search_root

    model = SiameseNet()
    assert forward_target(model, "backbone.5") is model.backbone
    assert forward_target(model, "head") is model  # directly under the model: the model itself
    assert forward_target(model, "missing.3") is model
    assert search_root(model) == ("backbone.", model.backbone)
    plain = tiny_cnn()
    assert search_root(plain) == ("", plain)


# ------------------------------------------------------------------------------ channels-last outputs (layout.py)


class _ToNHWC(nn.Module):
    """An inline permute the model gives no sign of: its layout cannot be told."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1)


def _tiny_timm_swin():
    from timm.models.swin_transformer import SwinTransformer

    return SwinTransformer(
        img_size=56, patch_size=4, window_size=7, embed_dim=16, depths=(1, 1), num_heads=(1, 2), num_classes=0
    ).eval()


def _tiny_torchvision_swin():
    from torchvision.models.swin_transformer import SwinTransformer

    return SwinTransformer([4, 4], 16, [1, 1], [1, 2], [7, 7], num_classes=10).eval()


def _raw_output(model: nn.Module, layer: str, images: torch.Tensor) -> torch.Tensor:
    seen = []
    handle = get_layer(model, layer).register_forward_hook(lambda m, a, out: seen.append(out))
    with torch.no_grad():
        model(images)
    handle.remove()
    return seen[0]


@pytest.mark.parametrize(
    ("build", "layer", "last"),
    [
        (_tiny_timm_swin, "norm", True),
        (_tiny_torchvision_swin, "features.3", True),
        (_tiny_torchvision_swin, "permute", False),
    ],
)
def test_swin_stages_are_read_channels_last_as_a_manual_permute(build, layer, last):
    model = build()
    images = torch.randn(2, 3, 56, 56)
    raw = _raw_output(model, layer, images)
    expected = raw.permute(0, 3, 1, 2) if last else raw
    captured = capture_features(model, images, layer, forward_fn=lambda m, x: m(x))
    assert captured.features.shape == (2, 32, 7, 7)
    torch.testing.assert_close(captured.features, expected, rtol=0, atol=0)
    ours = maps_of(captured.features, ["tsm", "eigencam"])[1]
    by_hand = maps_of(expected.float(), ["tsm", "eigencam"])[1]
    for name in ours:
        torch.testing.assert_close(ours[name], by_hand[name])


def test_swin_automatic_choice_is_the_last_stage_on_its_true_grid():
    timm_swin, tv_swin = _tiny_timm_swin(), _tiny_torchvision_swin()
    images = torch.randn(2, 3, 56, 56)
    infos = layer_shapes(timm_swin, images)
    chosen, text = choose_layer(infos)
    assert (chosen.name, chosen.grid, chosen.channels) == ("norm", (7, 7), "last")
    assert "channels last" in text
    assert not any(info.grid == (7, 32) for info in infos)  # never a grid off the channel axis
    chosen, _ = choose_layer(layer_shapes(tv_swin, images))
    assert (chosen.name, chosen.grid, chosen.channels) == ("permute", (7, 7), "first")


def test_layouts_the_model_tells_through_linear_layernorm_permute_and_residuals():
    from torchvision.ops.misc import Permute

    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),  # 0 first
        nn.ReLU(),  # 1 first (its input)
        Permute([0, 2, 3, 1]),  # 2 last
        nn.LayerNorm(8),  # 3 last
        nn.Linear(8, 8),  # 4 last
        Permute([0, 3, 1, 2]),  # 5 first
        nn.BatchNorm2d(8),  # 6 first
    )
    tracker = LayoutTracker(model)
    handles = tracker.attach()
    with torch.no_grad():
        model(torch.randn(2, 3, 8, 8))  # square and C == H == W: sizes cannot tell, the modules do
    for handle in handles:
        handle.remove()
    assert [tracker.layout_of(model[i]) for i in range(7)] == [
        "first",
        "first",
        "last",
        "last",
        "last",
        "first",
        "first",
    ]
    assert tracker.layout_of(model) == "first"


def test_a_layout_the_model_does_not_tell_is_skipped_or_an_error_never_a_guess():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), _ToNHWC())
    images = torch.randn(2, 3, 8, 6)
    infos = layer_shapes(model, images)
    assert infos[1].channels is None and not infos[1].is_map and infos[1].grid is None
    assert choose_layer(infos)[0].name == "0"  # the automatic choice skips the untold layout
    with pytest.raises(ValueError, match=r"does not tell whether its channels come first .*channels='last'"):
        capture_features(model, images, "1", forward_fn=lambda m, x: m(x))
    stated = capture_features(model, images, "1", forward_fn=lambda m, x: m(x), token_grid=TokenGrid(channels="last"))
    with torch.no_grad():
        expected = model[0](images)
    torch.testing.assert_close(stated.features, expected, rtol=0, atol=0)
    only = nn.Sequential(_ToNHWC())
    with pytest.raises(ValueError, match=r"TokenGrid\(channels='first'\) or TokenGrid\(channels='last'\)"):
        choose_layer(layer_shapes(only, images))
    with pytest.raises(ValueError, match="channels must be 'first'"):
        TokenGrid(channels="nhwc")


def test_cnn_layouts_are_unchanged():
    net = torchvision.models.resnet18()
    infos = layer_shapes(net, torch.randn(1, 3, 224, 224))
    four_d = [info for info in infos if info.shape is not None and len(info.shape) == 4]
    assert all(info.channels == "first" for info in four_d if not info.name.endswith("relu"))
    assert choose_layer(infos)[0].name == "layer4"


# ------------------------------------------------------------------ the network to monitor and the call that runs it
def _tiny_timm_vit(**kwargs):
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2, **kwargs)


def _dinov2_style(lightning: bool = True):
    """lightly's DINOv2 / iBOT example layout: student and teacher ViTs (lightly's class), heads, a stub forward."""
    from lightly.models.modules import DINOv2ProjectionHead, MaskedVisionTransformerTIMM
    from lightning.pytorch import LightningModule

    base = LightningModule if lightning else nn.Module

    class DINOv2Like(base):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.teacher_backbone = MaskedVisionTransformerTIMM(vit=_tiny_timm_vit(dynamic_img_size=True))
            self.student_backbone = MaskedVisionTransformerTIMM(vit=_tiny_timm_vit(dynamic_img_size=True))
            self.teacher_head = DINOv2ProjectionHead(16, 16, 8, 8)
            self.student_head = DINOv2ProjectionHead(16, 16, 8, 8)

        def forward(self, x):
            pass

    return DINOv2Like()


def test_student_teacher_module_monitors_the_student_through_a_stub_forward():
    model = _dinov2_style()
    images = torch.randn(2, 3, 32, 32)
    chosen = choose_monitored(model, images)
    assert chosen.layer == "student_backbone.vit.blocks.1"
    assert "(in 'student_backbone', not the copies 'teacher_backbone', 'teacher_head')" in chosen.text
    captured = capture_features(model, images, chosen.layer, forward_fn=chosen.forward_fn)
    with torch.no_grad():
        student = model.student_backbone.encode(images)  # lightly's own call: (B, 1 + 16, 16)
        teacher = model.teacher_backbone.encode(images)
    del teacher
    block = _raw_output(model.student_backbone, "vit.blocks.1", images)
    torch.testing.assert_close(captured.features, block[:, 1:].transpose(1, 2).reshape(2, 16, 4, 4))
    assert student.shape == (2, 17, 16)
    maps = explain(model, images, methods=["tsm"])  # explain() takes the same choice and call
    assert set(maps) == {"tsm", "attention"}
    plain = _dinov2_style(lightning=False)  # a plain nn.Module: the forward rule calls the student network too
    again = capture_features(plain, images, chosen.layer)
    torch.testing.assert_close(again.features, captured.features)


def test_moco_and_byol_names_pick_the_online_network_never_the_copy():
    from lightning.pytorch import LightningModule

    from tsm_lightning.capture import is_copy_network, monitored_network

    class MoCoLike(nn.Module):  # a plain module: the student rule alone finds encoder_q
        def __init__(self) -> None:
            super().__init__()
            self.encoder_k = tiny_cnn()
            self.encoder_q = tiny_cnn()
            self.projection_head = nn.Linear(16, 8)

        def forward(self, x):
            raise NotImplementedError("two crops")

    class BYOLLike(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.target_network = tiny_cnn()
            self.online_network = tiny_cnn()
            self.online_predictor = nn.Linear(16, 16)

    assert monitored_network(MoCoLike()) == "encoder_q"
    assert monitored_network(BYOLLike()) == "online_network"
    for name in ("teacher_backbone", "backbone_momentum", "target_network", "encoder_k", "ema_model"):
        assert is_copy_network(name), name
    assert not any(is_copy_network(n) for n in ("student_backbone", "encoder_q", "backbone", "remap", "stem"))
    images = torch.randn(2, 3, 16, 16)
    assert choose_monitored(MoCoLike(), images).layer.startswith("encoder_q.")
    assert choose_monitored(BYOLLike(), images).layer.startswith("online_network.")


def test_a_vit_whose_forward_fails_is_called_with_forward_features():
    from helpers import aim_vit
    from lightning.pytorch import LightningModule

    from tsm_lightning.capture import call_network

    class AIMLike(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = aim_vit()

    model = AIMLike().eval()
    images = torch.randn(2, 3, 32, 32)
    with pytest.raises(TypeError):
        model.backbone(images)  # lightly's AIM ViT with this timm: forward passes an argument it does not take
    chosen = choose_monitored(model, images)
    assert chosen.layer == "backbone.blocks.1"
    assert "forward_features" in chosen.text
    with torch.no_grad():
        torch.testing.assert_close(call_network(model.backbone, images), model.backbone.forward_features(images))
    captured = capture_features(model, images, chosen.layer)  # the default forward rule falls back the same way
    assert captured.features.shape == (2, 16, 4, 4)
    assert "attention" not in explain(model, images, methods=["tsm"])  # no class token: no attention, no error


def test_when_nothing_runs_the_error_lists_candidates_and_the_exact_arguments():
    from lightning.pytorch import LightningModule

    class NeedsTwoCrops(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = tiny_cnn()

        def forward(self, x, y):
            return self.net(x) + self.net(y)

    class Odd(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.student_backbone = NeedsTwoCrops()
            self.teacher_backbone = NeedsTwoCrops()

        def forward(self, x):
            pass

    with pytest.raises(ValueError) as info:
        choose_monitored(Odd(), torch.randn(2, 3, 16, 16))
    message = str(info.value)
    assert "\n" not in message
    assert "module.student_backbone(images) failed (TypeError" in message
    assert "module(images) runs no layer (a stub forward)" in message
    assert (
        "Candidate layers: 'student_backbone.net.0', 'student_backbone.net.1', 'student_backbone.net.3', "
        "'student_backbone.net.4'. Pass layer='student_backbone.net.4' and "
        "forward_fn=lambda module, images: module.student_backbone(images)"
    ) in message


def test_a_forward_that_runs_the_teacher_never_makes_it_monitored():
    from lightning.pytorch import LightningModule

    class TwoArgs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = tiny_cnn()

        def forward(self, x, mask):
            return self.net(x)

    class EvaluatesWithTheTeacher(LightningModule):
        def __init__(self, student: nn.Module) -> None:
            super().__init__()
            self.student_backbone = student
            self.teacher_backbone = tiny_cnn()

        def forward(self, x):
            return self.teacher_backbone(x)

    images = torch.randn(2, 3, 16, 16)
    chosen = choose_monitored(EvaluatesWithTheTeacher(tiny_cnn()), images)
    assert chosen.layer.startswith("student_backbone.")  # the student first, though forward runs the teacher
    message = r"module\(images\) runs only 'teacher_backbone', a copy that is never monitored"
    with pytest.raises(ValueError, match=message):
        choose_monitored(EvaluatesWithTheTeacher(TwoArgs()), images)

    class DINOLike(EvaluatesWithTheTeacher):  # lightly's DINO example: forward = student head over the student
        def __init__(self) -> None:
            super().__init__(tiny_cnn())
            self.student_head = nn.Linear(16, 8)

        def forward(self, x):
            return self.student_head(self.student_backbone(x))

    chosen = choose_monitored(DINOLike(), images)
    assert chosen.forward_fn == NetworkCall("student_backbone")  # only the student network runs, not the heads


def test_cli_layers_reads_swin_channels_last_and_honours_channels(capsys):
    from tsm_lightning.cli import main

    assert main(["layers", "--arch", "swin_t", "--image-size", "64"]) == 0
    told = {line.split()[0]: line.split()[-1] for line in capsys.readouterr().out.splitlines()[2:] if line.strip()}
    assert told["features.1"] == "16x16"  # (1, 16, 16, 96): channels last, as the model tells
    assert told["permute"] == "2x2"  # (1, 768, 2, 2): torchvision's Swin puts them first again at the end
    assert main(["layers", "--arch", "swin_t", "--image-size", "64", "--channels", "first"]) == 0
    stated = {line.split()[0]: line.split()[-1] for line in capsys.readouterr().out.splitlines()[2:] if line.strip()}
    assert stated["features.1"] == "16x96"  # the user's statement wins, for every 4-D output
