import pytest
import torch
from helpers import SiameseNet

from tsm_lightning import METHODS, explain


def test_explain_returns_upsampled_unit_maps():
    model = SiameseNet()
    maps = explain(model, torch.randn(3, 3, 20, 20), layer="backbone.5")
    assert list(maps) == list(METHODS)
    for m in maps.values():
        assert m.shape == (3, 20, 20) and m.dtype == torch.float32
        assert m.min() >= 0 and m.max() <= 1


def test_explain_discovers_the_layer_and_warns():
    with pytest.warns(UserWarning, match="backbone.5"):
        maps = explain(SiameseNet(), torch.randn(2, 3, 16, 16), methods="tsm")
    assert list(maps) == ["tsm"]


def test_explain_with_forward_fn():
    model = SiameseNet()
    maps = explain(model, torch.randn(2, 3, 16, 16), "backbone.4", "mtsm", forward_fn=lambda m, x: m.backbone(x))
    assert maps["mtsm"].shape == (2, 16, 16)


@pytest.mark.parametrize(
    ("images", "match"),
    [
        (torch.randn(3, 16, 16), "Add a batch dimension"),
        (torch.zeros(1, 3, 8, 8, dtype=torch.uint8), "floating point"),
    ],
)
def test_explain_rejects_bad_images(images, match):
    with pytest.raises((ValueError, TypeError), match=match):
        explain(SiameseNet(), images, "backbone.4")


def test_explain_rejects_unknown_method_before_running():
    with pytest.raises(ValueError, match="valid methods"):
        explain(SiameseNet(), torch.randn(1, 3, 8, 8), "backbone.4", ["gradcam"])
