"""What a user without masks can read: which label-free series tell a model that learns the object from the clutter?

Reads the run records of the controlled runs (``record.pt`` per run, written by ``benchmarks/recorder.py``: the
demo with background swap, which learns the object, and without, the control, which learns the clutter; several
seeds, maybe several SSL methods), and for every label-free series asks two questions against the TSM pointing game
(the only place masks are used):

* **tracking**: Spearman rank correlation of the series with the TSM pointing game over every (run, logged step);
* **separation**: at the final logged step(s), how well the series separates the two conditions: the AUC
  ``P(value of a swap run > value of a no-swap run)`` (ties count 1/2) and the standardised difference
  ``(mean_swap - mean_noswap) / sqrt((var_swap + var_noswap) / 2)``;

each with a 95 % percentile-bootstrap interval over runs (resampled within each condition). The series are:

* every scalar the monitor logged (``saliency/<map>/<metric>`` label-free metrics, ``saliency/features/*``,
  ``saliency/embedding/*``; localization metrics, reference lines and ``*_excluded`` counts left out), the training
  loss, and ``stability_first`` minus its fresh-init reference;
* the candidates of :mod:`tsm_lightning.metrics.shape` computed from the recorded grid-size maps, per map:
  ``largest_blob_mass``, ``blob_count``, ``border_distance``, ``mass_spread``, ``flip_consistency`` (needs the
  record's ``maps_flip``) and ``fresh_init_similarity`` (needs ``fresh_maps``);
* for each of them, ``<series>:delta``, its change since the run's first logged step (what a user can read off
  their own curve without any reference).

**Held-out judgement.** Which series count as signals is decided on the training seeds only (``--train-seeds``,
default 0 1 2): ``|rho| >= --min-rho`` and a separation AUC, in the direction of ``rho``, ``>= --min-auc``; the
warning threshold is the midpoint of the two conditions' mean final values on those seeds. A chosen series *holds*
when on the held-out seeds (``--heldout-seeds``, default 3 4) its rank correlation has the same sign and
``|rho| >= --min-rho``, and its aligned AUC ``>= --min-auc``; the threshold's accuracy on held-out runs is
reported beside. Held-out runs of one condition only are judged on their rank correlation alone (no AUC without
both conditions). When no run has a held-out seed yet (``--split auto``, the default, or ``--split loso``), every
seed is held out in turn (leave one seed out: choose on the others, judge on it), and a series holds when it is
chosen and holds in every fold; the reported threshold is then the midpoint over all runs.

Writes under ``--output`` (default ``benchmarks/results/label_free``):

* ``series.csv``: every series in long format ``run,method,seed,swap,step,tag,value``, the pointing game included;
  the ``:delta`` series are left out (each is its series minus its first value); step ``reference`` holds the
  shape statistics of the fresh-init maps;
* ``signals.csv``: one row per series (and per method when there are several) with every number above;
* ``table.md`` (every series) and ``readme_table.md`` (TSM's, the map-independent ones and every one that holds:
  the README table);
* ``summary.json``: command, date, runs used, split, parameters, the series that hold and those that failed, and
  the median cost in ms of each shape statistic on one record's last TSM maps (``cost_ms``);

and the figure ``--figure`` (default ``docs/label_free_signals.png``).

    .venv/bin/python benchmarks/label_free_study.py --records runs/sweep
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import shlex
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from tsm_lightning import upsample_maps
from tsm_lightning.metrics import (
    blob_count,
    border_distance,
    flip_consistency,
    fresh_init_similarity,
    largest_blob_mass,
    mass_spread,
    pointing_game,
)

ROOT = Path(__file__).parents[1]
TARGET = "saliency/tsm/pointing_game"
"""The masks' verdict every series is judged against."""
LOCALIZATION = ("pointing_game", "energy_in_mask", "mask_iou")
REFERENCE_PREFIXES = ("saliency/random/", "saliency/chance/", "saliency/fresh_init_", "saliency/isotropic/")
SHAPE = {
    "largest_blob_mass": largest_blob_mass,
    "blob_count": blob_count,
    "border_distance": border_distance,
    "mass_spread": mass_spread,
}
"""Shape statistics of one batch of maps, computed per map and step (and on the fresh-init maps as reference)."""
DELTA = ":delta"
RULE_MAPS = ("tsm", "eigencam", "multivec_eigencam", "mtsm", "attention")
"""Maps the end-of-training spread rule is evaluated on (:func:`spread_rule`)."""
FIGURE_SERIES = (
    "saliency/tsm/entropy",
    "saliency/eigencam/agreement_tsm",
    "shape/tsm/mass_spread",
    "shape/tsm/largest_blob_mass",
)
"""The figure's panels beside the pointing game: the README's candidates and the compactness that failed."""


@dataclass
class Run:
    """One run's series: ``values[tag][step]`` (the pointing game under :data:`TARGET`), constants in ``reference``."""

    name: str
    method: str
    seed: int
    swap: bool
    steps: list[int]
    values: dict[str, dict[int, float]] = field(default_factory=dict)
    reference: dict[str, float] = field(default_factory=dict)

    def add(self, tag: str, step: int, value: float) -> None:
        if math.isfinite(value):
            self.values.setdefault(tag, {})[step] = float(value)


# --------------------------------------------------------------------------------------------------- records
def load_records(directory: Path) -> list[tuple[str, dict]]:
    """Every ``record.pt`` under ``directory`` (recursively), with its run name (its folder, relative)."""
    found = sorted(directory.rglob("record.pt"))
    records = []
    for path in found:
        record = torch.load(path, map_location="cpu", weights_only=True)
        name = str(path.parent.relative_to(directory)) if path.parent != directory else path.parent.name
        records.append((name, record))
    return records


def is_label_free(tag: str) -> bool:
    """A logged scalar a user without masks has: no localization metric, reference line or exclusion count.

    Agreement is symmetric (``saliency/a/agreement_b`` equals ``saliency/b/agreement_a``): only the pair with
    ``a < b`` is kept.
    """
    if not tag.startswith("saliency/") or tag.startswith(REFERENCE_PREFIXES) or tag.endswith("_excluded"):
        return False
    parts = tag.split("/")
    if len(parts) == 3 and parts[2].startswith("agreement_") and parts[2].removeprefix("agreement_") < parts[1]:
        return False
    return parts[-1] not in LOCALIZATION


def _float_maps(maps: torch.Tensor) -> torch.Tensor:
    return maps.float().nan_to_num(0.0)


def series_of(name: str, record: Mapping) -> Run:
    """Every series of one record (see the module docstring), per logged step."""
    meta = record["meta"]
    steps = sorted(int(s) for s in record["steps"])
    run = Run(name, str(meta["method"]), int(meta["seed"]), bool(meta["swap"]), steps)
    masks = record.get("masks")
    fresh = {k: _float_maps(v) for k, v in record.get("fresh_maps", {}).items()}
    for map_name, m in fresh.items():
        for stat, fn in SHAPE.items():
            run.reference[f"shape/{map_name}/{stat}"] = float(fn(m).nanmean())
    scalars = record.get("scalars", {})
    for step in steps:
        logged = scalars.get(step, {})
        for tag, value in logged.items():
            if is_label_free(tag):
                run.add(tag, step, float(value))
        for tag, value in logged.items():
            if tag.endswith("/stability_first") and not tag.startswith(REFERENCE_PREFIXES):
                map_name = tag.split("/")[1]
                ref = logged.get(f"saliency/fresh_init_{map_name}/stability_first")
                ref = (
                    ref
                    if ref is not None
                    else _first_logged(scalars, f"saliency/fresh_init_{map_name}/stability_first")
                )
                if ref is not None:
                    run.add(f"{tag}_minus_fresh", step, float(value) - float(ref))
        maps = record.get("maps", {}).get(step, {})
        flipped = record.get("maps_flip", {}).get(step, {})
        for map_name, m in maps.items():
            m = _float_maps(m)
            for stat, fn in SHAPE.items():
                run.add(f"shape/{map_name}/{stat}", step, float(fn(m).nanmean()))
            if map_name in flipped:
                value = flip_consistency(m, _float_maps(flipped[map_name]), flipped_back=True)
                run.add(f"shape/{map_name}/flip_consistency", step, float(value.nanmean()))
            if map_name in fresh:
                run.add(
                    f"shape/{map_name}/fresh_init_similarity",
                    step,
                    float(fresh_init_similarity(m, fresh[map_name]).nanmean()),
                )
        target = logged.get(TARGET)
        if target is None and "tsm" in maps and masks is not None:
            full = upsample_maps(_float_maps(maps["tsm"]), tuple(masks.shape[-2:]))
            target = float(pointing_game(full, masks).nanmean())
        if target is not None:
            run.add(TARGET, step, float(target))
    losses = {int(k): float(v) for k, v in record.get("loss", {}).items()}
    for i, step in enumerate(steps):
        window = [v for k, v in losses.items() if (steps[i - 1] if i else -1) < k <= step]
        if window:
            run.add("loss", step, float(np.mean(window)))
    for tag in [t for t in run.values if t != TARGET and not t.endswith("_minus_fresh")]:
        first = run.values[tag].get(steps[0])
        if first is not None:
            for step, value in run.values[tag].items():
                run.add(tag + DELTA, step, value - first)
    return run


def _first_logged(scalars: Mapping, tag: str) -> float | None:
    for step in sorted(scalars):
        if tag in scalars[step]:
            return float(scalars[step][tag])
    return None


# --------------------------------------------------------------------------------------------------- statistics
def ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank."""
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    r = np.empty(len(x))
    start = 0
    while start < len(x):
        stop = start
        while stop + 1 < len(x) and sorted_x[stop + 1] == sorted_x[start]:
            stop += 1
        r[order[start : stop + 1]] = (start + stop) / 2 + 1
        start = stop + 1
    return r


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (Pearson correlation of the average ranks); NaN if either side is constant."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 3:
        return math.nan
    rx, ry = ranks(x) - (len(x) + 1) / 2, ranks(y) - (len(y) + 1) / 2
    denominator = math.sqrt(float((rx**2).sum() * (ry**2).sum()))
    return float((rx * ry).sum() / denominator) if denominator > 0 else math.nan


def auc(positive: Sequence[float], negative: Sequence[float]) -> float:
    """``P(p > n) + P(p = n) / 2`` over all pairs (the Mann-Whitney AUC); NaN if either side is empty."""
    p, n = np.asarray(positive, dtype=float)[:, None], np.asarray(negative, dtype=float)[None, :]
    if p.size == 0 or n.size == 0:
        return math.nan
    return float((p > n).mean() + 0.5 * (p == n).mean())


def standardized_difference(positive: Sequence[float], negative: Sequence[float]) -> float:
    """``(mean_p - mean_n) / sqrt((var_p + var_n) / 2)`` (sample variances); NaN if undefined."""
    p, n = np.asarray(positive, dtype=float), np.asarray(negative, dtype=float)
    if len(p) < 2 or len(n) < 2:
        return math.nan
    scale = math.sqrt((p.var(ddof=1) + n.var(ddof=1)) / 2)
    diff = p.mean() - n.mean()
    if scale == 0:
        return math.nan if diff == 0 else math.copysign(math.inf, diff)
    return float(diff / scale)


def points(runs: Iterable[Run], tag: str) -> tuple[list[float], list[float]]:
    """``(series, pointing game)`` over every (run, step) where both exist."""
    xs, ys = [], []
    for run in runs:
        series, target = run.values.get(tag, {}), run.values.get(TARGET, {})
        for step in run.steps:
            if step in series and step in target:
                xs.append(series[step])
                ys.append(target[step])
    return xs, ys


def final_value(run: Run, tag: str, final_steps: int) -> float:
    """Mean of the series over the run's last ``final_steps`` logged steps that have it (NaN if none)."""
    series = run.values.get(tag, {})
    have = [s for s in run.steps if s in series][-final_steps:]
    return float(np.mean([series[s] for s in have])) if have else math.nan


class Series:
    """One series over a group of runs, as arrays, so that the bootstrap only resamples run indices."""

    def __init__(self, runs: list[Run], tag: str, final_steps: int) -> None:
        self.swap = np.array([r.swap for r in runs], dtype=bool)
        self.seeds = np.array([r.seed for r in runs])
        self.points = [tuple(np.asarray(v, dtype=float) for v in points([r], tag)) for r in runs]
        self.finals = np.array([final_value(r, tag, final_steps) for r in runs])
        self.by_step = [r.values.get(tag, {}) for r in runs]

    def separated_from(self, direction: int, min_auc: float) -> float:
        """First logged step from which on the AUC of all runs, in ``direction``, stays ``>= min_auc`` (or NaN)."""
        steps = sorted({s for values in self.by_step for s in values})
        first = math.nan
        for step in steps:
            swap = [v[step] for v, w in zip(self.by_step, self.swap, strict=True) if w and step in v]
            noswap = [v[step] for v, w in zip(self.by_step, self.swap, strict=True) if not w and step in v]
            a = auc(swap, noswap)
            aligned = a if direction > 0 else 1 - a
            if direction != 0 and math.isfinite(aligned) and aligned >= min_auc:
                first = step if math.isnan(first) else first
            else:
                first = math.nan
        return float(first)

    def rho(self, index: Sequence[int]) -> float:
        if len(index) == 0:
            return math.nan
        xs = np.concatenate([self.points[i][0] for i in index])
        ys = np.concatenate([self.points[i][1] for i in index])
        return spearman(xs, ys)

    def split(self, index: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        idx = np.asarray(index, dtype=int)
        values, swap = self.finals[idx], self.swap[idx]
        keep = np.isfinite(values)
        return values[keep & swap], values[keep & ~swap]

    def auc(self, index: Sequence[int]) -> float:
        return auc(*self.split(index))

    def d(self, index: Sequence[int]) -> float:
        return standardized_difference(*self.split(index))


def bootstrap(swap: np.ndarray, index: Sequence[int], statistic, reps: int, seed: int) -> tuple[float, float]:
    """95 % percentile interval of ``statistic(index)`` over runs resampled with replacement within each condition.

    NaN (no interval) when a condition has a single run.
    """
    rng = np.random.default_rng(seed)
    idx = np.asarray(index, dtype=int)
    groups = [g for g in (idx[swap[idx]], idx[~swap[idx]]) if len(g)]
    if any(len(g) < 2 for g in groups):  # one run of a condition: nothing to resample, no interval
        return math.nan, math.nan
    values = []
    for _ in range(reps):
        sample = np.concatenate([rng.choice(g, len(g)) for g in groups])
        v = statistic(sample)
        if math.isfinite(v):
            values.append(v)
    if len(values) < reps // 2:
        return math.nan, math.nan
    lo, hi = np.percentile(values, [2.5, 97.5])
    return float(lo), float(hi)


@dataclass
class Options:
    folds: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...] = (((0, 1, 2), (3, 4)),)
    """``(training seeds, held-out seeds)`` per fold: one fixed split, or leave one seed out."""
    final_steps: int = 1
    min_rho: float = 0.5
    min_auc: float = 0.8
    reps: int = 1000
    seed: int = 0


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


def _sign(value: float) -> int:
    return 0 if not math.isfinite(value) or value == 0 else (1 if value > 0 else -1)


def fold(series: Series, train_seeds: Sequence[int], heldout_seeds: Sequence[int], opts: Options) -> dict[str, object]:
    """Choose on ``train_seeds`` (direction, selection, threshold), judge on ``heldout_seeds``."""
    train = np.flatnonzero(np.isin(series.seeds, list(train_seeds)))
    heldout = np.flatnonzero(np.isin(series.seeds, list(heldout_seeds)))
    rho_train, auc_train = series.rho(train), series.auc(train)
    direction = _sign(rho_train)
    aligned_train = auc_train if direction > 0 else 1 - auc_train
    swap, noswap = series.split(train)
    threshold = float((swap.mean() + noswap.mean()) / 2) if len(swap) and len(noswap) else math.nan
    selected = bool(
        direction != 0
        and abs(rho_train) >= opts.min_rho
        and math.isfinite(aligned_train)
        and aligned_train >= opts.min_auc
    )
    rho_ho, auc_ho = series.rho(heldout), series.auc(heldout)
    aligned_ho = auc_ho if direction >= 0 else 1 - auc_ho
    ho_swap, ho_noswap = series.split(heldout)
    correct: list[bool] = []
    if math.isfinite(threshold) and direction != 0:
        correct = [*(direction * (ho_swap - threshold) > 0), *(direction * (ho_noswap - threshold) < 0)]
    # Judged on the held-out runs' tracking, and on their separation where both conditions are there.
    judged = len(heldout) > 0 and math.isfinite(rho_ho)
    separated = not math.isfinite(auc_ho) or aligned_ho >= opts.min_auc
    held = bool(judged and direction * rho_ho >= opts.min_rho and separated)
    return {
        "rho_train": rho_train,
        "auc_train": auc_train,
        "direction": direction,
        "selected": selected,
        "threshold": threshold,
        "rho_heldout": rho_ho,
        "auc_heldout": auc_ho,
        "correct": correct,
        "judged": judged,
        "held": held,
    }


def evaluate(runs: list[Run], tag: str, opts: Options) -> dict[str, object]:
    """Every number of one series on one group of runs (see the module docstring)."""
    series = Series(runs, tag, opts.final_steps)
    every = np.arange(len(runs))
    row: dict[str, object] = {"tag": tag, "runs": sum(tag in r.values for r in runs)}
    row["points"] = sum(len(p[0]) for p in series.points)
    for key, fn in (("rho", series.rho), ("auc", series.auc), ("d", series.d)):
        row[key] = fn(every)
        row[f"{key}_lo"], row[f"{key}_hi"] = bootstrap(series.swap, every, fn, opts.reps, opts.seed)
    folds = [fold(series, train, heldout, opts) for train, heldout in opts.folds]
    if len(folds) == 1:
        (only,) = folds
        direction, threshold = int(only["direction"]), float(only["threshold"])
    else:  # leave one seed out: the reported direction and threshold are those of every run
        direction = _sign(float(row["rho"]))
        swap, noswap = series.split(every)
        threshold = float((swap.mean() + noswap.mean()) / 2) if len(swap) and len(noswap) else math.nan
    correct = [c for f in folds for c in f["correct"]]
    judged = [f for f in folds if f["judged"]]
    row.update(
        rho_train=_nanmean([float(f["rho_train"]) for f in folds]),
        auc_train=_nanmean([float(f["auc_train"]) for f in folds]),
        direction=direction,
        threshold=threshold,
        folds=len(folds),
        folds_selected=sum(bool(f["selected"]) for f in folds),
        folds_held=sum(bool(f["selected"] and f["held"]) for f in folds),
        rho_heldout=float(np.mean([f["rho_heldout"] for f in judged])) if judged else math.nan,
        auc_heldout=_nanmean([float(f["auc_heldout"]) for f in judged]),
        heldout_accuracy=float(np.mean(correct)) if correct and judged else math.nan,
    )
    row["selected"] = row["folds_selected"] == len(folds)
    if row["folds_selected"] == 0:
        verdict = "not selected"
    elif len(judged) < len(folds):
        verdict = "selected, no held-out runs"
    elif any(f["selected"] and not f["held"] for f in folds):
        verdict = "failed on held-out"
    elif row["selected"]:
        verdict = "holds"
    else:
        verdict = "selected in some folds only"
    row["verdict"] = verdict
    row["separated_from_step"] = series.separated_from(direction, opts.min_auc)
    return row


def analyse(runs: list[Run], opts: Options) -> list[dict[str, object]]:
    """:func:`evaluate` for every series, on all runs and, when there are several methods, on each method's runs."""
    groups = {"all": runs}
    methods = sorted({r.method for r in runs})
    if len(methods) > 1:
        groups.update({m: [r for r in runs if r.method == m] for m in methods})
    tags = sorted({t for r in runs for t in r.values if t != TARGET})
    rows = []
    for group, members in groups.items():
        for tag in tags:
            row = evaluate(members, tag, opts)
            if row["points"]:
                rows.append({"group": group, **row})
    return rows


def shape_cost(record: Mapping, repeats: int = 30) -> dict[str, object]:
    """Median milliseconds of each shape statistic (and of entropy, for comparison) on one record's last TSM maps."""
    from tsm_lightning.metrics import map_entropy

    last = max(int(s) for s in record["steps"])
    maps = _float_maps(record["maps"][last]["tsm"])
    fresh = _float_maps(record["fresh_maps"].get("tsm", record["maps"][last]["tsm"]))
    functions = {
        **SHAPE,
        "fresh_init_similarity": lambda m: fresh_init_similarity(m, fresh),
        "entropy (logged today)": map_entropy,
    }
    out: dict[str, object] = {"maps": list(maps.shape), "threads": torch.get_num_threads()}
    for name, fn in functions.items():
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn(maps)
            times.append(time.perf_counter() - start)
        out[name] = round(1e3 * float(np.median(times)), 3)
    return out


# --------------------------------------------------------------------------------------------------- outputs
def write_series(runs: list[Run], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run", "method", "seed", "swap", "step", "tag", "value"])
        for run in runs:
            for tag in sorted(t for t in run.values if not t.endswith(DELTA)):  # deltas: value - first value
                for step in sorted(run.values[tag]):
                    writer.writerow(
                        [run.name, run.method, run.seed, int(run.swap), step, tag, f"{run.values[tag][step]:.6g}"]
                    )
            for tag, value in sorted(run.reference.items()):
                writer.writerow([run.name, run.method, run.seed, int(run.swap), "reference", tag, f"{value:.6g}"])


def write_signals(rows: list[dict[str, object]], path: Path) -> None:
    columns = list(rows[0]) if rows else ["group", "tag"]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in row.items()})


def _interval(row: Mapping, key: str, sign: str = "+") -> str:
    v, lo, hi = row[key], row[f"{key}_lo"], row[f"{key}_hi"]
    if not math.isfinite(v):
        return "-"
    return f"{v:{sign}.2f} [{lo:{sign}.2f}, {hi:{sign}.2f}]" if math.isfinite(lo) else f"{v:{sign}.2f}"


def _fmt(value: object, sign: str = "") -> str:
    return f"{value:{sign}.2f}" if isinstance(value, float) and math.isfinite(value) else "-"


def short(tag: object) -> str:
    """A series' name without the ``saliency/`` prefix (the README cites only tags a monitor run really logs)."""
    return str(tag).removeprefix("saliency/")


def order(rows: list[dict[str, object]]) -> list[dict[str, object]]:
    """Rows by verdict (holds first), then by the training seeds' |rho|."""
    rank = {
        "holds": 0,
        "selected, no held-out runs": 1,
        "selected in some folds only": 2,
        "failed on held-out": 3,
        "not selected": 4,
    }
    return sorted(rows, key=lambda r: (rank[str(r["verdict"])], -abs(_finite(r["rho_train"]))))


def _finite(v: object) -> float:
    return float(v) if isinstance(v, float) and math.isfinite(v) else 0.0


def readme_rows(rows: list[dict[str, object]]) -> list[dict[str, object]]:
    """The README's subset: TSM's series and those that do not depend on the map, plus every series that holds."""

    def shown(r: dict[str, object]) -> bool:
        tag = str(r["tag"])
        if r["verdict"] == "holds":
            return True
        if tag.endswith(DELTA):
            return False
        parts = tag.split("/")
        per_map = len(parts) == 3 and parts[1] not in ("features", "embedding")
        return not per_map or parts[1] == "tsm" or parts[2] == "agreement_tsm"

    return [r for r in rows if shown(r)]


def markdown(rows: list[dict[str, object]], limit: int | None = None) -> str:
    """The README table: one row per series of the ``all`` group (names without ``saliency/``).

    The choice and held-out columns are those of the one fixed split, or means over the leave-one-seed-out folds
    (the verdict then says in how many folds the series was chosen and held).
    """
    lines = [
        "| series | rank corr. with pointing game (all runs) | separation AUC, final step | std. difference | "
        "choice seeds: rho / AUC | held-out seeds: rho / AUC / threshold accuracy | verdict |",
        "|:--|--:|--:|--:|--:|--:|:--|",
    ]
    shown = [r for r in order(rows) if r["group"] == "all"][:limit]
    for r in shown:
        ho = (
            f"{r['rho_heldout']:+.2f} / {_fmt(r['auc_heldout'])} / {_fmt(r['heldout_accuracy'])}"
            if math.isfinite(r["rho_heldout"])
            else "-"
        )
        verdict = str(r["verdict"])
        if int(r["folds"]) > 1:
            verdict += f" (chosen in {r['folds_selected']}/{r['folds']} folds, held in {r['folds_held']})"
        lines.append(
            f"| `{short(r['tag'])}` | {_interval(r, 'rho')} | {_interval(r, 'auc', '')} | {_interval(r, 'd')} | "
            f"{_fmt(r['rho_train'], '+')} / {_fmt(r['auc_train'])} | {ho} | {verdict} |"
        )
    return "\n".join(lines)


def figure(runs: list[Run], rows: list[dict[str, object]], path: Path, opts: Options) -> None:
    """Pointing game and :data:`FIGURE_SERIES` per step, swap vs no-swap, and the rank correlations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    all_rows = [r for r in order(rows) if r["group"] == "all"]
    by_tag = {str(r["tag"]): r for r in all_rows}
    chosen = [by_tag[t] for t in FIGURE_SERIES if t in by_tag]
    for r in all_rows:  # fill up with the best remaining series
        if len(chosen) >= 4:
            break
        if r not in chosen and not str(r["tag"]).endswith(DELTA):
            chosen.append(r)
    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5))
    panels = [(TARGET, None), *((str(r["tag"]), r) for r in chosen[:4])]
    colours = {True: "tab:blue", False: "tab:orange"}
    for ax, (tag, row) in zip(axes.flat, panels, strict=False):
        for run in runs:
            series = run.values.get(tag, {})
            steps = [s for s in run.steps if s in series]
            style = "-" if len(opts.folds) > 1 or run.seed in opts.folds[0][0] else "--"
            ax.plot(steps, [series[s] for s in steps], style, color=colours[run.swap], alpha=0.8, lw=1.2)
        references = [run.reference[tag] for run in runs if tag in run.reference]
        if references:
            span = [min(min(r.steps) for r in runs), max(max(r.steps) for r in runs)]
            reference = float(np.mean(references))  # a plotted line (not axhline) so that the axis includes it
            ax.plot(span, [reference, reference], color="grey", ls=":", lw=1, label="fresh-init network")
        if row is not None and math.isfinite(row["threshold"]):
            ax.axhline(row["threshold"], color="black", ls="-.", lw=1, label="threshold (midpoint of final means)")
        title = tag if row is None else f"{tag}\n{row['verdict']}; rho {row['rho']:+.2f}, AUC {row['auc']:.2f}"
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
    handles = [
        plt.Line2D([], [], color=colours[True], label="background swap (learns the object)"),
        plt.Line2D([], [], color=colours[False], label="no swap (learns the clutter)"),
    ]
    if len(opts.folds) == 1:
        handles.append(plt.Line2D([], [], color="k", ls="-", label=f"train seeds {list(opts.folds[0][0])}"))
        handles.append(plt.Line2D([], [], color="k", ls="--", label=f"held-out seeds {list(opts.folds[0][1])}"))
    axes.flat[0].legend(handles=handles, fontsize=7, loc="best")
    for ax in list(axes.flat)[1:5]:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best")
    ax = axes.flat[5]
    forest = [r for r in all_rows if not str(r["tag"]).endswith(DELTA) and math.isfinite(r["rho"])]
    forest = sorted(forest, key=lambda r: -abs(r["rho"]))[:16][::-1]
    y = np.arange(len(forest))
    marks = {
        "holds": "tab:green",
        "failed on held-out": "tab:red",
        "selected in some folds only": "tab:purple",
        "selected, no held-out runs": "black",
        "not selected": "grey",
    }
    for i, r in enumerate(forest):
        colour = marks.get(str(r["verdict"]), "black")
        lo, hi = r["rho_lo"], r["rho_hi"]
        if math.isfinite(lo):
            ax.plot([lo, hi], [i, i], color=colour, lw=1.5)
        ax.plot([r["rho"]], [i], "o", color=colour, ms=4)
    ax.set_yticks(y, [short(r["tag"]) for r in forest], fontsize=6)
    ax.axvline(0, color="grey", lw=0.8)
    ax.set_xlim(-1, 1)
    ax.set_xlabel("Spearman rho with the pointing game (95 % bootstrap)", fontsize=8)
    ax.set_title(
        "green: holds on held-out seeds; red: failed there;\n"
        "purple: chosen in some folds; black: not judged; grey: not chosen",
        fontsize=8,
    )
    fig.suptitle(f"Label-free series vs the masks' verdict: {len(runs)} runs", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


RULE_FIELDS = ("run", "method", "seed", "swap", "map", "final_step", "spread", "fresh_init_spread", "flagged")
RULE_FIELDS += ("pointing_game_end", "flagged_from_half")


def spread_rule(runs: Sequence[Run]) -> list[dict[str, object]]:
    """The monitor's end-of-training warning on every run: ``spread`` at the last step above the fresh-init maps'.

    One row per (run, map) with both series: the final spread, the fresh-init reference (the recorder's
    independently initialised network), ``flagged`` (the warning would fire), TSM's final pointing game, and
    ``flagged_from_half``: the share of the logged steps in the second half of the run at which the rule holds.
    """
    rows = []
    for run in runs:
        for name in RULE_MAPS:
            tag = f"shape/{name}/mass_spread"
            series, reference = run.values.get(tag), run.reference.get(tag)
            if not series or reference is None:
                continue
            last = max(series)
            half = [series[s] > reference for s in series if s >= last / 2]
            rows.append(
                {
                    "run": run.name,
                    "method": run.method,
                    "seed": run.seed,
                    "swap": run.swap,
                    "map": name,
                    "final_step": last,
                    "spread": round(series[last], 4),
                    "fresh_init_spread": round(reference, 4),
                    "flagged": series[last] > reference,
                    "pointing_game_end": round(run.values[TARGET].get(last, math.nan), 4),
                    "flagged_from_half": round(sum(half) / len(half), 3),
                }
            )
    return rows


def rule_summary(rows: Sequence[Mapping[str, object]]) -> dict[str, dict[str, str]]:
    """Per map: how many no-swap runs the rule flags, and how many background-swap runs, as ``"k/n"``."""
    out: dict[str, dict[str, str]] = {}
    for name in RULE_MAPS:
        mine = [r for r in rows if r["map"] == name]
        if mine:
            noswap = [r for r in mine if not r["swap"]]
            swap = [r for r in mine if r["swap"]]
            out[name] = {
                "flagged_noswap": f"{sum(bool(r['flagged']) for r in noswap)}/{len(noswap)}",
                "flagged_swap": f"{sum(bool(r['flagged']) for r in swap)}/{len(swap)}",
            }
    return out


def main(argv: list[str] | None = None) -> list[dict[str, object]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=Path, default=ROOT / "runs" / "sweep", help="folder searched for record.pt")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "label_free")
    parser.add_argument("--figure", type=Path, default=ROOT / "docs" / "label_free_signals.png")
    parser.add_argument("--train-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--heldout-seeds", type=int, nargs="+", default=[3, 4])
    parser.add_argument(
        "--split",
        choices=("auto", "fixed", "loso"),
        default="auto",
        help="fixed: choose on --train-seeds, judge on --heldout-seeds; loso: leave one seed out (choose on the "
        "others, judge on it, for every seed); auto (default): fixed if any run has a held-out seed or all runs "
        "have one seed, else loso",
    )
    parser.add_argument("--final-steps", type=int, default=1, help="logged steps averaged for the separation")
    parser.add_argument("--min-rho", type=float, default=0.5)
    parser.add_argument("--min-auc", type=float, default=0.8)
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of the runs")
    parser.add_argument("--rows", type=int, default=None, help="rows of the printed table (default: all)")
    args = parser.parse_args(argv)
    if set(args.train_seeds) & set(args.heldout_seeds):
        parser.error(f"--train-seeds {args.train_seeds} and --heldout-seeds {args.heldout_seeds} must not overlap.")
    if args.final_steps < 1:
        parser.error(f"--final-steps must be at least 1, got {args.final_steps}.")
    records = load_records(args.records)
    if not records:
        parser.error(f"no record.pt under {args.records}; pass --records the folder the sweep writes its runs to.")
    torch.set_grad_enabled(False)
    runs = [series_of(name, record) for name, record in records]
    seeds = sorted({r.seed for r in runs})
    split = args.split
    if split == "auto":
        split = "fixed" if set(seeds) & set(args.heldout_seeds) or len(seeds) < 2 else "loso"
    if split == "loso":
        if len(seeds) < 2:
            parser.error(f"leave-one-seed-out needs runs of at least two seeds, got seeds {seeds}.")
        folds = tuple((tuple(s for s in seeds if s != k), (k,)) for k in seeds)
    else:
        folds = ((tuple(args.train_seeds), tuple(args.heldout_seeds)),)
    opts = Options(folds, args.final_steps, args.min_rho, args.min_auc, args.bootstrap)
    for run, (_, record) in zip(runs, records, strict=True):
        unaligned = [s for s in run.steps if not any(is_label_free(t) for t in record.get("scalars", {}).get(s, {}))]
        if unaligned:
            print(
                f"warning: {run.name} has no logged saliency scalars at its recorded steps {unaligned}", file=sys.stderr
            )
    missing = [r.name for r in runs if TARGET not in r.values]
    if missing:
        parser.error(f"runs {missing} have no {TARGET} and no tsm maps with masks to compute it from.")
    rows = analyse(runs, opts)
    cost = shape_cost(records[0][1])
    args.output.mkdir(parents=True, exist_ok=True)
    write_series(runs, args.output / "series.csv")
    write_signals(rows, args.output / "signals.csv")
    table = markdown(rows, args.rows)
    (args.output / "table.md").write_text(table + "\n")
    (args.output / "readme_table.md").write_text(markdown(readme_rows(rows)) + "\n")
    figure(runs, rows, args.figure, opts)
    command = "python benchmarks/label_free_study.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    summary = {
        "command": command,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "runs": [{"name": r.name, "method": r.method, "seed": r.seed, "swap": r.swap, "steps": r.steps} for r in runs],
        "split": split,
        "options": vars(opts),
        "target": TARGET,
        "cost_ms": cost,
        "holds": [r["tag"] for r in rows if r["group"] == "all" and r["verdict"] == "holds"],
        "failed_on_heldout": [r["tag"] for r in rows if r["group"] == "all" and r["verdict"] == "failed on held-out"],
    }
    rule = spread_rule(runs)
    with (args.output / "spread_rule.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=RULE_FIELDS)
        writer.writeheader()
        writer.writerows(rule)
    summary["spread_rule"] = rule_summary(rule)
    (args.output / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    conditions = f"{sum(r.swap for r in runs)} swap, {sum(not r.swap for r in runs)} no-swap"
    print(f"Label-free study: {len(runs)} runs ({conditions}), split {split}, {summary['date']}\n  {command}\n")
    print(table)
    return rows


if __name__ == "__main__":
    main()
