import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset
from torchvision.transforms.functional import pil_to_tensor

from tsm_lightning.data import SyntheticShapes, TexturedObjects
from tsm_lightning.probe import DEFAULT_NUM_IMAGES, build_probe, unwrap_batch


def test_unwrap_rules():
    x = torch.randn(2, 3, 8, 8)
    mask = torch.rand(2, 8, 8) > 0.5
    assert unwrap_batch(x)[0] is x
    images, masks = unwrap_batch(([x, x + 1], torch.tensor([0, 1]), ["a", "b"]))
    assert images is x and masks is None  # first view; integer targets are not masks
    images, masks = unwrap_batch((x, mask))
    assert torch.equal(masks, mask)
    images, masks = unwrap_batch({"image": x, "mask": mask.float()[:, None]})
    assert torch.equal(masks, mask)
    with pytest.raises(ValueError, match="probe_fn"):
        unwrap_batch(({"weird": x},))


def test_probe_from_dataset_is_sequential_deterministic_and_rng_neutral():
    data = TensorDataset(torch.arange(10.0)[:, None, None, None].expand(10, 3, 4, 4).clone())

    state = torch.random.get_rng_state()
    probe = build_probe(data, 4)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert probe.images[:, 0, 0, 0].tolist() == [0.0, 1.0, 2.0, 3.0]
    shuffled = DataLoader(data, batch_size=3, shuffle=True)
    assert build_probe(shuffled, 5).images[:, 0, 0, 0].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_probe_fn_and_masks():
    data = TensorDataset(torch.randn(6, 3, 4, 4), torch.rand(6, 4, 4))
    probe = build_probe(data, 3, probe_fn=lambda batch: (batch[0] * 0, batch[1]))
    assert (probe.images == 0).all() and probe.masks.shape == (3, 4, 4) and probe.masks.dtype == torch.bool
    with pytest.raises(ValueError, match="probe_fn must return"):
        build_probe(data, 3, probe_fn=lambda batch: "nope")


@pytest.mark.parametrize(
    ("source", "kwargs", "match"),
    [
        (torch.randn(2, 3, 4, 4), {"num_images": 4}, "holds 2 images"),
        (torch.randn(5, 4, 4, 4), {}, r"\(B, 3, H, W\)"),
        (torch.zeros(5, 3, 4, 4, dtype=torch.uint8), {}, "floating point"),
        (torch.randn(5, 3, 4, 4), {"masks": torch.ones(5, 3, 3)}, "masks must have shape"),
        (TensorDataset(torch.randn(0, 3, 4, 4)), {}, "empty"),
        (TensorDataset(torch.randn(2, 3, 4, 4)), {"num_images": 4}, "only 2 images"),
        (torch.randn(2, 3, 4, 4), {"num_images": 0}, "positive integer"),
    ],
)
def test_bad_probes(source, kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_probe(source, **kwargs)


def test_explicit_sources_are_used_whole_and_data_is_capped_at_the_default():
    assert build_probe(torch.randn(4, 3, 4, 4)).images.shape[0] == 4  # smaller than the default: whole
    assert build_probe(torch.randn(20, 3, 4, 4)).images.shape[0] == 20  # a tensor is never cut unasked
    assert build_probe(torch.randn(20, 3, 4, 4), 5).images.shape[0] == 5
    assert build_probe(TensorDataset(torch.randn(5, 3, 4, 4))).images.shape[0] == 5
    assert build_probe(TensorDataset(torch.randn(30, 3, 4, 4))).images.shape[0] == DEFAULT_NUM_IMAGES
    assert build_probe(DataLoader(TensorDataset(torch.randn(30, 3, 4, 4)), batch_size=7), 16).images.shape[0] == 16


def test_masks_of_a_deterministic_dataset_are_kept():
    shapes = SyntheticShapes(6, image_size=16, seed=3)
    probe = build_probe(shapes)
    images, masks = shapes.probe(6)
    assert torch.equal(probe.images, images) and torch.equal(probe.masks, masks)


@pytest.mark.parametrize(("cls", "size"), [(SyntheticShapes, 16), (TexturedObjects, 32)])
def test_built_in_data_with_an_augmenting_transform_gives_a_plain_probe(cls, size):
    flip = lambda pil: pil_to_tensor(pil.transpose(0) if torch.rand(()) < 0.5 else pil).float() / 255  # noqa: E731
    probe = build_probe(cls(6, image_size=size, seed=3, transform=flip))
    images, masks = cls(6, image_size=size, seed=3).probe(6)
    assert torch.equal(probe.images, images) and torch.equal(probe.masks, masks)


def test_unsupported_source():
    with pytest.raises(TypeError, match="probe must be"):
        build_probe(42, 2)


def test_none_is_not_a_probe_for_build_probe():
    with pytest.raises(TypeError, match="got NoneType"):
        build_probe(None, 2)
