"""What the commands write and print: the output folder and its manifest, tables, labels, TensorBoard.

Pictures are made by :mod:`tsm_lightning.render` and written through :mod:`tsm_lightning.sinks` (PNG, CSV,
TensorBoard), the same sinks ``SaliencyMonitor`` uses.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tsm_lightning.cli.errors import PROG, CLIError, _one_line, _progress

__all__ = ["MANIFEST", "OutputDir", "checkpoint_labels"]

MANIFEST = ".tsm-lightning.json"
_MANIFEST_TMP = MANIFEST + ".tmp"
_MIN_TILE = 128  # pictures show smaller images enlarged by a whole factor, so that their column labels fit


class OutputDir:
    """An output folder that refuses to overwrite files it did not write (unless ``force``).

    The manifest ``.tsm-lightning.json`` lists the files the tool wrote there. Each file is listed before it is
    written, so that a run that fails halfway leaves no unlisted file behind. :meth:`close` removes the listed files
    of earlier runs that this run did not rewrite, and lists only this run's: the folder never holds pictures that
    its ``metrics.csv`` does not describe. Files the tool did not write are never removed, even with ``force``.
    """

    def __init__(self, path: str, force: bool) -> None:
        self.path = Path(path).expanduser()
        if self.path.exists() and not self.path.is_dir():
            raise CLIError(f"--out {str(self.path)!r} exists and is not a folder")
        self.owned: set[str] = set()
        manifest = self.path / MANIFEST
        if manifest.is_file():
            try:
                files = json.loads(manifest.read_text()).get("files", [])
            except (OSError, ValueError, AttributeError):
                files = []
            self.owned = {f for f in files if isinstance(f, str)} if isinstance(files, list) else set()
        if self.path.is_dir() and not force:
            foreign = sorted(
                p.name
                for p in self.path.iterdir()
                if p.name not in (MANIFEST, _MANIFEST_TMP) and (p.name not in self.owned or p.is_dir())
            )
            if foreign:
                listed = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
                raise CLIError(
                    f"--out {str(self.path)!r} already holds files not written by {PROG} ({listed}); choose an "
                    "empty or new folder, or pass --force to write into it anyway"
                )
        self.written: list[str] = []

    def file(self, name: str) -> Path:
        """Path of an output file, listed in the manifest before the caller writes it."""
        self.adopt(name)
        return self.path / name

    def adopt(self, name: str) -> None:
        """Record ``name``, a file directly in the folder, as an output of this run (and as the tool's)."""
        if name not in self.written:
            self.written.append(name)
        if name not in self.owned:
            self.owned.add(name)
            self._write_manifest(self.owned)

    def close(self) -> None:
        """Remove the earlier runs' files that this run did not rewrite; the manifest then lists this run's files."""
        current = set(self.written)
        kept = set(current)
        rewritten = {_file_id(self.path / name) for name in current} - {None}
        removed = 0
        for name in sorted(self.owned - current):
            path = self.path / name
            # Only plain names of regular files directly in the folder, and never a file this run wrote under
            # another spelling (case-insensitive file systems).
            if not _plain_name(name) or path.is_symlink() or not path.is_file() or _file_id(path) in rewritten:
                continue
            try:
                path.unlink()
                removed += 1
            except OSError as err:
                kept.add(name)
                _progress(f"warning: could not remove {name} of an earlier run ({_one_line(err)})")
        self.owned = kept
        self._write_manifest(kept)
        if removed:
            _progress(f"removed {removed} file(s) of an earlier run from {self.path}")

    def _write_manifest(self, files: set[str]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        tmp = self.path / _MANIFEST_TMP
        tmp.write_text(json.dumps({"tool": PROG, "files": sorted(files)}, indent=1) + "\n")
        os.replace(tmp, self.path / MANIFEST)


def _plain_name(name: str) -> bool:
    """Whether ``name`` names an entry directly inside a folder (no separator, not ``.``/``..``, not the manifest)."""
    return name not in ("", ".", "..", MANIFEST, _MANIFEST_TMP) and Path(name).name == name and "/" not in name


def _file_id(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _float(value: Any) -> float | None:
    x = float(value)
    return x if math.isfinite(x) else None


def _print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=False)]
    for line in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=False)).rstrip())


def _fmt(x: float | None) -> str:
    return "nan" if x is None or not math.isfinite(x) else f"{x:.4f}"


def _report_skipped(skipped: Sequence[tuple[Path, str]]) -> None:
    if skipped:
        _progress(f"skipped {len(skipped)} unreadable file(s):")
        for path, reason in skipped:
            _progress(f"  {path}: {_one_line(reason)}")


def _input_tiles(images: Any) -> Any:
    from tsm_lightning.render import denormalize, to_uint8

    return to_uint8(denormalize(images))


def _enlarge(tiles: Any, min_side: int = _MIN_TILE) -> Any:
    """``(n, 3, h, w)`` uint8 tiles repeated by the smallest whole factor that makes them ``min_side`` px or more.

    Nearest-neighbour, so each input pixel and feature-map cell stays a sharp block; it leaves room for the labels
    of :func:`~tsm_lightning.render.labelled_grid` over small (e.g. 32 px CIFAR) images.
    """
    scale = max(1, math.ceil(min_side / min(tiles.shape[-2:])))
    return tiles if scale == 1 else tiles.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)


def checkpoint_labels(paths: Sequence[str | os.PathLike[str]]) -> list[str]:
    """Short labels that tell checkpoints apart: each path's shortest suffix that no other path ends with.

    Paths are compared as absolute, normalised paths (symlinks are not followed), so ``a/last.ckpt`` and
    ``./a/last.ckpt`` are one file with one label. A suffix of three components or more is shown as its first
    component, ``…`` and the file name where that is shorter and no other checkpoint gets the same text.

    Args:
        paths: checkpoint files as given on the command line.

    Returns:
        One label per path, in order, with ``/`` as separator.

    Examples:
        >>> checkpoint_labels(["runs/epoch=0.ckpt", "runs/epoch=9.ckpt"])
        ['epoch=0.ckpt', 'epoch=9.ckpt']
        >>> checkpoint_labels(["runA/version_0/checkpoints/last.ckpt", "runB/version_0/checkpoints/last.ckpt"])
        ['runA/…/last.ckpt', 'runB/…/last.ckpt']
    """
    parts = [Path(os.path.abspath(os.fspath(p))).parts for p in paths]
    distinct = set(parts)
    suffixes = []
    for p in parts:
        others = [q for q in distinct if q != p]
        k = 1
        while k < len(p) and any(q[-k:] == p[-k:] for q in others):
            k += 1
        suffixes.append(p[-k:])
    full = [Path(*s).as_posix() for s in suffixes]
    short = [f"{s[0]}/…/{s[-1]}" if len(s) >= 3 and not Path(s[0]).anchor else "" for s in suffixes]
    owners: dict[str, set[tuple[str, ...]]] = {}
    for p, text in zip(parts, short, strict=True):
        owners.setdefault(text, set()).add(p)
    return [s if s and len(s) < len(f) and len(owners[s]) == 1 else f for s, f in zip(short, full, strict=True)]


def _stems(paths: Sequence[Path]) -> list[str]:
    """Unique, file-system-safe output names for the input files (``cat``, ``cat_2`` for a second ``cat.jpg``)."""
    used: set[str] = set()
    out = []
    for p in paths:
        base = re.sub(r"[^\w.-]", "_", p.stem) or "image"
        name, k = base, 1
        while name.lower() in used:
            k += 1
            name = f"{base}_{k}"
        used.add(name.lower())
        out.append(name)
    return out


def _write_tensorboard(out: OutputDir, pictures: dict[str, Any], summary: dict[str, dict[str, float]]) -> None:
    """One event file in ``out``: an image per input (tag ``explain/<stem>``), mean metrics as scalars."""
    from torch.utils.tensorboard import SummaryWriter

    from tsm_lightning.sinks import TensorBoardSink

    def events() -> dict[str, tuple[int, int]]:
        return {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in out.path.glob("events.out.tfevents.*")}

    before = events()
    scalars = {
        f"saliency/{method}/{metric}": float(value)
        for method, values in summary.items()
        for metric, value in values.items()
        if value is not None and value == value  # skip NaN
    }
    with SummaryWriter(log_dir=str(out.path)) as writer:
        TensorBoardSink(writer, layout=False).write(pictures, scalars, step=0)
    for name, stamp in events().items():
        if before.get(name) != stamp:  # new, or (same name within a second) appended to
            out.adopt(name)
