"""Loading the model to explain: a Lightning checkpoint, or a torchvision architecture and a ``state_dict``.

Without weights (``explain`` and ``layers`` allow it) the class or architecture keeps a seeded random
initialisation (:data:`RANDOM_SEED`), and :class:`Loaded` says so. torch, torchvision and the user's class are
imported only when a model is loaded.
"""

from __future__ import annotations

import argparse
import importlib
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tsm_lightning.cli.errors import CLIError, _one_line, _progress

__all__ = ["RANDOM_SEED", "Loaded", "load_arch", "load_lightning", "load_model"]

_PREFIXES = ("module.", "_orig_mod.", "model.", "backbone.", "encoder.", "net.")
_HPARAM_CLASS_KEYS = ("_class_path", "class_path")
RANDOM_SEED = 0
"""Seed of the initialisation explained when no weights are given (so that such runs are reproducible)."""
_RANDOM = f"random weights, seed {RANDOM_SEED}"


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
    token_grid: Any = None

    def discover_layer(self, images: Any) -> tuple[str, str]:
        """The layer auto-discovery picks and a sentence with its grid.

        :func:`~tsm_lightning.discovery.discover_layer`: the search ``SaliencyMonitor`` and ``explain`` use.
        """
        from tsm_lightning.discovery import discover_layer

        return discover_layer(self.model, images, token_grid=self.token_grid)

    def candidate_layers(self, images: Any) -> list[Any]:
        """The layers auto-discovery searches, with their output shapes, named relative to the model."""
        from tsm_lightning.discovery import candidate_layers

        return candidate_layers(self.model, images, token_grid=self.token_grid)


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
    """Load one model from the common options, with the rule of ``--token-grid``, ``--prefix-tokens``, ``--channels``.

    With ``required=False`` a missing checkpoint / ``--weights`` is allowed: ``--arch`` or ``--model`` is then built
    with its seeded random initialisation (``Loaded.random_weights``).
    """
    loaded = _load_model(args, checkpoint, required)
    grid, prefix = getattr(args, "token_grid", None), getattr(args, "prefix_tokens", None)
    channels = getattr(args, "channels", None)
    if grid is not None or prefix is not None or channels is not None:
        from tsm_lightning.tokens import TokenGrid

        loaded.token_grid = TokenGrid(grid, prefix, channels)
    return loaded


def _load_model(args: argparse.Namespace, checkpoint: str | None, required: bool) -> Loaded:
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
