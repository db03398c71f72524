"""lightly's own Lightning examples, each run with the one added line ``callbacks=[SaliencyMonitor()]``.

Takes a copy of ``examples/pytorch_lightning/`` from lightly's repository (``--examples DIR``; nothing is fetched
here) and, for every script, writes a patched copy into a temporary folder that changes only what a user trying the
monitor on a laptop would change:

* the data: the dataset statement (``torchvision.datasets.CIFAR10(...)``, ``VOCDetection(...)``, ...) becomes the
  package's built-in ``TexturedObjects`` with the script's own ``transform`` (``--num-samples`` images of
  ``--source-size`` px; lightly's transforms crop and resize them to the sizes the script asks for);
* the size: ``batch_size`` and ``num_workers=0`` in the ``DataLoader``, ``max_steps`` and CPU in the ``Trainer``;
* the one line: ``from tsm_lightning.callbacks.pl import SaliencyMonitor`` (``tsm_lightning.callbacks`` for scripts
  on ``lightning``) and ``callbacks=[SaliencyMonitor()]`` in the ``Trainer``, without arguments.

Models, losses, transforms and training steps are lightly's, untouched. Each patched script runs in a subprocess (its
own folder as working directory, ``PYTHONPATH=--pythonpath``) with a timeout. What it logged is read back from the
Trainer's default logger (TensorBoard event files, else PNG files), and a line the patch appends after
``trainer.fit`` prints the layer the monitor chose. One CSV row per script (``--out``):

``script, status, layer, attention, pictures, seconds, error, code``

* ``status``: ``ok`` (trained and logged saliency pictures), ``no pictures`` (trained, the monitor logged nothing:
  its warning is in ``error``), ``error`` (the script stopped: the exception in ``error``), ``timeout``, ``skipped``
  (no ``Trainer`` in the script, e.g. a placeholder) or ``not patched`` (no dataset / ``Trainer`` statement found);
* ``layer``: the layer the monitor monitored; ``attention``: whether it logged class-token attention
  (``saliency/attention``); ``pictures``: the number of ``saliency/*`` picture tags logged;
* ``status`` ``trained``: with ``--no-monitor``, the same patched run without the callback trained (a baseline:
  does the script itself run here?);
* ``code``: ``--label`` (which checkout of tsm_lightning ran; default the ``--pythonpath`` folder and its commit),
  followed by the monitor's arguments where ``--monitor-args SCRIPT=ARGS`` gave some (what a script needs beyond
  the one line), or ``no monitor``.

``--append`` keeps the rows of an existing CSV whose (script, code) is not re-run, so runs of two checkouts can
share one file. Usage (a few minutes per ViT script on two CPU cores)::

    python benchmarks/lightly_examples.py --examples /path/to/lightly/examples/pytorch_lightning
    python benchmarks/lightly_examples.py --examples DIR --only dinov2 ibot aim --pythonpath ../other --append
    python benchmarks/lightly_examples.py --examples DIR --only aim --append \
        --monitor-args 'aim=forward_fn=lambda m, x: m.backbone.forward_features(x)'
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "lightly_examples.csv"
COLUMNS = ("script", "status", "layer", "attention", "pictures", "seconds", "error", "code")
RESULT_MARK = "TSM_LIGHTLY_EXAMPLE_RESULT"

_DATASET = re.compile(r"^(?P<lhs>dataset\s*=\s*)(?:torchvision\.datasets\.\w+|\w*Dataset\w*|\w+)\(", re.M)
_TRAINER = re.compile(r"^(?P<lhs>trainer\s*=\s*)(?:pl\.|L\.|lightning\.|pytorch_lightning\.)?Trainer\(", re.M)
_LOADER = re.compile(r"\b(?:torch\.utils\.data\.)?DataLoader\(")
_ACCELERATOR = re.compile(r"^accelerator\s*=.*$", re.M)
_FIT = re.compile(r"^trainer\.fit\(", re.M)


class PatchError(ValueError):
    """The script does not have the statements the patch rewrites (named in the message)."""


@dataclass
class Settings:
    """How small each run is."""

    batch_size: int = 4
    steps: int = 2
    num_samples: int = 8
    source_size: int = 64
    monitor: bool = True  # False: the same run without the callback (does the script itself train?)
    monitor_args: str = ""  # source of SaliencyMonitor's arguments, e.g. 'layer="backbone.7"'; "" is the one line


def _call_end(text: str, open_paren: int) -> int:
    """Index just past the parenthesis that closes the one at ``open_paren`` (strings and comments skipped)."""
    depth, i, quote = 0, open_paren, None
    while i < len(text):
        char = text[i]
        if quote:
            if char == "\\":
                i += 1
            elif text.startswith(quote, i):
                i += len(quote) - 1
                quote = None
        elif char in "\"'":
            quote = text[i : i + 3] if text[i : i + 3] in ('"""', "'''") else char
            i += len(quote) - 1
        elif char == "#":
            i = text.find("\n", i)
            if i < 0:
                break
        elif char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    raise PatchError(f"unbalanced parentheses from offset {open_paren}")


def _keyword(call: str, name: str) -> str | None:
    """The source of keyword argument ``name`` in a call's text (top level only), or None."""
    match = re.search(rf"[(,\s]{name}\s*=\s*", call)
    if match is None:
        return None
    start, depth = match.end(), 0
    for i in range(start, len(call)):
        char = call[i]
        if char in "([{":
            depth += 1
        elif char in ")]}":
            if depth == 0:
                return call[start:i].strip()
            depth -= 1
        elif char == "," and depth == 0:
            return call[start:i].strip()
    return None


def patch_script(source: str, settings: Settings) -> str:
    """The script with the data / size edits and the one monitor line (see the module docstring).

    Raises:
        PatchError: if the script has no ``dataset = ...(...)``, ``DataLoader(...)`` or ``trainer = Trainer(...)``
            statement to rewrite.
    """
    trainer = _TRAINER.search(source)
    if trainer is None:
        raise PatchError("no `trainer = Trainer(...)` statement")
    dataset = _DATASET.search(source)
    if dataset is None:
        raise PatchError("no `dataset = ...(...)` statement")
    end = _call_end(source, dataset.end() - 1)
    transform = _keyword(source[dataset.start() : end], "transform") or "None"
    data = (
        f"{dataset['lhs']}TexturedObjects(num_samples={settings.num_samples}, "
        f"image_size={settings.source_size}, transform={transform})"
    )
    source = source[: dataset.start()] + data + source[end:]

    loader = _LOADER.search(source, dataset.start())
    if loader is None:
        raise PatchError("no `DataLoader(...)` after the dataset")
    end = _call_end(source, loader.end() - 1)
    call = source[loader.start() : end]
    call = re.sub(r"\bbatch_size\s*=\s*\d+", f"batch_size={settings.batch_size}", call)
    call = re.sub(r"\bnum_workers\s*=\s*\d+", "num_workers=0", call)
    call = re.sub(r"\bpersistent_workers\s*=\s*True", "persistent_workers=False", call)
    source = source[: loader.start()] + call + source[end:]

    source = _ACCELERATOR.sub('accelerator = "cpu"', source, count=1)
    trainer = _TRAINER.search(source)
    assert trainer is not None
    opening = trainer.end()
    callback = f"callbacks=[SaliencyMonitor({settings.monitor_args})], " if settings.monitor else ""
    added = f"{callback}max_steps={settings.steps}, enable_progress_bar=False, "
    source = source[:opening] + added + source[opening:]

    flavour = "tsm_lightning.callbacks.pl" if re.search(r"^import pytorch_lightning", source, re.M) else None
    flavour = flavour or "tsm_lightning.callbacks"
    header = f"from {flavour} import SaliencyMonitor\nfrom tsm_lightning.data import TexturedObjects\n"
    future = list(re.finditer(r"^from __future__ import .*\n", source, re.M))
    at = future[-1].end() if future else 0
    source = source[:at] + header + source[at:]
    return source + _EPILOGUE


_EPILOGUE = f"""

# --- added by benchmarks/lightly_examples.py: what the monitor chose (read-only) ---
import json as _json

for _callback in trainer.callbacks:
    if type(_callback).__name__ == "SaliencyMonitor":
        print("{RESULT_MARK}", _json.dumps({{
            "layer": getattr(_callback, "_resolved_layer", None) or _callback.layer,
            "attention_module": getattr(_callback, "_attention_module", None),
            "logged_steps": list(_callback.logged_steps),
        }}))
"""


def _logged_pictures(folder: Path) -> tuple[list[str], list[str]]:
    """The ``saliency/*`` picture tags the run logged (TensorBoard event files, else PNG files) and their steps."""
    tags: set[str] = set()
    steps: set[str] = set()
    events = sorted(folder.rglob("events.out.tfevents.*"))
    if events:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        for event_file in events:
            accumulator = EventAccumulator(str(event_file), size_guidance={"images": 0})
            accumulator.Reload()
            for tag in accumulator.Tags()["images"]:
                if tag.startswith("saliency/"):
                    tags.add(tag)
                    steps.update(str(e.step) for e in accumulator.Images(tag))
    for png in folder.rglob("saliency_*_step*.png"):
        match = re.match(r"(saliency_.+)_step(\d+)\.png$", png.name)
        if match:
            tags.add(match[1].replace("saliency_", "saliency/", 1))
            steps.add(str(int(match[2])))
    return sorted(tags), sorted(steps, key=int)


def _error_line(stderr: str) -> str:
    """The exception that stopped a script: its last ``SomethingError: message`` line, else the last line."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in reversed(lines):
        if re.match(r"^[\w.]+(Error|Exception|Interrupt)\b(:|$)", line):
            return line
    return lines[-1] if lines else ""


def _monitor_warning(output: str) -> str:
    """The monitor's first 'skipped step' / failure warning, one line."""
    for line in output.splitlines():
        if "SaliencyMonitor" in line and ("skipped" in line or "could not" in line or "found no" in line):
            return line.strip()
    return ""


def _code_label(pythonpath: Path) -> str:
    """``<folder> <commit>``, with ``+ uncommitted changes`` when tracked files differ from the commit."""

    def git(*args: str) -> str:
        try:
            run = subprocess.run(["git", "-C", str(pythonpath), *args], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return ""
        return run.stdout.strip() if run.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD")
    dirty = " + uncommitted changes" if commit and git("status", "--porcelain", "--untracked-files=no") else ""
    return f"{pythonpath.name} {commit}{dirty}".strip()


def run_script(
    script: Path, work: Path, settings: Settings, *, pythonpath: Path, timeout: float, threads: int
) -> dict[str, object]:
    """Patch ``script`` into ``work/<name>/`` and run it; one CSV row (without ``code``)."""
    row: dict[str, object] = {"script": script.name, "layer": "", "attention": "", "pictures": 0, "error": ""}
    source = script.read_text(encoding="utf-8")
    if not re.search(r"\bTrainer\(", source):
        first = next((line.strip() for line in source.splitlines() if line.strip()), "")
        return row | {"status": "skipped", "seconds": 0.0, "error": f"no Trainer in the script ({first[:80]})"}
    try:
        patched = patch_script(source, settings)
    except PatchError as err:
        return row | {"status": "not patched", "seconds": 0.0, "error": str(err)}
    folder = work / script.stem
    folder.mkdir(parents=True, exist_ok=True)
    (folder / script.name).write_text(patched, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TSM_LIGHTNING_DEBUG")}
    env |= {"PYTHONPATH": str(pythonpath), "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    env |= {"PYTHONWARNINGS": "default", "CUDA_VISIBLE_DEVICES": ""}
    start = time.perf_counter()
    try:
        done = subprocess.run(
            [sys.executable, script.name], cwd=folder, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as err:
        seconds = round(time.perf_counter() - start, 1)
        output = err.stderr.decode(errors="replace") if isinstance(err.stderr, bytes) else (err.stderr or "")
        warning = _monitor_warning(output)
        return row | {"status": "timeout", "seconds": seconds, "error": f"no result after {timeout:.0f} s {warning}"}
    seconds = round(time.perf_counter() - start, 1)
    (folder / "stdout.txt").write_text(done.stdout, encoding="utf-8")
    (folder / "stderr.txt").write_text(done.stderr, encoding="utf-8")
    tags, _ = _logged_pictures(folder)
    result = {}
    for line in done.stdout.splitlines():
        if line.startswith(RESULT_MARK):
            result = json.loads(line[len(RESULT_MARK) :])
    layer = result.get("layer") or ""
    if not layer:
        match = re.search(r"SaliencyMonitor: no layer given, monitoring (\S+)", done.stderr + done.stdout)
        layer = match[1].strip("'\".,") if match else ""
    row |= {"layer": layer, "pictures": len(tags), "seconds": seconds}
    row["attention"] = "yes" if "saliency/attention" in tags else ("no" if tags else "")
    if done.returncode != 0:
        return row | {"status": "error", "error": _error_line(done.stderr)}
    if not settings.monitor:
        return row | {"status": "trained", "layer": "", "error": ""}
    if not tags:
        return row | {"status": "no pictures", "error": _monitor_warning(done.stderr + done.stdout)}
    return row | {"status": "ok", "error": _monitor_warning(done.stderr + done.stdout)}


def write_rows(out: Path, rows: Sequence[dict[str, object]], *, append: bool) -> list[dict[str, object]]:
    """Write ``rows`` to ``out`` (with ``append``, after the old rows whose (script, code) was not re-run)."""
    kept: list[dict[str, object]] = []
    if append and out.exists():
        fresh = {(r["script"], r["code"]) for r in rows}
        with out.open(newline="", encoding="utf-8") as f:
            kept = [r for r in csv.DictReader(f) if (r["script"], r["code"]) not in fresh]
    everything = sorted([*kept, *rows], key=lambda r: (str(r["script"]), str(r["code"])))
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(everything)
    return everything


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=Path, required=True, help="lightly's examples/pytorch_lightning folder")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="CSV written (default %(default)s)")
    parser.add_argument("--only", nargs="*", default=None, help="script names (with or without .py) to run")
    parser.add_argument("--pythonpath", type=Path, default=ROOT, help="checkout of tsm_lightning to run with")
    parser.add_argument("--label", default=None, help="the code column (default: folder name and commit)")
    parser.add_argument("--append", action="store_true", help="keep other rows of an existing --out")
    parser.add_argument("--work", type=Path, default=None, help="folder for the patched copies (default: temp)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per script")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each run")
    parser.add_argument("--batch-size", type=int, default=Settings.batch_size)
    parser.add_argument("--steps", type=int, default=Settings.steps)
    parser.add_argument("--num-samples", type=int, default=Settings.num_samples)
    parser.add_argument("--source-size", type=int, default=Settings.source_size)
    parser.add_argument("--no-monitor", action="store_true", help="run without the callback (status 'trained')")
    parser.add_argument(
        "--monitor-args",
        action="append",
        default=[],
        metavar="SCRIPT=ARGS",
        help="arguments of SaliencyMonitor(...) for one script, as source: dinov2='layer=\"x\"' (repeatable)",
    )
    args = parser.parse_args(argv)
    monitor_args = dict(item.split("=", 1) for item in args.monitor_args)

    scripts = sorted(args.examples.glob("*.py"))
    if args.only:
        wanted = {name.removesuffix(".py") for name in args.only}
        scripts = [s for s in scripts if s.stem in wanted]
    if not scripts:
        parser.error(f"no scripts to run in {args.examples} (--only {args.only})")
    settings = Settings(args.batch_size, args.steps, args.num_samples, args.source_size, not args.no_monitor)
    pythonpath = args.pythonpath.resolve()
    label = args.label or _code_label(pythonpath)
    rows = []
    with tempfile.TemporaryDirectory(prefix="lightly_examples_") as tmp:
        work = args.work or Path(tmp)
        for script in scripts:
            extra = monitor_args.get(script.stem, monitor_args.get(script.name, ""))
            run_settings = dataclasses.replace(settings, monitor_args=extra)
            row = run_script(
                script, work, run_settings, pythonpath=pythonpath, timeout=args.timeout, threads=args.threads
            ) | {
                "code": label
                + (f" + SaliencyMonitor({extra})" if extra else "")
                + (" no monitor" if args.no_monitor else "")
            }
            rows.append(row)
            print(
                f"{row['script']:<16} {row['status']:<12} {row['layer']!s:<28} attention={row['attention'] or '-':<3} "
                f"{row['seconds']:>7} s  {str(row['error'])[:160]}",
                flush=True,
            )
            write_rows(args.out, rows, append=args.append)  # after every script: a long run leaves its progress
    return 0


if __name__ == "__main__":
    sys.exit(main())
