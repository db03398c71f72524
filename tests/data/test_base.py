"""The one set of constructor checks every built-in dataset uses (data/base.py), each rejection tested."""

import pytest

from tsm_lightning.data import ImageFolder, SyntheticShapes, TexturedObjects, load_images, view_augmentation
from tsm_lightning.data.base import check_int, check_transform


@pytest.mark.parametrize(
    ("value", "minimum", "match"),
    [
        (True, 1, r"`n` must be an int >= 1, got True"),  # a bool is not a count
        (False, None, r"`n` must be an int, got False"),
        (2.0, 1, r"`n` must be an int >= 1, got 2.0"),
        ("3", None, r"`n` must be an int, got '3'"),
        (None, 1, r"got None"),
        (0, 1, r"`n` must be an int >= 1, got 0"),
        (15, 16, r"`n` must be an int >= 16 \(room\), got 15"),
    ],
)
def test_check_int_rejects(value, minimum, match):
    with pytest.raises(ValueError, match=match):
        check_int(value, "n", minimum, "room" if minimum == 16 else "")


def test_check_int_accepts():
    assert check_int(16, "n", 16) == 16
    assert check_int(-5, "n") == -5


def test_check_transform():
    assert check_transform(None) is None
    assert check_transform(len) is len
    with pytest.raises(ValueError, match="`transform` must be callable or None, got str"):
        check_transform("flip")


@pytest.mark.parametrize(("cls", "smallest"), [(SyntheticShapes, 16), (TexturedObjects, 32)])
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_samples": True}, r"`num_samples` must be an int >= 1, got True"),
        ({"num_samples": 0}, r"`num_samples` must be an int >= 1, got 0"),
        ({"num_samples": 4.0}, r"`num_samples` must be an int >= 1, got 4.0"),
        ({"image_size": True}, r"`image_size` must be an int >= \d+ \(.+\), got True"),
        ({"image_size": 64.0}, r"`image_size` must be an int >= \d+ \(.+\), got 64.0"),
        ({"seed": True}, r"`seed` must be an int, got True"),
        ({"seed": "0"}, r"`seed` must be an int, got '0'"),
        ({"transform": "flip"}, r"`transform` must be callable or None, got str"),
    ],
)
def test_every_masked_dataset_rejects(cls, smallest, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**{"num_samples": 4, **kwargs})


@pytest.mark.parametrize(("cls", "smallest"), [(SyntheticShapes, 16), (TexturedObjects, 32)])
def test_each_datasets_smallest_image_size(cls, smallest):
    assert cls.min_image_size == smallest
    assert cls(num_samples=1, image_size=smallest)[0][0].shape == (3, smallest, smallest)
    with pytest.raises(ValueError, match=rf"`image_size` must be an int >= {smallest} \({cls.min_image_size_reason}\)"):
        cls(num_samples=1, image_size=smallest - 1)


def test_the_folder_dataset_and_loaders_use_the_same_checks(tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    for bad in (True, 0, 16.0):
        with pytest.raises(ValueError, match=rf"`image_size` must be an int >= 1, got {bad!r}"):
            ImageFolder(tmp_path, image_size=bad)
        with pytest.raises(ValueError, match=rf"`image_size` must be an int >= 1, got {bad!r}"):
            load_images(tmp_path, image_size=bad)
        with pytest.raises(ValueError, match=rf"`image_size` must be an int >= 1, got {bad!r}"):
            view_augmentation(image_size=bad)
    with pytest.raises(ValueError, match="`transform` must be callable or None, got int"):
        ImageFolder(tmp_path, transform=3)
