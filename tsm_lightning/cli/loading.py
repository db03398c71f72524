"""Loading the model to explain: a Lightning checkpoint, or a torchvision architecture and a ``state_dict``.

Without weights (``explain`` and ``layers`` allow it) the class or architecture keeps a seeded random
initialisation (:data:`RANDOM_SEED`), and :class:`Loaded` says so. torch, torchvision and the user's class are
imported only when a model is loaded.

Checkpoints are data, not code. Every file is read by :func:`read_checkpoint` with torch's weights-only unpickler,
which builds tensors, containers and the one plain type beyond torch's defaults that ordinary Lightning checkpoints
hold (paths: :func:`allowed_globals`) and rejects anything else with a :class:`CLIError` naming :data:`TRUST_FLAG`;
``.safetensors`` files are read with safetensors. The LightningModule class comes from ``--model`` (code the user
names): it is built with the checkpoint's saved hyper-parameters and the state_dict loaded strictly
(:func:`build_module`). Only with ``trust=True`` (``--trust-checkpoint``) is a file fully unpickled and may it name
its own class.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import pickle
import re
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tsm_lightning.cli.errors import CLIError, _one_line, _progress

__all__ = [
    "RANDOM_SEED",
    "TRUST_FLAG",
    "Loaded",
    "allowed_globals",
    "build_module",
    "load_arch",
    "load_lightning",
    "load_model",
    "read_checkpoint",
]

_PREFIXES = ("module.", "_orig_mod.", "model.", "backbone.", "encoder.", "net.")
_HPARAM_CLASS_KEYS = ("_class_path", "class_path")
_HPARAM_PRIVATE_KEYS = ("_class_path", "_instantiator")  # LightningCLI's: how to build, not arguments of the class
_HPARAMS_KEY, _HPARAMS_NAME_KEY = "hyper_parameters", "hparams_name"
_PAST_HPARAMS_KEYS = ("hparams", "module_arguments")  # Lightning <= 0.7.6
_INSTANTIATORS = ("lightning.pytorch.cli.instantiate_module", "pytorch_lightning.cli.instantiate_module")
TRUST_FLAG = "--trust-checkpoint"
"""The command-line opt-in to a full unpickle (``trust=True`` in the library functions)."""
_SAFETENSORS = (".safetensors",)
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


def allowed_globals() -> list[Any]:
    """The types beyond torch's weights-only defaults that :func:`read_checkpoint` lets a checkpoint build.

    torch allows tensors, ``dict`` / ``list`` / ``tuple`` / ``set``, ``OrderedDict``, numbers, strings, ``None``,
    ``torch.Size`` and dtypes by default. Checkpoints saved by ``lightning.pytorch`` and ``pytorch_lightning``
    Trainers (with ``save_hyperparameters()``, a datamodule's hyper-parameters, ModelCheckpoint, EarlyStopping,
    LearningRateMonitor and SaliencyMonitor state, optimizer and scheduler state) hold nothing else but ``pathlib``
    paths, where a module or datamodule saved a path argument: those are added here, and only those. Building a
    path runs no code a file can choose. (Lightning's ``AttributeDict`` is not needed: Trainers save
    ``dict(module.hparams)``; a nested one cannot be built by the weights-only unpickler, which fills only plain
    dicts, and needs ``--trust-checkpoint``.)

    Returns:
        Objects, or ``(object, "module.Name")`` pairs for the names a file written by another Python version uses
        (Python 3.13 pickles paths from ``pathlib._local``), for :func:`torch.serialization.safe_globals`.
    """
    import pathlib

    allowed: list[Any] = []
    for name in ("PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"):
        cls = getattr(pathlib, name)
        allowed.append(cls)
        for module in ("pathlib", "pathlib._local"):
            if cls.__module__ != module:
                allowed.append((cls, f"{module}.{name}"))
    return allowed


@contextmanager
def _safe_globals() -> Iterator[None]:
    """:func:`allowed_globals`, allowed inside the block only (torch's global allow-list is left as it was)."""
    import torch

    with torch.serialization.safe_globals(allowed_globals()):
        yield


def _rejected_globals(path: Path, message: str) -> list[str]:
    """The types a checkpoint needs beyond :func:`allowed_globals`, from the file (zip format) or torch's message."""
    import torch

    try:
        with _safe_globals():
            names = list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # legacy (non-zip) files: torch's message names the first one
        names = []
    return names or list(dict.fromkeys(re.findall(r"GLOBAL ([\w.]+)", message)))


def read_checkpoint(path: str | Path, *, trust: bool = False, what: str = "checkpoint") -> Any:
    """Read a file written by ``torch.save`` (or a ``.safetensors`` file) without running code it may carry.

    The file is read with torch's weights-only unpickler, allowed :func:`allowed_globals` for the duration of the
    call: tensors, containers, numbers, strings and the plain types ordinary Lightning checkpoints hold. Anything
    else (an object whose unpickling would call a function, a class of the training code) is refused, never read
    by falling back to a full unpickle.

    Args:
        path: The file. A ``.safetensors`` file is read with :func:`safetensors.torch.load_file` (a flat
            ``{name: tensor}`` dict).
        trust: Read with a full unpickle (``torch.load(weights_only=False)``): for files from a source the user
            trusts, which may then run any code they carry (the command line's ``--trust-checkpoint``).
        what: What the file is, for messages ("checkpoint", "weights file").

    Returns:
        What the file holds, with tensors on the CPU.

    Raises:
        CLIError: If the file is missing, unreadable, or holds types the safe reader does not allow (the message
            names them and ``--trust-checkpoint``).
    """
    import torch

    path = _check_file(str(path), what)
    if path.suffix.lower() in _SAFETENSORS:
        return _read_safetensors(path, what)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on pickle protocols and legacy formats
            if trust:
                return torch.load(path, map_location="cpu", weights_only=False)
            with _safe_globals():
                return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        message = str(err)
        if trust or "Weights only load failed" not in message:
            raise CLIError(f"cannot read {what} {str(path)!r} ({type(err).__name__}: {_one_line(err)})") from err
        names = _rejected_globals(path, message)
        if names:
            shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
            raise CLIError(
                f"{what} {str(path)!r} holds objects the safe reader does not build ({shown}): unpickling them "
                f"could run code hidden in the file. If you trust where the file comes from, pass {TRUST_FLAG} "
                "(a full unpickle, which runs whatever code the file carries)"
            ) from None
        detail = re.search(r"WeightsUnpickler error:\s*(.*?)\s*(Check the documentation|$)", message, re.S)
        reason = _one_line(detail.group(1) if detail and detail.group(1) else "not a file torch.save wrote", 120)
        raise CLIError(
            f"cannot read {what} {str(path)!r} with the safe reader ({reason}): it is corrupt or was not written "
            f"by torch.save. If it is a checkpoint from a source you trust, {TRUST_FLAG} reads it with a full "
            "unpickle (which runs whatever code the file carries)"
        ) from None
    except Exception as err:  # corrupt files raise RuntimeError, EOFError, ...
        raise CLIError(f"cannot read {what} {str(path)!r} ({type(err).__name__}: {_one_line(err)})") from err


def _read_safetensors(path: Path, what: str) -> dict[str, Any]:
    try:
        from safetensors.torch import load_file
    except ImportError as err:
        raise CLIError(
            f"reading {path.name} needs the safetensors package: pip install 'tsm-lightning[safetensors]'"
        ) from err
    try:
        return load_file(str(path), device="cpu")
    except Exception as err:  # SafetensorError, OSError, ...
        raise CLIError(f"cannot read {what} {str(path)!r} as safetensors ({_one_line(err)})") from err


def _class_from_hparams(checkpoint: Any, path: Path, trust: bool = False) -> type:
    hparams = checkpoint.get(_HPARAMS_KEY) if isinstance(checkpoint, dict) else None
    if isinstance(hparams, Mapping):
        for key in _HPARAM_CLASS_KEYS:
            value = hparams.get(key)
            if isinstance(value, str) and value:
                if not trust:
                    module, _, name = value.rpartition(".")
                    raise CLIError(
                        f"the checkpoint {str(path)!r} names its class {value!r} in its hyper-parameters; a class "
                        f"named by a file is imported only with {TRUST_FLAG}. Pass --model {module}:{name} (code "
                        f"you name), or {TRUST_FLAG} if you trust where the file comes from"
                    )
                return _import_class(value, option=f"hyper-parameter {key}")
    raise CLIError(
        f"the checkpoint {str(path)!r} does not name its LightningModule class; pass --model PKG.MODULE:CLASS "
        "(or --arch NAME --weights FILE for a plain torchvision state_dict)"
    )


def _is_overridden(obj: Any, method: str) -> bool:
    """Whether ``type(obj)`` defines ``method`` in a class of its own rather than Lightning's base classes."""
    for klass in type(obj).__mro__:
        if method in vars(klass):
            return not klass.__module__.startswith(("lightning.", "pytorch_lightning.", "lightning_fabric."))
    return False


def _init_kwargs(cls: type, checkpoint: Mapping[str, Any], trust: bool) -> tuple[dict[str, Any], Any]:
    """The keyword arguments Lightning's ``load_from_checkpoint`` would pass to ``cls``, and the instantiator."""
    hparams: dict[str, Any] = {}
    for key in (*_PAST_HPARAMS_KEYS, _HPARAMS_KEY):
        saved = checkpoint.get(key)
        if isinstance(saved, Mapping):
            hparams.update(saved)
    instantiator = hparams.pop("_instantiator", None)
    for key in _HPARAM_PRIVATE_KEYS:
        hparams.pop(key, None)
    if instantiator is not None and not trust:
        instantiator = None  # LightningCLI's: it would build nested classes named by the file
    params = list(inspect.signature(cls).parameters.values())  # __init__'s, without self
    names = [p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    name = checkpoint.get(_HPARAMS_NAME_KEY)
    if isinstance(name, str) and name in names:  # save_hyperparameters(hparams) of an argument named `name`
        return {name: hparams}, instantiator
    if not any(p.kind == p.VAR_KEYWORD for p in params):
        hparams = {k: v for k, v in hparams.items() if k in names}
    return hparams, instantiator


def build_module(cls: type, checkpoint: Mapping[str, Any], *, trust: bool = False, source: str = "") -> Any:
    """Build ``cls`` from a checkpoint read by :func:`read_checkpoint`, as ``load_from_checkpoint`` would.

    ``cls`` is called with the saved hyper-parameters (filtered to its ``__init__`` arguments unless it takes
    ``**kwargs``; the argument named ``hparams_name`` when the module saved one object), ``configure_model`` and
    ``on_load_checkpoint`` run when the class defines them, and the state_dict is loaded strictly (unless the
    class sets ``strict_loading = False``). LightningCLI's ``_class_path`` / ``_instantiator`` entries are left
    out: they name code in the file, honoured only with ``trust`` (and then only Lightning's own instantiators).

    Args:
        cls: The module class (a ``LightningModule`` or any ``torch.nn.Module``), named by the user.
        checkpoint: ``{"state_dict": ..., "hyper_parameters": ..., ...}``.
        trust: Also honour LightningCLI's ``_instantiator`` (which builds nested classes the file names).
        source: The file, for messages.

    Returns:
        The module, on the CPU, in training mode as built (the caller moves it and calls ``eval()``).

    Raises:
        CLIError: If the class cannot be built from the hyper-parameters or the state_dict does not fit it.
    """
    import torch

    what = f"{cls.__module__}:{cls.__qualname__}"
    where = f"{source!r} as {what}" if source else what
    kwargs, instantiator = _init_kwargs(cls, checkpoint, trust)
    try:
        if instantiator is not None:
            if instantiator not in _INSTANTIATORS:
                raise ValueError(f"the instantiator {instantiator!r} is not one of Lightning's")
            module_name, _, attr = str(instantiator).rpartition(".")
            model = getattr(importlib.import_module(module_name), attr)(cls, kwargs)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = cls(**kwargs)
    except Exception as err:
        saved = checkpoint.get(_HPARAMS_KEY)
        by_cli = isinstance(saved, Mapping) and saved.get("_instantiator") is not None and not trust
        cli = f" (saved by LightningCLI: its nested class_path entries are built only with {TRUST_FLAG})"
        raise CLIError(
            f"cannot build {what} from the hyper-parameters of {source or 'the checkpoint'} ({type(err).__name__}: "
            f"{_one_line(err, 160)}){cli if by_cli else ''}; check that --model names the class that saved the "
            "checkpoint"
        ) from err
    if not isinstance(model, torch.nn.Module):
        raise CLIError(f"{what} is not a torch.nn.Module (built a {type(model).__name__}); --model names the class")
    strict = getattr(model, "strict_loading", True) is not False
    hooks: Any = model  # a LightningModule's, when the class overrides them
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if _is_overridden(model, "configure_model"):
                hooks.configure_model()
            if _is_overridden(model, "on_load_checkpoint"):
                hooks.on_load_checkpoint(checkpoint)
            model.load_state_dict(checkpoint["state_dict"], strict=strict)
    except Exception as err:
        raise CLIError(
            f"cannot load {where} ({type(err).__name__}: {_one_line(err, 160)}); check that --model names the "
            "class that saved the checkpoint"
        ) from err
    return model


def load_lightning(
    path_text: str | Path, model_spec: str | type | None, device: str = "cpu", *, trust: bool = False
) -> Loaded:
    """Load a Lightning checkpoint: read it safely, build the class with its hyper-parameters, load its weights.

    Args:
        path_text: The checkpoint (``.ckpt`` from a Trainer; a ``.safetensors`` state_dict of the class also works).
        model_spec: The LightningModule class, or ``"PKG.MODULE:CLASS"`` (``--model``). ``None`` reads the class
            the checkpoint's hyper-parameters name (LightningCLI's ``_class_path``), which needs ``trust``.
        device: Where the model goes.
        trust: Read the file with a full unpickle and let it name its class (``--trust-checkpoint``): only for
            files from a trusted source, since unpickling can run any code the file carries.

    Returns:
        The model in eval mode on ``device``.

    Raises:
        CLIError: For a missing, unreadable or unsafe file (naming ``--trust-checkpoint``), or a class that does
            not fit it.
    """
    path = _check_file(str(path_text), "checkpoint")
    checkpoint = read_checkpoint(path, trust=trust)
    if path.suffix.lower() in _SAFETENSORS:
        if model_spec is None:
            raise CLIError(
                f"{str(path)!r} holds weights only: pass --model PKG.MODULE:CLASS (built with its defaults) or "
                "--arch NAME for a torchvision state_dict"
            )
        checkpoint = {"state_dict": checkpoint}
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), Mapping):
        raise CLIError(
            f"{str(path)!r} is not a Lightning checkpoint (no 'state_dict' entry); for a plain state_dict pass "
            "--arch NAME --weights FILE"
        )
    if isinstance(model_spec, type):
        cls = model_spec
    else:
        cls = _import_class(model_spec) if model_spec else _class_from_hparams(checkpoint, path, trust)
    model = build_module(cls, checkpoint, trust=trust, source=str(path))
    del checkpoint
    model.to(device).eval()
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


def load_arch(arch: str, weights: str | None, device: str, *, required: bool = True, trust: bool = False) -> Loaded:
    """Build a torchvision architecture and load a plain ``state_dict`` (or a checkpoint holding one).

    ``weights`` is read by :func:`read_checkpoint`: a ``torch.save`` file (``.pth``, ``.pt``, ``.ckpt``) with the
    safe reader unless ``trust``, or a ``.safetensors`` file. Without ``weights`` (allowed when not ``required``)
    the network keeps its seeded random initialisation.
    """
    import torch

    model = _build_arch(arch)
    source = f"{arch} ({_RANDOM})"
    if weights is not None or required:
        if weights is None:
            raise CLIError(f"--arch {arch} needs --weights FILE (a state_dict saved with torch.save)")
        path = _check_file(weights, "weights file")
        state = read_checkpoint(path, trust=trust, what="weights file")
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
    trust = bool(getattr(args, "trust_checkpoint", False))
    if args.arch:
        if args.model:
            raise CLIError("pass either --model (Lightning checkpoint) or --arch (torchvision state_dict), not both")
        weights = getattr(args, "weights", None)
        if weights is not None and checkpoint is not None and weights != checkpoint:
            raise CLIError("with --arch pass the weights file once, as CHECKPOINT or as --weights")
        return load_arch(args.arch, weights or checkpoint, args.device, required=required, trust=trust)
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
    return load_lightning(checkpoint, args.model, args.device, trust=trust)
