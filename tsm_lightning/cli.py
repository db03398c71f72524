"""``tsm-lightning``: saliency maps of a trained checkpoint from the command line.

Subcommands:

* ``explain``: one PNG per image (input, then one overlay per method, under a header row naming them),
  ``metrics.csv`` / ``metrics.json`` with the label-free per-image metrics of
  :func:`~tsm_lightning.metrics.map_metrics`, and a summary table.
* ``compare``: the same images explained by several checkpoints (e.g. saved during training); one PNG strip per
  image (rows named by method, columns by checkpoint: :func:`checkpoint_labels`) and ``stability.csv`` with the
  Pearson correlation between consecutive checkpoints, under the same labels.
* ``layers``: the candidate layers of a model with their output shapes; ``*`` marks the automatic choice.

Pictures show images under 128 px enlarged by a whole factor (nearest neighbour), so that the labels fit.

Models come either from a Lightning checkpoint (``--model PKG.MODULE:CLASS``, or the class named in the
checkpoint's hyper-parameters as LightningCLI saves them) or from a torchvision architecture and a plain
``state_dict`` (``--arch resnet50 --weights FILE``). ``explain`` and ``layers`` also accept ``--arch`` (or
``--model``) without weights: the network keeps a seeded random initialisation, with a warning, and the outputs say so.

User mistakes end with a one-line ``error: ...`` on stderr and exit status 2; set ``TSM_LIGHTNING_DEBUG=1`` to see
the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import re
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

__all__ = ["CLIError", "checkpoint_labels", "main"]

PROG = "tsm-lightning"
MANIFEST = ".tsm-lightning.json"
_MANIFEST_TMP = MANIFEST + ".tmp"
_PREFIXES = ("module.", "_orig_mod.", "model.", "backbone.", "encoder.", "net.")
_HPARAM_CLASS_KEYS = ("_class_path", "class_path")
_MAX_MESSAGE = 400
RANDOM_SEED = 0
"""Seed of the initialisation explained when no weights are given (so that such runs are reproducible)."""
_RANDOM = f"random weights, seed {RANDOM_SEED}"
_MIN_TILE = 128  # pictures show smaller images enlarged by a whole factor, so that their column labels fit


class CLIError(Exception):
    """A user mistake: reported as one line ``error: ...`` with exit status 2."""


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line on stderr (exit 2), pointing to ``--help``."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"error: {message}; see '{self.prog} --help'.\n")
        raise SystemExit(2)


def _one_line(err: BaseException | str, limit: int = _MAX_MESSAGE) -> str:
    text = err if isinstance(err, str) else (str(err) or type(err).__name__)
    if isinstance(err, KeyError) and err.args:
        text = f"missing key {err.args[0]!r}"
    text = re.sub(r"\s+", " ", text).strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------------
# Loading models
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Loaded:
    """A model ready to explain.

    Attributes:
        model: the network, in eval mode on the device.
        source: what it was loaded from, for messages and outputs.
        random_weights: whether no weights were loaded (the seeded initialisation of the class or architecture).
    """

    model: Any
    source: str
    random_weights: bool = False

    def discover_layer(self, images: Any) -> tuple[str, str]:
        """The layer auto-discovery picks and a sentence with its grid.

        :func:`~tsm_lightning.capture.discover_layer`: the search ``SaliencyMonitor`` and ``explain`` use.
        """
        from tsm_lightning.capture import discover_layer

        return discover_layer(self.model, images)

    def candidate_layers(self, images: Any) -> list[Any]:
        """The layers auto-discovery searches, with their output shapes, named relative to the model."""
        from tsm_lightning.capture import candidate_layers

        return candidate_layers(self.model, images)


def _import_class(spec: str, option: str = "--model") -> type:
    """Import ``PKG.MODULE:CLASS`` (or ``PKG.MODULE.CLASS`` when ``option`` is a checkpoint hyper-parameter)."""
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
    elif option != "--model" and "." in spec:
        module_name, _, attr = spec.rpartition(".")
    else:
        module_name, attr = "", ""
    ident = r"[A-Za-z_]\w*"
    if not re.fullmatch(rf"{ident}(\.{ident})*", module_name) or not re.fullmatch(rf"{ident}(\.{ident})*", attr):
        raise CLIError(f"{option} {spec!r} is not of the form PKG.MODULE:CLASS, e.g. --model my_project.models:MoCo")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise CLIError(
            f"cannot import module {module_name!r} for {option} {spec!r} ({_one_line(err)}); install the package "
            "or add its folder to PYTHONPATH"
        ) from err
    obj: Any = module
    for part in attr.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise CLIError(f"module {module_name!r} has no attribute {attr!r} ({option} {spec!r})")
    if not isinstance(obj, type):
        raise CLIError(f"{option} {spec!r} is not a class")
    return obj


def _check_file(path: str | None, what: str) -> Path:
    if path is None:
        raise CLIError(f"no {what} given")
    p = Path(path).expanduser()
    if not p.exists():
        raise CLIError(f"{what} {str(p)!r} does not exist")
    if not p.is_file():
        raise CLIError(f"{what} {str(p)!r} is not a file")
    return p


def _torch_load(path: Path, what: str, weights_only: bool) -> Any:
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as err:  # corrupt files raise UnpicklingError, RuntimeError, EOFError, ...
        raise CLIError(f"cannot read {what} {str(path)!r} ({type(err).__name__}: {_one_line(err)})") from err


def _class_from_hparams(checkpoint: Any, path: Path) -> type:
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if isinstance(hparams, dict):
        for key in _HPARAM_CLASS_KEYS:
            value = hparams.get(key)
            if isinstance(value, str) and value:
                return _import_class(value, option=f"hyper-parameter {key}")
    raise CLIError(
        f"the checkpoint {str(path)!r} does not name its LightningModule class; pass --model PKG.MODULE:CLASS "
        "(or --arch NAME --weights FILE for a plain torchvision state_dict)"
    )


def load_lightning(path_text: str, model_spec: str | None, device: str) -> Loaded:
    """Load a Lightning checkpoint with ``CLASS.load_from_checkpoint``."""
    path = _check_file(path_text, "checkpoint")
    checkpoint = _torch_load(path, "checkpoint", weights_only=False)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CLIError(
            f"{str(path)!r} is not a Lightning checkpoint (no 'state_dict' entry); for a plain state_dict pass "
            "--arch NAME --weights FILE"
        )
    cls = _import_class(model_spec) if model_spec else _class_from_hparams(checkpoint, path)
    del checkpoint
    loader = getattr(cls, "load_from_checkpoint", None)
    if not callable(loader):
        raise CLIError(f"{cls.__module__}.{cls.__qualname__} is not a LightningModule (no load_from_checkpoint)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = loader(str(path), map_location=device)
    except Exception as err:
        raise CLIError(
            f"cannot load {str(path)!r} as {cls.__module__}:{cls.__qualname__} ({type(err).__name__}: "
            f"{_one_line(err, 160)}); check that --model names the class that saved the checkpoint"
        ) from err
    model.eval()
    return Loaded(model, f"{path}")


def _arch_names() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def _build_arch(arch: str) -> Any:
    """The torchvision architecture ``arch``, initialised with seed :data:`RANDOM_SEED` (global RNGs untouched)."""
    import difflib

    import torchvision

    from tsm_lightning.rng import preserved_rng

    names = _arch_names()
    if arch not in names:
        close = difflib.get_close_matches(arch, names, n=4, cutoff=0.5)
        hint = f" Close matches: {close}." if close else ""
        raise CLIError(
            f"unknown --arch {arch!r}.{hint} Valid names are torchvision classification models, e.g. resnet50"
        )
    with preserved_rng(RANDOM_SEED):
        return torchvision.models.get_model(arch, weights=None)


def _match_state_dict(state: dict[str, Any], expected: set[str]) -> dict[str, Any]:
    """Strip common wrapper prefixes (``module.``, ``backbone.``, ...) while that makes more keys match."""
    best = state
    best_hits = len(expected & set(state))
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if not any(k.startswith(prefix) for k in best):
                continue
            stripped = {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in best.items()}
            hits = len(expected & set(stripped))
            if hits > best_hits:
                best, best_hits, changed = stripped, hits, True
    return best


def load_arch(arch: str, weights: str | None, device: str, *, required: bool = True) -> Loaded:
    """Build a torchvision architecture and load a plain ``state_dict`` (or a checkpoint holding one).

    Without ``weights`` (allowed when not ``required``) the network keeps its seeded random initialisation.
    """
    import torch

    model = _build_arch(arch)
    source = f"{arch} ({_RANDOM})"
    if weights is not None or required:
        if weights is None:
            raise CLIError(f"--arch {arch} needs --weights FILE (a state_dict saved with torch.save)")
        path = _check_file(weights, "weights file")
        state = _torch_load(path, "weights file", weights_only=True)
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CLIError(f"{str(path)!r} does not hold a state_dict (a dict of tensors)")
        expected = model.state_dict()
        state = _match_state_dict(state, set(expected))
        loaded = {k: v for k, v in state.items() if k in expected}
        missing = [k for k in expected if k not in loaded and not k.startswith(("fc.", "classifier.", "head"))]
        if not loaded or missing:
            sample = missing[:3] if loaded else list(state)[:3]
            what = f"missing {len(missing)} key(s) such as {sample}" if loaded else f"no key matches (found {sample})"
            raise CLIError(f"{str(path)!r} does not fit --arch {arch}: {what}; check --arch and the file")
        try:
            model.load_state_dict(loaded, strict=False)
        except RuntimeError as err:
            raise CLIError(f"{str(path)!r} does not fit --arch {arch}: {_one_line(err)}") from err
        ignored = len(state) - len(loaded)
        if ignored:
            _progress(f"note: ignored {ignored} key(s) of {path.name} that {arch} does not have")
        source = f"{arch} {path}"
    model.to(device).eval()
    return Loaded(model, source, random_weights=weights is None)


def load_model(args: argparse.Namespace, checkpoint: str | None, *, required: bool = True) -> Loaded:
    """Load one model from the common options.

    With ``required=False`` a missing checkpoint / ``--weights`` is allowed: ``--arch`` or ``--model`` is then built
    with its seeded random initialisation (``Loaded.random_weights``).
    """
    if args.arch:
        if args.model:
            raise CLIError("pass either --model (Lightning checkpoint) or --arch (torchvision state_dict), not both")
        weights = getattr(args, "weights", None)
        if weights is not None and checkpoint is not None and weights != checkpoint:
            raise CLIError("with --arch pass the weights file once, as CHECKPOINT or as --weights")
        return load_arch(args.arch, weights or checkpoint, args.device, required=required)
    if getattr(args, "weights", None):
        raise CLIError("--weights needs --arch NAME (the torchvision architecture of the state_dict)")
    if checkpoint is None:
        if args.model and not required:
            from tsm_lightning.rng import preserved_rng

            cls = _import_class(args.model)
            try:
                with preserved_rng(RANDOM_SEED):
                    model = cls()
            except Exception as err:
                raise CLIError(
                    f"cannot build {args.model} without arguments ({_one_line(err)}); pass a checkpoint"
                ) from err
            source = f"{args.model} ({_RANDOM})"
            return Loaded(model.to(args.device).eval(), source, random_weights=True)
        raise CLIError("pass a CHECKPOINT (with --model PKG.MODULE:CLASS if needed) or --arch NAME --weights FILE")
    return load_lightning(checkpoint, args.model, args.device)


# ---------------------------------------------------------------------------------------------------------------
# Explaining
# ---------------------------------------------------------------------------------------------------------------


def _check_device(device: str) -> str:
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CLIError("--device cuda was given but no CUDA GPU is available; use --device cpu")
    return device


def _check_layer(loaded: Loaded, layer: str) -> None:
    from tsm_lightning.capture import get_layer

    try:
        get_layer(loaded.model, layer)
    except ValueError as err:
        raise CLIError(
            f"--layer: {_one_line(err)}".replace("`tsm-lightning layers`", "`tsm-lightning layers ...`")
        ) from err


def _resolve_layer(loaded: Loaded, layer: str | None, sample: Any) -> str:
    if layer is not None:
        _check_layer(loaded, layer)
        return layer
    try:
        chosen, text = loaded.discover_layer(sample)
    except (TypeError, RuntimeError) as err:
        raise CLIError(f"could not run the model to discover a layer ({_one_line(err)}); pass --layer NAME") from err
    except ValueError as err:
        raise CLIError(f"no layer to explain: {_one_line(err)}") from err
    _progress(f"layer: {text} (auto; pass --layer to choose another, list them with `{PROG} layers`)")
    return chosen


def _run_model(
    loaded: Loaded, images: Any, layer: str, methods: Sequence[str], batch_size: int, device: str, label: str = ""
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Explain all images in batches: CPU maps ``{method: (N, H, W)}`` and per-image ``map_metrics``.

    Each batch goes through :func:`~tsm_lightning.pipeline.explain_batch`, whose one decomposition gives the maps
    and the spectral metrics.
    """
    import torch

    from tsm_lightning.metrics import map_metrics
    from tsm_lightning.pipeline import explain_batch

    n = images.shape[0]
    batches = math.ceil(n / batch_size)
    maps_out: dict[str, list[Any]] = {m: [] for m in methods}
    metrics_out: dict[str, dict[str, list[Any]]] = {}
    start = time.perf_counter()
    for b in range(batches):
        chunk = images[b * batch_size : (b + 1) * batch_size].to(device)
        result = explain_batch(loaded.model, chunk, layer, methods, spectra=True)
        maps = result.upsampled()
        for method, values in map_metrics(maps, decomposition=result.decomposition).items():
            for metric, v in values.items():
                metrics_out.setdefault(method, {}).setdefault(metric, []).append(v.detach().cpu())
        for method in methods:
            maps_out[method].append(maps[method].detach().float().cpu())
        done = min(n, (b + 1) * batch_size)
        _progress(f"{label}batch {b + 1}/{batches}: {done}/{n} images ({time.perf_counter() - start:.1f} s)")
    cat_maps = {m: torch.cat(v) for m, v in maps_out.items()}
    cat_metrics = {m: {k: torch.cat(v) for k, v in d.items()} for m, d in metrics_out.items()}
    return cat_maps, cat_metrics


def _load_inputs(args: argparse.Namespace) -> tuple[Any, list[Path], list[tuple[Path, str]]]:
    from tsm_lightning.data.folder import load_images

    try:
        return load_images(args.images, args.image_size, warn=False)
    except (FileNotFoundError, ValueError) as err:
        raise CLIError(f"--images: {_one_line(err)}") from err


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


# ---------------------------------------------------------------------------------------------------------------
# Output folder
# ---------------------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------------------
# Subcommands
# ---------------------------------------------------------------------------------------------------------------


def cmd_explain(args: argparse.Namespace) -> int:
    """``tsm-lightning explain``."""
    from tsm_lightning.core import validate_methods
    from tsm_lightning.metrics import summarize
    from tsm_lightning.render import comparison_grid, label, overlay
    from tsm_lightning.sinks import PngSink, write_csv

    methods = validate_methods(args.methods)
    device = _check_device(args.device)
    out = OutputDir(args.out, args.force)
    images, files, skipped = _load_inputs(args)
    loaded = load_model(args, args.checkpoint, required=False)
    layer = _resolve_layer(loaded, args.layer, images[:1].to(device))
    if loaded.random_weights:  # after every check, so that a user mistake still gives one line
        trained = "--weights FILE" if args.arch else "a CHECKPOINT"
        _progress(
            f"warning: no weights given: explaining {loaded.source}; the maps show the untrained network, not a "
            f"trained model. Pass {trained} to explain trained weights."
        )
    maps, per_image = _run_model(loaded, images, layer, methods, args.batch_size, device)

    inputs = _input_tiles(images)
    overlays = {method: overlay(inputs.float() / 255, maps[method]) for method in methods}
    features = per_image.get("features", {})
    rows: list[dict[str, Any]] = []
    pictures: dict[str, Any] = {}
    stems = _stems(files)
    column_labels = ["input", *(label(m) for m in methods)]
    png = PngSink(out.path, lambda tag, _step: out.file(f"{tag.removeprefix('explain/')}.png"))
    for i, (path, stem) in enumerate(zip(files, stems, strict=True)):
        for method in methods:
            values = per_image[method]
            row: dict[str, Any] = {"image": stem, "path": str(path), "method": method}
            row.update({k: _float(values[k][i]) for k in ("entropy", "gini")})
            if len(methods) > 1:
                agree = {f"agreement_{m}": values.get(f"agreement_{m}") for m in methods}
                row.update({k: None if v is None else _float(v[i]) for k, v in agree.items()})
            row.update({k: _float(v[i]) for k, v in values.items() if k not in row})
            row.update({k: _float(v[i]) for k, v in features.items()})
            rows.append(row)
        shown = {method: _enlarge(overlays[method][i : i + 1]) for method in methods}
        picture = {f"explain/{stem}": comparison_grid(_enlarge(inputs[i : i + 1]), shown)}
        png.write(picture, {}, 0)
        pictures.update(picture)

    write_csv(out.file("metrics.csv"), rows)
    summary = summarize({m: per_image[m] | features for m in methods})
    meta = {
        "tool": PROG,
        "command": "explain",
        "model": loaded.source,
        "random_weights": loaded.random_weights,
        "layer": layer,
        "methods": list(methods),
        "image_size": args.image_size,
        "columns": ["input", *methods],
        "column_labels": column_labels,
        "images": [{"image": s, "path": str(p), "png": f"{s}.png"} for s, p in zip(stems, files, strict=True)],
        "skipped": [{"path": str(p), "reason": r} for p, r in skipped],
        "summary": {m: {k: _float(v) for k, v in d.items()} for m, d in summary.items()},
        "rows": rows,
    }
    out.file("metrics.json").write_text(json.dumps(meta, indent=1) + "\n")
    if args.tensorboard:
        _write_tensorboard(out, pictures, summary)
    out.close()

    keys = ["entropy", "gini", "spectral_concentration"]
    print(f"explained {len(files)} image(s) with {loaded.source}, layer {layer}; wrote {out.path}")
    _print_table(["method", *keys], [[m, *(_fmt(summary[m].get(k)) for k in keys)] for m in methods])
    _report_skipped(skipped)
    return 0


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


def cmd_compare(args: argparse.Namespace) -> int:
    """``tsm-lightning compare``."""
    import torch

    from tsm_lightning.core import validate_methods
    from tsm_lightning.metrics import pearson
    from tsm_lightning.render import label, labelled_grid, overlay
    from tsm_lightning.sinks import PngSink, write_csv

    methods = validate_methods(args.methods)
    device = _check_device(args.device)
    if len(args.checkpoints) < 2:
        raise CLIError("compare needs at least two checkpoints")
    for ckpt in args.checkpoints:  # every file before the first model runs: a typo gives one line, at once
        _check_file(ckpt, "weights file" if args.arch else "checkpoint")
    out = OutputDir(args.out, args.force)
    images, files, skipped = _load_inputs(args)
    layer = args.layer
    all_maps: list[dict[str, Any]] = []
    names = checkpoint_labels(args.checkpoints)
    for k, (ckpt, name) in enumerate(zip(args.checkpoints, names, strict=True)):
        loaded = load_model(args, ckpt)
        layer = _resolve_layer(loaded, layer, images[:1].to(device))
        maps, _ = _run_model(
            loaded, images, layer, methods, args.batch_size, device, label=f"[{k + 1}/{len(names)} {name}] "
        )
        all_maps.append(maps)
        del loaded

    inputs = _input_tiles(images)
    stems = _stems(files)
    png = PngSink(out.path, lambda tag, _step: out.file(f"{tag}.png"))
    rows: list[dict[str, Any]] = []
    corr = {(a, m): pearson(all_maps[a][m], all_maps[a + 1][m]) for a in range(len(all_maps) - 1) for m in methods}
    for i, stem in enumerate(stems):
        base = inputs[i : i + 1].float() / 255
        strip = []
        for method in methods:
            tiles = [inputs[i]] + [overlay(base, maps[method][i : i + 1])[0] for maps in all_maps]
            strip.append(_enlarge(torch.stack(tiles)))
            for a in range(len(all_maps) - 1):
                rows.append(
                    {
                        "image": stem,
                        "path": str(files[i]),
                        "method": method,
                        "from": names[a],
                        "to": names[a + 1],
                        "pearson": _float(corr[(a, method)][i]),
                        "from_path": str(args.checkpoints[a]),
                        "to_path": str(args.checkpoints[a + 1]),
                    }
                )
        picture = labelled_grid(strip, ["input", *names], [label(m) for m in methods])
        png.write({stem: picture}, {}, 0)
    write_csv(out.file("stability.csv"), rows)
    out.close()

    print(f"compared {len(names)} checkpoints on {len(files)} image(s), layer {layer}; wrote {out.path}")
    pairs = [f"{names[a]}->{names[a + 1]}" for a in range(len(names) - 1)]
    table = [[m, *(_fmt(float(corr[(a, m)].nanmean())) for a in range(len(pairs)))] for m in methods]
    _print_table(["method", *(f"pearson {p}" for p in pairs)], table)
    _report_skipped(skipped)
    return 0


def cmd_layers(args: argparse.Namespace) -> int:
    """``tsm-lightning layers``."""
    import torch

    from tsm_lightning.capture import choose_layer

    device = _check_device(args.device)
    loaded = load_model(args, args.checkpoint, required=False)
    images = torch.zeros(1, 3, args.image_size, args.image_size, device=device)
    try:
        infos = loaded.candidate_layers(images)
    except (TypeError, RuntimeError) as err:
        raise CLIError(f"could not run the model on a {args.image_size} px image ({_one_line(err)})") from err
    try:
        chosen_info, text = choose_layer(infos)
        chosen: str | None = chosen_info.name
        _progress(f"auto choice: {text}")
    except ValueError as err:
        chosen = None
        _progress(f"note: {_one_line(err)}")
    seen: dict[tuple[str, Any], Any] = {}
    for info in infos:
        if args.all or info.is_map:
            seen[(info.name, info.shape)] = info
    if not seen:
        raise CLIError(f"no layer outputs a spatial map at {args.image_size} px; try a larger --image-size")
    print(f"{loaded.source}: layers with a (B, C, h, w) output at {args.image_size} px (* = auto choice)")
    rows = [["*" if name == chosen else "", name, "x".join(map(str, shape)) if shape else "-"] for name, shape in seen]
    _print_table(["", "layer", "output shape"], rows)
    return 0


# ---------------------------------------------------------------------------------------------------------------
# Parser
# ---------------------------------------------------------------------------------------------------------------


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _method_list(values: Sequence[str]) -> list[str]:
    return [m for v in values for m in v.replace(",", " ").split()]


def _add_model_options(p: argparse.ArgumentParser, weights: bool = True) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", metavar="PKG.MODULE:CLASS", help="LightningModule class of the checkpoint")
    g.add_argument("--arch", metavar="NAME", help="torchvision architecture (e.g. resnet50) for a plain state_dict")
    if weights:
        g.add_argument("--weights", metavar="FILE", help="state_dict file for --arch (or pass it as CHECKPOINT)")
    g.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    g.add_argument("--image-size", type=_positive, default=224, metavar="N", help="input side in pixels (default 224)")


def _add_explain_options(p: argparse.ArgumentParser) -> None:
    from tsm_lightning.constants import METHODS

    p.add_argument("--images", nargs="+", required=True, metavar="PATH", help="image files, folders or globs")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--layer", metavar="NAME", help="layer to explain (default: automatic; see `layers`)")
    p.add_argument(
        "--methods",
        nargs="+",
        default=list(METHODS),
        metavar="NAME",
        help=f"saliency methods, from {', '.join(METHODS)} (default: all)",
    )
    p.add_argument("--batch-size", type=_positive, default=16, metavar="N", help="images per forward pass (16)")
    p.add_argument("--force", action="store_true", help="write into an --out folder that holds other files")
    _add_model_options(p)
    if p.prog.endswith("explain"):
        p.add_argument("--tensorboard", action="store_true", help="also write the images and metrics as an event file")


def build_parser() -> argparse.ArgumentParser:
    """The ``tsm-lightning`` argument parser."""
    from tsm_lightning import __version__

    fmt = argparse.RawDescriptionHelpFormatter
    parser = _Parser(
        prog=PROG,
        description="Label-free saliency maps (EigenCAM, TSM, MTSM) of self-supervised CNN checkpoints.",
        epilog=f"example:\n  {PROG} explain last.ckpt --model my_project.models:MoCo --images photos/ --out maps/",
        formatter_class=fmt,
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser(
        "explain",
        help="saliency maps and metrics of one checkpoint",
        description=(
            "Explain images with one model: writes <stem>.png (input, then one overlay per method, under a header row "
            "naming them), metrics.csv and metrics.json (one row per image and method), and prints the mean metrics "
            "per method."
        ),
        epilog=(
            "examples:\n"
            f"  {PROG} explain last.ckpt --model my_project.models:MoCo --images photos/ --out maps/\n"
            f"  {PROG} explain --arch resnet50 --weights backbone.pth --images 'data/*.jpg' --out maps/ "
            "--methods tsm mtsm"
            f"\n  {PROG} explain --arch resnet18 --images photos/ --out try/   # random weights, to try the tool"
        ),
        formatter_class=fmt,
    )
    p.add_argument(
        "checkpoint",
        nargs="?",
        metavar="CHECKPOINT",
        help="Lightning checkpoint (or --arch weights); without one, --arch / --model keep random weights",
    )
    _add_explain_options(p)
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser(
        "compare",
        help="maps of several checkpoints side by side, with their stability",
        description=(
            "Explain the same images with each checkpoint: writes <stem>.png (rows = methods, columns = input then "
            "checkpoints in the given order, each named by the shortest end of its path that tells it apart) and "
            "stability.csv (Pearson correlation between consecutive checkpoints, under the same names)."
        ),
        epilog=(
            "example:\n"
            f"  {PROG} compare epoch=1.ckpt epoch=10.ckpt last.ckpt --model my_project.models:MoCo "
            "--images photos/ --out drift/"
        ),
        formatter_class=fmt,
    )
    p.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT", help="two or more checkpoints (or --arch weights)")
    _add_explain_options(p)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser(
        "layers",
        help="list the layers that can be explained",
        description="List the layers with a spatial (B, C, h, w) output and their shapes; * marks the auto choice.",
        epilog=(
            "examples:\n"
            f"  {PROG} layers last.ckpt --model my_project.models:MoCo\n"
            f"  {PROG} layers --arch resnet50 --image-size 224"
        ),
        formatter_class=fmt,
    )
    p.add_argument("checkpoint", nargs="?", metavar="CHECKPOINT", help="checkpoint (optional with --arch / --model)")
    p.add_argument("--all", action="store_true", help="also list layers without a spatial output")
    _add_model_options(p)
    p.set_defaults(func=cmd_layers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 success, 2 user error)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0) if isinstance(exit_.code, int) else 2
    if hasattr(args, "methods"):
        args.methods = _method_list(args.methods)
    debug = os.environ.get("TSM_LIGHTNING_DEBUG", "") not in ("", "0")
    try:
        return args.func(args)
    except CLIError as err:
        if debug:
            raise
        print(f"error: {_one_line(err, 2 * _MAX_MESSAGE)}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError, ImportError, RuntimeError, KeyError, OSError, TypeError) as err:
        if debug:
            raise
        print(f"error: {_one_line(err)} (set TSM_LIGHTNING_DEBUG=1 for the traceback)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
