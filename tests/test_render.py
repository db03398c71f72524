import pytest
import torch
from PIL import Image

from tsm_lightning.render import COLORMAPS, apply_colormap, denormalize, grid, label, labelled_grid, overlay, save_png


def test_colormap_endpoints_and_shape():
    maps = torch.tensor([[[0.0, 1.0]]])
    rgb = apply_colormap(maps, "gray")
    assert rgb.shape == (1, 3, 1, 2)
    assert torch.equal(rgb[0, :, 0, 0], torch.zeros(3)) and torch.equal(rgb[0, :, 0, 1], torch.ones(3))
    jet = apply_colormap(maps, "jet")
    assert torch.allclose(jet[0, :, 0, 0], torch.tensor(COLORMAPS["jet"][0]))
    assert torch.allclose(jet[0, :, 0, 1], torch.tensor(COLORMAPS["jet"][-1]))
    with pytest.raises(ValueError, match="valid colormaps"):
        apply_colormap(maps, "rainbow")


def test_denormalize_inverts_normalisation():
    x = torch.rand(2, 3, 4, 4)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.3, 0.4)
    normed = (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    assert torch.allclose(denormalize(normed, mean, std), x, atol=1e-6)
    assert torch.equal(denormalize(x, None, None), x)


def test_overlay_blends():
    images = torch.zeros(1, 3, 2, 2)
    maps = torch.ones(1, 2, 2)
    out = overlay(images, maps, "gray", alpha=0.5)
    assert out.dtype == torch.uint8 and (out == 128).all()
    assert (overlay(images, maps, "gray", alpha=0.0) == 0).all()
    with pytest.raises(ValueError, match="must match"):
        overlay(images, torch.ones(1, 3, 3))
    with pytest.raises(ValueError, match="alpha"):
        overlay(images, maps, alpha=1.5)


def test_grid_layout_and_png_roundtrip(tmp_path):
    a = torch.zeros(3, 3, 4, 5, dtype=torch.uint8)
    b = torch.full((3, 3, 4, 5), 200, dtype=torch.uint8)
    g = grid([a, b], padding=1, pad_value=255)
    assert g.shape == (3, 2 * 5 + 1, 3 * 6 + 1)
    assert (g[:, 1:5, 1:6] == 0).all() and (g[:, 6:10, 1:6] == 200).all() and (g[:, 0] == 255).all()
    path = save_png(g, tmp_path / "sub" / "g.png")
    img = Image.open(path)
    assert img.size == (19, 11)
    assert torch.equal(torch.from_numpy(__import__("numpy").array(img)).permute(2, 0, 1), g)
    with pytest.raises(ValueError, match="one shape"):
        grid([a, b[:2]])


def test_to_uint8_rounds_and_clips():
    from tsm_lightning.render import to_uint8

    out = to_uint8(torch.tensor([-0.5, 0.0, 0.5, 1.0, 2.0]))
    assert out.dtype == torch.uint8 and out.tolist() == [0, 0, 128, 255, 255]


def test_labelled_grid_writes_labels_above_columns_and_left_of_rows():
    tiles = torch.full((3, 3, 40, 60), 128, dtype=torch.uint8)
    plain = grid([tiles, tiles])
    out = labelled_grid([tiles, tiles], column_labels=["input", "TSM", "MTSM"], row_labels=["a", "bb"])
    band = out.shape[2] - plain.shape[2]
    assert out.shape[1] == plain.shape[1] + 15 and band > 0
    assert torch.equal(out[:, 15:, band:], plain)  # the grid itself is untouched
    header = out[:, :15, band:].min(dim=0).values  # dark pixels are text
    for j in range(3):
        column = header[:, 2 + j * 62 : 2 + j * 62 + 60]
        assert (column < 100).any(), f"no label above column {j}"
    assert (out[:, 15:, :band].min(dim=0).values < 100).any()
    with pytest.raises(ValueError, match="column_labels needs 3"):
        labelled_grid([tiles], column_labels=["x"])


def test_long_labels_are_shortened_to_their_tile():
    tiles = torch.zeros(2, 3, 20, 30, dtype=torch.uint8)
    out = labelled_grid([tiles], column_labels=["a very long checkpoint name.ckpt", "b"])
    assert out.shape == (3, 24 + 15, 66)
    assert label("multivec_eigencam") == "MV-EigenCAM" and label("custom") == "custom"
