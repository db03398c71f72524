"""The subcommands ``explain``, ``compare`` and ``layers``.

Each batch of images goes through :func:`tsm_lightning.pipeline.explain_batch`, the path ``explain()`` and
``SaliencyMonitor`` take; the layer search is :func:`tsm_lightning.discovery.discover_layer`. torch and the rest of the
library are imported when a command runs, not when the parser does.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tsm_lightning.cli.errors import PROG, CLIError, _one_line, _progress
from tsm_lightning.cli.loading import Loaded, _check_file, load_model
from tsm_lightning.cli.outputs import (
    OutputDir,
    _enlarge,
    _float,
    _fmt,
    _input_tiles,
    _print_table,
    _report_skipped,
    _stems,
    _write_tensorboard,
    checkpoint_labels,
)

__all__ = ["cmd_compare", "cmd_explain", "cmd_layers"]


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
    loaded: Loaded,
    images: Any,
    layer: str,
    methods: Sequence[str],
    batch_size: int,
    device: str,
    label: str = "",
    attention: bool | None = False,
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Explain all images in batches: CPU maps ``{name: (N, H, W)}`` and per-image ``map_metrics``.

    Each batch goes through :func:`~tsm_lightning.pipeline.explain_batch`, whose one decomposition gives the maps
    and the spectral metrics. The names are the methods, then ``"attention"`` for a vision transformer when
    ``attention`` is not ``False`` (see :func:`~tsm_lightning.pipeline.explain_batch`).
    """
    import torch

    from tsm_lightning.metrics import map_metrics
    from tsm_lightning.pipeline import explain_batch

    n = images.shape[0]
    batches = math.ceil(n / batch_size)
    maps_out: dict[str, list[Any]] = {}
    metrics_out: dict[str, dict[str, list[Any]]] = {}
    start = time.perf_counter()
    for b in range(batches):
        chunk = images[b * batch_size : (b + 1) * batch_size].to(device)
        result = explain_batch(
            loaded.model, chunk, layer, methods, spectra=True, token_grid=loaded.token_grid, attention=attention
        )
        maps = result.upsampled()
        for method, values in map_metrics(maps, decomposition=result.decomposition).items():
            for metric, v in values.items():
                metrics_out.setdefault(method, {}).setdefault(metric, []).append(v.detach().cpu())
        for name, m in maps.items():
            maps_out.setdefault(name, []).append(m.detach().float().cpu())
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


def cmd_explain(args: argparse.Namespace) -> int:
    """``tsm-lightning explain``."""
    from tsm_lightning.constants import ATTENTION
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
    maps, per_image = _run_model(
        loaded, images, layer, methods, args.batch_size, device, attention=None if args.attention else False
    )
    names = tuple(maps)  # the methods, then the attention map of a vision transformer

    inputs = _input_tiles(images)
    overlays = {name: overlay(inputs.float() / 255, maps[name]) for name in names}
    features = per_image.get("features", {})
    rows: list[dict[str, Any]] = []
    pictures: dict[str, Any] = {}
    stems = _stems(files)
    column_labels = ["input", *(label(m) for m in names)]
    png = PngSink(out.path, lambda tag, _step: out.file(f"{tag.removeprefix('explain/')}.png"))
    for i, (path, stem) in enumerate(zip(files, stems, strict=True)):
        for method in names:
            values = per_image[method]
            row: dict[str, Any] = {"image": stem, "path": str(path), "method": method}
            row.update({k: _float(values[k][i]) for k in ("entropy", "gini")})
            if len(names) > 1:
                agree = {f"agreement_{m}": values.get(f"agreement_{m}") for m in names}
                row.update({k: None if v is None else _float(v[i]) for k, v in agree.items()})
            row.update({k: _float(v[i]) for k, v in values.items() if k not in row})
            row.update({k: _float(v[i]) for k, v in features.items()})
            rows.append(row)
        shown = {name: _enlarge(overlays[name][i : i + 1]) for name in names}
        picture = {f"explain/{stem}": comparison_grid(_enlarge(inputs[i : i + 1]), shown)}
        png.write(picture, {}, 0)
        pictures.update(picture)

    write_csv(out.file("metrics.csv"), rows)
    summary = summarize({m: per_image[m] | features for m in names})
    meta = {
        "tool": PROG,
        "command": "explain",
        "model": loaded.source,
        "random_weights": loaded.random_weights,
        "layer": layer,
        "methods": list(methods),
        "attention": ATTENTION in names,
        "image_size": args.image_size,
        "columns": ["input", *names],
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
    _print_table(["map", *keys], [[m, *(_fmt(summary[m].get(k)) for k in keys)] for m in names])
    _report_skipped(skipped)
    return 0


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

    device = _check_device(args.device)
    loaded = load_model(args, args.checkpoint, required=False)
    images = torch.zeros(1, 3, args.image_size, args.image_size, device=device)
    try:
        infos = loaded.candidate_layers(images)
    except (TypeError, RuntimeError) as err:
        raise CLIError(f"could not run the model on a {args.image_size} px image ({_one_line(err)})") from err
    chosen: str | None = None
    try:
        chosen, text = loaded.discover_layer(images)  # the rule explain and SaliencyMonitor use (network, call)
        _progress(f"auto choice: {text}")
    except ValueError as err:
        _progress(f"note: {_one_line(err)}")
    seen: dict[tuple[str, Any], Any] = {}
    for info in infos:
        if args.all or info.is_map or info.tokens:
            seen[(info.name, info.shape)] = info
    if not seen:
        raise CLIError(f"no layer outputs a spatial map at {args.image_size} px; try a larger --image-size")
    print(
        f"{loaded.source}: layers with a (B, C, h, w) map or (B, T, D) tokens at {args.image_size} px (* = auto choice)"
    )
    rows = [
        [
            "*" if info.name == chosen else "",
            info.name,
            "x".join(map(str, info.shape)) if info.shape else "-",
            ("tokens " if info.tokens else "") + ("x".join(map(str, info.grid)) if info.grid else "-"),
        ]
        for info in seen.values()
    ]
    _print_table(["", "layer", "output shape", "grid"], rows)
    return 0
