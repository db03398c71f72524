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

Models come either from a Lightning checkpoint and the class ``--model PKG.MODULE:CLASS`` (built with the
checkpoint's hyper-parameters, its state_dict loaded strictly) or from a torchvision architecture and a plain
``state_dict`` (``--arch resnet50 --weights FILE``, ``.pth`` or ``.safetensors``). ``explain`` and ``layers`` also
accept ``--arch`` (or ``--model``) without weights: the network keeps a seeded random initialisation, with a warning,
and the outputs say so.

Files are read as data (:func:`~tsm_lightning.cli.loading.read_checkpoint`: torch's weights-only unpickler, or
safetensors): a file can neither run code nor name the class that is built. ``--trust-checkpoint`` opts in to a full
unpickle and to the class a checkpoint names (LightningCLI's ``_class_path``), for files from a trusted source.

The package: :mod:`~tsm_lightning.cli.parser` (arguments; answers a usage error without importing torch),
:mod:`~tsm_lightning.cli.loading` (models), :mod:`~tsm_lightning.cli.commands` (the subcommands, on
:mod:`tsm_lightning.pipeline`), :mod:`~tsm_lightning.cli.outputs` (folder, tables, files). ``tsm_lightning.cli:main`` is
the console script.

User mistakes end with a one-line ``error: ...`` on stderr and exit status 2; set ``TSM_LIGHTNING_DEBUG=1`` to see
the traceback instead.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Sequence

from tsm_lightning.cli.errors import _MAX_MESSAGE, PROG, CLIError, _one_line
from tsm_lightning.cli.loading import RANDOM_SEED
from tsm_lightning.cli.outputs import MANIFEST, checkpoint_labels
from tsm_lightning.cli.parser import _method_list, build_parser

__all__ = ["MANIFEST", "PROG", "RANDOM_SEED", "CLIError", "build_parser", "checkpoint_labels", "main"]


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
        commands = importlib.import_module("tsm_lightning.cli.commands")  # torch and the library, from here on
        return getattr(commands, f"cmd_{args.command_name}")(args)
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
