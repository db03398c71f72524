"""The ``tsm-lightning`` argument parser: argparse and constants only, so that it answers without importing torch."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn

from tsm_lightning.cli.errors import PROG

__all__ = ["build_parser"]


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line on stderr (exit 2), pointing to ``--help``."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"error: {message}; see '{self.prog} --help'.\n")
        raise SystemExit(2)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _grid(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(part.isdigit() and int(part) > 0 for part in parts):
        raise argparse.ArgumentTypeError(f"expected a grid HxW such as 14x14, got {text!r}")
    return int(parts[0]), int(parts[1])


def _non_negative(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return int(text)


def _method_list(values: Sequence[str]) -> list[str]:
    return [m for v in values for m in v.replace(",", " ").split()]


def _add_model_options(p: argparse.ArgumentParser, weights: bool = True) -> None:
    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        metavar="PKG.MODULE:CLASS",
        help="LightningModule class of the checkpoint, built with its saved hyper-parameters",
    )
    g.add_argument("--arch", metavar="NAME", help="torchvision architecture (e.g. resnet50) for a plain state_dict")
    if weights:
        g.add_argument(
            "--weights",
            metavar="FILE",
            help="state_dict file for --arch: torch.save (.pth, .pt) or .safetensors (or pass it as CHECKPOINT)",
        )
    g.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help=(
            "read checkpoints with a full unpickle and let them name their class (hyper-parameter _class_path): "
            "only for files from a source you trust, since unpickling runs any code a file carries. Without it, "
            "files are read as data (tensors, containers, plain values) and the class comes from --model"
        ),
    )
    g.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    g.add_argument("--image-size", type=_positive, default=224, metavar="N", help="input side in pixels (default 224)")
    g.add_argument(
        "--token-grid",
        type=_grid,
        metavar="HxW",
        help="vision transformers: patch grid of the tokens (default: read from the model's patch embedding)",
    )
    g.add_argument(
        "--prefix-tokens",
        type=_non_negative,
        metavar="P",
        help="vision transformers: leading class/register tokens to drop (default: tokens minus grid cells)",
    )
    g.add_argument(
        "--channels",
        choices=("first", "last"),
        help="where the channels of 4-D layer outputs are: first (B, C, h, w) or last (B, h, w, C), as Swin "
        "stages (default: as the model tells)",
    )


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
        p.add_argument(
            "--no-attention",
            dest="attention",
            action="store_false",
            help="vision transformers: leave out the last block's class-token attention map (shown by default)",
        )


def build_parser() -> argparse.ArgumentParser:
    """The ``tsm-lightning`` argument parser."""
    from tsm_lightning import __version__

    fmt = argparse.RawDescriptionHelpFormatter
    parser = _Parser(
        prog=PROG,
        description="Label-free saliency maps (EigenCAM, TSM, MTSM) of self-supervised CNN and ViT checkpoints.",
        epilog=(
            f"example:\n  {PROG} explain last.ckpt --model my_project.models:MoCo --images photos/ --out maps/\n\n"
            "security: checkpoints and --weights files are read as data (tensors, containers, plain values; also\n"
            ".safetensors): a file can neither run code nor choose the class that is built (that is --model)\n"
            "unless --trust-checkpoint is given, for files from a source you trust."
        ),
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
    p.set_defaults(command_name="explain")

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
    p.set_defaults(command_name="compare")

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
    p.set_defaults(command_name="layers")
    return parser
