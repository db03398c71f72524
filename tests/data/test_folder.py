import io
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from tsm_lightning.constants import IMAGENET_MEAN, IMAGENET_STD
from tsm_lightning.data import IMAGE_EXTENSIONS, ImageFolder, find_image_files, load_image, load_images

MEAN = torch.tensor(IMAGENET_MEAN)[:, None, None]
STD = torch.tensor(IMAGENET_STD)[:, None, None]


def _solid(size: tuple[int, int], colour: tuple[int, int, int]) -> Image.Image:
    return Image.new("RGB", size, colour)


def _bands(width: int, height: int) -> Image.Image:
    """Tall image: red top third, green middle third, blue bottom third."""
    img = Image.new("RGB", (width, height))
    third = height // 3
    img.paste((255, 0, 0), (0, 0, width, third))
    img.paste((0, 255, 0), (0, third, width, 2 * third))
    img.paste((0, 0, 255), (0, 2 * third, width, height))
    return img


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    _solid((40, 30), (128, 64, 32)).save(root / "a.png")
    _bands(30, 90).save(root / "B.JPG", quality=95)  # upper-case extension
    _solid((50, 50), (10, 200, 30)).save(root / "sub" / "c.jpeg")
    (root / "notes.txt").write_text("not an image")
    (root / "corrupt.png").write_bytes(b"this is not a png at all")
    _solid((20, 20), (0, 0, 0)).save(root / ".hidden.png")  # ignored
    return root


def test_image_folder_lists_sorted_and_skips_corrupt(folder):
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable image file") as record:
        ds = ImageFolder(folder, image_size=32)
    assert len(record) == 1
    assert "corrupt.png" in str(record[0].message)
    assert [p.relative_to(folder).as_posix() for p in ds.files] == ["B.JPG", "a.png", "sub/c.jpeg"]
    assert len(ds) == 3
    assert len(ds.skipped) == 1
    path, reason = ds.skipped[0]
    assert path == folder / "corrupt.png" and reason


def test_image_folder_sizes_normalisation_and_index(folder):
    with pytest.warns(UserWarning):
        ds = ImageFolder(folder, image_size=32)
    for i in range(len(ds)):
        x, index = ds[i]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32
        assert index == i and isinstance(index, int)
    x, _ = ds[1]  # a.png, a solid colour
    expected = torch.tensor([128, 64, 32]) / 255.0
    torch.testing.assert_close((x * STD + MEAN).mean(dim=(1, 2)), expected, atol=2e-3, rtol=0)

    with pytest.warns(UserWarning):
        raw = ImageFolder(folder, image_size=32, normalize=False, recursive=False)
    assert len(raw) == 2
    x_raw, _ = raw[1]
    assert x_raw.min() >= 0 and x_raw.max() <= 1
    torch.testing.assert_close(x_raw, x * STD + MEAN, atol=1e-5, rtol=0)


def test_resize_shorter_side_then_centre_crop(folder):
    with pytest.warns(UserWarning):
        ds = ImageFolder(folder, image_size=30)
    x, _ = ds[0]  # B.JPG, 30 x 90 bands: the centre crop is the green band
    colour = (x * STD + MEAN).mean(dim=(1, 2))
    assert colour[1] > 0.9 and colour[0] < 0.1 and colour[2] < 0.1
    x_small = load_image(folder / "B.JPG", image_size=10, mean=None, std=None)
    assert x_small.shape == (3, 10, 10) and x_small[1].mean() > 0.8


def test_native_size_without_image_size(folder):
    with pytest.warns(UserWarning):
        ds = ImageFolder(folder)
    assert ds[0][0].shape == (3, 90, 30)
    assert ds[1][0].shape == (3, 30, 40)


def test_transform_receives_pil_and_lightly_views(folder):
    from lightly.transforms import SimCLRTransform

    seen = []
    with pytest.warns(UserWarning):
        ds = ImageFolder(folder, transform=lambda img: seen.append(img) or img.size)
    assert ds[0] == ((30, 90), 0)
    assert isinstance(seen[0], Image.Image) and seen[0].mode == "RGB"

    with pytest.warns(UserWarning):
        ds = ImageFolder(folder, transform=SimCLRTransform(input_size=32))
    views, index = ds[2]
    assert isinstance(views, list) and len(views) == 2 and views[0].shape == (3, 32, 32) and index == 2


def test_dataloader_default_collate(folder):
    with pytest.warns(UserWarning):
        ds = ImageFolder(folder, image_size=16)
    x, index = next(iter(DataLoader(ds, batch_size=3, num_workers=0)))
    assert x.shape == (3, 3, 16, 16)
    assert index.tolist() == [0, 1, 2]


def test_errors(tmp_path, folder):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolder(tmp_path / "missing")
    with pytest.raises(NotADirectoryError):
        ImageFolder(folder / "a.png")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"no image files found in .*supported extensions: \.png"):
        ImageFolder(empty)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "x.jpg").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"1 unreadable"):
        ImageFolder(broken)
    with pytest.raises(ValueError, match="image_size"):
        ImageFolder(folder, image_size=0)
    with pytest.warns(UserWarning):
        ds = ImageFolder(folder)
    with pytest.raises(IndexError):
        ds[3]
    assert ds[-1][1] == 2


def test_truncated_jpeg_passes_check_but_fails_loudly(tmp_path):
    buffer = io.BytesIO()
    Image.effect_noise((64, 64), 60).convert("RGB").save(buffer, "JPEG")
    (tmp_path / "ok.png").write_bytes(_png_bytes())
    (tmp_path / "trunc.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # verify() cannot see the truncation: no warning at construction
        ds = ImageFolder(tmp_path, image_size=16)
    assert len(ds) == 2
    with pytest.raises(OSError, match=r"trunc\.jpg"):
        ds[1]
    # load_images decodes fully, so it skips the file instead.
    with pytest.warns(UserWarning, match=r"trunc\.jpg"):
        images, ok, skipped = load_images([tmp_path], image_size=16)
    assert images.shape == (1, 3, 16, 16)
    assert [p.name for p in ok] == ["ok.png"] and [p.name for p, _ in skipped] == ["trunc.jpg"]


def _png_bytes() -> bytes:
    buffer = io.BytesIO()
    _solid((8, 8), (255, 255, 255)).save(buffer, "PNG")
    return buffer.getvalue()


def test_exif_orientation_is_applied(tmp_path):
    img = _solid((40, 20), (200, 100, 50))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees when displayed
    img.save(tmp_path / "rotated.jpg", exif=exif)
    assert load_image(tmp_path / "rotated.jpg").shape == (3, 40, 20)


def test_find_image_files_folders_globs_and_files(folder):
    files = find_image_files(folder)
    assert [p.name for p in files] == ["B.JPG", "a.png", "corrupt.png", "c.jpeg"]  # listing does not read files
    assert [p.name for p in find_image_files(folder, recursive=False)] == ["B.JPG", "a.png", "corrupt.png"]
    assert [p.name for p in find_image_files(str(folder / "*.png"))] == ["a.png", "corrupt.png"]
    assert [p.name for p in find_image_files(str(folder / "**" / "*.jpeg"))] == ["c.jpeg"]
    # Explicit files are taken as given; duplicates keep their first position.
    both = find_image_files([folder / "sub" / "c.jpeg", folder, folder / "notes.txt"])
    assert [p.name for p in both] == ["c.jpeg", "B.JPG", "a.png", "corrupt.png", "notes.txt"]
    with pytest.raises(FileNotFoundError, match="no such file"):
        find_image_files(folder / "nope.png")
    with pytest.raises(FileNotFoundError, match="matches no image file"):
        find_image_files(str(folder / "*.webp"))


def test_load_images_with_globs_folders_and_skips(folder):
    with pytest.warns(UserWarning, match="corrupt.png") as record:
        images, ok, skipped = load_images([str(folder / "*.png"), folder / "sub"], image_size=24)
    assert len(record) == 1
    assert images.shape == (2, 3, 24, 24)
    assert [p.name for p in ok] == ["a.png", "c.jpeg"]
    assert [p.name for p, _ in skipped] == ["corrupt.png"]
    torch.testing.assert_close(
        (images[0] * STD + MEAN).mean(dim=(1, 2)), torch.tensor([128, 64, 32]) / 255.0, atol=2e-3, rtol=0
    )
    raw, _, _ = load_images(folder / "a.png", image_size=24, mean=None, std=None)
    torch.testing.assert_close(raw[0], images[0] * STD + MEAN, atol=1e-5, rtol=0)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, _, skipped = load_images(folder, image_size=8, warn=False)
    assert [p.name for p, _ in skipped] == ["corrupt.png"]  # reported, not warned about

    with pytest.raises(ValueError, match=r"no readable image files found .*1 unreadable"):
        load_images(folder / "corrupt.png", image_size=8, warn=False)
    with pytest.raises(ValueError, match="image_size"):
        load_images(folder, image_size=0)


def test_supported_extensions():
    assert set(IMAGE_EXTENSIONS) == {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
