"""The README's tag and metric tables name exactly what a real monitor run logs: docs and code cannot drift."""

import re
from pathlib import Path

import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.loggers import TensorBoardLogger
from lightning_helpers import TinySimSiam, TinyViTSimSiam, loader, trainer_kwargs
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tsm_lightning import METHODS, MapOptions, MetricOptions, Probe, SaliencyMonitor

README = (Path(__file__).parents[1] / "README.md").read_text()


def _logged_tags(tmp_path) -> set[str]:
    """Every tag of a real run on a CNN and on a vision transformer (which adds the attention map's tags)."""
    tags: set[str] = set()
    for name, model, extra in (
        ("cnn", TinySimSiam(), {"layer": "backbone.5"}),
        ("vit", TinyViTSimSiam(), {"maps": MapOptions(attention_heads=True)}),
    ):
        masks = torch.zeros(4, 16, 16, dtype=torch.bool)
        masks[:, 3:9, 4:12] = True
        monitor = SaliencyMonitor(
            Probe(torch.randn(4, 3, 16, 16), masks),
            every_n_steps=2,
            metrics=MetricOptions(faithfulness_every_n_runs=1, faithfulness_steps=2),
            strict=True,
            **extra,
        )
        logger = TensorBoardLogger(tmp_path, name=name)
        seed_everything(0)
        Trainer(callbacks=[monitor], **trainer_kwargs(tmp_path, logger=logger, max_steps=2)).fit(model, loader())
        acc = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "scalars": 0})
        acc.Reload()
        tags |= set(acc.Tags()["images"]) | set(acc.Tags()["scalars"])
    return tags


def _expand(tag: str) -> list[str]:
    """``<method>`` -> every method, ``<other>`` -> a second method; ``<metric>`` stays a pattern."""
    tags = [tag.replace("<method>", m) for m in METHODS] if "<method>" in tag else [tag]
    return [t.replace("<other>", "tsm" if not t.startswith("saliency/tsm/") else "mtsm") for t in tags]


def _metric_table_names() -> list[str]:
    start = README.index("| metric | what | when |")
    rows = README[start:].split("\n\n", 1)[0].splitlines()[2:]
    return [name for row in rows for name in re.findall(r"`([a-z_<>]+)`", row.split("|")[1])]


def test_every_tag_and_metric_the_readme_cites_is_logged(tmp_path):
    logged = _logged_tags(tmp_path)
    cited = {t for t in re.findall(r"`(saliency/[^`\s]*)`", README) if "<metric>" not in t}
    assert len(cited) > 15  # the tables were found
    missing = [t for tag in sorted(cited) for t in _expand(tag) if t not in logged]
    assert not missing, f"README cites tags a real run does not log: {missing}"
    metrics = _metric_table_names()
    assert "stability_prev" in metrics and "pointing_game" in metrics
    missing = [t for name in metrics for t in _expand(f"saliency/<method>/{name}") if t not in logged]
    assert not missing, f"README's metric table names metrics a real run does not log: {missing}"


def test_every_logged_per_method_metric_is_documented(tmp_path):
    logged = _logged_tags(tmp_path)
    documented = set(_metric_table_names())
    per_method = {t.split("/", 2)[2] for t in logged if t.startswith("saliency/tsm/")}
    per_method = {re.sub(r"^agreement_\w+", "agreement_<other>", m) for m in per_method}
    assert per_method <= documented, f"logged but not in the README's metric table: {per_method - documented}"
