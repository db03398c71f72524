import pytest
import torch
import torchvision
from helpers import SiameseNet, tiny_cnn
from torch import nn

from tsm_lightning.capture import capture, get_layer
from tsm_lightning.discovery import find_layer, layer_shapes


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
