"""Save the pictures a SaliencyMonitor logged to TensorBoard, at chosen steps, as PNG files.

    python examples/export_pictures.py runs/simclr/version_0 --tag saliency/all --steps first last --out docs/

writes ``docs/saliency_all_step<first>.png`` and ``docs/saliency_all_step<last>.png``: the exact images TensorBoard
shows, read back from the event files.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def export(log_dir: str | Path, tag: str, steps: list[str], out: str | Path) -> list[Path]:
    """Write the ``tag`` images logged at ``steps`` (integers, or ``first``/``last``) under ``out``."""
    acc = EventAccumulator(str(log_dir), size_guidance={"images": 0})
    acc.Reload()
    if tag not in acc.Tags()["images"]:
        raise SystemExit(f"error: no image tag {tag!r} in {log_dir}; tags: {sorted(acc.Tags()['images'])}")
    events = {event.step: event for event in acc.Images(tag)}
    ordered = sorted(events)
    written = []
    for wanted in steps:
        step = ordered[0] if wanted == "first" else ordered[-1] if wanted == "last" else int(wanted)
        if step not in events:
            raise SystemExit(f"error: {tag!r} was not logged at step {step}; logged steps: {ordered}")
        path = Path(out) / f"{tag.replace('/', '_')}_step{step}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(events[step].encoded_image_string)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("log_dir", help="a run's TensorBoard folder (the one holding events.out.tfevents.*)")
    parser.add_argument("--tag", default="saliency/all")
    parser.add_argument("--steps", nargs="+", default=["first", "last"], help="steps, or first / last")
    parser.add_argument("--out", default="docs")
    args = parser.parse_args(argv)
    for path in export(args.log_dir, args.tag, args.steps, args.out):
        print(f"Wrote {path}")


if __name__ == "__main__":
    main()
