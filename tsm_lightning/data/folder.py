"""Plain folders of images (real photos) for training and probing, and the file handling the CLI shares.

* :func:`find_image_files` turns files, folders and glob patterns into a sorted list of image files.
* :func:`load_image` / :func:`load_images` read files into ImageNet-normalised tensors with one resize rule:
  the shorter side is resized to ``image_size`` (antialiased bilinear), then the centre ``image_size x image_size``
  square is cropped -- the same as torchvision's ``Resize(image_size)`` followed by ``CenterCrop(image_size)``.
* :class:`ImageFolder` is a ``Dataset`` over a folder, returning ``(x, index)``.

Images are opened with PIL, rotated upright according to their EXIF orientation tag, and converted to RGB (a GIF
contributes its first frame). Hidden files and folders (names starting with ``.``) are ignored. An image over PIL's
decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS`` pixels, about 89 million by default; never raised here) is
refused before it is decoded (:class:`ImageTooLargeError`), where PIL alone would only warn below twice the limit.
"""

from __future__ import annotations

import glob
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageOps
from torch import Tensor
from torch.utils.data import Dataset

from tsm_lightning.constants import IMAGENET_MEAN, IMAGENET_STD
from tsm_lightning.data.base import check_int, check_transform

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageFolder",
    "ImageTooLargeError",
    "find_image_files",
    "load_image",
    "load_images",
    "open_rgb",
    "resize_center_crop",
]

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
"""File extensions (compared case-insensitively) treated as images when listing folders and globs."""

PathLike = str | Path

_MAX_LISTED = 10  # skipped files named in a warning


def _is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def _is_hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _sort_key(path: Path) -> str:
    return path.as_posix()


def _list_folder(folder: Path, recursive: bool) -> list[Path]:
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    files = [p for p in candidates if _is_image_file(p) and not _is_hidden(p, folder) and p.is_file()]
    return sorted(files, key=_sort_key)


def _is_glob(text: str) -> bool:
    return any(ch in text for ch in "*?[")


def find_image_files(paths: PathLike | Sequence[PathLike], recursive: bool = True) -> list[Path]:
    """Expand files, folders and glob patterns into a deterministic list of image files.

    Args:
        paths: One path or a sequence of paths. A folder contributes its image files (see
            :data:`IMAGE_EXTENSIONS`), sorted by path, searched recursively if ``recursive``; a glob pattern (``*``,
            ``?``, ``[``; ``**`` matches any depth) contributes its matching image files, sorted; a file is taken as
            given, whatever its extension.
        recursive: Whether folders are searched recursively.

    Returns:
        The files, in argument order, each argument's files sorted; duplicates keep their first position.

    Raises:
        FileNotFoundError: If a path does not exist or a pattern matches no image file.
    """
    if isinstance(paths, str | Path):
        paths = [paths]
    found: dict[Path, None] = {}
    for entry in paths:
        path = Path(entry).expanduser()
        if path.is_dir():
            files = _list_folder(path, recursive)
        elif path.is_file():
            files = [path]
        elif _is_glob(str(entry)):
            matches = (Path(m) for m in glob.glob(str(path), recursive=True))
            files = sorted((m for m in matches if m.is_file() and _is_image_file(m)), key=_sort_key)
            if not files:
                raise FileNotFoundError(
                    f"the pattern {str(entry)!r} matches no image file; supported extensions: "
                    f"{', '.join(IMAGE_EXTENSIONS)}."
                )
        else:
            raise FileNotFoundError(f"no such file or folder: {str(entry)!r}.")
        found.update(dict.fromkeys(files))
    return list(found)


class ImageTooLargeError(ValueError):
    """An image file over PIL's decompression-bomb limit: refused before it is decoded, never skipped silently."""


@contextmanager
def _open_image(path: PathLike) -> Iterator[Image.Image]:
    """``PIL.Image.open`` with the decompression-bomb warning (over ``Image.MAX_IMAGE_PIXELS``) made an error."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        found = re.search(r"\((\d+) pixels\)", str(err))
        size = f"has {found.group(1)} pixels" if found else f"is too large ({err})"
        raise ImageTooLargeError(
            f"image {str(path)!r} {size}, over PIL's decompression-bomb limit (PIL.Image.MAX_IMAGE_PIXELS = "
            f"{Image.MAX_IMAGE_PIXELS}): refused before decoding, since such a file can exhaust memory; downscale it"
        ) from None
    with img:
        yield img


def open_rgb(path: PathLike) -> Image.Image:
    """Open an image file as an upright (EXIF-transposed) RGB ``PIL.Image``, fully loaded.

    Raises:
        OSError: If PIL cannot read the file (``PIL.UnidentifiedImageError`` is an ``OSError``).
        ImageTooLargeError: If the image has more than ``PIL.Image.MAX_IMAGE_PIXELS`` pixels (checked before the
            pixels are decoded).
    """
    with _open_image(path) as img:
        img = ImageOps.exif_transpose(img)
        return img.convert("RGB")


def resize_center_crop(image: Tensor, size: int) -> Tensor:
    """Resize the shorter side of ``(..., C, H, W)`` images to ``size`` (antialiased bilinear), crop the centre.

    Returns:
        ``(..., C, size, size)``.
    """
    return TF.center_crop(TF.resize(image, size, antialias=True), [size, size])


def _to_tensor(
    img: Image.Image, image_size: int | None, mean: Sequence[float] | None, std: Sequence[float] | None
) -> Tensor:
    x = TF.pil_to_tensor(img).float() / 255.0
    if image_size is not None:
        x = resize_center_crop(x, image_size).clamp(0.0, 1.0)
    if mean is not None or std is not None:
        mean_t = torch.tensor(mean if mean is not None else (0.0, 0.0, 0.0))[:, None, None]
        std_t = torch.tensor(std if std is not None else (1.0, 1.0, 1.0))[:, None, None]
        x = (x - mean_t) / std_t
    return x


def load_image(
    path: PathLike,
    image_size: int | None = None,
    mean: Sequence[float] | None = IMAGENET_MEAN,
    std: Sequence[float] | None = IMAGENET_STD,
) -> Tensor:
    """Read one image file into a float tensor.

    Args:
        path: Image file.
        image_size: If given, resize the shorter side to it and crop the centre square; else keep the size.
        mean: Per-channel mean subtracted after scaling to ``[0, 1]``; ``None`` (with ``std=None``) keeps
            ``[0, 1]``.
        std: Per-channel std divided by.

    Returns:
        Float ``(3, S, S)`` (or ``(3, H, W)`` without ``image_size``).

    Raises:
        OSError: If the file cannot be read as an image.
        ImageTooLargeError: If it is over PIL's decompression-bomb limit.
    """
    return _to_tensor(open_rgb(path), image_size, mean, std)


def _warn_skipped(skipped: Sequence[tuple[Path, str]], where: str) -> None:
    if not skipped:
        return
    listed = "\n".join(f"  {path}: {reason}" for path, reason in skipped[:_MAX_LISTED])
    more = f"\n  ... and {len(skipped) - _MAX_LISTED} more" if len(skipped) > _MAX_LISTED else ""
    warnings.warn(f"skipped {len(skipped)} unreadable image file(s) {where}:\n{listed}{more}", stacklevel=3)


def _reason(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


def load_images(
    paths: PathLike | Sequence[PathLike],
    image_size: int,
    mean: Sequence[float] | None = IMAGENET_MEAN,
    std: Sequence[float] | None = IMAGENET_STD,
    recursive: bool = True,
    warn: bool = True,
) -> tuple[Tensor, list[Path], list[tuple[Path, str]]]:
    """Read files, folders and glob patterns into one batch, skipping unreadable files.

    Args:
        paths: As for :func:`find_image_files`.
        image_size: Side ``S`` of the square output: the shorter side is resized to ``S``, the centre cropped.
        mean: Per-channel normalisation mean (default ImageNet's); ``None`` with ``std=None`` keeps ``[0, 1]``.
        std: Per-channel normalisation std (default ImageNet's).
        recursive: Whether folders are searched recursively.
        warn: Whether to warn (once) listing the skipped files.

    Returns:
        ``(images, ok, skipped)``: float ``(n, 3, S, S)``; the ``n`` files read, in order; and ``(path, reason)``
        for each file that could not be read.

    Raises:
        FileNotFoundError: If a path does not exist or a pattern matches nothing.
        ValueError: If ``image_size < 1`` or no file could be read.
        ImageTooLargeError: If a file is over PIL's decompression-bomb limit (an error, not a skipped file: the
            limit is PIL's defence against images built to exhaust memory).
    """
    check_int(image_size, "image_size", 1)
    files = find_image_files(paths, recursive=recursive)
    tensors: list[Tensor] = []
    ok: list[Path] = []
    skipped: list[tuple[Path, str]] = []
    for path in files:
        try:
            tensors.append(load_image(path, image_size, mean, std))
        except ImageTooLargeError:
            raise
        except (OSError, ValueError, SyntaxError) as err:  # PIL raises SyntaxError for some broken headers
            skipped.append((path, _reason(err)))
            continue
        ok.append(path)
    if not tensors:
        raise ValueError(
            f"no readable image files found in {_describe(paths)} ({len(skipped)} unreadable); supported "
            f"extensions: {', '.join(IMAGE_EXTENSIONS)}."
        )
    if warn:
        _warn_skipped(skipped, f"in {_describe(paths)}")
    return torch.stack(tensors), ok, skipped


def _describe(paths: PathLike | Sequence[PathLike]) -> str:
    if isinstance(paths, str | Path):
        return repr(str(paths))
    return ", ".join(repr(str(p)) for p in paths)


class ImageFolder(Dataset):
    """A folder of images as a dataset returning ``(x, index)``.

    Files with an extension in :data:`IMAGE_EXTENSIONS` (any case) are listed, sorted by path, and checked
    cheaply at construction with ``PIL.Image.verify``; the ones that fail are left out, recorded in
    :attr:`skipped` and named in one warning.

    Args:
        root: The folder.
        transform: Optional callable applied to the RGB ``PIL.Image``, for example a lightly multi-view transform
            (which returns a list of view tensors). When given, ``image_size`` and ``normalize`` are ignored.
        image_size: Without a transform: if given, resize the shorter side to it and crop the centre square, so
            that every sample is ``(3, S, S)`` and batches collate; if None, keep each image's own size.
        normalize: Without a transform, ImageNet-normalise (else keep ``[0, 1]``).
        recursive: Whether to include images in sub-folders.

    Attributes:
        root: The folder, as a ``Path``.
        files: The readable image files, in dataset order.
        skipped: ``(path, reason)`` for each image file that failed the check.

    Raises:
        FileNotFoundError: If ``root`` does not exist.
        NotADirectoryError: If ``root`` is not a folder.
        ValueError: If the folder holds no readable image file, or ``image_size < 1``.

    ``dataset[i]`` returns ``(x, i)``: ``x`` is float ``(3, S, S)`` (or ``(3, H, W)``) without a transform, else
    ``transform(pil_image)``; ``i`` is the int index (so the default collate works; ``dataset.files[i]`` is the
    file).
    """

    def __init__(
        self,
        root: PathLike,
        transform: Callable[[Image.Image], Any] | None = None,
        image_size: int | None = None,
        normalize: bool = True,
        recursive: bool = True,
    ) -> None:
        root = Path(root).expanduser()
        if not root.exists():
            raise FileNotFoundError(f"image folder {str(root)!r} does not exist.")
        if not root.is_dir():
            raise NotADirectoryError(f"{str(root)!r} is not a folder; ImageFolder needs a folder of images.")
        self.root = root
        self.transform = check_transform(transform)
        self.image_size = None if image_size is None else check_int(image_size, "image_size", 1)
        self.normalize = normalize
        self.recursive = recursive
        self.files: list[Path] = []
        self.skipped: list[tuple[Path, str]] = []
        for path in _list_folder(root, recursive):
            try:
                with _open_image(path) as img:
                    img.verify()
            except Exception as err:  # PIL raises many types for corrupt files (OSError, SyntaxError, ...)
                self.skipped.append((path, _reason(err)))
            else:
                self.files.append(path)
        if not self.files:
            detail = f" ({len(self.skipped)} unreadable)" if self.skipped else ""
            raise ValueError(
                f"no image files found in {str(root)!r}{detail}; supported extensions: {', '.join(IMAGE_EXTENSIONS)}."
            )
        _warn_skipped(self.skipped, f"in {str(root)!r}")

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root={str(self.root)!r}, files={len(self.files)}, skipped={len(self.skipped)}, "
            f"transform={self.transform!r}, image_size={self.image_size}, normalize={self.normalize})"
        )

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        """Sample ``index``: ``(x, index)``, see the class docstring.

        Raises:
            IndexError: If ``index`` is out of range.
            OSError: If the file passed the construction check but cannot be decoded (names the file).
        """
        if not -len(self.files) <= index < len(self.files):
            raise IndexError(f"index {index} is out of range for {type(self).__name__} of length {len(self.files)}.")
        index = index % len(self.files)
        path = self.files[index]
        try:
            img = open_rgb(path)
        except (OSError, ValueError, SyntaxError) as err:
            raise OSError(f"cannot read image {str(path)!r}: {_reason(err)}") from err
        if self.transform is not None:
            return self.transform(img), index
        if self.normalize:
            return _to_tensor(img, self.image_size, IMAGENET_MEAN, IMAGENET_STD), index
        return _to_tensor(img, self.image_size, None, None), index

    def pil(self, index: int) -> Image.Image:
        """File ``index`` as an upright RGB ``PIL.Image``."""
        return open_rgb(self.files[index])
